"""`assign` in bf16 against fp32: how much faster the model runs, and which clusters change.

Run by hand, not by pytest:

    python tests/bench/assign_precision.py RUN_DIR [RUN_DIR ...]
    python tests/bench/assign_precision.py RUN_DIR --no-agreement       # speed only

For each trained run directory:

1. Speed of the model alone: `method.assign` on one batch of 256 random cached-size images, fp32 and
   bf16 autocast interleaved (4 rounds of 8 batches each), on 1 and on 2 threads; the fastest round of
   each is reported, as seconds per 10,000 images, and fp32 / bf16.
2. Agreement: `imgcluster assign RUN_DIR --precision fp32` and `--precision bf16` on the run's training
   folder; the share of images whose cluster is the same, the highest fp32 confidence among those that
   changed, the largest change of a confidence, and, where the folder's subfolders are the classes,
   `imgcluster evaluate --labels-from-folders` of both (ACC, NMI).

Prints a Markdown table of each.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def model_speed(run: Path, threads: int, rounds: int = 4, batches: int = 8) -> dict:
    import torch

    from imgcluster.rundir import RunDir, load_model

    torch.set_num_threads(threads)
    methods = {p: load_model(RunDir(run), torch.device("cpu"), p)[1] for p in ("fp32", "bf16")}
    cfg = methods["fp32"].cfg
    side = type(methods["fp32"]).cache_size(cfg)
    x = torch.randint(0, 256, (256, side, side, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    best = {}
    for _ in range(rounds):
        for precision, method in methods.items():
            method.assign(x)                                   # warm-up (oneDNN picks its kernels)
            t = time.perf_counter()
            for _ in range(batches):
                method.assign(x)
            per_10k = (time.perf_counter() - t) / (batches * 256) * 10_000
            best[precision] = min(best.get(precision, float("inf")), per_10k)
    return best


def assign_csv(run: Path, precision: str, out: Path) -> list[dict]:
    subprocess.run([sys.executable, "-m", "imgcluster", "assign", str(run), "--precision", precision, "-o", str(out),
                    "--quiet"], check=True)
    with open(out, newline="") as f:
        return list(csv.DictReader(f))


def scores(path: Path) -> dict | None:
    out = subprocess.run([sys.executable, "-m", "imgcluster", "evaluate", str(path), "--labels-from-folders",
                          "--json"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    return json.loads(out.stdout) if out.returncode == 0 else None


def agreement(run: Path, work: Path) -> dict:
    fp32 = assign_csv(run, "fp32", work / "fp32.csv")
    bf16 = assign_csv(run, "bf16", work / "bf16.csv")
    assert [r["path"] for r in fp32] == [r["path"] for r in bf16]
    rows = [(a, b) for a, b in zip(fp32, bf16) if a["cluster"] != ""]
    changed = [float(a["confidence"]) for a, b in rows if a["cluster"] != b["cluster"]]
    result = {"images": len(rows), "changed": len(changed), "same": 1 - len(changed) / len(rows),
              "max_conf_changed": max(changed, default=float("nan")),
              "max_conf_delta": max(abs(float(a["confidence"]) - float(b["confidence"])) for a, b in rows)}
    for name in ("fp32", "bf16"):
        result[name] = scores(work / f"{name}.csv")
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", type=Path, nargs="+", help="trained run directories")
    ap.add_argument("--no-agreement", action="store_true", help="speed only")
    ap.add_argument("--no-speed", action="store_true", help="agreement only")
    args = ap.parse_args()

    import torch

    from imgcluster.precision import cpu_has_bf16

    print(f"`python tests/bench/assign_precision.py {' '.join(sys.argv[1:])}`\n")
    print(f"CPU ({platform.machine()}, {len(os.sched_getaffinity(0))} cores, bf16 units: {cpu_has_bf16()}), "
          f"torch {torch.__version__}, load average {os.getloadavg()[0]:.1f}\n")
    if not args.no_speed:
        print("| run | threads | fp32 s / 10k | bf16 s / 10k | fp32 / bf16 |\n| --- | --- | --- | --- | --- |")
        for run in args.runs:
            for threads in (1, 2):
                best = model_speed(run, threads)
                print(f"| {run.name} | {threads} | {best['fp32']:.2f} | {best['bf16']:.2f} | "
                      f"{best['fp32'] / best['bf16']:.2f}x |", flush=True)
        print()
    if not args.no_agreement:
        print("| run | images | same cluster | changed | highest fp32 confidence of a changed image | largest "
              "confidence change | ACC / NMI fp32 | ACC / NMI bf16 |\n| --- | --- | --- | --- | --- | --- | --- | --- |")
        for run in args.runs:
            with tempfile.TemporaryDirectory() as tmp:
                r = agreement(run, Path(tmp))

            def pair(s):
                return f"{s['acc']:.4f} / {s['nmi']:.4f}" if s else "no labels"

            print(f"| {run.name} | {r['images']:,} | {100 * r['same']:.2f} % | {r['changed']} | "
                  f"{r['max_conf_changed']:.3f} | {r['max_conf_delta']:.3f} | {pair(r['fp32'])} | {pair(r['bf16'])} |",
                  flush=True)


if __name__ == "__main__":
    main()
