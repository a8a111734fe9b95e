"""The data folder: find files, decode them with one loader policy, and cache them as uint8 arrays.

Every file under DATA_DIR is decoded and resized once into `<cache>/<name>.npy` (a memory-mapped
(N, size, size, 3) uint8 array) plus `<name>.json` (file list, each file's size and mtime, ok flags,
reasons), so training never decodes an image per step. The name hashes the folder, the size, the pixel
limit and every file's (path, size, mtime); when files are added, changed or removed, the new cache
copies the rows of unchanged files from the folder's previous cache and decodes only the rest. A file
that cannot be used never stops anything: it gets a zero row, ok=False and a one-line reason, which
ends up in bad_images.csv and in the `error` column of assignments.
"""

from __future__ import annotations

import base64
import csv
import hashlib
import json
import logging
import multiprocessing
import os
import re
import stat
import threading
import time
import warnings
from collections import deque
from collections.abc import Iterator
from concurrent.futures import BrokenExecutor, ProcessPoolExecutor
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Callable

import numpy as np
from PIL import Image, ImageOps

from imgcluster.checkpoint import atomic_write
from imgcluster.handoff import Handoff

CACHE_FORMAT = 3                      # 2: names start with a folder id, the JSON holds each file's size and mtime;
                                      # 3: large JPEGs decoded at a reduced scale (DRAFT_MARGIN)
DRAFT_MARGIN = 4                      # a JPEG at least this many times the cached side is decoded at 1/2-1/8 scale
DEFAULT_MAX_PIXELS = 2 * 89_478_485   # Pillow's own hard limit (2 x Image.MAX_IMAGE_PIXELS default)
SEQUENTIAL_BELOW = 512                # fewer files than this: decode in this process
CHUNK = 256                           # most files per worker task
IN_FLIGHT_PER_WORKER = 2              # decoded chunks waiting per worker, at most: bounds memory
SYNC_EVERY = 64 << 20                 # bytes of a cache build written, then sent to disk in the background
BUILD_AHEAD = 256 << 20               # bytes of rows a BackgroundBuild holds for a reader not ready yet

log = logging.getLogger(__name__)


class DataError(Exception):
    """A usage problem with the data folder (missing, not a folder, empty). Message is one line naming the path."""


class NoUsableImages(RuntimeError):
    """The folder has no usable image, fewer than the clusters asked for, or (--strict) any bad file (exit 3)."""


class BadImage(Exception):
    """One file cannot be used; str(e) is the short reason, e.g. 'truncated file', 'not an image'."""


class CacheWriteError(OSError):
    """Rows of a cache being built could not be written (a full disk), in a worker or in this process:
    the build is not a decoding failure, and keeps the set in memory as any failed cache write does."""


# ---------------------------------------------------------------------------------------------
# Scanning
# ---------------------------------------------------------------------------------------------

def _check_root(root: Path) -> None:
    if not root.exists():
        raise DataError(f"{root}: no such folder")
    if not root.is_dir():
        raise DataError(f"{root}: not a folder")


def scan_folder(root: Path | str) -> list[str]:
    """Every usable file under `root`, recursively, as sorted POSIX paths relative to `root`.

    Names starting with '.' (files and folders) are skipped. Symlinks to files are listed, and so are
    dangling symlinks (so they are reported as unreadable rather than silently dropped); symlinks to
    directories are NOT followed, so symlink loops cannot hang the scan. FIFOs, sockets and devices
    are skipped (opening a FIFO would block). Names that are not valid UTF-8 come back as
    os.fsdecode strings (surrogateescape), which open() accepts unchanged. A subfolder that cannot
    be read is skipped with a logged warning.
    """
    root = Path(root)
    _check_root(root)
    found: list[str] = []
    pending = [""]                      # relative folders still to read; "" is root itself
    while pending:
        rel_dir = pending.pop()
        try:
            with os.scandir(root / rel_dir if rel_dir else root) as entries:
                entries = list(entries)
        except OSError as e:
            if not rel_dir:
                raise DataError(f"{root}: cannot read folder: {e.strerror}") from None
            log.warning("%s: skipping unreadable folder: %s", root / rel_dir, e.strerror)
            continue
        for entry in entries:
            name = os.fsdecode(entry.name)
            if name.startswith("."):
                continue
            rel = f"{rel_dir}/{name}" if rel_dir else name
            try:
                if entry.is_dir(follow_symlinks=False):
                    pending.append(rel)
                elif entry.is_file(follow_symlinks=True):
                    found.append(rel)
                elif entry.is_symlink() and not os.path.exists(entry.path):
                    found.append(rel)   # dangling link: listed, later 'unreadable'
            except OSError:
                continue                # vanished while scanning
    found.sort()
    return found


# ---------------------------------------------------------------------------------------------
# Loading one image
# ---------------------------------------------------------------------------------------------

