"""Large folders: the incremental cache, streamed `assign` (same rows as before), bounded row retention."""

from __future__ import annotations

import csv
import errno
import io
import json
import os
import random
import subprocess
import sys
import threading
import time
import weakref
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from imgcluster import data, handoff, inference, pipeline
from imgcluster.cli import app
from imgcluster.config import load_preset, resolve_config
from imgcluster.data import load_image_set, usable_cpus
from imgcluster.assignments import Assignment, write_assignments
from imgcluster.inference import SHEET_MEMBERS, BatchMaker, Upload, assign_images, set_batches, write_sheets
from imgcluster.methods import METHODS
from imgcluster.rundir import RunDir, save_config, save_model

CPU = torch.device("cpu")


# ---------------------------------------------------------------------------------------------
# Folders of real image files
# ---------------------------------------------------------------------------------------------

def write_image(path: Path, seed: int) -> Path:
    """A small picture (gradient + noise), PNG or JPEG by the name; a different one for each seed."""
    rng = np.random.default_rng(seed)
    w, h = (int(v) for v in rng.integers(6, 40, 2))
    ramp = np.linspace(0, 255, w, dtype=np.float64)[None, :, None] * rng.uniform(0.2, 1.0, 3)
    pixels = np.clip(ramp + rng.normal(0, 30, (h, w, 3)), 0, 255).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path, "JPEG" if path.suffix == ".jpg" else "PNG")
    return path


