"""Over-clustering, then merging without labels: how well a slcGAN run trained with K' clusters merges to K.

Run by hand, not by pytest, on a run trained on a labelled folder (one sub-folder per class), e.g. one of
tests/bench/quality.py with --clusters 20 on a 10-class set:

    python tests/bench/overcluster_merge.py RUN_DIR --clusters 10 --out merge.json
    python tests/bench/overcluster_merge.py RUN_DIR --clusters 10 --checkpoint   # the training checkpoint

Each image's cluster is C's argmax over K' (as `assign` gives it); the K' clusters are then grouped into K
by one of these label-free similarities between clusters, and each grouping is scored against each
image's parent folder name, as tests/bench/quality.py labels (labels are used for scoring only):

- confusion: sum over images of p(clean view)^T p(augmented view), the training's augmented views (--views
  per image), normalised by its diagonal: clusters C confuses when the image is cropped and jittered;
- co-assignment: the same with the clean view on both sides (C's soft labels alone);
- centroids: the mean of C's features (its last layer's input) per cluster, by cosine, Ward or k-means
  weighted by the clusters' sizes;
- D's and G's embeddings of each cluster (cosine);

each grouped by hierarchical clustering (average or complete linkage) or spectral clustering. Also printed:
the scores at K' (majority-vote ACC is the ceiling of any merge) and k-means with K on C's features.

--checkpoint scores the training checkpoint (checkpoint/state.safetensors) instead of model.safetensors (so
also a run still training, which has none yet),
with C's BatchNorm statistics re-estimated on the folder as training does before it saves the model.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from scipy.cluster.hierarchy import fcluster, linkage
from scipy.spatial.distance import squareform
from sklearn.cluster import KMeans, SpectralClustering

from quality import folder_labels
from imgcluster import metrics
from imgcluster.augment import to_float
from imgcluster.checkpoint import CHECKPOINT_FORMAT, read_state
from imgcluster.inference import Upload, set_batches
from imgcluster.methods import METHODS
from imgcluster.methods.common import load_weights
from imgcluster.pipeline import cache_size, prepare_images
from imgcluster.rundir import RunDir, load_config, load_model


@torch.no_grad()
def views(method, images, n_views: int):
    """C's soft labels of the clean views (N, K'), as `assign` computes them, its features (N, F), and the
    confusion matrix (K', K') between clean and augmented views, over the set's usable images in order."""
    C = getattr(method, method.clusterer)                # the network `assign` reads (C_ema when kept)
    captured = []
    hook = C.fc.register_forward_hook(lambda module, inputs, output: captured.append(inputs[0].float()))
    probs, features = [], []
    confusion = torch.zeros(method.cfg.clusters, method.cfg.clusters)
    try:
        for batch in set_batches(images, 256, Upload(method.device)):
            if batch.pixels is None:
                continue
            p = method.probabilities(batch.pixels)       # eval mode
            probs.append(p)
            features.append(captured.pop())
            real = to_float(batch.pixels)
            for _ in range(n_views):
                confusion += p.T @ C(method.augmented_view(real)).float().softmax(dim=1)
            captured.clear()
    finally:
        hook.remove()
    return torch.cat(probs).numpy(), torch.cat(features).numpy(), confusion.numpy()


def normalised(similarity: np.ndarray) -> np.ndarray:
    s = (similarity + similarity.T) / 2
    d = np.sqrt(np.clip(np.diag(s), 1e-12, None))
    return s / np.outer(d, d)


def cosine(vectors: np.ndarray) -> np.ndarray:
    v = vectors / (np.linalg.norm(vectors, axis=1, keepdims=True) + 1e-12)
    return v @ v.T