_PILLOW_BOMB = re.compile(r"\((\d+) pixels\) exceeds limit of (\d+)")


def load_image(path, max_pixels: int | None = DEFAULT_MAX_PIXELS, *, draft_side: int | None = None) -> Image.Image:
    """Open one file by content and return it as a fully loaded 8-bit RGB image, or raise BadImage.

    draft_side: a JPEG is decoded at the smallest of 1/8, 1/4 or 1/2 scale (libjpeg's DCT scaling,
    Pillow's draft) that keeps both sides at least draft_side, or in full when none does: decoding a
    12-megapixel photo at 1/4 scale takes a fraction of the time, and the antialiased resize to a
    side of at most draft_side / DRAFT_MARGIN that follows gives nearly the same pixels.

    Policy: decompression bombs are refused from the header, before decoding (width*height >
    max_pixels; None leaves only Pillow's own hard limit of 2 x Image.MAX_IMAGE_PIXELS); animated
    files give their first frame; EXIF orientation is applied (corrupt EXIF is ignored); alpha and
    palette transparency are composited over white; 16-bit and 32-bit grey are scaled by their bit
    depth; ICC profiles are ignored. Pillow warnings are silenced; every failure is a BadImage.
    """
    try:
        st = os.stat(path)
        if not stat.S_ISREG(st.st_mode):
            raise BadImage("not a regular file")
        if st.st_size == 0:
            raise BadImage("zero-byte file")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(path) as img:
                w, h = img.size
                if max_pixels is not None and w * h > max_pixels:
                    raise BadImage(f"decompression bomb: {w}x{h} = {w * h} pixels exceeds limit of {max_pixels}")
                if draft_side and img.format == "JPEG":
                    img.draft(None, (draft_side, draft_side))
                img.load()
                try:
                    oriented = ImageOps.exif_transpose(img)
                except Exception:
                    oriented = img      # unreadable EXIF: keep the pixels as stored
                rgb = _to_rgb(oriented)
                return rgb.copy() if rgb is img else rgb
    except BadImage:
        raise
    except Image.DecompressionBombError as e:
        m = _PILLOW_BOMB.search(str(e))
        detail = f"{m.group(1)} pixels exceeds limit of {m.group(2)}" if m else str(e)
        raise BadImage(f"decompression bomb: {detail}") from None
    except Image.UnidentifiedImageError:
        raise BadImage("not an image") from None
    except (EOFError, OSError) as e:
        if isinstance(e, OSError) and e.errno is not None:
            raise BadImage(f"unreadable: {e.strerror}") from None   # permission, vanished, I/O error
        if isinstance(e, EOFError) or "truncated" in str(e).lower():
            raise BadImage("truncated file") from None
        raise BadImage(_one_line(f"corrupt image: {e}")) from None
    except Exception as e:             # SyntaxError, ValueError, struct.error, MemoryError ...
        raise BadImage(_one_line(f"corrupt image: {type(e).__name__}: {e}")) from None


def _one_line(text: str, limit: int = 200) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _to_rgb(img: Image.Image) -> Image.Image:
    """Any Pillow mode -> 8-bit RGB (see load_image for the policy)."""
    mode = img.mode
    if mode.startswith("I") or mode.startswith("F"):
        return Image.fromarray(_scale_to_uint8(np.asarray(img), mode), "L").convert("RGB")
    if mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info:
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    if mode == "RGB":
        return img
    try:
        return img.convert("RGB")      # '1', 'L', 'P', 'CMYK', 'YCbCr', 'RGBX', ...
    except ValueError:
        raise BadImage(f"unsupported colour mode {mode}") from None


