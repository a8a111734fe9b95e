"""Several processes with torchrun + DistributedDataParallel, on the CPU with the gloo backend."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from imgcluster import distributed


def torchrun(*args, nproc: int = 2, timeout: int = 300) -> subprocess.CompletedProcess:
    """`torchrun --standalone --nproc-per-node N -m imgcluster ARGS` (one thread per process)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
               "-m", "imgcluster", *map(str, args)]
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env)


def metric_steps(run_dir: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_rank_slices_split_each_global_batch(monkeypatch):
    """Two ranks take disjoint halves of every one of a step's global batches, together all of them."""
    idx = torch.arange(2 * 2 * 4)                     # per_step 2, world 2, batch 4
    monkeypatch.setattr(distributed, "active", lambda: True)
    monkeypatch.setattr(distributed, "world_size", lambda: 2)
    parts = []
    for r in (0, 1):
        monkeypatch.setattr(distributed, "rank", lambda r=r: r)
        parts.append(distributed.rank_slice(idx, per_step=2))
    assert parts[0].tolist() == [0, 1, 2, 3, 8, 9, 10, 11]
    assert parts[1].tolist() == [4, 5, 6, 7, 12, 13, 14, 15]


def test_single_process_has_no_process_group():
    assert not distributed.active() and distributed.world_size() == 1 and distributed.rank() == 0
    net = torch.nn.Linear(2, 2)
    assert distributed.wrap(net, torch.device("cpu")) is net
    assert distributed.agree(5) == 5


def test_two_processes_train_resume_and_equal_an_uninterrupted_run(mnist_200, tmp_path):
    """2 gloo processes: a valid run directory; a resumed run equals an uninterrupted one, weight for weight."""
    common = ["--clusters", 10, "--preset", "cpu-tiny", "--seed", 5, "--set", "checkpoint_every=3",
              "--set", "log_every=2", "--quiet"]
    whole, split = tmp_path / "whole", tmp_path / "split"
    for out, steps in ((whole, 6), (split, 3), (split, 6)):
        result = torchrun("train", mnist_200, *common, "--steps", steps, "--out", out)
        assert result.returncode == 0, result.stderr[-3000:]
        assert result.stdout.strip() == str(out)            # rank 0 alone prints the run directory

    for name in ("config.yaml", "model.safetensors", "checkpoint/state.safetensors", "metrics.jsonl",
                 "assignments.csv", "bad_images.csv"):
        assert (split / name).is_file(), name
    assert list((split / "sheets").glob("cluster-*.png"))
    with open(split / "assignments.csv", newline="") as f:
        assert len(list(csv.DictReader(f))) == 200
    assert metric_steps(split) == [2, 3, 4, 6]               # each step logged once, by rank 0

    a = load_file(whole / "checkpoint" / "state.safetensors")
    b = load_file(split / "checkpoint" / "state.safetensors")
    assert a.keys() == b.keys()
    assert any(key.startswith("rng_ranks") for key in a)     # rank 1's random stream is saved too
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_two_processes_keep_the_networks_in_step(mnist_200, tmp_path):
    """slcGAN (three networks, each in its own DistributedDataParallel) trains on 2 processes; training
    ends with a check that every network's weights are equal on both ranks (it fails the run if not),
    also after empty clusters were split (slcgan.split_empty; rank 0's split is broadcast).
    A 2-process checkpoint then resumes in a single process."""
    out = tmp_path / "slc"
    result = torchrun("train", mnist_200, "--clusters", 10, "--preset", "slcgan-tiny", "--steps", 2,
                      "--set", "batch_size=8", "--set", "log_every=1", "--set", "slcgan.split_empty=true",
                      "--set", "slcgan.split_every=1", "--set", "slcgan.split_start=1", "--out", out, "--quiet")
    assert result.returncode == 0, result.stderr[-3000:]
    state = load_file(out / "checkpoint" / "state.safetensors")
    assert any(k.startswith("networks/clusterer/") for k in state)
    logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert any("events" in row for row in logged)          # at least one split on the way
    # one more step in a single process, from the 2-process state
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-m", "imgcluster", "train", mnist_200, "--out", out,
                             "--steps", "3", "--quiet"], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert metric_steps(out)[-1] == 3


def test_sigterm_to_torchrun_saves_once_and_resumes(mnist_200, tmp_path):
    """SIGTERM to torchrun: its agent passes it on; both processes stop at the same step, rank 0 saves."""
    out = tmp_path / "sig"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m", "imgcluster",
               "train", str(mnist_200), "--clusters", "10", "--preset", "cpu-tiny", "--steps", "100000",
               "--out", str(out), "--set", "checkpoint_every=100000", "--set", "log_every=1"]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.monotonic() + 240
    while not ((out / "metrics.jsonl").exists() and (out / "metrics.jsonl").read_text().count("\n") >= 3):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[1][-3000:]
        time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert stderr.count("checkpoint saved at step") == 1, stderr[-3000:]
    saved = int(stderr.split("checkpoint saved at step ")[1].split()[0])
    result = torchrun("train", mnist_200, "--out", out, "--steps", saved + 2, "--quiet")
    assert result.returncode == 0, result.stderr[-3000:]
    assert metric_steps(out)[-2:] == [saved + 1, saved + 2]
