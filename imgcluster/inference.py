"""Using a trained method: assign images to clusters, draw clusters, write sample sheets."""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

import numpy as np
import torch
from torchvision.utils import save_image

from imgcluster.data import ImageSet

ASSIGN_FIELDS = ["path", "cluster", "confidence", "error"]


@dataclass
class Assignment:
    path: str
    cluster: int | None
    confidence: float | None
    error: str = ""


# ---------------------------------------------------------------------------------------------
# Assign
# ---------------------------------------------------------------------------------------------

def assign_images(method, images: ImageSet, batch_size: int = 256) -> Iterator[Assignment]:
    """One Assignment per file of the set, in its order; unusable files get their reason, no cluster."""
    good = images.good_indices
    results: dict[int, tuple[int, float]] = {}
    next_row = 0
    for start in range(0, len(good), batch_size):
        rows = good[start: start + batch_size]
        batch = torch.from_numpy(np.ascontiguousarray(images.images[rows]))
        cluster, conf = method.assign(batch)
        results.update(zip(rows.tolist(), zip(cluster.tolist(), conf.tolist())))
        last = int(rows[-1])
        while next_row <= last:              # stream every row up to the last one scored
            yield _row(images, next_row, results)
            next_row += 1
    while next_row < len(images.files):
        yield _row(images, next_row, results)
        next_row += 1


def _row(images: ImageSet, i: int, results: dict) -> Assignment:
    if images.ok[i]:
        cluster, conf = results.pop(i)
        return Assignment(images.files[i], cluster, conf)
    return Assignment(images.files[i], None, None, images.reasons[i])


def write_assignments(rows, out: TextIO, fmt: str = "csv") -> list[Assignment]:
    """Write rows as CSV (path,cluster,confidence,error) or JSON lines; returns them."""
    kept = []
    writer = csv.writer(out, lineterminator="\n") if fmt == "csv" else None
    if writer:
        writer.writerow(ASSIGN_FIELDS)
    for row in rows:
        conf = None if row.confidence is None else round(row.confidence, 6)
        if writer:
            writer.writerow([row.path, "" if row.cluster is None else row.cluster, "" if conf is None else conf, row.error])
        else:
            out.write(json.dumps({"path": row.path, "cluster": row.cluster, "confidence": conf,
                                  "error": row.error or None}) + "\n")
        kept.append(row)
    out.flush()
    return kept


def read_assignments(path: Path) -> list[Assignment]:
    with open(path, newline="", encoding="utf-8", errors="surrogateescape") as f:
        reader = csv.DictReader(f)
        missing = set(ASSIGN_FIELDS[:2]) - set(reader.fieldnames or [])
        if missing:
            raise ValueError(f"{path}: not an assignments CSV (missing column {', '.join(sorted(missing))})")
        return [Assignment(r["path"], int(r["cluster"]) if r["cluster"] not in ("", None) else None,
                           float(r["confidence"]) if r.get("confidence") else None, r.get("error") or "")
                for r in reader]


# ---------------------------------------------------------------------------------------------
# Generate and sheets
# ---------------------------------------------------------------------------------------------

def generate_images(method, clusters: list[int], per_cluster: int, seed: int) -> torch.Tensor:
    """(len(clusters) * per_cluster, 3, S, S) in [-1, 1], reproducible for a seed."""
    devices = [method.device] if method.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        codes = torch.tensor(clusters).repeat_interleave(per_cluster)
        out = []
        for chunk in codes.split(256):
            out.append(method.generate(chunk).float().cpu())
    return torch.cat(out)


def save_grid(images: torch.Tensor, path: Path, nrow: int) -> None:
    save_image(images, path, nrow=nrow, normalize=True, value_range=(-1, 1), padding=1)


def write_sheets(method, images: ImageSet, rows: list[Assignment], out_dir: Path, *,
                 per_row: int = 8, real_rows: int = 2, seed: int = 0) -> list[Path]:
    """sheets/cluster-NNN.png: a row of generated samples above the cluster's most confident members."""
    out_dir.mkdir(parents=True, exist_ok=True)
    k = method.cfg.clusters
    index = {p: i for i, p in enumerate(images.files)}
    members: dict[int, list[tuple[float, int]]] = {c: [] for c in range(k)}
    for row in rows:
        if row.cluster is not None and row.path in index:
            members[row.cluster].append((row.confidence, index[row.path]))
    fakes = generate_images(method, list(range(k)), per_row, seed)
    size = method.cfg.image_size
    blank = -torch.ones(1, 3, size, size)
    written = []
    for c in range(k):
        best = [i for _, i in sorted(members[c], key=lambda t: -t[0])[: per_row * real_rows]]
        tiles = [fakes[c * per_row: (c + 1) * per_row], blank.expand(per_row, -1, -1, -1)]
        if best:
            real = torch.from_numpy(np.ascontiguousarray(images.images[sorted(best)]))
            order = [sorted(best).index(i) for i in best]
            tiles.append(method.eval_view(real)[order].float().cpu())
        path = out_dir / f"cluster-{c:03d}.png"
        save_grid(torch.cat(tiles), path, per_row)
        written.append(path)
    return written