def _scale_to_uint8(a: np.ndarray, mode: str) -> np.ndarray:
    """Grey of more than 8 bits -> uint8 by bit depth: 16-bit divides by 257 (65535 -> 255)."""
    a = np.nan_to_num(a.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
    top = float(a.max()) if a.size else 0.0
    if mode.startswith("I;16"):
        full = 65535.0
    elif mode == "F" and top <= 1.0:
        full = 1.0                     # float images in [0, 1]
    else:                              # 'I' / 'F': smallest standard depth that holds the data
        full = next((f for f in (255.0, 65535.0) if top <= f), max(top, 1.0))
    return np.clip(np.floor(a * (255.0 / full) + 0.5), 0, 255).astype(np.uint8)


def resize_square(img: Image.Image, size: int) -> np.ndarray:
    """Resize the short side to `size` (antialiased bicubic), centre-crop to size x size -> uint8 (size, size, 3).

    The crop is applied as the resize's source box, which gives the same pixels as resize-then-crop
    without building a huge intermediate for very thin images (1x4000 -> size x 4000*size).
    """
    if img.mode != "RGB":
        img = img.convert("RGB")
    w, h = img.size
    side = min(w, h)
    left, top = (w - side) // 2, (h - side) // 2
    out = img.resize((size, size), Image.Resampling.BICUBIC, box=(left, top, left + side, top + side),
                     reducing_gap=3.0)
    return np.ascontiguousarray(np.asarray(out, dtype=np.uint8))


# ---------------------------------------------------------------------------------------------
# The cached image set
# ---------------------------------------------------------------------------------------------

@dataclass
class ImageSet:
    root: Path
    files: list[str]              # relative paths, as scan_folder returned them
    size: int                     # side of the cached images
    images: np.ndarray            # (N, size, size, 3) uint8, read-only memmap; rows of bad files are zeros
    ok: np.ndarray                # (N,) bool
    reasons: list[str]            # '' for good files, else the BadImage reason

    @property
    def good_indices(self) -> np.ndarray:
        return np.flatnonzero(self.ok)

    def bad(self) -> list[tuple[str, str]]:
        return [(f, r) for f, r, ok in zip(self.files, self.reasons, self.ok) if not ok]


def default_cache_dir() -> Path:
    """$IMGCLUSTER_CACHE, else $XDG_CACHE_HOME/imgcluster, else ~/.cache/imgcluster."""
    if os.environ.get("IMGCLUSTER_CACHE"):
        return Path(os.environ["IMGCLUSTER_CACHE"]).expanduser()
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]).expanduser() / "imgcluster"
    return Path.home() / ".cache" / "imgcluster"


def usable_cpus() -> int:
    """The CPUs this process may use (its affinity: containers, taskset)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def default_workers() -> int:
    """Decoding processes of a cache build: one per usable CPU, at most 8."""
    return min(usable_cpus(), 8)


def _decode_one(root: Path, rel: str, size: int, max_pixels) -> tuple[np.ndarray | None, str]:
    try:
        return resize_square(load_image(root / rel, max_pixels, draft_side=DRAFT_MARGIN * size), size), ""
    except BadImage as e:
        return None, str(e)
    except OSError as e:               # vanished / permission between steps; never stops the build
        return None, f"unreadable: {e.strerror or e}"


def _decode_chunk(root: Path, rels: list[str], size: int, max_pixels, out: _RowFile | None = None,
                  rows: np.ndarray | None = None) -> tuple[np.ndarray | None, list[str]]:
    """Worker task: decode `rels` into a (len, size, size, 3) block; bad rows stay zero. With `out`, the
    block is written to rows `rows` of the cache file being built and None is returned in its place."""
    block = np.zeros((len(rels), size, size, 3), np.uint8)
    reasons = []
    for i, rel in enumerate(rels):
        row, reason = _decode_one(root, rel, size, max_pixels)
        if row is not None:
            block[i] = row
        reasons.append(reason)
    if out is None:
        return block, reasons
    out.write(rows, block)
    return None, reasons


def _decode_stream(root, rels, size, max_pixels, workers, out: _RowFile | None = None,
                   rows: np.ndarray | None = None) -> Iterator[tuple[np.ndarray | None, list[str]]]:
    """Decode `rels` in order, yielding (block, reasons) pieces: chunks from worker processes when there
    are enough files, else one file at a time in this process, which also finishes if the pool breaks.
    With `out`, each piece is written to its rows `rows` of the cache file first, by whoever decoded
    it, and its block is None."""
    n, done = len(rels), 0
    if workers > 1 and n >= SEQUENTIAL_BELOW:
        chunk = max(16, min(CHUNK, -(-n // (workers * 4))))
        for block, reasons in _decode_parallel(root, rels, size, max_pixels, workers, chunk, out, rows):
            done += len(reasons)
            yield block, reasons
    for s in range(done, n):
        yield _decode_chunk(root, rels[s:s + 1], size, max_pixels, out, None if rows is None else rows[s:s + 1])


def _decode_parallel(root, rels, size, max_pixels, workers, chunk, out: _RowFile | None = None,
                     rows: np.ndarray | None = None) -> Iterator[tuple[np.ndarray | None, list[str]]]:
    """Decode chunks of `rels` in worker processes, yielding them in order; ends early, with a logged
    warning, if the pool cannot start or breaks (the caller decodes the rest itself).

    At most IN_FLIGHT_PER_WORKER chunks per worker are decoded ahead of the reader, so memory stays
    bounded however slowly the rows are used. Workers come from 'forkserver' (or 'spawn'), never a fork
    of this process, which may hold CUDA state or threads (a progress bar) whose locks a forked child
    would inherit.
    """
    methods = multiprocessing.get_all_start_methods()
    context = multiprocessing.get_context("forkserver" if "forkserver" in methods else "spawn")
    if "forkserver" in methods:
        # The server imports this module once, and every worker forks from it ready to decode. By default
        # it imports the program's __main__ instead (for `imgcluster`: typer and rich), and each worker
        # imports numpy and Pillow on its first task.
        context.set_forkserver_preload([__name__])
    try:
        pool = ProcessPoolExecutor(workers, mp_context=context)
    except (BrokenExecutor, OSError) as e:      # no semaphores / cannot start processes
        log.warning("cannot start decoding workers (%s); decoding in one process", e)
        return
    pending: deque = deque()
    try:
        for s in range(0, len(rels), chunk):
            piece = None if rows is None else rows[s:s + chunk]
            pending.append(pool.submit(_decode_chunk, root, rels[s:s + chunk], size, max_pixels, out, piece))
            if len(pending) >= workers * IN_FLIGHT_PER_WORKER:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    except CacheWriteError:                     # the disk, not the pool: the build fails over to memory
        raise
    except (BrokenExecutor, OSError) as e:
        log.warning("parallel decoding failed (%s); finishing in one process", e)
    finally:                                    # also when the reader stops early (error, Ctrl-C)
        pool.shutdown(wait=True, cancel_futures=True)


# ---------------------------------------------------------------------------------------------
# Cache files: names, the earlier cache of a folder, crash leftovers
# ---------------------------------------------------------------------------------------------

@dataclass
class _EarlierCache:
    """A complete cache of the same folder, size and pixel limit, made from another file list."""
    files: list[str]
    stats: np.ndarray             # (N, 2) int64, as _stat_files
    reasons: list[str]
    npy: BinaryIO                 # its .npy, open: an open file outlives its deletion by another process
    offset: int                   # where the rows start in it
    size: int

    def rows(self, index: np.ndarray) -> np.ndarray:
        """Rows `index` as (len, size, size, 3) uint8, one read per run of consecutive rows.

        Plain reads, not the memmap: pages read through a memmap count in this process's resident
        set, which would grow to the whole earlier cache during a rebuild.
        """
        out = np.empty((len(index), self.size, self.size, 3), np.uint8)
        row_bytes = out[0].nbytes
        for a, b in _consecutive(index):
            self.npy.seek(self.offset + int(index[a]) * row_bytes)
            if self.npy.readinto(memoryview(out[a:b]).cast("B")) != (b - a) * row_bytes:
                raise OSError(f"{self.npy.name}: cut short")
        return out


def _stat_files(root: Path, files: list[str]) -> np.ndarray:
    """(N, 2) int64: each file's size and mtime_ns, -1 when it cannot be stat'ed: what tells a changed file."""
    base, stats = os.fspath(root), []
    for rel in files:
        try:
            st = os.stat(os.path.join(base, rel))
            stats.append((st.st_size, st.st_mtime_ns))
        except OSError:
            stats.append((-1, -1))
    return np.array(stats, dtype=np.int64).reshape(len(files), 2)


def _pack_stats(stats: np.ndarray) -> str:
    """Stats as base64 of little-endian int64 pairs: one JSON string parses in no time, where 100k
    small lists would slow down every reuse of the cache (which needs only the file list)."""
    return base64.b64encode(stats.astype("<i8").tobytes()).decode("ascii")


def _unpack_stats(text: str) -> np.ndarray:
    return np.frombuffer(base64.b64decode(text), dtype="<i8").reshape(-1, 2).astype(np.int64)


def _folder_id(real_root: str, size: int, max_pixels, cache_format: int = CACHE_FORMAT) -> str:
    """sha256 (hex) over the format, size, pixel limit and the folder's real path."""
    return hashlib.sha256(json.dumps([cache_format, size, max_pixels, real_root]).encode("ascii")).hexdigest()


