"""Using a trained method: assign images to clusters, draw clusters, write sample sheets."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from imgcluster.assignments import Assignment
from imgcluster.data import ImageSet
from imgcluster.handoff import Handoff

SHEET_MEMBERS = 16          # real images per cluster on a sheet: write_sheets' per_row * real_rows
READ_AHEAD = 2              # batches read (and copied to the device) ahead of the model


# ---------------------------------------------------------------------------------------------
# Batches for the model, read ahead in a thread
# ---------------------------------------------------------------------------------------------

@dataclass
class Batch:
    """Files [start, start + len(reasons)) of a set, in order, with the pixels of the good ones among them.

    Each batch but the last ends at its batch_size-th good file, so the model sees the same batches
    whether the rows come from a finished cache or from a cache being built.
    """
    start: int
    reasons: list[str]                  # '' for a good file, else why it cannot be used
    pixels: torch.Tensor | None         # (good files, S, S, 3) uint8, on the method's device; None if none is good


class Upload:
    """Turns a uint8 batch into a tensor on `device`, from the read-ahead thread.

    On CUDA the copy goes through pinned memory on a side stream, so it overlaps the forward of the
    batch before (which runs on the default stream); elsewhere the batch stays on the CPU.
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None

    def __call__(self, pixels: np.ndarray) -> torch.Tensor:
        batch = torch.from_numpy(pixels)
        if self.stream is None:
            return batch
        with torch.cuda.stream(self.stream):
            batch = batch.pin_memory().to(self.device, non_blocking=True)
        self.stream.synchronize()                                  # whole before it is handed over
        batch.record_stream(torch.cuda.default_stream(self.device))   # memory not reused while the forward reads it
        return batch


def set_batches(images: ImageSet, batch_size: int, upload: Upload) -> Iterator[Batch]:
    """The batches of a finished set, reading only the good rows from the memmap."""
    good = images.good_indices
    start = 0
    for first in range(0, len(good), batch_size):
        rows = good[first:first + batch_size]
        stop = int(rows[-1]) + 1
        yield Batch(start, images.reasons[start:stop], upload(np.ascontiguousarray(images.images[rows])))
        start = stop
    if start < len(images.files):
        yield Batch(start, images.reasons[start:], None)


class BatchMaker:
    """Cuts the rows of a cache build (on_rows of load_image_set: blocks in file order) into the same
    batches as set_batches, and hands each to `put` as soon as it is complete."""

    def __init__(self, batch_size: int, put: Callable[[Batch], None], upload: Upload):
        self.batch_size, self.put, self.upload = batch_size, put, upload
        self.start = 0                          # first file of the batch being filled
        self.reasons: list[str] = []            # of files start, start + 1, ... so far
        self.pixels: list[np.ndarray] = []      # good rows so far, in pieces
        self.count = 0                          # good rows so far

    @property
    def seen(self) -> int:
        return self.start + len(self.reasons)

    def add(self, start: int, block: np.ndarray, reasons: list[str]) -> None:
        """Rows start, start + 1, ... of the set; they arrive in order."""
        good = [i for i, r in enumerate(reasons) if not r]
        cut = 0                                 # rows of this block before `cut` are in a full batch
        while good:
            room = self.batch_size - self.count
            take, good = good[:room], good[room:]
            self.pixels.append(block[take])
            self.count += len(take)
            if self.count == self.batch_size:   # full: the batch ends at its last good row
                self.reasons.extend(reasons[cut:take[-1] + 1])
                cut = take[-1] + 1
                self._hand_over()
        self.reasons.extend(reasons[cut:])

    def finish(self) -> None:
        if self.reasons:
            self._hand_over()

    def _hand_over(self) -> None:
        pixels = self.upload(np.concatenate(self.pixels)) if self.count else None
        self.put(Batch(self.start, self.reasons, pixels))
        self.start += len(self.reasons)
        self.reasons, self.pixels, self.count = [], [], 0


def read_ahead(produce: Callable[[Callable[[object], None]], None], depth: int = READ_AHEAD) -> Iterator:
    """Run produce(put) in a thread (once the first item is asked for) and yield what it puts, in order,
    at most `depth` items ahead.

    An error in the thread comes out here. If the reader stops early (an error, Ctrl-C), the thread's
    next put raises, so it unwinds (a cache build deletes its temporary file) before this returns.
    """
    yield from Handoff(produce, depth, name="imgcluster-read-ahead")


# ---------------------------------------------------------------------------------------------
# Assign
# ---------------------------------------------------------------------------------------------

def assign_batches(method, files: list[str], batches: Iterable[Batch]) -> Iterator[Assignment]:
    """One Assignment per file covered by the batches, in order; unusable files get their reason, no cluster."""
    for batch in batches:
        scores = iter(())
        if batch.pixels is not None:
            cluster, conf = method.assign(batch.pixels)
            scores = zip(cluster.tolist(), conf.tolist())
        for i, reason in enumerate(batch.reasons, batch.start):
            if reason:
                yield Assignment(files[i], None, None, reason)
            else:
                yield Assignment(files[i], *next(scores))


def assign_images(method, images: ImageSet, batch_size: int = 256) -> Iterator[Assignment]:
    """One Assignment per file of the set, in its order; unusable files get their reason, no cluster.

    A thread reads the next batches from the memmap (and copies them to the device) during the forward.
    """
    upload = Upload(method.device)

    def produce(put):
        for batch in set_batches(images, batch_size, upload):
            put(batch)

    return assign_batches(method, images.files, read_ahead(produce))


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
    from torchvision.utils import save_image          # here: importing torchvision costs about 2 s on 2 cores

    save_image(images, path, nrow=nrow, normalize=True, value_range=(-1, 1), padding=1)


def write_sheets(method, images: ImageSet, rows: Iterable[Assignment], out_dir: Path, *,
                 per_row: int = 8, real_rows: int = 2, seed: int = 0) -> list[Path]:
    """sheets/cluster-NNN.png: a row of generated samples above the cluster's most confident members.

    `rows` may be every row or only each cluster's SHEET_MEMBERS most confident, as Tally.kept gives.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    k = method.cfg.clusters
    rows = [row for row in rows if row.cluster is not None]
    wanted = {row.path for row in rows}
    index = {p: i for i, p in enumerate(images.files) if p in wanted}
    members: dict[int, list[tuple[float, int]]] = {c: [] for c in range(k)}
    for row in rows:
        if row.path in index:
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
