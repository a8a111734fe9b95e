"""The labelled sets of ../shared/data for the benchmark scripts (imported by them, not a benchmark)."""

from __future__ import annotations

import tarfile
from collections import defaultdict
from pathlib import Path

SHARED = Path(__file__).resolve().parents[3] / "shared" / "data"


def unpack_per_class(name: str, per_class: int, dest: Path) -> Path:
    """The first `per_class` test_* files (by name) of each class of ../shared/data/NAME.tar.gz, unpacked
    once under `dest`; returns the images folder (one sub-folder per class)."""
    images = dest / f"{name}-{per_class}" / name / "images"
    done = dest / f".{name}-{per_class}.done"
    if done.exists():
        return images
    with tarfile.open(SHARED / f"{name}.tar.gz") as tar:
        by_class = defaultdict(list)
        for m in tar.getmembers():
            if m.isfile() and "/images/" in m.name and Path(m.name).name.startswith("test_"):
                by_class[Path(m.name).parent.name].append(m)
        chosen = [m for c in sorted(by_class) for m in sorted(by_class[c], key=lambda m: m.name)[:per_class]]
        chosen.sort(key=lambda m: m.offset)          # archive order: a gzip stream cannot seek back cheaply
        tar.extractall(dest / f"{name}-{per_class}", members=chosen, filter="data")
    done.touch()
    return images
