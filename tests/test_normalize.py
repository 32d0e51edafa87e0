"""``dataset.normalize``: the model trains in normalised units, users see their data's units.

Points files come at any scale; a recipe tuned on one scale fails silently on another. With
``normalize: standard`` the datamodule fits a shift and one scale on the training split, the
training batches are normalised, and the evaluation, plots, ``diffft.sample`` and
``diffft.score`` convert back, so a table's numbers are in the data's units and their ratio to
the floor does not depend on the scale.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra.utils import instantiate

from diffft.data.base import DataError, Normalization, data_scale
from diffft.data.toy import ToyDataModule
from diffft.evaluation import Evaluator


def moons(n: int = 2_000, seed: int = 0) -> np.ndarray:
    from sklearn.datasets import make_moons

    x, _ = make_moons(n, noise=0.05, random_state=seed)
    return x


def points(tmp_path: Path, x: np.ndarray, name: str = "p.npy") -> str:
    path = tmp_path / name
    np.save(path, x)
    return str(path)


def module(path: str, normalize: str = "standard", **kw) -> ToyDataModule:
    dm = ToyDataModule("points_file", dim=None, path=path, normalize=normalize, **kw)
    dm.setup()
    return dm


class ReplaySampler:
    """A "sampler" that returns fixed model-unit points per draw (``draws[d]``)."""

    device = torch.device("cpu")

    def __init__(self, draws: list[torch.Tensor]) -> None:
        self.draws, self.calls = draws, 0

    def sample(self, n: int, *, generator=None, batch_size=None) -> torch.Tensor:
        x = self.draws[self.calls % len(self.draws)][:n]
        self.calls += 1
        return x


def test_statistics_come_from_the_training_split_only(tmp_path):
    x = moons() * 3 + [10.0, -5.0]
    # the rows the seeded split holds out as the test set become far outliers: a statistic
    # that saw them would be far off
    perm = np.random.default_rng(0).permutation(len(x))
    x[perm[: int(round(0.2 * len(x)))]] += 1e4
    dm = module(points(tmp_path, x))
    train = dm.split("train").double()
    assert train.max() < 1e3 and dm.split("test").min() > 1e3  # the split is as assumed
    np.testing.assert_allclose(dm.norm.shift, train.mean(0).numpy(), rtol=1e-6)
    np.testing.assert_allclose(dm.norm.scale, data_scale(train), rtol=1e-6)
    assert dm.identity()["normalize"] == {"shift": list(dm.norm.shift), "scale": dm.norm.scale}


def test_training_batches_are_normalised_and_units_round_trip(tmp_path):
    x = moons() * 1000 + [5e3, -2e3]
    dm = module(points(tmp_path, x), batch_size=128)
    epoch = torch.cat(list(dm.train_dataloader())).double()
    assert epoch.shape == dm.train.shape
    assert epoch.mean(0).abs().max() < 1e-5 and abs(epoch.pow(2).mean().sqrt() - 1) < 1e-5
    batch = next(iter(dm.train_dataloader()))
    assert batch.abs().max() < 5  # model units, whatever the file's scale
    data = dm.split("train")
    torch.testing.assert_close(dm.to_data(dm.to_model(data)), data)
    torch.testing.assert_close(dm.to_model(data), dm.train)
    torch.testing.assert_close(dm.to_data(dm.test), dm.split("test"))
    # a checkpoint's identity alone rebuilds the same normalisation
    norm = Normalization.from_identity(dm.identity())
    torch.testing.assert_close(norm.to_model(data), dm.train)


def test_fresh_data_and_floors_stay_in_data_units(tmp_path):
    x = moons() * 100
    dm, plain = module(points(tmp_path, x)), module(points(tmp_path, x), normalize="none")
    torch.testing.assert_close(dm.fresh(300, 1, "test"), plain.fresh(300, 1, "test"))
    floor = Evaluator(dm, ["sw", "w2"], n=300, draws=2, w2_points=200).floor()
    assert floor == Evaluator(plain, ["sw", "w2"], n=300, draws=2, w2_points=200).floor()


def test_normalised_real_data_scores_at_the_floor_at_every_scale(tmp_path):
    """A sampler whose model-unit output is real data scores the floor; the same model-unit
    points on data x100 score 100x (sw and w2 are distances: linear in the data's scale)."""
    x, values = moons(), {}
    for k in (1, 100):
        dm = module(points(tmp_path, x * k, f"x{k}.npy"))
        ev = Evaluator(dm, ["sw", "w2"], n=300, draws=3, w2_points=200)
        real = ReplaySampler([dm.to_model(dm.fresh(300, d, "test")) for d in range(3)])
        values[k] = ev.evaluate(real)
        floor = ev.floor()
        for m in ("sw", "w2"):
            np.testing.assert_allclose(values[k][m], floor[m], rtol=1e-4)
    same = [dm.train[:300]] * 3  # the same model-unit points at both scales
    for k in (1, 100):
        dm = module(points(tmp_path, x * k, f"x{k}.npy"))
        values[k] = Evaluator(dm, ["sw", "w2"], n=300, draws=3, w2_points=200).evaluate(
            ReplaySampler(same)
        )
    for m in ("sw", "w2"):
        np.testing.assert_allclose(np.array(values[100][m]), 100 * np.array(values[1][m]), 1e-4)


def test_the_energy_gets_model_units_and_the_auc_box_follows_the_data(tmp_path):
    """An energy of model-unit points (the distance to the nearest of 500 model-unit training
    points) has the same AUC at any scale: the evaluator hands it model units and draws its
    noise over the data's own box."""
    aucs = []
    for k in (0.01, 1, 100):
        dm = module(points(tmp_path, moons() * k + 7 * k, f"x{k}.npy"))
        ref = dm.train[:500]
        energy = lambda z, ref=ref: torch.cdist(z, ref).min(1).values  # noqa: E731
        ev = Evaluator(dm, ["auc"], n=500, draws=2)
        lo, hi = ev.auc_box()
        torch.testing.assert_close(lo, dm.split("train").min(0).values)
        torch.testing.assert_close(hi, dm.split("train").max(0).values)
        sampler = ReplaySampler([dm.train[:500]])
        aucs.append(ev.evaluate(sampler, energy=energy)["auc"])
    np.testing.assert_allclose(aucs[0], aucs[1], atol=1e-4)
    np.testing.assert_allclose(aucs[2], aucs[1], atol=1e-4)
    assert 0.8 < np.mean(aucs[1]) < 1


def test_a_fixed_auc_box_that_misses_the_data_warns(tmp_path, caplog):
    dm = module(points(tmp_path, moons() * 100))
    with caplog.at_level(logging.WARNING, logger="diffft"):
        Evaluator(dm, ["auc"], n=100, auc_box=[-4.0, 4.0]).auc_box()
    assert "eval.auc_box=[-4.0, 4.0] does not fit these data" in caplog.text
    assert "eval.auc_box=null" in caplog.text


def test_plot_shows_data_units(tmp_path, monkeypatch):
    """Callers pass a sampler's output (model units) as it is; the scatter is in data units."""
    import diffft.data.toy as toy

    seen = {}

    def scatter(samples, data, path):
        seen.update(samples=samples, data=data)
        return Path(path)

    monkeypatch.setattr(toy, "scatter_samples", scatter)
    dm = module(points(tmp_path, moons() * 100 + 50))
    dm.plot({"row": dm.train[:100]}, tmp_path / "s.png")
    torch.testing.assert_close(seen["samples"]["row"], dm.split("train")[:100])
    assert seen["data"] is dm.split("train")


@pytest.mark.parametrize("name", ["swiss_roll", "eight_gaussians", "checkerboard"])
def test_shipped_sets_are_unchanged(make_cfg, name):
    dm = instantiate(make_cfg(f"dataset={name}").dataset)
    dm.setup()
    assert dm.normalize == "none"
    assert dm.identity() == {"name": name, "n_train": 10000, "n_test": 10000, "seed": 0}
    assert dm.train is dm.split("train") and dm.to_data(dm.train) is dm.train
    batch = next(iter(dm.train_dataloader()))
    assert (batch[:, None] == dm.train[None]).all(2).any(1).all()  # rows of the data as they are


def test_images_stay_as_they_are(make_cfg):
    cfg = make_cfg("dataset=digits")
    dm = instantiate(cfg.dataset)
    assert dm.normalize == "none" and "normalize" not in dm.identity()
    assert dm.split("test") is dm.test and dm.to_data(dm.test) is dm.test
    with pytest.raises(Exception, match="images are already in \\[-1, 1\\]"):  # (via Hydra)
        instantiate(make_cfg("dataset=digits", "dataset.normalize=standard").dataset)


def test_points_files_are_normalised_by_default(make_cfg, tmp_path):
    path = points(tmp_path, moons() * 100)
    on = instantiate(make_cfg("dataset=points_file", f"dataset.path={path}").dataset)
    off = instantiate(
        make_cfg("dataset=points_file", f"dataset.path={path}", "dataset.normalize=none").dataset
    )
    assert on.normalize == "standard" and "normalize" in on.identity()
    assert "normalize" not in off.identity()  # another stage: the identity keys the cache


def test_the_scale_check_warns_without_normalisation(tmp_path, caplog):
    path = points(tmp_path, moons() * 1000)
    with caplog.at_level(logging.WARNING, logger="diffft"):
        module(path, normalize="standard")
        assert "dataset.normalize=standard" not in caplog.text
        module(points(tmp_path, moons(), "fine.npy"), normalize="none")
        assert "dataset.normalize=standard" not in caplog.text
        module(path, normalize="none")
        module(path, normalize="none")  # once per data
    warnings = [r for r in caplog.records if "dataset.normalize=standard" in r.getMessage()]
    assert len(warnings) == 1 and "outside [0.05, 50]" in warnings[0].getMessage()
    with pytest.raises(DataError, match="dataset.normalize='minmax'"):
        module(path, normalize="minmax")


def test_sample_and_score_speak_data_units(make_cfg, tmp_path):
    """A checkpoint trained on normalised points carries the normalisation: ``diffft.sample``
    writes data-unit samples and ``diffft.score`` takes data-unit points, from it alone."""
    from diffft.methods.base import load_method
    from diffft.sample import sample_checkpoint
    from diffft.score import score_points
    from diffft.train import train

    x = moons(1_000) * 1000 + [5e3, -2e3]
    path = points(tmp_path, x)
    cfg = make_cfg(
        "experiment=eight_gaussians_dxmi",
        "debug=fast",
        "dataset=points_file",
        f"dataset.path={path}",
        "eval.compare=null",
        "eval.solvers=null",
        "eval.auc_box=null",
    )
    train(cfg)
    ckpt = str(Path(cfg.paths.output_dir) / "checkpoints/last.ckpt")
    method = load_method(ckpt).eval()
    norm = Normalization.from_identity(method.data_identity)
    assert norm is not None and abs(norm.scale - data_scale(torch.as_tensor(x))) < 20

    samples = sample_checkpoint(ckpt, n=500)
    # a barely trained sampler draws ~unit noise in model units: around the data in data units
    assert np.abs(samples.mean(0) - x.mean(0)).max() < 2 * norm.scale
    assert 0.2 < data_scale(torch.as_tensor(samples)) / norm.scale < 5

    energy = score_points(ckpt, x[:200])
    with torch.no_grad():
        model_units = torch.as_tensor(norm.to_model(torch.as_tensor(x[:200])), dtype=torch.float32)
        expected = method.main_row().energy(model_units).numpy()
    np.testing.assert_allclose(energy, expected, rtol=1e-4, atol=1e-5)
