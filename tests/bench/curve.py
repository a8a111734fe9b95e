"""Learning curve against labels: train in-process and score ACC / NMI on the labelled set every N steps.

Run by hand, not by pytest; for tuning presets (how fast a configuration learns), not for the headline
table (tests/bench/quality.py runs the real command line). Example:

    OMP_NUM_THREADS=1 python tests/bench/curve.py --set mnist --prefix test_ --preset slcgan-32-cpu \\
        --every 500 --minutes 15 --set-option slcgan.lr=0.0002

Each score re-estimates BatchNorm statistics on a copy of the clustering network (as `train` does before
assigning; selection.inference_copy) and assigns every image, so scoring does not change the run.
Prints one line per score.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from quality import folder_labels, unpack
from imgcluster import metrics
from imgcluster.config import load_preset, parse_overrides, resolve_config
from imgcluster.data import load_image_set, scan_folder
from imgcluster.methods import METHODS
from imgcluster.selection import inference_copy
from imgcluster.training import Batches, step_indices


def score(method, data: Batches, labels: list[str], clusters: int) -> dict:
    shadow = inference_copy(method, data.in_order(256))       # the live networks stay as they are
    assigned = torch.cat([shadow.assign(b)[0] for b in data.in_order(512)]).tolist()
    return metrics.evaluate(labels, assigned, clusters)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--set", dest="dataset", default="mnist", help="a ../shared/data archive name")
    ap.add_argument("--folder", type=Path, help="a labelled folder (one sub-folder per class) instead of --set")
    ap.add_argument("--prefix", default="test_", help="only files whose name starts with this")
    ap.add_argument("--limit", type=int, default=0, help="a random subset of this many files (0: all)")
    ap.add_argument("--preset", default="slcgan-32-cpu")
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--clusters", type=int, default=10)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps", type=int, default=None, help="[default: the preset's]")
    ap.add_argument("--every", type=int, default=500, help="steps between scores")
    ap.add_argument("--minutes", type=float, default=None, help="stop (with a score) after this long")
    ap.add_argument("--set-option", dest="options", action="append", default=[], help="key=value, as train --set")
    ap.add_argument("--work", type=Path, default=Path.home() / ".cache" / "imgcluster-bench")
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    a = ap.parse_args()

    folder = a.folder or unpack(a.dataset, a.prefix, a.work / f"{a.dataset}-{a.prefix or 'all'}")
    flags = {"image_size": a.size, "clusters": a.clusters, "seed": a.seed}
    if a.steps:
        flags["steps"] = a.steps
    cfg = resolve_config((load_preset(a.preset), a.preset), (flags, "flags"), (parse_overrides(a.options), "--set"))
    method_class = METHODS[cfg.method]
    files = scan_folder(folder)
    if a.limit:
        files = sorted(np.random.default_rng(0).choice(files, a.limit, replace=False).tolist())
    images = load_image_set(folder, method_class.cache_size(cfg), files=files)
    all_labels = folder_labels(images.files)
    labels = [all_labels[i] for i in images.good_indices]
    print(f"# {a.folder or a.dataset} {len(labels)} images; {cfg.to_dict()}", flush=True)

    torch.manual_seed(cfg.seed)
    device = torch.device(a.device)
    method = method_class(cfg, device)
    data = Batches(images, device)
    per_step = getattr(method, "real_batches_per_step", 1)
    t0, sums, count = time.perf_counter(), {}, 0
    for step in range(1, cfg.steps + 1):
        out = method.train_step(data.get(step_indices(step - 1, len(data), cfg.batch_size, cfg.seed, per_step)))
        for key, value in out.items():                    # tensors: read back only when printed
            sums[key] = sums[key] + value if key in sums else value
        count += 1
        over = a.minutes is not None and time.perf_counter() - t0 > a.minutes * 60
        if step % a.every == 0 or step == cfg.steps or over:
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            train_s = time.perf_counter() - t0
            r = score(method, data, labels, cfg.clusters)
            losses = " ".join(f"{k} {float(v) / count:.3f}" for k, v in sums.items())
            print(f"step {step} minutes {train_s / 60:.1f} acc {r['acc']:.3f} nmi {r['nmi']:.3f} "
                  f"used {r['clusters_used']} | {losses}", flush=True)
            t0 += time.perf_counter() - t0 - train_s          # scoring time does not count
            sums, count = {}, 0
            if over:
                break


if __name__ == "__main__":
    main()
