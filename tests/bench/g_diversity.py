"""Does the generator use its noise? Within-cluster diversity of a finished run's samples.

Run by hand, not by pytest:

    python tests/bench/g_diversity.py RUN_DIR [RUN_DIR ...]

For each run directory, the saved generator (model.safetensors; the EMA copy when the run kept one, as
`imgcluster generate` uses) draws --per-cluster images of every cluster from fixed z ~ N(0, I) in eval
mode, as `generate` does. Printed per run, as a Markdown row:

- within: the pixel standard deviation across z inside one cluster, averaged over pixels and clusters;
- overall: the pixel standard deviation over all the samples;
- ratio within / overall: near 0 when G ignores z (every image of a cluster row is the same picture),
  near 1 when a cluster varies as much as the whole set;
- flat clusters: how many clusters have a within-cluster deviation under a tenth of the overall one.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from imgcluster.rundir import RunDir, load_model


@torch.no_grad()
def diversity(run_dir: Path, per_cluster: int, seed: int) -> dict:
    cfg, method = load_model(RunDir(run_dir), torch.device("cpu"), "fp32")
    k = cfg.clusters
    torch.manual_seed(seed)
    clusters = torch.arange(k).repeat_interleave(per_cluster)
    images = method.generate(clusters).float().view(k, per_cluster, -1)   # (K, n, 3*S*S)
    within = images.std(dim=1).mean(dim=1)                                 # (K,)
    overall = images.reshape(k * per_cluster, -1).std(dim=0).mean()
    return {"within": within.mean().item(), "overall": overall.item(),
            "ratio": (within.mean() / overall).item(), "flat": int((within < 0.1 * overall).sum()), "k": k}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", type=Path, help="run directories of finished `imgcluster train` runs")
    ap.add_argument("--per-cluster", type=int, default=16, help="samples per cluster [default: 16]")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    print("| run | within | overall | within / overall | flat clusters |")
    print("| --- | --- | --- | --- | --- |")
    for run in args.runs:
        d = diversity(run, args.per_cluster, args.seed)
        print(f"| {run.name} | {d['within']:.3f} | {d['overall']:.3f} | {d['ratio']:.2f} | {d['flat']} of {d['k']} |")


if __name__ == "__main__":
    main()
