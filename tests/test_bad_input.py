"""Bad and odd inputs through the CLI, and faults during training: a clear outcome, nothing lost."""

from __future__ import annotations

import csv
import errno
import io
import json
import os
import random
import signal
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from safetensors import safe_open
from typer.testing import CliRunner

from imgcluster.cli import app

runner = CliRunner()


def run(*args):
    return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)


def _png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def _bomb_png(width: int, height: int) -> bytes:
    """A valid PNG header that claims width x height, with almost no data behind it."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 16)) + chunk(b"IEND", b"")


def write_corpus(root: Path) -> dict[str, str | None]:
    """Every kind of odd file the issue lists; returns {relative path: None if usable, else a reason word}."""
    rng = np.random.default_rng(0)
    expect: dict[str, str | None] = {}

    def rgb(w=24, h=20):
        return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), "RGB")

    def put(rel, outcome, save=None, data=None):
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        if data is not None:
            path.write_bytes(data)
        else:
            save(path)
        expect[rel] = outcome

    # usable, in every odd form
    for i in range(12):
        put(f"good/rgb-{i:02d}.png", None, lambda p: rgb().save(p))
    put("odd/grey.png", None, lambda p: rgb().convert("L").save(p))
    put("odd/one-bit.png", None, lambda p: rgb().convert("1").save(p))
    put("odd/la.png", None, lambda p: rgb().convert("LA").save(p))
    put("odd/palette-transparent.png", None, lambda p: rgb().convert("P").save(p, transparency=0))
    put("odd/rgba.png", None, lambda p: rgb().convert("RGBA").save(p))
    put("odd/cmyk.jpg", None, lambda p: rgb().convert("CMYK").save(p, "JPEG"))
    put("odd/grey16.png", None, lambda p: Image.fromarray(np.full((9, 9), 40000, np.uint16)).save(p))
    put("odd/gif-named.jpg", None, lambda p: rgb().convert("P").save(p, "GIF"))
    put("odd/tiny-1x1.png", None, lambda p: rgb(1, 1).save(p))
    put("odd/thin-1x4000.png", None, lambda p: rgb(1, 4000).save(p))
    for orientation in range(1, 9):
        def exif_jpeg(p, o=orientation):
            exif = Image.Exif()
            exif[0x0112] = o
            rgb(30, 18).save(p, "JPEG", exif=exif)
        put(f"exif/orientation-{orientation}.jpg", None, exif_jpeg)
    frames = [rgb() for _ in range(3)]
    put("odd/animated.gif", None, lambda p: frames[0].save(p, save_all=True, append_images=frames[1:]))
    put("odd/animated.webp", None, lambda p: frames[0].save(p, "WEBP", save_all=True, append_images=frames[1:]))
    put("nested/deeper/still/found.png", None, lambda p: rgb().save(p))
    put("good/duplicate-a.png", None, data=_png_bytes(frames[0]))
    put("good/duplicate-b.png", None, data=_png_bytes(frames[0]))
    # unusable
    jpeg = io.BytesIO()
    rgb(64, 64).save(jpeg, "JPEG")
    put("bad/truncated.jpg", "truncated", data=jpeg.getvalue()[: len(jpeg.getvalue()) // 2])
    png = _png_bytes(rgb(64, 64))
    put("bad/truncated.png", "truncated", data=png[: len(png) // 2])
    put("bad/zero-byte.png", "zero-byte", data=b"")
    put("bad/text.jpg", "not an image", data=b"hello, I am not a picture\n")
    put("bad/bomb.png", "decompression bomb", data=_bomb_png(100_000, 100_000))
    # hidden files and folders are not listed at all
    (root / ".hidden").mkdir()
    rgb().save(root / ".hidden" / "skip.png")
    rgb().save(root / ".skip.png")
    # a symlink loop must not hang the scan
    os.symlink(root, root / "nested" / "loop")
    # a name that is not UTF-8
    raw = os.fsencode(root / "odd") + b"/caf\xe9.png"
    with open(raw, "wb") as f:
        f.write(_png_bytes(rgb()))
    expect[os.fsdecode(b"odd/caf\xe9.png")] = None
    return expect


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus") / "photos"
    root.mkdir()
    return root, write_corpus(root)


def read_csv_rows(text: str):
    return list(csv.DictReader(io.StringIO(text)))


def test_dry_run_counts_every_file(corpus, tmp_path):
    root, expect = corpus
    result = run("train", root, "--clusters", 3, "--preset", "cpu-tiny", "--dry-run", "--out", tmp_path / "r")
    assert result.exit_code == 0, result.stderr
    assert f"{len(expect)} files found" in result.stderr


def test_train_and_assign_account_for_every_file(corpus, tmp_path):
    root, expect = corpus
    out = tmp_path / "run"
    result = run("train", root, "--clusters", 3, "--preset", "cpu-tiny", "--steps", 4, "--out", out, "--quiet")
    assert result.exit_code == 0, result.stderr
    n_bad = sum(v is not None for v in expect.values())
    assert f"{len(expect)} files: {len(expect) - n_bad} usable images, {n_bad} not usable" in result.stderr

    with open(out / "bad_images.csv", encoding="utf-8", errors="surrogateescape") as f:
        bad = {r["path"]: r["reason"] for r in csv.DictReader(f)}
    assert set(bad) == {k for k, v in expect.items() if v is not None}
    for path, word in expect.items():
        if word is not None:
            assert word in bad[path], (path, bad[path])

    result = run("assign", out, root)
    assert result.exit_code == 0, result.stderr
    rows = read_csv_rows(result.stdout_bytes.decode("utf-8", "surrogateescape"))
    assert len(rows) == len(expect)                              # rows == files found, nothing dropped
    assert {r["path"] for r in rows} == set(expect)
    for r in rows:
        if expect[r["path"]] is None:
            assert r["cluster"] != "" and r["error"] == "", r
        else:
            assert r["cluster"] == "" and expect[r["path"]] in r["error"], r


def test_strict_stops_on_the_first_bad_file(corpus, tmp_path):
    root, _ = corpus
    result = run("train", root, "--clusters", 3, "--preset", "cpu-tiny", "--strict", "--out", tmp_path / "r")
    assert result.exit_code == 3
    assert "--strict" in result.stderr and "bad/" in result.stderr and result.stderr.count("error:") == 1


def test_max_pixels_flag_rejects_larger_images(tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(2):
        Image.new("RGB", (40, 40), (i * 50, 0, 0)).save(folder / f"big-{i}.png")
    for i in range(3):
        Image.new("RGB", (10, 10), (0, i * 50, 0)).save(folder / f"small-{i}.png")
    out = tmp_path / "run"
    result = run("train", folder, "--clusters", 2, "--preset", "cpu-tiny", "--steps", 2, "--out", out,
                 "--max-pixels", 1000, "--quiet")
    assert result.exit_code == 0, result.stderr
    assert "5 files: 3 usable images, 2 not usable" in result.stderr
    rows = list(csv.DictReader(open(out / "bad_images.csv")))
    assert [r["path"] for r in rows] == ["big-0.png", "big-1.png"]
    assert all("decompression bomb: 40x40" in r["reason"] for r in rows)


def test_run_dir_from_another_version_is_refused(tmp_path, mnist_200):
    out = tmp_path / "run"
    assert run("train", mnist_200, "--clusters", 3, "--preset", "cpu-tiny", "--steps", 2, "--out", out,
               "--quiet").exit_code == 0
    from imgcluster.checkpoint import read_state, write_state

    state, meta = read_state(out / "model.safetensors", "imgcluster-model")
    meta.pop("tree")
    meta.pop("format_version")
    meta.pop("format")
    import imgcluster.checkpoint as ck

    old = ck.FORMAT_VERSION
    try:
        ck.FORMAT_VERSION = 99
        write_state(out / "model.safetensors", state, "imgcluster-model", meta)
    finally:
        ck.FORMAT_VERSION = old
    result = run("assign", out)
    assert result.exit_code == 2 and "format version 99" in result.stderr


def test_run_dir_of_another_method_is_refused(tmp_path, mnist_200):
    out = tmp_path / "run"
    assert run("train", mnist_200, "--clusters", 3, "--preset", "cpu-tiny", "--steps", 2, "--out", out,
               "--quiet").exit_code == 0
    text = (out / "config.yaml").read_text()
    (out / "config.yaml").write_text(text.replace("method: c3gan", "method: nosuch"))
    result = run("generate", out, "--cluster", 0)
    assert result.exit_code == 2 and "unknown method" in result.stderr


@pytest.mark.parametrize("line, words", [("clusters: many", "clusters must be a whole number"),
                                         ("clusters: [1", "malformed YAML")])
def test_evaluate_run_dir_with_damaged_config(tmp_path, line, words):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "config.yaml").write_text(f"method: c3gan\n{line}\n")
    (run_dir / "assignments.csv").write_text("path,cluster,confidence\na/1.png,0,0.9\nb/2.png,1,0.8\n")
    result = run("evaluate", run_dir, "--labels-from-folders")
    assert result.exit_code == 2
    assert words in result.stderr and "config.yaml" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


# ---------------------------------------------------------------------------------------------
# Faults during training
# ---------------------------------------------------------------------------------------------

def test_full_disk_while_checkpointing_keeps_the_previous_checkpoint(tmp_path, mnist_200, monkeypatch):
    import imgcluster.checkpoint as ck

    out = tmp_path / "run"
    real_fsync = os.fsync
    calls = {"n": 0}

    def fsync_fails_on_second_checkpoint(fd):
        if os.readlink(f"/proc/self/fd/{fd}").endswith("state.safetensors.tmp"):
            calls["n"] += 1
            if calls["n"] == 2:
                raise OSError(errno.ENOSPC, "No space left on device")
        return real_fsync(fd)

    monkeypatch.setattr(ck.os, "fsync", fsync_fails_on_second_checkpoint)
    result = run("train", mnist_200, "--clusters", 3, "--preset", "cpu-tiny", "--steps", 20, "--out", out, "--quiet")
    assert result.exit_code == 1
    assert "No space left on device" in result.stderr and "previous checkpoint is kept" in result.stderr
    assert "step 20" in result.stderr                      # checkpoint_every 10: the second is at step 20
    with safe_open(str(out / "checkpoint" / "state.safetensors"), "pt") as f:
        assert f.metadata()["step"] == "10"
    assert not (out / "checkpoint" / "state.safetensors.tmp").exists()
    monkeypatch.setattr(ck.os, "fsync", real_fsync)
    result = run("train", mnist_200, "--out", out, "--quiet")    # disk freed: resume from step 10 and finish
    assert result.exit_code == 0, result.stderr
    assert "resuming" in result.stderr


def test_non_finite_loss_stops_with_the_step_and_keeps_the_checkpoint(tmp_path, mnist_200, monkeypatch):
    import torch

    from imgcluster.methods.c3gan import C3GAN

    original = C3GAN.train_step
    counter = {"n": 0}

    def poisoned(self, real):
        counter["n"] += 1
        losses = original(self, real)
        if counter["n"] == 13:
            losses["d_loss"] = torch.tensor(float("nan"))
        return losses

    monkeypatch.setattr(C3GAN, "train_step", poisoned)
    out = tmp_path / "run"
    result = run("train", mnist_200, "--clusters", 3, "--preset", "cpu-tiny", "--steps", 20, "--out", out, "--quiet")
    assert result.exit_code == 1
    assert "non-finite loss (d_loss) between steps 11 and 15" in result.stderr
    with safe_open(str(out / "checkpoint" / "state.safetensors"), "pt") as f:
        assert f.metadata()["step"] == "10"


def _train_cmd(data: Path, out: Path, steps: int) -> list[str]:
    return [sys.executable, "-m", "imgcluster", "train", str(data), "--clusters", "3", "--preset", "cpu-tiny",
            "--steps", str(steps), "--out", str(out), "--set", "checkpoint_every=1", "--set", "log_every=1"]


def _checkpoint_step(out: Path) -> int:
    path = out / "checkpoint" / "state.safetensors"
    if not path.exists():
        return 0
    from imgcluster.checkpoint import read_state

    state, _ = read_state(path, "imgcluster-checkpoint")      # loads every tensor: a torn file would fail here
    return int(state["step"])


def test_kill_9_at_random_moments_always_leaves_a_resumable_run(tmp_path, mnist_200):
    out = tmp_path / "run"
    rnd = random.Random(1)
    steps = 60
    last = 0
    for attempt in range(4):
        proc = subprocess.Popen(_train_cmd(mnist_200, out, steps), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.time() + 90
        while _metric_lines(out) <= last and time.time() < deadline and proc.poll() is None:
            time.sleep(0.05)
        time.sleep(rnd.uniform(0.0, 1.0))                        # somewhere inside training and checkpointing
        proc.kill()
        proc.wait()
        step = _checkpoint_step(out)                            # always a whole, loadable checkpoint
        assert step >= last, (attempt, step, last)
        last = step
    result = subprocess.run(_train_cmd(mnist_200, out, steps), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert ("resuming" in result.stderr) == (last > 0)
    assert _checkpoint_step(out) == steps
    logged = [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert logged == list(range(1, steps + 1))                 # every step logged exactly once across the kills


def _metric_lines(out: Path) -> int:
    try:
        return sum(1 for _ in open(out / "metrics.jsonl"))
    except FileNotFoundError:
        return 0


def test_sigterm_saves_and_exits_143(tmp_path, mnist_200):
    out = tmp_path / "run"
    proc = subprocess.Popen(_train_cmd(mnist_200, out, 100_000), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 90
    while _metric_lines(out) < 3 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err.decode()
    assert _checkpoint_step(out) >= 3
    assert "resume" in err.decode()


def test_file_vanishing_or_locked_between_scan_and_load(tmp_path, monkeypatch):
    import imgcluster.pipeline as pipeline

    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(5):
        Image.new("RGB", (12, 12), (i * 40, 0, 0)).save(folder / f"{i}.png")
    real_load = pipeline.load_image_set

    def scan_then_lose_files(root, size, **kw):              # the scan has happened: now files go away
        (folder / "1.png").unlink()
        os.chmod(folder / "3.png", 0)
        return real_load(root, size, **kw)

    monkeypatch.setattr(pipeline, "load_image_set", scan_then_lose_files)
    out = tmp_path / "run"
    result = run("train", folder, "--clusters", 2, "--preset", "cpu-tiny", "--steps", 2, "--out", out, "--quiet")
    assert result.exit_code == 0, result.stderr
    bad = {r["path"]: r["reason"] for r in csv.DictReader(open(out / "bad_images.csv"))}
    assert bad["1.png"] == "unreadable: No such file or directory"
    if os.geteuid() != 0:                                    # root reads a mode-000 file anyway
        assert bad["3.png"] == "unreadable: Permission denied"
    rows = list(csv.DictReader(open(out / "assignments.csv")))
    assert [r["path"] for r in rows] == [f"{i}.png" for i in range(5)]
