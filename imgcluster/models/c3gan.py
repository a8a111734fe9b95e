"""C3-GAN networks (Kim & Ha, ICLR 2022), as the official code builds them.

Generator: a background branch from z, a foreground branch from (z, c') that yields a mask and a
texture, composed as x = bg * (1 - m') + fg' * m' after a random affine perturbation of (m, fg).
Discriminator: a convolutional trunk with an adversarial head r and a semantic head h; cluster
centroids l = psi_c(I_K) live in the discriminator and give the cluster logits of an image.

Every size from 16 to 128 px works: stages of up/down-sampling are dropped below 128 px.
No I/O, no training loop here: see imgcluster/methods/c3gan.py.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from imgcluster.precision import fp32


@dataclass
class C3GANConfig:
    image_size: int = 128
    clusters: int = 200
    z_dim: int = 64
    c_dim: int = 8          # conditioning-augmentation code c' (mu and log-sigma of 8 dims each)
    ngf: int = 64           # generator width: 4x4 map has 8 * ngf channels, the last stages ngf // 4
    ndf: int = 64           # discriminator width: trunk 64-128-256-512-512 at ndf = 64
    h_dim: int = 512        # semantic feature / centroid dimension
    tau: float = 0.1        # softmax temperature of the cluster logits

    def __post_init__(self):
        if self.image_size not in (16, 32, 64, 128):
            raise ValueError(f"image_size must be 16, 32, 64 or 128, got {self.image_size}")
        if self.clusters < 2:
            raise ValueError(f"clusters must be at least 2, got {self.clusters}")


def _num_stages(image_size: int) -> int:
    """Number of x2 stages between a 4x4 map and the image (5 at 128 px)."""
    return int(math.log2(image_size // 4))


# ---------------------------------------------------------------------------------------------
# Generator building blocks (FineGAN style)
# ---------------------------------------------------------------------------------------------

def conv3x3(cin: int, cout: int, bias: bool = False) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, 1, 1, bias=bias)


def same_block(cin: int, cout: int) -> nn.Sequential:
    """conv3x3(cin -> 2 cout) BN GLU: keeps the spatial size."""
    return nn.Sequential(conv3x3(cin, cout * 2), nn.BatchNorm2d(cout * 2), nn.GLU(dim=1))


def up_block(cin: int, cout: int) -> nn.Sequential:
    """Nearest x2 upsample, then a same_block."""
    return nn.Sequential(nn.Upsample(scale_factor=2, mode="nearest"), *same_block(cin, cout))


class ResBlock(nn.Module):
    """x + [conv3x3(c -> 2c) BN GLU conv3x3(c -> c) BN]."""

    def __init__(self, channels: int):
        super().__init__()
        self.body = nn.Sequential(
            conv3x3(channels, channels * 2), nn.BatchNorm2d(channels * 2), nn.GLU(dim=1),
            conv3x3(channels, channels), nn.BatchNorm2d(channels),
        )

    def forward(self, x):
        return x + self.body(x)


def fc_to_map(in_dim: int, channels: int) -> nn.Sequential:
    """Linear(in -> channels * 4 * 4 * 2, no bias) BN1d GLU -> (B, channels * 16), reshaped by the caller."""
    return nn.Sequential(nn.Linear(in_dim, channels * 16 * 2, bias=False),
                         nn.BatchNorm1d(channels * 16 * 2), nn.GLU(dim=1))


def generator_channels(cfg: C3GANConfig) -> list[int]:
    """Channels from the 4x4 map to full size: 512-256-128-64-16-16 at 128 px and ngf = 64.

    Smaller images drop the middle stages and keep the 8 * ngf start and the ngf // 4 end.
    """
    full = [cfg.ngf * 8, cfg.ngf * 4, cfg.ngf * 2, cfg.ngf, cfg.ngf // 4, cfg.ngf // 4]
    n = _num_stages(cfg.image_size)
    return [full[0]] + full[-n:]


class ConditioningAugmentation(nn.Module):
    """c' = mu + exp(log_sigma) * eps, (mu, log_sigma) = GLU(BN1d(Linear(K -> 4 c_dim)))."""

    def __init__(self, clusters: int, c_dim: int):
        super().__init__()
        self.c_dim = c_dim
        self.fc = nn.Sequential(nn.Linear(clusters, c_dim * 4), nn.BatchNorm1d(c_dim * 4), nn.GLU(dim=1))

    def forward(self, c_onehot):
        stats = self.fc(c_onehot)                        # (B, 2 c_dim)
        mu, log_sigma = stats[:, : self.c_dim], stats[:, self.c_dim:]
        return mu + log_sigma.exp() * torch.randn_like(mu)