def _cache_name(real_root: str, size: int, max_pixels, files: list[str], stats: np.ndarray) -> tuple[str, str]:
    """(folder id, name): name = '<folder id>-<sha256 of everything>'.

    The folder id (the first 16 hex digits of _folder_id) starts the name of every cache of that
    folder at that size, so a rebuild finds the earlier one by name.
    """
    folder = _folder_id(real_root, size, max_pixels)
    digest = hashlib.sha256(folder.encode("ascii"))
    digest.update(json.dumps(files).encode("ascii"))
    digest.update(stats.astype("<i8").tobytes())
    return folder[:16], f"{folder[:16]}-{digest.hexdigest()}"


def _read_cache(npy: Path, meta: Path, files: list[str], size: int):
    """(images, ok, reasons) from a complete cache whose file list matches, else None."""
    try:
        info = json.loads(meta.read_text(encoding="ascii"))
        if info.get("format") != CACHE_FORMAT or info["files"] != files or info["size"] != size:
            return None
        images = np.load(npy, mmap_mode="r")
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if images.shape != (len(files), size, size, 3) or images.dtype != np.uint8:
        return None
    return images, np.asarray(info["ok"], dtype=bool), list(info["reasons"])


def _earlier_cache(cache_dir: Path, folder: str, name: str, real_root: str, size: int,
                   max_pixels) -> _EarlierCache | None:
    """The newest complete cache of the same folder, size and pixel limit, other than `name`, or None."""
    dated = []
    for meta in cache_dir.glob(f"{folder}-*.json"):
        try:
            dated.append((meta.stat().st_mtime_ns, meta))
        except OSError:
            continue                            # deleted by another process meanwhile
    for _, meta in sorted(dated, reverse=True):
        if meta.stem == name:
            continue                            # this very file list: unreadable, or it would have been used
        try:
            info = json.loads(meta.read_text(encoding="ascii"))
            if (info.get("format") != CACHE_FORMAT or info["real_root"] != real_root or info["size"] != size
                    or info["max_pixels"] != max_pixels):
                continue
            files, stats, reasons = info["files"], _unpack_stats(info["stats"]), info["reasons"]
            npy = open(cache_dir / f"{meta.stem}.npy", "rb")
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if len(stats) == len(reasons) == len(files) and _holds_rows(npy, len(files), size):
            return _EarlierCache(files, stats, reasons, npy, npy.tell(), size)
        npy.close()
    return None


