"""slcGAN as a training method: settings, Algorithm 1 (d_steps D steps, one G step, one C step), inference.

The three networks play eq. 6 = lambda_1 L_adv (eq. 3, hinge form, split into unary and joint
terms as in BigBiGAN) + lambda_2 L_mi (eq. 4, G only) + lambda_3 L_aug (eq. 5, C only):
- D: hinge on u and s, real pairs (x, softmax(C(x))), fake pairs (G(z, c), onehot(c)).
- G: -u_f - s_f + CE(C(G(z, c)), c); only G's parameters receive gradients (C is not updated by eq. 4).
- C: mean(s_r) (C plays with G against D: it lowers D's joint score of real pairs) + L_aug over an
  augmented view T(x) (random resized crop, flip, colour jitter); only C's parameters receive gradients.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from imgcluster import augment, distributed
from imgcluster.config import ConfigError
from imgcluster.methods.common import (average_into, building, cached_side, eval_view, optimizer_steps, place,
                                      recalibrate_batchnorm, training_handle)
from imgcluster.losses import (hinge_d_split, hinge_g_split, marginal_entropy_gap, mode_seeking_ratio,
                               multiview_consistency)
from imgcluster.models.slcgan import Discriminator, Generator, SlcGANConfig, build_clusterer
from imgcluster.precision import autocast, resolve_precision


@dataclass
class SlcGANSettings:
    ch: int = 128                    # channel multiplier of G and D (paper: 128)
    z_dim: int = 128
    embed_dim: int = 128             # dense label embedding of G's conditional BatchNorm
    c_width: int = 64                # C's ResNet18 first-stage width (paper: 64, i.e. 64-128-256-512)
    # Spectral norm in C's convs and linears (the paper: "in both C and G"; README, Faithfulness notes).
    # Off: a run saved before the setting existed has no such key and was trained without it, and on the
    # CPU preset it helped MNIST and hurt Fashion-MNIST (tests/bench/RESULTS.md).
    c_spectral_norm: bool = False
    lr: float = 1e-4                 # Adam, the same for G, D and C (paper)
    betas: tuple[float, float] = (0.0, 0.999)   # the paper names none; BigGAN's (and the SN-GAN hinge setups')
    d_steps: int = 2                 # D updates per G update (paper: 2); each takes its own real batch
    w_adv: float = 1.0               # lambda_1, eq. 6
    w_mi: float = 1.0                # lambda_2: CE(C(G(z, c)), c), eq. 4
    w_aug: float = 1.0               # lambda_3: multi-view consistency, eq. 5
    # Not in the paper: a mode-seeking term for G (Mao et al. 2019, MSGAN), 1 / (|G(z1, c) - G(z2, c)| /
    # |z1 - z2|) over pairs drawn for the same cluster. Without it, on MNIST and Fashion-MNIST the CPU
    # preset's G ends up ignoring z (one image per cluster); with 1 its samples vary, but the clusters
    # were no better (tests/bench/RESULTS.md), so every preset leaves it at 0 (off).
    w_diversity: float = 0.0
    # Not in the paper: w_balance * (log K - H(mean_batch softmax(C(x)))) in C's loss (SCAN's marginal
    # entropy term), which keeps every cluster in use: C's updates otherwise let clusters empty out (MNIST
    # seed 5 of the CPU preset with flips off and spectral norm in C ended with 3 of 10 empty). It assumes
    # clusters of similar size. With that recipe at weight 2 it raised seed 2 from ACC 0.585 to 0.784 and
    # left seed 5 level; at weight 1 with the preset of 2026-11-28 both seeds fell (tests/bench/RESULTS.md).
    # 0 (off) in every preset.
    w_balance: float = 0.0
    # Not in the paper: empty clusters take over half of the largest one (DeepCluster's remedy for empty
    # clusters, Caron et al. 2018, with the split made along the cluster's own two groups). Every
    # split_every steps from step split_start on, C labels a random sample of the folder (split_sample(K)
    # images: 2,048, or 32 per cluster above K = 64; BatchNorm in batch mode as in training); each
    # cluster given none of them takes the larger half of the largest cluster left, split by 2-means of
    # C's features: C's output rows of the two become the donor's row plus and minus the direction
    # between the halves, and the generator's and the discriminator's embeddings of the empty cluster
    # (and their Adam moments) copies of the donor's. On MNIST, half the runs of the CPU recipe left 1-4
    # of 10 clusters empty from step 500-2,000 to the end; the split rescued the runs stuck with two
    # digits in one cluster (ACC +0.04 to +0.36 on three of six seeds), but cost runs whose clusters
    # would have come back alone or were purer with fewer (-0.04 and -0.08 on two). With slcgan-32-cpu
    # itself (three seeds each on MNIST and CIFAR-10, three and four on Fashion-MNIST) it raised the
    # mean ACC and NMI on all three sets, by less than the seeds' spread, and every run used all K
    # clusters (without it, 5 of 9 left one empty): on in slcgan-32-cpu since 2026-12-07, off elsewhere
    # (the GPU presets were not measured with it). Off by default; a run may be resumed with it switched
    # on or off (tests/bench/RESULTS.md).
    split_empty: bool = False
    split_every: int = 250
    split_start: int = 1000
    aug_detach_target: bool = False  # eq. 5 with q = softmax(C(T(x))) as a fixed target (see c_step)
    crop_scale: tuple[float, float] = (0.2, 1.0)  # T: RandomResizedCrop area range
    # Horizontal flips in T and in the real views of D and C (the paper's T flips). Off for folders where
    # a mirrored image is another class or no class at all (digits, letters): with flips, G learns to
    # draw mirrored digits too, and C is taught that a 2 and its mirror image are the same cluster.
    flip: bool = True
    ema: bool = False                # keep an exponential moving average of G for sampling
    ema_decay: float = 0.9999
    ema_start: int = 1000            # G steps before averaging starts (the copy follows G until then)
    # Not in the paper: an exponential moving average of C's weights, which `assign`, label-free
    # selection and the sample sheets then use instead of C (its BatchNorm statistics are re-estimated
    # on real images like C's). C's clusters move from one step to the next: on MNIST one run scored ACC
    # 0.922 at step 4,750 and 0.869 at 4,800. The average is over about 1 / (1 - c_ema_decay) C steps,
    # fewer at first: decay min(c_ema_decay, (1 + n) / (10 + n)) after n C steps. Training is unchanged.
    # Measured on four MNIST runs: ACC -0.067 to +0.061 against C at the same step, no better on the whole
    # (tests/bench/RESULTS.md), so it is off in every preset.
    c_ema: bool = False
    c_ema_decay: float = 0.998
    load_ratio: float = 9 / 8        # images are cached at image_size * load_ratio, then cropped
    recalibrate_bn: bool = True      # re-estimate C's BatchNorm statistics on real images before inference

    def validate(self):
        for key in ("ch", "z_dim", "embed_dim", "c_width", "d_steps", "split_every"):
            if getattr(self, key) < 1:
                raise ConfigError(f"slcgan.{key}: must be at least 1, got {getattr(self, key)}")
        if self.lr <= 0:
            raise ConfigError(f"slcgan.lr: must be positive, got {self.lr}")
        if not all(0 <= b < 1 for b in self.betas):
            raise ConfigError(f"slcgan.betas: each must be in [0, 1), got {list(self.betas)}")
        low, high = self.crop_scale
        if not 0 < low <= high <= 1:
            raise ConfigError(f"slcgan.crop_scale: need 0 < low <= high <= 1, got {list(self.crop_scale)}")
        for key in ("ema_decay", "c_ema_decay"):
            if not 0 <= getattr(self, key) < 1:
                raise ConfigError(f"slcgan.{key}: must be in [0, 1), got {getattr(self, key)}")
        for key in ("w_diversity", "w_balance"):
            if getattr(self, key) < 0:
                raise ConfigError(f"slcgan.{key}: must be at least 0, got {getattr(self, key)}")
        for key in ("ema_start", "split_start"):
            if getattr(self, key) < 0:
                raise ConfigError(f"slcgan.{key}: must be at least 0, got {getattr(self, key)}")
        if self.load_ratio < 1:
            raise ConfigError(f"slcgan.load_ratio: must be at least 1, got {self.load_ratio}")


class SlcGAN:
    name = "slcgan"
    Settings = SlcGANSettings
    # The network `assign` and `recalibrate` use: C, or its average C_ema when slcgan.c_ema is set
    # (the instance attribute set in __init__).
    clusterer = "C"
    # The loop hands train_step this many consecutive real batches per step: one per D step.
    # The instance attribute set in __init__ follows the setting d_steps (default 2).
    real_batches_per_step = 2
    # eq. 5's loss: its mean over the last steps, low in the runs that clustered best among seeds of one
    # command line (selection.py, "Several seeds").
    consistency_loss = "c_aug"

    def __init__(self, cfg, device: torch.device, *, training: bool = True):
        """`training=False` (a model loaded for inference): the weights come from a file, so the networks
        are allocated but not initialised (methods.common.building), and there are no optimizers and no
        training handles."""
        s: SlcGANSettings = cfg.method_settings
        self.cfg, self.s, self.device = cfg, s, device
        self.real_batches_per_step = s.d_steps
        self.clusterer = "C_ema" if s.c_ema else "C"
        self.net_cfg = SlcGANConfig(image_size=cfg.image_size, clusters=cfg.clusters, z_dim=s.z_dim,
                                    ch=s.ch, embed_dim=s.embed_dim, c_width=s.c_width,
                                    c_spectral_norm=s.c_spectral_norm)
        with building(training):
            G, D, C = Generator(self.net_cfg), Discriminator(self.net_cfg), build_clusterer(self.net_cfg)
        self.G, self.D, self.C = (place(net, device, training) for net in (G, D, C))
        self.amp = resolve_precision(cfg.precision, device)
        self.assign_amp = None         # autocast dtype of `assign` (None: fp32); see rundir.load_model
        self.G_ema = None
        if s.ema:
            self.G_ema = copy.deepcopy(self.G).eval().requires_grad_(False)
        self.C_ema = copy.deepcopy(self.C).eval().requires_grad_(False) if s.c_ema else None
        if not training:
            return
        # What each network's own update step calls (DDP under torchrun, compiled on request).
        self.G_train = training_handle(self.G, cfg, device)
        self.D_train = training_handle(self.D, cfg, device)
        self.C_train = training_handle(self.C, cfg, device)
        self.opt_g = torch.optim.Adam(self.G.parameters(), lr=s.lr, betas=s.betas)
        self.opt_d = torch.optim.Adam(self.D.parameters(), lr=s.lr, betas=s.betas)
        self.opt_c = torch.optim.Adam(self.C.parameters(), lr=s.lr, betas=s.betas)

    # Everything a checkpoint or model file holds --------------------------------------------

    cache_size = staticmethod(cached_side)      # images are cached at image_size * load_ratio

    def networks(self) -> dict:
        nets = {"generator": self.G, "discriminator": self.D, "clusterer": self.C}
        if self.G_ema is not None:
            nets["generator_ema"] = self.G_ema
        if self.C_ema is not None:
            nets["clusterer_ema"] = self.C_ema
        return nets

    def optimizers(self) -> dict:
        return {"opt_g": self.opt_g, "opt_d": self.opt_d, "opt_c": self.opt_c}

    # Training --------------------------------------------------------------------------------

    def latents(self, batch: int, paired: bool = False):
        """Fresh z ~ N(0, I) (B, z_dim) and cluster codes k ~ uniform p_c (B,) with their one-hots (B, K).
        paired: sample i + B // 2 takes sample i's cluster (with its own z), for the mode-seeking term."""
        z = torch.randn(batch, self.s.z_dim, device=self.device)
        k = torch.randint(0, self.cfg.clusters, (batch,), device=self.device)
        if paired:
            half = batch // 2
            k[half:2 * half] = k[:half]
        return z, k, F.one_hot(k, self.cfg.clusters).float()

    def augmented_view(self, real: torch.Tensor) -> torch.Tensor:
        """T(x) of eq. 5: random resized crop, flip (unless slcgan.flip is false), colour jitter (the
        paper's cropping, colour jittering and flipping), drawn from the cached image, (B, 3, S, S)."""
        x = augment.random_resized_crop(real, self.cfg.image_size, scale=self.s.crop_scale)
        return augment.color_jitter(augment.random_flip(x) if self.s.flip else x)

    def d_step(self, real: torch.Tensor) -> dict:
        """Algorithm 1 lines 10-15 on one real batch (B, 3, S0, S0) in [-1, 1]; only D is updated."""
        batch = real.shape[0]
        x = augment.weak_view(real, self.cfg.image_size, flip=self.s.flip)   # (B, 3, S, S)
        with autocast(self.device, self.amp):
            with torch.no_grad():
                y_real = self.C(x).float().softmax(dim=1)                 # soft labels (B, K)
                z, _, c = self.latents(batch)
                x_fake = self.G(z, c)
            # D has no BatchNorm, so one pass over [real; fake] equals two (and runs one power iteration).
            u, s = self.D_train(torch.cat([x, x_fake.to(x.dtype)]), torch.cat([y_real, c]))
            (u_r, u_f), (s_r, s_f) = u.split(batch), s.split(batch)
            d_unary, d_joint = hinge_d_split(u_r, s_r, u_f, s_f)
            d_loss = self.s.w_adv * (d_unary + d_joint)
        self.opt_d.zero_grad(set_to_none=True)
        d_loss.backward()
        self.opt_d.step()
        return {"d_loss": d_loss.detach(), "d_unary": d_unary.detach(), "d_joint": d_joint.detach(),
                "d_real_u": u_r.detach().mean(), "d_fake_u": u_f.detach().mean()}

    def g_step(self, batch: int) -> dict:
        """Algorithm 1 lines 16-21: fresh z, c; adversarial terms + eq. 4 CE through C; only G is updated."""
        out = {}
        with autocast(self.device, self.amp):
            z, k, c = self.latents(batch, paired=bool(self.s.w_diversity))
            x_fake = self.G_train(z, c)
            u_f, s_f = self.D(x_fake, c)
            g_adv = hinge_g_split(u_f, s_f)                               # line 20: mean(-u_f - s_f)
            g_mi = F.cross_entropy(self.C(x_fake).float(), k)             # line 21, eq. 4
            g_loss = self.s.w_adv * g_adv + self.s.w_mi * g_mi
            if self.s.w_diversity:
                half = batch // 2
                g_div = mode_seeking_ratio(x_fake[:half], x_fake[half:2 * half], z[:half], z[half:2 * half])
                g_loss = g_loss + self.s.w_diversity / (g_div + 1e-5)
                out["g_div"] = g_div.detach()
        self.opt_g.zero_grad(set_to_none=True)
        # Gradients flow through D and C to G, but are accumulated into G's parameters only:
        # C is not updated by eq. 4 (the paper: better results, no shortcuts shared by G and C).
        g_loss.backward(inputs=list(self.G.parameters()))
        self.opt_g.step()
        self.update_ema()
        out.update(g_loss=g_loss.detach(), g_adv=g_adv.detach(), g_mi=g_mi.detach())
        return out

    def c_step(self, real: torch.Tensor) -> dict:
        """Algorithm 1 lines 22-28 on a real batch (B, 3, S0, S0); only C is updated."""
        x = augment.weak_view(real, self.cfg.image_size, flip=self.s.flip)
        x_t = self.augmented_view(real)
        with autocast(self.device, self.amp):
            logits = self.C_train(x).float()                              # (B, K) -> p
            logits_t = self.C_train(x_t).float()                          # (B, K) -> q; its own batch for BN
            with torch.no_grad():
                phi = self.D.features(x)                                  # (B, C_D): does not depend on C
            s_r = self.D.project(phi, logits.softmax(dim=1))              # line 24: joint term of real pairs
        c_adv = s_r.float().mean()                                        # line 27: C lowers D's score of real pairs
        # Line 28 / eq. 5: sum_j -q_j log p_j. The paper names no stop-gradient and Algorithm 1 takes
        # grad_theta_c of the whole sum, so by default both views get gradients (p is pulled towards q,
        # and q is sharpened towards p's mode: "the same pseudo-label for an image and its augmented
        # versions"). aug_detach_target=True reads eq. 5 as a cross-entropy with q as a fixed target.
        c_aug = multiview_consistency(logits, logits_t, detach_target=self.s.aug_detach_target)
        c_loss = self.s.w_adv * c_adv + self.s.w_aug * c_aug
        out = {}
        if self.s.w_balance:
            c_balance = marginal_entropy_gap(logits)                      # weak views only, as SCAN's anchors
            c_loss = c_loss + self.s.w_balance * c_balance
            out["c_balance"] = c_balance.detach()
        self.opt_c.zero_grad(set_to_none=True)
        c_loss.backward(inputs=list(self.C.parameters()))                 # D's embedding E is not updated
        self.opt_c.step()
        self.update_c_ema()
        with torch.no_grad():
            used = torch.zeros(self.cfg.clusters, device=self.device)
            used[logits.argmax(dim=1)] = 1
        out.update(c_loss=c_loss.detach(), c_adv=c_adv.detach(), c_aug=c_aug.detach(), clusters_in_batch=used.sum())
        return out

    def train_step(self, real_uint8: torch.Tensor) -> dict:
        """d_steps D steps (one real batch each), one G step, one C step; returns detached losses.

        real_uint8: (d_steps * B, S0, S0, 3), consecutive batches of B from the loop. C's step reuses the
        first D step's real images with fresh views (Algorithm 1 draws one more batch; we keep the loop's
        data budget at one batch per D step).
        """
        r = self.real_batches_per_step
        if real_uint8.shape[0] % r:
            raise ValueError(f"slcgan.train_step: expected {r} batches of equal size, got {real_uint8.shape[0]} images")
        self.G.train()
        self.D.train()
        self.C.train()
        real = augment.to_float(real_uint8).split(real_uint8.shape[0] // r)
        sums: dict[str, torch.Tensor] = {}
        for chunk in real:                                                # (1) D, d_steps times
            for key, value in self.d_step(chunk).items():
                sums[key] = sums[key] + value if key in sums else value
        out = {key: value / r for key, value in sums.items()}
        out.update(self.g_step(real[0].shape[0]))                         # (2) G
        out.update(self.c_step(real[0]))                                  # (3) C
        return out

    def update_ema(self) -> None:
        """G_ema <- decay * G_ema + (1 - decay) * G for parameters; buffers (BN statistics, spectral-norm
        vectors) are copied. Before ema_start G steps the copy just follows G (BigGAN's ema_start)."""
        if self.G_ema is None:
            return
        g_steps = optimizer_steps(self.opt_g, self.G)
        average_into(self.G_ema, self.G, self.s.ema_decay if g_steps > self.s.ema_start else 0.0)

    def update_c_ema(self) -> None:
        """C_ema <- decay * C_ema + (1 - decay) * C, decay min(c_ema_decay, (1 + n) / (10 + n)) after n C
        steps (early steps are averaged over fewer); buffers are copied."""
        if self.C_ema is None:
            return
        n = optimizer_steps(self.opt_c, self.C)
        average_into(self.C_ema, self.C, min(self.s.c_ema_decay, (1 + n) / (10 + n)))

    # Empty clusters (slcgan.split_empty) -------------------------------------------------------

    def after_step(self, step: int, data) -> str | None:
        """Called by the loop after each step with the training images (training.Batches); every
        split_every steps from split_start on, splits the largest clusters into the empty ones
        (SlcGANSettings.split_empty). Returns what it did, or None. It draws nothing from the global
        random generators, and changes nothing when no cluster is empty."""
        s = self.s
        if not s.split_empty or step < max(s.split_start, 1) or step % s.split_every:
            return None
        # A sample in random order, as training batches are (BatchNorm normalises each chunk: chunks of
        # one class, as a folder sorted by class would give, would hide what tells classes apart),
        # drawn from its own generator.
        idx = torch.randperm(len(data), generator=torch.Generator().manual_seed(step))[:split_sample(self.cfg.clusters)]
        features, labels = self._sample_features(data, idx)             # (N, F), (N,)
        counts = torch.bincount(labels, minlength=self.cfg.clusters)
        empty = (counts == 0).nonzero().flatten().tolist()
        moves = []
        for dead, donor in zip(empty, counts.argsort(descending=True).tolist()):
            halves = two_means(features[labels == donor])
            if halves is None or not self._split(dead, donor, *halves):
                break
            moves.append(f"empty cluster {dead} took half of cluster {donor}")
        if distributed.agree(int(bool(moves))):                           # rank 0's result everywhere
            distributed.broadcast_(list(self._split_tensors()))
        return "; ".join(moves) or None

    @torch.no_grad()
    def _sample_features(self, data, idx: torch.Tensor):
        """C's input to its last layer and its argmax over the images `idx`, in chunks of about the
        batch size with BatchNorm in batch mode (as C labels images in training) and everything else
        in eval mode (no spectral-norm power iteration); BatchNorm's running statistics are restored."""
        C = self.C
        saved = {k: v.clone() for k, v in C.state_dict().items() if "running_" in k or "num_batches" in k}
        C.eval()
        for m in C.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.train()
        captured = []
        hook = C.fc.register_forward_hook(lambda module, inputs, output: captured.append(inputs[0].float()))
        labels = []
        try:
            for chunk in idx.tensor_split(max(1, -(-len(idx) // self.cfg.batch_size))):
                with autocast(self.device, self.amp):
                    labels.append(C(self.eval_view(data.get(chunk))).float().argmax(dim=1))
        finally:
            hook.remove()
            C.load_state_dict(saved, strict=False)
            C.train()
        return torch.cat(captured), torch.cat(labels)

    @torch.no_grad()
    def _split(self, dead: int, donor: int, m1: torch.Tensor, m2: torch.Tensor) -> bool:
        """C's rows of `dead` and `donor` become w +- dw, b +- db (w, b: the donor's), so that
        logit_dead - logit_donor = 2 (dw . f + db) is SPLIT_MARGIN at the feature mean m1 of one half,
        -SPLIT_MARGIN at m2 of the other, and 0 half-way; dw is at most as long as w. G's and D's
        embeddings of `dead`, and the Adam moments of every row changed, become copies of the donor's.

        With spectral norm on C's last layer its weight is divided by its largest singular value
        sigma, which the new rows change: every bias is divided by the new sigma as well, so each
        image's logits are those wanted, scaled by one number (the same argmax). The new sigma is
        computed exactly and the power iteration's vectors are set to the new singular vectors: with
        the stored vectors' estimate, which the new rows can make far too small, the biases grew with
        every split until they decided every image (one MNIST run collapsed to one cluster)."""
        fc = self.C.fc
        weight = _raw(fc, "weight")
        fc.eval()                                                          # no power iteration here
        w_eff = fc.weight.float()                                          # after spectral norm, if any
        fc.train()
        w, b = w_eff[donor].clone(), fc.bias[donor].float().clone()
        alpha = 2 * SPLIT_MARGIN / (m1 - m2).pow(2).sum()
        dw = alpha / 2 * (m1 - m2)
        db = -alpha / 4 * (m1.pow(2).sum() - m2.pow(2).sum())
        shrink = min(1.0, (w.norm() / dw.norm()).item())
        w_new, b_new = w_eff.clone(), fc.bias.float().clone()
        w_new[dead], w_new[donor] = w + dw * shrink, w - dw * shrink
        b_new[dead], b_new[donor] = b + db * shrink, b - db * shrink
        if torch.nn.utils.parametrize.is_parametrized(fc, "weight"):      # spectral norm: raw = effective * sigma
            sn = fc.parametrizations.weight[0]
            sigma_old = (weight.float().norm() / w_eff.norm()).item()
            left, sigmas, right = torch.linalg.svd(w_new, full_matrices=False)
            if not sigmas[0] > 0:
                return False
            weight.copy_(w_new * sigma_old)
            fc.bias.copy_(b_new / sigmas[0])
            sn._u.copy_(left[:, 0])                                        # the power iteration's vectors,
            sn._v.copy_(right[0])                                          # so its sigma is the exact one
        else:
            weight.copy_(w_new)
            fc.bias.copy_(b_new)
        _copy_moments(self.opt_c, weight, 0, donor, dead)
        _copy_moments(self.opt_c, fc.bias, 0, donor, dead)
        for net, opt in ((self.G, self.opt_g), (self.D, self.opt_d)):
            embed = _raw(net.embed, "weight")                              # (out, K): one column per cluster
            embed[:, dead] = embed[:, donor]
            _copy_moments(opt, embed, 1, donor, dead)
        if self.G_ema is not None:
            self.G_ema.embed.weight[:, dead] = self.G_ema.embed.weight[:, donor]
        if self.C_ema is not None:
            self.C_ema.load_state_dict(self.C.state_dict())
        return True

    def _split_tensors(self):
        """Every tensor a split changes: the parameters above, spectral norm's vectors and the Adam moments."""
        params = [_raw(self.C.fc, "weight"), self.C.fc.bias, _raw(self.G.embed, "weight"), _raw(self.D.embed, "weight")]
        yield from params
        if torch.nn.utils.parametrize.is_parametrized(self.C.fc, "weight"):
            sn = self.C.fc.parametrizations.weight[0]
            yield from (sn._u, sn._v)                                      # set by the split, not synchronised
        for opt in self.optimizers().values():
            for p in params:
                for key in ("exp_avg", "exp_avg_sq"):
                    if key in opt.state.get(p, {}):
                        yield opt.state[p][key]
        if self.G_ema is not None:
            yield self.G_ema.embed.weight
        if self.C_ema is not None:
            yield from self.C_ema.state_dict().values()

    # Inference -------------------------------------------------------------------------------

    def eval_view(self, real_uint8: torch.Tensor) -> torch.Tensor:
        return eval_view(real_uint8, self.cfg.image_size)

    def recalibrate(self, batches) -> None:
        """Re-estimate C's BatchNorm statistics on real images alone: during training they mix real weak
        views, augmented views and fakes (the eq. 4 pass), and at inference C sees real images only."""
        if self.s.recalibrate_bn:
            recalibrate_batchnorm(getattr(self, self.clusterer), (self.eval_view(b.to(self.device)) for b in batches))

    @torch.no_grad()
    def probabilities(self, real_uint8: torch.Tensor) -> torch.Tensor:
        """softmax(C(x)) (B, K) of real images (B, S0, S0, 3) uint8, in eval mode (C_ema's when kept)."""
        net = getattr(self, self.clusterer)
        net.eval()
        with autocast(self.device, self.assign_amp):
            return net(self.eval_view(real_uint8.to(self.device))).float().softmax(dim=1)

    def assign(self, real_uint8: torch.Tensor):
        """Cluster = argmax of C's (or C_ema's) logits; confidence = max softmax."""
        conf, cluster = self.probabilities(real_uint8).max(dim=1)
        return cluster, conf

    @torch.no_grad()
    def generate(self, clusters: torch.Tensor, z: torch.Tensor | None = None) -> torch.Tensor:
        """Images (B, 3, S, S) in [-1, 1] of the given clusters (one-hot codes); the EMA G when kept.
        z (B, z_dim) is drawn from the global RNG when not given."""
        g = self.G_ema if self.G_ema is not None else self.G
        was_training = g.training
        g.eval()
        if z is None:
            z = torch.randn(clusters.shape[0], self.s.z_dim, device=self.device)
        images = g(z, F.one_hot(clusters.to(self.device), self.cfg.clusters).float())
        g.train(was_training)
        return images


# How many images of the folder `after_step` labels (at least SPLIT_SAMPLE, and SPLIT_PER_CLUSTER per
# cluster: with K = 400, 2,048 images would find about 2 of 400 equal clusters empty at every check, and
# a cluster of a quarter of that share empty at one check in four, and split them), and the logit margin
# of a split (about 7:1 odds between the two halves at their means).
SPLIT_SAMPLE = 2048
SPLIT_PER_CLUSTER = 32
SPLIT_MARGIN = 2.0


def split_sample(clusters: int) -> int:
    """The number of images an empty-cluster check labels: 2,048 up to K = 64, 32 per cluster above
    (a cluster of 1/(4K) of the images is then missed with odds of about e^-8)."""
    return max(SPLIT_SAMPLE, SPLIT_PER_CLUSTER * clusters)


def two_means(features: torch.Tensor, iterations: int = 20):
    """The means (m1, m2) of the two groups 2-means finds in `features` (n, F), the larger group's
    first; started from the sign of the first principal component. None when n < 2 or the groups
    cannot be told apart."""
    if features.shape[0] < 2:
        return None
    centred = features - features.mean(dim=0)
    direction = torch.linalg.svd(centred, full_matrices=False).Vh[0]
    side = centred @ direction > 0                                        # True: group 1
    for _ in range(iterations):
        if side.all() or not side.any():
            return None
        m1, m2 = features[side].mean(dim=0), features[~side].mean(dim=0)
        new_side = (features - m1).pow(2).sum(dim=1) < (features - m2).pow(2).sum(dim=1)
        if torch.equal(new_side, side):
            break
        side = new_side
    if side.all() or not side.any():
        return None
    m1, m2 = features[side].mean(dim=0), features[~side].mean(dim=0)
    if torch.equal(m1, m2):
        return None
    return (m1, m2) if side.sum() * 2 >= len(side) else (m2, m1)


def _raw(module: torch.nn.Module, name: str) -> torch.Tensor:
    """The stored parameter behind `module.<name>`: its original under a parametrization (spectral norm)."""
    if torch.nn.utils.parametrize.is_parametrized(module, name):
        return getattr(module.parametrizations, name).original
    return getattr(module, name)


def _copy_moments(opt, param: torch.Tensor, dim: int, src: int, dst: int) -> None:
    """Adam's moments of `param` at index `dst` along `dim` set to those at `src` (nothing before the
    first step)."""
    state = opt.state.get(param, {})
    for key in ("exp_avg", "exp_avg_sq"):
        if key in state:
            state[key].select(dim, dst).copy_(state[key].select(dim, src))
