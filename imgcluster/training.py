"""The training loop: one function for every method, reporting through callbacks.

It knows nothing of terminals or flags: the CLI passes `progress_fn` (called every `log_every`
steps with the logged metrics) and `stop_fn` (returns a signal number once Ctrl-C or SIGTERM has
arrived; the loop then finishes the step, checkpoints and raises `Interrupted`).

Exact resume: the checkpoint holds every network and optimiser state, the step and the RNG states
(of every process under torchrun); the data order is a pure function of (seed, epoch), so a resumed
run repeats an uninterrupted one.

Under torchrun every process runs this loop on its slice of each global batch (see distributed.py);
rank 0 alone writes the run directory.

No host-device synchronisation in the step loop: batches are gathered by index on the device (or
from the memory-mapped cache into pinned memory, copied without blocking), losses are summed as
device tensors and read back only at log steps.
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

from imgcluster import distributed
from imgcluster.checkpoint import CHECKPOINT_FORMAT, atomic_write_text, read_state, write_state
from imgcluster.config import TrainConfig
from imgcluster.data import ImageSet
from imgcluster.inference import save_grid
from imgcluster.rundir import RunDir, save_config


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


class Batches:
    """The usable cached images, served as (B, S0, S0, 3) uint8 batches on the training device.

    On a GPU the whole set is copied to GPU memory once when it takes at most `gpu_fraction` of the
    free memory; batches are then gathered there. Otherwise (CPU, or a set too large) each batch is
    gathered from the memory-mapped cache, so host memory stays bounded by the page cache; on a GPU it
    goes through pinned memory with a non-blocking copy, which overlaps the previous step's kernels.
    """

    def __init__(self, images: ImageSet, device: torch.device, gpu_fraction: float = 0.25):
        self.device = device
        self.rows = images.good_indices
        self.source = images.images                                      # (N_files, S0, S0, 3) memmap
        self.on_device = None
        if device.type == "cuda":
            nbytes = len(self.rows) * int(np.prod(self.source.shape[1:]))
            free, _ = torch.cuda.mem_get_info(device)
            if nbytes <= gpu_fraction * free:
                self.on_device = torch.from_numpy(np.ascontiguousarray(self.source[self.rows])).to(device)

    def __len__(self) -> int:
        return len(self.rows)

    def get(self, idx: torch.Tensor) -> torch.Tensor:
        """The batch of usable-image indices `idx` (CPU tensor)."""
        if self.on_device is not None:
            return self.on_device[_to_device(idx, self.device)]
        batch = torch.from_numpy(self.source[self.rows[idx.numpy()]])
        return _to_device(batch, self.device)

    def in_order(self, batch: int):
        """Every usable image once, in order, in batches (BatchNorm re-estimation)."""
        for start in range(0, len(self), batch):
            yield self.get(torch.arange(start, min(start + batch, len(self))))


def _to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    if device.type != "cuda":
        return t
    return t.pin_memory().to(device, non_blocking=True)


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


def gather_rng_states(device: torch.device) -> dict:
    """{"1": rng state of rank 1, ...} for ranks other than 0 (collective: every rank calls it)."""
    mine = rng_state(device)
    gathered = {key: distributed.gather_tensors(value.cpu()) for key, value in mine.items()}
    return {str(r): {key: values[r] for key, values in gathered.items()} for r in range(1, distributed.world_size())}


def save_checkpoint(run: RunDir, method, step: int, device: torch.device) -> None:
    """Write the full state (rank 0); every rank must call it, as it gathers the RNG states."""
    others = gather_rng_states(device) if distributed.active() else {}
    if not distributed.is_main():
        return
    state = {
        "step": step,
        "networks": {name: net.state_dict() for name, net in method.networks().items()},
        "optimizers": {name: opt.state_dict() for name, opt in method.optimizers().items()},
        "rng": rng_state(device),
    }
    if others:
        state["rng_ranks"] = others             # ranks 1.. of a torchrun run
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
    step = int(state["step"])
    rank = distributed.rank()
    if rank == 0:
        set_rng_state(state["rng"], device)
    elif str(rank) in state.get("rng_ranks", {}):
        set_rng_state(state["rng_ranks"][str(rank)], device)
    else:                                       # resumed with more processes than saved: a fresh stream
        torch.manual_seed(rank_seed(method.cfg.seed, rank) + step)
    return step


def rank_seed(seed: int, rank: int) -> int:
    """The seed of rank `rank`'s random draws; rank 0 (and a single process) uses `seed` itself."""
    return seed + 1_000_003 * rank


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
    """Rows = the first `sample_clusters` clusters, columns = one z each, shared by every row, so a
    column shows what the cluster code changes; the same (z, c) every time."""
    devices = [method.device] if method.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(cfg.seed + 7919)
        shown = min(cfg.clusters, cfg.sample_clusters)
        clusters = torch.arange(shown).repeat_interleave(per_cluster)
        z = torch.randn(per_cluster, cfg.method_settings.z_dim, device=method.device).repeat(shown, 1)
        images = method.generate(clusters, z)
    save_grid(images.float().cpu(), path, nrow=per_cluster)


# ---------------------------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------------------------