class ClusterConv(nn.Module):
    """First conv of the texture head, over [features ; one-hot c tiled to H x W].

    The conv is linear in the tiled one-hot, so its contribution is a per-cluster bias map:
    conv(ones(H, W), W_c[:, k]). With zero padding that map is constant inside and differs only on
    the 1-pixel border. We compute it from a 1-channel conv instead of a K x H x W input (exact, and
    about 10x cheaper at K = 200). `literal=True` runs the tiled concat, for tests and benchmarks.
    """

    def __init__(self, feat_channels: int, clusters: int, out_channels: int):
        super().__init__()
        self.feat_channels = feat_channels
        self.conv = conv3x3(feat_channels + clusters, out_channels)
        self.literal = False

    def forward(self, feats, c_onehot):
        if self.literal:
            b, _, h, w = feats.shape
            tiled = c_onehot[:, :, None, None].expand(-1, -1, h, w)
            return self.conv(torch.cat([feats, tiled], dim=1))
        w_feat, w_code = self.conv.weight.split([self.feat_channels, c_onehot.shape[1]], dim=1)
        out = F.conv2d(feats, w_feat, padding=1)                       # (B, O, H, W)
        b, o = out.shape[:2]
        w_sel = torch.einsum("bk,okij->boij", c_onehot.to(w_code.dtype), w_code)  # (B, O, 3, 3)
        ones = feats.new_ones(1, 1, *feats.shape[2:])
        bias_map = F.conv2d(ones, w_sel.reshape(b * o, 1, 3, 3), padding=1)  # (1, B*O, H, W)
        return out + bias_map.reshape(b, o, *feats.shape[2:])


class Generator(nn.Module):
    """G(z, c) -> (background, foreground texture, mask), each (B, C, S, S); composition is the method's."""

    def __init__(self, cfg: C3GANConfig):
        super().__init__()
        self.cfg = cfg
        chans = generator_channels(cfg)
        last = chans[-1]
        # Background branch: z -> 4x4 -> S x S, 3 ResBlocks, RGB.
        self.bg_fc = fc_to_map(cfg.z_dim, chans[0])
        self.bg_up = nn.Sequential(*[up_block(a, b) for a, b in zip(chans[:-1], chans[1:])])
        self.bg_res = nn.Sequential(*[ResBlock(last) for _ in range(3)])
        self.bg_rgb = nn.Sequential(conv3x3(last, 3), nn.Tanh())
        # Foreground base: z -> 4x4, concatenated with c' tiled to c_dim x 4 x 4.
        self.cond_aug = ConditioningAugmentation(cfg.clusters, cfg.c_dim)
        self.fg_fc = fc_to_map(cfg.z_dim, chans[0])
        fg_chans = [chans[0] + cfg.c_dim] + chans[1:]
        self.fg_up = nn.Sequential(*[up_block(a, b) for a, b in zip(fg_chans[:-1], fg_chans[1:])])
        self.fg_res = nn.Sequential(*[ResBlock(last) for _ in range(3)])
        # Mask head: sameBlock, conv3x3 -> 1, sigmoid.
        self.mask_head = nn.Sequential(same_block(last, last), conv3x3(last, 1), nn.Sigmoid())
        # Texture head: [base ; tiled one-hot c] -> sameBlock, 2 ResBlocks, sameBlock, RGB.
        self.tex_in = ClusterConv(last, cfg.clusters, last * 2)
        self.tex_body = nn.Sequential(
            nn.BatchNorm2d(last * 2), nn.GLU(dim=1), ResBlock(last), ResBlock(last),
            same_block(last, last), conv3x3(last, 3), nn.Tanh(),
        )

    def forward(self, z, c_onehot):
        b = z.shape[0]
        c0 = self.bg_fc[0].out_features // 32
        bg = self.bg_fc(z).view(b, c0, 4, 4)
        bg = self.bg_rgb(self.bg_res(self.bg_up(bg)))                     # (B, 3, S, S)

        code = self.cond_aug(c_onehot)                                    # (B, c_dim)
        fg = self.fg_fc(z).view(b, c0, 4, 4)
        fg = torch.cat([fg, code[:, :, None, None].expand(-1, -1, 4, 4)], dim=1)
        base = self.fg_res(self.fg_up(fg))                                # (B, ngf/4, S, S)
        mask = self.mask_head(base)                                       # (B, 1, S, S)
        texture = self.tex_body(self.tex_in(base, c_onehot))              # (B, 3, S, S)
        return bg, texture, mask


