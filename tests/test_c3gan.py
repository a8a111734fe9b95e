"""C3-GAN networks, loss terms and augmentations, on hand-checkable inputs."""

import math

import pytest
import torch
import torch.nn.functional as F

from imgcluster import augment
from imgcluster.losses import entropy_regulariser, hinge_d, hinge_g, mask_regulariser, nt_xent
from imgcluster.methods.c3gan import sample_codes
from imgcluster.models.c3gan import C3GANConfig, ClusterConv, Discriminator, Generator, init_weights


@pytest.mark.parametrize("size", [16, 32, 64, 128])
def test_networks_shapes_at_every_size(size):
    cfg = C3GANConfig(image_size=size, clusters=7, ngf=16, ndf=8, h_dim=32)
    g, d = Generator(cfg), Discriminator(cfg)
    init_weights(g)
    init_weights(d)
    z = torch.randn(3, cfg.z_dim)
    c = F.one_hot(torch.tensor([0, 3, 6]), 7).float()
    bg, fg, mask = g(z, c)
    assert bg.shape == fg.shape == (3, 3, size, size)
    assert mask.shape == (3, 1, size, size)
    assert bg.abs().max() <= 1 and 0 <= mask.min() and mask.max() <= 1
    r, h = d(bg)
    assert r.shape == (3,) and h.shape == (3, 32)
    assert d.cluster_logits(h).shape == (3, 7)


