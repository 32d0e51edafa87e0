import numpy as np
import pytest
import torch

from diffft.data.toy import GENERATORS, DataError, ToyDataModule, load_points_file


@pytest.mark.parametrize("name", sorted(GENERATORS))
def test_generators_are_seeded(name):
    a, b, c = GENERATORS[name](500, 1), GENERATORS[name](500, 1), GENERATORS[name](500, 2)
    assert a.shape == (500, 2) and np.isfinite(a).all()
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, c)


def test_swiss_roll_matches_the_sft_pg_setup():
    from sklearn.datasets import make_swiss_roll

    x, _ = make_swiss_roll(100, noise=0.05, random_state=3)
    np.testing.assert_allclose(GENERATORS["swiss_roll"](100, 3), x[:, [0, 2]] / 20)


def test_eight_gaussians_modes():
    x = GENERATORS["eight_gaussians"](8000, 0) * 1.414
    radius = np.linalg.norm(x, axis=1)
    assert abs(np.median(radius) - 4.0) < 0.1


def test_datamodule_split_batches_and_fresh():
    dm = ToyDataModule("swiss_roll", n_train=1000, n_test=300, batch_size=128)
    dm.setup()
    assert dm.train.shape == (1000, 2) and dm.test.shape == (300, 2)
    batches = list(dm.train_dataloader())
    assert len(batches) == 8 and sum(len(b) for b in batches) == 1000
    seen = torch.cat(batches)
    assert torch.equal(seen.sort(0).values, dm.train.sort(0).values)  # each point once per epoch
    fresh = dm.fresh(200, seed=0)
    assert fresh.shape == (200, 2) and not torch.isin(fresh[:, 0], dm.train[:, 0]).any()


def test_points_file_npy_and_csv(tmp_path):
    x = np.random.default_rng(0).normal(size=(50, 3))
    np.save(tmp_path / "p.npy", x)
    np.savetxt(tmp_path / "p.csv", x, delimiter=",", header="a,b,c", comments="")
    np.testing.assert_allclose(load_points_file(tmp_path / "p.npy"), x)
    np.testing.assert_allclose(load_points_file(tmp_path / "p.csv"), x)
    dm = ToyDataModule("points_file", dim=3, path=str(tmp_path / "p.npy"), test_fraction=0.2)
    dm.setup()
    assert dm.train.shape == (40, 3) and dm.test.shape == (10, 3)


@pytest.mark.parametrize(
    "content,match",
    [
        (None, "no such file"),
        (np.zeros(5), "shape"),
        (np.array([[0.0, 1.0], [np.nan, 2.0], [1.0, 1.0]]), "NaN/inf values \\(first in row 1\\)"),
    ],
)
def test_points_file_errors_name_the_path(tmp_path, content, match):
    path = tmp_path / "bad.npy"
    if content is not None:
        np.save(path, content)
    with pytest.raises(DataError, match=match) as err:
        load_points_file(path)
    assert str(path) in str(err.value) and "\n" not in str(err.value)


def test_other_data_errors(tmp_path):
    (tmp_path / "x.txt").write_text("1,2\n3,4\n")
    with pytest.raises(DataError, match="suffix"):
        load_points_file(tmp_path / "x.txt")
    with pytest.raises(DataError, match="unknown dataset 'moons'.*swiss_roll"):
        ToyDataModule("moons")
    with pytest.raises(DataError, match="dataset.path is empty"):
        ToyDataModule("points_file")
    np.save(tmp_path / "p.npy", np.zeros((10, 3)))
    dm = ToyDataModule("points_file", dim=2, path=str(tmp_path / "p.npy"))
    with pytest.raises(DataError, match="set dataset.dim=3"):
        dm.setup()


def _loader(n_train=300, rank=0, world=1, done=None, batch_size=64):
    from types import SimpleNamespace

    dm = ToyDataModule("swiss_roll", 2, n_train=n_train, n_test=50, batch_size=batch_size, seed=0)
    if done is not None:
        module = SimpleNamespace(batches_done=done)
        dm.trainer = SimpleNamespace(lightning_module=module, global_rank=rank, world_size=world)
    return dm.train_dataloader()


def test_data_order_follows_the_batch_count_so_resumed_runs_match_mid_epoch():
    loader = _loader()  # no trainer: iterations are counted
    first, second = list(loader), list(loader)
    assert len(first) == len(loader) == 5
    assert not torch.equal(torch.cat(first), torch.cat(second))
    assert torch.equal(
        torch.sort(torch.cat(first), 0).values, torch.sort(torch.cat(second), 0).values
    )
    # An iterator started after b batches (a resumed run) continues where the first one was.
    for done in (0, 3, 5, 7):
        epoch, start = divmod(done, 5)
        expected = (first, second)[epoch][start:]
        got = list(_loader(done=done))
        assert len(got) == len(expected) and all(map(torch.equal, got, expected))


def test_ddp_shards_have_equal_batch_counts_and_disjoint_rows():
    # 2561 rows on 2 ranks: 1280 each (the odd row is left out of this epoch), 10 batches each.
    shards = [list(_loader(2561, rank, 2, done=0, batch_size=128)) for rank in range(2)]
    assert [len(s) for s in shards] == [10, 10]
    assert [len(_loader(2561, rank, 2, done=0, batch_size=128)) for rank in range(2)] == [10, 10]
    rows = [torch.cat(s) for s in shards]
    assert rows[0].shape[0] == rows[1].shape[0] == 1280
    both = torch.cat(rows)
    assert torch.unique(both, dim=0).shape[0] == 2560  # no row on both ranks


def test_points_file_dim_comes_from_the_file_and_identity_from_its_content(tmp_path):
    x = np.random.default_rng(0).normal(size=(40, 3))
    np.save(tmp_path / "a.npy", x)
    dm = ToyDataModule("points_file", dim=None, path=str(tmp_path / "a.npy"))
    dm.setup()
    assert dm.dim == 3 and dm.train.shape[1] == 3
    np.save(tmp_path / "b.npy", x)  # the same points elsewhere: other path, same content hash
    other = ToyDataModule("points_file", dim=None, path=str(tmp_path / "b.npy")).identity()
    assert other["sha1"] == dm.identity()["sha1"] and other["path"] != dm.identity()["path"]
    np.save(tmp_path / "a.npy", x + 1)  # changed content: a new identity
    assert ToyDataModule("points_file", path=str(tmp_path / "a.npy")).identity() != dm.identity()
    roll = ToyDataModule("swiss_roll").identity()
    assert roll == {"name": "swiss_roll", "n_train": 10_000, "n_test": 10_000, "seed": 0}
