"""The scale of every state of a fine-tuned sampler's chains: ``python experiments/chain_scale.py
CKPT [CKPT ...] [--n 256] [--infonce]``.

For each checkpoint prints, state by state from x_K (noise) to x_0 (the sample), the sd and the
largest |value| of ``--n`` chains rolled out from the same seeded noise: the checkpoint's
evaluated chain, its frozen init (the pretrained DDPM's chain) and, for the contrastive chain,
the longer chain its loss is built on. Data in [-1, 1] has sd ~0.5-0.7 at x_0; a chain whose
states grow step after step has left the data's scale (experiments/results/contrastive.md,
"Digits"). ``--infonce`` (contrastive-chain checkpoints): also the raw InfoNCE of Eq. 15 (beta
= 1) on the training chain of the fine-tuned weights and of the init, one training batch of the
run's data (its ``config.yaml`` beside ``checkpoints/``), 4 seeded draws: how far fine-tuning
lowered the term it optimises.
"""

from __future__ import annotations

import argparse
import copy
from pathlib import Path

import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from diffft.diffusion.chain import GaussianChain
from diffft.methods.base import load_method


def state_scale(chain: GaussianChain, n: int, seed: int = 0) -> list[tuple[float, float]]:
    """``(sd, max |x|)`` of each state x_K, ..., x_0 of ``n`` chains from seeded noise."""
    g = torch.Generator(chain.device).manual_seed(seed)
    states = chain.sample(n, generator=g, return_trajectory=True).states  # states[0] = x_0
    return [(float(s.std()), float(s.abs().max())) for s in states.flip(0)]


def raw_infonce(method: torch.nn.Module, real: torch.Tensor, draws: int = 4) -> list[float]:
    """The contrastive chain's InfoNCE with beta = 1 (``beta_schedule=fixed``, ``alpha=1``) on
    ``real``, one value per seeded draw of the chains and pairs."""
    method = copy.deepcopy(method)
    method.hparams.beta_schedule, method.hparams.alpha = "fixed", 1.0
    out = []
    for seed in range(draws):
        with torch.no_grad():
            loss, _ = method.contrastive_loss(real, torch.Generator().manual_seed(seed))
        out.append(float(loss))
    return out


def training_batch(ckpt: str) -> torch.Tensor:
    """One training batch of the data of the run that wrote ``ckpt`` (RUN/checkpoints/X.ckpt)."""
    config = Path(ckpt).resolve().parent.parent / "config.yaml"
    if not config.is_file():
        raise FileNotFoundError(f"--infonce: no run config {config} beside the checkpoint")
    dm = instantiate(OmegaConf.load(config).dataset)
    dm.setup()
    batch = next(iter(dm.train_dataloader()))
    return batch[0] if isinstance(batch, list | tuple) else batch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("ckpt", nargs="+")
    parser.add_argument("--n", type=int, default=256)
    parser.add_argument("--infonce", action="store_true", help="contrastive checkpoints only")
    args = parser.parse_args()
    torch.set_num_threads(1)
    for ckpt in args.ckpt:
        method = load_method(ckpt).eval()
        chains = {"init (pretrained)": method.init_chain, "fine-tuned": method.eval_chain}
        train_chain = getattr(method, "train_chain", None)
        if train_chain is not None and train_chain is not method.chain:
            chains[f"fine-tuned, its {train_chain.steps}-step training chain"] = train_chain
        print(ckpt)
        for name, chain in chains.items():
            scale = state_scale(chain, args.n)
            print(f"  {name} (T'={chain.steps}), sd / max|x| from x_K to x_0:")
            print("    " + "  ".join(f"{sd:.2f}/{mx:.1f}" for sd, mx in scale))
        if args.infonce:
            if not hasattr(method, "contrastive_loss"):
                raise SystemExit(f"--infonce: {ckpt} is not a contrastive-chain checkpoint")
            real = training_batch(ckpt)
            init = copy.deepcopy(method)
            init.chain.eps_net.load_state_dict(method.init_chain.eps_net.state_dict())
            for name, m in (("fine-tuned", method), ("init (pretrained)", init)):
                values = ", ".join(f"{v:.3f}" for v in raw_infonce(m, real))
                print(f"  raw InfoNCE (beta = 1) on its training chain, {name}: {values}")


if __name__ == "__main__":
    main()