def _holds_rows(npy: BinaryIO, n: int, size: int) -> bool:
    """Whether the open .npy holds (n, size, size, 3) uint8 rows in full; leaves it at the first row."""
    try:
        np.lib.format.read_magic(npy)
        header = np.lib.format.read_array_header_1_0(npy)
        length = os.fstat(npy.fileno()).st_size
    except (OSError, ValueError):
        return False
    return header == ((n, size, size, 3), False, np.dtype(np.uint8)) and length == npy.tell() + n * size * size * 3


def _remove_earlier_caches(cache_dir: Path, folder: str, keep: str) -> None:
    """Delete the folder's other caches (same size and pixel limit): the new one supersedes them.

    The JSON goes first, so a half-deleted cache is never trusted; a process that has the old .npy
    mapped (a training run) keeps reading it, as a deleted file lives on while it is open.
    """
    for meta in cache_dir.glob(f"{folder}-*.json"):
        if meta.stem == keep:
            continue
        try:
            meta.unlink()
            (cache_dir / f"{meta.stem}.npy").unlink(missing_ok=True)
        except OSError:
            pass


def _remove_older_formats(cache_dir: Path, real_root: str, size: int, max_pixels) -> None:
    """Delete the folder's caches of earlier formats, which this version never reads: format 2 at this
    size and pixel limit (found by its folder id), and format 1 (imgcluster 0.1.0, named '<64 hex>') at
    every size. Other folders' and other sizes' stay until those are cached again."""
    _remove_earlier_caches(cache_dir, _folder_id(real_root, size, max_pixels, cache_format=2)[:16], keep="")
    for meta in cache_dir.glob("*.json"):
        if len(meta.stem) != 64 or "-" in meta.stem:
            continue
        try:
            info = json.loads(meta.read_text(encoding="ascii"))
            root = info["root"]
            if info.get("format") != 1 or not os.path.isabs(root) or os.path.realpath(root) != real_root:
                continue
            meta.unlink()                       # the JSON first, as in _remove_earlier_caches
            (cache_dir / f"{meta.stem}.npy").unlink(missing_ok=True)
        except (OSError, ValueError, KeyError, TypeError):
            continue


def _remove_leftovers(cache_dir: Path, folder: str, max_age_s: float = 3600.0) -> None:
    """Files of this folder's caches left by a crashed build, untouched for an hour, are deleted: temp
    files, and a .npy whose JSON never came (the JSON is written last)."""
    for path in [*cache_dir.glob(f"{folder}-*.tmp-*"), *cache_dir.glob(f"{folder}-*.npy")]:
        try:
            if path.suffix == ".npy" and path.with_suffix(".json").exists():
                continue
            if time.time() - path.stat().st_mtime > max_age_s:
                path.unlink()
        except OSError:
            pass


def _atomic_write(path: Path, write: Callable) -> None:
    """write(f) into '<path>.tmp-<pid>' (several processes may build one cache), fsync, rename over `path`."""
    atomic_write(path, write, tmp_suffix=f".tmp-{os.getpid()}")


# ---------------------------------------------------------------------------------------------
# Building a cache: copy unchanged rows, decode the rest
# ---------------------------------------------------------------------------------------------

def _reuse_rows(files: list[str], stats: np.ndarray, earlier: _EarlierCache | None) -> np.ndarray:
    """For each file, its row in the earlier cache if it is there unchanged (same path, size and mtime), else -1.

    Rows of files that were unreadable are never reused: fixing a permission does not change the mtime.
    """
    if earlier is None or not earlier.files:
        return np.full(len(files), -1, dtype=np.int64)
    old = {rel: j for j, rel in enumerate(earlier.files)}
    source = np.array([old.get(rel, -1) for rel in files], dtype=np.int64)
    trusted = np.array([not r.startswith("unreadable") for r in earlier.reasons] + [False])   # [-1]: not there
    same = (earlier.stats[source] == stats).all(axis=1) & (stats[:, 0] >= 0) & trusted[source]
    return np.where(same, source, -1)


