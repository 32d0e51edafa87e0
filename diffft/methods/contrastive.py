"""Contrastive sampling chain ("C++"; Zhang et al., NeurIPS 2023, Eqs. 11-15, Sec. 5).

Fine-tunes a pretrained DDPM's eps-network with

    L = J_SM + mean_i beta_i * InfoNCE(q_i, p_i; negatives)                  (Eq. 12 / 15)

where ``J_SM`` is the model's own denoising loss (Eq. 3; the DDPM's, over its full T-step
schedule, ``diffft.diffusion.forward.denoising_loss``), and the InfoNCE term pairs two states of
one sampling chain: the shared ``GaussianChain`` (DDPM ancestral or DDIM, sub-sampled to
``train_steps`` steps) rolled out **with gradients**, so the contrastive term is
back-propagated through time into every step's eps-prediction. Features come from a frozen
encoder ``E``; negatives are real training examples (the batch).

No code was released for this paper; this module is the reference implementation. The choices
made where the paper is ambiguous (each a config key):

* **Sign (Eq. 11 vs Eq. 12).** Eq. 11 is a log-softmax (a quantity to maximise) that Eq. 12
  adds to a loss. We use the standard negative log-softmax, ``-log softmax(logits)[0]``, so
  minimising the loss pulls the pair together (``info_nce``).
* **x_i vs x_j (Eq. 12 / 15 vs 11).** The same second state of the chain.
* **Pairing** (``pairing``). ``final`` (default): the query is the chain's output ``x_0`` and
  the positive a uniformly drawn intermediate state ``x_j``, ``j`` in ``1..K-1`` (the pure
  noise ``x_K`` is never a positive); ``random``: the query ``x_t`` and positive ``x_j`` are two
  distinct states drawn from ``0..K-1``. Eq. 11 compares the negatives with one state of the
  pair; we call that state the query. Each chain draws its own pair.
* **beta(t)** (``beta_schedule``, scale ``alpha``): ``fixed`` = alpha; ``linear`` (Eq. 13)
  = ``alpha * (K - |t - j|)``, so the weight grows as the two states get closer (with the
  ``final`` pairing, ``alpha * (K - j)``, Eq. 13's ``alpha (T - t)`` counted in chain steps);
  ``psnr`` (Eq. 14) = ``alpha * PSNR(x_t, x_j)`` with ``psnr_peak`` the data range (2 for
  [-1, 1] images), without gradient, clamped at 0 dB.
* **BPTT** (``window``, ``checkpoint``). The chain's state is detached every ``window`` steps
  (``GaussianChain.sample``): ``window=1`` is the paper's "no BPTT" ablation (each state gets
  only its own last transition's gradient), null = through the whole chain. ``checkpoint``
  recomputes each step in the backward pass (memory of the K + 1 states only).
* **Training vs evaluated chain** (Appendix: "to fine-tune a chain of N steps ... a chain of
  2N, 3N or 4N steps"). ``train_steps`` is the chain the loss is built on (null: the evaluated
  one); ``sampler.steps`` is the evaluated T'. Both share the eps-network.
* **The encoder** (``encoder``). ``trained`` (default): a SimCLR encoder this project trains on
  the dataset (``diffft.methods.encoder``, the cached ``encoder_stage``); a network config
  (``_target_`` + kwargs) with ``encoder_weights`` = a user checkpoint (a state dict, or a
  Lightning checkpoint's ``state_dict``); ``random``: the trained encoder's architecture with
  fresh random weights, **a control only** (its rows say so). The encoder is never the
  network of an evaluation metric (FID uses the offline classifier or Inception).
* **Controls** for honest comparisons: ``alpha=0`` is plain fine-tuning with the same
  optimiser and steps (no rollout is made: the parameters are exactly those of the denoising
  loss alone); ``positives=shuffled`` takes each query's positive from another chain (same
  state index), so the pairs carry no within-chain information.

One Lightning batch = one optimiser step on one real minibatch (J_SM and the negatives) and
one rollout of ``n_chains`` chains. DDP: each rank rolls out its own chains
(``batch_generator``) and Lightning averages the gradients (automatic optimisation).
"""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from torch import nn

