"""Several processes (GPUs, nodes) with PyTorch's own engine: torchrun + DistributedDataParallel.

    torchrun --nproc-per-node 4 -m imgcluster train ./photos --clusters 400

torchrun starts one process per GPU and sets RANK, WORLD_SIZE, LOCAL_RANK and the rendezvous address;
`init()` then joins the process group (NCCL on CUDA, gloo on the CPU). Without torchrun nothing here
does anything: one process, no process group, every helper a no-op.

What each process does:
- Each network is wrapped in its own DistributedDataParallel (`wrap`), so G, D and the clustering
  network average their gradients separately, each in its own update step. BatchNorm statistics stay
  per process (as the papers trained on several GPUs), and are not broadcast from rank 0.
- `batch_size` is per process: a step on N processes sees N * batch_size real images. The data order
  is the one-process order of the global batch, each rank taking its slice (`rank_slice`).
- Random draws (z, cluster codes, augmentations) use a per-rank seed offset; weights start equal
  (DistributedDataParallel copies rank 0's at wrap time).
- Only rank 0 writes files. Decisions that must be the same everywhere (stop on a signal, a non-finite
  loss, a failed checkpoint) are agreed over a small gloo group on the CPU (`agree`), which costs no
  GPU synchronisation.
"""

from __future__ import annotations

import datetime
import inspect
import os

import torch
import torch.distributed as dist

# The cache is built by rank 0 while the others wait; a large folder can take a while.
TIMEOUT = datetime.timedelta(hours=2)

_control = None          # a gloo group for small CPU-side agreements


def launched() -> bool:
    """True when this process was started by torchrun (or another launcher setting WORLD_SIZE > 1)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def active() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if active() else 0


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def is_main() -> bool:
    return rank() == 0


def launch_rank() -> int:
    """This process's rank as torchrun set it (0 without torchrun), known before `init()`."""
    return int(os.environ.get("RANK", "0"))


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def rank_device(device: torch.device) -> torch.device:
    """The device of this process: cuda:LOCAL_RANK for a CUDA run (one GPU per process), else `device`."""
    if device.type != "cuda":
        return device
    index = local_rank()
    if index >= torch.cuda.device_count():
        raise ValueError(f"LOCAL_RANK {index}: only {torch.cuda.device_count()} CUDA device(s) here; "
                         f"start at most that many processes per node (torchrun --nproc-per-node)")
    torch.cuda.set_device(index)
    return torch.device("cuda", index)


def init(device: torch.device) -> None:
    """Join the process group torchrun describes (no-op when not launched by torchrun)."""
    global _control
    if not launched() or active():
        return
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, timeout=TIMEOUT)
    _control = dist.new_group(backend="gloo", timeout=TIMEOUT) if backend != "gloo" else dist.group.WORLD


def shutdown() -> None:
    global _control
    if active():
        dist.destroy_process_group()
    _control = None


def barrier() -> None:
    if active():
        dist.barrier(group=_control)


def agree(value: int) -> int:
    """The largest `value` over all processes (e.g. a signal number, or 1 for 'a loss is NaN')."""
    if not active():
        return value
    t = torch.tensor([value], dtype=torch.int64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=_control)
    return int(t.item())


def gather_tensors(t: torch.Tensor) -> list[torch.Tensor]:
    """Every rank's copy of a CPU tensor of the same shape and dtype (over the CPU group), in rank order."""
    if not active():
        return [t]
    out = [torch.empty_like(t) for _ in range(world_size())]
    dist.all_gather(out, t.contiguous(), group=_control)
    return out


def drifted_modules(modules: dict[str, torch.nn.Module]) -> list[str]:
    """Names of the modules whose parameters differ between ranks (empty when all agree).

    DistributedDataParallel keeps parameters identical on every rank; this checks it once at the end
    of training (a checksum per module, gathered over the CPU group), so a drift is an error, not a
    silently wrong model.
    """
    if not active():
        return []
    names = sorted(modules)
    sums = torch.stack([sum(p.detach().double().sum().cpu() for p in modules[n].parameters()) for n in names])
    gathered = gather_tensors(sums)
    return [n for i, n in enumerate(names) if any(g[i] != gathered[0][i] for g in gathered)]


def wrap(module: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """The module to call in its own update step: DistributedDataParallel under torchrun, else itself.

    Call the wrapper only in the step that updates this network (its gradients are averaged when the
    step's backward runs); every other use (no-grad passes, other networks' steps) calls the module.
    """
    if not active():
        return module
    ids = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else None
    ddp = torch.nn.parallel.DistributedDataParallel
    # BatchNorm statistics and spectral-norm vectors stay per rank: no buffer broadcast before each forward.
    if "forward_sync_buffers" in inspect.signature(ddp).parameters:
        return ddp(module, device_ids=ids, forward_sync_buffers=False)
    return ddp(module, device_ids=ids, broadcast_buffers=False)


def rank_slice(indices: torch.Tensor, per_step: int) -> torch.Tensor:
    """This rank's part of a step's global indices: (per_step * world * B,) -> (per_step * B,).

    The global indices are `per_step` consecutive global batches; rank r takes the r-th slice of each.
    """
    if not active():
        return indices
    return indices.view(per_step, world_size(), -1)[:, rank()].reshape(-1)


def broadcast_(tensors) -> None:
    """Overwrite each tensor (in place) with rank 0's copy, over the default group (tensors on the
    training device)."""
    if not active():
        return
    with torch.no_grad():
        for t in tensors:
            dist.broadcast(t, src=0)