def _consecutive(index: np.ndarray) -> Iterator[tuple[int, int]]:
    """Maximal pieces [a, b) of `index` that are consecutive rows (index[a] + 1 == index[a + 1], ...)."""
    bounds = [0, *(np.flatnonzero(np.diff(index) != 1) + 1).tolist(), len(index)]
    return zip(bounds, bounds[1:])


@dataclass(frozen=True)
class _RowFile:
    """Row i of a cache file being built lies at offset + i * row_bytes of `path`.

    The decoding workers write their rows there themselves, with positional writes, so the pixels do
    not travel back to the building process through a pipe: before, that process received and wrote
    every row, 1.1-1.8 CPU-s of its own for 5,902 photos cached at 152 px, which no number of workers
    shortened (tests/bench/RESULTS.md). Plain writes, not a memmap: a full disk is an OSError, not a
    SIGBUS. The file is opened without O_CREAT: a build that was stopped has removed it.
    """
    path: str
    offset: int
    row_bytes: int

    def write(self, rows: np.ndarray, block: np.ndarray) -> None:
        """block[j] to row rows[j], one write per run of consecutive rows; CacheWriteError if it fails."""
        try:
            fd = os.open(self.path, os.O_WRONLY)
            try:
                for a, b in _consecutive(rows):
                    raw = memoryview(np.ascontiguousarray(block[a:b])).cast("B")
                    at = self.offset + int(rows[a]) * self.row_bytes
                    while raw:
                        n = os.pwrite(fd, raw, at)
                        raw, at = raw[n:], at + n
            finally:
                os.close(fd)
        except OSError as e:
            raise CacheWriteError(e.errno, e.strerror or str(e)) from None

    def read(self, start: int, count: int, size: int) -> np.ndarray:
        """Rows [start, start + count) as a (count, size, size, 3) uint8 array of their own."""
        out = np.empty((count, size, size, 3), np.uint8)
        with open(self.path, "rb", buffering=0) as f:
            f.seek(self.offset + start * self.row_bytes)
            if f.readinto(memoryview(out).cast("B")) != out.nbytes:
                raise OSError(f"{self.path}: cut short")
        return out


def _runs(flags: np.ndarray) -> Iterator[tuple[int, int, bool]]:
    """Maximal runs of equal values in a bool array, as (start, stop, value)."""
    edges = (np.flatnonzero(flags[1:] != flags[:-1]) + 1).tolist()
    bounds = [0, *edges, len(flags)]
    for start, stop in zip(bounds, bounds[1:]):
        yield start, stop, bool(flags[start])


def _cache_rows(root, files, size, max_pixels, workers, source: np.ndarray, earlier: _EarlierCache | None,
                out: _RowFile | None = None) -> Iterator[tuple[int, np.ndarray | None, list[str]]]:
    """Every row of the set, in order, as (start, block, reasons): rows with source >= 0 are copied from
    the earlier cache, the others decoded (in worker processes when there are many).

    With `out`, every row is in the cache file once it is yielded, and a decoded block is None (it was
    written by its worker and is read back only by whoever needs it)."""
    todo = np.flatnonzero(source < 0)
    decoded = _decode_stream(root, [files[i] for i in todo], size, max_pixels, workers, out,
                             None if out is None else todo)
    left = None                                 # (block, reasons) decoded but not handed out yet
    try:
        for start, stop, reuse in _runs(source >= 0):
            if reuse:
                for s in range(start, stop, CHUNK):
                    old = source[s:min(s + CHUNK, stop)]
                    block = earlier.rows(old)
                    if out is not None:
                        out.write(np.arange(s, s + len(old)), block)
                    yield s, block, [earlier.reasons[j] for j in old]
                continue
            s = start
            while s < stop:                     # decoded pieces may straddle runs: cut them to fit
                block, reasons = left if left is not None else next(decoded)
                m = min(stop - s, len(reasons))
                yield s, None if block is None else block[:m], reasons[:m]
                left = (None if block is None else block[m:], reasons[m:]) if m < len(reasons) else None
                s += m
    finally:
        decoded.close()                         # stops the worker pool if the reader stopped early


class _Delivery:
    """Hands each block of a build to `progress` and `on_rows`.

    A build that falls back to memory after a failed write starts over; on_rows still sees every row
    exactly once, in order.
    """

    def __init__(self, n: int, progress, on_rows):
        self.n, self.progress, self.on_rows = n, progress, on_rows
        self.seen = 0                           # rows on_rows has had

    def begin(self) -> None:
        if self.progress:
            self.progress(0, self.n)

    def __call__(self, start: int, block: np.ndarray, reasons: list[str]) -> None:
        stop = start + len(reasons)
        if self.on_rows is not None and stop > self.seen:
            skip = max(self.seen - start, 0)
            self.on_rows(start + skip, block[skip:], reasons[skip:])
            self.seen = stop
        if self.progress:
            self.progress(stop, self.n)


