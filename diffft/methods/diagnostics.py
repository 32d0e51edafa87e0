"""Training diagnostics that tell a healthy fine-tuning run from a stuck or diverging one; the
methods log them (``diag/...``) on their logging batches (``trainer.log_every_n_steps``):

* ``diag/f_fake_sd``: the spread of the critic / energy over the batch's samples (a critic that
  gives every sample the same value gives the sampler no signal);
* ``diag/sample_var_ratio``: the per-pixel (per-coordinate) variance of the samples over the
  data's, averaged over pixels: > 1 when the chain leaves noise in its samples or blows up,
  < 1 when it collapses;
* ``diag/pg_grad_cosine``: the cosine between two estimates of a policy-gradient step from
  disjoint halves of its minibatch (near 0: the step is mostly noise; SFT-PG);
* ``diag/sampler_grad_norm``: the sampler's gradient norm before clipping;
* ``sigma/kK``: every learned sigma_k (DxMI, ``sampler.learn_sigma``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import torch


@torch.no_grad()
def sample_diagnostics(
    real: torch.Tensor, fake: torch.Tensor, f_fake: torch.Tensor
) -> dict[str, torch.Tensor]:
    """``diag/f_fake_sd`` and ``diag/sample_var_ratio`` of one batch (see the module)."""
    var_fake = fake.detach().float().flatten(1).var(0)
    var_real = real.detach().float().flatten(1).var(0)
    ratio = var_fake.mean() / var_real.mean().clamp_min(1e-12)
    return {"diag/f_fake_sd": f_fake.detach().float().std(), "diag/sample_var_ratio": ratio}


def gradient_cosine(
    a: Sequence[torch.Tensor | None], b: Sequence[torch.Tensor | None]
) -> torch.Tensor:
    """The cosine between two gradients given as per-parameter lists (None: no gradient)."""
    pairs = [(x, y) for x, y in zip(a, b, strict=True) if x is not None and y is not None]
    if not pairs:
        return torch.tensor(float("nan"))
    flat_a = torch.cat([x.flatten().float() for x, _ in pairs])
    flat_b = torch.cat([y.flatten().float() for _, y in pairs])
    return torch.nn.functional.cosine_similarity(flat_a, flat_b, dim=0).detach()


def split_gradient_cosine(
    loss_of: Callable[[slice], torch.Tensor],
    n: int,
    params: Iterable[torch.nn.Parameter],
    chunk: int | None = None,
) -> torch.Tensor:
    """The cosine between the gradients of ``loss_of`` (a mean over the items of a slice) on
    the first and the second half of ``n`` items: two independent estimates of one step's
    gradient (near 0: the step is mostly noise). Each half is back-propagated ``chunk`` items
    at a time (the memory of the method's own step) with the random state forked, so the extra
    passes change nothing the run draws (dropout masks included). NaN when ``n < 2``."""
    params = [p for p in params if p.requires_grad]
    if n < 2 or not params:
        return torch.tensor(float("nan"))
    devices = sorted({p.device.index or 0 for p in params if p.device.type == "cuda"})
    halves = [slice(0, n // 2), slice(n // 2, n)]
    estimates = []
    with torch.random.fork_rng(devices=devices):
        for half in halves:
            size = half.stop - half.start
            step = chunk or size
            total: list[torch.Tensor | None] = [None] * len(params)
            for start in range(half.start, half.stop, step):
                part = slice(start, min(start + step, half.stop))
                weight = (part.stop - part.start) / size
                grads = torch.autograd.grad(loss_of(part) * weight, params, allow_unused=True)
                total = [
                    g if t is None else (t if g is None else t + g)
                    for t, g in zip(total, grads, strict=True)
                ]
            estimates.append(total)
    return gradient_cosine(*estimates)


@torch.no_grad()
def grad_norm(params: Iterable[torch.nn.Parameter]) -> torch.Tensor:
    """The total L2 norm of the parameters' gradients (0 when none has one)."""
    norms = [p.grad.detach().float().norm() for p in params if p.grad is not None]
    return torch.stack(norms).norm() if norms else torch.zeros(())


def sigma_logs(log_sigma_table: torch.Tensor) -> dict[str, torch.Tensor]:
    """``{sigma/k1: ..., sigma/kK: ...}`` from a chain's ``log_sigma_table()`` (index 0 unused)."""
    sigma = log_sigma_table.detach().exp()
    return {f"sigma/k{k}": sigma[k] for k in range(1, sigma.shape[0])}
