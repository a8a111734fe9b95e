"""Cache build rate on photo-sized JPEGs: decoding at a reduced scale (JPEG draft) against full decoding.

Run by hand, not by pytest:

    git worktree add /tmp/wt-before <commit before the change>
    python tests/bench/photo_decode.py --before /tmp/wt-before          # 600 photos, sides 32, 64, 128
    python tests/bench/photo_decode.py --before /tmp/wt-before --images DIR --sides 19 76 152   # any folder

1. A folder of N photo-sized JPEGs is generated once from the CUB-100 archive in ../shared/data: each
   bird photo (227 x 227) randomly flipped and cropped, then enlarged to a camera size (4032 x 3024,
   3000 x 2000, 1920 x 1080, 1280 x 960 or 800 x 600, in turn) and saved at JPEG quality 90. Enlarged
   photos are smoother than camera photos, so entropy decoding, which both ways pay per pixel of the
   file, is cheaper here than in a real photo folder.
2. For each side, the cache build of the whole folder (imgcluster.data.load_image_set, 2 decoding
   workers, an empty cache folder each time) with this checkout's code and with the --before checkout,
   alternated --repeat times in fresh processes; the fastest of each is reported, with the ratio, and
   the mean and largest absolute difference between the two caches' pixels (0-255).

--images DIR builds the caches of DIR's files instead (e.g. the 10,000 small files large_folder.py
generates), for a change to the cache build itself rather than to decoding.
--read-back hands every row to a reader during the build (an `on_rows` that does nothing), as a cold
`assign` does. The building process's CPU seconds (its own and its threads', not the workers') are
reported beside the rates: the work that more decoding workers cannot share.

Nothing is downloaded; the caches are deleted at the end (the generated folder is kept).
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import random
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

from shared_sets import SHARED

HERE = Path(__file__).resolve().parents[2]
CAMERA_SIZES = [(4032, 3024), (3000, 2000), (1920, 1080), (1280, 960), (800, 600)]

BUILD = """
import json, resource, sys, time
from pathlib import Path
import imgcluster
from imgcluster.data import load_image_set
root, side, cache, read_back = sys.argv[1], int(sys.argv[2]), Path(sys.argv[3]), sys.argv[4] == "1"
def cpu():
    r = resource.getrusage(resource.RUSAGE_SELF)      # this process and its threads, not the workers
    return r.ru_utime + r.ru_stime
start, start_cpu = time.perf_counter(), cpu()
s = load_image_set(root, side, cache_dir=cache, workers=2, on_rows=(lambda *row: None) if read_back else None)
took, took_cpu = time.perf_counter() - start, cpu() - start_cpu
print(json.dumps({"seconds": took, "cpu": took_cpu, "files": len(s.files), "ok": int(s.ok.sum()),
                  "npy": str(next(cache.glob('*.npy'))), "code": imgcluster.__file__}))
"""


def make_folder(dest: Path, n: int, seed: int = 0) -> Path:
    done = dest / ".done"
    if done.exists() and len(list(dest.glob("*.jpg"))) == n:
        return dest
    dest.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    written = 0
    with tarfile.open(SHARED / "cub100.tar.gz") as tar:
        for member in tar:
            if written == n:
                break
            if not (member.isfile() and member.name.endswith(".jpg")):
                continue
            img = Image.open(io.BytesIO(tar.extractfile(member).read())).convert("RGB")
            if rng.random() < 0.5:
                img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
            w, h = img.size
            cw, ch = int(w * rng.uniform(0.8, 1.0)), int(h * rng.uniform(0.8, 1.0))
            left, top = rng.randint(0, w - cw), rng.randint(0, h - ch)
            size = CAMERA_SIZES[written % len(CAMERA_SIZES)]
            img = img.crop((left, top, left + cw, top + ch)).resize(size, Image.Resampling.BICUBIC)
            img.save(dest / f"photo-{written:05d}.jpg", quality=90)
            written += 1
    done.touch()
    return dest


def build(tree: Path, folder: Path, side: int, cache: Path, read_back: bool) -> dict:
    env = {**os.environ, "PYTHONPATH": str(tree)}
    # cwd: `python -c` puts the working directory first on sys.path, ahead of PYTHONPATH
    out = subprocess.run([sys.executable, "-c", BUILD, str(folder), str(side), str(cache), str(int(read_back))],
                         env=env, cwd=cache.parent, capture_output=True, text=True, check=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert Path(result["code"]).is_relative_to(tree), f"imported {result['code']}, not the code in {tree}"
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", type=Path, required=True, help="checkout of the code to compare with")
    parser.add_argument("--photos", type=int, default=600)   # 512 or more: the worker pool decodes
    parser.add_argument("--sides", type=int, nargs="+", default=[32, 64, 128])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--folder", type=Path, default=Path("/tmp/imgcluster-bench/photos"))
    parser.add_argument("--images", type=Path, help="build the caches of this folder's files instead of photos")
    parser.add_argument("--read-back", action="store_true",
                        help="hand every row to a reader during the build, as a cold `assign` does")
    args = parser.parse_args()

    if args.images:
        from imgcluster.data import scan_folder

        folder, files = args.images, len(scan_folder(args.images))
        print(f"{files} files in {folder}; load average {os.getloadavg()[0]:.2f}")
    else:
        folder, files = make_folder(args.folder / str(args.photos), args.photos), args.photos
        pixels = 0
        for path in folder.glob("*.jpg"):
            with Image.open(path) as img:                # the header only
                pixels += math.prod(img.size)
        print(f"{files} JPEGs, {pixels / 1e6 / files:.1f} megapixels each on average, in {folder}; "
              f"load average {os.getloadavg()[0]:.2f}")
    print("| side | before: files / s | after: files / s | speed-up | building process's CPU-s: before / after "
          "| pixels: mean / largest difference |")
    print("| --- | --- | --- | --- | --- | --- |")
    for side in args.sides:
        best = {"before": None, "after": None}
        with tempfile.TemporaryDirectory() as scratch:
            for r in range(args.repeat):
                for name, tree in (("before", args.before.resolve()), ("after", HERE)):
                    cache = Path(scratch) / f"{name}-{r}"
                    result = build(tree, folder, side, cache, args.read_back)
                    assert result["files"] == files and (args.images or result["ok"] == files), result
                    if best[name] is None or result["seconds"] < best[name]["seconds"]:
                        best[name] = result
            a = np.load(best["before"]["npy"]).astype(np.int16)
            b = np.load(best["after"]["npy"]).astype(np.int16)
            diff = np.abs(a - b)
            rate = {k: files / v["seconds"] for k, v in best.items()}
            print(f"| {side} | {rate['before']:.0f} | {rate['after']:.0f} | {rate['after'] / rate['before']:.2f}x "
                  f"| {best['before']['cpu']:.2f} / {best['after']['cpu']:.2f} | {diff.mean():.2f} / {diff.max()} |")
    print(f"load average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
