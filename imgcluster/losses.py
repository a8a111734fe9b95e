"""Loss terms of both methods, as small pure functions on tensors (unit-tested one by one)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def hinge_d(real_scores: torch.Tensor, fake_scores: torch.Tensor) -> torch.Tensor:
    """eq. 2 (D side): relu(1 - r_real).mean() + relu(1 + r_fake).mean()."""
    return F.relu(1.0 - real_scores).mean() + F.relu(1.0 + fake_scores).mean()


def hinge_g(fake_scores: torch.Tensor) -> torch.Tensor:
    """eq. 2 (G side): -r_fake.mean()."""
    return -fake_scores.mean()


def nt_xent(a: torch.Tensor, b: torch.Tensor, tau: float) -> torch.Tensor:
    """eq. 4, L_img_cont: SimCLR's NT-Xent between two views, features (B, d) each.

    2B anchors; each has its other view as the one positive and the other 2B - 2 samples as negatives.
    """
    z = F.normalize(torch.cat([a, b], dim=0), dim=1)                      # (2B, d)
    sim = z @ z.t() / tau                                                 # (2B, 2B)
    n = a.shape[0]
    self_mask = torch.eye(2 * n, dtype=torch.bool, device=z.device)
    sim = sim.masked_fill(self_mask, float("-inf"))
    targets = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)]).to(z.device)
    return F.cross_entropy(sim, targets)


def entropy_regulariser(logits: torch.Tensor) -> torch.Tensor:
    """eq. 4, L_entropy: mean H(q) - H(mean q) (the KL to uniform up to the constant log K).

    Low per-image entropy makes confident assignments; high entropy of the batch mean keeps
    every cluster in use.
    """
    q = logits.softmax(dim=1)
    per_image = -(q * logits.log_softmax(dim=1)).sum(dim=1).mean()
    q_mean = q.mean(dim=0)
    marginal = -(q_mean * q_mean.clamp_min(1e-12).log()).sum()
    return per_image - marginal


def mask_regulariser(mask: torch.Tensor, low: float = 0.1, high: float = 0.9) -> torch.Tensor:
    """eq. 5, L_mask: binary entropy (log2) of the mask + hinge keeping its area within [low, high].

    mask: (B, 1, H, W) in [0, 1], after perturbation.
    """
    area = mask.flatten(1).mean(dim=1)                                    # (B,)
    area_term = F.relu(low - area).mean() + F.relu(area - high).mean()
    m = mask.clamp(1e-6, 1 - 1e-6)
    binary_entropy = -(m * torch.log2(m) + (1 - m) * torch.log2(1 - m)).mean()
    return area_term + binary_entropy
