"""Large folders: cache build rate, incremental rebuild, warm reuse, and `assign` speed against decoding.

Run by hand, not by pytest:

    python tests/bench/large_folder.py                       # 100,000 files; prints a Markdown table
    python tests/bench/large_folder.py --files 5000          # a quick look

Steps, each in its own process (so each has its own peak memory: the table gives the main process's
peak resident set, and the peak of the summed PSS of it and its decoding workers, sampled every 50 ms):

1. A folder of N small real-looking images is generated once from the MNIST and CIFAR-10 archives in
   ../shared/data (random crop, flip, rotation, colour change, 24-64 px, PNG and JPEG, nested folders)
   into a scratch folder, and reused by later runs.
2. The cache build of all N files with an empty cache folder; the rebuild after adding 1% new files
   (only those are decoded); the warm reuse (nothing changed: scan, stat, read the index).
3. A tiny model (`imgcluster train SUBSET --clusters 10 --preset cpu-tiny --steps 2`, made once) and
   `imgcluster assign` on a 10,000-file subset with a cold and a warm cache, in fp32 (what `auto` gives
   on a CPU) and with `--precision bf16`, against the pure decode of
   the same files with imgcluster.data's own loader (one process, and the worker pool the cache uses)
   and against the cache build alone. `assign` runs the model while a cold cache is built (on the CPU
   with half the cores until the build is done); the run that builds the cache first is measured too.
   "command" time is the assign command itself (model load, scan, cache, inference, CSV), in its
   process after the imports; "process" time adds the interpreter start and the imports (torch,
   torchvision) that a shell user also waits for. The cold `assign` is also run as a shell runs it,
   nothing imported first (the command starts the cache build, then imports torch): its process time
   is the figure a user sees. The image files are in the OS page cache throughout
   (the earlier steps read them). These steps run --repeat times (default 3) and the fastest run is
   reported, as the machine may be shared.

With --run RUN --folder FOLDER [--device cuda], only step 3 runs, with that trained run on that folder
(e.g. a GPU model on a real photo folder): the generated folder, the cache steps and the tiny model are
skipped. --no-bf16 skips the bf16 rows (on a CPU without bf16 units they are emulated, 4-7x slower).

Nothing is downloaded; the added files and every cache are deleted at the end (the folder is kept).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import random
import shutil
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from pathlib import Path

from shared_sets import SHARED

SUBSET_FILES = 10_000                 # files per top-level folder of the generated tree
FOLDER_VERSION = 1                    # bump when the generator changes: the scratch folder is remade


# ---------------------------------------------------------------------------------------------
# The generated folder
# ---------------------------------------------------------------------------------------------

def read_sources(every: int = 3) -> list[tuple[bytes, str]]:
    """Every `every`-th image of the MNIST and CIFAR-10 archives, as (bytes, 'mnist' | 'cifar')."""
    sources = []
    for name in ("mnist", "cifar10"):
        archive = SHARED / f"{name}.tar.gz"
        if not archive.exists():
            sys.exit(f"{archive} is absent: the benchmark needs ../shared/data (see its README)")
        with tarfile.open(archive) as tar:
            for i, member in enumerate(m for m in tar if m.isfile() and m.name.endswith((".png", ".jpg"))):
                if i % every == 0:
                    sources.append((tar.extractfile(member).read(), name))
    return sources


_SOURCES: list[tuple[bytes, str]] = []    # set before the generator's workers fork


def relative_path(i: int, ext: str) -> str:
    """Some nesting: 10,000 files per top-level folder; two thirds in sub-folders, some deeper."""
    j = i % SUBSET_FILES
    sub = "" if j % 3 == 0 else f"s{j % 7}/"
    deep = "deep/er/" if j % 5 == 0 else ""
    return f"{i // SUBSET_FILES:02d}/{sub}{deep}img-{i:06d}.{ext}"


def make_image(i: int, seed: int):
    """Image i: a randomly cropped, flipped, rotated and recoloured source image; (relative path, bytes)."""
    from PIL import Image, ImageEnhance, ImageOps

    rng = random.Random(seed * 1_000_003 + i)
    blob, kind = _SOURCES[rng.randrange(len(_SOURCES))]
    img = Image.open(io.BytesIO(blob))
    img.load()
    if kind == "mnist" and rng.random() < 0.6:   # coloured ink on a coloured ground
        ink, ground = (tuple(rng.randrange(256) for _ in range(3)) for _ in range(2))
        img = ImageOps.colorize(img.convert("L"), black=ground, white=ink)
    elif kind == "cifar" or rng.random() < 0.5:
        img = img.convert("RGB")
    w, h = img.size
    side = int(min(w, h) * rng.uniform(0.7, 1.0))
    left, top = rng.randrange(w - side + 1), rng.randrange(h - side + 1)
    img = img.crop((left, top, left + side, top + side))
    if rng.random() < 0.5:
        img = ImageOps.mirror(img)
    img = img.rotate(rng.uniform(-25, 25), resample=Image.Resampling.BILINEAR)
    if img.mode == "RGB":
        for enhance in (ImageEnhance.Color, ImageEnhance.Brightness, ImageEnhance.Contrast):
            img = enhance(img).enhance(rng.uniform(0.7, 1.3))
    out = rng.randrange(24, 65)
    img = img.resize((out, out), Image.Resampling.BICUBIC)
    buf = io.BytesIO()
    if rng.random() < 0.5:
        img.save(buf, "PNG", compress_level=rng.choice([1, 6]))
        ext = "png"
    else:
        img.save(buf, "JPEG", quality=rng.randrange(70, 96))
        ext = "jpg"
    return relative_path(i, ext), buf.getvalue()


def write_images(task) -> int:
    root, start, stop, seed = task
    for i in range(start, stop):
        rel, blob = make_image(i, seed)
        path = Path(root) / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(blob)
    return stop - start


def generate(root: Path, start: int, stop: int, seed: int, workers: int) -> None:
    """Write images start..stop-1 under root, in `workers` forked processes."""
    import multiprocessing

    global _SOURCES
    if not _SOURCES:
        _SOURCES = read_sources()
    tasks = [(str(root), s, min(s + 1000, stop), seed) for s in range(start, stop, 1000)]
    with multiprocessing.get_context("fork").Pool(workers) as pool:   # workers inherit _SOURCES
        done = 0
        for count in pool.imap_unordered(write_images, tasks):
            done += count
            print(f"\rgenerating {root}: {done}/{stop - start}", end="", file=sys.stderr, flush=True)
    print(file=sys.stderr)


def ensure_folder(root: Path, files: int, workers: int) -> None:
    """Make the scratch folder of `files` images, or reuse it when a finished one is there."""
    marker = root / ".bench-folder.json"               # hidden: the scan skips it
    want = {"files": files, "version": FOLDER_VERSION}
    if marker.exists() and json.loads(marker.read_text()) == want:
        return
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    t = time.perf_counter()
    generate(root, 0, files, seed=0, workers=workers)
    marker.write_text(json.dumps(want))
    print(f"generated {files} files in {time.perf_counter() - t:.0f} s", file=sys.stderr)


# ---------------------------------------------------------------------------------------------
# Steps, each run in a child process of its own
# ---------------------------------------------------------------------------------------------

def peak_rss_mb() -> float:
    """This process's peak resident set in MB (exact: the kernel's high-water mark)."""
    return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:")) / 1024


class TreeMemory(threading.Thread):
    """Samples the proportional set size (PSS: shared pages split between their users) of this process
    and all its descendants (the forkserver and the decoding workers) every 50 ms; keeps the peak sum."""

    def __init__(self):
        super().__init__(daemon=True)
        self.peak_mb = 0.0
        self.stop = threading.Event()

    def run(self):
        while not self.stop.wait(0.05):
            self.peak_mb = max(self.peak_mb, sum(map(pss_mb, descendants(os.getpid()))))

    def finish(self) -> float:
        self.peak_mb = max(self.peak_mb, sum(map(pss_mb, descendants(os.getpid()))))
        self.stop.set()
        return self.peak_mb


def descendants(pid: int) -> list[int]:
    """pid and every process below it, from /proc/*/stat."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = open(f"/proc/{entry}/stat").read()
            except OSError:
                continue
            ppid = int(stat[stat.rindex(")") + 2:].split()[1])
            children.setdefault(ppid, []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        found.append(todo.pop())
        todo.extend(children.get(found[-1], []))
    return found


def pss_mb(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("Pss:")) / 1024
    except (OSError, StopIteration):
        return 0.0                              # ended meanwhile


def step_cache(args: dict) -> dict:
    """Scan and load_image_set (cold, incremental or warm, depending on the cache folder)."""
    from imgcluster.data import load_image_set, scan_folder

    t = time.perf_counter()
    files = scan_folder(args["folder"])
    scanned = time.perf_counter() - t
    images = load_image_set(args["folder"], args["size"], files=files, cache_dir=args["cache"])
    return {"seconds": time.perf_counter() - t, "scan_seconds": scanned, "files": len(files),
            "usable": int(images.ok.sum())}


def step_decode(args: dict) -> dict:
    """Decode every file of the folder with the cache's own decoder, writing nothing."""
    from imgcluster import data

    files = data.scan_folder(args["folder"])
    t = time.perf_counter()
    for _ in data._decode_stream(Path(args["folder"]), files, args["size"], data.DEFAULT_MAX_PIXELS, args["workers"]):
        pass
    return {"seconds": time.perf_counter() - t, "files": len(files)}


def step_assign(args: dict) -> dict:
    """`imgcluster assign RUN FOLDER -o OUT --quiet --precision P` (P = args["precision"], default fp32),
    run in this process after the imports (the model runs during the cache build); with
    args["build_first"], the same in fp32 with the cache built before the model runs (what `assign` did
    on the CPU before the model shared the cores)."""
    import torch

    from imgcluster import assignments, pipeline, rundir
    from imgcluster.cli import app

    os.environ["IMGCLUSTER_CACHE"] = args["cache"]
    device = args.get("device", "cpu")
    t = time.perf_counter()
    if args.get("build_first"):
        cfg, method = rundir.load_model(rundir.RunDir(Path(args["run"])), torch.device(device), "fp32")
        rows = pipeline.assign_folder(method, Path(args["folder"]), pipeline.cache_size(cfg), overlap=False)
        with open(args["out"], "w", newline="", encoding="utf-8", errors="surrogateescape") as out:
            assignments.write_assignments(rows, out)
    else:
        app(["assign", args["run"], args["folder"], "-o", args["out"], "--quiet", "--precision",
             args.get("precision", "fp32"), "--device", device], standalone_mode=False)
    seconds = time.perf_counter() - t
    with open(args["out"], "rb") as f:
        rows = sum(1 for _ in f) - 1
    result = {"seconds": seconds, "files": rows}
    if device.startswith("cuda"):
        result["gpu_peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return result


def step_shell_assign(args: dict) -> dict:
    """`imgcluster assign RUN FOLDER -o OUT --quiet` in fp32 as a shell runs it: nothing is imported
    first, so the command's own order is timed (it starts the cache build before it imports torch).
    Its "process" time is what a shell user waits for; "command" time here includes the imports."""
    os.environ["IMGCLUSTER_CACHE"] = args["cache"]
    t = time.perf_counter()
    from imgcluster.cli import app

    app(["assign", args["run"], args["folder"], "-o", args["out"], "--quiet", "--precision", "fp32",
         "--device", args.get("device", "cpu")], standalone_mode=False)
    seconds = time.perf_counter() - t
    with open(args["out"], "rb") as f:
        rows = sum(1 for _ in f) - 1
    return {"seconds": seconds, "files": rows}


STEPS = {"cache": step_cache, "decode": step_decode, "assign": step_assign, "shell_assign": step_shell_assign}


def best_of(repeat: int, step: str, fresh_cache: Path | None = None, **args) -> dict:
    """The fastest of `repeat` runs of a step (this machine is shared: the others are the noise);
    with `fresh_cache`, each run starts from that cache folder emptied."""
    runs = []
    for _ in range(repeat):
        if fresh_cache is not None:
            fresh(fresh_cache)
        runs.append(run_step(step, **args))
    return min(runs, key=lambda r: r["seconds"])


def run_step(name: str, **args) -> dict:
    """Run a step in a child process: its result, its wall time and its peak memory."""
    t = time.perf_counter()
    proc = subprocess.run([sys.executable, __file__, "--step", name, json.dumps(args, default=str)],
                          stdout=subprocess.PIPE)
    if proc.returncode != 0:
        sys.exit(f"step {name} {args} failed with exit code {proc.returncode}")
    result = json.loads(proc.stdout.decode().strip().splitlines()[-1])
    result["process_seconds"] = time.perf_counter() - t
    return result


def child_main(name: str, raw: str) -> None:
    memory = TreeMemory()
    memory.start()
    result = STEPS[name](json.loads(raw))
    result["tree_peak_mb"] = memory.finish()
    result["peak_mb"] = peak_rss_mb()
    print(json.dumps(result))


# ---------------------------------------------------------------------------------------------
# The benchmark
# ---------------------------------------------------------------------------------------------

def fresh(path: Path) -> Path:
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    return path


def ensure_run(work: Path, subset: Path) -> Path:
    """A tiny trained run directory on the subset (made once, then reused)."""
    run = work / "run-cpu-tiny"
    if (run / "model.safetensors").is_file():
        return run
    env = {**os.environ, "IMGCLUSTER_CACHE": str(fresh(work / "cache-train"))}
    subprocess.run([sys.executable, "-m", "imgcluster", "train", str(subset), "--clusters", "10", "--preset",
                    "cpu-tiny", "--steps", "2", "--out", str(run), "--restart", "--quiet"],
                   check=True, env=env, stdout=subprocess.DEVNULL)
    shutil.rmtree(work / "cache-train", ignore_errors=True)
    return run


def assign_against_decode(run: Path, subset: Path, work: Path, repeat: int, device: str, workers: int,
                          add, bf16: bool = True) -> None:
    """Step 3: decoding `subset` (one process, the worker pool), building its cache, and `assign` with
    `run` on it (cold cache with the model during the build, built first, warm; fp32 and, with `bf16`,
    bf16)."""
    from imgcluster.pipeline import cache_size
    from imgcluster.rundir import RunDir, load_config

    size = cache_size(load_config(RunDir(run)))
    one = best_of(repeat, "decode", folder=subset, size=size, workers=1)
    add(f"decode only, 1 process ({size} px)", one["files"], one)
    pool = best_of(repeat, "decode", folder=subset, size=size, workers=workers)
    add(f"decode only, {workers} workers ({size} px)", pool["files"], pool)
    subset_cache = work / "cache-subset"
    build = best_of(repeat, "cache", fresh_cache=subset_cache, folder=subset, size=size, cache=subset_cache)
    add(f"cache build only, cold ({size} px)", build["files"], build)
    shutil.rmtree(subset_cache)
    assign_cache = work / "cache-assign"
    out = work / "assign.csv"
    common = {"run": run, "folder": subset, "cache": assign_cache, "out": out, "device": device}
    built_first = best_of(repeat, "assign", fresh_cache=assign_cache, build_first=True, **common)
    cold = best_of(repeat, "assign", fresh_cache=assign_cache, **common)
    shell = best_of(repeat, "shell_assign", fresh_cache=assign_cache, **common)
    warm = best_of(repeat, "assign", **common)

    def versus_decode(res):
        gpu = f"; GPU peak {res['gpu_peak_mb']:,.0f} MB" if "gpu_peak_mb" in res else ""
        return (f"{res['seconds'] / pool['seconds']:.2f}x the {workers}-worker decode "
                f"(process: {res['process_seconds'] / pool['seconds']:.2f}x){gpu}")

    add("assign, cold cache (the model during the build)", cold["files"], cold, versus_decode(cold))
    add("assign, cold cache, as a shell runs it (imports timed too)", shell["files"], shell, versus_decode(shell))
    add("assign, cold cache, built first (forced)", built_first["files"], built_first, versus_decode(built_first))
    add("assign, warm cache", warm["files"], warm, versus_decode(warm))
    if bf16:
        bf16_rows(repeat, common, assign_cache, device, add, versus_decode)
    shutil.rmtree(assign_cache)
    out.unlink()


def bf16_rows(repeat: int, common: dict, assign_cache: Path, device: str, add, versus_decode) -> None:
    from imgcluster.precision import cpu_has_bf16

    cold_bf16 = best_of(repeat, "assign", fresh_cache=assign_cache, precision="bf16", **common)
    warm_bf16 = best_of(repeat, "assign", precision="bf16", **common)
    if device == "cpu":
        units = "; " + ("this CPU has bf16 units" if cpu_has_bf16() else "no bf16 units: emulated")
    else:
        units = ""
    add("assign --precision bf16, cold cache", cold_bf16["files"], cold_bf16, f"{versus_decode(cold_bf16)}{units}")
    add("assign --precision bf16, warm cache", warm_bf16["files"], warm_bf16, versus_decode(warm_bf16))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--files", type=int, default=100_000, help="images in the generated folder")
    ap.add_argument("--size", type=int, default=32, help="cache side for the cache-build steps")
    ap.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "imgcluster-bench",
                    help="scratch folder: the generated images, caches, the tiny run")
    ap.add_argument("--repeat", type=int, default=3, help="runs of each 10,000-file step; the fastest is kept")
    ap.add_argument("--run", type=Path, help="a trained run: only the assign-against-decode steps, on --folder")
    ap.add_argument("--folder", type=Path, help="with --run: the images to decode and assign")
    ap.add_argument("--device", default="cpu", help="where assign runs the model: cpu or cuda")
    ap.add_argument("--no-bf16", action="store_true",
                    help="skip the bf16 rows (emulated, minutes long, on a CPU without bf16 units)")
    ap.add_argument("--step", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.step:
        return child_main(*args.step)
    if (args.run is None) != (args.folder is None):
        ap.error("--run and --folder go together")

    from imgcluster.data import default_workers

    workers = default_workers()                 # what a cache build uses
    load_before = os.getloadavg()[0]
    rows = []

    def add(step, files, result, note=""):
        seconds = result["seconds"]
        rows.append((step, files, seconds, files / seconds, result["process_seconds"],
                     result["peak_mb"], result["tree_peak_mb"], note))
        print(f"{step}: {files} files, {seconds:.2f} s, {files / seconds:.0f} files/s, peak RSS "
              f"{result['peak_mb']:.0f} MB, process tree PSS {result['tree_peak_mb']:.0f} MB {note}", file=sys.stderr)

    args.work.mkdir(parents=True, exist_ok=True)
    if args.run is not None:
        assign_against_decode(args.run, args.folder, args.work, args.repeat, args.device, workers, add,
                              bf16=not args.no_bf16)
        what = f"{args.folder} with the run {args.run}, assign on {args.device}"
    else:
        folder = args.work / f"large-folder-{args.files}"
        ensure_folder(folder, args.files, workers)
        added = folder / "added"
        shutil.rmtree(added, ignore_errors=True)

        # (b) the cache of the whole folder: cold, after adding 1%, warm
        cache = fresh(args.work / "cache-large")
        cold = run_step("cache", folder=folder, size=args.size, cache=cache)
        add(f"cache build, cold ({args.size} px)", cold["files"], cold, f"scan {cold['scan_seconds']:.1f} s")
        extra = max(1, args.files // 100)
        generate(added, args.files, args.files + extra, seed=1, workers=workers)
        inc = run_step("cache", folder=folder, size=args.size, cache=cache)
        add(f"cache rebuild, {extra:,} files added", inc["files"], inc,
            f"only the new files decoded; {inc['seconds'] - inc['scan_seconds']:.1f} s after the scan")
        warm = run_step("cache", folder=folder, size=args.size, cache=cache)
        add("cache reuse, warm", warm["files"], warm, f"scan {warm['scan_seconds']:.1f} s")
        shutil.rmtree(added)
        shutil.rmtree(cache)

        # (c) assign on a subset, against decoding the same files
        subset = folder / "00"                  # the first 10,000 files (all of them when --files is smaller)
        assign_against_decode(ensure_run(args.work, subset), subset, args.work, args.repeat, "cpu", workers, add,
                              bf16=not args.no_bf16)
        what = (f"{args.files:,} generated files (MNIST / CIFAR-10 derived, 24-64 px PNG + JPEG)")

    import torch

    command = " ".join(["python tests/bench/large_folder.py", *sys.argv[1:]])
    print(f"\n`{command}`")
    print(f"\nCPU ({platform.machine()}, {len(os.sched_getaffinity(0))} cores, "
          f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}), Python {platform.python_version()}, "
          f"torch {torch.__version__}, {what}, {workers} decoding workers; load average {load_before:.1f} "
          f"before the run, {os.getloadavg()[0]:.1f} after\n")
    columns = ["step", "files", "seconds (command)", "files / s", "seconds (process)", "peak RSS, main process (MB)",
               "peak PSS, process tree (MB)", "notes"]
    print("| " + " | ".join(columns) + " |")
    print("|" + " --- |" * len(columns))
    for step, files, seconds, rate, process, peak, tree, note in rows:
        print(f"| {step} | {files:,} | {seconds:.2f} | {rate:,.0f} | {process:.2f} | {peak:.0f} | {tree:.0f} "
              f"| {note} |")


if __name__ == "__main__":
    main()
