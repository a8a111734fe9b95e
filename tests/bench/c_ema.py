"""C against its moving average C_ema (slcgan.c_ema) on finished slcGAN runs, scored against the labels.

Run by hand, not by pytest, on run directories of a labelled folder (one sub-folder per class, as
tests/bench/quality.py trains on) that were trained with --set slcgan.c_ema=true and still hold their
checkpoint:

    python tests/bench/c_ema.py ~/.cache/imgcluster-bench/runs/mnist-*-cema-*

For each run, from checkpoint/state.safetensors (the last step): C and C_ema, each with its BatchNorm
statistics re-estimated on the images as `assign` has them, their balance on the selector's probe set,
and ACC / NMI on every image. Training does not depend on C_ema, so C here is the network a run without
the average ends with. Prints one JSON line per run and a Markdown table.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from curve import score
from quality import folder_labels
from imgcluster.data import load_image_set, scan_folder
from imgcluster.methods import METHODS
from imgcluster.rundir import RunDir, load_config, read_config
from imgcluster.selection import Selector, inference_copy
from imgcluster.training import Batches, load_checkpoint


def rate(run: Path) -> dict:
    rd = RunDir(run)
    cfg = load_config(rd)
    if cfg.method != "slcgan" or not cfg.method_settings.c_ema:
        raise SystemExit(f"{run}: not an slcGAN run trained with slcgan.c_ema=true")
    folder = Path(read_config(rd)["data_dir"])
    method = METHODS[cfg.method](cfg, torch.device("cpu"))
    step = load_checkpoint(rd, method, torch.device("cpu"))
    images = load_image_set(folder, method.cache_size(cfg), files=scan_folder(folder))
    every = folder_labels(images.files)
    labels = [every[i] for i in images.good_indices]
    data = Batches(images, torch.device("cpu"))
    selector = Selector(cfg, rd, data, start=step)            # start > 0: reads, never deletes, best-model
    out = {"run": run.name, "step": step}
    for name in ("C", "C_ema"):
        method.clusterer = name
        found = score(method, data, labels, cfg.clusters)
        out[name] = {"balance": round(selector.score(inference_copy(method, selector._batches())), 4),
                     "acc": found["acc"], "nmi": round(found["nmi"], 4), "clusters_used": found["clusters_used"]}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", type=Path)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    for run in args.runs:
        rows.append(rate(run))
        print(json.dumps(rows[-1]), flush=True)
    print("\n| run | step | C: balance, ACC / NMI, clusters used | C_ema: balance, ACC / NMI, clusters used |\n"
          "| --- | --- | --- | --- |")
    cell = lambda r: f"{r['balance']:.3f}, {r['acc']:.3f} / {r['nmi']:.3f}, {r['clusters_used']}"
    for r in rows:
        print(f"| {r['run']} | {r['step']} | {cell(r['C'])} | {cell(r['C_ema'])} |")


if __name__ == "__main__":
    main()
