"""The training loop: one function for every method, reporting through callbacks.

It knows nothing of terminals or flags: the CLI passes `progress_fn` (called every `log_every`
steps with the logged metrics) and `stop_fn` (returns a signal number once Ctrl-C or SIGTERM has
arrived; the loop then finishes the step, checkpoints and raises `Interrupted`).

Exact resume: the checkpoint holds every network and optimiser state, the step and the RNG states;
the data order is a pure function of (seed, epoch), so a resumed run repeats an uninterrupted one.
"""

from __future__ import annotations

import functools
import json
import math
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torchvision.utils import save_image

from imgcluster.checkpoint import CHECKPOINT_FORMAT, atomic_write_text, read_state, write_state
from imgcluster.config import TrainConfig
from imgcluster.data import ImageSet
from imgcluster.rundir import RunDir, save_config, save_model


class Interrupted(Exception):
    """Training stopped by a signal after saving a checkpoint; `signum` tells which."""

    def __init__(self, signum: int, step: int):
        super().__init__(f"interrupted at step {step}")
        self.signum, self.step = signum, step


class NonFiniteLoss(RuntimeError):
    """A loss became NaN or infinite; the last good checkpoint is kept."""


class CheckpointSaveError(RuntimeError):
    """A checkpoint could not be written (e.g. a full disk); the previous one is kept."""


# ---------------------------------------------------------------------------------------------
# Data order
# ---------------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=2)
def _epoch_permutation(n: int, seed: int, epoch: int) -> torch.Tensor:
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))


