"""Paper and baseline references (``eval.references``, keyed by row id) for a run's table and
for ``diffft.aggregate``: one rule for both."""

from __future__ import annotations

from typing import Any


def select(cfg: dict[str, Any], dotted: str) -> Any:
    """The value at a dotted key of a nested dict (None where a part is missing)."""
    node: Any = cfg
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def references_for(cfg: dict[str, Any], identity: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """``{row id: {source: value}}`` from ``eval.references`` (a plain, resolved config), when
    the run's data are those the references were measured on (every key of
    ``eval.reference_data`` matches ``identity``; null = any data) and the run is the setup they
    were measured with (every dotted key of ``eval.reference_when``, e.g.
    ``method.schedule.name: sigmoid``, has that value); else none."""
    ev = cfg.get("eval") or {}
    refs = ev.get("references") or {}  # `~eval.references` (no paper column) is allowed
    if not isinstance(refs, dict) or any(not isinstance(v, dict | None) for v in refs.values()):
        raise ValueError(f"eval.references: expected {{row id: {{source: value}}}}, got {refs!r}")
    on = ev.get("reference_data")
    if on is not None and any(identity.get(k) != v for k, v in on.items()):
        return {}
    if any(select(cfg, k) != v for k, v in (ev.get("reference_when") or {}).items()):
        return {}
    return {row_id: dict(r) for row_id, r in refs.items() if r}


def reference_text(ref: dict[str, Any]) -> str:
    """One table cell: ``source value, source value``."""
    return ", ".join(f"{k} {v}" for k, v in ref.items())
