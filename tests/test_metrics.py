"""Behavioural tests of imgcluster.metrics on small hand-computable cases."""

import json

import numpy as np
import pytest
from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

from imgcluster.metrics import (
    balanced_accuracy,
    cluster_size_stats,
    evaluate,
    hungarian_accuracy,
    majority_vote_accuracy,
    purity,
)


def _from_table(table):
    """Expand a contingency table (rows = clusters, cols = classes) into label/cluster arrays."""
    labels, clusters = [], []
    for k, row in enumerate(table):
        for c, count in enumerate(row):
            labels += [c] * count
            clusters += [k] * count
    return np.array(labels), np.array(clusters)


# Three classes a, b, c, three clusters, n = 10:
#            a  b  c
# cluster 0  3  1  0
# cluster 1  0  2  1
# cluster 2  2  0  1
# Hungarian: the six matchings give 0->a,1->b,2->c = 3+2+1 = 6 (best), 0->a,1->c,2->b = 4,
# 0->b,1->a,2->c = 2, 0->b,1->c,2->a = 4, 0->c,1->a,2->b = 0, 0->c,1->b,2->a = 4  => ACC = 6/10.
# Majority vote: 3 + 2 + 2 = 7 (clusters 0 and 2 both vote a)              => 7/10.
SQUARE = [[3, 1, 0], [0, 2, 1], [2, 0, 1]]

# Overclustering, two classes a, b, four clusters, n = 12:
#            a  b
# cluster 0  4  0
# cluster 1  3  1
# cluster 2  2  0
# cluster 3  0  2
# Hungarian (one cluster per class): 0->a, 3->b = 4 + 2 = 6            => 6/12 = 0.5.
# Majority vote: 4 + 3 + 2 + 2 = 11                                     => 11/12.
# Balanced, K=4: each class takes ceil(4/2) = 2 clusters: {0,1}->a, {2,3}->b = 7 + 2 = 9,
#   {0,2}->a, {1,3}->b = 6 + 3 = 9, {1,2}->a, {0,3}->b = 5 + 2 = 7, ...  => 9/12 = 0.75.
# Balanced, K=5 (one configured cluster empty): ceil(5/2) = 3 clusters per class:
#   {0,1,2}->a, {3}->b = 9 + 2 = 11                                     => 11/12.
OVER = [[4, 0], [3, 1], [2, 0], [0, 2]]


def test_perfect_clustering_with_permuted_ids():
    labels = [0, 0, 1, 1, 1, 2, 2]
    clusters = [7, 7, 3, 3, 3, 5, 5]
    r = evaluate(labels, clusters)
    assert r["acc"] == pytest.approx(1.0)
    assert r["nmi"] == pytest.approx(1.0)
    assert r["nmi_max"] == pytest.approx(1.0)
    assert r["ari"] == pytest.approx(1.0)
    assert r["purity"] == pytest.approx(1.0)
    assert (r["n"], r["classes"], r["clusters_used"]) == (7, 3, 3)


def test_hand_computed_square_table():
    labels, clusters = _from_table(SQUARE)
    assert hungarian_accuracy(labels, clusters) == pytest.approx(0.6)
    assert majority_vote_accuracy(labels, clusters) == pytest.approx(0.7)
    assert purity(labels, clusters) == pytest.approx(0.7)
    # K <= C: the balanced matching is plain Hungarian.
    assert balanced_accuracy(labels, clusters) == pytest.approx(0.6)


def test_overclustering_hungarian_below_balanced_below_majority():
    labels, clusters = _from_table(OVER)
    assert hungarian_accuracy(labels, clusters) == pytest.approx(0.5)
    assert balanced_accuracy(labels, clusters) == pytest.approx(0.75)
    assert majority_vote_accuracy(labels, clusters) == pytest.approx(11 / 12)
    assert balanced_accuracy(labels, clusters, num_clusters=5) == pytest.approx(11 / 12)


def test_cluster_ids_need_not_be_contiguous():
    labels, clusters = _from_table(OVER)
    sparse = np.array([10, 42, 3, 99])[clusters]
    assert hungarian_accuracy(labels, sparse) == pytest.approx(0.5)
    assert balanced_accuracy(labels, sparse) == pytest.approx(0.75)


def test_string_labels_match_int_labels():
    labels, clusters = _from_table(SQUARE)
    names = np.array(["cat", "dog", "eel"])[labels].tolist()
    assert evaluate(names, clusters) == evaluate(labels, clusters)
    assert hungarian_accuracy(names, clusters) == pytest.approx(0.6)


@pytest.mark.parametrize("fn", [hungarian_accuracy, majority_vote_accuracy, balanced_accuracy, evaluate])
def test_length_mismatch_raises(fn):
    with pytest.raises(ValueError, match="length"):
        fn([0, 1, 1], [0, 1])


@pytest.mark.parametrize("fn", [hungarian_accuracy, evaluate])
def test_empty_input_raises(fn):
    with pytest.raises(ValueError, match="empty"):
        fn([], [])


def test_nmi_ari_agree_with_sklearn_on_random_data():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 5, size=300)
    clusters = rng.integers(0, 8, size=300)
    r = evaluate(labels, clusters)
    assert r["nmi"] == pytest.approx(normalized_mutual_info_score(labels, clusters))
    assert r["nmi_max"] == pytest.approx(normalized_mutual_info_score(labels, clusters, average_method="max"))
    assert r["ari"] == pytest.approx(adjusted_rand_score(labels, clusters))


def test_cluster_size_stats_small_case():
    # sizes: id 5 -> 3, id 1 -> 1, id 9 -> 2
    s = cluster_size_stats([5, 1, 5, 9, 5, 9])
    assert s == {
        "clusters_used": 3, "min": 1, "max": 3, "mean": 2.0, "median": 2.0,
        "std": pytest.approx(np.sqrt(2 / 3)), "empty": None,
    }
    assert cluster_size_stats([5, 1, 5, 9, 5, 9], num_clusters=4)["empty"] == 1


def test_extra_acc_keys_only_when_overclustering():
    labels, clusters = _from_table(SQUARE)          # 3 classes, 3 clusters
    r = evaluate(labels, clusters)
    assert "acc_majority" not in r and "acc_balanced" not in r
    assert r["sizes"]["empty"] is None

    r = evaluate(labels, clusters, num_clusters=4)  # one empty cluster makes K = 4 > 3
    assert r["acc_majority"] == pytest.approx(0.7)
    assert r["acc_balanced"] == pytest.approx(0.7)  # ceil(4/3) = 2 clusters per class: 3 + 2 + 2
    assert r["sizes"]["empty"] == 1

    labels, clusters = _from_table(OVER)            # 2 classes, 4 clusters used
    r = evaluate(labels, clusters)
    assert r["acc"] == pytest.approx(0.5)
    assert r["acc_majority"] == pytest.approx(11 / 12)
    assert r["acc_balanced"] == pytest.approx(0.75)


def test_evaluate_is_json_serialisable_with_plain_types():
    labels, clusters = _from_table(OVER)
    r = evaluate(labels, clusters, num_clusters=6)
    json.dumps(r)
    flat = {k: v for k, v in r.items() if k != "sizes"} | r["sizes"]
    assert all(v is None or type(v) in (int, float) for v in flat.values())
