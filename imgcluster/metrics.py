"""Clustering scores against ground-truth labels: ACC (three matchings), NMI, ARI, purity, cluster sizes.

Pure functions on 1-D sequences; no I/O, no torch. `labels` may be strings or ints, `clusters` are
integer cluster ids that need not be contiguous (unused ids simply never appear).
"""

from __future__ import annotations

import math

import numpy as np
from scipy.optimize import linear_sum_assignment
from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score


def _encode(labels, clusters) -> tuple[np.ndarray, np.ndarray]:
    """Check the two sequences and map each to contiguous ints 0..C-1 and 0..K_used-1."""
    y = np.asarray(labels)
    k = np.asarray(clusters)
    if y.ndim != 1 or k.ndim != 1:
        raise ValueError(f"labels and clusters must be 1-D, got shapes {y.shape} and {k.shape}")
    if len(y) != len(k):
        raise ValueError(f"labels and clusters differ in length: {len(y)} labels, {len(k)} clusters")
    if len(y) == 0:
        raise ValueError("labels and clusters are empty: nothing to score")
    y_idx = np.unique(y, return_inverse=True)[1].ravel()
    k_idx = np.unique(k, return_inverse=True)[1].ravel()
    return y_idx, k_idx


def _contingency(labels, clusters) -> np.ndarray:
    """Counts table of shape (clusters used, classes): entry [k, c] = images of class c in cluster k."""
    y, k = _encode(labels, clusters)
    table = np.zeros((k.max() + 1, y.max() + 1), dtype=np.int64)
    np.add.at(table, (k, y), 1)
    return table


def _matched_fraction(table: np.ndarray, n: int) -> float:
    """Fraction of the n images on the maximum-weight one-to-one matching of the table's rows and columns."""
    rows, cols = linear_sum_assignment(table, maximize=True)
    return float(table[rows, cols].sum() / n)


def hungarian_accuracy(labels, clusters) -> float:
    """ACC under the usual one-to-one cluster-to-class matching (Hungarian, maximising matches).

    With more clusters than classes only C clusters get a class; the rest count as wrong.
    """
    table = _contingency(labels, clusters)
    return _matched_fraction(table, table.sum())


def majority_vote_accuracy(labels, clusters) -> float:
    """ACC when every cluster takes its majority class (SCAN's convention for overclustering).

    Several clusters may take the same class, so this equals purity.
    """
    table = _contingency(labels, clusters)
    return float(table.max(axis=1).sum() / table.sum())


def purity(labels, clusters) -> float:
    """Purity: share of images in their cluster's majority class (alias of majority_vote_accuracy)."""
    return majority_vote_accuracy(labels, clusters)


def balanced_accuracy(labels, clusters, num_clusters: int | None = None) -> float:
    """ACC under C3-GAN's balanced matching for overclustering.

    C3-GAN's convention (train.py with OVER > 1): the class columns of the contingency table are
    repeated ceil(K / C) times, so each class can take up to that many clusters, and the Hungarian
    matching is run on the widened table. K is `num_clusters` when given (the configured cluster
    count, as in C3-GAN), else the clusters used. With K <= C this is hungarian_accuracy.
    """
    table = _contingency(labels, clusters)
    n_used, n_classes = table.shape
    k = n_used if num_clusters is None else num_clusters
    repeats = max(1, math.ceil(k / n_classes))
    return _matched_fraction(np.tile(table, (1, repeats)), table.sum())


def cluster_size_stats(clusters, num_clusters: int | None = None) -> dict:
    """Sizes of the clusters in use: count, min, max, mean, median, population std.

    `empty` is num_clusters - clusters_used when the configured cluster count is given, else None
    (the ids alone cannot tell how many clusters went unused).
    """
    k = np.asarray(clusters)
    if k.ndim != 1:
        raise ValueError(f"clusters must be 1-D, got shape {k.shape}")
    if len(k) == 0:
        raise ValueError("clusters is empty: no sizes to report")
    sizes = np.unique(k, return_counts=True)[1]
    used = int(len(sizes))
    if num_clusters is not None and num_clusters < used:
        raise ValueError(f"num_clusters={num_clusters} is fewer than the {used} cluster ids in use")
    return {
        "clusters_used": used,
        "min": int(sizes.min()),
        "max": int(sizes.max()),
        "mean": float(sizes.mean()),
        "median": float(np.median(sizes)),
        "std": float(sizes.std()),
        "empty": None if num_clusters is None else int(num_clusters - used),
    }


def evaluate(labels, clusters, num_clusters: int | None = None) -> dict:
    """All scores in one flat, JSON-serialisable dict.

    `acc` is Hungarian ACC; `nmi` uses sklearn's default (arithmetic) normalisation and `nmi_max`
    the max normalisation that the C3-GAN code computes. When there are more clusters
    (num_clusters if given, else clusters used) than classes, `acc_majority` (SCAN) and
    `acc_balanced` (C3-GAN) are added.
    """
    y, k = _encode(labels, clusters)
    n_classes = int(y.max() + 1)
    sizes = cluster_size_stats(k, num_clusters)
    n_clusters = sizes["clusters_used"] if num_clusters is None else int(num_clusters)
    result = {
        "n": int(len(y)),
        "classes": n_classes,
        "clusters_used": sizes["clusters_used"],
        "acc": hungarian_accuracy(y, k),
        "nmi": float(normalized_mutual_info_score(y, k)),
        "nmi_max": float(normalized_mutual_info_score(y, k, average_method="max")),
        "ari": float(adjusted_rand_score(y, k)),
        "purity": purity(y, k),
    }
    if n_clusters > n_classes:
        result["acc_majority"] = majority_vote_accuracy(y, k)
        result["acc_balanced"] = balanced_accuracy(y, k, n_clusters)
    result["sizes"] = sizes
    return result
