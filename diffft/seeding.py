"""The seeds of every random stream of a run (data order, noise, rollouts), one per (seed, rank,
batch): used by the methods and by the datamodules alike."""

from __future__ import annotations


def batch_seed(seed: int, rank: int, batch: int) -> int:
    """A 63-bit seed for ``(run seed, rank, batch)``: distinct streams for every rank and batch
    (the triple is combined with odd 64-bit constants and mixed by SplitMix64's finaliser;
    ~1 us, where numpy's ``SeedSequence`` takes 20 us of a 2 ms toy step)."""
    m = (1 << 64) - 1
    x = (seed * 0x9E3779B97F4A7C15 + rank * 0xD1B54A32D192ED03 + batch * 0xABC98388FB8FAC03) & m
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & m
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & m
    return (x ^ (x >> 31)) >> 1
