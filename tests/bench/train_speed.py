"""Training speed: images per second of full training steps, per method and size.

A step is one D step + one G step for C3-GAN; two D steps, one G step and one C step for slcGAN.

Run by hand, not by pytest:

    python tests/bench/train_speed.py                        # CPU: 32, 64, 128 px at batch 16
    python tests/bench/train_speed.py --device cuda --batch-size 64
    python tests/bench/train_speed.py --sizes 128 --steps 3 --markdown >> tests/bench/RESULTS.md
    python tests/bench/train_speed.py --device cuda --sizes 128 --precision fp32 bf16 --batch-size 64
    python tests/bench/train_speed.py --device cuda --sizes 128 --precision bf16 --batch-size 64 \
        --extra contiguous cudnn-benchmark compiled --flops --json speed.json
    python tests/bench/train_speed.py --preset slcgan-32-cpu --clusters 10 --precision fp32 bf16 --extra contiguous channels_last
    python tests/bench/train_speed.py --preset slcgan-32-cpu --clusters 10 --variant c32 slcgan.c_width=32

Inputs are real CUB-100 bird images from ../shared/data (or --archive; resized once in memory); random
pixels if the archive is absent (the step's cost does not depend on content). On a GPU the images sit in
GPU memory and batches are gathered there, as the training loop does when the set fits. At 128 px it also
times the literal formulation (tiled one-hot concat in the texture head, per-cluster logit loop) in the
same run and reports the ratio.

--repeat N times every variant N times, alternating them (each rebuilt), and keeps each one's fastest: on a
shared machine the load drifts between variants timed one after the other.
--preset times a preset's settings (method, image size, batch, networks) instead of the method's defaults;
--sizes and --batch-size still override it.
--extra times variants of each row in the same run: `contiguous` and `channels_last` (the memory format,
whatever the default),
`cudnn-benchmark` (cuDNN times its algorithms once per shape instead of its default choice),
`compiled` (torch.compile, as `--compile`; its first steps, the compilation, are reported apart).
--variant NAME KEY=VALUE [KEY=VALUE ...] (repeatable) times one more variant of each row with those
settings, written as `train --set` takes them (e.g. `--variant d2 slcgan.d_steps=2`).
--flops counts the matrix and convolution FLOPs of one step (torch.utils.flop_counter, forward and
backward) and reports the achieved TFLOP/s and, on a GPU, the fraction of the bf16 peak: the dense bf16
matrix-product rate measured in the same run (8192^3) and the datasheet figure (--peak-tflops).
"""

from __future__ import annotations

import argparse
import io
import json
import platform
import resource
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from imgcluster.config import ConfigError, load_preset, parse_overrides, resolve_config
from imgcluster.data import resize_square
from imgcluster.methods import METHODS

from shared_sets import SHARED


def real_images(count: int, size: int, archive: Path) -> torch.Tensor:
    """(count, size, size, 3) uint8 from the CUB-100 archive, or random pixels without it."""
    if not archive.exists():
        return torch.randint(0, 256, (count, size, size, 3), dtype=torch.uint8)
    out = []
    with tarfile.open(archive) as tar:
        for member in tar:
            if member.isfile() and member.name.lower().endswith(".jpg"):
                img = Image.open(io.BytesIO(tar.extractfile(member).read())).convert("RGB")
                out.append(resize_square(img, size))
                if len(out) == count:
                    break
    return torch.from_numpy(np.stack(out))


def set_literal(method, literal: bool) -> None:
    method.G.tex_in.literal = literal
    method.D.loop_logits = literal


def one_step(method, data: torch.Tensor, batch: int) -> None:
    """One training step on a random batch (a step reads real_batches_per_step batches)."""
    idx = torch.randint(0, data.shape[0], (batch * getattr(method, "real_batches_per_step", 1),))
    method.train_step(data[idx.to(data.device)].to(method.device))


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(method, data: torch.Tensor, batch: int, steps: int, warmup: int) -> tuple[float, float]:
    """(seconds per training step after `warmup` untimed steps, seconds the warm-up took)."""
    t0 = time.perf_counter()
    for _ in range(warmup):
        one_step(method, data, batch)
    sync(method.device)
    t1 = time.perf_counter()
    for _ in range(steps):
        one_step(method, data, batch)
    sync(method.device)
    return (time.perf_counter() - t1) / steps, t1 - t0


