"""Progressive distillation (Salimans & Ho, ICLR 2022, Alg. 2): halve a DDIM sampler's steps.

The teacher is the pretrained DDPM's deterministic DDIM chain (eta = 0) on ``start_steps``
sub-sampled steps (the ``init`` row). Round r trains a student so that ONE of its DDIM steps from
``t`` to ``t''`` lands where TWO DDIM steps of the current teacher ``t -> t' -> t''`` land; then
the student becomes the teacher and the steps halve, ``start_steps -> start_steps / 2 -> ... ->
min_steps``, all in one run. Every round's student is kept (a frozen copy per round, all in the
checkpoint) and is a row of the table: ``pd_K`` samples with K DDIM steps through the shared
``GaussianChain``, no new sampling loop.

Choices (the paper leaves the network's output space open):

* **Parameterisation**: the eps-network backbone is kept (the student is the teacher's
  eps-net). The target of Alg. 2 is the x-prediction ``x~`` that makes one student step equal
  two teacher steps; it is converted to the eps-net's output space, ``eps~ = (z_t - alpha_t
  x~) / sigma_t``, and the loss is the paper's truncated-SNR weighted x-loss (Sec. 4,
  ``w(lambda_t) = max(SNR_t, 1)``) written in eps units: ``max(SNR, 1) ||x^ - x~||^2 =
  max(1, 1 / SNR) ||eps^ - eps~||^2``.
* **Grid**: ``trailing`` sub-sampling (``tau_k = round(k T / K) - 1``): the K-step grid is
  exactly every other point of the 2K-step one, so t, t' and t'' of Alg. 2 are all grid times,
  and every chain starts at the last network time (x_T ~ N(0, I) matches it best).
* **Optimisation** (automatic, one Adam over the live student): at the start of each round
  the optimiser's state is cleared (Alg. 2 starts each round from a fresh student) and, with
  ``lr_schedule: cosine``, the rate decays to 0 within each round and restarts with the next.
  After every step the live student is copied into the current round's frozen snapshot, so the
  rows and the next round's teacher are exactly the weights trained so far. No EMA.

One Lightning batch = one step on one real minibatch: t from the student's grid, x_t by the
DDPM's forward process, all drawn from ``batch_generator()`` (reproducible, one stream per rank;
DDP averages the live student's gradients, the only trainable parameters).
"""

from __future__ import annotations

import copy
import math
from typing import Any

import torch
from hydra.utils import instantiate
from lightning.pytorch.utilities import rank_zero_warn
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

from diffft.diffusion.chain import GaussianChain
from diffft.diffusion.forward import q_sample
from diffft.diffusion.schedules import subsample
from diffft.methods.base import check_lr_schedule
from diffft.methods.finetune import FineTuneMethod
from diffft.rows import Row

DDIM = {"parameterisation": "ddim", "eta": 0.0}


