"""Nested config dicts addressed by dotted keys (``evaluator_cfg.sampler.batch_size``).

OpenGait's configs are nested mappings; the CPU checks, the ``--cpu-overrides`` fixes and the zoo's
model overrides all name a value by its key path, and read or set it here.
"""
from __future__ import annotations

from typing import Any, Dict, MutableMapping


def get_dotted(d: Dict[str, Any], key: str, default: Any = None) -> Any:
    """The value at ``key`` (``a.b.c``), or ``default`` when a part of the path is missing."""
    cur: Any = d
    for part in key.split("."):
        if not isinstance(cur, dict) or part not in cur:
            return default
        cur = cur[part]
    return cur


def set_dotted(d: MutableMapping[str, Any], key: str, value: Any) -> None:
    """Set the value at ``key`` (``a.b.c``), making the missing mappings on the way."""
    *parents, last = key.split(".")
    cur = d
    for part in parents:
        nxt = cur.setdefault(part, {})
        if not isinstance(nxt, MutableMapping):
            raise TypeError(f"{key}: {part!r} holds a {type(nxt).__name__}, not a mapping")
        cur = nxt
    cur[last] = value
