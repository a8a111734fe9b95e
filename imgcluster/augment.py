"""Batched augmentations that run on the training device, one random draw per sample.

Input batches come from the uint8 cache as (B, S0, S0, 3); everything returns float (B, 3, S, S)
in [-1, 1]. Each function draws from the global torch RNG, so a checkpoint's RNG state replays it.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

# PerturbGAN ranges (METHODS.md): scale, rotation in degrees, translation (fraction of the image).
PERTURB_RANGES = {
    "strong": {"scale": (0.8, 1.5), "rotate": (-15.0, 15.0), "translate": (-0.15, 0.15)},
    "weak": {"scale": (0.9, 1.1), "rotate": (-2.0, 2.0), "translate": (-0.08, 0.08)},
}


def _uniform(n: int, low: float, high: float, device) -> torch.Tensor:
    return torch.rand(n, device=device) * (high - low) + low


def to_float(batch_uint8: torch.Tensor) -> torch.Tensor:
    """(B, H, W, 3) uint8 -> (B, 3, H, W) float in [-1, 1]."""
    return batch_uint8.permute(0, 3, 1, 2).float().div_(127.5).sub_(1.0)


def center_crop(x: torch.Tensor, size: int) -> torch.Tensor:
    top = (x.shape[-2] - size) // 2
    left = (x.shape[-1] - size) // 2
    return x[..., top: top + size, left: left + size]


def random_flip(x: torch.Tensor) -> torch.Tensor:
    flip = torch.rand(x.shape[0], device=x.device) < 0.5
    return torch.where(flip[:, None, None, None], x.flip(-1), x)


# ---------------------------------------------------------------------------------------------
# Real views (C3-GAN): weak = random crop + flip; strong = RandomResizedCrop + flip + colour
# ---------------------------------------------------------------------------------------------

def weak_view(x: torch.Tensor, size: int, flip: bool = True) -> torch.Tensor:
    """Random size x size crop (per sample) of images already resized on the short side, then flip
    (unless flip is False)."""
    b, _, h, w = x.shape
    top = torch.randint(0, h - size + 1, (b,), device=x.device)
    left = torch.randint(0, w - size + 1, (b,), device=x.device)
    ar = torch.arange(size, device=x.device)
    rows = (top[:, None] + ar)[:, None, :, None]                          # (B, 1, S, 1)
    cols = (left[:, None] + ar)[:, None, None, :]                         # (B, 1, 1, S)
    idx_b = torch.arange(b, device=x.device)[:, None, None, None]
    idx_c = torch.arange(x.shape[1], device=x.device)[None, :, None, None]
    crops = x[idx_b, idx_c, rows, cols]
    return random_flip(crops) if flip else crops


def random_resized_crop(x: torch.Tensor, size: int, scale=(0.2, 1.0), ratio=(3 / 4, 4 / 3)) -> torch.Tensor:
    """torchvision's RandomResizedCrop, one box per sample, resampled bilinearly with affine_grid."""
    b, device = x.shape[0], x.device
    area = _uniform(b, *scale, device)
    log_ratio = _uniform(b, math.log(ratio[0]), math.log(ratio[1]), device)
    aspect = log_ratio.exp()
    # Box side lengths as fractions of the image; clamp keeps them inside (torchvision retries instead).
    bw = (area * aspect).sqrt().clamp(max=1.0)
    bh = (area / aspect).sqrt().clamp(max=1.0)
    cx = (torch.rand(b, device=device) * 2 - 1) * (1 - bw)
    cy = (torch.rand(b, device=device) * 2 - 1) * (1 - bh)
    theta = torch.zeros(b, 2, 3, device=device)
    theta[:, 0, 0], theta[:, 0, 2] = bw, cx
    theta[:, 1, 1], theta[:, 1, 2] = bh, cy
    grid = F.affine_grid(theta, (b, x.shape[1], size, size), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def _grey(x: torch.Tensor) -> torch.Tensor:
    """ITU-R 601 luma of images in [0, 1], (B, 1, H, W)."""
    return (0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3])


