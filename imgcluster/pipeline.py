"""The steps of a run, importable without the CLI: images in, run directory out.

    images = prepare_images(data_dir, cfg)            scan + uint8 cache + bad_images list
    training.train(cfg, run, images, device)          the loop (checkpoints, metrics, samples, model)
    finish_run(run, device, images)                   assignments.csv and sheets/ from the saved model
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from imgcluster.config import TrainConfig
from imgcluster.data import DEFAULT_MAX_PIXELS, ImageSet, load_image_set, scan_folder, write_bad_images
from imgcluster.inference import assign_images, write_assignments, write_sheets
from imgcluster.rundir import RunDir, load_model


class NoUsableImages(RuntimeError):
    """The folder has no usable image, fewer than the clusters asked for, or (--strict) any bad file (exit 3)."""


def resolve_device(name: str) -> torch.device:
    """'auto' -> CUDA when present, else CPU. Raises ValueError for a device that is not here."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device: unknown device '{name}' (use auto, cpu, cuda or cuda:N)") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {name}: CUDA is not available on this machine (torch {torch.__version__})")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) here")
    elif device.type != "cpu":
        raise ValueError(f"--device: unsupported device '{name}' (use auto, cpu, cuda or cuda:N)")
    return device


def cache_size(cfg: TrainConfig) -> int:
    from imgcluster.methods import METHODS

    return METHODS[cfg.method].cache_size(cfg)


def prepare_images(data_dir: Path, size: int, *, files: list[str] | None = None, strict: bool = False,
                   max_pixels: int | None = DEFAULT_MAX_PIXELS,
                   progress: Callable[[int, int], None] | None = None) -> ImageSet:
    """Scan (unless `files` is given) and decode every file once into the uint8 cache.

    `strict` makes any unusable file an error; `max_pixels` is the decompression-bomb limit.
    """
    files = files if files is not None else scan_folder(data_dir)
    if not files:
        raise NoUsableImages(f"{data_dir}: no usable images (no files found; hidden files are skipped)")
    images = load_image_set(data_dir, size, files=files, max_pixels=max_pixels, progress=progress)
    bad = images.bad()
    if strict and bad:
        path, reason = bad[0]
        more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
        raise NoUsableImages(f"{data_dir / path}: {reason}{more}; --strict stops on any unusable file")
    return images


def record_bad_images(run: RunDir, images: ImageSet) -> int:
    """Write RUN_DIR/bad_images.csv (header only when every file is usable); returns the count."""
    run.make()
    return write_bad_images(run.bad_images, images)


def check_usable(images: ImageSet, clusters: int) -> None:
    usable = int(images.ok.sum())
    if usable == 0:
        raise NoUsableImages(f"{images.root}: no usable images among {len(images.files)} files")
    if usable < clusters:
        raise NoUsableImages(f"{images.root}: {usable} usable images, fewer than the {clusters} clusters asked for")


def finish_run(run: RunDir, device: torch.device, images: ImageSet, batch_size: int = 256) -> dict:
    """Assign the training images and draw every cluster's sheet, from the saved model alone."""
    cfg, method = load_model(run, device)
    tmp = run.assignments.with_name(run.assignments.name + ".tmp")
    with open(tmp, "w", newline="", encoding="utf-8", errors="surrogateescape") as f:
        rows = write_assignments(assign_images(method, images, batch_size), f)
    tmp.replace(run.assignments)
    write_sheets(method, images, rows, run.sheets, seed=cfg.seed)
    used = len({r.cluster for r in rows if r.cluster is not None})
    return {"images": sum(r.cluster is not None for r in rows), "clusters_used": used,
            "bad": sum(r.cluster is None for r in rows)}
