"""Which of several seeds to keep, without labels: finished slcGAN runs of one command line, rated.

Run by hand, not by pytest, on run directories of a labelled folder (one sub-folder per class, as
tests/bench/quality.py trains on) that differ only in --seed:

    python tests/bench/pick_seed.py ~/.cache/imgcluster-bench/runs/mnist-slcgan-32-cpu-bf16-noflip-csn-4800-32-s*

For each run, two label-free figures of the step model.safetensors holds: its cluster balance (written
by label-free selection into the file's metadata; 1 = every cluster equally used) and C's eq. 5 loss
(c_aug in metrics.jsonl: the cross-entropy between C's clusters of an image and of its augmented view)
averaged over the 500 steps up to that step (what `train` reports). Then ACC / NMI of the run's
assignments.csv against the folder labels, which the rule does not see.

The rule: among the runs whose balance is within TOLERANCE of the best balance, keep the one with the
lowest c_aug (clusters that augmentations do not move). For every subset of --choose runs it prints the
mean ACC the rule keeps, against the mean of all runs (one seed, as a user gets without the rule) and the
mean of the best run of each subset (what labels would keep).

With --at STEP the rule sees only what a run had logged by STEP: c_aug over the 500 steps up to STEP, and
for balance the share of the K clusters that C's training batches used over those steps (clusters_in_batch
/ K; the balance selection writes is of the step model.safetensors holds). The ACC is still that of the
finished run, so this asks whether training every seed only that far, then taking one on, would have kept
the better run. --tolerance 1 makes every run count as balanced: c_aug alone.

With --at STEP --restart-below SHARE it rates a restart policy instead of a choice: train seeds one after
another, give up on a run at STEP when its clusters per batch are SHARE of K or fewer and start the next,
keep the first run above SHARE and train it to the end; after --caps N attempts, train on the best-balanced
of them. Every ordered draw of N of the runs is counted, so the figures are exact over these runs: mean
ACC kept, and the mean and largest number of training steps spent.

With --checkpoints EARLY LATER (repeated, one pair per seed) the rule chooses inside one training instead:
between a run and its copy resumed to more steps (tests/bench/quality.py --extend), each rated at the step
its model.safetensors holds. It prints the mean ACC the rule keeps against always the earlier, always the
later and the better of each pair.
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
from pathlib import Path

from quality import folder_labels
from imgcluster import metrics
from imgcluster.assignments import read_assignments
from imgcluster.checkpoint import read_metadata
from imgcluster.rundir import RunDir, read_config
from imgcluster.selection import WINDOW, recent_mean


def logged_mean(rd: RunDir, key: str, step: int) -> float:
    """`key`'s mean over the WINDOW steps up to `step`, as `train` reports it (imgcluster.selection)."""
    mean = recent_mean(rd.metrics, key, step)
    if mean is None:
        raise SystemExit(f"{rd.metrics}: no {key} logged in steps {step - WINDOW + 1}-{step}")
    return mean


def rate(run: Path, at: int | None = None) -> dict:
    rd = RunDir(run)
    meta = read_metadata(rd.model)
    clusters = int(read_config(rd)["clusters"])
    step, balance = int(meta["step"]), float(meta["cluster_balance"])
    if at is not None:                                   # what the run had logged by step `at`
        step, balance = at, logged_mean(rd, "clusters_in_batch", at) / clusters
    c_aug = logged_mean(rd, "c_aug", step)
    assigned = [a for a in read_assignments(rd.assignments) if a.cluster is not None]
    found = metrics.evaluate(folder_labels([a.path for a in assigned]), [a.cluster for a in assigned], clusters)
    return {"run": run.name, "step": step, "balance": round(balance, 4),
            "c_aug": round(c_aug, 4), "acc": found["acc"], "nmi": round(found["nmi"], 4)}


def keep(runs: list[dict], tolerance: float) -> dict:
    top = max(r["balance"] for r in runs)
    return min((r for r in runs if r["balance"] >= top - tolerance), key=lambda r: r["c_aug"])


