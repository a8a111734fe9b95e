"""Which label-free signal tracks clustering quality during training? An experiment, run by hand.

Trains one method on a labelled subset of a shared set and, every --every steps, scores a copy of the
clustering network (BatchNorm re-estimated on real images, as the final model is) with the labels (ACC,
NMI) and with signals that need no labels:

- consistency: fraction of images whose cluster is unchanged between the inference view and a
  random augmented view (the method's strong view for C3-GAN, T(x) for slcGAN), same images;
- balance: entropy of the cluster sizes / log K (1 = all clusters equal, 0 = one cluster);
- confidence: mean max-softmax;
- stability: NMI between this evaluation's assignment and the previous one's;
- consistency x balance, confidence x balance.

Prints a table per evaluation and, per signal, the Spearman correlation with ACC and the ACC of the
checkpoint the signal would pick (vs the last and the best checkpoint).

    python tests/bench/selection.py --method c3gan --preset demo --steps 1200 --every 100
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import numpy as np
import torch
from scipy.stats import spearmanr
from sklearn.metrics import normalized_mutual_info_score

from imgcluster import augment, metrics
from imgcluster.config import load_preset, resolve_config
from imgcluster.data import load_image_set, scan_folder
from imgcluster.methods import METHODS
from imgcluster.methods.common import recalibrate_batchnorm
from imgcluster.training import Batches, step_indices
from shared_sets import unpack_per_class

SIGNALS = ("consistency", "balance", "confidence", "stability", "consistency_x_balance",
           "confidence_x_balance")


def clustering_net(method):
    return method.D if method.name == "c3gan" else method.C


def logits_of(method, net, x):
    if method.name == "c3gan":
        _, h = net(x)
        return net.cluster_logits(h)
    return net(x)


def augmented(method, real_uint8, size):
    x = augment.to_float(real_uint8)
    return augment.strong_view(x, size) if method.name == "c3gan" else method.augmented_view(x)


@torch.no_grad()
def evaluate(method, images: torch.Tensor, labels: list[str], k: int, size: int, seed: int) -> dict:
    net = copy.deepcopy(clustering_net(method))
    views = [method.eval_view(b) for b in images.split(256)]
    recalibrate_batchnorm(net, views)
    probs = torch.cat([logits_of(method, net, v).softmax(1) for v in views])
    clusters = probs.argmax(1)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        aug = torch.cat([logits_of(method, net, augmented(method, b, size)).argmax(1) for b in images.split(256)])
    sizes = torch.bincount(clusters, minlength=k).double()
    p = sizes / sizes.sum()
    balance = float(-(p[p > 0] * p[p > 0].log()).sum() / np.log(k))
    scores = metrics.evaluate(labels, clusters.tolist(), k)
    return {"acc": scores["acc"], "nmi": scores["nmi"], "clusters": clusters.numpy(),
            "consistency": float((aug == clusters).float().mean()), "balance": balance,
            "confidence": float(probs.max(1).values.mean())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--set", dest="dataset", default="mnist")
    ap.add_argument("--per-class", type=int, default=200)
    ap.add_argument("--method", default="c3gan")
    ap.add_argument("--preset", default="demo")
    ap.add_argument("--steps", type=int, default=1200)
    ap.add_argument("--every", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--work", type=Path, default=Path.home() / ".cache" / "imgcluster-bench")
    args = ap.parse_args()

    folder = unpack_per_class(args.dataset, args.per_class, args.work)
    files = scan_folder(folder)
    labels = [Path(f).parent.name for f in files]
    k = len(set(labels))
    cfg = resolve_config((load_preset(args.preset), args.preset),
                         ({"method": args.method, "clusters": k, "steps": args.steps, "seed": args.seed}, "bench"))
    cpu = torch.device("cpu")
    image_set = load_image_set(folder, METHODS[cfg.method].cache_size(cfg), files=files)
    torch.manual_seed(cfg.seed)
    method = METHODS[cfg.method](cfg, cpu)
    data = Batches(image_set, cpu)
    everything = torch.from_numpy(np.ascontiguousarray(image_set.images[image_set.good_indices]))
    per_step = getattr(method, "real_batches_per_step", 1)

    rows, previous = [], None
    for step in range(1, cfg.steps + 1):
        method.train_step(data.get(step_indices(step - 1, len(data), cfg.batch_size, cfg.seed, per_step)))
        if step % args.every == 0:
            r = evaluate(method, everything, labels, k, cfg.image_size, seed=step)
            r["stability"] = (normalized_mutual_info_score(previous, r["clusters"]) if previous is not None
                              else float("nan"))
            r["consistency_x_balance"] = r["consistency"] * r["balance"]
            r["confidence_x_balance"] = r["confidence"] * r["balance"]
            previous = r.pop("clusters")
            r["step"] = step
            rows.append(r)
            print(f"step {step}: " + " ".join(f"{key} {r[key]:.3f}" for key in ("acc", "nmi", *SIGNALS)),
                  file=sys.stderr, flush=True)

    print(f"`python {' '.join(sys.argv)}`\n")
    print("| step | ACC | NMI | " + " | ".join(SIGNALS) + " |")
    print("| --- " * (3 + len(SIGNALS)) + "|")
    for r in rows:
        print(f"| {r['step']} | {r['acc']:.3f} | {r['nmi']:.3f} | " + " | ".join(f"{r[s]:.3f}" for s in SIGNALS) + " |")
    accs = [r["acc"] for r in rows]
    print(f"\nlast checkpoint ACC {accs[-1]:.3f}; best ACC {max(accs):.3f} (step {rows[int(np.argmax(accs))]['step']})\n")
    print("| signal | Spearman with ACC | Spearman with NMI | ACC of the checkpoint it picks |")
    print("| --- | --- | --- | --- |")
    for s in SIGNALS:
        pairs = [(r[s], r["acc"], r["nmi"]) for r in rows if np.isfinite(r[s])]
        values = [p[0] for p in pairs]
        rho_acc = spearmanr(values, [p[1] for p in pairs]).statistic
        rho_nmi = spearmanr(values, [p[2] for p in pairs]).statistic
        picked = pairs[int(np.argmax(values))][1]
        print(f"| {s} | {rho_acc:.2f} | {rho_nmi:.2f} | {picked:.3f} |")


if __name__ == "__main__":
    main()