from diffft.diffusion.forward import denoising_loss
from diffft.diffusion.schedules import alpha_bar
from diffft.methods.base import check_lr_schedule, load_method
from diffft.methods.finetune import FineTuneMethod
from diffft.rows import Row

log = logging.getLogger("diffft")

BETA_SCHEDULES = ("fixed", "linear", "psnr")
PAIRINGS = ("final", "random")
POSITIVES = ("chain", "shuffled")


def info_nce(
    query: torch.Tensor, positive: torch.Tensor, negatives: torch.Tensor, temperature: float
) -> torch.Tensor:
    """Per-query InfoNCE loss ``[n]`` (Eq. 11, as a negative log-softmax): features ``query``
    and ``positive`` ``[n, d]``, ``negatives`` ``[m, d]`` shared by every query; all are
    L2-normalised here. The logits are ``[q.p, q.n_1, ..., q.n_m] / temperature``, the positive
    at index 0."""
    q, p, neg = (F.normalize(z, dim=1) for z in (query, positive, negatives))
    logits = torch.cat([(q * p).sum(1, keepdim=True), q @ neg.T], dim=1) / temperature
    target = torch.zeros(q.shape[0], dtype=torch.long, device=q.device)
    return F.cross_entropy(logits, target, reduction="none")


def psnr(a: torch.Tensor, b: torch.Tensor, peak: float) -> torch.Tensor:
    """Per-sample PSNR in dB, ``10 log10(peak^2 / mse)`` (``mse`` floored at 1e-10)."""
    mse = (a - b).flatten(1).square().mean(1).clamp_min(1e-10)
    return 10 * torch.log10(peak**2 / mse)


