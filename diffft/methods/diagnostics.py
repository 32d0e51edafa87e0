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

from collections.abc import Iterable, Sequence

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


@torch.no_grad()
def grad_norm(params: Iterable[torch.nn.Parameter]) -> torch.Tensor:
    """The total L2 norm of the parameters' gradients (0 when none has one)."""
    norms = [p.grad.detach().float().norm() for p in params if p.grad is not None]
    return torch.stack(norms).norm() if norms else torch.zeros(())


def sigma_logs(log_sigma_table: torch.Tensor) -> dict[str, torch.Tensor]:
    """``{sigma/k1: ..., sigma/kK: ...}`` from a chain's ``log_sigma_table()`` (index 0 unused)."""
    sigma = log_sigma_table.detach().exp()
    return {f"sigma/k{k}": sigma[k] for k in range(1, sigma.shape[0])}
