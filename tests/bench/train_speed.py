"""Training speed: images per second of full training steps, per method and size.

A step is one D step + one G step for C3-GAN; two D steps, one G step and one C step for slcGAN.

Run by hand, not by pytest:

    python tests/bench/train_speed.py                        # CPU: 32, 64, 128 px at batch 16
    python tests/bench/train_speed.py --device cuda --batch-size 64
    python tests/bench/train_speed.py --sizes 128 --steps 3 --markdown >> tests/bench/RESULTS.md
    python tests/bench/train_speed.py --device cuda --sizes 128 --precision fp32 bf16 --batch-size 64

Inputs are real CUB-100 bird images from ../shared/data (resized once in memory); random pixels
if the archive is absent (the step's cost does not depend on content). At 128 px it also times the
literal formulation (tiled one-hot concat in the texture head, per-cluster logit loop) in the same
run and reports the ratio.
"""

from __future__ import annotations

import argparse
import io
import platform
import resource
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from imgcluster.config import resolve_config
from imgcluster.data import resize_square
from imgcluster.methods import METHODS

SHARED = Path(__file__).resolve().parents[3] / "shared" / "data"


def real_images(count: int, size: int) -> torch.Tensor:
    """(count, size, size, 3) uint8 from the CUB-100 archive, or random pixels without it."""
    archive = SHARED / "cub100.tar.gz"
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


def time_steps(method, data: torch.Tensor, batch: int, steps: int, warmup: int) -> float:
    """Seconds per training step, after `warmup` untimed steps (a step reads real_batches_per_step batches)."""
    per_step = getattr(method, "real_batches_per_step", 1)

    def step(i):
        idx = torch.randint(0, data.shape[0], (batch * per_step,))
        method.train_step(data[idx].to(method.device))

    for i in range(warmup):
        step(i)
    if method.device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for i in range(steps):
        step(i)
    if method.device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / steps


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--method", default="c3gan", choices=list(METHODS))
    ap.add_argument("--sizes", type=int, nargs="+", default=[32, 64, 128])
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--clusters", type=int, default=200, help="K (CUB-200 overclustering scale: 200)")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--precision", nargs="+", default=["fp32"], help="fp32 and/or bf16 (autocast), each timed")
    ap.add_argument("--no-literal", action="store_true", help="skip the literal-formulation comparison")
    ap.add_argument("--markdown", action="store_true", help="print a Markdown table for RESULTS.md")
    args = ap.parse_args()

    device = torch.device(args.device)
    torch.manual_seed(0)
    rows = []
    for size, precision in [(size, p) for size in args.sizes for p in args.precision]:
        cfg = resolve_config(({"method": args.method, "image_size": size, "clusters": args.clusters,
                               "batch_size": args.batch_size, "precision": precision}, "bench"))
        method = METHODS[args.method](cfg, device)
        data = real_images(max(64, args.batch_size), METHODS[args.method].cache_size(cfg))
        variants = [("imgcluster", False)]
        if (size == 128 and precision == "fp32" and not args.no_literal and hasattr(method, "G")
                and hasattr(method.G, "tex_in")):
            variants.append(("literal", True))
        for name, literal in variants:
            if literal:
                set_literal(method, True)
            sec = time_steps(method, data, args.batch_size, args.steps, args.warmup)
            set_literal(method, False) if literal else None
            # images/s counts real images read, as the training loop's metrics do (slcGAN: 2 batches a step)
            real_per_step = args.batch_size * getattr(method, "real_batches_per_step", 1)
            rows.append({"method": args.method, "size": size, "variant": name, "precision": precision,
                         "batch": args.batch_size,
                         "s_per_step": sec, "img_per_s": real_per_step / sec,
                         "peak_mb": peak_memory_mb(device)})
            print(f"{args.method} {size}px {name} {precision}: {sec:.3f} s/step, {rows[-1]['img_per_s']:.1f} img/s, "
                  f"peak {rows[-1]['peak_mb']:.0f} MB", file=sys.stderr, flush=True)

    if args.markdown:
        dev = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
        print(f"\n`python tests/bench/train_speed.py {' '.join(sys.argv[1:])}` on {dev}, torch {torch.__version__}, K = {args.clusters}\n")
        print("| method | size | variant | precision | batch | s/step | images/s | peak memory (MB) | speed-up vs literal |")
        print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
        literal = {r["size"]: r["s_per_step"] for r in rows if r["variant"] == "literal"}
        for r in rows:
            ratio = (f"{literal[r['size']] / r['s_per_step']:.2f}x"
                     if r["size"] in literal and r["variant"] != "literal" and r["precision"] == "fp32" else "")
            print(f"| {r['method']} | {r['size']} | {r['variant']} | {r['precision']} | {r['batch']} | {r['s_per_step']:.3f} | "
                  f"{r['img_per_s']:.1f} | {r['peak_mb']:.0f} | {ratio} |")


if __name__ == "__main__":
    main()