class FrozenEncoder(nn.Module):
    """A frozen feature network ``x -> [n, d]`` (flattened output), always in eval mode."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net.requires_grad_(False).eval()

    def train(self, mode: bool = True) -> FrozenEncoder:
        return super().train(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).flatten(1)


class ContrastiveChain(FineTuneMethod):
    """Args (config keys of ``conf/method/contrastive.yaml``; see the module docstring):
    event_shape: the shape of one sample (filled in from the data).
    init_from: the DDPM checkpoint to fine-tune (empty: the run's pretrain stage).
    sampler: the evaluated chain: ``steps`` (T'), ``subsample``, other ``GaussianChain`` kwargs
        (``parameterisation: ddim``, ``eta``, ...).
    train_steps: steps of the chain the loss is built on (null: ``sampler.steps``).
    encoder: ``trained`` | ``random`` | a network config; encoder_from: the encoder stage's
        checkpoint (filled in by diffft.train); encoder_weights: the weights of a network config.
    alpha / beta_schedule / psnr_peak: beta(t) (Eqs. 13, 14). temperature: InfoNCE's tau.
    pairing / positives: which two states form a pair; ``shuffled`` is a control.
    window / checkpoint: truncated BPTT and per-step gradient checkpointing of the rollout.
    n_chains: chains rolled out per step (the queries). antithetic: J_SM's paired times.
    optimizer / grad_clip / ema_decay: the eps-network's optimisation. lr_schedule: ``constant``
        | ``cosine`` (to 0 over the run's batches).
    ddpm / encoder_net: the DDPM's hyper-parameters and the encoder's network config (filled
        in when built; they let a checkpoint of this method load without the stage files).
    """

    @classmethod
    def stages(cls, cfg: dict[str, Any]) -> dict[str, str]:
        """The DDPM (``pretrain``) and, for ``encoder=trained|random`` with an empty
        ``encoder_from``, the SimCLR encoder (``encoder_stage``) of the run's data."""
        out = super().stages(cfg)
        if cfg.get("encoder") in ("trained", "random") and not cfg.get("encoder_from"):
            out["encoder_from"] = "encoder_stage"
        return out

    def __init__(
        self,
        event_shape: list[int],
        sampler: dict[str, Any],
        init_from: str | None = None,
        train_steps: int | None = None,
        encoder: str | dict[str, Any] = "trained",
        encoder_from: str | None = None,
        encoder_weights: str | None = None,
        alpha: float = 0.1,
        beta_schedule: str = "linear",
        psnr_peak: float = 2.0,
        temperature: float = 0.2,
        pairing: str = "final",
        positives: str = "chain",
        window: int | None = None,
        checkpoint: bool = True,
        n_chains: int = 64,
        antithetic: bool = True,
        optimizer: dict[str, Any] | None = None,
        grad_clip: float | None = 1.0,
        ema_decay: float = 0.0,
        lr_schedule: str = "constant",
        ddpm: dict[str, Any] | None = None,
        encoder_net: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        check_lr_schedule(lr_schedule)
        for key, value, allowed in (
            ("beta_schedule", beta_schedule, BETA_SCHEDULES),
            ("pairing", pairing, PAIRINGS),
            ("positives", positives, POSITIVES),
        ):
            if value not in allowed:
                raise ValueError(f"method.{key}={value!r}; expected one of {allowed}")
        if alpha < 0 or temperature <= 0:
            raise ValueError(
                f"method.alpha={alpha}, method.temperature={temperature}: expected alpha >= 0 "
                "and temperature > 0"
            )
        if window is not None and window < 1:
            raise ValueError(f"method.window={window}: expected an int >= 1, or null (full BPTT)")
        if positives == "shuffled" and n_chains < 2:
            raise ValueError("method.positives=shuffled pairs chains with others: n_chains >= 2")
        self.save_hyperparameters()
        self.build_chain(event_shape, init_from, ddpm, dict(sampler))  # chain, init_chain
        K = train_steps or self.chain.steps
        if K < 2:
            raise ValueError(f"method.train_steps={K}: a pair of chain states needs >= 2 steps")
        self.train_chain = self.chain if K == self.chain.steps else self.chain_like(K)
        self.register_buffer("alpha_bar_full", alpha_bar(self.ddpm_betas).float())
        self.encoder = FrozenEncoder(self.build_encoder(encoder, encoder_from, encoder_weights))
        self.init_ema(ema_decay)

    # -- the encoder ----------------------------------------------------------------------------
    def build_encoder(
        self, encoder: str | dict[str, Any], encoder_from: str | None, weights: str | None
    ) -> nn.Module:
        if self.hparams.ddpm is not None and self.hparams.encoder_net is not None:
            # Rebuilt from this method's own checkpoint: the weights come from its state dict.
            return instantiate(self.hparams.encoder_net)
        if isinstance(encoder, dict):
            net = instantiate(encoder, event_shape=list(self.chain.event_shape))
            self.hparams["encoder_net"] = {**encoder, "event_shape": list(self.chain.event_shape)}
            if not weights:
                raise ValueError(
                    "method.encoder is a network config but method.encoder_weights is empty: "
                    "name its weights file (or use method.encoder=trained, an encoder this "
                    "project trains on the dataset)"
                )
            return self.load_weights(net, weights)
        if encoder not in ("trained", "random"):
            raise ValueError(
                f"method.encoder={encoder!r}; expected trained, random or a network config "
                "({_target_: ..., ...} with method.encoder_weights)"
            )
        if not encoder_from:
            raise ValueError(
                "method.encoder_from is empty: set it to a checkpoint of python -m "
                "diffft.train_encoder, or leave it empty with encoder_stage.overrides set"
            )
        from diffft.methods.encoder import ContrastiveEncoder

        stage = load_method(encoder_from, "method.encoder_from")
        if not isinstance(stage, ContrastiveEncoder):
            raise ValueError(
                f"method.encoder_from='{encoder_from}' is a {type(stage).__name__}, not an "
                "encoder of diffft.train_encoder"
            )
        if tuple(stage.event_shape) != tuple(self.chain.event_shape):
            raise ValueError(
                f"method.encoder_from='{encoder_from}' encodes samples of shape "
                f"{list(stage.event_shape)}, not this run's {list(self.chain.event_shape)}"
            )
        net_cfg = {**stage.hparams.net, "event_shape": list(stage.event_shape)}
        # Kept so that a checkpoint of this method rebuilds the encoder without the stage file.
        self.hparams["encoder_net"] = net_cfg
        if encoder == "random":  # the control: same architecture, fresh weights (the global
            return instantiate(net_cfg)  # RNG, seeded with the run's seed before this is built)
        return stage.encoder

    @staticmethod
    def load_weights(net: nn.Module, path: str) -> nn.Module:
        from pathlib import Path

        if not Path(path).is_file():
            raise ValueError(f"method.encoder_weights='{path}': no such file")
        state = torch.load(path, map_location="cpu", weights_only=False)
        if isinstance(state, dict) and "state_dict" in state:
            state = state["state_dict"]
        try:
            net.load_state_dict(state)
        except RuntimeError as err:
            raise ValueError(
                f"method.encoder_weights='{path}' does not fit method.encoder: {err}"
            ) from None
        return net

    # -- one step (Eq. 15) ------------------------------------------------------------------------
    def training_step(self, real: torch.Tensor, batch_idx: int) -> torch.Tensor:
        hp = self.hparams
        g = self.batch_generator()
        # First, and drawn first from the batch's stream: with alpha = 0 this is exactly the
        # DDPM's own loss on the same draws (plain fine-tuning).
        loss_sm = denoising_loss(
            self.chain.eps_net, real, self.alpha_bar_full, generator=g, antithetic=hp.antithetic
        )
        logs = {"loss/denoising": loss_sm.detach()}
        loss = loss_sm
        if hp.alpha > 0:
            loss_c, weight = self.contrastive_loss(real, g)
            loss = loss + loss_c
            logs.update({"loss/contrastive": loss_c.detach(), "beta/mean": weight.mean()})
        self.check_finite(loss=loss)
        if self.logging_batch():
            self.log_dict(logs, prog_bar=False)
        return loss

    def contrastive_loss(
        self, real: torch.Tensor, g: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``mean_i beta_i InfoNCE_i`` over ``n_chains`` chains rolled out with gradients, and
        the weights ``beta_i``."""
        hp, chain = self.hparams, self.train_chain
        n, K = hp.n_chains, chain.steps
        traj = chain.sample(
            n,
            generator=g,
            return_trajectory=True,
            grad=True,
            checkpoint=hp.checkpoint,
            window=hp.window,
        )
        states = traj.states  # [K+1, n, ...]; states[0] = x_0
        if hp.pairing == "final":
            t = torch.zeros(n, dtype=torch.long, device=real.device)
            j = torch.randint(1, K, (n,), generator=g, device=real.device)
        else:  # two distinct states of 0..K-1
            t = torch.randint(0, K, (n,), generator=g, device=real.device)
            j = (t + torch.randint(1, K, (n,), generator=g, device=real.device)) % K
        rows = torch.arange(n, device=real.device)
        query, positive = states[t, rows], states[j, rows]
        if hp.positives == "shuffled":  # the control: another chain's state at the same j
            positive = states[j, rows.roll(1)]
        with torch.no_grad():
            if hp.beta_schedule == "fixed":
                weight = torch.full((n,), float(hp.alpha), device=real.device)
            elif hp.beta_schedule == "linear":
                weight = hp.alpha * (K - (t - j).abs()).float()
            else:
                # (clamped: below 0 dB, a negative beta would push the pair apart)
                weight = hp.alpha * psnr(query, positive, hp.psnr_peak).clamp_min(0)
            negatives = self.encoder(real)
        per_chain = info_nce(self.encoder(query), self.encoder(positive), negatives, hp.temperature)
        return (weight * per_chain).mean(), weight

    # -- optimisation -----------------------------------------------------------------------------
    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        super().optimizer_step(*args, **kwargs)
        self.update_ema()

    # -- evaluation -------------------------------------------------------------------------------
    def row_name(self) -> str:
        """The main row's label: what was trained, controls named as such."""
        hp, steps = self.hparams, self.chain.steps
        if hp.alpha == 0:
            return f"fine-tuned T'={steps}, alpha=0 (control)"
        parts = []
        if hp.positives == "shuffled":
            parts.append("shuffled positives (control)")
        if hp.encoder == "random":
            parts.append("random encoder (control)")
        if hp.window == 1:
            parts.append("W=1, no BPTT")
        elif hp.window:
            parts.append(f"W={hp.window}")
        extra = f", {', '.join(parts)}" if parts else ""
        return f"C++ T'={steps}{extra}"

    def rows(self) -> list[Row]:
        steps = self.chain.steps
        return [
            Row("contrastive", self.row_name(), self.eval_chain),
            Row("init", f"DDPM T'={steps} (init)", self.init_chain, role="init"),
        ]
