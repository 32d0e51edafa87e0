"""The scale of every state of a fine-tuned sampler's chains: ``python experiments/chain_scale.py
CKPT [CKPT ...] [--n 256]``.

For each checkpoint prints, state by state from x_K (noise) to x_0 (the sample), the sd and the
largest |value| of ``--n`` chains rolled out from the same seeded noise: the checkpoint's
evaluated chain, its frozen init (the pretrained DDPM's chain) and, for the contrastive chain,
the longer chain its loss is built on. Data in [-1, 1] has sd ~0.5-0.7 at x_0; a chain whose
states grow step after step has left the data's scale (experiments/results/contrastive.md,
"Digits").
"""

from __future__ import annotations

import argparse

import torch

from diffft.diffusion.chain import GaussianChain
from diffft.methods.base import load_method


def state_scale(chain: GaussianChain, n: int, seed: int = 0) -> list[tuple[float, float]]:
    """``(sd, max |x|)`` of each state x_K, ..., x_0 of ``n`` chains from seeded noise."""
    g = torch.Generator(chain.device).manual_seed(seed)
    states = chain.sample(n, generator=g, return_trajectory=True).states  # states[0] = x_0
    return [(float(s.std()), float(s.abs().max())) for s in states.flip(0)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("ckpt", nargs="+")
    parser.add_argument("--n", type=int, default=256)
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


if __name__ == "__main__":
    main()
