"""Numeric precision and memory layout of training: bf16 autocast, channels_last, torch.compile.

`precision` (config key, `--precision`):
- auto: bf16 autocast on a CUDA GPU that supports bf16, fp32 elsewhere (the CPU included);
- bf16: bf16 autocast on any device (on the CPU it is slower unless the CPU has bf16 units);
- fp32: no autocast.

Autocast wraps the networks' forward passes only. Weights, optimiser states and gradients stay
fp32; no loss scaling is needed for bf16 (it has fp32's exponent range). The places where bf16
would lose meaning run in fp32 (`fp32`): every loss term, C3-GAN's cosine logits against the
centroids (divided by a small temperature), and the softmax of cluster probabilities.

`memory_format` (config key): auto = channels_last on CUDA (tensor cores read NHWC), contiguous on
the CPU; or channels_last / contiguous explicitly.
"""

from __future__ import annotations

import contextlib
import functools

import torch

PRECISIONS = ("auto", "bf16", "fp32")
MEMORY_FORMATS = ("auto", "channels_last", "contiguous")


def resolve_precision(name: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for `name` on `device`, or None for plain fp32."""
    if name == "fp32":
        return None
    if name == "bf16":
        return torch.bfloat16
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return None


def cpu_has_bf16() -> bool:
    """Whether this CPU computes in bf16 natively (AVX512-BF16 or AMX-BF16): there bf16 autocast trains
    faster than fp32 (1.5-2.1x measured on an AVX512-BF16 CPU); elsewhere it is emulated and slower."""
    capabilities = getattr(torch.cpu, "get_capabilities", dict)()
    return bool(capabilities.get("avx512_bf16") or capabilities.get("amx_bf16"))


BF16_GAINS = {   # measured on an AVX512-BF16/AMX CPU (tests/bench/RESULTS.md)
    "train": "trains 1.5-2x faster here",
    "assign": "runs the model about 2x faster here (changing the cluster of 0.4-1.5 % of the images, near ties)",
}


def cpu_bf16_hint(name: str, device: torch.device, command: str = "train") -> str | None:
    """Advice for `train` or `assign` when `auto` keeps fp32 on a CPU that has bf16 units (the default
    is not changed)."""
    if name == "auto" and device.type == "cpu" and cpu_has_bf16():
        return f"this CPU has bf16 instructions: --precision bf16 {BF16_GAINS[command]} (`auto` keeps fp32 on a CPU)"
    return None


def autocast(device: torch.device, dtype: torch.dtype | None):
    """A context for forward passes: autocast to `dtype`, or nothing when dtype is None."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def fp32(fn):
    """Run `fn` with autocast off and its floating tensor arguments in fp32 (losses, cosine logits)."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        tensors = [a for a in args if isinstance(a, torch.Tensor)]
        if not tensors or not torch.is_autocast_enabled(tensors[0].device.type):
            return fn(*args, **kwargs)
        args = tuple(a.float() if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args)
        with torch.autocast(device_type=tensors[0].device.type, enabled=False):
            return fn(*args, **kwargs)
    return wrapper


def resolve_memory_format(name: str, device: torch.device) -> torch.memory_format:
    if name == "channels_last" or (name == "auto" and device.type == "cuda"):
        return torch.channels_last
    return torch.contiguous_format
