from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_module
from omegaconf import DictConfig

torch.set_num_threads(1)


@pytest.fixture(scope="session")
def shared_cache(tmp_path_factory) -> Path:
    """The parts of the cache that every test may share (one per pytest worker): the offline
    FID feature networks and the data floors. Both are keyed by the data's identity and the
    evaluation settings (and written under a lock), so a test that shares them gets exactly
    what it would have computed; each is computed once per worker instead of once per test."""
    root = tmp_path_factory.mktemp("shared_cache")
    for part in ("features", "floors"):
        (root / part).mkdir()
    return root


@pytest.fixture
def make_cfg(tmp_path, shared_cache):
    """Compose the real config with overrides; outputs and caches go to a temp dir (the feature
    networks and floors are shared between tests: ``shared_cache``).

    Hydra's global state stays initialised for the test: the pretrain stage composes too.
    """
    (tmp_path / "cache").mkdir(exist_ok=True)
    for part in ("features", "floors"):
        link = tmp_path / "cache" / part
        if not link.exists():
            link.symlink_to(shared_cache / part, target_is_directory=True)
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
