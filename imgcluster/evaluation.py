"""Scoring assignments against labels: where labels come from and how rows are matched to them."""

from __future__ import annotations

import csv
from pathlib import Path, PurePosixPath

from imgcluster import metrics
from imgcluster.assignments import Assignment


def labels_from_csv(path: Path) -> dict[str, str]:
    """path,label rows (a header row with those names is required)."""
    with open(path, newline="", encoding="utf-8", errors="surrogateescape") as f:
        reader = csv.DictReader(f)
        if not reader.fieldnames or not {"path", "label"} <= set(reader.fieldnames):
            raise ValueError(f"--labels {path}: expected a CSV with columns path,label")
        return {row["path"]: row["label"] for row in reader}


def labels_from_folders(rows: list[Assignment]) -> dict[str, str]:
    """Each file's class is the name of the folder holding it (files at the top level get none)."""
    out = {}
    for row in rows:
        parent = PurePosixPath(row.path).parent
        if str(parent) != ".":
            out[row.path] = parent.name
    return out


def match_labels(rows: list[Assignment], labels: dict[str, str]) -> dict[str, str]:
    """Labels keyed by the rows' paths. A labels file may name paths from a parent folder
    (e.g. 'images/3/a.png' for row '3/a.png'): those match by their trailing components."""
    by_suffix: dict[str, str] = {}
    for key, label in labels.items():
        parts = PurePosixPath(key).parts
        for i in range(len(parts)):
            by_suffix.setdefault("/".join(parts[i:]), label)
    return {r.path: labels.get(r.path, by_suffix.get(r.path)) for r in rows
            if labels.get(r.path, by_suffix.get(r.path)) is not None}


def score(rows: list[Assignment], labels: dict[str, str], num_clusters: int | None = None) -> dict:
    """metrics.evaluate over the rows that have both a cluster and a label, plus the counts left out."""
    matched = match_labels(rows, labels)
    scored = [r for r in rows if r.cluster is not None and r.path in matched]
    if not scored:
        raise ValueError("no assigned image has a label: check --labels paths against the assignments' paths")
    result = metrics.evaluate([matched[r.path] for r in scored], [r.cluster for r in scored], num_clusters)
    result["unlabelled"] = sum(r.cluster is not None and r.path not in matched for r in rows)
    result["unassigned"] = sum(r.cluster is None for r in rows)
    return result
