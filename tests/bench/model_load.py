"""Loading a trained model: how long building its networks takes, and `assign` as a shell runs it.

Run by hand, not by pytest:

    python tests/bench/model_load.py --presets slcgan-tiny slcgan-32-cpu slcgan-128 c3gan-128
    python tests/bench/model_load.py --runs runs/a runs/b --before /tmp/wt-before --pairs 5

--presets: for each preset (K = --clusters), the seconds to build the method's networks for loading
(`training=False`, what `load_model` does before it reads the weights) and for training (allocated and
initialised), each --repeat times in this process; the fastest and the median.

--runs with --before CHECKOUT: `python -m imgcluster assign RUN -o FILE --quiet` as separate processes,
alternating this checkout and CHECKOUT (PYTHONPATH; e.g. a `git worktree` of the commit before), --pairs
times per run directory, from a scratch folder so the current directory's checkout is not imported
instead (checked before timing). The image cache should be warm (run `assign` once first). Prints each
pair, the medians, the median of the pairwise ratios and whether the two CSVs are identical.

Presets are read from the installed checkout whatever PYTHONPATH says (an editable install maps
`imgcluster.presets` to its own `presets/`): --presets with PYTHONPATH set times the other checkout's code
with this checkout's presets. `assign` reads a run's settings from its config.yaml, so --runs is not affected.
"""

from __future__ import annotations

import argparse
import filecmp
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parents[2]


def build_times(preset: str, clusters: int, repeat: int) -> dict:
    import torch

    from imgcluster.config import load_preset, resolve_config
    from imgcluster.methods import METHODS

    cfg = resolve_config((load_preset(preset), preset), ({"clusters": clusters}, "bench"))
    out = {}
    for training in [False, True] * repeat:
        t0 = time.perf_counter()
        METHODS[cfg.method](cfg, torch.device("cpu"), training=training)
        out.setdefault("training" if training else "loading", []).append(time.perf_counter() - t0)
    return out


def check_imports(checkout: Path, cwd: Path) -> None:
    """Stop unless a process started as `assign_seconds` starts one imports imgcluster from `checkout`."""
    env = {**os.environ, "PYTHONPATH": str(checkout)}
    out = subprocess.run([sys.executable, "-c", "import imgcluster; print(imgcluster.__file__)"],
                         env=env, cwd=cwd, capture_output=True, text=True, check=True)
    code = Path(out.stdout.strip()).resolve()
    if not code.is_relative_to(checkout.resolve()):
        sys.exit(f"imported {code}, not the code in {checkout}")


def assign_seconds(checkout: Path, run: Path, csv: Path, cwd: Path) -> float:
    env = {**os.environ, "PYTHONPATH": str(checkout)}
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "imgcluster", "assign", str(run), "-o", str(csv), "--quiet"],
                   check=True, env=env, cwd=cwd, stderr=subprocess.DEVNULL)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--presets", nargs="*", default=[])
    ap.add_argument("--clusters", type=int, default=200)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--runs", nargs="*", type=Path, default=[])
    ap.add_argument("--before", type=Path, help="the checkout to compare `assign` with")
    ap.add_argument("--pairs", type=int, default=5)
    args = ap.parse_args()

    if args.presets:
        print("| preset | build for loading: fastest / median (s) | build for training: fastest / median (s) |")
        print("| --- | --- | --- |")
    for preset in args.presets:
        t = build_times(preset, args.clusters, args.repeat)
        cell = lambda xs: f"{min(xs):.2f} / {statistics.median(xs):.2f}"
        print(f"| {preset} | {cell(t['loading'])} | {cell(t['training'])} |", flush=True)

    if args.runs and not args.before:
        ap.error("--runs needs --before CHECKOUT")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if args.runs:
            check_imports(args.before, tmp)
            check_imports(HERE, tmp)
        for run in args.runs:
            before_csv, after_csv = tmp / "before.csv", tmp / "after.csv"
            pairs = []
            for i in range(args.pairs):
                b = assign_seconds(args.before, run, before_csv, tmp)
                a = assign_seconds(HERE, run, after_csv, tmp)
                pairs.append((b, a))
                print(f"{run.name} pair {i + 1}: before {b:.2f} s, after {a:.2f} s", flush=True)
            same = filecmp.cmp(before_csv, after_csv, shallow=False)
            print(f"{run.name}: median before {statistics.median(b for b, _ in pairs):.2f} s, after "
                  f"{statistics.median(a for _, a in pairs):.2f} s; median ratio "
                  f"{statistics.median(b / a for b, a in pairs):.2f}x, {sum(a < b for b, a in pairs)} of "
                  f"{len(pairs)} faster; CSVs {'identical' if same else 'DIFFER'}", flush=True)


if __name__ == "__main__":
    main()
