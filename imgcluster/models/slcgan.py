"""slcGAN networks (Self-labeled Conditional GANs): BigGAN-style G and D, and a ResNet18 clustering network.

G(z, y): residual generator; the K-dim label vector y is mapped linearly to a dense embedding e that
drives class-conditional BatchNorm in every block. Spectral norm on its convs and linears, tanh output.
D(x, y): residual discriminator with spectral norm; phi(x) = sum over space of ReLU(h), two outputs:
the unary term u = Linear(phi) and the joint (projection) term s = <E y, phi>, y soft or one-hot.
C(x): torchvision's ResNet18 giving K logits, with a small-image stem at 32 px and below.

Widths follow BigGAN-PyTorch's architectures (channel multiplier `ch`, one residual block per stage);
16, 32, 64 and 128 px work. No self-attention block: the paper does not mention one.
No I/O, no training loop here: see imgcluster/methods/slcgan.py.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils.parametrizations import spectral_norm
from torchvision.models import resnet18
from torchvision.models.resnet import BasicBlock, ResNet, conv1x1


@dataclass
class SlcGANConfig:
    image_size: int = 128
    clusters: int = 100
    z_dim: int = 128
    ch: int = 128            # channel multiplier of G and D (paper: 128)
    embed_dim: int = 128     # the dense label embedding e = y @ W (drives G's conditional BatchNorm)
    c_width: int = 64        # C's first-stage width; ResNet18's stages are 1, 2, 4, 8 times it (paper: 64)
    c_spectral_norm: bool = False   # spectral norm on every conv and linear of C (see build_clusterer)

    def __post_init__(self):
        if self.image_size not in ARCH:
            raise ValueError(f"image_size must be 16, 32, 64 or 128, got {self.image_size}")
        if self.clusters < 2:
            raise ValueError(f"clusters must be at least 2, got {self.clusters}")
        if self.c_width < 1:
            raise ValueError(f"c_width must be at least 1, got {self.c_width}")


# BigGAN-PyTorch's widths, as multiples of ch. G: channels from the 4x4 map to the image, one x2
# upsampling block between neighbours. D: output channels per block and whether it downsamples.
ARCH = {
    128: {"g": [16, 16, 8, 4, 2, 1], "d": [1, 2, 4, 8, 16, 16], "down": [1, 1, 1, 1, 1, 0]},
    64: {"g": [16, 16, 8, 4, 2], "d": [1, 2, 4, 8, 16], "down": [1, 1, 1, 1, 0]},
    32: {"g": [4, 4, 4, 4], "d": [4, 4, 4, 4], "down": [1, 1, 0, 0]},
    16: {"g": [4, 4, 4], "d": [4, 4, 4], "down": [1, 0, 0]},        # 32 px with one stage dropped
}


# ---------------------------------------------------------------------------------------------
# Spectrally normalised layers, orthogonally initialised (BigGAN's init='ortho')
# ---------------------------------------------------------------------------------------------

def _ortho(layer: nn.Module) -> nn.Module:
    nn.init.orthogonal_(layer.weight)
    if getattr(layer, "bias", None) is not None:
        nn.init.zeros_(layer.bias)
    return layer


def sn_conv(cin: int, cout: int, kernel: int = 3) -> nn.Module:
    return spectral_norm(_ortho(nn.Conv2d(cin, cout, kernel, 1, kernel // 2)))


def sn_linear(cin: int, cout: int, bias: bool = True) -> nn.Module:
    return spectral_norm(_ortho(nn.Linear(cin, cout, bias=bias)))


# ---------------------------------------------------------------------------------------------
# Generator
# ---------------------------------------------------------------------------------------------

class ConditionalBatchNorm2d(nn.Module):
    """BN without affine, then gain = 1 + Linear(e), bias = Linear(e), per sample: (B, C, H, W)."""

    def __init__(self, channels: int, embed_dim: int):
        super().__init__()
        self.bn = nn.BatchNorm2d(channels, affine=False)
        self.gain = sn_linear(embed_dim, channels, bias=False)
        self.bias = sn_linear(embed_dim, channels, bias=False)

    def forward(self, x, e):
        return self.bn(x) * (1 + self.gain(e))[:, :, None, None] + self.bias(e)[:, :, None, None]


class GBlock(nn.Module):
    """CBN ReLU up conv3x3 CBN ReLU conv3x3, plus the shortcut up conv1x1: (B, cin, H, W) -> (B, cout, 2H, 2W)."""

    def __init__(self, cin: int, cout: int, embed_dim: int):
        super().__init__()
        self.bn1 = ConditionalBatchNorm2d(cin, embed_dim)
        self.conv1 = sn_conv(cin, cout)
        self.bn2 = ConditionalBatchNorm2d(cout, embed_dim)
        self.conv2 = sn_conv(cout, cout)
        self.shortcut = sn_conv(cin, cout, kernel=1)

    def forward(self, x, e):
        h = F.interpolate(F.relu(self.bn1(x, e)), scale_factor=2, mode="nearest")
        h = self.conv2(F.relu(self.bn2(self.conv1(h), e)))
        return h + self.shortcut(F.interpolate(x, scale_factor=2, mode="nearest"))


class Generator(nn.Module):
    """G(z, y) -> images (B, 3, S, S) in [-1, 1]; z (B, z_dim), y (B, K) one-hot or soft."""

    def __init__(self, cfg: SlcGANConfig):
        super().__init__()
        self.cfg = cfg
        chans = [m * cfg.ch for m in ARCH[cfg.image_size]["g"]]
        # The paper's "linear transformation" of the label vector to a dense vector (BigGAN's shared
        # embedding, which has no spectral norm); each CBN then has its own SN linears from it.
        self.embed = _ortho(nn.Linear(cfg.clusters, cfg.embed_dim, bias=False))
        self.fc = sn_linear(cfg.z_dim, chans[0] * 4 * 4)
        self.blocks = nn.ModuleList(GBlock(a, b, cfg.embed_dim) for a, b in zip(chans[:-1], chans[1:]))
        self.out = nn.Sequential(nn.BatchNorm2d(chans[-1]), nn.ReLU(), sn_conv(chans[-1], 3), nn.Tanh())

    def forward(self, z, y):
        e = self.embed(y)                                                 # (B, embed_dim)
        h = self.fc(z).view(z.shape[0], -1, 4, 4)                         # (B, 16 ch, 4, 4) at 128 px
        for block in self.blocks:
            h = block(h, e)                                               # x2 per block
        return self.out(h)                                                # (B, 3, S, S)


# ---------------------------------------------------------------------------------------------
# Discriminator
# ---------------------------------------------------------------------------------------------

class DBlock(nn.Module):
    """[ReLU] conv3x3 ReLU conv3x3 [avgpool2] plus a conv1x1 shortcut when shape changes (BigGAN's DBlock).

    The first block takes raw pixels: no pre-activation, and its shortcut pools before the conv.
    """

    def __init__(self, cin: int, cout: int, downsample: bool, preactivation: bool):
        super().__init__()
        self.downsample, self.preactivation = downsample, preactivation
        self.conv1 = sn_conv(cin, cout)
        self.conv2 = sn_conv(cout, cout)
        self.shortcut = sn_conv(cin, cout, kernel=1) if (cin != cout or downsample) else None

    def forward(self, x):
        h = F.relu(x) if self.preactivation else x
        h = self.conv2(F.relu(self.conv1(h)))
        if self.downsample:
            h = F.avg_pool2d(h, 2)
        sc = x
        if self.preactivation:
            sc = self.shortcut(sc) if self.shortcut is not None else sc
            sc = F.avg_pool2d(sc, 2) if self.downsample else sc
        else:
            sc = F.avg_pool2d(sc, 2) if self.downsample else sc
            sc = self.shortcut(sc) if self.shortcut is not None else sc
        return h + sc


class Discriminator(nn.Module):
    """D(x, y) -> (u, s): unary term (B,) from the image alone, joint term (B,) = <E y, phi(x)>."""

    def __init__(self, cfg: SlcGANConfig):
        super().__init__()
        self.cfg = cfg
        arch = ARCH[cfg.image_size]
        chans = [3] + [m * cfg.ch for m in arch["d"]]
        self.blocks = nn.Sequential(*[
            DBlock(a, b, downsample=bool(down), preactivation=i > 0)
            for i, (a, b, down) in enumerate(zip(chans[:-1], chans[1:], arch["down"]))
        ])
        self.unary = sn_linear(chans[-1], 1)                              # u = Linear(phi)
        self.embed = sn_linear(cfg.clusters, chans[-1], bias=False)       # E: y (B, K) -> E y (B, C)

    def features(self, x):
        """phi(x) = sum over space of ReLU(h): (B, C)."""
        return F.relu(self.blocks(x)).sum(dim=(2, 3))

    def project(self, phi, y):
        """Joint (projection) term s = <E y, phi>, (B,); for a soft y the embedding is y @ E (linear in y)."""
        return (self.embed(y) * phi).sum(dim=1)

    def forward(self, x, y):
        phi = self.features(x)
        return self.unary(phi).squeeze(1), self.project(phi, y)


# ---------------------------------------------------------------------------------------------
# Clustering network
# ---------------------------------------------------------------------------------------------

def build_clusterer(cfg: SlcGANConfig) -> nn.Module:
    """C(x) -> K logits: torchvision's ResNet18 (random init, no weights downloaded).

    At 32 px and below the ImageNet stem (7x7 stride 2 + maxpool) would leave too little of the image,
    so it becomes the CIFAR stem: a 3x3 stride-1 conv and no maxpool. With c_width other than 64 the
    same ResNet18 is built with every width scaled (c_width, 2, 4, 8 times it): a narrow C for CPUs.

    c_spectral_norm: the paper's architecture paragraph says "We use spectral normalization in both C
    and G"; it puts spectral norm on every conv and linear layer of C (BatchNorm stays).
    """
    net = resnet18(weights=None, num_classes=cfg.clusters) if cfg.c_width == 64 else _scaled_resnet18(cfg)
    if cfg.image_size <= 32:
        net.conv1 = nn.Conv2d(3, cfg.c_width, 3, 1, 1, bias=False)
        nn.init.kaiming_normal_(net.conv1.weight, mode="fan_out", nonlinearity="relu")   # as torchvision does
        net.maxpool = nn.Identity()
    if cfg.c_spectral_norm:
        for module in list(net.modules()):
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                spectral_norm(module)
    return net


def _scaled_resnet18(cfg: SlcGANConfig) -> nn.Module:
    """torchvision's ResNet18 with stage widths w, 2w, 4w, 8w (w = c_width) instead of 64..512.

    torchvision builds the layers with fixed widths; this replaces its stem, stages and head with the
    scaled ones (torchvision's BasicBlock, the same module names), then re-runs its initialisation.
    """
    w = cfg.c_width
    net = ResNet(BasicBlock, [1, 1, 1, 1], num_classes=cfg.clusters)          # placeholder stages, replaced
    net.conv1 = nn.Conv2d(3, w, 7, 2, 3, bias=False)
    net.bn1 = nn.BatchNorm2d(w)
    cin = w
    for i, width in enumerate((w, 2 * w, 4 * w, 8 * w)):
        stride = 1 if i == 0 else 2
        down = None if stride == 1 and cin == width else nn.Sequential(conv1x1(cin, width, stride), nn.BatchNorm2d(width))
        setattr(net, f"layer{i + 1}", nn.Sequential(BasicBlock(cin, width, stride, down), BasicBlock(width, width)))
        cin = width
    net.fc = nn.Linear(8 * w, cfg.clusters)
    for m in net.modules():                                                   # torchvision's init
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
    return net