def hierarchical(distance: np.ndarray, k: int, method: str) -> np.ndarray:
    d = np.clip((distance + distance.T) / 2, 0, None)
    np.fill_diagonal(d, 0)
    return fcluster(linkage(squareform(d, checks=False), method=method), t=k, criterion="maxclust") - 1


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run", type=Path)
    ap.add_argument("--clusters", type=int, required=True, help="K to merge to (e.g. the number of classes)")
    ap.add_argument("--views", type=int, default=4, help="augmented views per image for the confusion")
    ap.add_argument("--checkpoint", action="store_true", help="the training checkpoint instead of the model")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    torch.manual_seed(args.seed)
    run, cpu = RunDir(args.run), torch.device("cpu")
    step = None
    if args.checkpoint:                                  # a run still training has no model.safetensors
        cfg = load_config(run)
        method = METHODS[cfg.method](cfg, cpu, training=False)
        state, _ = read_state(run.checkpoint, CHECKPOINT_FORMAT)
        for name, net in method.networks().items():
            load_weights(net, state["networks"][name], cpu)
        step = int(state["step"])
    else:
        cfg, method = load_model(run, cpu, "fp32")
    if cfg.method != "slcgan":
        raise SystemExit(f"{run.root}: a {cfg.method} run; this study is for slcgan runs")
    images = prepare_images(Path(cfg.data_dir), cache_size(cfg))
    if args.checkpoint:                                  # as training does before it saves the model
        method.recalibrate(b.pixels for b in set_batches(images, cfg.batch_size, Upload(cpu)) if b.pixels is not None)
    labels = folder_labels([images.files[i] for i in images.good_indices])
    probs, features, confusion = views(method, images, args.views)
    pred = probs.argmax(axis=1)
    k_prime, k = cfg.clusters, args.clusters
    sizes = np.bincount(pred, minlength=k_prime).astype(float)
    at_k_prime = metrics.evaluate(labels, pred, k_prime)
    at_k_prime["acc_majority"] = metrics.majority_vote_accuracy(labels, pred)
    result = {"run": str(run.root), "step": step, "k_prime": k_prime, "k": k, "views": args.views,
              "at_k_prime": {key: at_k_prime[key] for key in ("acc", "acc_majority", "nmi", "clusters_used")},
              "merged": {}}
    print(f"{run.root} at K' = {k_prime}: ACC {at_k_prime['acc']:.3f}, majority-vote ACC (the ceiling of "
          f"a merge) {at_k_prime['acc_majority']:.3f}, NMI {at_k_prime['nmi']:.3f}, "
          f"{at_k_prime['clusters_used']} clusters used")

    def score(name: str, groups) -> None:
        merged = np.asarray(groups)[pred]
        r = metrics.evaluate(labels, merged, k)
        result["merged"][name] = {"acc": r["acc"], "nmi": r["nmi"], "clusters_used": r["clusters_used"]}
        print(f"  {name:30s} ACC {r['acc']:.3f}  NMI {r['nmi']:.3f}  clusters {r['clusters_used']}")

    conf = normalised(confusion)
    score("confusion, average", hierarchical(1 - conf, k, "average"))
    score("confusion, complete", hierarchical(1 - conf, k, "complete"))
    score("confusion, spectral", SpectralClustering(k, affinity="precomputed", random_state=args.seed)
          .fit(np.clip(conf, 0, None)).labels_)
    score("co-assignment, average", hierarchical(1 - normalised(probs.T @ probs), k, "average"))
    centroids = np.stack([features[pred == c].mean(axis=0) if sizes[c] else np.zeros(features.shape[1])
                          for c in range(k_prime)])
    score("centroids, cosine average", hierarchical(1 - cosine(centroids), k, "average"))
    score("centroids, Ward", hierarchical(np.linalg.norm(centroids[:, None] - centroids[None], axis=-1), k, "ward"))
    score("centroids, k-means by size", KMeans(k, n_init=10, random_state=args.seed)
          .fit(centroids, sample_weight=sizes + 1e-6).labels_)
    for net in ("D", "G"):
        embed = getattr(method, net).embed.weight.detach().float().numpy().T      # (K', E)
        score(f"{net}'s embeddings, cosine average", hierarchical(1 - cosine(embed), k, "average"))
    direct = KMeans(k, n_init=10, random_state=args.seed).fit_predict(
        features / (np.linalg.norm(features, axis=1, keepdims=True) + 1e-12))
    r = metrics.evaluate(labels, direct, k)
    result["kmeans_on_features"] = {"acc": r["acc"], "nmi": r["nmi"]}
    print(f"  {'k-means on C features (no head)':30s} ACC {r['acc']:.3f}  NMI {r['nmi']:.3f}")
    if args.out:
        args.out.write_text(json.dumps(result, indent=1, default=float))


if __name__ == "__main__":
    main()
