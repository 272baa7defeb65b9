"""Fireable tools: the registry, the context a running tool gets, and the built-in tools."""
