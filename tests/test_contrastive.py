"""The contrastive sampling chain: InfoNCE, BPTT through the chain (checkpointing, truncation),
alpha = 0 as plain fine-tuning, the encoder stage and its errors, a run without sampler rows."""

import json
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.nn.functional as F

from diffft.diffusion.chain import GaussianChain
from diffft.diffusion.forward import denoising_loss
from diffft.diffusion.schedules import beta_schedule, subsample
from diffft.methods.base import batch_seed, load_method
from diffft.methods.contrastive import ContrastiveChain, info_nce, psnr
from diffft.methods.encoder import ContrastiveEncoder, nt_xent
from diffft.nets.mlp import SinusoidalTimeMLP
from diffft.train import train
from tests.test_experiments import load_script


def test_info_nce_is_cross_entropy_with_the_positive_first_and_falls_as_the_pair_nears():
    g = torch.Generator().manual_seed(0)
    q, p, neg = torch.randn(6, 8, generator=g), torch.randn(6, 8, generator=g), torch.randn(9, 8)
    tau = 0.3
    qn, pn, nn_ = F.normalize(q, dim=1), F.normalize(p, dim=1), F.normalize(neg, dim=1)
    logits = torch.cat([(qn * pn).sum(1, keepdim=True), qn @ nn_.T], 1) / tau
    expected = F.cross_entropy(logits, torch.zeros(6, dtype=torch.long), reduction="none")
    assert torch.allclose(info_nce(q, p, neg, tau), expected, atol=1e-6)
    # Moving each positive towards its query lowers every query's loss.
    closer = p + 0.5 * (q - p)
    assert (info_nce(q, closer, neg, tau) < info_nce(q, p, neg, tau)).all()
    # ... and a positive equal to the query beats any other positive.
    assert (info_nce(q, q, neg, tau) <= info_nce(q, p, neg, tau)).all()


def test_psnr_and_nt_xent():
    a = torch.zeros(2, 4)
    b = torch.full((2, 4), 0.1)
    assert torch.allclose(psnr(a, b, 2.0), torch.full((2,), 10 * torch.log10(torch.tensor(400.0))))
    z = torch.randn(5, 3)
    # Identical views are easier to pair than unrelated ones.
    assert nt_xent(z, z, 0.2) < nt_xent(z, torch.randn(5, 3), 0.2)


def _chain(steps: int = 6, seed: int = 0) -> GaussianChain:
    torch.manual_seed(seed)
    net = SinusoidalTimeMLP([2], 100, width=16, depth=2)
    sched = subsample(beta_schedule("linear", 100, 1e-4, 2e-2), steps, "uniform")
    return GaussianChain(net, sched, (2,), parameterisation="ddim", eta=0.5)


def _grads(chain: GaussianChain, **rollout) -> list[torch.Tensor]:
    chain.zero_grad()
    g = torch.Generator().manual_seed(3)
    traj = chain.sample(16, generator=g, return_trajectory=True, grad=True, **rollout)
    # a loss on two states, as the contrastive term uses
    (traj.states[0].square().sum() + traj.states[3].sin().sum()).backward()
    return [p.grad.clone() for p in chain.parameters()]


def test_checkpointed_rollout_has_the_same_gradients():
    chain = _chain()
    plain, ckpt = _grads(chain), _grads(chain, checkpoint=True)
    for a, b in zip(plain, ckpt, strict=True):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-7)
    # also with truncation
    for a, b in zip(_grads(chain, window=2), _grads(chain, window=2, checkpoint=True), strict=True):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-7)


def test_window_one_has_no_gradient_through_earlier_steps_and_full_bptt_does():
    chain = _chain()  # K = 6; window W detaches the state before steps 6, 6 - W, ...
    for window, reaches in ((None, (True, True)), (1, (False, False)), (2, (True, False))):
        x_K = torch.randn(8, 2, requires_grad=True)
        states = {}  # the chain's own state tensors (the trajectory holds a stacked copy)

        def keep(x, k, states=states):
            states[k] = x
            return x

        chain.sample(8, grad=True, x_K=x_K, window=window, guide=keep)
        # Does the gradient of x_0 reach x_1 (one transition back) and x_2 (two back)?
        got = []
        for back in (1, 2):
            (grad,) = torch.autograd.grad(
                states[0].sum(), states[back], retain_graph=True, allow_unused=True
            )
            got.append(grad is not None and bool(grad.abs().sum() > 0))
        assert tuple(got) == reaches, window
        (grad,) = torch.autograd.grad(states[0].sum(), x_K, allow_unused=True)
        assert (grad is not None) == (window is None)
    # W = 1: the parameter gradient of f(x_0) is that of its last transition alone.
    g = torch.Generator().manual_seed(1)
    traj = chain.sample(
        8, generator=g, return_trajectory=True, grad=True, window=1, return_noise=True
    )
    chain.zero_grad()
    traj.states[0].square().sum().backward()
    trunc = [p.grad.clone() for p in chain.parameters()]
    chain.zero_grad()
    one = torch.ones(8, dtype=torch.long)
    chain.step(traj.states[1].detach(), one, traj.noise[0]).square().sum().backward()
    for a, b in zip(trunc, [p.grad for p in chain.parameters()], strict=True):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-7)


