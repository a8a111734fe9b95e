"""Which weights model.safetensors holds: label-free model selection.

The papers picked their checkpoints by test accuracy; a user has no labels. At every regular
checkpoint, a copy of the clustering network (BatchNorm re-estimated on real images, as for the final
model) assigns a fixed probe set of real images, and the cluster balance is measured:

    balance = entropy of the cluster sizes / log K     (1: every cluster equally used, 0: one cluster)

The inference weights of the best-balanced checkpoint so far are kept in checkpoint/best-model.safetensors.
At the end model.safetensors holds them only if the last step's clusters have collapsed against them:
if they use COLLAPSE times as many clusters, counted as the effective number K ** balance (the
exponential of the entropy); else the last step's weights. `select_model: last` turns this off.

Why balance: over the training of C3-GAN and slcGAN on 2,000 MNIST images (tests/bench/selection.py,
results in tests/bench/RESULTS.md) it had the highest rank correlation with accuracy of the signals
tried (Spearman 0.84 and 0.82; also tried: agreement under augmentation, mean confidence, assignment
stability between checkpoints, and products of these), and picking by it (before the margin below)
never chose a worse checkpoint than the last one (C3-GAN: the last one; slcGAN: the most accurate one,
ACC 0.294 against 0.253 for the last). The failure it guards against is the one these runs show:
clusters merging late in training. It cannot tell a good balanced clustering from a bad balanced one;
the choice is reported so a user can override it.

Why the margin: over eight 3,200-step slcGAN runs on 10,000 MNIST images and the 600-step run above,
an earlier checkpoint was better balanced than the last step eight times (tests/bench/RESULTS.md,
"Which checkpoint"). Where the last step had collapsed (1.8x and 4.0x fewer effective clusters) the
earlier checkpoint scored higher; where the two were within 1.11x (one cluster of ten merged, or less)
the last step scored higher ACC in 4 of 6 (+0.030 on average) and higher NMI in 5 of 6. The margin was
1.25 from then until 29 later runs on MNIST, Fashion-MNIST and CIFAR-10 were rated the same way
(RESULTS.md, "Which checkpoint, again"): where the two differed by under 1.07x (22 runs) neither won on
ACC (the last step higher in 10, lower in 12, mean difference under 0.001) and the last step won NMI 14
to 8; between 1.1x and 1.4x one run went each way and one was level, and at 1.40x the 1.25 margin kept
a checkpoint 0.10 ACC and 0.25 NMI below the last step. No margin separates every run now; 1.5 (a third
of the clusters lost) makes no choice worse than 1.25 did on any run measured and one better, and still
replaces the 1.8x and 4.0x collapses.

The probe uses no random numbers, so exact resume is unaffected.

Several seeds: balance cannot rank balanced runs against each other. Between runs of one command line
that differ only in --seed, the mean of the method's consistency loss (slcGAN: c_aug, eq. 5, how much an
augmentation moves an image's clusters) over the WINDOW steps up to the step model.safetensors holds did:
over eleven MNIST runs of slcgan-32-cpu with flips off and spectral norm in C (tests/bench/RESULTS.md,
"picking a seed without labels"), the lowest c_aug among the runs within 0.05 of the best balance kept
mean ACC 0.797 from two seeds and 0.844 from three, against 0.712 for one seed, and the best run of every
pair and triple of the four seeds trained after the rule was fixed. `train` reports both figures.
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import numpy as np
import torch

from imgcluster.checkpoint import CheckpointError, atomic_write_bytes, read_metadata
from imgcluster.rundir import RunDir, save_model

PROBE_IMAGES = 2048
SELECTIONS = ("balance", "last")
COLLAPSE = 1.5       # effective clusters of an earlier checkpoint over the last step's for it to replace it
WINDOW = 500         # steps over which the consistency loss is averaged


def balance(clusters: torch.Tensor, k: int) -> float:
    """Entropy of the cluster sizes of `clusters` (indices) over log k: 1 = uniform, 0 = one cluster."""
    p = torch.bincount(clusters.cpu(), minlength=k).double()
    p = p[p > 0] / p.sum()
    return float(-(p * p.log()).sum() / math.log(k))


def collapsed(last: float, earlier: float, k: int) -> bool:
    """Whether balance `last` has COLLAPSE times fewer effective clusters (k ** balance) than `earlier`."""
    return (earlier - last) * math.log(k) > math.log(COLLAPSE)


def recent_mean(metrics: Path, key: str, step: int, window: int = WINDOW) -> float | None:
    """Mean of `key` over the rows of metrics.jsonl logged at steps step - window + 1 .. step; None when
    no such row has it (or there is no file). Unreadable lines (a write cut short) are skipped."""
    values = []
    try:
        lines = metrics.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        return None
    for line in lines:
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict) and key in row and step - window < row.get("step", -1) <= step:
            values.append(float(row[key]))
    return sum(values) / len(values) if values else None


def inference_copy(method, batches):
    """A copy of `method` for inference whose clustering network is a recalibrated deep copy; the live
    networks (and their BatchNorm statistics) are untouched. Other networks are shared, not copied."""
    shadow = copy.copy(method)
    setattr(shadow, method.clusterer, copy.deepcopy(getattr(method, method.clusterer)))
    shadow.recalibrate(batches)
    return shadow


class Selector:
    """Keeps the best-balanced checkpoint's weights; decides what model.safetensors holds (rank 0)."""

    def __init__(self, cfg, run: RunDir, data, start: int):
        self.cfg, self.run, self.data = cfg, run, data
        self.enabled = cfg.select_model == "balance"
        n = len(data)
        self.probe = torch.from_numpy(np.linspace(0, n - 1, min(n, PROBE_IMAGES)).round().astype(np.int64))
        self.best = None                     # (score, step) of best-model.safetensors
        if not start:
            run.best_model.unlink(missing_ok=True)
        elif run.best_model.exists():
            try:
                meta = read_metadata(run.best_model)
                if int(meta["step"]) <= start:   # a file newer than the checkpoint belongs to lost steps
                    self.best = (float(meta["cluster_balance"]), int(meta["step"]))
            except (CheckpointError, KeyError, ValueError):
                pass

    def _batches(self):
        for chunk in self.probe.split(self.cfg.batch_size):
            yield self.data.get(chunk)

    def score(self, method) -> float:
        """Balance of the probe set's clusters under `method` as it is (already recalibrated)."""
        clusters = torch.cat([method.assign(b)[0] for b in self._batches()])
        return balance(clusters, self.cfg.clusters)

    def consider(self, method, step: int) -> None:
        """At a regular checkpoint: rate the current weights, keep them if they are the best so far."""
        if not self.enabled:
            return
        shadow = inference_copy(method, self._batches())
        value = self.score(shadow)
        if self.best is None or value >= self.best[0]:
            save_model(self.run, shadow, self.cfg, step, path=self.run.best_model,
                       extra={"cluster_balance": round(value, 6)})
            self.best = (value, step)

    def finish(self, method, step: int) -> dict:
        """Write model.safetensors from the final (recalibrated) `method`, or keep the best checkpoint's
        weights when the last step's clusters have collapsed against them. Returns what it chose, and
        the best checkpoint (best_step, best_balance) when there is one, and the mean of the method's
        consistency loss over the WINDOW steps up to the step it holds (consistency: loss, mean, first_step,
        last_step; None without one)."""
        value = self.score(method)
        save_model(self.run, method, self.cfg, step, extra={"cluster_balance": round(value, 6)})
        chosen = {"step": step, "cluster_balance": value, "last_step": step, "last_balance": value}
        if self.enabled and self.best is not None:
            chosen.update(best_step=self.best[1], best_balance=self.best[0])
            if collapsed(value, self.best[0], self.cfg.clusters):
                atomic_write_bytes(self.run.model, self.run.best_model.read_bytes())
                chosen.update(step=self.best[1], cluster_balance=self.best[0])
        key = getattr(method, "consistency_loss", None)
        mean = recent_mean(self.run.metrics, key, chosen["step"]) if key else None
        chosen["consistency"] = None if mean is None else {
            "loss": key, "mean": mean, "first_step": max(1, chosen["step"] - WINDOW + 1), "last_step": chosen["step"]}
        return chosen
