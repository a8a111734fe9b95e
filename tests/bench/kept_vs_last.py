"""Label-free model selection on finished runs: the best-balanced checkpoint against the last step.

Run by hand, not by pytest, on run directories of a labelled folder (one sub-folder per class, as
tests/bench/quality.py trains on) that still hold their checkpoint:

    python tests/bench/kept_vs_last.py ~/.cache/imgcluster-bench/runs/mnist-*

For each run: the last step (checkpoint/state.safetensors), rated as the selector rates it (balance of
the probe set after BatchNorm re-estimation) and scored against the labels on every image; the best-
balanced checkpoint (checkpoint/best-model.safetensors), with its balance and scores; the ratio of their
effective cluster counts (K ** balance) and what imgcluster.selection keeps by it. Prints one JSON line
per run and a Markdown table.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from curve import score
from quality import folder_labels
from imgcluster import metrics
from imgcluster.checkpoint import read_metadata
from imgcluster.data import load_image_set, scan_folder
from imgcluster.methods import METHODS
from imgcluster.rundir import RunDir, load_config, load_model, read_config
from imgcluster.selection import COLLAPSE, Selector, collapsed, inference_copy
from imgcluster.training import Batches, load_checkpoint


def scores_of_file(rd: RunDir, path: Path, data: Batches, labels: list[str]) -> dict:
    """ACC / NMI of the inference weights in `path` (a model file: BatchNorm already re-estimated), in fp32."""
    cfg, method = load_model(rd, torch.device("cpu"), "fp32", path=path)
    assigned = torch.cat([method.assign(b)[0] for b in data.in_order(512)]).tolist()
    return metrics.evaluate(labels, assigned, cfg.clusters)


def last_step(run: Path):
    """A finished run's last step on the CPU, with its labelled training images: (rd, cfg, method, step,
    data, labels, selector); the selector rates as `train` does and never deletes best-model."""
    rd = RunDir(run)
    cfg = load_config(rd)
    folder = Path(read_config(rd)["data_dir"])
    method = METHODS[cfg.method](cfg, torch.device("cpu"))
    step = load_checkpoint(rd, method, torch.device("cpu"))
    images = load_image_set(folder, method.cache_size(cfg), files=scan_folder(folder))
    every = folder_labels(images.files)
    labels = [every[i] for i in images.good_indices]
    data = Batches(images, torch.device("cpu"))
    selector = Selector(cfg, rd, data, start=step)            # start > 0: reads, never deletes, best-model
    return rd, cfg, method, step, data, labels, selector


def rate_all(doc: str, rate) -> list[dict]:
    """The command line of a script that rates run directories (`doc` its help): rate(run) for each run
    named, on --threads CPU threads, each row printed as a JSON line as it comes."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", type=Path)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    for run in args.runs:
        rows.append(rate(run))
        print(json.dumps(rows[-1]), flush=True)
    return rows


def rate(run: Path) -> dict:
    rd, cfg, method, step, data, labels, selector = last_step(run)
    last_balance = selector.score(inference_copy(method, selector._batches()))
    last = score(method, data, labels, cfg.clusters)
    out = {"run": run.name, "clusters": cfg.clusters, "last_step": step, "last_balance": round(last_balance, 4),
           "last_acc": last["acc"], "last_nmi": round(last["nmi"], 4)}
    if rd.best_model.exists():
        meta = read_metadata(rd.best_model)
        best_balance = float(meta["cluster_balance"])
        best = scores_of_file(rd, rd.best_model, data, labels)
        out.update(best_step=int(meta["step"]), best_balance=round(best_balance, 4), best_acc=best["acc"],
                   best_nmi=round(best["nmi"], 4),
                   effective_ratio=round(cfg.clusters ** (best_balance - last_balance), 3),
                   keeps="best" if collapsed(last_balance, best_balance, cfg.clusters) else "last")
    return out


def main() -> None:
    rows = rate_all(__doc__, rate)
    print(f"\n| run | last step: balance, ACC / NMI | best-balanced checkpoint: step, balance, ACC / NMI "
          f"| effective clusters, best / last | kept (margin {COLLAPSE}) |\n| --- | --- | --- | --- | --- |")
    for r in rows:
        best = (f"{r['best_step']}, {r['best_balance']:.3f}, {r['best_acc']:.3f} / {r['best_nmi']:.3f}"
                if "best_step" in r else "none")
        print(f"| {r['run']} | {r['last_balance']:.3f}, {r['last_acc']:.3f} / {r['last_nmi']:.3f} | {best} "
              f"| {r.get('effective_ratio', '-')} | {r.get('keeps', 'last')} |")


if __name__ == "__main__":
    main()
