"""A feature encoder trained on the dataset by SimCLR's contrastive objective (Chen et al. 2020,
NT-Xent, Eq. 1 there): the frozen encoder ``E`` of the contrastive sampling chain when no
user checkpoint is given (the paper uses a pre-trained MoCo-v2; ``diffft.methods.contrastive``).

``python -m diffft.train_encoder dataset=...`` trains one (it is ``diffft.train method=encoder``);
the contrastive chain trains it as a cached stage (``encoder_stage.overrides``), once per
dataset and encoder config.

Two augmented views of each training example form a positive pair; the other ``2n - 2`` views
of the batch are its negatives. Augmentations (all drawn from the batch's random stream):

* points ``[D]``: Gaussian jitter of ``noise`` times the data's per-dimension sd;
* images ``[C, H, W]``: a random translation of up to ``shift`` pixels (reflection padding),
  an optional horizontal flip, then Gaussian jitter of ``noise`` (in the [-1, 1] pixel scale).

The features are the network's output, L2-normalised (MoCo-v2's 128-d features are also the
output of its projection head). At the end of training the run logs the test split's positive
retrieval accuracy (``encoder/test_top1``: how often a view's nearest neighbour among the
other ``2n - 1`` views is its own pair) next to chance, ``1 / (2n - 1)``.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.nn.functional as F
from hydra.utils import instantiate

from diffft.methods.base import SamplerMethod
from diffft.rows import Row

log = logging.getLogger("diffft")


def _view_similarities(z1: torch.Tensor, z2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Cosine similarities ``[2n, 2n]`` of the ``2n`` views (each with itself at -inf) and the
    index of each view's pair."""
    z = F.normalize(torch.cat([z1, z2]), dim=1)
    n = z1.shape[0]
    sim = (z @ z.T).fill_diagonal_(float("-inf"))
    target = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)]).to(z.device)
    return sim, target


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float) -> torch.Tensor:
    """SimCLR's NT-Xent loss of ``n`` positive pairs ``(z1[i], z2[i])`` (features ``[n, d]``,
    normalised here): the mean over the ``2n`` views of the cross-entropy of finding the pair
    among the other ``2n - 1`` views."""
    sim, target = _view_similarities(z1, z2)
    return F.cross_entropy(sim / temperature, target)


def retrieval_top1(z1: torch.Tensor, z2: torch.Tensor) -> float:
    """The share of the ``2n`` views whose most similar other view is their pair."""
    sim, target = _view_similarities(z1, z2)
    return float((sim.argmax(1) == target).float().mean())


class ContrastiveEncoder(SamplerMethod):
    """Args (config keys of ``conf/method/encoder.yaml``):
    event_shape: the shape of one sample (filled in from the data).
    net: the encoder network config (``_target_`` + kwargs; ``event_shape`` is filled in, its
        ``out_dim`` is the feature dimension).
    temperature: NT-Xent's temperature.
    noise / shift / flip: the augmentations (see the module docstring).
    data_scale: the per-dimension sd of the training data that scales the point jitter (filled
        in by ``setup`` from the training split; in the checkpoint).
    optimizer: optimiser config (``_target_`` + kwargs).
    """

    samples = False  # no sampler: no periodic evaluation, no table

    def __init__(
        self,
        event_shape: list[int],
        net: dict[str, Any],
        temperature: float = 0.2,
        noise: float = 0.1,
        shift: int = 0,
        flip: bool = False,
        optimizer: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"method.temperature={temperature}: expected > 0")
        self.save_hyperparameters()
        self.event_shape = tuple(int(d) for d in event_shape)
        self.encoder = instantiate(net, event_shape=list(self.event_shape))
        self.register_buffer("data_scale", torch.ones(self.event_shape))
        self.ema_chain = None

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """L2-normalised features ``[n, d]``."""
        return F.normalize(self.encoder(x).flatten(1), dim=1)

    def augment(self, x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        hp = self.hparams
        if len(self.event_shape) == 3:
            if hp.shift > 0:
                s = int(hp.shift)
                padded = F.pad(x, (s, s, s, s), mode="reflect")
                H, W = self.event_shape[1:]
                dx = torch.randint(0, 2 * s + 1, (x.shape[0],), generator=g, device=x.device)
                dy = torch.randint(0, 2 * s + 1, (x.shape[0],), generator=g, device=x.device)
                x = torch.stack(
                    [p[:, i : i + H, j : j + W] for p, i, j in zip(padded, dy, dx, strict=True)]
                )
            if hp.flip:
                flip = torch.rand(x.shape[0], generator=g, device=x.device) < 0.5
                x = torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x)
            scale = 1.0
        else:
            scale = self.data_scale
        noise = torch.randn(x.shape, generator=g, device=x.device)
        return x + hp.noise * scale * noise

    def setup(self, stage: str) -> None:
        dm = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        if dm is not None and self.batches_done == 0 and len(self.event_shape) == 1:
            self.data_scale.copy_(dm.train.float().std(0).clamp_min(1e-6))

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        g = self.batch_generator()
        v1, v2 = self.augment(batch, g), self.augment(batch, g)
        loss = nt_xent(self.encoder(v1).flatten(1), self.encoder(v2).flatten(1), self.temperature)
        self.check_finite(encoder=loss)
        if self.logging_batch():
            self.log("train/nt_xent", loss, prog_bar=True)
        return loss

    @property
    def temperature(self) -> float:
        return float(self.hparams.temperature)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        opt = self.hparams.optimizer or {"_target_": "torch.optim.Adam", "lr": 1e-3}
        return instantiate(opt, params=self.encoder.parameters())

    @torch.no_grad()
    def test_retrieval(self, data: torch.Tensor, seed: int = 0, n: int = 512) -> dict[str, float]:
        """Positive retrieval on ``n`` examples of ``data`` (e.g. the test split): top-1
        accuracy and NT-Xent, with chance ``1 / (2n - 1)``."""
        was_training = self.training
        self.eval()
        x = data[:n].to(self.device)
        g = torch.Generator(self.device).manual_seed(seed)
        z1 = self.encoder(self.augment(x, g)).flatten(1)
        z2 = self.encoder(self.augment(x, g)).flatten(1)
        self.train(was_training)
        m = x.shape[0]
        return {
            "top1": retrieval_top1(z1, z2),
            "nt_xent": float(nt_xent(z1, z2, self.temperature)),
            "chance": 1.0 / (2 * m - 1),
            "n": m,
        }

    def on_train_end(self) -> None:
        dm = getattr(self.trainer, "datamodule", None)
        if dm is None or self.trainer.global_rank != 0:
            return
        result = self.test_retrieval(dm.reference("test"))
        log.info(
            "encoder: test-split positive retrieval top-1 %.3f (chance %.4f), NT-Xent %.3f "
            "(%d examples)",
            result["top1"],
            result["chance"],
            result["nt_xent"],
            result["n"],
        )
        for logger in self.trainer.loggers:
            logger.log_metrics(
                {"encoder/test_top1": result["top1"], "encoder/test_nt_xent": result["nt_xent"]},
                step=self.batches_done,
            )

    def rows(self) -> list[Row]:
        return []  # no sampler: the run's table has no rows