def _shift_hue(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Rotate hue by `shift` (fraction of a turn, per sample) through HSV, as torchvision's adjust_hue."""
    r, g, b_ = x.unbind(1)
    maxc, _ = x.max(1)
    minc, _ = x.min(1)
    delta = maxc - minc
    safe = torch.where(delta > 0, delta, torch.ones_like(delta))
    rc, gc, bc = (maxc - r) / safe, (maxc - g) / safe, (maxc - b_) / safe
    hue = torch.where(maxc == r, bc - gc, torch.where(maxc == g, 2.0 + rc - bc, 4.0 + gc - rc))
    hue = torch.where(delta > 0, (hue / 6.0) % 1.0, torch.zeros_like(hue))
    sat = torch.where(maxc > 0, delta / torch.where(maxc > 0, maxc, torch.ones_like(maxc)), torch.zeros_like(maxc))
    hue = (hue + shift[:, None, None]) % 1.0
    # HSV -> RGB
    i = torch.floor(hue * 6.0)
    f = hue * 6.0 - i
    v = maxc
    p, q, t = v * (1 - sat), v * (1 - sat * f), v * (1 - sat * (1 - f))
    i = i.long() % 6
    choices = [torch.stack(c, 1) for c in ((v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q))]
    out = torch.zeros_like(x)
    for k, c in enumerate(choices):
        out = torch.where((i == k)[:, None], c, out)
    return out


def color_jitter(x: torch.Tensor, brightness=0.4, contrast=0.4, saturation=0.4, hue=0.1, p=0.8) -> torch.Tensor:
    """ColorJitter(0.4, 0.4, 0.4, 0.1) applied with probability p, factors drawn per sample.

    torchvision also shuffles the order of the four adjustments per call; we use its fixed
    listed order (brightness, contrast, saturation, hue), which keeps the same factor ranges.
    """
    b, device = x.shape[0], x.device
    y = (x + 1) / 2                                                       # [0, 1]
    fb = _uniform(b, 1 - brightness, 1 + brightness, device)[:, None, None, None]
    fc = _uniform(b, 1 - contrast, 1 + contrast, device)[:, None, None, None]
    fs = _uniform(b, 1 - saturation, 1 + saturation, device)[:, None, None, None]
    fh = _uniform(b, -hue, hue, device)
    y = (y * fb).clamp(0, 1)
    mean = _grey(y).mean(dim=(1, 2, 3), keepdim=True)
    y = (fc * y + (1 - fc) * mean).clamp(0, 1)
    y = (fs * y + (1 - fs) * _grey(y)).clamp(0, 1)
    y = _shift_hue(y, fh)
    apply = (torch.rand(b, device=device) < p)[:, None, None, None]
    return torch.where(apply, y * 2 - 1, x)


def random_grayscale(x: torch.Tensor, p: float = 0.2) -> torch.Tensor:
    grey = _grey((x + 1) / 2).expand_as(x) * 2 - 1
    apply = (torch.rand(x.shape[0], device=x.device) < p)[:, None, None, None]
    return torch.where(apply, grey, x)


def strong_view(x: torch.Tensor, size: int) -> torch.Tensor:
    """RandomResizedCrop(scale 0.2-1), flip, ColorJitter(0.4, 0.4, 0.4, 0.1) p 0.8, RandomGrayscale(0.2)."""
    return random_grayscale(color_jitter(random_flip(random_resized_crop(x, size))))


# ---------------------------------------------------------------------------------------------
# Perturbation of the generated foreground (PerturbGAN)
# ---------------------------------------------------------------------------------------------

def perturb_params(batch: int, strength: str, device) -> torch.Tensor:
    """theta = [[s cos r, -s sin r, tx], [s sin r, s cos r, ty]], (B, 2, 3), one draw per sample."""
    ranges = PERTURB_RANGES[strength]
    s = _uniform(batch, *ranges["scale"], device)
    r = torch.deg2rad(_uniform(batch, *ranges["rotate"], device))
    tx = _uniform(batch, *ranges["translate"], device)
    ty = _uniform(batch, *ranges["translate"], device)
    row0 = torch.stack([s * r.cos(), -s * r.sin(), tx], dim=1)
    row1 = torch.stack([s * r.sin(), s * r.cos(), ty], dim=1)
    return torch.stack([row0, row1], dim=1)


def perturb(theta: torch.Tensor, *images: torch.Tensor) -> list[torch.Tensor]:
    """Warp each (B, C, S, S) image with theta (bilinear, zero padding), as PerturbGAN does."""
    b, _, h, w = images[0].shape
    grid = F.affine_grid(theta.to(images[0].dtype), (b, 1, h, w), align_corners=True)
    return [F.grid_sample(img, grid, mode="bilinear", padding_mode="zeros", align_corners=True) for img in images]