def rate_checkpoints(pairs: list[tuple[Path, Path]], tolerance: float) -> None:
    """The rule between two lengths of each seed's training; prints a table and the means."""
    print("| early run | step | balance | c_aug | ACC | later step | balance | c_aug | ACC | the rule keeps |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    kept, early, later, best = [], [], [], []
    for early_run, later_run in pairs:
        ra, rb = rate(early_run), rate(later_run)
        k = keep([ra, rb], tolerance)
        kept.append(k["acc"])
        early.append(ra["acc"])
        later.append(rb["acc"])
        best.append(max(ra["acc"], rb["acc"]))
        print(f"| {ra['run']} | {ra['step']} | {ra['balance']:.3f} | {ra['c_aug']:.3f} | {ra['acc']:.3f} "
              f"| {rb['step']} | {rb['balance']:.3f} | {rb['c_aug']:.3f} | {rb['acc']:.3f} | step {k['step']} "
              f"({'the better' if k['acc'] == best[-1] else 'the worse'}) |")
    right = sum(acc == top for acc, top in zip(kept, best))
    print(f"\n{len(pairs)} seeds, tolerance {tolerance}: the rule keeps mean ACC {statistics.fmean(kept):.3f} "
          f"(the better of the two in {right}); always the earlier {statistics.fmean(early):.3f}, always the "
          f"later {statistics.fmean(later):.3f}; labels would keep {statistics.fmean(best):.3f}")


def rate_restarts(rows: list[dict], below: float, caps: list[int], at: int, total: int) -> None:
    """The restart policy (module docstring) over every ordered draw of `cap` runs, for each cap."""
    for cap in caps:
        if cap > len(rows):
            continue
        kept, spent = [], []
        for draw in itertools.permutations(rows, cap):
            passed = next((i for i, r in enumerate(draw) if r["balance"] > below), None)
            if passed is None:                  # none passed: train the best-balanced on to the end
                kept.append(max(draw, key=lambda r: r["balance"])["acc"])
                spent.append(cap * at + total - at)
            else:
                kept.append(draw[passed]["acc"])
                spent.append(passed * at + total)
        print(f"At most {cap} attempts, restart at step {at} at {below:.2f} of K or fewer: mean ACC "
              f"{statistics.fmean(kept):.3f}; steps spent: mean {statistics.fmean(spent):,.0f}, "
              f"at most {max(spent):,}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="*", type=Path)
    ap.add_argument("--choose", type=int, nargs="+", default=[2, 3], help="subset sizes to rate the rule on")
    ap.add_argument("--tolerance", type=float, default=0.05, help="balance within this of the best")
    ap.add_argument("--at", type=int, metavar="STEP", help="rate by what runs had logged by STEP")
    ap.add_argument("--checkpoints", nargs=2, type=Path, action="append", metavar=("EARLY", "LATER"),
                    help="a run and its longer copy, one pair per seed (repeat): choose inside a training")
    ap.add_argument("--restart-below", type=float, metavar="SHARE",
                    help="with --at: rate restarting runs whose clusters per batch are SHARE of K or fewer")
    ap.add_argument("--caps", type=int, nargs="+", default=[1, 2, 3, 4], help="attempts at most, for --restart-below")
    args = ap.parse_args()
    if args.restart_below is not None and args.at is None:
        ap.error("--restart-below needs --at STEP")
    if args.checkpoints:
        if args.runs or args.at is not None:
            ap.error("--checkpoints takes the place of RUNS and --at")
        return rate_checkpoints(args.checkpoints, args.tolerance)
    if not args.runs:
        ap.error("give the RUNS to rate, or --checkpoints")
    rows = [rate(run, args.at) for run in args.runs]
    if args.restart_below is not None:
        total = int(read_config(RunDir(args.runs[0]))["steps"])
        return rate_restarts(rows, args.restart_below, args.caps, args.at, total)
    for r in rows:
        print(json.dumps(r), flush=True)
    print("\n| run | step rated | balance | c_aug (last 500 steps) | ACC / NMI |\n| --- | --- | --- | --- | --- |")
    for r in sorted(rows, key=lambda r: r["c_aug"]):
        print(f"| {r['run']} | {r['step']} | {r['balance']:.3f} | {r['c_aug']:.3f} | {r['acc']:.3f} / {r['nmi']:.3f} |")
    print(f"\nOne run, any seed: mean ACC {statistics.fmean(r['acc'] for r in rows):.3f}, "
          f"NMI {statistics.fmean(r['nmi'] for r in rows):.3f} ({len(rows)} runs)")
    for n in args.choose:
        if n > len(rows):
            continue
        subsets = list(itertools.combinations(rows, n))
        kept = [keep(list(s), args.tolerance) for s in subsets]
        best = [max(s, key=lambda r: r["acc"]) for s in subsets]
        print(f"Best of {n} ({len(subsets)} subsets), tolerance {args.tolerance}: the rule keeps mean ACC "
              f"{statistics.fmean(r['acc'] for r in kept):.3f} (worst {min(r['acc'] for r in kept):.3f}), "
              f"NMI {statistics.fmean(r['nmi'] for r in kept):.3f}; labels would keep "
              f"{statistics.fmean(r['acc'] for r in best):.3f}")


if __name__ == "__main__":
    main()