def batch_indices(step: int, n: int, batch: int, seed: int) -> torch.Tensor:
    """Indices of the batch at `step`: a fresh permutation of the n images each epoch (drop last)."""
    if n < batch:                       # fewer images than a batch: sample with replacement
        gen = torch.Generator().manual_seed(seed * 1_000_003 + step)
        return torch.randint(0, n, (batch,), generator=gen)
    epoch, i = divmod(step, n // batch)
    return _epoch_permutation(n, seed, epoch)[i * batch: (i + 1) * batch]


def step_indices(step_index: int, n: int, batch: int, seed: int, per_step: int = 1) -> torch.Tensor:
    """Indices of the `per_step` consecutive batches of a step (0-based), concatenated: batch * per_step.

    per_step = 1 is batch_indices(step_index) itself, so a one-batch method's data order is unchanged.
    """
    if per_step == 1:
        return batch_indices(step_index, n, batch, seed)
    return torch.cat([batch_indices(step_index * per_step + j, n, batch, seed) for j in range(per_step)])


def training_tensor(images: ImageSet, device: torch.device) -> torch.Tensor:
    """The usable cached images as one (N, S0, S0, 3) uint8 tensor on the training device."""
    good = images.good_indices
    return torch.from_numpy(np.ascontiguousarray(images.images[good])).to(device)


def real_batches(data: torch.Tensor, batch: int):
    for start in range(0, data.shape[0], batch):
        yield data[start: start + batch]


# ---------------------------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------------------------

def rng_state(device: torch.device) -> dict:
    state = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def save_checkpoint(run: RunDir, method, step: int, device: torch.device) -> None:
    state = {
        "step": step,
        "networks": {name: net.state_dict() for name, net in method.networks().items()},
        "optimizers": {name: opt.state_dict() for name, opt in method.optimizers().items()},
        "rng": rng_state(device),
    }
    try:
        write_state(run.checkpoint, state, CHECKPOINT_FORMAT, {"method": method.name, "step": step})
    except OSError as e:
        kept = "the previous checkpoint is kept" if run.checkpoint.exists() else "no earlier checkpoint exists"
        raise CheckpointSaveError(f"{run.checkpoint}: cannot save the checkpoint of step {step}: "
                                  f"{e.strerror or e}; {kept}") from None


def load_checkpoint(run: RunDir, method, device: torch.device) -> int:
    """Restore the full training state; returns the step to continue from."""
    state, _ = read_state(run.checkpoint, CHECKPOINT_FORMAT, device="cpu")
    for name, net in method.networks().items():
        net.load_state_dict(state["networks"][name])
    for name, opt in method.optimizers().items():
        opt.load_state_dict(state["optimizers"][name])
    set_rng_state(state["rng"], device)
    return int(state["step"])


def trim_metrics(path: Path, step: int) -> None:
    """Drop metric lines logged after `step`, so a resumed run's log has each step once."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            if json.loads(line).get("step", 0) <= step:
                kept.append(line)
        except ValueError:
            continue                  # a line torn by a crash mid-write
    atomic_write_text(path, "".join(line + "\n" for line in kept))


# ---------------------------------------------------------------------------------------------
# Samples
# ---------------------------------------------------------------------------------------------

def sample_grid(method, cfg: TrainConfig, path: Path, per_cluster: int = 8) -> None:
    """Rows = the first `sample_clusters` clusters, columns = a fixed z each; same (z, c) every time."""
    devices = [method.device] if method.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(cfg.seed + 7919)
        shown = min(cfg.clusters, cfg.sample_clusters)
        clusters = torch.arange(shown).repeat_interleave(per_cluster)
        images = method.generate(clusters)
    save_image(images.float().cpu(), path, nrow=per_cluster, normalize=True, value_range=(-1, 1), padding=1)


# ---------------------------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------------------------

def train(cfg: TrainConfig, run: RunDir, images: ImageSet, device: torch.device, *,
          resume: bool = True, progress_fn: Callable[[dict], None] | None = None,
          stop_fn: Callable[[], int | None] | None = None) -> int:
    """Train `cfg.method` on the usable images to `cfg.steps`, writing the run directory.

    Returns the final step. Raises Interrupted (after checkpointing) or NonFiniteLoss.
    """
    from imgcluster.methods import METHODS

    torch.manual_seed(cfg.seed)
    method = METHODS[cfg.method](cfg, device)
    run.make()
    start = 0
    if resume and run.checkpoint.exists():
        start = load_checkpoint(run, method, device)
        trim_metrics(run.metrics, start)
    elif run.metrics.exists():
        run.metrics.unlink()
    save_config(run, cfg)

    data = training_tensor(images, device)
    n = data.shape[0]
    per_step = getattr(method, "real_batches_per_step", 1)     # e.g. slcGAN: one real batch per D step
    sums: dict[str, torch.Tensor] = {}
    count, t_log, t_start = 0, time.perf_counter(), time.perf_counter()

    def check_finite(step: int) -> None:
        if sums and not bool(torch.isfinite(torch.stack(list(sums.values()))).all()):
            bad = [k for k, v in sums.items() if not math.isfinite(float(v))]
            raise NonFiniteLoss(f"non-finite loss ({', '.join(bad)}) between steps {step - count + 1} and {step}; "
                                f"the last good checkpoint is kept in {run.checkpoint}")

    step = start
    for step in range(start + 1, cfg.steps + 1):
        idx = step_indices(step - 1, n, cfg.batch_size, cfg.seed, per_step).to(device)
        losses = method.train_step(data[idx])
        for k, v in losses.items():
            sums[k] = sums[k] + v if k in sums else v.float()
        count += 1

        if step % cfg.log_every == 0 or step == cfg.steps:
            check_finite(step)
            now = time.perf_counter()
            # images_per_s counts real images consumed (batch_size * per_step per step).
            record = {"step": step, **{k: round(float(v) / count, 6) for k, v in sums.items()},
                      "images_per_s": round(count * cfg.batch_size * per_step / (now - t_log), 2),
                      "elapsed_s": round(now - t_start, 2)}
            with open(run.metrics, "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")
            if progress_fn:
                progress_fn({"step": step, "total": cfg.steps, "start": start, "metrics": record})
            sums, count, t_log = {}, 0, now
        if step % cfg.sample_every == 0:
            sample_grid(method, cfg, run.samples / f"step-{step:07d}.png")
        signum = stop_fn() if stop_fn else None
        if step % cfg.checkpoint_every == 0 or signum is not None:
            check_finite(step)
            save_checkpoint(run, method, step, device)
        if signum is not None:
            raise Interrupted(signum, step)

    if step > start:
        save_checkpoint(run, method, step, device)
        if cfg.steps % cfg.sample_every:
            sample_grid(method, cfg, run.samples / f"step-{step:07d}.png")
    method.recalibrate(real_batches(data, cfg.batch_size))
    save_model(run, method, cfg, step)
    return step
