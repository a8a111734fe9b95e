"""slcGAN: networks, loss terms, Algorithm 1's update rules, both methods through one protocol, and the CLI."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
import yaml
from typer.testing import CliRunner

from imgcluster.augment import to_float
from imgcluster.cli import app
from imgcluster.config import ConfigError, load_preset, resolve_config
from imgcluster.losses import (hinge_d_split, hinge_g_split, marginal_entropy_gap, mode_seeking_ratio,
                               multiview_consistency)
from imgcluster.methods import METHODS
from imgcluster.methods.slcgan import _raw, two_means
from imgcluster.models.slcgan import Discriminator, Generator, SlcGANConfig, build_clusterer
from imgcluster.rundir import RunDir, load_model, save_config, save_model
from imgcluster.training import batch_indices, load_checkpoint, sample_grid, save_checkpoint, step_indices

CPU = torch.device("cpu")


def tiny_config(method: str = "slcgan", clusters: int = 10, batch_size: int | None = None, **settings):
    """The method's tiny CPU preset; unit tests that need no full batch use batch_size 8 to stay fast."""
    preset = {"c3gan": "cpu-tiny", "slcgan": "slcgan-tiny"}[method]
    general = {"clusters": clusters, **({"batch_size": batch_size} if batch_size else {})}
    return resolve_config((load_preset(preset), f"preset {preset}"), ({**general, method: settings}, "test"))


def real_data(cfg, batches: int = 1, seed: int = 0) -> torch.Tensor:
    """Random uint8 images (batches * batch_size, S0, S0, 3) at the method's cache size."""
    side = METHODS[cfg.method].cache_size(cfg)
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (batches * cfg.batch_size, side, side, 3), dtype=torch.uint8, generator=gen)


def per_step(method) -> int:
    return getattr(method, "real_batches_per_step", 1)


@pytest.fixture(scope="module")
def tiny_slcgan():
    torch.manual_seed(0)
    return METHODS["slcgan"](tiny_config(batch_size=8), CPU)


# ---------------------------------------------------------------------------------------------
# Networks
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("size", [16, 32, 64, 128])
def test_networks_shapes_at_every_size(size):
    cfg = SlcGANConfig(image_size=size, clusters=7, z_dim=8, ch=2, embed_dim=8)
    g, d, c = Generator(cfg), Discriminator(cfg), build_clusterer(cfg)
    y = F.one_hot(torch.tensor([0, 3, 6]), 7).float()
    x = g(torch.randn(3, 8), y)
    assert x.shape == (3, 3, size, size) and x.abs().max() <= 1
    u, s = d(x, y)
    assert u.shape == s.shape == (3,)
    assert c(x).shape == (3, 7)
    # BigGAN widths as multiples of ch: 16 ch at G's 4x4 map and D's last block at 64 and 128 px, 4 ch below.
    top = 16 if size >= 64 else 4
    assert g.fc.out_features == top * 2 * 16 and d.unary.in_features == top * 2
    # Small-image stem at 32 px and below: 3x3 stride 1, no maxpool; the ImageNet stem above.
    small = size <= 32
    assert c.conv1.kernel_size == ((3, 3) if small else (7, 7))
    assert isinstance(c.maxpool, torch.nn.Identity) == small


@pytest.mark.parametrize("size", [32, 64])
def test_narrow_clusterer_scales_every_resnet18_width(size):
    """c_width=16: ResNet18's layout (2 BasicBlocks per stage, strides 1, 2, 2, 2) at 16-32-64-128 channels."""
    full = build_clusterer(SlcGANConfig(image_size=size, clusters=7))
    narrow = build_clusterer(SlcGANConfig(image_size=size, clusters=7, c_width=16))
    assert [n for n, _ in narrow.named_children()] == [n for n, _ in full.named_children()]
    for i, width in enumerate((16, 32, 64, 128)):
        stage = getattr(narrow, f"layer{i + 1}")
        assert len(stage) == 2 and stage[1].conv2.out_channels == width
        assert stage[0].conv1.stride == ((1, 1) if i == 0 else (2, 2))
    assert narrow.conv1.out_channels == 16 and narrow.fc.in_features == 128
    assert narrow.conv1.kernel_size == full.conv1.kernel_size
    assert narrow(torch.randn(2, 3, size, size)).shape == (2, 7)
    params = lambda net: sum(p.numel() for p in net.parameters())
    assert 12 < params(full) / params(narrow) < 20                  # widths / 4: about 16x fewer weights


