"""SFT-PG: shortcut fine-tuning of a DDPM sampler (Fan & Lee, ICML 2023, Alg. 1).

A T'-step ``GaussianChain`` built from a pretrained DDPM is trained to minimise an IPM
between its samples and the data. A critic ``f`` (a cost: low on data) estimates the IPM; the
sampler follows one of two gradient estimators:

* ``estimator: policy_gradient`` (SFT-PG, Eq. 15 / 20): REINFORCE over the chain's transitions
  with a learned baseline ``V(x_k, k)``, on transitions from a buffer of rolled-out
  trajectories (no gradient through the chain);
* ``estimator: pathwise`` (SFT, Eq. 14): the reparameterised gradient of ``f(x_0)`` through
  the whole chain.

Critic regularisation: ``baseline_reg`` (lambda of Eq. 23: the baseline's loss R_B also trains
the critic, "SFT-PG (B)") and/or ``gp`` (the WGAN gradient penalty of Eq. 22).
The three configs ``method=sft_pg | sft_pg_gp | sft_pathwise`` are the paper's Fig. 4 rows.

One Lightning batch = one critic iteration of Alg. 1 (one real minibatch, one rollout of
``rollout_batch`` trajectories); every ``n_critic`` iterations the sampler takes
``n_generator`` steps and the buffer is cleared.

Differences from the released toy code (UW-Madison-Lee-Lab/SFT-PG, ``toy_exp/train.py``):
its ``--n_generator`` flag has no effect (one generator step always; here it is honoured);
its first generator step comes after 4 critic iterations and then every 5 (here every
``n_critic``); generator steps use one minibatch of 128 of the ~6,400 buffered transitions
(``generator_batch: 128``, the default, so the published numbers are reproduced; ``all`` uses
the whole buffer in one lower-variance step).

Differences from the paper, kept from the released code: Eq. 20 and 21 *sum* over the T'
transitions of a trajectory; here (as in the release) the policy-gradient loss and R_B are
*means* over transitions, so the generator gradient (and what ``grad_clip`` gamma clips) is
T' times smaller and ``baseline_reg`` weighs R_B like lambda / T' of Eq. 23. The toy networks
and batch (width 256, batch 128) are the release's; the paper's text says batch 64 and width 128.

DDP: every rank rolls out its own ``rollout_batch`` trajectories and takes its own real
minibatch and buffer minibatches (``batch_generator``); the critic, baseline and sampler
gradients are averaged over ranks at each ``manual_backward``. The effective batches are
``dataset.batch_size``, ``rollout_batch`` and ``generator_batch`` x ranks (``effective_batch``
in the run's ``config.yaml``). A checkpoint holds rank 0's rollout buffer: a DDP run resumed in
the middle of a critic phase refills the other ranks' buffers with rank 0's trajectories (a
single-process resume is exact).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from hydra.utils import instantiate

from diffft.diffusion.chain import Trajectory
from diffft.methods.base import check_lr_schedule
from diffft.methods.diagnostics import (
    sample_diagnostics,
    sigma_logs,
    split_gradient_cosine,
)
from diffft.methods.finetune import FineTuneMethod
from diffft.methods.losses import (
    baseline_loss,
    gradient_penalty,
    ipm_critic_loss,
    policy_gradient_loss,
)
from diffft.rows import Row

ESTIMATORS = ("policy_gradient", "pathwise")


class SFTPG(FineTuneMethod):
    """Args (config keys of ``conf/method/sft_pg*.yaml``):
    event_shape: the shape of one sample (filled in from the data).
    init_from: the DDPM checkpoint to fine-tune.
    sampler: the short chain: ``steps`` (T'), ``subsample`` (how the DDPM's T steps are
        reduced to T'; ``none`` when T = T'), other ``GaussianChain`` kwargs override the DDPM's.
    critic / baseline: network configs (``_target_`` + kwargs).
    estimator: ``policy_gradient`` or ``pathwise``.
    n_critic / n_generator: critic iterations per generator phase / generator steps per phase.
    generator_batch: buffered transitions per policy-gradient step (an int, or ``all``).
    rollout_batch: trajectories sampled per critic iteration (m of Alg. 1).
    baseline_reg: lambda of Eq. 23 (0 = the baseline only reduces variance).
    gp: gradient-penalty coefficient (Eq. 22; 0 = off).
    grad_clip: max gradient norm of the sampler (gamma; None = off).
    lr: ``{generator, critic, baseline}`` learning rates. optimizer: shared optimiser config.
    lr_schedule: ``constant`` | ``cosine`` (every learning rate to 0 over the run's batches).
    ema_decay: EMA of the fine-tuned sampler (0 = off, as in the paper).
    log_prob_reduction: ``sum`` over the D dimensions (the paper's log-probability) or ``mean``
        (divided by D: what the released image code does, a D-times smaller generator step).
    grad_chunk: transitions per backward pass of a policy-gradient step (None: all at once);
        gradients accumulate over the chunks (``manual_step``), so the same step takes about one
        chunk's memory (image rollouts).
    ddpm: the DDPM's hyper-parameters (filled in from ``init_from``; lets a checkpoint of this
        method be loaded without the DDPM file).
    """

    def __init__(
        self,
        event_shape: list[int],
        sampler: dict[str, Any],
        critic: dict[str, Any],
        baseline: dict[str, Any],
        init_from: str | None = None,
        estimator: str = "policy_gradient",
        n_critic: int = 5,
        n_generator: int = 1,
        generator_batch: int | str = 128,
        rollout_batch: int = 128,
        baseline_reg: float = 1.0,
        gp: float = 0.0,
        grad_clip: float | None = None,
        lr: dict[str, float] | None = None,
        optimizer: dict[str, Any] | None = None,
        lr_schedule: str = "constant",
        ema_decay: float = 0.0,
        log_prob_reduction: str = "sum",
        grad_chunk: int | None = None,
        ddpm: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        if log_prob_reduction not in ("sum", "mean"):
            raise ValueError(
                f"method.log_prob_reduction={log_prob_reduction!r}; expected 'sum' or 'mean'"
            )
        if estimator not in ESTIMATORS:
            raise ValueError(f"method.estimator={estimator!r}; expected one of {ESTIMATORS}")
        check_lr_schedule(lr_schedule)
        if generator_batch != "all" and not (
            isinstance(generator_batch, int) and generator_batch > 0
        ):
            raise ValueError(
                f"method.generator_batch={generator_batch!r}; expected an int > 0 or 'all'"
            )
        self.automatic_optimization = False
        self.save_hyperparameters()
        self.build_chain(event_shape, init_from, ddpm, dict(sampler))
        if estimator == "policy_gradient":
            self.chain.require_density("method.estimator=policy_gradient (log-probabilities)")
        self.critic = instantiate(critic, event_shape=event_shape)
        self.baseline = instantiate(baseline, event_shape=event_shape, n_steps=self.chain.steps)
        self.init_ema(ema_decay)
        self.buffer: list[torch.Tensor] = []

    def configure_optimizers(self) -> Any:
        """The sampler's optimiser, and one for the critic and the baseline together (two
        parameter groups with their own learning rates: per-parameter Adam/RMSprop state makes
        this the same as two optimisers; one step after their shared backward also lets a
        16-mixed GradScaler unscale both with the scale the loss was multiplied by); each with
        its ``lr_schedule``."""
        lr = self.hparams.lr or {}
        opt = self.hparams.optimizer or {"_target_": "torch.optim.Adam"}
        groups = [
            {"params": list(self.critic.parameters()), "lr": lr.get("critic", 1e-3)},
            {"params": list(self.baseline.parameters()), "lr": lr.get("baseline", 1e-3)},
        ]
        opts = [
            instantiate(opt, params=self.chain.parameters(), lr=lr.get("generator", 5e-5)),
            instantiate(opt, _partial_=True)(groups),  # (instantiate would wrap the dicts)
        ]
        return self.lr_schedule_config(opts, self.hparams.lr_schedule)

    def batches_for_steps(self, steps: int) -> int:
        """One critic step per batch, and ``n_generator`` generator steps every ``n_critic``."""
        hp, batches, done = self.hparams, 0, 0
        while done < steps:
            batches += 1
            done += 1 + (hp.n_generator if batches % hp.n_critic == 0 else 0)
        return batches

    # -- Alg. 1 -------------------------------------------------------------------------------
    def training_step(self, real: torch.Tensor, batch_idx: int) -> None:
        hp = self.hparams
        opt_g, opt_fb = self.optimizers()
        g = self.batch_generator()  # this rank's stream of this batch: rollouts, penalty, order
        traj = self.chain.sample(hp.rollout_batch, generator=g, return_trajectory=True)  # no grad
        logs = self.critic_step(real, traj, opt_fb, g)
        if hp.estimator == "policy_gradient":
            self.buffer.append(traj.states)
        if self.batches_done % hp.n_critic == 0:
            if hp.estimator == "pathwise":
                for _ in range(hp.n_generator):
                    logs["loss/generator"] = self.pathwise_step(opt_g, g)
            else:
                logs["loss/generator"] = self.policy_gradient_steps(opt_g, g)
                self.buffer.clear()
            self.update_ema()
        self.step_lr_schedulers()
        if self.logging_batch():
            if self.chain.log_sigma is not None:
                logs |= sigma_logs(self.chain.log_sigma_table())
            self.log_dict(logs)

    def critic_step(
        self, real: torch.Tensor, traj: Trajectory, opt_fb: Any, g: torch.Generator
    ) -> dict:
        """Maximise L = g - lambda R_B (Eq. 23), optionally with the penalty of Eq. 22."""
        hp = self.hparams
        fake = traj.sample
        f_fake = self.critic(fake).squeeze(-1)
        loss = ipm_critic_loss(self.critic(real), f_fake)
        logs = {"loss/critic_ipm": loss.detach()}
        if self.logging_batch():  # diagnostics (see diffft.methods.diagnostics)
            logs |= sample_diagnostics(real, fake, f_fake)
        if hp.gp > 0:
            penalty = gradient_penalty(self.critic, real, fake, generator=g)
            loss = loss + hp.gp * penalty
            logs["loss/gp"] = penalty.detach()
        if hp.estimator == "policy_gradient":
            x_k, _, k = traj.transitions()
            values = self.baseline(x_k, k - 1).squeeze(-1)
            returns = f_fake.repeat(traj.steps)  # f(x_0) of each transition's trajectory
            if hp.baseline_reg > 0:  # R_B regularises the critic too (SFT-PG (B))
                r_b = baseline_loss(values, returns)
                loss = loss + hp.baseline_reg * r_b
            else:
                r_b = baseline_loss(values, returns.detach())
                loss = loss + r_b
            logs["loss/baseline"] = r_b.detach()
        parts = {"critic": loss}  # IPM (+ penalty, + lambda R_B)
        if "loss/baseline" in logs:
            parts["baseline"] = logs["loss/baseline"]
        self.check_finite(**parts)
        self.manual_step([opt_fb], loss)  # the critic's and the baseline's parameter groups
        return logs

    def policy_gradient_steps(self, opt_g: Any, g: torch.Generator) -> torch.Tensor:
        """``n_generator`` REINFORCE steps (Eq. 20) on minibatches of the buffer."""
        hp = self.hparams
        traj = Trajectory(torch.cat(self.buffer, dim=1))
        x_k, x_prev, k = traj.transitions()
        x_0 = traj.sample.repeat(traj.steps, *([1] * (traj.sample.dim() - 1)))
        n = x_k.shape[0]
        size = n if hp.generator_batch == "all" else min(hp.generator_batch, n)
        # Full minibatches without repeats inside one pass; a new pass over the buffer (a new
        # permutation) when n_generator * size exceeds it.
        passes = -(-hp.n_generator * size // n)
        perms = [torch.randperm(n, generator=g, device=x_k.device) for _ in range(passes)]
        order = torch.cat(perms)
        for j in range(hp.n_generator):
            idx = order[j * size : (j + 1) * size]

            def loss_of(b: slice, idx: torch.Tensor = idx) -> torch.Tensor:
                i = idx[b]
                with torch.no_grad():
                    adv = self.critic(x_0[i]).squeeze(-1) - self.baseline(x_k[i], k[i] - 1).squeeze(
                        -1
                    )
                log_prob = self.chain.log_prob(x_prev[i], x_k[i], k[i])
                if hp.log_prob_reduction == "mean":
                    log_prob = log_prob / math.prod(self.chain.event_shape)
                return policy_gradient_loss(log_prob, adv)

            if j == 0 and self.logging_batch() and self.trainer.world_size == 1:
                # two estimates of the step's gradient from disjoint halves of its minibatch
                cosine = split_gradient_cosine(
                    loss_of, idx.numel(), self.chain.parameters(), hp.grad_chunk
                )
                self.log("diag/pg_grad_cosine", cosine)
            loss = self.manual_step(
                [opt_g],
                loss_of,
                n=idx.numel(),
                chunk=hp.grad_chunk,
                part="sampler",
                clip=hp.grad_clip,
                log_grad_norm=True,
            )
        return loss

    def pathwise_step(self, opt_g: Any, g: torch.Generator) -> torch.Tensor:
        """One reparameterised step (Eq. 14): back-propagate f(x_0) through every transition
        (built inside the step, so no gradient of the critic is computed)."""
        hp = self.hparams

        def loss_of(_: slice) -> torch.Tensor:
            x_0 = self.chain.sample(hp.rollout_batch, generator=g, grad=True)
            return self.critic(x_0).mean()

        return self.manual_step(
            [opt_g], loss_of, part="sampler", clip=hp.grad_clip, log_grad_norm=True
        )

    # -- checkpoint & evaluation ------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["sft_pg_buffer"] = [s.cpu() for s in self.buffer]

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        self.buffer = list(checkpoint.get("sft_pg_buffer", []))

    def on_train_start(self) -> None:
        super().on_train_start()
        # A restored buffer was loaded on the CPU, before the module moved to its device.
        self.buffer = [s.to(self.device) for s in self.buffer]

    def rows(self) -> list[Row]:
        steps = self.chain.steps
        pg = self.hparams.estimator == "policy_gradient"
        name, row_id = ("SFT-PG", "sft_pg") if pg else ("SFT (pathwise)", "sft_pathwise")
        if self.chain.log_sigma is not None:  # not the paper's method: labelled as such
            name, row_id = name + " (learned sigma_k)", row_id + "_learned_sigma"
        return [
            Row(row_id, f"{name} T'={steps}", self.eval_chain),
            Row("init", f"DDPM T'={steps} (init)", self.init_chain, role="init"),
        ]
