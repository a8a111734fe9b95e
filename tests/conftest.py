"""Shared fixtures: real labelled images from ../shared/data, unpacked into pytest's temporary folders."""

from __future__ import annotations

import tarfile
from collections import defaultdict
from pathlib import Path

import pytest

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def unpack_subset(archive: Path, dest: Path, per_class: int, prefix: str = "test_") -> Path:
    """Unpack the first `per_class` files (by name) starting with `prefix` of each class folder.

    Returns the images folder (one sub-folder per class), as the archive lays it out.
    """
    with tarfile.open(archive) as tar:
        members = [m for m in tar.getmembers() if m.isfile() and Path(m.name).name.startswith(prefix)]
        by_class = defaultdict(list)
        for m in members:
            by_class[Path(m.name).parent.name].append(m)
        chosen = [m for cls in sorted(by_class) for m in sorted(by_class[cls], key=lambda m: m.name)[:per_class]]
        chosen.sort(key=lambda m: m.offset)          # archive order: a gzip stream cannot seek back cheaply
        tar.extractall(dest, members=chosen, filter="data")
    name = archive.name.split(".")[0]
    return dest / name / "images"


def shared_subset(tmp_path_factory, name: str, per_class: int, prefix: str = "test_") -> Path:
    archive = SHARED_DATA / f"{name}.tar.gz"
    if not archive.exists():
        pytest.skip(f"{archive} is absent: the shared data sets sit beside the repository (../shared/data)")
    return unpack_subset(archive, tmp_path_factory.mktemp(name), per_class, prefix)


@pytest.fixture(scope="session")
def mnist_200(tmp_path_factory) -> Path:
    """200 real MNIST test images, 20 per digit."""
    return shared_subset(tmp_path_factory, "mnist", 20)


@pytest.fixture(scope="session")
def mnist_2000(tmp_path_factory) -> Path:
    """2,000 real MNIST test images, 200 per digit."""
    return shared_subset(tmp_path_factory, "mnist", 200)


@pytest.fixture(autouse=True)
def private_cache(tmp_path_factory, monkeypatch):
    """Keep the image cache out of the user's home: one cache folder per test session."""
    monkeypatch.setenv("IMGCLUSTER_CACHE", str(tmp_path_factory.getbasetemp() / "image-cache"))
