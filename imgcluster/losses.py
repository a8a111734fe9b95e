"""Loss terms of both methods, as small pure functions on tensors (unit-tested one by one).

Every term runs in fp32, also inside a bf16 autocast region (`precision.fp32`).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from imgcluster.precision import fp32


@fp32
def hinge_d(real_scores: torch.Tensor, fake_scores: torch.Tensor) -> torch.Tensor:
    """eq. 2 (D side): relu(1 - r_real).mean() + relu(1 + r_fake).mean()."""
    return F.relu(1.0 - real_scores).mean() + F.relu(1.0 + fake_scores).mean()


@fp32
def hinge_g(fake_scores: torch.Tensor) -> torch.Tensor:
    """eq. 2 (G side): -r_fake.mean()."""
    return -fake_scores.mean()


@fp32
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


@fp32
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


@fp32
def mask_regulariser(mask: torch.Tensor, low: float = 0.1, high: float = 0.9) -> torch.Tensor:
    """eq. 5, L_mask: binary entropy (log2) of the mask + hinge keeping its area within [low, high].

    mask: (B, 1, H, W) in [0, 1], after perturbation.
    """
    area = mask.flatten(1).mean(dim=1)                                    # (B,)
    area_term = F.relu(low - area).mean() + F.relu(area - high).mean()
    m = mask.clamp(1e-6, 1 - 1e-6)
    binary_entropy = -(m * torch.log2(m) + (1 - m) * torch.log2(1 - m)).mean()
    return area_term + binary_entropy


# ---------------------------------------------------------------------------------------------
# slcGAN
# ---------------------------------------------------------------------------------------------

@fp32
def hinge_d_split(u_real: torch.Tensor, s_real: torch.Tensor,
                  u_fake: torch.Tensor, s_fake: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Algorithm 1 lines 14-15 (D side): the hinge split across the unary and the joint terms.

    Returns (unary, joint) = (relu(1 - u_r) + relu(1 + u_f), relu(1 - s_r) + relu(1 + s_f)), each a
    batch mean; D minimises their sum. u: D's image-only output, s: its projection on the label, (B,).
    """
    return hinge_d(u_real, u_fake), hinge_d(s_real, s_fake)


@fp32
def hinge_g_split(u_fake: torch.Tensor, s_fake: torch.Tensor) -> torch.Tensor:
    """Algorithm 1 line 20 (G side): mean(-u_f - s_f)."""
    return hinge_g(u_fake) + hinge_g(s_fake)


@fp32
def multiview_consistency(logits: torch.Tensor, logits_aug: torch.Tensor, detach_target: bool = False) -> torch.Tensor:
    """eq. 5, L_aug: mean over images of sum_j -q_j log p_j, logits (B, K) each.

    p = softmax(C(x)) from `logits`, q = softmax(C(T(x))) from `logits_aug`. With `detach_target`,
    q is a fixed target (no gradient through the augmented view); otherwise both sides get one,
    as Algorithm 1 line 28 differentiates the whole sum.
    """
    q = logits_aug.softmax(dim=1)
    if detach_target:
        q = q.detach()
    return -(q * logits.log_softmax(dim=1)).sum(dim=1).mean()


@fp32
def marginal_entropy_gap(logits: torch.Tensor) -> torch.Tensor:
    """log K - H(mean softmax(logits)), logits (B, K): 0 when the batch uses every cluster equally,
    log K when it all goes to one (the marginal term of SCAN's loss, Van Gansbeke et al. 2020)."""
    q_mean = logits.softmax(dim=1).mean(dim=0)
    return math.log(logits.shape[1]) + (q_mean * q_mean.clamp_min(1e-12).log()).sum()


@fp32
def mode_seeking_ratio(x1: torch.Tensor, x2: torch.Tensor, z1: torch.Tensor, z2: torch.Tensor) -> torch.Tensor:
    """MSGAN's ratio (Mao et al. 2019): mean |x1 - x2| / mean |z1 - z2| over pairs of samples drawn for the
    same condition from different noise; x (B, ...), z (B, z_dim). Small when G ignores its noise."""
    return (x1 - x2).abs().mean() / (z1 - z2).abs().mean()