def train(cfg: TrainConfig, run: RunDir, images: ImageSet, device: torch.device, *,
          resume: bool = True, progress_fn: Callable[[dict], None] | None = None,
          stop_fn: Callable[[], int | None] | None = None) -> dict:
    """Train `cfg.method` on the usable images to `cfg.steps`, writing the run directory.

    Returns what model.safetensors holds ({"step", "cluster_balance", "last_step", "last_balance"}, and
    "consistency"; see selection.py) on rank 0, {} on the others. Raises Interrupted (after
    checkpointing), NonFiniteLoss or CheckpointSaveError. Under torchrun every rank calls it; rank 0
    writes the files.
    """
    from imgcluster.methods import METHODS
    from imgcluster.selection import Selector

    main, world = distributed.is_main(), distributed.world_size()
    torch.manual_seed(cfg.seed)
    method = METHODS[cfg.method](cfg, device)          # equal initial weights on every rank
    if not main:
        torch.manual_seed(rank_seed(cfg.seed, distributed.rank()))
    start = 0
    if resume and run.checkpoint.exists():
        start = load_checkpoint(run, method, device)
    if main:
        run.make()
        if start:
            trim_metrics(run.metrics, start)
        elif run.metrics.exists():
            run.metrics.unlink()
        save_config(run, cfg)

    data = Batches(images, device)
    n = len(data)
    selector = Selector(cfg, run, data, start) if main else None
    per_step = getattr(method, "real_batches_per_step", 1)     # e.g. slcGAN: one real batch per D step
    after_step = getattr(method, "after_step", None)
    events: list[str] = []                                      # logged with the next metrics line
    sums: dict[str, torch.Tensor] = {}
    count, t_log, t_start = 0, time.perf_counter(), time.perf_counter()

    def logged_means() -> dict[str, float]:
        """Mean of each loss since the last log over steps (and ranks); raises NonFiniteLoss (everywhere)."""
        names = sorted(sums)
        means = torch.stack([sums[k] for k in names]) / count
        if distributed.active():
            torch.distributed.all_reduce(means)
            means /= world
        values = dict(zip(names, means.tolist()))
        bad = [k for k, v in values.items() if not math.isfinite(v)]
        if distributed.agree(int(bool(bad))):
            raise NonFiniteLoss(f"non-finite loss ({', '.join(bad) or 'on another rank'}) between steps "
                                f"{step - count + 1} and {step}; the last good checkpoint is kept in {run.checkpoint}")
        return values

    def checkpoint(step: int) -> None:
        """Save on rank 0; every rank learns whether it worked, so all stop together if not."""
        error = None
        try:
            save_checkpoint(run, method, step, device)
        except CheckpointSaveError as e:
            error = e
        if distributed.agree(int(error is not None)):
            raise error or CheckpointSaveError(f"rank 0 could not save the checkpoint of step {step}")

    step = start
    for step in range(start + 1, cfg.steps + 1):
        idx = step_indices(step - 1, n, cfg.batch_size * world, cfg.seed, per_step)
        losses = method.train_step(data.get(distributed.rank_slice(idx, per_step)))
        event = after_step(step, data) if after_step else None          # e.g. slcGAN's empty-cluster splits
        if event:
            events.append(f"{step}: {event}")
        for k, v in losses.items():
            sums[k] = sums[k] + v.float() if k in sums else v.float()
        count += 1

        if step % cfg.log_every == 0 or step == cfg.steps:
            means = logged_means()
            now = time.perf_counter()
            # images_per_s counts real images consumed (batch_size * per_step per step, on every rank).
            record = {"step": step, **{k: round(v, 6) for k, v in means.items()},
                      "images_per_s": round(count * cfg.batch_size * per_step * world / (now - t_log), 2),
                      "elapsed_s": round(now - t_start, 2)}
            if events:
                record["events"] = events
            if main:
                with open(run.metrics, "a", encoding="utf-8") as f:
                    f.write(json.dumps(record) + "\n")
            if progress_fn:
                progress_fn({"step": step, "total": cfg.steps, "start": start, "metrics": record})
            sums, count, t_log, events = {}, 0, now, []
        if step % cfg.sample_every == 0 and main:
            sample_grid(method, cfg, run.samples / f"step-{step:07d}.png")
        signum = distributed.agree((stop_fn() if stop_fn else None) or 0) or None
        if step % cfg.checkpoint_every == 0 or signum is not None:
            if count:
                logged_means()                       # never checkpoint a non-finite state
            if main and step % cfg.checkpoint_every == 0:
                selector.consider(method, step)      # regular checkpoints only: resume stays exact
            checkpoint(step)
        if signum is not None:
            raise Interrupted(signum, step)

    drifted = distributed.drifted_modules(method.networks())
    if drifted:
        raise RuntimeError(f"the ranks' {', '.join(drifted)} weights differ at step {step}: "
                           f"gradients were not synchronised")
    if step > start:
        checkpoint(step)
        if cfg.steps % cfg.sample_every and main:
            sample_grid(method, cfg, run.samples / f"step-{step:07d}.png")
    if not main:
        return {}
    method.recalibrate(data.in_order(cfg.batch_size))
    return selector.finish(method, step)