class _BackgroundSync:
    """Sends a file that is being written to disk in a thread, SYNC_EVERY bytes at a time, so the fsync
    that ends its atomic write waits for the last part only. Left to that fsync, a 693 MB cache (10,000
    images at 152 px) spent 1.2 s of a 7.6 s build in it (tests/bench/RESULTS.md). `finish` raises the
    error of a background sync: a later fsync of the file need not report it again."""

    def __init__(self, f: BinaryIO):
        self.f, self.unsent = f, 0
        self.thread: threading.Thread | None = None
        self.error: OSError | None = None

    def wrote(self, n: int) -> None:
        self.unsent += n
        if self.unsent < SYNC_EVERY or (self.thread is not None and self.thread.is_alive()):
            return
        self._raise()
        self.f.flush()
        self.unsent = 0
        self.thread = threading.Thread(target=self._sync, name="imgcluster-cache-sync", daemon=True)
        self.thread.start()

    def _sync(self) -> None:
        try:
            getattr(os, "fdatasync", os.fsync)(self.f.fileno())
        except OSError as e:
            self.error = e

    def wait(self) -> None:
        if self.thread is not None:
            self.thread.join()

    def finish(self) -> None:
        self.wait()
        self._raise()

    def _raise(self) -> None:
        if self.error is not None:
            raise self.error


def _build_cache(make_rows: Callable[[_RowFile], Iterator], npy: Path, meta: Path, info: dict, deliver: _Delivery):
    """Fill the .npy (temp file, fsync, rename) with the rows of make_rows(out), which writes each row
    into `out` before it yields it, then write the JSON, last: it marks the cache complete."""
    n, size = len(info["files"]), info["size"]
    shape = (n, size, size, 3)
    reasons: list[str] = []

    def write_npy(f):
        np.lib.format.write_array_header_1_0(f, {"descr": "|u1", "fortran_order": False, "shape": shape})
        f.flush()
        out = _RowFile(f.name, f.tell(), size * size * 3)
        os.ftruncate(f.fileno(), out.offset + n * out.row_bytes)         # rows land at their places, in any order
        deliver.begin()
        sync = _BackgroundSync(f)
        try:
            with closing(make_rows(out)) as rows:
                for start, block, rs in rows:
                    if block is None and deliver.on_rows is not None:
                        block = out.read(start, len(rs), size)
                    sync.wrote(len(rs) * out.row_bytes)
                    reasons.extend(rs)
                    deliver(start, block, rs)
        except BaseException:
            sync.wait()                         # before the temporary file is closed and removed
            raise
        sync.finish()

    _atomic_write(npy, write_npy)
    ok = [not r for r in reasons]
    info = {**info, "ok": ok, "reasons": reasons}
    _atomic_write(meta, lambda f: f.write(json.dumps(info).encode("ascii")))
    return np.load(npy, mmap_mode="r"), np.array(ok, dtype=bool), reasons


def _build_in_memory(rows, shape: tuple, deliver: _Delivery):
    """The set as a read-only in-memory array, for when the cache cannot be written."""
    images = np.zeros(shape, np.uint8)
    reasons: list[str] = []
    deliver.begin()
    with closing(rows):
        for start, block, rs in rows:
            images[start:start + len(rs)] = block
            reasons.extend(rs)
            deliver(start, block, rs)
    images.flags.writeable = False
    return images, np.array([not r for r in reasons], dtype=bool), reasons