def step_flops(method, data: torch.Tensor, batch: int) -> int:
    """Matrix-product and convolution FLOPs of one training step, forward and backward."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        one_step(method, data, batch)
    return counter.get_total_flops()


def matmul_tflops(device: torch.device, n: int = 8192, repeat: int = 10) -> float:
    """Dense bf16 matrix-product rate of this GPU (n^3, random data), TFLOP/s: the practical peak."""
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    sync(device)
    t0 = time.perf_counter()
    for _ in range(repeat):
        a @ b
    sync(device)
    return 2 * n ** 3 * repeat / (time.perf_counter() - t0) / 1e12


def set_time(row: dict, sec: float, real_per_step: int, measured_peak: float | None, datasheet_peak: float) -> None:
    """Fill `row`'s timing fields from `sec` per step: images/s and, where its FLOPs were counted, TFLOP/s
    and the fractions of the measured and datasheet bf16 peaks (a GPU's only: measured_peak is None else)."""
    row.update(s_per_step=sec, img_per_s=real_per_step / sec)
    if "gflop_per_step" in row:
        row["tflops"] = row["gflop_per_step"] / 1e3 / sec
        if measured_peak:
            row["of_measured_peak"] = row["tflops"] / measured_peak
            row["of_datasheet_peak"] = row["tflops"] / datasheet_peak


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# name: (config overrides, cudnn.benchmark). imgcluster leaves cudnn.benchmark off: on an H200 it made no
# measurable difference (tests/bench/RESULTS.md, "Training on one GPU"); that run had it on in every row.
VARIANTS = {
    "imgcluster": ({}, False),
    "literal": ({}, False),
    "contiguous": ({"memory_format": "contiguous"}, False),
    "channels_last": ({"memory_format": "channels_last"}, False),
    "cudnn-benchmark": ({}, True),
    "compiled": ({"compile": True}, False),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--method", choices=list(METHODS), help="[default: the preset's, else c3gan]")
    ap.add_argument("--preset", help="time this preset's settings (e.g. slcgan-32-cpu), not the method's defaults")
    ap.add_argument("--sizes", type=int, nargs="+", help="[default: the preset's image size, else 32 64 128]")
    ap.add_argument("--batch-size", type=int, help="[default: the preset's, else 16]")
    ap.add_argument("--clusters", type=int, default=200, help="K (CUB-200 overclustering scale: 200)")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--repeat", type=int, default=1,
                    help="rounds over the variants, alternated; each row keeps its fastest (for a noisy machine)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--precision", nargs="+", default=["fp32"], help="fp32 and/or bf16 (autocast), each timed")
    ap.add_argument("--no-literal", action="store_true", help="skip the literal-formulation comparison")
    ap.add_argument("--extra", nargs="+", default=[], choices=[v for v in VARIANTS if v not in ("imgcluster", "literal")],
                    help="variants timed beside each row")
    ap.add_argument("--variant", nargs="+", action="append", default=[], metavar="NAME KEY=VALUE",
                    help="time a variant of each row with these settings, as train's --set (repeatable)")
    ap.add_argument("--flops", action="store_true", help="count FLOPs per step; achieved TFLOP/s and fraction of peak")
    ap.add_argument("--peak-tflops", type=float, default=989.0,
                    help="datasheet dense bf16 TFLOP/s of the GPU [H100 / H200 SXM: 989]")
    ap.add_argument("--archive", type=Path, default=SHARED / "cub100.tar.gz", help="CUB-100 archive")
    ap.add_argument("--markdown", action="store_true", help="print a Markdown table for RESULTS.md")
    ap.add_argument("--json", type=Path, help="also write the rows (and the device) to this JSON file")
    args = ap.parse_args()
    for name, *pairs in args.variant:
        if not pairs or name in VARIANTS:
            ap.error(f"--variant {name}: needs a new name and at least one KEY=VALUE")
        try:
            VARIANTS[name] = (parse_overrides(pairs), False)
        except ConfigError as e:
            ap.error(f"--variant {name}: {e}")
        args.extra.append(name)
    preset = load_preset(args.preset) if args.preset else {}
    args.method = args.method or preset.get("method", "c3gan")
    args.sizes = args.sizes or ([preset["image_size"]] if "image_size" in preset else [32, 64, 128])
    args.batch_size = args.batch_size or preset.get("batch_size", 16)

    device = torch.device(args.device)
    torch.manual_seed(0)
    measured_peak = matmul_tflops(device) if device.type == "cuda" and args.flops else None
    if measured_peak:
        print(f"bf16 matrix product 8192^3: {measured_peak:.0f} TFLOP/s", file=sys.stderr, flush=True)
    rows = []
    for size, precision in [(size, p) for size in args.sizes for p in args.precision]:
        data = None
        variants = ["imgcluster"]
        if size == 128 and precision == "fp32" and not args.no_literal and args.method == "c3gan":
            variants.append("literal")
        variants += args.extra
        for round_, name in [(r, n) for r in range(args.repeat) for n in variants]:
            overrides, cudnn_benchmark = VARIANTS[name]
            torch.backends.cudnn.benchmark = cudnn_benchmark
            cfg = resolve_config((preset, args.preset or "defaults"),
                                 ({"method": args.method, "image_size": size, "clusters": args.clusters,
                                   "batch_size": args.batch_size, "precision": precision, **overrides}, "bench"))
            reset_peak_memory(device)
            method = METHODS[args.method](cfg, device)
            if data is None:
                data = real_images(max(64, args.batch_size), METHODS[args.method].cache_size(cfg), args.archive)
                data = data.to(device)          # on a GPU: gathered there, as training does when the set fits
            if name == "literal":
                set_literal(method, True)
            warmup = max(args.warmup, 3) if name == "compiled" else args.warmup
            sec, warm_s = time_steps(method, data, args.batch_size, args.steps, warmup)
            # images/s counts real images read, as the training loop's metrics do (slcGAN: 2 batches a step)
            real_per_step = args.batch_size * getattr(method, "real_batches_per_step", 1)
            print(f"{args.method} {size}px {name} {precision}: {sec:.4f} s/step, {real_per_step / sec:.1f} img/s, "
                  f"peak {peak_memory_mb(device):.0f} MB", file=sys.stderr, flush=True)
            if round_ > 0:                    # a later round of --repeat: keep the variant's fastest
                row = next(r for r in rows if (r["size"], r["precision"], r["variant"]) == (size, precision, name))
                if sec < row["s_per_step"]:
                    set_time(row, sec, real_per_step, measured_peak, args.peak_tflops)
                del method
                continue
            row = {"method": args.method, "size": size, "variant": name, "precision": precision,
                   "batch": args.batch_size, "peak_mb": peak_memory_mb(device), "warmup_s": warm_s}
            if args.flops and name == "imgcluster":
                row["gflop_per_step"] = step_flops(method, data, args.batch_size) / 1e9
            set_time(row, sec, real_per_step, measured_peak, args.peak_tflops)
            rows.append(row)
            if "tflops" in row:
                print(f"  {row['tflops']:.1f} TFLOP/s", file=sys.stderr, flush=True)
            del method
    torch.backends.cudnn.benchmark = False

    dev = (torch.cuda.get_device_name(device) if device.type == "cuda"
           else f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)")
    if args.json:
        args.json.write_text(json.dumps({"command": "python tests/bench/train_speed.py " + " ".join(sys.argv[1:]),
                                         "device": dev, "torch": torch.__version__, "clusters": args.clusters,
                                         "preset": args.preset,
                                         "bf16_matmul_tflops": measured_peak, "rows": rows}, indent=2))
    if args.markdown:
        print(f"\n`python tests/bench/train_speed.py {' '.join(sys.argv[1:])}` on {dev}, torch {torch.__version__}, K = {args.clusters}"
              + (f", preset {args.preset}" if args.preset else "")
              + (f"; bf16 8192^3 matrix product {measured_peak:.0f} TFLOP/s" if measured_peak else "") + "\n")
        print("| method | size | variant | precision | batch | s/step | images/s | peak memory (MB) | speed-up vs literal "
              "| GFLOP/step | TFLOP/s | of measured bf16 peak | of datasheet bf16 peak |")
        print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
        literal = {(r["size"], r["precision"]): r["s_per_step"] for r in rows if r["variant"] == "literal"}
        for r in rows:
            key = (r["size"], r["precision"])
            ratio = f"{literal[key] / r['s_per_step']:.2f}x" if key in literal and r["variant"] == "imgcluster" else ""
            extra = [f"{r[k]:.1f}" if k in r else "" for k in ("gflop_per_step", "tflops")]
            extra += [f"{100 * r[k]:.1f} %" if k in r else "" for k in ("of_measured_peak", "of_datasheet_peak")]
            print(f"| {r['method']} | {r['size']} | {r['variant']} | {r['precision']} | {r['batch']} | {r['s_per_step']:.4f} | "
                  f"{r['img_per_s']:.1f} | {r['peak_mb']:.0f} | {ratio} | {' | '.join(extra)} |")


if __name__ == "__main__":
    main()
