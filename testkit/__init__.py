"""Helpers shared by the tests and the bench: local fake upstreams, a raw JSON-RPC server speaker,
process-tree helpers. Not shipped in the wheel."""