def write_bad_files(root: Path) -> list[str]:
    """A truncated JPEG, a zero-byte file and a text file; their relative paths."""
    jpeg = io.BytesIO()
    Image.new("RGB", (40, 40), (200, 10, 10)).save(jpeg, "JPEG")
    (root / "bad").mkdir(parents=True, exist_ok=True)
    (root / "bad" / "truncated.jpg").write_bytes(jpeg.getvalue()[: len(jpeg.getvalue()) // 2])
    (root / "bad" / "empty.png").write_bytes(b"")
    (root / "notes.txt").write_text("not a picture\n")
    return ["bad/empty.png", "bad/truncated.jpg", "notes.txt"]


def make_folder(root: Path, count: int, seed: int = 0) -> Path:
    for i in range(count):
        ext = "jpg" if i % 3 == 0 else "png"
        write_image(root / f"d{i % 4}" / ("deep/" if i % 5 == 0 else "") / f"img-{i:04d}.{ext}", seed * 10_000 + i)
    write_bad_files(root)
    return root


def same_set(a, b) -> None:
    assert a.files == b.files
    assert np.array_equal(a.images, b.images)
    assert a.ok.tolist() == b.ok.tolist() and a.reasons == b.reasons


def count_decodes(monkeypatch) -> list[str]:
    """Record every file decoded in this process (the tests decode with workers=1)."""
    decoded = []
    real = data._decode_one

    def counting(root, rel, size, max_pixels):
        decoded.append(rel)
        return real(root, rel, size, max_pixels)

    monkeypatch.setattr(data, "_decode_one", counting)
    return decoded


def cache_files(cache: Path) -> list[str]:
    return sorted(p.suffix for p in cache.iterdir())


# ---------------------------------------------------------------------------------------------
# The incremental cache
# ---------------------------------------------------------------------------------------------

def test_rebuild_decodes_only_new_and_changed_files_and_equals_a_fresh_build(tmp_path, monkeypatch):
    root = make_folder(tmp_path / "data", 40)
    cache = tmp_path / "cache"
    decoded = count_decodes(monkeypatch)
    first = load_image_set(root, 8, cache_dir=cache, workers=1)
    assert len(decoded) == len(first.files) == 43

    write_image(root / "d0" / "img-0000a.png", 101)          # new, sorted between existing files
    write_image(root / "new" / "deeper" / "x.jpg", 102)      # new, in a new folder
    write_image(root / "zz.png", 103)                         # new, last
    changed = root / "d1" / "img-0001.png"
    write_image(changed, 104)                                 # changed content
    os.utime(changed, ns=(1, 1))                              # ... and surely another mtime
    (root / "d2" / "img-0002.png").unlink()                  # deleted
    decoded.clear()
    progress = []
    again = load_image_set(root, 8, cache_dir=cache, workers=1, progress=lambda d, n: progress.append(d))
    assert sorted(decoded) == ["d0/img-0000a.png", "d1/img-0001.png", "new/deeper/x.jpg", "zz.png"]
    assert progress[0] == 0 and progress[-1] == len(again.files) == 45 and progress == sorted(progress)
    assert cache_files(cache) == [".json", ".npy"]              # the superseded cache is gone

    fresh = load_image_set(root, 8, cache_dir=tmp_path / "fresh", workers=1)
    same_set(again, fresh)
    assert again.reasons[again.files.index("bad/truncated.jpg")] == "truncated file"

    decoded.clear()
    warm = load_image_set(root, 8, cache_dir=cache, workers=1)
    assert decoded == [] and isinstance(warm.images, np.memmap)
    same_set(warm, fresh)


def test_rebuild_with_worker_processes_stitches_copied_and_decoded_runs(tmp_path):
    # 600 new files interleaved with 600 old ones: decoded chunks straddle the runs of copied rows
    root = tmp_path / "data"
    for i in range(0, 1200, 2):
        write_image(root / f"{i // 100}" / f"{i:04d}.png", i)
    cache = tmp_path / "cache"
    load_image_set(root, 6, cache_dir=cache, workers=2)
    for i in range(1, 1200, 2):
        write_image(root / f"{i // 100}" / f"{i:04d}.png", i)
    (root / "5" / "0501.png").write_bytes(b"junk")
    rows = []
    again = load_image_set(root, 6, cache_dir=cache, workers=2, on_rows=lambda s, b, r: rows.append((s, len(r))))
    fresh = load_image_set(root, 6, cache_dir=tmp_path / "fresh", workers=1)
    same_set(again, fresh)
    assert again.reasons[again.files.index("5/0501.png")] == "not an image" and again.ok.sum() == 1199
    assert [s for s, _ in rows] == np.cumsum([0] + [k for _, k in rows])[:-1].tolist()   # in order, once each
    assert sum(k for _, k in rows) == 1200


def test_unreadable_files_are_tried_again_on_a_rebuild(tmp_path, monkeypatch):
    root = make_folder(tmp_path / "data", 6)
    cache = tmp_path / "cache"
    real = data.load_image

    def locked(path, max_pixels=data.DEFAULT_MAX_PIXELS, **options):
        if Path(path).name == "img-0001.png":
            raise PermissionError(errno.EACCES, "Permission denied")
        return real(path, max_pixels, **options)

    monkeypatch.setattr(data, "load_image", locked)
    first = load_image_set(root, 8, cache_dir=cache, workers=1)
    assert first.reasons[first.files.index("d1/img-0001.png")] == "unreadable: Permission denied"
    monkeypatch.setattr(data, "load_image", real)              # permission fixed: mtime unchanged
    write_image(root / "extra.png", 7)
    decoded = count_decodes(monkeypatch)
    again = load_image_set(root, 8, cache_dir=cache, workers=1)
    assert sorted(decoded) == ["d1/img-0001.png", "extra.png"]
    assert again.ok[again.files.index("d1/img-0001.png")]


def test_a_damaged_or_vanishing_earlier_cache_costs_only_time(tmp_path, monkeypatch):
    root = make_folder(tmp_path / "data", 8)
    cache = tmp_path / "cache"
    load_image_set(root, 8, cache_dir=cache, workers=1)
    npy = next(cache.glob("*.npy"))
    npy.write_bytes(npy.read_bytes()[:-5])                    # cut short: not used, every file decoded
    write_image(root / "extra.png", 11)
    decoded = count_decodes(monkeypatch)
    damaged = load_image_set(root, 8, cache_dir=cache, workers=1)
    assert len(decoded) == len(damaged.files)
    same_set(damaged, load_image_set(root, 8, cache_dir=tmp_path / "fresh", workers=1))

    real_rows = data._cache_rows                               # deleted by another process mid-build:
    def delete_then_copy(*args, **kwargs):                     # the open file is still read in full
        for path in cache.iterdir():
            if ".tmp-" not in path.name:                        # the earlier cache, not the one being built
                path.unlink()
        return real_rows(*args, **kwargs)

    monkeypatch.setattr(data, "_cache_rows", delete_then_copy)
    write_image(root / "extra2.png", 12)
    decoded.clear()
    again = load_image_set(root, 8, cache_dir=cache, workers=1)
    assert decoded == ["extra2.png"]
    monkeypatch.setattr(data, "_cache_rows", real_rows)
    same_set(again, load_image_set(root, 8, cache_dir=tmp_path / "fresh2", workers=1))


def test_size_and_pixel_limit_keep_their_own_caches(tmp_path, monkeypatch):
    root = make_folder(tmp_path / "data", 5)
    cache = tmp_path / "cache"
    load_image_set(root, 8, cache_dir=cache, workers=1)
    load_image_set(root, 4, cache_dir=cache, workers=1)
    load_image_set(root, 8, cache_dir=cache, workers=1, max_pixels=100)
    assert cache_files(cache) == [".json"] * 3 + [".npy"] * 3
    write_image(root / "extra.png", 9)
    decoded = count_decodes(monkeypatch)
    small = load_image_set(root, 4, cache_dir=cache, workers=1)
    assert decoded == ["extra.png"] and small.images.shape[1:] == (4, 4, 3)
    assert cache_files(cache) == [".json"] * 3 + [".npy"] * 3   # only the 4 px cache was replaced


def test_crash_leftovers_are_removed_after_an_hour(tmp_path):
    root = make_folder(tmp_path / "data", 3)
    cache = tmp_path / "cache"
    load_image_set(root, 8, cache_dir=cache, workers=1)
    folder = next(cache.glob("*.json")).stem.split("-")[0]     # names start with the folder id
    old, recent = time.time() - 7200, time.time() - 60
    removed = [f"{folder}-{'a' * 64}.npy.tmp-123", f"{folder}-{'b' * 64}.npy"]   # temp; .npy whose JSON never came
    kept = [f"{folder}-{'c' * 64}.json.tmp-456",                                 # recent: a build may be running
            f"{'d' * 16}-{'e' * 64}.npy.tmp-1"]                                   # another folder's
    for name, mtime in zip(removed + kept, [old, old, recent, old]):
        (cache / name).write_bytes(b"x")
        os.utime(cache / name, (mtime, mtime))
    write_image(root / "extra.png", 5)
    load_image_set(root, 8, cache_dir=cache, workers=1)
    new = next(cache.glob("*.json")).stem
    assert sorted(p.name for p in cache.iterdir()) == sorted([f"{new}.json", f"{new}.npy", *kept])


def test_caches_of_0_1_0_are_removed_when_their_folder_is_cached_again(tmp_path):
    root = make_folder(tmp_path / "data", 3)
    other = tmp_path / "other"
    other.mkdir()
    cache = tmp_path / "cache"
    cache.mkdir()

    def format_1_cache(key: str, root_text: str, size: int) -> list[str]:   # 0.1.0's layout: '<64 hex>.npy/.json'
        np.save(cache / f"{key}.npy", np.zeros((3, size, size, 3), np.uint8))
        (cache / f"{key}.json").write_text(json.dumps({"format": 1, "files": [], "ok": [], "reasons": [],
                                                       "size": size, "root": root_text}))
        return [f"{key}.json", f"{key}.npy"]

    format_1_cache("a" * 64, str(root), 8)
    format_1_cache("b" * 64, str(tmp_path / "." / "data"), 16)              # same folder, another size
    kept = format_1_cache("c" * 64, str(other), 8) + format_1_cache("d" * 64, "data", 8)   # relative: unknown
    load_image_set(root, 8, cache_dir=cache, workers=1)
    new = next(p.stem for p in cache.glob("*-*.json"))
    assert sorted(p.name for p in cache.iterdir()) == sorted([f"{new}.json", f"{new}.npy", *kept])


def test_format_2_caches_of_the_folder_and_size_are_removed_when_it_is_cached_again(tmp_path):
    """Format 3 decodes large JPEGs at a reduced scale, so format 2's rows are never read again."""
    root = make_folder(tmp_path / "data", 3)
    cache = tmp_path / "cache"
    cache.mkdir()

    def format_2_cache(size: int) -> list[str]:
        folder = data._folder_id(os.path.realpath(root), size, data.DEFAULT_MAX_PIXELS, cache_format=2)[:16]
        name = f"{folder}-{'e' * 64}"
        np.save(cache / f"{name}.npy", np.zeros((3, size, size, 3), np.uint8))
        (cache / f"{name}.json").write_text(json.dumps({"format": 2, "files": [], "size": size}))
        return [f"{name}.json", f"{name}.npy"]

    format_2_cache(8)
    kept = format_2_cache(16)                                                # another size: stays for now
    load_image_set(root, 8, cache_dir=cache, workers=1)
    new = [p.stem for p in cache.glob("*.json") if json.loads(p.read_text())["format"] == data.CACHE_FORMAT]
    assert data.CACHE_FORMAT == 3 and len(new) == 1
    assert sorted(p.name for p in cache.iterdir()) == sorted([f"{new[0]}.json", f"{new[0]}.npy", *kept])


def test_failed_cache_write_falls_back_to_memory_and_hands_each_row_over_once(tmp_path, monkeypatch, caplog):
    root = make_folder(tmp_path / "data", 30)
    real_pwrite, written = os.pwrite, []

    def disk_full_after_some_rows(fd, b, at):                 # rows are written in this process (workers=1)
        written.append(len(b))
        if sum(written) > 2000:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_pwrite(fd, b, at)

    monkeypatch.setattr(os, "pwrite", disk_full_after_some_rows)
    rows = []
    s = load_image_set(root, 8, cache_dir=tmp_path / "cache", workers=1,
                       on_rows=lambda start, block, reasons: rows.append((start, block.copy(), list(reasons))))
    assert "keeping images in memory" in caplog.text and not isinstance(s.images, np.memmap)
    assert [r[0] for r in rows] == list(range(len(s.files)))         # one row a block here, each once
    assert np.array_equal(np.concatenate([r[1] for r in rows]), s.images)
    assert [x for r in rows for x in r[2]] == s.reasons
    assert cache_files(tmp_path / "cache") == []                  # no cache left that a later run would trust
    monkeypatch.setattr(os, "pwrite", real_pwrite)
    same_set(s, load_image_set(root, 8, cache_dir=tmp_path / "fresh", workers=1))


def test_a_worker_that_cannot_write_its_rows_fails_the_write_not_the_pool(tmp_path, caplog):
    """Workers write their rows into the cache file themselves: a write that fails there is a failed
    cache write (the set is then kept in memory), not a broken pool to finish decoding without."""
    root = tmp_path / "data"
    for i in range(520):                                       # enough files for the worker pool
        write_image(root / f"{i:04d}.png", i)
    files = data.scan_folder(root)
    gone = data._RowFile(str(tmp_path / "removed.npy.tmp-1"), 128, 4 * 4 * 3)   # a stopped build removed it
    with pytest.raises(data.CacheWriteError) as e:
        list(data._decode_stream(root, files, 4, data.DEFAULT_MAX_PIXELS, 2, gone, np.arange(len(files))))
    assert e.value.errno == errno.ENOENT
    assert "decoding failed" not in caplog.text and not (tmp_path / "removed.npy.tmp-1").exists()


def test_workers_write_their_rows_in_place_and_hand_back_no_pixels(tmp_path, monkeypatch):
    """A parallel build with a reused run in the middle: the decoded rows reach the file from the
    workers (their blocks come back empty), the reused ones from this process, and the cache equals
    one built in memory."""
    root = tmp_path / "data"
    for i in range(800):
        write_image(root / f"{i:04d}.png", i)
    cache = tmp_path / "cache"
    files = data.scan_folder(root)
    load_image_set(root, 4, cache_dir=cache, files=files[300:500], workers=2)   # the run reused below
    handed = []
    real_stream = data._decode_stream

    def recording(*args, **kwargs):
        for block, reasons in real_stream(*args, **kwargs):
            handed.append((block, reasons))
            yield block, reasons

    monkeypatch.setattr(data, "_decode_stream", recording)
    built = load_image_set(root, 4, cache_dir=cache, workers=2)
    assert sum(len(r) for _, r in handed) == 600 and all(block is None for block, _ in handed)
    assert isinstance(built.images, np.memmap)
    block, reasons = data._decode_chunk(root, files, 4, data.DEFAULT_MAX_PIXELS)   # decoded here, in memory
    assert np.array_equal(built.images, block) and built.reasons == reasons


def test_a_build_synced_in_the_background_is_the_same_complete_cache(tmp_path, monkeypatch):
    """With a sync every few rows, the file's data reaches the disk in the background during the build
    (how many syncs run depends on how fast the disk is; the first always does) and the cache is the one
    a build without them writes, complete and reused."""
    root = make_folder(tmp_path / "data", 40)
    synced = []
    real_sync, every = os.fdatasync, data.SYNC_EVERY

    def recording(fd):
        synced.append((threading.current_thread().name, os.fstat(fd).st_size))
        real_sync(fd)

    monkeypatch.setattr(data, "SYNC_EVERY", 8 * 8 * 3 * 4)       # four 8 px rows
    monkeypatch.setattr(os, "fdatasync", recording)
    built = load_image_set(root, 8, cache_dir=tmp_path / "cache", workers=1)
    background = [size for name, size in synced if name == "imgcluster-cache-sync"]
    assert background and background == sorted(background)
    assert background[0] >= 8 * 8 * 3 * 4                         # flushed before its sync: four rows at least
    assert cache_files(tmp_path / "cache") == [".json", ".npy"]
    decoded = count_decodes(monkeypatch)
    same_set(load_image_set(root, 8, cache_dir=tmp_path / "cache", workers=1), built)
    assert decoded == []                                          # complete: reused as it is
    monkeypatch.setattr(data, "SYNC_EVERY", every)
    same_set(load_image_set(root, 8, cache_dir=tmp_path / "fresh", workers=1), built)


def test_background_syncs_never_overlap_and_each_sees_the_bytes_written_so_far(tmp_path, monkeypatch):
    """The schedule, without timing: a sync starts once SYNC_EVERY bytes are unsent and none is running;
    bytes written while one runs wait for the next; each sync sees the file flushed up to its start."""
    running, release, seen = threading.Semaphore(0), threading.Event(), []

    def gated(fd):
        seen.append((threading.current_thread().name, os.fstat(fd).st_size))
        running.release()
        release.wait(10)

    monkeypatch.setattr(data, "SYNC_EVERY", 100)
    monkeypatch.setattr(os, "fdatasync", gated)
    with open(tmp_path / "f", "wb") as f:
        sync = data._BackgroundSync(f)

        def write(n):
            f.write(b"x" * n)
            sync.wrote(n)

        write(60)
        assert sync.thread is None                                # under SYNC_EVERY: nothing sent yet
        write(60)
        assert running.acquire(timeout=10) and seen == [("imgcluster-cache-sync", 120)]
        write(200)                                                # the first sync still runs: no second
        assert sync.thread.is_alive() and len(seen) == 1
        release.set()
        sync.wait()
        write(10)                                                 # 210 bytes unsent, none running: sent
        assert running.acquire(timeout=10)
        sync.finish()
    assert seen == [("imgcluster-cache-sync", 120), ("imgcluster-cache-sync", 330)]


def test_a_failed_background_sync_is_not_lost(tmp_path, monkeypatch, caplog):
    """An I/O error of a background sync fails the cache write as a failed write does: the set is kept
    in memory, no cache is left that a later run would trust, and the next build starts over."""
    root = make_folder(tmp_path / "data", 40)

    def failing(fd):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(data, "SYNC_EVERY", 8 * 8 * 3 * 4)
    monkeypatch.setattr(os, "fdatasync", failing)
    s = load_image_set(root, 8, cache_dir=tmp_path / "cache", workers=1)
    assert "keeping images in memory" in caplog.text and not isinstance(s.images, np.memmap)
    assert cache_files(tmp_path / "cache") == []
    monkeypatch.undo()
    same_set(s, load_image_set(root, 8, cache_dir=tmp_path / "cache", workers=1))
    assert cache_files(tmp_path / "cache") == [".json", ".npy"]


def test_rows_handed_over_during_a_parallel_build_are_the_cached_rows(tmp_path):
    root = tmp_path / "data"
    for i in range(520):                                       # enough files for the worker pool
        write_image(root / f"{i:04d}.png", i)
    rows = []
    shared = load_image_set(root, 4, cache_dir=tmp_path / "c2", workers=2,
                            on_rows=lambda start, block, reasons: rows.append((start, block.copy(), list(reasons))))
    assert [r[0] for r in rows] == list(np.cumsum([0] + [len(r[2]) for r in rows[:-1]]))   # in order, each once
    assert np.array_equal(np.concatenate([r[1] for r in rows]), shared.images)
    same_set(load_image_set(root, 4, cache_dir=tmp_path / "c1", workers=2), shared)


# ---------------------------------------------------------------------------------------------
# Batches: a cache being built cuts the same batches as a finished one
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("seed", range(5))
def test_batch_maker_cuts_the_same_batches_as_a_finished_set(seed):
    rng = random.Random(seed)
    n = rng.randrange(1, 120)
    reasons = [rng.choice(["", "", "", "not an image"]) for _ in range(n)]
    pixels = np.random.default_rng(seed).integers(0, 256, (n, 2, 2, 3), dtype=np.uint8)
    pixels[[i for i, r in enumerate(reasons) if r]] = 0
    images = data.ImageSet(Path("."), [f"{i}" for i in range(n)], 2, pixels,
                           np.array([not r for r in reasons]), reasons)
    batch_size = rng.choice([1, 3, 8, 256])
    got = []
    maker = BatchMaker(batch_size, got.append, Upload(CPU))
    start = 0
    while start < n:                                          # blocks of random lengths, as a build hands them over
        stop = min(n, start + rng.randrange(1, 20))
        maker.add(start, pixels[start:stop], reasons[start:stop])
        start = stop
    maker.finish()
    want = list(set_batches(images, batch_size, Upload(CPU)))
    sizes = [len(b.pixels) for b in want if b.pixels is not None]
    assert all(k == batch_size for k in sizes[:-1])          # full batches, then the rest
    for batches in (got, want):                               # every file once, in order
        assert [(i, r) for b in batches for i, r in enumerate(b.reasons, b.start)] == list(enumerate(reasons))
    good_got = [b.pixels for b in got if b.pixels is not None]
    good_want = [b.pixels for b in want if b.pixels is not None]
    assert [len(p) for p in good_got] == [len(p) for p in good_want]
    assert all(torch.equal(a, b) for a, b in zip(good_got, good_want))


# ---------------------------------------------------------------------------------------------
# Assign: the same rows as before, streamed
# ---------------------------------------------------------------------------------------------

def tiny_method(clusters: int = 5):
    torch.manual_seed(0)
    cfg = resolve_config((load_preset("cpu-tiny"), "preset cpu-tiny"), ({"clusters": clusters}, "test"))
    return cfg, METHODS[cfg.method](cfg, CPU)


def saved_run(root: Path, data_dir: Path):
    """A run directory of tiny_method's untrained networks on `data_dir`, as `train` leaves it."""
    cfg, method = tiny_method()
    cfg = resolve_config((cfg.to_dict(), "test"), ({"data_dir": str(data_dir)}, "test"))
    run = RunDir(root)
    run.make()
    save_config(run, cfg)
    save_model(run, method, cfg, 0)
    return run, cfg, method


def assign_as_before(method, images, batch_size) -> list[Assignment]:
    """The rows `assign` gave before streaming: batches of consecutive good rows of the finished set."""
    good = images.good_indices
    scores = {}
    for start in range(0, len(good), batch_size):
        rows = good[start:start + batch_size]
        cluster, conf = method.assign(torch.from_numpy(np.ascontiguousarray(images.images[rows])))
        scores.update(zip(rows.tolist(), zip(cluster.tolist(), conf.tolist())))
    return [Assignment(f, *scores[i]) if ok else Assignment(f, None, None, r)
            for i, (f, ok, r) in enumerate(zip(images.files, images.ok, images.reasons))]


def csv_text(rows) -> str:
    out = io.StringIO()
    write_assignments(rows, out)
    return out.getvalue()


@pytest.fixture(scope="module")
def big_folder(tmp_path_factory) -> Path:
    """600 real image files and 3 bad ones: enough for worker processes (>= 512 files)."""
    return make_folder(tmp_path_factory.mktemp("big") / "photos", 600)


def test_streamed_assign_gives_the_rows_of_before_cold_and_warm(big_folder, tmp_path, monkeypatch):
    monkeypatch.setenv("IMGCLUSTER_CACHE", str(tmp_path / "cache"))
    cfg, method = tiny_method()
    size = pipeline.cache_size(cfg)
    reference = assign_as_before(method, load_image_set(big_folder, size, cache_dir=tmp_path / "ref"), 64)
    assert len(reference) == 603 and sum(r.cluster is None for r in reference) == 3

    built = threading.Event()
    real_load = data.load_image_set

    def load_then_flag(*args, **kwargs):
        images = real_load(*args, **kwargs)
        built.set()
        return images

    monkeypatch.setattr(data, "load_image_set", load_then_flag)
    monkeypatch.setattr(data, "BUILD_AHEAD", 1)                # the build waits for the model: one block ahead
    progress = []
    cold = pipeline.assign_folder(method, big_folder, size, batch_size=64, overlap=True,
                                  progress=lambda d, n: progress.append(d))
    assert cold.images is None                                 # nothing decoded before the rows are asked for
    threads = torch.get_num_threads()
    rows = iter(cold)
    first = next(rows)
    assert not built.is_set()                                  # the model ran while workers decoded the rest
    assert torch.get_num_threads() == max(1, min(threads, usable_cpus() // 2))   # sharing the cores
    assert [first, *rows] == reference
    assert torch.get_num_threads() == threads                  # all of them again
    assert isinstance(cold.images.images, np.memmap) and progress[-1] == 603 and progress == sorted(progress)
    warm = pipeline.assign_folder(method, big_folder, size, batch_size=64, overlap=True)
    assert list(warm) == reference
    monkeypatch.setenv("IMGCLUSTER_CACHE", str(tmp_path / "cache-cpu"))
    first_built = pipeline.assign_folder(method, big_folder, size, batch_size=64, overlap=False)
    assert first_built.images is not None and list(first_built) == reference
    assert list(assign_images(method, warm.images, 64)) == reference
    assert csv_text(iter(reference)) == csv_text(warm)
    for bad in ("bad/empty.png", "bad/truncated.jpg", "notes.txt"):
        row = next(r for r in reference if r.path == bad)
        assert row.cluster is None and row.error in ("zero-byte file", "truncated file", "not an image")


def test_strict_assign_stops_before_the_first_row(big_folder, tmp_path, monkeypatch):
    monkeypatch.setenv("IMGCLUSTER_CACHE", str(tmp_path / "cache"))
    cfg, method = tiny_method()
    with pytest.raises(pipeline.NoUsableImages, match="--strict"):
        pipeline.assign_folder(method, big_folder, pipeline.cache_size(cfg), strict=True)


def test_stopping_early_ends_the_build_and_leaves_no_temp_file(big_folder, tmp_path, monkeypatch):
    monkeypatch.setenv("IMGCLUSTER_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(data, "BUILD_AHEAD", 1)                # the build waits for the reader (else it may end first)
    cfg, method = tiny_method()
    threads = threading.active_count()
    rows = iter(pipeline.assign_folder(method, big_folder, pipeline.cache_size(cfg), batch_size=16, overlap=True))
    torch_threads = torch.get_num_threads()
    assert next(rows).path and next(rows).path
    rows.close()                                               # e.g. the output pipe closed
    assert threading.active_count() == threads
    assert torch.get_num_threads() == torch_threads            # restored (it was lowered during the build)
    assert not list((tmp_path / "cache").glob("*"))            # no cache trusted, no temp file left


def test_a_background_build_holds_a_bounded_number_of_bytes_for_a_reader_not_ready(tmp_path, monkeypatch):
    """Started before its reader (as `assign` starts it before importing torch), a build runs ahead by
    `ahead` bytes at most, then waits; read later, it yields every row once, in order, and its set is
    the set a plain build gives."""
    monkeypatch.setenv("IMGCLUSTER_CACHE", str(tmp_path / "cache"))
    root = make_folder(tmp_path / "data", 40)
    files = data.scan_folder(root)
    held = []
    real_put = handoff.Handoff._put

    def recording(self, item):
        real_put(self, item)
        held.append(self._held)

    monkeypatch.setattr(handoff.Handoff, "_put", recording)
    row = 8 * 8 * 3
    build = data.BackgroundBuild(root, 8, files, ahead=3 * row)
    try:
        deadline = time.monotonic() + 30
        while len(held) < 3 and time.monotonic() < deadline:          # 40 files: decoded here, a row a block
            time.sleep(0.01)
        time.sleep(0.3)
        assert held and max(held) <= 3 * row and not build.done.is_set()   # waiting for the reader
        rows = list(build.rows())
    finally:
        build.close()
    assert [r[0] for r in rows] == list(np.cumsum([0] + [len(r[2]) for r in rows[:-1]]))
    images = build.result()
    assert np.array_equal(np.concatenate([r[1] for r in rows]), images.images)
    same_set(images, load_image_set(root, 8, cache_dir=tmp_path / "plain", workers=1))


def test_closing_a_background_build_its_reader_never_read_leaves_no_cache(tmp_path, monkeypatch):
    """E.g. the model of a cold `assign` fails to load after the build started: the build unwinds, its
    temporary file is deleted, an earlier cache stays, and the next build is complete."""
    monkeypatch.setenv("IMGCLUSTER_CACHE", str(tmp_path / "cache"))
    root = make_folder(tmp_path / "data", 40)
    old = load_image_set(root, 8, files=data.scan_folder(root)[:10])     # an earlier cache of the folder
    before = sorted(p.name for p in (tmp_path / "cache").glob("*"))
    threads = threading.active_count()
    build = data.BackgroundBuild(root, 8, data.scan_folder(root), ahead=1)
    time.sleep(0.2)
    build.close()
    assert build.done.is_set() and threading.active_count() == threads
    assert sorted(p.name for p in (tmp_path / "cache").glob("*")) == before     # no temp file, old cache kept
    same_set(load_image_set(root, 8), load_image_set(root, 8, cache_dir=tmp_path / "fresh"))
    assert len(old.files) == 10


def test_a_background_build_hands_its_error_to_the_reader(tmp_path):
    build = data.BackgroundBuild(tmp_path / "gone", 8, ["a.png"])
    try:
        with pytest.raises(data.DataError, match="gone"):
            list(build.rows())
    finally:
        build.close()


def test_a_build_started_for_another_size_is_closed_and_the_rows_are_the_same(big_folder, tmp_path, monkeypatch):
    """The hint `assign` starts its build from is checked against the loaded config: a build of another
    size (or folder) is stopped and the right one decoded."""
    monkeypatch.setenv("IMGCLUSTER_CACHE", str(tmp_path / "cache"))
    cfg, method = tiny_method()
    size = pipeline.cache_size(cfg)
    reference = assign_as_before(method, load_image_set(big_folder, size, cache_dir=tmp_path / "ref"), 64)
    wrong = data.BackgroundBuild(big_folder, size + 3, data.scan_folder(big_folder))
    rows = pipeline.assign_folder(method, big_folder, size, batch_size=64, build=wrong)
    assert wrong.done.is_set() and rows.build is None
    assert list(rows) == reference
    right = data.BackgroundBuild(big_folder, size, data.scan_folder(big_folder))
    rows = pipeline.assign_folder(method, big_folder, size, batch_size=64, build=right)
    assert rows.build is right and list(rows) == reference and right.done.is_set()


@pytest.mark.parametrize("preset", ["cpu-tiny", "slcgan-tiny", "c3gan-128", "slcgan-32-cpu"])
def test_the_early_hint_is_the_checked_configs_cache_side(tmp_path, preset):
    from imgcluster.rundir import load_config, saved_cache_side

    run = RunDir(tmp_path / "run")
    run.root.mkdir()
    cfg = resolve_config((load_preset(preset), preset), ({"clusters": 7, "data_dir": str(tmp_path / "photos")}, "test"))
    save_config(run, cfg)
    assert saved_cache_side(run) == (tmp_path / "photos", pipeline.cache_size(load_config(run)))
    run.config.write_text(run.config.read_text().replace("load_ratio:", "other:"))
    assert saved_cache_side(run) is None                          # no hint: assign decodes after the model loads
    run.config.unlink()
    assert saved_cache_side(run) is None


def test_assign_starts_decoding_before_it_imports_torch(big_folder, tmp_path):
    """The overlap itself: in a fresh process, the command's early build is running while torch is not
    yet imported, at the side the run's checked config gives."""
    run = saved_run(tmp_path / "run", big_folder)[0].root
    code = (
        "import sys\n"
        "from pathlib import Path\n"
        "from imgcluster.cli import start_build_early\n"
        "build = start_build_early(Path(sys.argv[1]), None, 10**8)\n"
        "started = build is not None and not build.done.is_set() and 'torch' not in sys.modules\n"
        "build.close()\n"
        "from imgcluster import pipeline\n"
        "from imgcluster.rundir import RunDir, load_config\n"
        "print(started, build.root, build.size == pipeline.cache_size(load_config(RunDir(Path(sys.argv[1])))))\n"
    )
    env = {**os.environ, "IMGCLUSTER_CACHE": str(tmp_path / "cache")}
    out = subprocess.run([sys.executable, "-c", code, str(run)], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["True", str(big_folder), "True"]


@pytest.mark.parametrize("flags", [["--precision", "fp64"], ["--device", "cuda:9"]])
def test_a_cold_assign_refused_after_its_build_started_leaves_no_cache(big_folder, tmp_path, monkeypatch, flags):
    run = saved_run(tmp_path / "run", big_folder)[0].root
    monkeypatch.setenv("IMGCLUSTER_CACHE", str(tmp_path / "cache"))
    threads = threading.active_count()
    result = CliRunner().invoke(app, ["assign", str(run), *flags])
    assert result.exit_code == 2 and flags[0] in result.stderr
    assert threading.active_count() == threads and not list((tmp_path / "cache").glob("*"))


def test_an_error_in_the_reading_thread_comes_out(tmp_path, monkeypatch):
    def broken(produce_put):
        produce_put(1)
        raise ValueError("decoder exploded")

    got = []
    with pytest.raises(ValueError, match="decoder exploded"):
        for item in inference.read_ahead(broken):
            got.append(item)
    assert got == [1]


# ---------------------------------------------------------------------------------------------
# Bounded memory: only what the sheets need is kept
# ---------------------------------------------------------------------------------------------

class Census:
    """How many tracked objects are alive, and the most at once."""

    def __init__(self):
        self.alive = self.peak = 0

    def track(self, obj):
        self.alive += 1
        self.peak = max(self.peak, self.alive)
        weakref.finalize(obj, self._gone)
        return obj

    def _gone(self):
        self.alive -= 1


def synthetic_rows(count: int, clusters: int, census: Census):
    """Rows with random clusters and confidences (ties included), each tracked by the census."""
    rng = random.Random(0)
    for i in range(count):
        row = Assignment(f"img-{i:05d}.png", rng.randrange(clusters), rng.choice([0.5, 0.75, 1.0, rng.random()]))
        if i % 97 == 0:
            row = Assignment(row.path, None, None, "not an image")
        yield census.track(row)


@pytest.mark.parametrize("keep", [0, SHEET_MEMBERS])
def test_write_assignments_keeps_only_the_sheet_members(keep):
    census = Census()
    out = io.StringIO()
    tally = write_assignments(synthetic_rows(20_000, 10, census), out, keep=keep)
    assert out.getvalue().count("\n") == 20_001
    assert tally.rows == 20_000 and tally.bad == len(range(0, 20_000, 97)) and len(tally.clusters) == 10
    assert census.peak <= 10 * keep + 2                        # no list of every row
    # the kept rows are the ones the sheets picked from every row (ties: the earlier row first)
    every = list(synthetic_rows(20_000, 10, Census()))
    for c in range(10):
        best = sorted([r for r in every if r.cluster == c], key=lambda r: -r.confidence)[:keep]
        kept = sorted([r for r in tally.kept if r.cluster == c], key=lambda r: -r.confidence)
        assert kept == best
    assert [r.path for r in tally.kept] == sorted(r.path for r in tally.kept)   # in file order


@pytest.mark.parametrize("overlap", [True, False])
def test_assign_without_sheets_holds_a_bounded_number_of_rows(big_folder, tmp_path, monkeypatch, overlap):
    monkeypatch.setenv("IMGCLUSTER_CACHE", str(tmp_path / "cache"))
    cfg, method = tiny_method()
    census = Census()
    rows = pipeline.assign_folder(method, big_folder, pipeline.cache_size(cfg), batch_size=64, overlap=overlap)
    tally = write_assignments((census.track(row) for row in rows), io.StringIO())
    assert tally.rows == 603 and tally.kept == [] and census.peak <= 2


def test_sheets_from_the_kept_rows_equal_sheets_from_every_row(big_folder, tmp_path, monkeypatch):
    monkeypatch.setenv("IMGCLUSTER_CACHE", str(tmp_path / "cache"))
    cfg, method = tiny_method(clusters=3)
    images = load_image_set(big_folder, pipeline.cache_size(cfg))
    every = list(assign_images(method, images, 64))
    tally = write_assignments(iter(every), io.StringIO(), keep=SHEET_MEMBERS)
    sizes = [sum(r.cluster == c for r in every) for c in range(3)]
    assert max(sizes) > SHEET_MEMBERS                          # a cluster where the choice matters
    assert len(tally.kept) == sum(min(k, SHEET_MEMBERS) for k in sizes)
    a = write_sheets(method, images, every, tmp_path / "all")
    b = write_sheets(method, images, tally.kept, tmp_path / "kept")
    assert [p.read_bytes() for p in a] == [p.read_bytes() for p in b]


# ---------------------------------------------------------------------------------------------
# The command
# ---------------------------------------------------------------------------------------------

def test_assign_command_streams_every_file_and_draws_sheets(big_folder, tmp_path, monkeypatch):
    monkeypatch.setenv("IMGCLUSTER_CACHE", str(tmp_path / "cache"))
    run, cfg, method = saved_run(tmp_path / "run", big_folder)
    reference = assign_as_before(method, load_image_set(big_folder, pipeline.cache_size(cfg),
                                                        cache_dir=tmp_path / "ref"), 256)
    for _ in ("cold", "warm"):
        result = CliRunner().invoke(app, ["assign", str(run.root), "--sheets", str(tmp_path / "sheets"),
                                          "--quiet"], catch_exceptions=False)
        assert result.exit_code == 0, result.stderr
        assert result.stdout == csv_text(iter(reference))
        assert "assigned 600 images, 3 unusable files" in result.stderr
    assert len(list((tmp_path / "sheets").glob("cluster-*.png"))) == cfg.clusters
    rows = list(csv.DictReader(io.StringIO(result.stdout)))
    assert len(rows) == 603 and [r["path"] for r in rows] == sorted(r["path"] for r in rows)

    out = tmp_path / "strict.csv"                              # --strict: stops before writing anything
    result = CliRunner().invoke(app, ["assign", str(run.root), "--strict", "-o", str(out), "--quiet"])
    assert result.exit_code == 3 and "--strict" in result.stderr and not out.exists()
