"""What one empty-cluster check of slcGAN (`slcgan.split_empty`) costs: C's forward pass over the sample.

Run by hand, not by pytest:

    python tests/bench/split_cost.py --clusters 10 400 --precision bf16 --threads 1

For each K, a fresh slcGAN of --preset labels split_sample(K) random 32 px images (uint8 noise: only the
time is measured) the way a check does, BatchNorm in batch mode; prints the images labelled and the
fastest of --repeats in seconds. A check runs once every `slcgan.split_every` steps (250).
"""

from __future__ import annotations

import argparse
import time

import torch

from imgcluster.config import load_preset, resolve_config
from imgcluster.methods import METHODS
from imgcluster.methods.slcgan import split_sample


class Rows:
    """What the training loop hands the check (training.Batches): len() and get(indices)."""

    def __init__(self, images: torch.Tensor):
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def get(self, idx: torch.Tensor) -> torch.Tensor:
        return self.images[idx]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clusters", type=int, nargs="+", default=[10, 400])
    parser.add_argument("--preset", default="slcgan-32-cpu")
    parser.add_argument("--precision", default="bf16")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print("| K | images labelled | seconds per check |\n| --- | --- | --- |")
    for k in args.clusters:
        cfg = resolve_config((load_preset(args.preset), args.preset), ({"clusters": k, "precision": args.precision}, "bench"))
        method = METHODS["slcgan"](cfg, torch.device("cpu"))
        n = split_sample(k)
        size = cfg.image_size
        images = Rows(torch.randint(0, 256, (n, size, size, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0)))
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            method._sample_features(images, torch.randperm(n))
            times.append(time.perf_counter() - start)
        print(f"| {k} | {n:,} | {min(times):.2f} |")


if __name__ == "__main__":
    main()
