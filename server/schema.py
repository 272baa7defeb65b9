"""Compact JSON schemas: every byte of tools/list is paid in every conversation's context."""

from __future__ import annotations

from typing import Any


def compact_schema(schema: dict[str, Any]) -> dict[str, Any]:
    """The same schema without pydantic's noise: definitions inlined (ours are not recursive), no
    titles, `null` folded into `type`, no null defaults."""
    defs = schema.get("$defs", {})
    compacted: dict[str, Any] = _compact(_inline(schema, defs))
    compacted.pop("$defs", None)
    return compacted


def _inline(node: Any, defs: dict[str, Any]) -> Any:
    if isinstance(node, list):
        return [_inline(item, defs) for item in node]
    if not isinstance(node, dict):
        return node
    ref = node.get("$ref")
    if isinstance(ref, str) and ref.startswith("#/$defs/"):
        return _inline(defs[ref.removeprefix("#/$defs/")], defs)
    return {k: _inline(v, defs) for k, v in node.items() if k != "$defs"}


def _compact(schema: Any) -> Any:
    if isinstance(schema, list):
        return [_compact(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: _compact(v) for k, v in schema.items() if k != "title" or not isinstance(v, str)}
    if "properties" in schema:  # property names may be "title": keep them
        out["properties"] = {k: _compact(v) for k, v in schema["properties"].items()}
    if out.get("default", ...) is None:
        del out["default"]
    if out.get("additionalProperties") is True:
        del out["additionalProperties"]
    options = out.get("anyOf")
    if isinstance(options, list) and len(options) == 2 and {"type": "null"} in options:
        other = next(o for o in options if o != {"type": "null"})
        if isinstance(other.get("type"), str):
            del out["anyOf"]
            out.update({**other, "type": [other["type"], "null"]})
    return out