def _per_sample(v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return v.view(-1, *([1] * (x.dim() - 1)))


@torch.no_grad()
def distillation_target(
    teacher: GaussianChain, student: GaussianChain, z: torch.Tensor, k: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The student's eps target and loss weight for states ``z`` at student step ``k`` (``[n]``,
    1..K; the teacher has 2K steps on the same trailing grid, so its state 2k is the student's k).

    Alg. 2: ``z_t'' = DDIM_teacher(DDIM_teacher(z_t, t -> t'), t' -> t'')`` and
    ``x~ = (z_t'' - (sigma_t'' / sigma_t) z_t) / (alpha_t'' - (sigma_t'' / sigma_t) alpha_t)``,
    the x-prediction whose single DDIM step t -> t'' gives z_t''. Returned in eps units,
    ``eps~ = (z_t - alpha_t x~) / sigma_t``, with the weight ``max(1, 1 / SNR_t)`` that turns the
    eps error into the truncated-SNR x-loss (Sec. 4)."""
    z2 = teacher.mean(teacher.mean(z, 2 * k), 2 * k - 1)  # two teacher steps: 2k -> 2k-2
    ab, ab2 = _per_sample(student.alpha_bar[k], z), _per_sample(student.alpha_bar[k - 1], z)
    a, s, a2, s2 = ab.sqrt(), (1 - ab).sqrt(), ab2.sqrt(), (1 - ab2).sqrt()
    x_tilde = (z2 - s2 / s * z) / (a2 - s2 / s * a)
    eps_tilde = (z - a * x_tilde) / s
    snr = student.alpha_bar[k] / (1 - student.alpha_bar[k])
    return eps_tilde, torch.clamp(1 / snr, min=1.0)


class ProgressiveDistillation(FineTuneMethod):
    """Args (config keys of ``conf/method/progressive.yaml``):
    event_shape: the shape of one sample (filled in from the data).
    init_from: the DDPM checkpoint (the teacher); empty: the run's ``pretrain`` stage.
    start_steps: the teacher's DDIM steps; min_steps: the last round's (start_steps / 2^rounds).
    steps_per_round: iterations (Lightning batches) per round; set ``trainer.max_steps`` to
        rounds x this (a later batch continues the last round).
    optimizer / grad_clip: the student's. lr_schedule: ``constant`` | ``cosine`` (within each
        round: the rate decays to 0 and restarts with the next round's student).
    ddpm: the DDPM's hyper-parameters (filled in from ``init_from``; a checkpoint of this
        method then loads without the DDPM file).
    """

    def __init__(
        self,
        event_shape: list[int],
        init_from: str | None = None,
        start_steps: int = 64,
        min_steps: int = 1,
        steps_per_round: int = 2000,
        optimizer: dict[str, Any] | None = None,
        grad_clip: float | None = 1.0,
        lr_schedule: str = "cosine",
        ddpm: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        check_lr_schedule(lr_schedule)
        rounds = math.log2(start_steps / min_steps) if min_steps >= 1 else 0
        if not (rounds >= 1 and rounds == int(rounds)):
            raise ValueError(
                f"method.start_steps={start_steps}, method.min_steps={min_steps}: expected "
                "start_steps = min_steps x 2^rounds with min_steps >= 1 and rounds >= 1"
            )
        if steps_per_round < 1:
            raise ValueError(f"method.steps_per_round={steps_per_round}: expected an int >= 1")
        self.save_hyperparameters()
        # chain: the live student (its eps-net; on the teacher's grid, which it starts from);
        # init_chain: the frozen teacher of round 0, the DDPM's start_steps-step DDIM chain.
        self.build_chain(
            event_shape, init_from, ddpm, {}, steps=start_steps, subsample="trailing", **DDIM
        )
        self.round_steps = [start_steps >> (r + 1) for r in range(int(rounds))]
        # Round r's student (frozen snapshots of the live one): its own K_r-step DDIM chain.
        self.students = nn.ModuleList(
            GaussianChain(
                copy.deepcopy(self.init_chain.eps_net),
                subsample(self.ddpm_betas, steps, "trailing"),
                self.chain.event_shape,
                **DDIM,
            )
            for steps in self.round_steps
        )
        self.init_ema(0.0)

    # -- rounds -----------------------------------------------------------------------------------
    def round_of(self, batch: int) -> int:
        """The round that batch number ``batch`` (1-based; 0: before training) belongs to."""
        return min(max(batch - 1, 0) // self.hparams.steps_per_round, len(self.students) - 1)

    def teacher(self, r: int) -> GaussianChain:
        return self.init_chain if r == 0 else self.students[r - 1]

    @property
    def eval_chain(self) -> GaussianChain:
        """The current round's student (the periodic evaluation follows the rounds)."""
        return self.students[self.round_of(self.batches_done)]

    def on_train_start(self) -> None:
        super().on_train_start()
        planned = len(self.students) * self.hparams.steps_per_round
        if self.trainer.max_steps != planned:
            rank_zero_warn(
                f"method=progressive: trainer.max_steps={self.trainer.max_steps} but its "
                f"{len(self.students)} rounds x {self.hparams.steps_per_round} steps make "
                f"{planned}; rounds not reached keep a copy of the DDPM's eps-net"
            )

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        super().on_train_batch_start(batch, batch_idx)
        b, per = self.batches_done, self.hparams.steps_per_round
        if b > 1 and (b - 1) % per == 0 and (b - 1) // per < len(self.students):
            for opt in self.trainer.optimizers:  # a new round: a fresh optimiser (Alg. 2)
                opt.state.clear()

    # -- Alg. 2 -----------------------------------------------------------------------------------
    def training_step(self, x0: torch.Tensor, batch_idx: int) -> torch.Tensor:
        r = self.round_of(self.batches_done)
        student = self.students[r]
        g = self.batch_generator()
        k = torch.randint(1, student.steps + 1, (x0.shape[0],), generator=g, device=x0.device)
        z = q_sample(x0, student.alpha_bar[k], torch.randn(x0.shape, generator=g, device=x0.device))
        eps_tilde, weight = distillation_target(self.teacher(r), student, z, k)
        eps = self.chain.eps_net(z, student.net_t[k])
        loss = (weight * (eps - eps_tilde).square().flatten(1).mean(1)).mean()
        self.check_finite(distillation=loss)
        if self.logging_batch():
            self.log_dict({"loss/distillation": loss.detach(), "round/steps": float(student.steps)})
        return loss

    def configure_optimizers(self) -> Any:
        opt = self.hparams.optimizer or {"_target_": "torch.optim.Adam", "lr": 1e-4}
        opt = instantiate(opt, params=self.chain.eps_net.parameters())
        if self.hparams.lr_schedule == "constant":
            return opt
        per = self.hparams.steps_per_round

        def factor(i: int) -> float:  # scheduler step i sets batch i + 1's rate: cosine per round
            return 0.5 * (1 + math.cos(math.pi * (i % per) / per))

        sched = {"scheduler": LambdaLR(opt, factor), "interval": "step"}
        return {"optimizer": opt, "lr_scheduler": sched}

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        super().optimizer_step(*args, **kwargs)
        # Here (not on_train_batch_end): a checkpoint written at the end of this batch holds it.
        snapshot = self.students[self.round_of(self.batches_done)].eps_net.state_dict()
        with torch.no_grad():
            for dst, src in zip(
                snapshot.values(), self.chain.eps_net.state_dict().values(), strict=True
            ):
                dst.copy_(src)

    # -- evaluation -------------------------------------------------------------------------------
    def rows(self) -> list[Row]:
        """``pd_K`` per round (the last round's is ``main``), and the teacher as ``init``."""
        last, start = len(self.students) - 1, self.hparams.start_steps
        pd = [
            Row(
                f"pd_{c.steps}",
                f"progressive {c.steps} steps",
                c,
                nfe=c.steps,
                role="main" if r == last else "variant",
            )
            for r, c in enumerate(self.students)
        ]
        init = Row(
            "init", f"DDIM T'={start} (teacher, init)", self.init_chain, role="init", nfe=start
        )
        return [pd[last], init, *pd[:last]]