def test_spectral_norm_in_g_and_d_and_not_in_c_by_default():
    cfg = SlcGANConfig(image_size=16, clusters=5, z_dim=8, ch=2, embed_dim=8)
    has_sn = lambda m: hasattr(m, "parametrizations") and "weight" in m.parametrizations
    layers = lambda net: [m for m in net.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    g = Generator(cfg)
    assert all(has_sn(m) for m in layers(g) if m is not g.embed)       # the label embedding is plain linear
    assert all(has_sn(m) for m in layers(Discriminator(cfg)))
    assert not any(has_sn(m) for m in layers(build_clusterer(cfg)))


@pytest.mark.parametrize("c_width", [16, 64])
def test_clusterer_with_spectral_norm_bounds_every_layer(c_width):
    """c_spectral_norm: every conv and linear of C (stem, both convs of each block, the 1x1 shortcuts,
    the head) is spectrally normalised; after a few power iterations in training mode each weight's
    largest singular value is 1, and C still gives K logits."""
    torch.manual_seed(0)
    c = build_clusterer(SlcGANConfig(image_size=32, clusters=7, c_width=c_width, c_spectral_norm=True))
    layers = [m for m in c.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    assert len(layers) == 21 and all("weight" in m.parametrizations for m in layers)   # 17 convs, 3 shortcuts, fc
    x = torch.randn(4, 3, 32, 32)
    for _ in range(30):
        c(x)
    for m in layers:
        sigma = torch.linalg.matrix_norm(m.weight.detach().flatten(1), ord=2)
        assert sigma == pytest.approx(1.0, abs=0.05), m
    assert c(x).shape == (4, 7)


def test_projection_term_with_one_hot_and_soft_labels():
    torch.manual_seed(0)
    d = Discriminator(SlcGANConfig(image_size=16, clusters=4, ch=2)).eval()   # eval: fixed spectral norm
    phi = torch.randn(3, d.unary.in_features)
    E = d.embed.weight                                                  # (C, K), spectrally normalised
    onehot = torch.eye(4)
    # One-hot c: s = <E[:, c], phi>, the projection discriminator's class embedding.
    for k in range(4):
        assert torch.allclose(d.project(phi, onehot[k].expand(3, 4)), phi @ E[:, k], atol=1e-5)
    # Soft y: the embedding is y @ E, so s is the y-weighted sum of the per-cluster scores.
    y = torch.tensor([[0.7, 0.1, 0.1, 0.1], [0.25, 0.25, 0.25, 0.25], [0.0, 0.5, 0.0, 0.5]])
    per_cluster = torch.stack([d.project(phi, onehot[k].expand(3, 4)) for k in range(4)], dim=1)  # (3, K)
    assert torch.allclose(d.project(phi, y), (y * per_cluster).sum(1), atol=1e-5)
    # forward = (unary on phi(x), projection on phi(x))
    x = torch.randn(3, 3, 16, 16)
    u, s = d(x, y)
    assert torch.allclose(s, d.project(d.features(x), y), atol=1e-5)
    assert torch.allclose(u, d.unary(d.features(x)).squeeze(1), atol=1e-5)


# ---------------------------------------------------------------------------------------------
# Loss terms
# ---------------------------------------------------------------------------------------------

def test_unary_joint_hinge_split_by_hand():
    u_r, s_r = torch.tensor([2.0, 0.5]), torch.tensor([0.0, -1.0], requires_grad=True)
    u_f, s_f = torch.tensor([-2.0, 0.0], requires_grad=True), torch.tensor([0.5, -3.0])
    unary, joint = hinge_d_split(u_r, s_r, u_f, s_f)
    # unary: real (0 + 0.5) / 2 + fake (0 + 1) / 2; joint: real (1 + 2) / 2 + fake (1.5 + 0) / 2
    assert unary.item() == pytest.approx(0.75) and joint.item() == pytest.approx(2.25)
    # each term sees only its own outputs
    assert torch.autograd.grad(unary, s_r, allow_unused=True)[0] is None
    assert torch.autograd.grad(joint, u_f, allow_unused=True)[0] is None
    # G side: mean(-u_f - s_f) = -(-1) - (-1.25)
    assert hinge_g_split(u_f, s_f).item() == pytest.approx(2.25)


def test_marginal_entropy_gap_by_hand():
    k = 4
    assert marginal_entropy_gap(torch.eye(k) * 50).item() == pytest.approx(0.0, abs=1e-6)   # one image per cluster
    assert marginal_entropy_gap(torch.zeros(3, k)).item() == pytest.approx(0.0, abs=1e-6)   # all uniform
    one = torch.zeros(5, k)
    one[:, 2] = 50
    assert marginal_entropy_gap(one).item() == pytest.approx(math.log(k), abs=1e-5)        # all in cluster 2
    logits = torch.randn(6, k)
    q = logits.softmax(1).mean(0)
    assert marginal_entropy_gap(logits).item() == pytest.approx(math.log(k) + (q * q.log()).sum().item(), abs=1e-6)


def test_balance_term_joins_c_loss_when_weighted():
    cfg = tiny_config(batch_size=8, w_balance=2.0)
    torch.manual_seed(0)
    m = METHODS["slcgan"](cfg, CPU)
    m.C_train = m.C
    real = to_float(real_data(cfg))
    torch.manual_seed(1)
    out = m.c_step(real)
    assert out["c_loss"].item() == pytest.approx((out["c_adv"] + out["c_aug"] + 2.0 * out["c_balance"]).item(), rel=1e-5)
    assert 0 < out["c_balance"].item() <= math.log(cfg.clusters)
    assert "c_balance" not in METHODS["slcgan"](tiny_config(batch_size=8), CPU).c_step(real)    # off by default
    with pytest.raises(ConfigError, match="slcgan.w_balance"):
        tiny_config(w_balance=-1)


def test_multiview_consistency_by_hand():
    k = 5
    uniform = torch.zeros(3, k)
    assert multiview_consistency(uniform, uniform).item() == pytest.approx(math.log(k), abs=1e-6)
    confident = torch.eye(k)[:3] * 50
    assert multiview_consistency(confident, confident).item() == pytest.approx(0.0, abs=1e-6)
    # sum_j -q_j log p_j: q from the augmented view, p from the image
    p_logits, q_logits = torch.randn(4, k), torch.randn(4, k)
    expected = -(q_logits.softmax(1) * p_logits.softmax(1).log()).sum(1).mean()
    assert multiview_consistency(p_logits, q_logits).item() == pytest.approx(expected.item(), abs=1e-6)
    # detach_target: no gradient through q; by default both views get one (Algorithm 1 line 28)
    q_logits.requires_grad_(True)
    assert torch.autograd.grad(multiview_consistency(p_logits, q_logits), q_logits)[0].abs().sum() > 0
    loss = multiview_consistency(p_logits.requires_grad_(True), q_logits, detach_target=True)
    assert torch.autograd.grad(loss, q_logits, allow_unused=True)[0] is None


def test_mode_seeking_ratio_by_hand():
    z1, z2 = torch.zeros(2, 4), torch.full((2, 4), 2.0)                  # mean |z1 - z2| = 2
    x1, x2 = torch.zeros(2, 3, 4, 4), torch.full((2, 3, 4, 4), 0.5)      # mean |x1 - x2| = 0.5
    assert mode_seeking_ratio(x1, x2, z1, z2).item() == pytest.approx(0.25)
    assert mode_seeking_ratio(x1, x1, z1, z2).item() == 0                  # G ignores z: ratio 0


def test_diversity_term_pairs_samples_of_one_cluster_and_joins_g_loss(monkeypatch):
    torch.manual_seed(0)
    m = METHODS["slcgan"](tiny_config(batch_size=8, w_diversity=1.0), CPU)
    seen = []
    forward = m.G.forward
    monkeypatch.setattr(m.G, "forward", lambda z, y: seen.append(y.argmax(dim=1)) or forward(z, y))
    m.G_train = m.G
    g_before = snapshot(m.G)
    out = m.g_step(8)
    k = seen[0]
    assert torch.equal(k[:4], k[4:])                                      # sample i + 4 has sample i's cluster
    assert out["g_div"].item() > 0
    expected = out["g_adv"] + out["g_mi"] + 1.0 / (out["g_div"] + 1e-5)  # w_adv = w_mi = w_diversity = 1
    assert out["g_loss"].item() == pytest.approx(expected.item(), rel=1e-5)
    assert not unchanged(m.G, g_before)
    off = METHODS["slcgan"](tiny_config(batch_size=8), CPU).g_step(8)    # off by default: no pairs, no term
    assert "g_div" not in off
    with pytest.raises(ConfigError, match="slcgan.w_diversity"):
        tiny_config(w_diversity=-1)


# ---------------------------------------------------------------------------------------------
# Algorithm 1: who is updated by what
# ---------------------------------------------------------------------------------------------

def snapshot(net) -> list[torch.Tensor]:
    return [p.detach().clone() for p in net.parameters()]


def unchanged(net, before) -> bool:
    return all(torch.equal(p, q) for p, q in zip(net.parameters(), before))


def test_g_side_cross_entropy_leaves_c_gradients_untouched(tiny_slcgan):
    m = tiny_slcgan
    # The eq. 4 term does reach G through C...
    z, k, c = m.latents(8)
    grads = torch.autograd.grad(F.cross_entropy(m.C(m.G(z, c)), k), list(m.G.parameters()), allow_unused=True)
    assert sum(g.abs().sum() for g in grads if g is not None) > 0
    # ...but a G step neither writes C's (or D's) gradients nor moves their weights.
    sentinel = [torch.full_like(p, 7.0) for p in m.C.parameters()]
    for p, s in zip(m.C.parameters(), sentinel):
        p.grad = s.clone()
    m.D.zero_grad(set_to_none=True)
    c_before, d_before, g_before = snapshot(m.C), snapshot(m.D), snapshot(m.G)
    m.g_step(8)
    assert all(torch.equal(p.grad, s) for p, s in zip(m.C.parameters(), sentinel))
    assert all(p.grad is None for p in m.D.parameters())
    assert unchanged(m.C, c_before) and unchanged(m.D, d_before) and not unchanged(m.G, g_before)
    m.C.zero_grad(set_to_none=True)


def test_c_step_updates_only_c(tiny_slcgan):
    m = tiny_slcgan
    m.D.zero_grad(set_to_none=True)
    m.G.zero_grad(set_to_none=True)
    c_before, d_before, g_before = snapshot(m.C), snapshot(m.D), snapshot(m.G)
    out = m.c_step(to_float(real_data(m.cfg)))
    assert set(out) >= {"c_loss", "c_adv", "c_aug", "clusters_in_batch"}
    assert all(p.grad is None for p in m.D.parameters()) and all(p.grad is None for p in m.G.parameters())
    assert unchanged(m.D, d_before) and unchanged(m.G, g_before) and not unchanged(m.C, c_before)


@pytest.mark.parametrize("flip", [True, False])
def test_flip_setting_decides_whether_real_views_are_mirrored(flip, monkeypatch):
    """slcgan.flip=false (digits, letters): neither D's and C's real views nor T(x) are ever mirrored."""
    from imgcluster import augment
    calls = []
    real_flip = augment.random_flip
    monkeypatch.setattr(augment, "random_flip", lambda x: calls.append(x.shape[0]) or real_flip(x))
    torch.manual_seed(0)
    m = METHODS["slcgan"](tiny_config(batch_size=8, flip=flip), CPU)
    m.train_step(real_data(m.cfg, batches=per_step(m)))
    assert bool(calls) == flip
    if not flip:   # the weak view is then always an unmirrored crop (of an image that is not symmetric)
        x = torch.arange(2 * 3 * 9 * 9, dtype=torch.float32).view(2, 3, 9, 9)
        crops = [x[:, :, t:t + 8, l:l + 8] for t in range(2) for l in range(2)]
        for _ in range(20):
            view = augment.weak_view(x, 8, flip=False)
            assert all(any(torch.equal(view[i], c[i]) for c in crops) for i in range(2))


def test_d_takes_two_steps_per_g_step_with_soft_real_and_one_hot_fake_labels(monkeypatch):
    torch.manual_seed(1)
    m = METHODS["slcgan"](tiny_config(batch_size=8), CPU)
    assert m.real_batches_per_step == m.s.d_steps == 2
    calls = {"opt_d": 0, "opt_g": 0, "opt_c": 0}
    for name, opt in m.optimizers().items():
        step = opt.step

        def counted(*a, _name=name, _step=step, **kw):
            calls[_name] += 1
            return _step(*a, **kw)
        monkeypatch.setattr(opt, "step", counted)
    labels = []
    forward = m.D.forward

    def recording(x, y):
        labels.append(y.detach().clone())
        return forward(x, y)
    monkeypatch.setattr(m.D, "forward", recording)

    losses = m.train_step(real_data(m.cfg, batches=2))
    assert calls == {"opt_d": 2, "opt_g": 1, "opt_c": 1}
    state_steps = {name: {int(s["step"]) for s in opt.state.values()} for name, opt in m.optimizers().items()}
    assert state_steps == {"opt_d": {2}, "opt_g": {1}, "opt_c": {1}}
    # The two D passes see [real; fake]: real rows are C's soft labels, fake rows one-hot codes.
    b = m.cfg.batch_size
    for y in labels[:2]:
        assert y.shape == (2 * b, m.cfg.clusters) and torch.allclose(y.sum(1), torch.ones(2 * b))
        assert (y[:b].max(1).values < 1).all()
        assert ((y[b:] == 0) | (y[b:] == 1)).all()
    assert all(not v.requires_grad and v.dim() == 0 and torch.isfinite(v) for v in losses.values())
    with pytest.raises(ValueError, match="2 batches"):
        m.train_step(real_data(m.cfg)[:-1])


def test_step_indices_keep_one_batch_order_and_concatenate_consecutive_batches():
    for step in (0, 5, 11):
        assert torch.equal(step_indices(step, 100, 16, 3), batch_indices(step, 100, 16, 3))
        two = step_indices(step, 100, 16, 3, per_step=2)
        assert torch.equal(two, torch.cat([batch_indices(2 * step, 100, 16, 3), batch_indices(2 * step + 1, 100, 16, 3)]))


def test_ema_generator_averages_and_samples():
    torch.manual_seed(0)
    m = METHODS["slcgan"](tiny_config(ema=True, ema_start=0, ema_decay=0.75), CPU)
    assert "generator_ema" in m.networks()
    old = snapshot(m.G_ema)
    with torch.no_grad():
        for p in m.G.parameters():
            p.add_(1.0)
    m.opt_g.state[next(iter(m.G.parameters()))]["step"] = torch.tensor(5.0)
    m.update_ema()
    assert all(torch.allclose(e, 0.75 * o + 0.25 * p) for e, o, p in zip(m.G_ema.parameters(), old, m.G.parameters()))
    torch.manual_seed(3)
    a = m.generate(torch.tensor([0, 1]))
    torch.manual_seed(3)
    assert torch.equal(a, m.G_ema(torch.randn(2, m.s.z_dim), torch.eye(10)[:2]))


def test_ema_clusterer_averages_after_each_c_step_and_assigns():
    """slcgan.c_ema: C_ema follows C with decay min(c_ema_decay, (1 + n) / (10 + n)) after n C steps,
    training itself is unchanged, and assign / recalibrate / selection use C_ema instead of C."""
    cfg_plain, cfg_ema = tiny_config(batch_size=8), tiny_config(batch_size=8, c_ema=True, c_ema_decay=0.5)
    torch.manual_seed(0)
    plain = METHODS["slcgan"](cfg_plain, CPU)
    torch.manual_seed(0)
    m = METHODS["slcgan"](cfg_ema, CPU)
    assert m.clusterer == "C_ema" and plain.clusterer == "C" and "clusterer_ema" in m.networks()
    data = real_data(cfg_ema, batches=per_step(m))
    torch.manual_seed(1)
    plain.train_step(data)
    start = snapshot(m.C)
    torch.manual_seed(1)
    m.train_step(data)
    # Training is unchanged: C (and the losses' random draws) as without the average.
    assert all(torch.equal(a, b) for a, b in zip(snapshot(m.C), snapshot(plain.C)))
    # After 1 C step the decay is min(0.5, 2 / 11) = 2 / 11; buffers are copied.
    assert all(torch.allclose(e, 2 / 11 * s + 9 / 11 * p)
               for e, s, p in zip(m.C_ema.parameters(), start, m.C.parameters()))
    assert all(torch.equal(e, b) for e, b in zip(m.C_ema.buffers(), m.C.buffers()))
    assert not any(p.requires_grad for p in m.C_ema.parameters())
    before = snapshot(m.C_ema)
    m.train_step(data)                                   # n = 2: min(0.5, 3 / 12) = 0.25
    assert all(torch.allclose(e, 0.25 * b + 0.75 * p)
               for e, b, p in zip(m.C_ema.parameters(), before, m.C.parameters()))
    # Inference reads C_ema: its BatchNorm statistics are re-estimated, C's are left as training left them.
    c_stats = [b.clone() for b in m.C.buffers()]
    m.recalibrate(data.split(cfg_ema.batch_size))
    assert all(torch.equal(a, b) for a, b in zip(m.C.buffers(), c_stats))
    with torch.no_grad():
        expected = m.C_ema(m.eval_view(data)).softmax(dim=1)
        other = m.C.eval()(m.eval_view(data)).softmax(dim=1)
    assert not torch.allclose(expected, other)
    cluster, conf = m.assign(data)
    assert torch.allclose(conf, expected.max(dim=1).values, atol=1e-6)
    assert torch.equal(cluster, expected.argmax(dim=1))
    with pytest.raises(ConfigError, match="slcgan.c_ema_decay"):
        tiny_config(c_ema_decay=1.0)


# ---------------------------------------------------------------------------------------------
# Both methods through the same protocol
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("method_name", ["c3gan", "slcgan"])
def test_method_forward_backward_step_save_load_assign_generate(method_name, tmp_path):
    torch.manual_seed(0)
    full_c = {"c_width": 64} if method_name == "slcgan" else {}    # the paper's C, as the GPU presets have it
    cfg = tiny_config(method_name, clusters=5, **full_c)
    method = METHODS[method_name](cfg, CPU)
    data = real_data(cfg, batches=per_step(method))

    # forward: generate and assign
    images = method.generate(torch.tensor([0, 4, 2]))
    assert images.shape == (3, 3, 16, 16) and images.abs().max() <= 1
    cluster, conf = method.assign(data[:6])
    assert cluster.shape == conf.shape == (6,) and 0 <= cluster.min() and cluster.max() < 5
    assert (conf > 0).all() and (conf <= 1).all()
    probs = method.probabilities(data[:6])             # what assign reads: argmax and max per image
    assert probs.shape == (6, 5) and torch.allclose(probs.sum(dim=1), torch.ones(6))
    assert torch.equal(probs.argmax(dim=1), cluster) and torch.equal(probs.amax(dim=1), conf)

    # backward + one training step: every network with an optimiser moves
    before = {name: snapshot(net) for name, net in method.networks().items()}
    losses = method.train_step(data)
    assert losses and all(torch.isfinite(v) and not v.requires_grad for v in losses.values())
    for name, net in method.networks().items():
        assert not unchanged(net, before[name]), name

    # save / load the full training state, then both continue identically (exact resume)
    run = RunDir(tmp_path / "run")
    run.make()
    save_checkpoint(run, method, 1, CPU)
    torch.manual_seed(123)                            # the checkpoint restores the RNG: this must not matter
    again = METHODS[method_name](cfg, CPU)
    assert load_checkpoint(run, again, CPU) == 1
    for name, net in method.networks().items():
        other = again.networks()[name].state_dict()
        assert all(torch.equal(v, other[k]) for k, v in net.state_dict().items()), name
    rng = torch.get_rng_state()
    a = method.train_step(data)
    torch.set_rng_state(rng)
    b = again.train_step(data)
    assert {k: v.item() for k, v in a.items()} == {k: v.item() for k, v in b.items()}

    # model file: recalibrate, save, rebuild from the run directory alone; same assign and generate
    method.recalibrate(data.split(cfg.batch_size))
    save_config(run, cfg)
    save_model(run, method, cfg, 2)
    _, loaded = load_model(run, CPU)
    c1, p1 = method.assign(data)
    c2, p2 = loaded.assign(data)
    assert torch.equal(c1, c2) and torch.allclose(p1, p2)
    torch.manual_seed(9)
    g1 = method.generate(torch.tensor([1, 3]))
    torch.manual_seed(9)
    # the weights are equal bit for bit (checked above); the outputs to float rounding only, because MKL's
    # results can depend on where a tensor sits in memory (seen on an AMD CPU: 2e-6 apart; bit-equal with
    # MKL_CBWR=COMPATIBLE)
    assert torch.allclose(g1, loaded.generate(torch.tensor([1, 3])), rtol=0, atol=1e-5)


@pytest.mark.parametrize("method_name", ["c3gan", "slcgan"])
def test_sample_grid_columns_share_z(method_name, tmp_path):
    """samples/step-N.png: row r = cluster r, column j = the same z_j in every row, the same every time."""
    cfg = tiny_config(method_name, clusters=3)
    method = METHODS[method_name](cfg, CPU)
    calls = []
    generate = method.generate
    method.generate = lambda clusters, z: calls.append((clusters, z)) or generate(clusters, z)
    sample_grid(method, cfg, tmp_path / "a.png", per_cluster=4)
    sample_grid(method, cfg, tmp_path / "b.png", per_cluster=4)
    (clusters, z), (_, z_again) = calls
    assert clusters.tolist() == [0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2]
    rows = z.view(3, 4, -1)
    assert torch.equal(rows[1], rows[0]) and torch.equal(rows[2], rows[0])
    assert len({tuple(v.tolist()) for v in rows[0]}) == 4           # one z per column
    assert torch.equal(z, z_again)
    # The given z is the one used: the RNG state does not change the result where G draws nothing else.
    if method_name == "slcgan":
        torch.manual_seed(1)
        a = generate(clusters[:2], z[:2])
        torch.manual_seed(2)
        assert torch.equal(a, generate(clusters[:2], z[:2]))


@pytest.mark.parametrize("name", ["slcgan-32", "slcgan-64", "slcgan-128", "slcgan-tiny"])
def test_presets_resolve(name):
    cfg = resolve_config((load_preset(name), name), ({"clusters": 10}, "test"))
    assert cfg.method == "slcgan" and cfg.method_settings.d_steps == 2 and cfg.method_settings.lr == 1e-4
    if name != "slcgan-tiny":
        assert cfg.image_size == int(name.split("-")[1]) and cfg.method_settings.ch == 128


def test_cpu_preset_is_narrow_and_builds():
    """slcgan-32-cpu: 32-channel G and D, C scaled to 16-128 channels, one D step; one step runs."""
    cfg = resolve_config((load_preset("slcgan-32-cpu"), "slcgan-32-cpu"), ({"clusters": 10, "batch_size": 4}, "test"))
    s = cfg.method_settings
    assert (cfg.image_size, s.ch, s.c_width, s.d_steps) == (32, 8, 16, 1)
    method = METHODS["slcgan"](cfg, CPU)
    assert method.C.layer4[1].conv2.out_channels == 128 and method.real_batches_per_step == 1
    out = method.train_step(torch.randint(0, 256, (4, 36, 36, 3), dtype=torch.uint8))
    assert all(torch.isfinite(v) for v in out.values())


def test_bad_settings_name_the_key():
    with pytest.raises(ConfigError, match="slcgan.c_width"):
        tiny_config(c_width=0)
    with pytest.raises(ConfigError, match="slcgan.d_steps"):
        tiny_config(d_steps=0)
    with pytest.raises(ConfigError, match="slcgan.crop_scale"):
        tiny_config(crop_scale=[0.5, 0.2])


# ---------------------------------------------------------------------------------------------
# Empty clusters (slcgan.split_empty)
# ---------------------------------------------------------------------------------------------

def test_two_means_returns_the_larger_group_first():
    gen = torch.Generator().manual_seed(0)
    a, b = torch.zeros(8), torch.full((8,), 3.0)
    points = torch.cat([a + 0.1 * torch.randn(30, 8, generator=gen), b + 0.1 * torch.randn(20, 8, generator=gen)])
    m1, m2 = two_means(points[torch.randperm(50, generator=gen)])
    assert torch.allclose(m1, points[:30].mean(0)) and torch.allclose(m2, points[30:].mean(0))
    assert two_means(points[:1]) is None and two_means(torch.ones(5, 8)) is None


class ImageRows:
    """What the training loop hands after_step (training.Batches): len() and get(indices)."""

    def __init__(self, images: torch.Tensor):
        self.images = images

    def __len__(self):
        return len(self.images)

    def get(self, idx):
        return self.images[idx]


LIGHT = torch.arange(48) % 3 == 2          # which of two_kinds_of_images are light


def two_kinds_of_images(cfg) -> torch.Tensor:
    """48 uint8 images (48, S0, S0, 3) with noise: every third light (LIGHT), the others dark."""
    side = METHODS["slcgan"].cache_size(cfg)
    gen = torch.Generator().manual_seed(1)
    dark = torch.randint(0, 60, (48, side, side, 3), generator=gen)
    light = torch.randint(190, 256, (48, side, side, 3), generator=gen)
    return torch.where(LIGHT[:, None, None, None], light, dark).to(torch.uint8)


def test_an_empty_cluster_takes_half_of_the_largest():
    # the full-width C: at a quarter width its features after one step do not part the two kinds of image
    cfg = tiny_config(clusters=4, batch_size=8, c_width=64, c_spectral_norm=True, split_empty=True, split_every=5,
                      split_start=5)
    torch.manual_seed(0)
    method = METHODS["slcgan"](cfg, CPU)
    method.train_step(real_data(cfg, batches=per_step(method)))           # Adam has moments to copy
    images = ImageRows(two_kinds_of_images(cfg))
    with torch.no_grad():
        method.C.fc.bias.copy_(torch.tensor([0.0, 50.0, 0.0, 0.0]))      # every image in cluster 1
    assert set(method._sample_features(images, torch.arange(48))[1].tolist()) == {1}
    bn_before = {k: v.clone() for k, v in method.C.state_dict().items() if "running" in k}
    rng_before = torch.get_rng_state()

    assert method.after_step(4, images) is None                            # not a step to look at
    assert method.after_step(5, images) == "empty cluster 0 took half of cluster 1"
    _, labels = method._sample_features(images, torch.arange(48))
    # The split follows the two kinds of image (the larger, dark, to the empty cluster); the other
    # empty clusters had no second donor.
    assert set(labels[~LIGHT].tolist()) == {0} and set(labels[LIGHT].tolist()) == {1}
    assert torch.equal(torch.get_rng_state(), rng_before)
    # Spectral norm's estimate of the new rows' sigma is exact (a stale one inflated the biases).
    sn, raw = method.C.fc.parametrizations.weight[0], method.C.fc.parametrizations.weight.original
    assert torch.allclose(sn._u @ raw @ sn._v, torch.linalg.matrix_norm(raw, ord=2), rtol=1e-5)
    assert all(torch.equal(v, method.C.state_dict()[k]) for k, v in bn_before.items())
    for net, opt in ((method.G, method.opt_g), (method.D, method.opt_d)):
        embed = _raw(net.embed, "weight")                                 # D's under spectral norm: its original
        assert torch.equal(embed[:, 0], embed[:, 1])
        assert torch.equal(opt.state[embed]["exp_avg_sq"][:, 0], opt.state[embed]["exp_avg_sq"][:, 1])
    losses = method.train_step(real_data(cfg, batches=per_step(method)))  # trains on from the split
    assert all(math.isfinite(v.item()) for v in losses.values())


def test_split_check_changes_nothing_without_an_empty_cluster():
    cfg = tiny_config(clusters=2, batch_size=8, split_empty=True, split_every=1, split_start=1)
    torch.manual_seed(0)
    method = METHODS["slcgan"](cfg, CPU)
    images = ImageRows(two_kinds_of_images(cfg))
    features, _ = method._sample_features(images, torch.arange(48))
    dark, light = features[~LIGHT].mean(0), features[LIGHT].mean(0)
    with torch.no_grad():                                                  # the nearer mean's cluster
        method.C.fc.weight.copy_(torch.stack([dark, light]))
        method.C.fc.bias.copy_(-0.5 * torch.stack([dark, light]).pow(2).sum(1))
    assert set(method._sample_features(images, torch.arange(48))[1][LIGHT].tolist()) == {1}
    before = {name: {k: v.clone() for k, v in net.state_dict().items()} for name, net in method.networks().items()}
    assert method.after_step(1, images) is None
    for name, net in method.networks().items():
        assert all(torch.equal(v, net.state_dict()[k]) for k, v in before[name].items()), name


@pytest.mark.parametrize("clusters, labelled", [(10, 2048), (64, 2048), (100, 3200)])
def test_split_check_labels_more_images_when_there_are_many_clusters(clusters, labelled, monkeypatch):
    """2,048 images would leave clusters of a fair share empty by chance when K is large (about 2 of
    400 at every check): the check labels 32 per cluster above K = 64, every cluster gets some here, and
    nothing is split."""
    cfg = tiny_config(clusters=clusters, batch_size=8, split_empty=True, split_every=1, split_start=1)
    method = METHODS["slcgan"](cfg, CPU)
    seen = []

    def sample_features(data, idx):
        seen.append(idx)
        return torch.zeros(len(idx), 4), torch.arange(len(idx)) % clusters    # every cluster labelled

    monkeypatch.setattr(method, "_sample_features", sample_features)
    assert method.after_step(1, ImageRows(torch.zeros(5000, 1, 1, 1, dtype=torch.uint8))) is None
    (idx,) = seen
    assert len(idx) == labelled and len(set(idx.tolist())) == labelled and int(idx.max()) < 5000


# ---------------------------------------------------------------------------------------------
# The CLI end to end: train -> evaluate, on real MNIST images
# ---------------------------------------------------------------------------------------------

def test_cli_train_slcgan_then_evaluate(mnist_200, tmp_path):
    runner = CliRunner()
    run = lambda *args: runner.invoke(app, [str(a) for a in args], catch_exceptions=False)
    out = tmp_path / "run"
    result = run("train", mnist_200, "--method", "slcgan", "--clusters", 10, "--preset", "slcgan-tiny",
                 "--steps", 2, "--out", out, "--quiet")
    assert result.exit_code == 0, result.stderr
    for name in ("config.yaml", "model.safetensors", "checkpoint/state.safetensors", "metrics.jsonl",
                 "assignments.csv", "samples/step-0000002.png"):
        assert (out / name).is_file(), name
    assert len(list((out / "sheets").glob("cluster-*.png"))) == 10
    cfg = yaml.safe_load((out / "config.yaml").read_text())
    assert cfg["method"] == "slcgan" and cfg["slcgan"]["ch"] == 16 and cfg["image_size"] == 16
    (record,) = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert record["step"] == 2 and {"d_unary", "d_joint", "g_adv", "g_mi", "c_adv", "c_aug"} <= set(record)
    # The figure that rates this run against other seeds: c_aug's mean over the steps up to the one kept.
    assert f"c_aug over steps 1-2: {record['c_aug']:.3f}; between seeds" in result.stderr

    result = run("evaluate", out, "--labels-from-folders", "--json")
    assert result.exit_code == 0, result.stderr
    scores = json.loads(result.stdout)
    assert scores["n"] == 200 and scores["classes"] == 10 and 0 <= scores["acc"] <= 1

    result = run("generate", out, "--cluster", 3, "-n", 2, "-o", tmp_path / "c3.png")
    assert result.exit_code == 0 and (tmp_path / "c3.png").is_file()


def test_split_empty_resumes_exactly_and_may_be_switched_on_when_resuming(mnist_200, tmp_path):
    """The empty-cluster check keeps no state between steps, so a run resumed part-way equals one
    trained straight through, also when the resume switches the check on (here before its first step
    to look, 4); a resume may not change a training setting."""
    from safetensors.torch import load_file

    runner = CliRunner()
    run = lambda *args: runner.invoke(app, [str(a) for a in args], catch_exceptions=False)
    common = ["--preset", "slcgan-tiny", "--clusters", 10, "--quiet", "--set", "checkpoint_every=3",
              "--set", "slcgan.split_every=2", "--set", "slcgan.split_start=4"]
    split = ["--set", "slcgan.split_empty=true"]
    assert run("train", mnist_200, *common, *split, "--steps", 8, "--out", tmp_path / "whole").exit_code == 0
    assert run("train", mnist_200, *common, "--steps", 3, "--out", tmp_path / "parts").exit_code == 0
    result = run("train", mnist_200, *common, *split, "--steps", 8, "--out", tmp_path / "parts")
    assert result.exit_code == 0, result.stderr
    whole = load_file(tmp_path / "whole" / "checkpoint" / "state.safetensors")
    parts = load_file(tmp_path / "parts" / "checkpoint" / "state.safetensors")
    assert whole.keys() == parts.keys() and all(torch.equal(whole[k], parts[k]) for k in whole)
    events = [e for line in (tmp_path / "whole" / "metrics.jsonl").read_text().splitlines()
              for e in json.loads(line).get("events", [])]
    assert events and all(" took half of cluster " in e for e in events)

    result = run("train", mnist_200, *common, "--set", "slcgan.lr=0.001", "--steps", 9, "--out", tmp_path / "parts")
    assert result.exit_code == 2 and "other settings (slcgan.lr)" in result.stderr


def test_run_saved_before_c_spectral_norm_existed_loads_without_it(tmp_path):
    """A config.yaml written before the setting existed has no c_spectral_norm key: C is built as it was
    trained, without spectral norm, and its weights load."""
    cfg = tiny_config(clusters=4)
    method = METHODS["slcgan"](cfg, CPU)
    run = RunDir(tmp_path / "run")
    run.make()
    save_config(run, cfg)
    save_model(run, method, cfg, 1)
    saved = yaml.safe_load(run.config.read_text())
    del saved["slcgan"]["c_spectral_norm"]
    run.config.write_text(yaml.safe_dump(saved))
    _, loaded = load_model(run, CPU)
    assert not loaded.s.c_spectral_norm
    assert not any(hasattr(m, "parametrizations") for m in loaded.C.modules())


def test_building_for_loading_leaves_tensors_unfilled_and_restores_the_initialisers():
    """Inside building(training=False) torch.nn.init's initialisers return their tensor untouched, so
    layers draw no random numbers; afterwards, also after an error inside, they are torch's own again."""
    from imgcluster.methods.common import INITIALISERS, building

    originals = {name: getattr(torch.nn.init, name) for name in INITIALISERS}
    with pytest.raises(RuntimeError, match="inside"):
        with building(training=False):
            assert torch.equal(torch.nn.init.orthogonal_(torch.zeros(4, 4)), torch.zeros(4, 4))
            rng = torch.get_rng_state()
            torch.nn.Conv2d(3, 8, 3)                    # no random initialisation drawn
            assert torch.equal(torch.get_rng_state(), rng)
            raise RuntimeError("inside")
    assert all(getattr(torch.nn.init, name) is fn for name, fn in originals.items())
    assert torch.nn.init.ones_(torch.zeros(2)).eq(1).all()


@pytest.mark.parametrize("method_name", ["c3gan", "slcgan"])
def test_model_loaded_for_inference_equals_the_saved_one(method_name, tmp_path):
    """load_model builds the networks without initialising them (methods.common.building): every
    parameter and buffer must come from the file, so none may be left out of the state dict (a
    non-persistent buffer would stay unfilled), and the loaded model must be the saved one."""
    slcgan = {"ema": True, "c_ema": True, "c_spectral_norm": True}   # every optional network and parametrization
    cfg = tiny_config(method_name, clusters=6, **(slcgan if method_name == "slcgan" else {}))
    torch.manual_seed(0)
    method = METHODS[method_name](cfg, CPU)
    data = real_data(cfg, batches=per_step(method))
    method.train_step(data)                            # weights and BatchNorm statistics away from their init
    method.recalibrate(data.split(cfg.batch_size))
    run = RunDir(tmp_path / "run")
    run.make()
    save_config(run, cfg)
    save_model(run, method, cfg, 1)
    _, loaded = load_model(run, CPU)
    for name, net in loaded.networks().items():
        original = method.networks()[name]
        assert set(dict(net.named_buffers())) <= set(net.state_dict()), f"{name}: a buffer the file does not hold"
        tensors = {**dict(original.named_parameters()), **dict(original.named_buffers())}
        for key, value in {**dict(net.named_parameters()), **dict(net.named_buffers())}.items():
            assert value.device == CPU and torch.equal(value, tensors[key]), f"{name}.{key}"
    c1, p1 = method.assign(data)
    c2, p2 = loaded.assign(data)
    # equal to float rounding: MKL's results can depend on memory alignment (see the test above)
    assert torch.equal(c1, c2) and torch.allclose(p1, p2, rtol=0, atol=1e-5)
