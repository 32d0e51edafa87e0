"""A run's result files: ``summary.json`` (``{row label: {metric: [one value per draw]}}``, the
data floor as ``"data floor"``) and ``rows.json`` (``[{id, label, role}]`` in table order), which
ties each label to its stable row id."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

FLOOR = "data floor"


def write_summary(
    out: Path, values: dict[str, dict[str, list[float]]], rows: list[dict[str, str]]
) -> None:
    """``values`` by label (the floor included), ``rows``: ``{id, label, role}`` per row."""
    (out / "summary.json").write_text(json.dumps(values, indent=1))
    (out / "rows.json").write_text(json.dumps(rows, indent=1))


def read_rows(run: Path) -> list[dict[str, str]]:
    """A run's ``rows.json``; for a run written before it, every summary label as its own id
    (the first one the main row)."""
    path = Path(run) / "rows.json"
    if path.is_file():
        return json.loads(path.read_text())
    labels = [k for k in json.loads((Path(run) / "summary.json").read_text()) if k != FLOOR]
    return [
        {"id": label, "label": label, "role": "main" if i == 0 else "variant"}
        for i, label in enumerate(labels)
    ]


def main_values(run: Path) -> dict[str, list[float]] | None:
    """The values of a run's main row (None when it has none)."""
    summary = json.loads((Path(run) / "summary.json").read_text())
    label = next((r["label"] for r in read_rows(run) if r["role"] == "main"), None)
    return summary.get(label) if label is not None else None


def labels_by_id(run: Path) -> dict[str, str]:
    return {r["id"]: r["label"] for r in read_rows(run)}


def as_label_keys(refs: dict[str, Any], labels: dict[str, str]) -> dict[str, Any]:
    """References keyed by row id, re-keyed by the rows' display labels (ids without a row of
    this run are dropped)."""
    return {labels[i]: r for i, r in refs.items() if i in labels}
