"""Precision (bf16 autocast), memory format (channels_last) and the settings that choose them."""

from __future__ import annotations

import pytest
import torch

from imgcluster import losses
from imgcluster.config import ConfigError, load_preset, resolve_config
from imgcluster.methods import METHODS
from imgcluster.precision import autocast, cpu_has_bf16, fp32, resolve_memory_format, resolve_precision

CPU = torch.device("cpu")
PRESETS = {"c3gan": "cpu-tiny", "slcgan": "slcgan-tiny"}


def config(method: str, **general):
    return resolve_config((load_preset(PRESETS[method]), "preset"),
                          ({"clusters": 5, "batch_size": 8, **general}, "test"))


def real_batch(method, cfg, seed: int = 0) -> torch.Tensor:
    side = METHODS[cfg.method].cache_size(cfg)
    n = cfg.batch_size * getattr(method, "real_batches_per_step", 1)
    return torch.randint(0, 256, (n, side, side, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def test_precision_resolution():
    assert resolve_precision("fp32", CPU) is None
    assert resolve_precision("auto", CPU) is None                  # the CPU trains in fp32 unless asked
    assert resolve_precision("bf16", CPU) is torch.bfloat16
    assert resolve_memory_format("auto", CPU) == torch.contiguous_format
    assert resolve_memory_format("channels_last", CPU) == torch.channels_last
    with pytest.raises(ConfigError, match="precision"):
        config("c3gan", precision="fp16")
    with pytest.raises(ConfigError, match="memory_format"):
        config("c3gan", memory_format="nhwc")


@pytest.mark.parametrize("capabilities, expected", [
    ({"avx512_bf16": True, "amx_bf16": False}, True),
    ({"avx512_bf16": False, "amx_bf16": True}, True),
    ({"avx512_bf16": False, "amx_bf16": False, "avx512_f": True}, False),
    ({}, False),                                                    # other architectures name neither
])
def test_cpu_bf16_units_are_read_from_torch(capabilities, expected, monkeypatch):
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: capabilities)
    assert cpu_has_bf16() is expected


def test_loss_terms_run_in_fp32_inside_autocast():
    torch.manual_seed(0)
    a, b = torch.randn(8, 16), torch.randn(8, 16)
    with autocast(CPU, torch.bfloat16):
        # a matmul would be bf16 here; inside the loss it is not
        assert (a @ b.t()).dtype == torch.bfloat16
        value = losses.nt_xent(a.bfloat16(), b.bfloat16(), 0.1)
    assert value.dtype == torch.float32
    assert torch.allclose(value, losses.nt_xent(a.bfloat16().float(), b.bfloat16().float(), 0.1))

    @fp32
    def dtype_of_product(x):
        return (x @ x.t()).dtype

    with autocast(CPU, torch.bfloat16):
        assert dtype_of_product(a) == torch.float32


@pytest.mark.parametrize("method_name", ["c3gan", "slcgan"])
def test_bf16_training_step_keeps_fp32_weights_and_tracks_fp32(method_name):
    """bf16 autocast: finite losses, weights and optimiser state stay fp32, losses close to the fp32 step."""
    results = {}
    for precision in ("fp32", "bf16"):
        torch.manual_seed(0)
        cfg = config(method_name, precision=precision)
        method = METHODS[method_name](cfg, CPU)
        data = real_batch(method, cfg)
        torch.manual_seed(1)
        results[precision] = {k: float(v) for k, v in method.train_step(data).items()}
        assert all(p.dtype == torch.float32 for net in method.networks().values() for p in net.parameters())
    fp, bf = results["fp32"], results["bf16"]
    assert all(torch.isfinite(torch.tensor(v)) for v in bf.values())
    # D's loss comes from the first passes (same weights): bf16 rounding only. G's comes after D's
    # update(s), whose first Adam step (about lr * sign(grad)) amplifies rounding in tiny gradients.
    assert bf["d_loss"] == pytest.approx(fp["d_loss"], rel=0.03)
    assert bf["g_loss"] == pytest.approx(fp["g_loss"], rel=0.1, abs=0.1)


@pytest.mark.parametrize("method_name", ["c3gan", "slcgan"])
def test_channels_last_gives_the_same_step(method_name):
    """channels_last (the CUDA default) changes the layout, not the arithmetic: same losses, and the same
    gradients left in every network by its last backward pass of the step (learning rate 0, so rounding
    in one update cannot feed the next pass)."""
    out = {}
    for fmt in ("contiguous", "channels_last"):
        torch.manual_seed(0)
        cfg = config(method_name, memory_format=fmt)
        method = METHODS[method_name](cfg, CPU)
        if fmt == "channels_last":
            conv = next(m for m in method.networks()["generator"].modules() if isinstance(m, torch.nn.Conv2d))
            assert conv.weight.is_contiguous(memory_format=torch.channels_last)
        for opt in method.optimizers().values():     # weights stay put: each pass sees the same networks
            for group in opt.param_groups:
                group["lr"] = 0.0
        data = real_batch(method, cfg)
        torch.manual_seed(1)
        step_losses = method.train_step(data)
        grads = {n: [p.grad.clone() for p in net.parameters() if p.grad is not None]
                 for n, net in method.networks().items()}
        out[fmt] = step_losses, grads
    (la, ga), (lb, gb) = out["contiguous"], out["channels_last"]
    for key in la:
        assert torch.allclose(la[key], lb[key], rtol=1e-4, atol=1e-5), key
    for name in ga:
        assert ga[name] and len(ga[name]) == len(gb[name]), name
        # Other kernels sum in another order: float rounding, amplified by cancellation in weight gradients,
        # stays under 1% of the largest gradient; a layout bug (a mixed-up axis) gives errors of order 1.
        scale = max(g.abs().max() for g in ga[name])
        assert all(torch.allclose(g, h, rtol=1e-2, atol=1e-2 * scale) for g, h in zip(ga[name], gb[name])), name
