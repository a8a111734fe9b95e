"""The data folder: find files, decode them with one loader policy, and cache them as uint8 arrays.

Every file under DATA_DIR is decoded and resized once into `<cache>/<key>.npy` (a memory-mapped
(N, size, size, 3) uint8 array) plus `<key>.json` (file list, ok flags, reasons), so training never
decodes an image per step. A file that cannot be used never stops anything: it gets a zero row,
ok=False and a one-line reason, which ends up in bad_images.csv and in the `error` column of
assignments.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import multiprocessing
import os
import re
import stat
import time
import warnings
from concurrent.futures import BrokenExecutor, ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image, ImageOps

CACHE_FORMAT = 1
DEFAULT_MAX_PIXELS = 2 * 89_478_485   # Pillow's own hard limit (2 x Image.MAX_IMAGE_PIXELS default)
SEQUENTIAL_BELOW = 512                # fewer files than this: decode in this process
CHUNK = 256                           # most files per worker task

log = logging.getLogger(__name__)


class DataError(Exception):
    """A usage problem with the data folder (missing, not a folder, empty). Message is one line naming the path."""


class BadImage(Exception):
    """One file cannot be used; str(e) is the short reason, e.g. 'truncated file', 'not an image'."""


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


def load_image(path, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Open one file by content and return it as a fully loaded 8-bit RGB image, or raise BadImage.

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


def _decode_one(root: Path, rel: str, size: int, max_pixels) -> tuple[np.ndarray | None, str]:
    try:
        return resize_square(load_image(root / rel, max_pixels), size), ""
    except BadImage as e:
        return None, str(e)
    except OSError as e:               # vanished / permission between steps; never stops the build
        return None, f"unreadable: {e.strerror or e}"


def _decode_chunk(root: Path, rels: list[str], size: int, max_pixels) -> tuple[np.ndarray, list[str]]:
    """Worker task: decode `rels` into a (len, size, size, 3) block; bad rows stay zero."""
    block = np.zeros((len(rels), size, size, 3), np.uint8)
    reasons = []
    for i, rel in enumerate(rels):
        row, reason = _decode_one(root, rel, size, max_pixels)
        if row is not None:
            block[i] = row
        reasons.append(reason)
    return block, reasons


def _cache_key(root: Path, files: list[str], size: int, max_pixels) -> str:
    """sha256 over the format, size, pixel limit, the folder's real path and each file's (path, size, mtime)."""
    entries = []
    for rel in files:
        try:
            st = os.stat(root / rel)
            entries.append([rel, st.st_size, st.st_mtime_ns])
        except OSError:
            entries.append([rel, -1, -1])
    material = [CACHE_FORMAT, size, max_pixels, os.path.realpath(root), entries]
    return hashlib.sha256(json.dumps(material).encode("ascii")).hexdigest()


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


def _atomic_write(path: Path, write: Callable) -> None:
    """write(f) into '<path>.tmp-<pid>', flush + fsync, then rename over `path`."""
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _decode_all(root, files, size, max_pixels, workers, progress, put_block) -> list[str]:
    """Decode every file in order, handing (start, block, reasons) to put_block; returns the reasons."""
    n, reasons = len(files), []
    chunk = max(16, min(CHUNK, -(-n // (workers * 4))))
    starts = list(range(0, n, chunk))
    if progress:
        progress(0, n)

    def done(start, block, rs):
        put_block(start, block)
        reasons.extend(rs)
        if progress:
            progress(len(reasons), n)

    if workers > 1 and n >= SEQUENTIAL_BELOW:
        if _decode_parallel(root, files, size, max_pixels, workers, starts, chunk, done):
            return reasons
    for s in range(len(reasons), n):           # one file at a time, resuming after any parallel chunks
        done(s, *_decode_chunk(root, files[s:s + 1], size, max_pixels))
    return reasons


def _decode_parallel(root, files, size, max_pixels, workers, starts, chunk, done) -> bool:
    """Decode chunks in worker processes, passing results to done() in order; False if the pool broke.

    Workers come from 'forkserver' (or 'spawn'), never a fork of this process, which may hold CUDA
    state or threads (a progress bar) whose locks a forked child would inherit.
    """
    methods = multiprocessing.get_all_start_methods()
    context = multiprocessing.get_context("forkserver" if "forkserver" in methods else "spawn")
    pool = None
    try:
        pool = ProcessPoolExecutor(workers, mp_context=context)
        jobs = pool.map(_decode_chunk, *zip(*[(root, files[s:s + chunk], size, max_pixels) for s in starts]))
    except (BrokenExecutor, OSError) as e:      # no semaphores / cannot start processes
        log.warning("cannot start decoding workers (%s); decoding in one process", e)
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
        return False
    with pool:
        for s in starts:
            try:
                block, reasons = next(jobs)     # map() yields in order, so rows stream out in order
            except (BrokenExecutor, OSError) as e:
                log.warning("parallel decoding failed (%s); finishing in one process", e)
                pool.shutdown(wait=True, cancel_futures=True)
                return False
            done(s, block, reasons)             # errors here (disk full) are the caller's, not the pool's
    return True


def load_image_set(root, size: int, *, cache_dir: Path | None = None, files: list[str] | None = None,
                   max_pixels=DEFAULT_MAX_PIXELS, workers: int | None = None,
                   progress: Callable[[int, int], None] | None = None) -> ImageSet:
    """Decode and resize every file once into a uint8 cache (or reuse a matching cache); see module doc.

    The .npy is streamed to a temporary file with ordinary writes (a full disk is an OSError, not a
    SIGBUS from a sparse memmap), fsynced and renamed; the JSON is renamed last, so a crash never
    leaves a cache that a later run trusts. If the cache cannot be written, the set is kept in memory.
    """
    root = Path(root)
    _check_root(root)
    files = scan_folder(root) if files is None else list(files)
    if not files:
        raise DataError(f"{root}: no files found (the folder is empty or holds only hidden files)")
    if workers is None:                 # the CPUs this process may use (containers), at most 8
        workers = min(len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1, 8)
    workers = max(1, workers)
    n, shape = len(files), (len(files), size, size, 3)
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    key = _cache_key(root, files, size, max_pixels)
    npy, meta = cache_dir / f"{key}.npy", cache_dir / f"{key}.json"

    hit = _read_cache(npy, meta, files, size)
    if hit is None:
        try:
            cache_dir.mkdir(parents=True, exist_ok=True)
            _remove_stale_temps(cache_dir, key)
            hit = _build_cache(root, files, size, max_pixels, workers, progress, npy, meta)
        except OSError as e:
            log.warning("cannot write image cache in %s (%s); keeping images in memory", cache_dir, e.strerror or e)
            images = np.zeros(shape, np.uint8)

            def put_block(start, block):
                images[start:start + len(block)] = block

            reasons = _decode_all(root, files, size, max_pixels, workers, progress, put_block)
            images.flags.writeable = False
            hit = images, np.array([not r for r in reasons], dtype=bool), reasons
    elif progress:
        progress(n, n)
    images, ok, reasons = hit
    return ImageSet(root=root, files=files, size=size, images=images, ok=ok, reasons=reasons)


def _build_cache(root, files, size, max_pixels, workers, progress, npy: Path, meta: Path):
    shape = (len(files), size, size, 3)
    reasons: list[str] = []

    def write_npy(f):
        np.lib.format.write_array_header_1_0(f, {"descr": "|u1", "fortran_order": False, "shape": shape})
        reasons.extend(_decode_all(root, files, size, max_pixels, workers, progress,
                                   lambda s, block: f.write(block.tobytes())))

    _atomic_write(npy, write_npy)
    ok = [not r for r in reasons]
    info = {"format": CACHE_FORMAT, "files": files, "ok": ok, "reasons": reasons, "size": size, "root": str(root)}
    _atomic_write(meta, lambda f: f.write(json.dumps(info).encode("ascii")))   # last: marks the cache complete
    return np.load(npy, mmap_mode="r"), np.array(ok, dtype=bool), reasons


def _remove_stale_temps(cache_dir: Path, key: str, max_age_s: float = 3600.0) -> None:
    """Temporary files of this key left by a crashed build (untouched for an hour) are deleted."""
    for tmp in cache_dir.glob(f"{key}.*.tmp-*"):
        try:
            if time.time() - tmp.stat().st_mtime > max_age_s:
                tmp.unlink()
        except OSError:
            pass


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
