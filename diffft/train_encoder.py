"""``python -m diffft.train_encoder dataset=... [overrides]``: train the contrastive chain's
feature encoder on a dataset (SimCLR, ``diffft/methods/encoder.py``).

It is ``python -m diffft.train experiment=encoder`` (``conf/experiment/encoder.yaml``: an MLP
encoder, 3,000 steps, no periodic evaluation) unless another ``experiment=`` is given (images:
``experiment=digits_encoder``); every other override works as there. The checkpoint is
``outputs/.../checkpoints/last.ckpt``, for ``method.encoder_from=`` of the contrastive chain.
"""

from __future__ import annotations

import sys


def main() -> None:
    from diffft.train import main as train_main

    if not any(a.lstrip("+~").startswith("experiment=") for a in sys.argv[1:]):
        sys.argv.insert(1, "experiment=encoder")
    train_main()


if __name__ == "__main__":
    main()
