import pytest
import torch
from hydra import compose, initialize_config_module
from omegaconf import DictConfig

torch.set_num_threads(1)


@pytest.fixture
def make_cfg(tmp_path):
    """Compose the real config with overrides; outputs and caches go to a temp dir.

    Hydra's global state stays initialised for the test: the pretrain stage composes too.
    """
    with initialize_config_module("diffft.conf", version_base="1.3"):

        def _make(*overrides: str) -> DictConfig:
            return compose(
                "train",
                overrides=[
                    f"paths.output_dir={tmp_path}/out",
                    f"paths.cache_dir={tmp_path / 'cache'}",
                    "trainer.enable_progress_bar=false",
                    *overrides,
                ],
            )

        yield _make