def load_image_set(root, size: int, *, cache_dir: Path | None = None, files: list[str] | None = None,
                   max_pixels=DEFAULT_MAX_PIXELS, workers: int | None = None,
                   progress: Callable[[int, int], None] | None = None,
                   on_rows: Callable[[int, np.ndarray, list[str]], None] | None = None) -> ImageSet:
    """Decode and resize every file once into a uint8 cache (or reuse a matching cache); see module doc.

    A build copies the rows of files unchanged since the folder's newest earlier cache (same relative
    path, size and mtime; same folder, size and pixel limit) and decodes only new or changed files; once
    it is complete the earlier caches of the folder are deleted, and those of earlier formats too.
    `on_rows(start, block, reasons)` sees every row of a build once, in order, as it is produced, so a
    caller can use rows before the build ends; each block is the caller's to keep (no buffer the build
    reuses: rows the workers wrote are read back into an array of their own). It is not called when
    the cache is reused. The decoding workers keep the normal priority: lowered (nice 10) they gained
    nothing on an idle 2-core machine and made `assign` 4-6x slower on a busy one, where every other
    process came first (tests/bench/RESULTS.md).

    The .npy is written to a temporary file with ordinary positional writes, by the decoding workers for
    the rows they decode (a full disk is an OSError, not a SIGBUS from a sparse memmap), sent to disk in
    the background as it grows, fsynced and renamed; the JSON is renamed last, so a crash never leaves a
    cache that a later run trusts. If the cache cannot be written, the set is kept in memory.
    """
    root = Path(root)
    _check_root(root)
    files = scan_folder(root) if files is None else list(files)
    if not files:
        raise DataError(f"{root}: no files found (the folder is empty or holds only hidden files)")
    workers = max(1, default_workers() if workers is None else workers)
    n, shape = len(files), (len(files), size, size, 3)
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    real_root, stats = os.path.realpath(root), _stat_files(root, files)
    folder, name = _cache_name(real_root, size, max_pixels, files, stats)
    npy, meta = cache_dir / f"{name}.npy", cache_dir / f"{name}.json"

    hit = _read_cache(npy, meta, files, size)
    if hit is not None:
        if progress:
            progress(n, n)
        return ImageSet(root, files, size, *hit)

    deliver = _Delivery(n, progress, on_rows)
    earlier = None
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        _remove_leftovers(cache_dir, folder)
        earlier = _earlier_cache(cache_dir, folder, name, real_root, size, max_pixels)
        source = _reuse_rows(files, stats, earlier)
        info = {"format": CACHE_FORMAT, "files": files, "stats": _pack_stats(stats), "size": size,
                "max_pixels": max_pixels, "root": str(root), "real_root": real_root}
        hit = _build_cache(lambda out: _cache_rows(root, files, size, max_pixels, workers, source, earlier, out),
                           npy, meta, info, deliver)
        _remove_earlier_caches(cache_dir, folder, keep=name)
        _remove_older_formats(cache_dir, real_root, size, max_pixels)
    except OSError as e:
        log.warning("cannot write image cache in %s (%s); keeping images in memory", cache_dir, e.strerror or e)
        # every file decoded again: the error may have come from reading the earlier cache
        rows = _cache_rows(root, files, size, max_pixels, workers, _reuse_rows(files, stats, None), None)
        hit = _build_in_memory(rows, shape, deliver)
    finally:
        if earlier is not None:
            earlier.npy.close()
    return ImageSet(root, files, size, *hit)


class BackgroundBuild:
    """load_image_set of `files` in a thread, started before its reader is ready: a cold `assign` starts
    decoding, then imports torch and loads the model (2-3 s on a 2-core CPU) while the workers decode.

    The rows wait in memory for the reader, at most `ahead` bytes of them (one block more if a block is
    larger); past that the build waits. `rows()` yields every row block of a build once, in order (none
    when a complete cache is reused) and then raises the build's error, if any; `result()` is the
    ImageSet. `close()` stops a build that is still running (it unwinds as on any error: the temporary
    cache file is deleted, an earlier cache is kept) and waits for its thread; a reader must call it
    (also as a context manager). `done` is set once the build has ended.
    """

    def __init__(self, root: Path, size: int, files: list[str], *, max_pixels=DEFAULT_MAX_PIXELS,
                 ahead: int | None = None):
        self.root, self.size, self.files, self.max_pixels = Path(root), size, files, max_pixels
        self._set: ImageSet | None = None
        self._rows = Handoff(self._build, BUILD_AHEAD if ahead is None else ahead,
                             weigh=lambda row: row[1].nbytes, name="imgcluster-cache-build")
        self.done = self._rows.done

    def _build(self, put) -> None:
        self._set = load_image_set(self.root, self.size, files=self.files, max_pixels=self.max_pixels,
                                   on_rows=lambda start, block, reasons: put((start, block, list(reasons))))

    def rows(self) -> Iterator[tuple[int, np.ndarray, list[str]]]:
        return iter(self._rows)

    def result(self) -> ImageSet:
        """The set, once rows() is exhausted."""
        return self._set

    def close(self) -> None:
        self._rows.close()

    def __enter__(self) -> BackgroundBuild:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def write_bad_images(path: Path, image_set: ImageSet) -> int:
    """Write 'path,reason' rows for every bad file (header only when none); returns the row count.

    Non-UTF-8 names are written back as their original bytes (surrogateescape), so the paths in the
    CSV match the files on disk.
    """
    rows = image_set.bad()
    with open(path, "w", newline="", encoding="utf-8", errors="surrogateescape") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "reason"])
        writer.writerows(rows)
    return len(rows)


def typical_side(root: Path, files: list[str], sample: int = 64) -> int | None:
    """Median short side of up to `sample` files spread over the list, read from the headers only
    (no decoding); None when none of them opens as an image. Picks a preset's image size."""
    if not files:
        return None
    step = max(1, len(files) // sample)
    sides = []
    for rel in files[::step][:sample]:
        try:
            with Image.open(Path(root) / rel) as img:
                sides.append(min(img.size))
        except (OSError, ValueError, Image.DecompressionBombError):
            continue
    return int(np.median(sides)) if sides else None
