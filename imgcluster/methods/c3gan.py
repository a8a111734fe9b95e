"""C3-GAN as a training method: settings, one D step + one G step, inference.

Loss weights and choices follow the official code (METHODS.md), which differs from the paper in
places: masked input m' * composite, strong perturbation by default, no KL term on c'.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from imgcluster import augment
from imgcluster.config import ConfigError
from imgcluster.methods.common import (building, cached_side, eval_view, place, recalibrate_batchnorm,
                                      training_handle)
from imgcluster.losses import entropy_regulariser, hinge_d, hinge_g, mask_regulariser, nt_xent
from imgcluster.models.c3gan import C3GANConfig, Discriminator, Generator, init_weights
from imgcluster.precision import autocast, resolve_precision


@dataclass
class C3GANSettings:
    ngf: int = 64
    ndf: int = 64
    z_dim: int = 64
    c_dim: int = 8
    h_dim: int = 512
    tau: float = 0.1
    lr: float = 2e-4
    betas: tuple[float, float] = (0.5, 0.999)
    perturb: str = "strong"          # PerturbGAN ranges: strong (official code) or weak (paper: Cars, Dogs, Flowers)
    w_info: float = 5.0              # lambda_0: CE(logits(h(x_fake)), k)
    w_info_fg: float = 1.0           # lambda_1: CE(logits(h(m' * x_fake)), k)
    w_contrastive: float = 1.0       # lambda_2: NT-Xent between weak and strong real views
    w_entropy: float = 0.1           # lambda_3: mean H(q) - H(mean q) on real images
    w_mask: float = 1.0              # lambda_4: mask area hinge + binary entropy
    load_ratio: float = 76 / 64      # images are cached at image_size * load_ratio, then cropped
    recalibrate_bn: bool = True      # re-estimate D's BatchNorm statistics on real images before inference

    def validate(self):
        if self.perturb not in augment.PERTURB_RANGES:
            raise ConfigError(f"c3gan.perturb: must be one of {', '.join(augment.PERTURB_RANGES)}, got {self.perturb!r}")
        if self.ngf < 4 or self.ngf % 4:
            raise ConfigError(f"c3gan.ngf: must be a positive multiple of 4, got {self.ngf}")
        if self.load_ratio < 1:
            raise ConfigError(f"c3gan.load_ratio: must be at least 1, got {self.load_ratio}")


def sample_codes(batch: int, clusters: int, device) -> torch.Tensor:
    """Cluster indices for a batch: distinct (a random permutation) when K >= B, else with replacement.

    The official code labels the surplus rows as cluster 0 when K < B; we sample them uniformly.
    """
    if clusters >= batch:
        return torch.randperm(clusters, device=device)[:batch]
    return torch.randint(0, clusters, (batch,), device=device)


class C3GAN:
    name = "c3gan"
    Settings = C3GANSettings
    clusterer = "D"                # the network `assign` and `recalibrate` use (its semantic head)

    def __init__(self, cfg, device: torch.device, *, training: bool = True):
        """`training=False` (a model loaded for inference): the weights come from a file, so the networks
        are allocated but not initialised (methods.common.building), and there are no optimizers and no
        training handles."""
        s: C3GANSettings = cfg.method_settings
        self.cfg, self.s, self.device = cfg, s, device
        self.net_cfg = C3GANConfig(image_size=cfg.image_size, clusters=cfg.clusters, z_dim=s.z_dim,
                                   c_dim=s.c_dim, ngf=s.ngf, ndf=s.ndf, h_dim=s.h_dim, tau=s.tau)
        with building(training):
            G, D = Generator(self.net_cfg), Discriminator(self.net_cfg)
        self.G, self.D = place(G, device, training), place(D, device, training)
        self.amp = resolve_precision(cfg.precision, device)
        self.assign_amp = None         # autocast dtype of `assign` (None: fp32); see rundir.load_model
        if not training:
            return
        init_weights(self.G)
        init_weights(self.D)
        # What each network's own update step calls (DDP under torchrun, compiled on request).
        self.G_train = training_handle(self.G, cfg, device)
        self.D_train = training_handle(self.D, cfg, device)
        self.opt_g = torch.optim.Adam(self.G.parameters(), lr=s.lr, betas=s.betas)
        self.opt_d = torch.optim.Adam(self.D.parameters(), lr=s.lr, betas=s.betas)

    # Everything a checkpoint or model file holds --------------------------------------------

    cache_size = staticmethod(cached_side)      # images are cached at image_size * load_ratio

    def networks(self) -> dict:
        return {"generator": self.G, "discriminator": self.D}

    def optimizers(self) -> dict:
        return {"opt_g": self.opt_g, "opt_d": self.opt_d}

    # Training --------------------------------------------------------------------------------

    def fake_batch(self, batch: int, generator=None):
        """Fresh z, c and perturbation -> composite x, perturbed mask m', cluster indices k."""
        z = torch.randn(batch, self.s.z_dim, device=self.device)
        k = sample_codes(batch, self.cfg.clusters, self.device)
        c = F.one_hot(k, self.cfg.clusters).float()
        bg, fg, mask = (self.G if generator is None else generator)(z, c)
        theta = augment.perturb_params(batch, self.s.perturb, self.device)
        fg, mask = augment.perturb(theta, fg, mask)
        x = bg * (1 - mask) + fg * mask                                  # eq. 1: composite
        return x, mask, k

    def info_losses(self, x_fake, mask, k):
        """eq. 3: CE of the cluster logits of the fake and of the masked fake (m' * composite)."""
        _, h_fake = self.D(x_fake)
        _, h_fg = self.D(mask * x_fake)
        loss = F.cross_entropy(self.D.cluster_logits(h_fake), k)
        loss_fg = F.cross_entropy(self.D.cluster_logits(h_fg), k)
        return loss, loss_fg

    def train_step(self, real_uint8: torch.Tensor) -> dict:
        """One D step then one G step on a (B, S0, S0, 3) uint8 batch; returns detached losses."""
        s, size = self.s, self.cfg.image_size
        self.G.train()
        self.D.train()
        real = augment.to_float(real_uint8)
        batch = real.shape[0]
        weak = augment.weak_view(real, size)
        strong = augment.strong_view(real, size)

        # (1) Update D: each kind of input is its own batch, so BatchNorm sees each kind apart.
        with autocast(self.device, self.amp):
            with torch.no_grad():
                x_fake, mask, k = self.fake_batch(batch)
            r_real, h_real = self.D_train(weak)
            _, h_strong = self.D_train(strong)
            r_fake, h_fake = self.D_train(x_fake)
            _, h_fg = self.D_train(mask * x_fake)
            logits_real = self.D.cluster_logits(h_real)
            d_adv = hinge_d(r_real, r_fake)
            d_info = F.cross_entropy(self.D.cluster_logits(h_fake), k)
            d_info_fg = F.cross_entropy(self.D.cluster_logits(h_fg), k)
            d_cont = nt_xent(h_real, h_strong, s.tau)
            d_ent = entropy_regulariser(logits_real)
            d_loss = (d_adv + s.w_info * d_info + s.w_info_fg * d_info_fg
                      + s.w_contrastive * d_cont + s.w_entropy * d_ent)
        self.opt_d.zero_grad(set_to_none=True)
        d_loss.backward()
        self.opt_d.step()

        # (2) Update G: fresh z, c, perturbation; D stays in train mode. Gradients flow through D
        # but accumulate in G's parameters only (D's would be discarded before D's next step anyway).
        with autocast(self.device, self.amp):
            x_fake, mask, k = self.fake_batch(batch, self.G_train)
            r_fake, _ = self.D(x_fake)
            g_info, g_info_fg = self.info_losses(x_fake, mask, k)
            g_adv = hinge_g(r_fake)
            g_mask = mask_regulariser(mask)
            g_loss = g_adv + s.w_info * g_info + s.w_info_fg * g_info_fg + s.w_mask * g_mask
        self.opt_g.zero_grad(set_to_none=True)
        g_loss.backward(inputs=list(self.G.parameters()))
        self.opt_g.step()

        with torch.no_grad():
            used = torch.zeros(self.cfg.clusters, device=self.device)
            used[logits_real.argmax(1)] = 1
        return {
            "d_loss": d_loss.detach(), "d_adv": d_adv.detach(), "d_info": d_info.detach(),
            "d_info_fg": d_info_fg.detach(), "d_contrastive": d_cont.detach(), "d_entropy": d_ent.detach(),
            "g_loss": g_loss.detach(), "g_adv": g_adv.detach(), "g_info": g_info.detach(),
            "g_info_fg": g_info_fg.detach(), "g_mask": g_mask.detach(),
            "mask_area": mask.detach().mean(), "clusters_in_batch": used.sum(),
        }

    # Inference -------------------------------------------------------------------------------

    def eval_view(self, real_uint8: torch.Tensor) -> torch.Tensor:
        return eval_view(real_uint8, self.cfg.image_size)

    def recalibrate(self, batches) -> None:
        """Re-estimate D's BatchNorm statistics on real images alone: during training they mix real, fake,
        masked and augmented batches, and at inference D sees real images only."""
        if self.s.recalibrate_bn:
            recalibrate_batchnorm(self.D, (self.eval_view(b.to(self.device)) for b in batches))

    @torch.no_grad()
    def probabilities(self, real_uint8: torch.Tensor) -> torch.Tensor:
        """Softmax (B, K) of D's cluster logits (cosine similarity to the centroids over the temperature)
        for real images (B, S0, S0, 3) uint8, in eval mode."""
        self.D.eval()
        with autocast(self.device, self.assign_amp):
            _, h = self.D(self.eval_view(real_uint8.to(self.device)))
            return self.D.cluster_logits(h).float().softmax(dim=1)

    def assign(self, real_uint8: torch.Tensor):
        """Cluster = argmax cosine similarity to the centroids; confidence = max softmax."""
        conf, cluster = self.probabilities(real_uint8).max(dim=1)
        return cluster, conf

    @torch.no_grad()
    def generate(self, clusters: torch.Tensor, z: torch.Tensor | None = None) -> torch.Tensor:
        """Images (B, 3, S, S) in [-1, 1] of the given clusters, unperturbed; z (B, z_dim) is drawn from
        the global RNG when not given."""
        self.G.eval()
        if z is None:
            z = torch.randn(clusters.shape[0], self.s.z_dim, device=self.device)
        bg, fg, mask = self.G(z, F.one_hot(clusters.to(self.device), self.cfg.clusters).float())
        self.G.train()
        return bg * (1 - mask) + fg * mask