def test_paper_channels_at_128():
    g = Generator(C3GANConfig(image_size=128, clusters=10))
    assert [blk[1].out_channels // 2 for blk in g.bg_up] == [256, 128, 64, 16, 16]
    d = Discriminator(C3GANConfig(image_size=128, clusters=10))
    convs = [m for m in d.trunk.modules() if isinstance(m, torch.nn.Conv2d)]
    assert [m.out_channels for m in convs] == [64, 128, 256, 512, 512, 512]


def test_cluster_bias_map_equals_tiled_onehot_concat():
    torch.manual_seed(0)
    conv = ClusterConv(feat_channels=5, clusters=11, out_channels=6)
    feats = torch.randn(4, 5, 9, 12, requires_grad=True)
    c = F.one_hot(torch.tensor([0, 10, 3, 3]), 11).float()
    fast = conv(feats, c)
    conv.literal = True
    literal = conv(feats, c)
    assert torch.allclose(fast, literal, atol=1e-5)
    # Same gradients for the weights too, so training is the same.
    g_fast = torch.autograd.grad(fast.square().sum(), conv.conv.weight)[0]
    g_lit = torch.autograd.grad(literal.square().sum(), conv.conv.weight)[0]
    assert torch.allclose(g_fast, g_lit, atol=1e-4)
    # The per-cluster map is constant inside and differs only on the 1-pixel border.
    conv.literal = False
    zero = conv(torch.zeros(1, 5, 9, 12), c[:1])
    inner = zero[0, :, 1:-1, 1:-1]
    assert torch.allclose(inner, inner[:, :1, :1].expand_as(inner), atol=1e-6)
    assert not torch.allclose(zero[0, :, 0, 0], inner[:, 0, 0])


def test_cluster_logits_loop_matches_vectorised():
    d = Discriminator(C3GANConfig(image_size=16, clusters=9, ndf=8, h_dim=16))
    h = torch.randn(5, 16)
    assert torch.allclose(d.cluster_logits(h), d.cluster_logits(h, loop=True), atol=1e-5)
    # cosine / tau: bounded by 1 / tau
    assert d.cluster_logits(h).abs().max() <= 1 / 0.1 + 1e-4


# ---------------------------------------------------------------------------------------------
# Loss terms
# ---------------------------------------------------------------------------------------------

def test_hinge_terms_by_hand():
    real = torch.tensor([2.0, 0.5])
    fake = torch.tensor([-2.0, 0.0])
    # real: relu(1-2)=0, relu(1-0.5)=0.5 -> 0.25; fake: relu(1-2)=0, relu(1+0)=1 -> 0.5
    assert hinge_d(real, fake).item() == pytest.approx(0.75)
    assert hinge_g(fake).item() == pytest.approx(1.0)


def test_nt_xent_by_hand():
    # Two samples, views identical and the two samples orthogonal: each anchor sees
    # its positive at cos 1 and two negatives at cos 0: loss = -log(e^10 / (e^10 + 2)).
    a = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    expected = -math.log(math.exp(10) / (math.exp(10) + 2))
    assert nt_xent(a, a.clone(), tau=0.1).item() == pytest.approx(expected, abs=1e-6)
    # Swapped views are the worst case: positives orthogonal, one negative identical.
    worse = nt_xent(a, a.flip(0), tau=0.1).item()
    assert worse > 5


def test_entropy_regulariser_by_hand():
    k = 4
    uniform = torch.zeros(3, k)                      # H(q) = log K and H(mean q) = log K -> 0
    assert entropy_regulariser(uniform).item() == pytest.approx(0.0, abs=1e-6)
    confident = torch.eye(k) * 100                   # H(q) ~ 0, mean q uniform -> -log K
    assert entropy_regulariser(confident).item() == pytest.approx(-math.log(k), abs=1e-4)
    collapsed = torch.zeros(4, k)
    collapsed[:, 0] = 100                            # all in one cluster: ~0 - 0
    assert entropy_regulariser(collapsed).item() == pytest.approx(0.0, abs=1e-4)


def test_mask_regulariser_by_hand():
    half = torch.full((2, 1, 4, 4), 0.5)             # area 0.5 is in range; binary entropy log2 = 1
    assert mask_regulariser(half).item() == pytest.approx(1.0, abs=1e-5)
    small = torch.full((2, 1, 4, 4), 0.05)           # area hinge 0.1 - 0.05 = 0.05
    h2 = -(0.05 * math.log2(0.05) + 0.95 * math.log2(0.95))
    assert mask_regulariser(small).item() == pytest.approx(0.05 + h2, abs=1e-5)
    big = torch.full((1, 1, 4, 4), 0.95)             # area hinge 0.95 - 0.9 = 0.05, same entropy
    assert mask_regulariser(big).item() == pytest.approx(0.05 + h2, abs=1e-5)


def test_cluster_codes_distinct_or_uniform():
    torch.manual_seed(0)
    codes = sample_codes(16, 40, "cpu")
    assert len(set(codes.tolist())) == 16 and codes.max() < 40
    codes = sample_codes(64, 5, "cpu")              # K < B: with replacement, every cluster used
    assert set(codes.tolist()) == set(range(5))
    assert (codes == 0).float().mean() < 0.5         # not the official code's surplus-to-zero


# ---------------------------------------------------------------------------------------------
# Augmentations
# ---------------------------------------------------------------------------------------------

def _decompose(theta):
    """theta = [[s cos r, -s sin r, tx], [s sin r, s cos r, ty]] -> s, r (degrees), tx, ty."""
    a, c = theta[:, 0, 0], theta[:, 1, 0]
    return torch.sqrt(a * a + c * c), torch.rad2deg(torch.atan2(c, a)), theta[:, 0, 2], theta[:, 1, 2]


@pytest.mark.parametrize("strength", ["strong", "weak"])
def test_perturbation_ranges(strength):
    torch.manual_seed(0)
    theta = augment.perturb_params(4000, strength, "cpu")
    s, r, tx, ty = _decompose(theta)
    ranges = augment.PERTURB_RANGES[strength]
    for values, key in ((s, "scale"), (r, "rotate"), (tx, "translate"), (ty, "translate")):
        low, high = ranges[key]
        assert values.min() >= low - 1e-5 and values.max() <= high + 1e-5
        span = high - low
        assert values.min() < low + 0.02 * span and values.max() > high - 0.02 * span  # the range is used
    # rotation part is a scaled rotation (no shear)
    assert torch.allclose(theta[:, 0, 1], -theta[:, 1, 0]) and torch.allclose(theta[:, 1, 1], theta[:, 0, 0])


def test_perturbation_identity_keeps_image():
    x = torch.rand(2, 3, 8, 8)
    theta = torch.tensor([[1.0, 0, 0], [0, 1.0, 0]]).expand(2, 2, 3)
    (y,) = augment.perturb(theta, x)
    assert torch.allclose(x, y, atol=1e-5)


def test_views_shapes_and_range():
    torch.manual_seed(0)
    raw = torch.randint(0, 256, (6, 19, 19, 3), dtype=torch.uint8)
    x = augment.to_float(raw)
    weak = augment.weak_view(x, 16)
    strong = augment.strong_view(x, 16)
    assert weak.shape == strong.shape == (6, 3, 16, 16)
    assert weak.min() >= -1 and weak.max() <= 1 and strong.min() >= -1 - 1e-5 and strong.max() <= 1 + 1e-5
    # each weak view is an exact crop of its image, flipped or not
    for i in range(6):
        crops = [x[i, :, t:t + 16, l:l + 16] for t in range(4) for l in range(4)]
        assert any(torch.equal(weak[i], c) or torch.equal(weak[i], c.flip(-1)) for c in crops)


def test_hue_shift_full_turn_is_identity_and_grey_is_fixed():
    x = torch.rand(3, 3, 5, 5)
    assert torch.allclose(augment._shift_hue(x, torch.zeros(3)), x, atol=1e-5)
    grey = torch.full((1, 3, 2, 2), 0.4)
    assert torch.allclose(augment._shift_hue(grey, torch.tensor([0.3])), grey, atol=1e-6)
    red = torch.tensor([1.0, 0.0, 0.0]).view(1, 3, 1, 1)
    green = augment._shift_hue(red, torch.tensor([1 / 3]))
    assert torch.allclose(green.flatten(), torch.tensor([0.0, 1.0, 0.0]), atol=1e-5)