class BatchRecorder(L.Callback):
    """Keeps every training batch and, at the end, the eps-network's parameters."""

    def __init__(self) -> None:
        self.batches: list[torch.Tensor] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.batches.append(batch.detach().clone())

    def on_train_end(self, trainer, pl_module):
        BatchRecorder.last = self
        self.final = [p.detach().clone() for p in pl_module.chain.eps_net.parameters()]


def _contrastive(make_cfg, *extra):
    return make_cfg(
        "experiment=eight_gaussians_contrastive",
        "debug=fast",
        "dataset.n_train=1000",
        "eval.compare=null",
        "eval.solvers=null",
        "eval.metrics=[sw]",
        "eval.draws=1",
        "method.n_chains=16",
        "method.train_steps=6",
        "method.sampler.steps=3",
        *extra,
    )


def _encoder_stages(cfg) -> list[Path]:
    pretrain = Path(cfg.paths.cache_dir, "pretrain")
    return [p for p in pretrain.glob("eight_gaussians_encoder-*") if p.is_dir()]


def test_alpha_zero_is_plain_fine_tuning_exactly(make_cfg):
    cfg = _contrastive(
        make_cfg,
        "method.alpha=0",
        "trainer.max_steps=5",
        "+callbacks.rec={_target_: tests.test_contrastive.BatchRecorder}",
    )
    train(cfg)
    rec = BatchRecorder.last
    out = Path(cfg.paths.output_dir)
    method = load_method(str(out / "checkpoints/last.ckpt"))
    assert isinstance(method, ContrastiveChain)
    # Replay: the DDPM's own loss on the same batches and draws, the same optimiser and clip.
    ddpm = load_method(method.hparams.init_from)
    net = ddpm.short_chain(3, "uniform").eps_net
    opt = torch.optim.Adam(net.parameters(), lr=1e-4)
    for i, batch in enumerate(rec.batches):
        g = torch.Generator().manual_seed(batch_seed(cfg.seed, 0, i + 1))
        opt.zero_grad()
        denoising_loss(net, batch, ddpm.alpha_bar_full, generator=g).backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()
    assert len(rec.batches) == 5
    for a, b in zip(rec.final, net.parameters(), strict=True):
        assert torch.allclose(a, b, rtol=0, atol=1e-7)
    moved = any(
        not torch.equal(a, b)
        for a, b in zip(rec.final, ddpm.chain.eps_net.parameters(), strict=True)
    )
    assert moved


def test_contrastive_run_trains_the_encoder_stage_and_loads_from_its_checkpoint(
    make_cfg, capsys, monkeypatch
):
    cfg = _contrastive(make_cfg, "trainer.max_steps=4", "method.window=2")
    rows = train(cfg)
    assert "C++ T'=3, W=2" in rows and "DDPM T'=3 (init)" in rows
    stages = [
        p
        for p in Path(cfg.paths.cache_dir, "pretrain").glob("eight_gaussians_encoder-*")
        if p.is_dir()
    ]
    assert len(stages) == 1 and (stages[0] / "done").is_file()
    # The encoder run made no table and no plot, and said so.
    assert json.loads((stages[0] / "summary.json").read_text()) == {}
    assert not (stages[0] / "samples.png").exists()
    encoder = load_method(str(stages[0] / "checkpoints/last.ckpt"))
    assert isinstance(encoder, ContrastiveEncoder)
    # Our checkpoint rebuilds without the stage files, with the encoder's weights.
    ckpt = Path(cfg.paths.output_dir) / "checkpoints/last.ckpt"
    method = load_method(str(ckpt))
    for a, b in zip(method.encoder.net.parameters(), encoder.encoder.parameters(), strict=True):
        assert torch.equal(a, b)
    assert not any(p.requires_grad for p in method.encoder.parameters())
    # experiments/chain_scale.py --infonce reads the run's data and prints both InfoNCEs.
    chain_scale = load_script("chain_scale")
    real = chain_scale.training_batch(str(ckpt))
    values = chain_scale.raw_infonce(method, real, draws=2)
    assert len(values) == 2 and all(0 < v < 20 for v in values)
    assert method.hparams.alpha == cfg.method.alpha  # the copy was changed, not the method
    monkeypatch.setattr(sys, "argv", ["chain_scale.py", "--infonce", "--n", "16", str(ckpt)])
    chain_scale.main()
    out = capsys.readouterr().out
    assert "training chain, fine-tuned:" in out and "training chain, init (pretrained):" in out


