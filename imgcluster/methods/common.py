"""Pieces both methods share: how a network is prepared for training, and inference views."""

from __future__ import annotations

import contextlib

import torch
import torch.nn as nn

from imgcluster import augment, distributed
from imgcluster.config import cache_side
from imgcluster.precision import resolve_memory_format


# torch.nn.init's in-place initialisers, which `building(training=False)` turns off
INITIALISERS = ("uniform_", "normal_", "trunc_normal_", "constant_", "ones_", "zeros_", "eye_", "dirac_",
                "xavier_uniform_", "xavier_normal_", "kaiming_uniform_", "kaiming_normal_", "orthogonal_", "sparse_")


@contextlib.contextmanager
def building(training: bool):
    """The context networks are created in. For training, as usual (allocated and initialised). For a
    model whose weights come from a file, allocated on the CPU but not initialised: inside, torch.nn.init's
    initialisers return their tensor untouched (transformers' `no_init_weights` does the same), and
    `load_weights` then replaces every tensor. For slcgan-64 and slcgan-128 that saves 25-40 s of
    orthogonal initialisation on a CPU.

    Not the meta device: spectral norm runs 15 power iterations when a layer is made, and on meta tensors
    each operation goes through torch's Python meta kernels (1-2 ms each), so building slcGAN's networks
    there took 3-4 s for its CPU presets against 0.1-0.15 s here (tests/bench/RESULTS.md, "Loading a model").
    The initialisers are switched off for the whole process while it lasts: build nothing for training
    in another thread meanwhile (imgcluster's loaders build from one thread).
    """
    if training:
        yield
        return
    saved = {name: getattr(nn.init, name) for name in INITIALISERS}
    try:
        for name in INITIALISERS:
            setattr(nn.init, name, _untouched)
        yield
    finally:
        for name, initialiser in saved.items():
            setattr(nn.init, name, initialiser)


def _untouched(tensor: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    return tensor


def place(net: nn.Module, device: torch.device, training: bool) -> nn.Module:
    """`net` moved to `device` for training; one built for loading stays on the CPU, where `load_weights`
    gives it the file's tensors and moves it (its own are never filled, so copying them would be waste)."""
    return net.to(device) if training else net


def load_weights(net: nn.Module, state: dict, device: torch.device) -> nn.Module:
    """`net` holding the tensors of `state` (every parameter and buffer), on `device`.

    The tensors are taken as they are (load_state_dict with assign=True) rather than copied into the
    network's own, which `building(training=False)` left unfilled.
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
