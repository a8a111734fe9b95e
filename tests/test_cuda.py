"""The CUDA path end to end: training steps, the commands, resume. Skipped on a machine without a GPU.

CI has no GPU, so these run where one is present (`python -m pytest tests/test_cuda.py`); the
benchmarks' device script (tests/bench/gpu_session.sh) runs them first. Images are written here with
Pillow: coloured shapes on noisy backgrounds, 4 kinds, so nothing outside the repository is needed.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw
from typer.testing import CliRunner

from imgcluster.cli import app
from imgcluster.config import load_preset, resolve_config
from imgcluster.data import load_image_set, scan_folder
from imgcluster.methods import METHODS
from imgcluster.training import Batches

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU on this machine")

CUDA = torch.device("cuda")
TINY = {"c3gan": "cpu-tiny", "slcgan": "slcgan-tiny"}
runner = CliRunner()


def run(*args):
    return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> Path:
    """48 images of 40 px in 4 class folders (circle, square, bar, cross), written with Pillow."""
    root = tmp_path_factory.mktemp("shapes")
    rng = np.random.default_rng(0)
    for kind in ("circle", "square", "bar", "cross"):
        (root / kind).mkdir()
        for i in range(12):
            img = Image.fromarray(rng.integers(0, 90, (40, 40, 3), dtype=np.uint8))
            draw, colour = ImageDraw.Draw(img), tuple(int(v) for v in rng.integers(120, 256, 3))
            a, b = int(rng.integers(6, 12)), int(rng.integers(28, 34))
            if kind == "circle":
                draw.ellipse((a, a, b, b), fill=colour)
            elif kind == "square":
                draw.rectangle((a, a, b, b), fill=colour)
            elif kind == "bar":
                draw.rectangle((a, 16, b, 24), fill=colour)
            else:
                draw.rectangle((a, 17, b, 23), fill=colour)
                draw.rectangle((17, a, 23, b), fill=colour)
            img.save(root / kind / f"{i:02d}.png")
    return root


@pytest.mark.parametrize("method", ["c3gan", "slcgan"])
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_training_steps_on_the_gpu(method, precision, shapes):
    """Steps run on the device from the on-GPU image set, in channels_last, and the losses move."""
    cfg = resolve_config((load_preset(TINY[method]), TINY[method]),
                         ({"clusters": 4, "precision": precision}, "test"))
    images = load_image_set(shapes, METHODS[method].cache_size(cfg), files=scan_folder(shapes))
    data = Batches(images, CUDA)
    assert data.on_device is not None and data.on_device.is_cuda        # 48 small images fit on the GPU
    torch.manual_seed(0)
    trainer = METHODS[method](cfg, CUDA)
    per_step = getattr(trainer, "real_batches_per_step", 1)
    history = []
    for step in range(8):
        idx = torch.arange(step * cfg.batch_size * per_step, (step + 1) * cfg.batch_size * per_step) % len(data)
        losses = trainer.train_step(data.get(idx))
        assert all(v.is_cuda for v in losses.values())
        history.append({k: float(v) for k, v in losses.items()})
    assert all(math.isfinite(v) for row in history for v in row.values())
    assert history[0] != history[-1]
    conv = next(m for m in trainer.networks()["discriminator"].modules() if isinstance(m, torch.nn.Conv2d))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    clusters, conf = trainer.assign(data.get(torch.arange(8)))
    assert clusters.shape == (8,) and bool(((conf > 0) & (conf <= 1)).all())


@pytest.mark.parametrize("method", ["c3gan", "slcgan"])
def test_commands_on_the_gpu(method, shapes, tmp_path):
    """train (bf16, the CUDA default), resume, assign, generate and evaluate with --device cuda."""
    out = tmp_path / "run"
    args = ("train", shapes, "--clusters", 4, "--preset", TINY[method], "--out", out, "--quiet", "--device", "cuda")
    result = run(*args, "--steps", 10)
    assert result.exit_code == 0, result.stderr
    result = run(*args, "--steps", 20)                          # resumes from step 10
    assert result.exit_code == 0, result.stderr
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(set(steps)) and steps[-1] == 20
    result = run("assign", out, "-o", tmp_path / "a.csv", "--device", "cuda")
    assert result.exit_code == 0, result.stderr
    with open(tmp_path / "a.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 48 and all(r["cluster"] != "" for r in rows)
    result = run("generate", out, "--cluster", 1, "-n", 4, "-o", tmp_path / "g.png", "--device", "cuda")
    assert result.exit_code == 0, result.stderr
    assert Image.open(tmp_path / "g.png").size[0] > 0
    result = run("evaluate", tmp_path / "a.csv", "--labels-from-folders", "--json")   # paths are circle/00.png...
    assert result.exit_code == 0, result.stderr
    assert 0 <= json.loads(result.stdout)["nmi"] <= 1


def test_resume_on_the_gpu_continues_the_same_run(shapes, tmp_path):
    """10 + 10 steps against 20 straight: the same losses up to GPU non-determinism (cuDNN, atomics)."""
    logs = []
    for name, stops in (("straight", (20,)), ("resumed", (10, 20))):
        out = tmp_path / name
        for steps in stops:
            result = run("train", shapes, "--clusters", 4, "--preset", "cpu-tiny", "--out", out, "--quiet",
                         "--device", "cuda", "--precision", "fp32", "--steps", steps, "--seed", 3)
            assert result.exit_code == 0, result.stderr
        logs.append([json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()])
    straight, resumed = logs
    assert [r["step"] for r in straight] == [r["step"] for r in resumed]
    for a, b in zip(straight, resumed):
        for key in ("d_loss", "g_loss"):
            assert a[key] == pytest.approx(b[key], rel=2e-2, abs=1e-3), (a["step"], key)
