"""fp32 against bf16 autocast: the same run twice (same images, seed, steps), loss curves and scores side by side.

Run by hand, not by pytest. Example (2,000 MNIST test images, the demo preset, 400 steps, on the CPU):

    python tests/bench/precision.py --set mnist --per-class 200 --preset demo --steps 400 --device cpu

Prints a Markdown report: the logged losses of both runs at each log step, then ACC / NMI / ARI of each
against the labels, and the wall time of each. Nothing here is timed for speed: bf16 on a CPU is slower
unless the CPU has bf16 units; the speed figures live in train_speed.py.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from shared_sets import unpack_per_class

CURVE_KEYS = ("d_loss", "g_loss", "d_adv", "g_adv")


def train_and_score(folder: Path, run_dir: Path, precision: str, args) -> dict:
    cmd = [sys.executable, "-m", "imgcluster", "train", str(folder), "--clusters", str(args.clusters),
           "--preset", args.preset, "--steps", str(args.steps), "--seed", str(args.seed), "--device", args.device,
           "--precision", precision, "--out", str(run_dir), "--restart", "--quiet"]
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - t0
    scores = json.loads(subprocess.run([sys.executable, "-m", "imgcluster", "evaluate", str(run_dir),
                                        "--labels-from-folders", "--json"],
                                       check=True, capture_output=True, text=True).stdout)
    curve = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {"scores": scores, "curve": curve, "wall_s": round(wall, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--set", dest="dataset", default="mnist", help="a ../shared/data archive: mnist, fashion_mnist, cifar10")
    ap.add_argument("--per-class", type=int, default=200)
    ap.add_argument("--clusters", type=int, default=10)
    ap.add_argument("--preset", default="demo")
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--work", type=Path, default=Path.home() / ".cache" / "imgcluster-bench")
    args = ap.parse_args()

    folder = unpack_per_class(args.dataset, args.per_class, args.work)
    results = {p: train_and_score(folder, args.work / "runs" / f"precision-{args.dataset}-{p}", p, args)
               for p in ("fp32", "bf16")}

    lines = [f"`python {' '.join(sys.argv)}`", "",
             "| step | " + " | ".join(f"{k} fp32 | {k} bf16" for k in CURVE_KEYS) + " |",
             "| --- |" + " --- | --- |" * len(CURVE_KEYS)]
    for a, b in zip(results["fp32"]["curve"], results["bf16"]["curve"]):
        cells = " | ".join(f"{a.get(k, float('nan')):.3f} | {b.get(k, float('nan')):.3f}" for k in CURVE_KEYS)
        lines.append(f"| {a['step']} | {cells} |")
    lines += ["", "| precision | ACC | NMI | ARI | clusters used | wall s |", "| --- | --- | --- | --- | --- | --- |"]
    for p, r in results.items():
        s = r["scores"]
        lines.append(f"| {p} | {s['acc']:.3f} | {s['nmi']:.3f} | {s['ari']:.3f} | {s['clusters_used']} | {r['wall_s']} |")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
