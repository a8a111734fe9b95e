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

from pathlib import Path

from curve import score
from kept_vs_last import last_step, rate_all
from imgcluster.rundir import RunDir, read_config
from imgcluster.selection import inference_copy


def rate(run: Path) -> dict:
    if read_config(RunDir(run)).get("slcgan", {}).get("c_ema") is not True:
        raise SystemExit(f"{run}: not an slcGAN run trained with slcgan.c_ema=true")
    rd, cfg, method, step, data, labels, selector = last_step(run)
    out = {"run": run.name, "step": step}
    for name in ("C", "C_ema"):
        method.clusterer = name
        found = score(method, data, labels, cfg.clusters)
        out[name] = {"balance": round(selector.score(inference_copy(method, selector._batches())), 4),
                     "acc": found["acc"], "nmi": round(found["nmi"], 4), "clusters_used": found["clusters_used"]}
    return out


def main() -> None:
    rows = rate_all(__doc__, rate)
    print("\n| run | step | C: balance, ACC / NMI, clusters used | C_ema: balance, ACC / NMI, clusters used |\n"
          "| --- | --- | --- | --- |")
    cell = lambda r: f"{r['balance']:.3f}, {r['acc']:.3f} / {r['nmi']:.3f}, {r['clusters_used']}"
    for r in rows:
        print(f"| {r['run']} | {r['step']} | {cell(r['C'])} | {cell(r['C_ema'])} |")


if __name__ == "__main__":
    main()
