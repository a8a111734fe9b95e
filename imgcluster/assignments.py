"""The assignments file: one row per file (path, cluster, confidence, error), written as CSV or JSON lines.

Plain Python only (no torch), so `evaluate` and scripts reading assignments start fast.
"""

from __future__ import annotations

import csv
import heapq
import json
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

ASSIGN_FIELDS = ["path", "cluster", "confidence", "error"]


@dataclass
class Assignment:
    path: str
    cluster: int | None
    confidence: float | None
    error: str = ""


class Tally:
    """What writing the assignments keeps: counts, and per cluster the `keep` most confident rows (what
    the sheets draw), so memory does not grow with the folder."""

    def __init__(self, keep: int = 0):
        self.keep = keep
        self.rows = self.bad = 0
        self.clusters: set[int] = set()
        self._best: dict[int, list] = {}       # cluster -> min-heap of (confidence, -row number, row)

    def add(self, row: Assignment) -> None:
        self.rows += 1
        if row.cluster is None:
            self.bad += 1
            return
        self.clusters.add(row.cluster)
        if self.keep:
            heap = self._best.setdefault(row.cluster, [])
            item = (row.confidence, -self.rows, row)      # equal confidence: the earlier row ranks higher
            if len(heap) < self.keep:
                heapq.heappush(heap, item)
            else:
                heapq.heappushpop(heap, item)

    @property
    def assigned(self) -> int:
        return self.rows - self.bad

    @property
    def kept(self) -> list[Assignment]:
        """The kept rows in file order, so write_sheets picks the same ones as from every row."""
        items = [item for heap in self._best.values() for item in heap]
        return [row for _, _, row in sorted(items, key=lambda item: -item[1])]


def write_assignments(rows, out: TextIO, fmt: str = "csv", keep: int = 0) -> Tally:
    """Write rows as CSV (path,cluster,confidence,error) or JSON lines as they come.

    Returns a Tally: the counts, and per cluster the `keep` most confident rows (SHEET_MEMBERS for
    write_sheets; 0 keeps none).
    """
    tally = Tally(keep)
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
        tally.add(row)
    out.flush()
    return tally


def read_assignments(path: Path) -> list[Assignment]:
    with open(path, newline="", encoding="utf-8", errors="surrogateescape") as f:
        reader = csv.DictReader(f)
        missing = set(ASSIGN_FIELDS[:2]) - set(reader.fieldnames or [])
        if missing:
            raise ValueError(f"{path}: not an assignments CSV (missing column {', '.join(sorted(missing))})")
        return [Assignment(r["path"], int(r["cluster"]) if r["cluster"] not in ("", None) else None,
                           float(r["confidence"]) if r.get("confidence") else None, r.get("error") or "")
                for r in reader]
