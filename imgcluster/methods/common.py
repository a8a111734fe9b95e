"""Pieces both methods share: how a network is prepared for training, and inference views."""

from __future__ import annotations

import contextlib
import itertools

import torch
import torch.nn as nn

from imgcluster import augment, distributed
from imgcluster.config import cache_side
from imgcluster.precision import resolve_memory_format


def building(training: bool):
    """The context networks are created in. For training, as usual (allocated and initialised). For a
    model whose weights come from a file, on the meta device: nothing is allocated or initialised, which
    for slcgan-128 saves about 15 s of orthogonal initialisation on a CPU. `load_weights` then gives them
    their tensors."""
    return contextlib.nullcontext() if training else torch.device("meta")


def place(net: nn.Module, device: torch.device) -> nn.Module:
    """`net` moved to `device`; one built on the meta device stays there until `load_weights`."""
    if any(t.is_meta for t in itertools.chain(net.parameters(), net.buffers())):
        return net
    return net.to(device)


def load_weights(net: nn.Module, state: dict, device: torch.device) -> nn.Module:
    """`net` holding the tensors of `state` (every parameter and buffer), on `device`.

    The tensors are taken as they are (load_state_dict with assign=True) rather than copied into
    memory allocated first with `to_empty`: on meta tensors that goes through torch's Python reference
    ops, whose first use imports sympy: 0.5-0.9 s of every `assign` of a C3-GAN run on a CPU.
    """
    net.load_state_dict(state, assign=True)
    return net.to(device)


def training_handle(net: nn.Module, cfg, device: torch.device) -> nn.Module:
    """Prepare `net` for training and return what its own update step calls.

    The memory format (channels_last on CUDA by default) is set on `net` itself. The returned handle
    is `net`, or `net` in DistributedDataParallel under torchrun, compiled with torch.compile when
    `cfg.compile` is set. Checkpoints, inference and the other networks' steps use `net` directly.
    """
    net.to(memory_format=resolve_memory_format(cfg.memory_format, device))
    handle = distributed.wrap(net, device)
    if cfg.compile:
        handle = torch.compile(handle)
    return handle


def cached_side(cfg) -> int:
    """Side of the cached images: image_size * load_ratio, so training views can be random crops."""
    return cache_side(cfg.image_size, cfg.method_settings.load_ratio)


def eval_view(real_uint8: torch.Tensor, image_size: int) -> torch.Tensor:
    """Inference view: the cached (short-side resized) image, centre-cropped, (B, 3, S, S) in [-1, 1]."""
    return augment.center_crop(augment.to_float(real_uint8), image_size)


@torch.no_grad()
def recalibrate_batchnorm(net: nn.Module, views) -> None:
    """Re-estimate `net`'s BatchNorm running statistics as a cumulative average over `views`.

    During training a network's running statistics mix every kind of batch it saw (real, fake,
    masked, augmented); at inference it sees real images only. Leaves `net` in eval mode.
    """
    bns = [m for m in net.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    momenta = [bn.momentum for bn in bns]
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None                 # cumulative moving average
    net.train()
    for x in views:
        if x.shape[0] > 1:
            net(x)
    for bn, momentum in zip(bns, momenta):
        bn.momentum = momentum
    net.eval()


def optimizer_steps(opt: torch.optim.Optimizer, net: nn.Module) -> int:
    """Steps `opt` has taken on `net`'s first parameter (0 before the first). Adam keeps the count on
    the CPU, so reading it does not wait for the GPU."""
    state = opt.state.get(next(iter(net.parameters())))
    return int(state["step"]) if state else 0


@torch.no_grad()
def average_into(average: nn.Module, net: nn.Module, decay: float) -> None:
    """One step of an exponential moving average: average <- decay * average + (1 - decay) * net for
    parameters; buffers (BatchNorm statistics, spectral-norm vectors) are copied."""
    for p_avg, p in zip(average.parameters(), net.parameters()):
        p_avg.lerp_(p, 1.0 - decay)
    for b_avg, b in zip(average.buffers(), net.buffers()):
        b_avg.copy_(b)
