"""Argmax against a balanced assignment, on finished slcGAN runs (no training).

Run by hand, not by pytest:

    python tests/bench/balanced_assign.py RUN_DIR [RUN_DIR ...]

`assign` puts each image in argmax C(x), which leaves a cluster empty when C never ranks it first. slcGAN
draws its cluster codes uniformly, so a balanced reading of C's outputs fits the model's own prior: here
Sinkhorn-Knopp (as in SeLa and SwAV) rescales C's probabilities over all the run's images so that every
cluster takes 1/K of them and every image sums to 1, and each image takes its largest rescaled entry.

The run's own images (config.yaml's data_dir) are scored against their labels, the name of each image's
parent folder (the layout `tests/bench/quality.py` unpacks). One Markdown row per run: ACC, NMI and
clusters used for argmax (what `assign` writes) and for the balanced assignment.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from quality import folder_labels
from imgcluster import metrics
from imgcluster.inference import Upload, set_batches
from imgcluster.pipeline import cache_size, prepare_images
from imgcluster.rundir import RunDir, load_model


def sinkhorn(log_probs: torch.Tensor, iterations: int) -> torch.Tensor:
    """(N, K) log-probabilities -> (N, K) with every row summing to 1 and every column to N / K."""
    q = (log_probs.double() - log_probs.max()).exp()
    n, k = q.shape
    for _ in range(iterations):
        q /= q.sum(dim=0, keepdim=True) * k
        q /= q.sum(dim=1, keepdim=True) * n
    return q * n


def log_probs_of(method, images, batch_size: int = 500) -> torch.Tensor:
    """log softmax(C(x)) over the usable cached images, as `assign` computes its argmax."""
    batches = set_batches(images, batch_size, Upload(method.device))
    return torch.cat([method.probabilities(b.pixels).log() for b in batches if b.pixels is not None])


def score(run_dir: Path, iterations: int) -> dict:
    cfg, method = load_model(RunDir(run_dir), torch.device("cpu"))
    if cfg.method != "slcgan":
        raise SystemExit(f"{run_dir}: a {cfg.method} run; this compares slcGAN's argmax C(x) only")
    images = prepare_images(Path(cfg.data_dir), cache_size(cfg))
    labels = folder_labels([images.files[i] for i in images.good_indices])
    log_probs = log_probs_of(method, images)
    argmax = log_probs.argmax(dim=1).numpy()
    balanced = sinkhorn(log_probs, iterations).argmax(dim=1).numpy()
    return {name: metrics.evaluate(labels, clusters, cfg.clusters)
            for name, clusters in (("argmax", argmax), ("balanced", balanced))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--iterations", type=int, default=50, help="Sinkhorn-Knopp iterations")
    args = parser.parse_args()
    print("| run | argmax: ACC / NMI / clusters used | balanced: ACC / NMI / clusters used |")
    print("| --- | --- | --- |")
    for run_dir in args.runs:
        result = score(run_dir, args.iterations)
        cells = [f"{r['acc']:.3f} / {r['nmi']:.3f} / {r['clusters_used']}" for r in result.values()]
        print(f"| {run_dir.name} | {' | '.join(cells)} |", flush=True)


if __name__ == "__main__":
    main()