# ---------------------------------------------------------------------------------------------
# Discriminator
# ---------------------------------------------------------------------------------------------

def down_block(cin: int, cout: int, bn: bool = True) -> nn.Sequential:
    layers = [nn.Conv2d(cin, cout, 4, 2, 1, bias=False)]
    if bn:
        layers.append(nn.BatchNorm2d(cout))
    layers.append(nn.LeakyReLU(0.2, inplace=True))
    return nn.Sequential(*layers)


class Discriminator(nn.Module):
    """D(x) -> (r, h): adversarial scalar (B,) and semantic feature (B, h_dim)."""

    def __init__(self, cfg: C3GANConfig):
        super().__init__()
        self.cfg = cfg
        n = _num_stages(cfg.image_size)
        full = [cfg.ndf, cfg.ndf * 2, cfg.ndf * 4, cfg.ndf * 8, cfg.ndf * 8]
        chans = full[: n - 1] + [full[-1]] if n < 5 else full
        top = cfg.ndf * 8
        # Trunk: conv4x4 s2 LReLU, then conv4x4 s2 BN LReLU down to 4x4, then conv3x3 BN LReLU.
        blocks = [down_block(3, chans[0], bn=False)]
        blocks += [down_block(a, b) for a, b in zip(chans[:-1], chans[1:])]
        blocks.append(nn.Sequential(conv3x3(chans[-1], top), nn.BatchNorm2d(top), nn.LeakyReLU(0.2, inplace=True)))
        self.trunk = nn.Sequential(*blocks)
        self.adv_head = nn.Conv2d(top, 1, 4, 4, bias=False)              # r: 4x4 -> 1x1
        self.sem_head = nn.Sequential(
            conv3x3(top, top), nn.BatchNorm2d(top), nn.LeakyReLU(0.2, inplace=True),
            nn.Conv2d(top, cfg.h_dim, 4, 4, bias=False),                 # h: 4x4 -> 1x1
        )
        # Centroids l = psi_c(I_K): a Linear(K -> h_dim) applied to the identity (see centroid_vectors).
        self.centroids = nn.Linear(cfg.clusters, cfg.h_dim)
        self.loop_logits = False        # literal per-cluster loop in cluster_logits (benchmarks only)

    def forward(self, x):
        feats = self.trunk(x)
        r = self.adv_head(feats).flatten(1).squeeze(1)                   # (B,)
        h = self.sem_head(feats).flatten(1)                               # (B, h_dim)
        return r, h

    def centroid_vectors(self) -> torch.Tensor:
        """psi_c(I_K), (K, h_dim): the Linear applied to the identity is its weight, transposed, plus its
        bias (row k = psi_c(e_k)), computed without the K x K identity."""
        return self.centroids.weight.t() + self.centroids.bias

    @fp32                                 # cosine / small tau: no bf16 here
    def cluster_logits(self, h, loop: bool | None = None):
        """eq. 3: cosine similarity to every centroid / tau, (B, K).

        `loop=True` computes one cluster at a time, as a literal reading of eq. 3 (benchmarks only).
        """
        centroids = F.normalize(self.centroid_vectors(), dim=1)           # (K, h_dim)
        h = F.normalize(h, dim=1)
        if self.loop_logits if loop is None else loop:
            return torch.stack([h @ centroids[k] for k in range(centroids.shape[0])], dim=1) / self.cfg.tau
        return h @ centroids.t() / self.cfg.tau


# ---------------------------------------------------------------------------------------------
# Initialisation (official code): orthogonal conv/linear weights, BN weight ~ N(1, 0.02)
# ---------------------------------------------------------------------------------------------

def init_weights(module: nn.Module) -> None:
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            nn.init.orthogonal_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
            nn.init.normal_(m.weight, 1.0, 0.02)
            nn.init.zeros_(m.bias)