def test_the_controls_are_named_and_the_random_encoder_is_not_the_trained_one(make_cfg):
    cfg = _contrastive(
        make_cfg, "trainer.max_steps=2", "method.encoder=random", "method.positives=shuffled"
    )
    rows = train(cfg)
    name = "C++ T'=3, shuffled positives (control), random encoder (control)"
    assert name in rows
    stage = next(
        p
        for p in Path(cfg.paths.cache_dir, "pretrain").glob("eight_gaussians_encoder-*")
        if p.is_dir()
    )
    trained = load_method(str(stage / "checkpoints/last.ckpt")).encoder
    method = load_method(str(Path(cfg.paths.output_dir) / "checkpoints/last.ckpt"))
    assert not torch.equal(next(trained.parameters()), next(method.encoder.net.parameters()))


def test_a_user_encoder_needs_its_weights_and_a_wrong_file_is_named(make_cfg, tmp_path):
    net = "{_target_: diffft.nets.mlp.MLP, width: 8, depth: 1, out_dim: 4}"
    cfg = _contrastive(make_cfg, f"method.encoder={net}")
    with pytest.raises(ValueError, match="method.encoder_weights is empty"):
        train(cfg)
    cfg = _contrastive(make_cfg, f"method.encoder={net}", f"method.encoder_weights={tmp_path}/x.pt")
    with pytest.raises(ValueError, match="x.pt.: no such file"):
        train(cfg)
    from diffft.nets.mlp import MLP

    torch.save(MLP([2], width=8, depth=1, out_dim=4).state_dict(), tmp_path / "e.pt")
    cfg = _contrastive(
        make_cfg,
        f"method.encoder={net}",
        f"method.encoder_weights={tmp_path}/e.pt",
        "trainer.max_steps=2",
    )
    assert "C++ T'=3" in train(cfg)
    torch.save(MLP([2], width=9, depth=1, out_dim=4).state_dict(), tmp_path / "bad.pt")
    cfg = _contrastive(
        make_cfg, f"method.encoder={net}", f"method.encoder_weights={tmp_path}/bad.pt"
    )
    with pytest.raises(ValueError, match="does not fit method.encoder"):
        train(cfg)


@pytest.mark.parametrize(
    "key,value", [("beta_schedule", "cubic"), ("pairing", "best"), ("positives", "none")]
)
def test_bad_options_name_the_key(make_cfg, key, value):
    with pytest.raises(ValueError, match=f"method.{key}"):
        train(_contrastive(make_cfg, f"method.{key}={value}"))


def _method(**kw) -> ContrastiveChain:
    from diffft.methods.ddpm import DDPM

    ddpm = DDPM(
        backbone={"_target_": "diffft.nets.mlp.SinusoidalTimeMLP", "width": 16, "depth": 1},
        event_shape=[2],
        schedule={"name": "linear", "steps": 100, "beta_start": 1e-4, "beta_end": 2e-2},
        optimizer={"_target_": "torch.optim.Adam"},
    )
    net = {"_target_": "diffft.nets.mlp.MLP", "event_shape": [2], "width": 8, "depth": 1}
    sampler = {"steps": 3, "subsample": "uniform", "parameterisation": "ddim", "eta": 0.0}
    kw = {"train_steps": 6, "n_chains": 8, **kw}
    return ContrastiveChain(
        [2], sampler, ddpm=dict(ddpm.hparams), encoder_net={**net, "out_dim": 4}, **kw
    )


def test_the_contrastive_term_back_propagates_into_the_eps_network():
    torch.manual_seed(0)
    method = _method(alpha=0.1)
    real = torch.randn(16, 2)
    loss, weight = method.contrastive_loss(real, torch.Generator().manual_seed(0))
    loss.backward()
    grads = [p.grad for p in method.chain.eps_net.parameters()]
    assert all(g is not None for g in grads) and sum(g.abs().sum() for g in grads) > 0
    assert not any(p.grad is not None for p in method.encoder.parameters())  # frozen
    assert weight.shape == (8,) and (weight > 0).all()


def test_shuffled_positives_come_from_another_chain_at_the_same_state():
    torch.manual_seed(0)
    seen = {}
    method = _method(positives="shuffled")
    encode = method.encoder.forward

    def record(x):
        seen.setdefault("calls", []).append(x.detach().clone())
        return encode(x)

    method.encoder.forward = record
    g = torch.Generator().manual_seed(1)
    state = g.get_state()
    method.contrastive_loss(torch.randn(16, 2), g)
    _, query, positive = seen["calls"]  # negatives, query, positive
    g.set_state(state)  # the same rollout and j
    traj = method.train_chain.sample(8, generator=g, return_trajectory=True)
    j = torch.randint(1, 6, (8,), generator=g)
    assert torch.allclose(query, traj.states[0], atol=1e-6)
    assert torch.allclose(positive, traj.states[j, torch.arange(8).roll(1)], atol=1e-6)
    with pytest.raises(ValueError, match="n_chains >= 2"):
        _method(positives="shuffled", n_chains=1)
