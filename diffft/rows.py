"""Typed table rows: what a method offers for evaluation, and what the report layer adds.

A method's ``rows()`` returns ``Row`` objects; the report layer appends compare, solver and
best-checkpoint rows. A row's ``id`` is stable and short (``sft_pg``, ``init``, ``ddpm_full``,
``dpmpp2m``): compare entries, solver rows and paper references (``eval.references``) are keyed by
it. Its ``label`` is for display only (it may name steps, options, checkpoints), so renaming a
label never drops a reference.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

# main: the run's model as configured (a fine-tuned sampler, a DDPM's own chain); exactly one.
# init: the model a fine-tuning started from. variant: the run's model sampled another way (other
# step counts, value guidance). best: the best periodic checkpoint. compare: another model of a
# cached stage. solver: a training-free solver on a DDPM.
ROLES = ("main", "init", "variant", "best", "compare", "solver")


@dataclass(frozen=True)
class Row:
    """One row of a run's table: ``sampler`` draws its samples, ``energy`` (points -> ``[n]``,
    low on data; or None) is scored by the energy metrics such as ``auc``; ``nfe``: its network
    evaluations per sample, where the method offers several (a distilled student per round)."""

    id: str
    label: str
    sampler: Any  # diffft.diffusion.sampler.Sampler (a GaussianChain, a solver, a guided chain)
    energy: Callable[[torch.Tensor], torch.Tensor] | None = None
    role: str = "main"
    nfe: int | None = None  # network evaluations per sample (``diffft.sample steps=K`` picks it)

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise ValueError(f"row {self.id!r}: role {self.role!r} is not one of {ROLES}")


def main_row(rows: Sequence[Row]) -> Row:
    """The one row with role ``main``."""
    mains = [r for r in rows if r.role == "main"]
    if len(mains) != 1:
        raise ValueError(f"expected exactly one main row, got {[r.id for r in mains]}")
    return mains[0]


def check_unique(rows: Sequence[Row]) -> None:
    """Ids and labels are each unique within a table."""
    for what in ("id", "label"):
        seen = [getattr(r, what) for r in rows]
        dup = sorted({v for v in seen if seen.count(v) > 1})
        if dup:
            raise ValueError(f"table rows: duplicate {what}s {dup}")
