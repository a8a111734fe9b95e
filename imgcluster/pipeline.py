"""The steps of a run, importable without the CLI: images in, run directory out.

    images = prepare_images(data_dir, cfg)            scan + uint8 cache + bad_images list
    training.train(cfg, run, images, device)          the loop (checkpoints, metrics, samples, model)
    finish_run(run, device, images)                   assignments.csv and sheets/ from the saved model

    rows = assign_folder(method, data_dir, size)      `assign`: rows streamed during the cache build
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from imgcluster.config import TrainConfig
from imgcluster.data import (DEFAULT_MAX_PIXELS, BackgroundBuild, ImageSet, NoUsableImages, load_image_set,
                             scan_folder, usable_cpus, write_bad_images)
from imgcluster.assignments import Assignment, write_assignments
from imgcluster.inference import (SHEET_MEMBERS, BatchMaker, Upload, assign_batches, assign_images, read_ahead,
                                  set_batches, write_sheets)
from imgcluster.rundir import RunDir, load_model


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
        tally = write_assignments(assign_images(method, images, batch_size), f, keep=SHEET_MEMBERS)
    tmp.replace(run.assignments)
    write_sheets(method, images, tally.kept, run.sheets, seed=cfg.seed)
    return {"images": tally.assigned, "clusters_used": len(tally.clusters), "bad": tally.bad}


class FolderAssignments:
    """Iterate for one Assignment per file of a folder, in order; `images` is the folder's ImageSet
    once the iteration has ended. Made by assign_folder.

    A thread feeds the model. Given no ImageSet (a cold cache, overlapped), it reads the rows of a
    BackgroundBuild (decoding in worker processes, maybe started before the model was loaded) and hands
    over each batch as soon as its rows are decoded, so the model runs while later files are decoded;
    given one, it reads the next batches from the memmap (and copies them to the device) during the
    forward. Either way the model sees the same batches, so the rows are the same.
    """

    def __init__(self, method, data_dir: Path, size: int, files: list[str], *, batch_size: int,
                 max_pixels: int | None, progress: Callable[[int, int], None] | None,
                 images: ImageSet | None = None, build: BackgroundBuild | None = None):
        self.method, self.data_dir, self.size, self.files = method, data_dir, size, files
        self.batch_size, self.max_pixels, self.progress = batch_size, max_pixels, progress
        self.images, self.build = images, build

    def __iter__(self) -> Iterator[Assignment]:
        n = len(self.files)
        if self.images is None and self.build is None:
            self.build = BackgroundBuild(self.data_dir, self.size, self.files, max_pixels=self.max_pixels)
        try:
            before = self._share_cpus()
            try:
                for i, row in enumerate(assign_batches(self.method, self.files, read_ahead(self._feed)), 1):
                    if before and self.build.done.is_set():
                        torch.set_num_threads(before)
                        before = 0
                    if self.progress and (i % self.batch_size == 0 or i == n):
                        self.progress(i, n)
                    yield row
            finally:
                if before:
                    torch.set_num_threads(before)
        finally:
            if self.build is not None:
                self.build.close()              # stops a build still running (the reader stopped early)

    def _share_cpus(self) -> int:
        """A model on the CPU beside a cache build shares the cores with the decoding workers: torch runs
        on half of them until the build is done (the workers take the rest, and what it leaves idle).
        With all of them it competes with the workers, and the two together measured slower than one
        after the other (tests/bench/large_folder.py). Returns the thread count to restore, or 0."""
        if self.images is not None or self.method.device.type != "cpu":
            return 0
        before = torch.get_num_threads()
        torch.set_num_threads(max(1, min(before, usable_cpus() // 2)))
        return before

    def _feed(self, put) -> None:
        upload = Upload(self.method.device)
        if self.images is None:
            maker = BatchMaker(self.batch_size, put, upload)
            for start, block, reasons in self.build.rows():
                maker.add(start, block, reasons)
            self.images = self.build.result()
            if maker.seen:                      # built just now: every row went through the maker
                maker.finish()
                return
        for batch in set_batches(self.images, self.batch_size, upload):
            put(batch)


def assign_folder(method, data_dir: Path, size: int, *, batch_size: int = 256, strict: bool = False,
                  max_pixels: int | None = DEFAULT_MAX_PIXELS, overlap: bool = True,
                  progress: Callable[[int, int], None] | None = None,
                  build: BackgroundBuild | None = None) -> FolderAssignments:
    """Assign every file of a folder, streaming (see FolderAssignments); `progress` counts rows assigned.

    The folder is scanned now, so a missing or empty folder raises before the first row. `overlap`
    runs the model while the cache is built (on the CPU with half the cores until the build is done:
    about 10% faster than building first on 2 cores, tests/bench/large_folder.py). Without overlap, and
    with `strict`, the cache is built first, reporting to `progress` too; so with `strict` an unusable
    file stops everything before any row is written.

    `build` is a BackgroundBuild started from a hint before the model was loaded (`assign` starts one
    before it imports torch, so the workers decode while torch loads). It is used if it decodes this
    folder at this size and limit, without `strict`, and closed otherwise; the caller closes it if this
    raises.
    """
    if build is not None and (strict or not overlap or build.root != Path(data_dir) or build.size != size
                              or build.max_pixels != max_pixels):
        build.close()
        build = None
    files = build.files if build is not None else scan_folder(data_dir)
    if not files:
        raise NoUsableImages(f"{data_dir}: no usable images (no files found; hidden files are skipped)")
    images = None
    if strict or not overlap:
        images = prepare_images(data_dir, size, files=files, strict=strict, max_pixels=max_pixels, progress=progress)
    return FolderAssignments(method, data_dir, size, files, batch_size=batch_size, max_pixels=max_pixels,
                             progress=progress, images=images, build=build)
