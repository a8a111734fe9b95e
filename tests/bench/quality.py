"""Clustering quality on real labelled images: imgcluster against k-means on PCA of pixels, same images, same run.

Run by hand, not by pytest. Examples:

    python tests/bench/quality.py --set mnist --prefix test_ --size 32 --preset c3gan-32 --steps 3000 --seeds 0 1 2
    python tests/bench/quality.py --set cub100 --size 64 --clusters 100 --preset c3gan-64 --steps 5000
    python tests/bench/quality.py --folder ~/data/labelled --size 32 --preset c3gan-32   # class = sub-folder

Writes a JSON file and a Markdown table (mean and spread over seeds) to --out (default tests/bench/quality/).
Seeds run side by side as separate processes (each with its own --out) are merged into one row with

    python tests/bench/quality.py --combine /tmp/s0/mnist-X.json /tmp/s1/mnist-X.json --out tests/bench/quality

A finished row is taken further (more steps, same seeds, same baseline) without training again from step 0:
each seed's run directory is copied and resumed, which continues exactly where it stopped; wall times add up.

    python tests/bench/quality.py --extend tests/bench/quality/mnist-X.json --steps 4000 --tag X-4000

With --extend, --set-option goes to the resumed `train` (what a resume may change, e.g. precision, memory_format).
An --extend that was stopped part-way (killed) continues from its copies' checkpoints when run again with the
same --tag and --steps; the training time logged before it stopped is counted in wall_s.

The baseline is the one a user reaches in five lines of scikit-learn: k-means with k = number of classes on
50 PCA components of the raw pixels, centre-cropped and resized to --size (the same cached pixels imgcluster
trains on).
"""

from __future__ import annotations

import argparse
import json
import shutil
import signal
import statistics
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import yaml

from imgcluster import metrics
from imgcluster.checkpoint import read_metadata
from imgcluster.data import load_image_set, scan_folder

from shared_sets import SHARED


def unpack(name: str, prefix: str, dest: Path) -> Path:
    """Unpack ../shared/data/NAME.tar.gz (only files starting with `prefix`) once; returns NAME/images."""
    images = dest / name / "images"
    done = dest / f".{name}-{prefix or 'all'}.done"
    if done.exists():
        return images
    with tarfile.open(SHARED / f"{name}.tar.gz") as tar:
        members = [m for m in tar.getmembers()
                   if m.isfile() and "/images/" in m.name and Path(m.name).name.startswith(prefix)]
        tar.extractall(dest, members=members, filter="data")
    done.touch()
    return images


def folder_labels(files: list[str]) -> list[str]:
    return [Path(f).parent.name for f in files]


def kmeans_baseline(folder: Path, size: int, seed: int) -> dict:
    from sklearn.cluster import KMeans
    from sklearn.decomposition import PCA

    t0 = time.perf_counter()
    images = load_image_set(folder, size, files=scan_folder(folder))
    good = images.good_indices
    all_labels = folder_labels(images.files)
    labels = [all_labels[i] for i in good]
    x = np.asarray(images.images[good], dtype=np.float32).reshape(len(good), -1) / 255.0
    k = len(set(labels))
    feats = PCA(n_components=50, random_state=seed).fit_transform(x)
    clusters = KMeans(n_clusters=k, n_init=10, random_state=seed).fit_predict(feats)
    result = metrics.evaluate(labels, clusters.tolist(), k)
    result["wall_s"] = round(time.perf_counter() - t0, 1)
    return result


def imgcluster_run(folder: Path, run_dir: Path, args, seed: int) -> dict:
    cmd = [sys.executable, "-m", "imgcluster", "train", str(folder), "--clusters", str(args.clusters),
           "--preset", args.preset, "--image-size", str(args.size), "--seed", str(seed), "--out", str(run_dir),
           "--restart", "--quiet", "--device", args.device]
    if args.steps:
        cmd += ["--steps", str(args.steps)]
    if args.method:
        cmd += ["--method", args.method]
    return timed_train(cmd + set_options(args), run_dir)


def set_options(args) -> list[str]:
    """--set-option values as `train` arguments: ["--set", KEY=VALUE, ...]."""
    return [part for s in args.set or [] for part in ("--set", s)]


def timed_train(cmd: list[str], run_dir: Path) -> dict:
    """Run a `train` command line, then score its run directory: evaluate's JSON plus wall_s and steps."""
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - t0
    out = subprocess.run([sys.executable, "-m", "imgcluster", "evaluate", str(run_dir), "--labels-from-folders",
                          "--json"], check=True, capture_output=True, text=True)
    result = json.loads(out.stdout)
    result["wall_s"] = round(wall, 1)
    result["steps"] = yaml_load(run_dir / "config.yaml")["steps"]
    return result


def summarise(rows: list[dict], keys=("acc", "acc_majority", "nmi", "ari", "clusters_used", "wall_s")) -> dict:
    out = {}
    for key in keys:
        values = [r[key] for r in rows if key in r]
        if values:
            out[key] = {"mean": statistics.fmean(values), "std": statistics.pstdev(values) if len(values) > 1 else 0.0}
    return out


def fmt(summary: dict, key: str) -> str:
    if key not in summary:
        return ""
    m, s = summary[key]["mean"], summary[key]["std"]
    return f"{m:.3f} ± {s:.3f}" if key not in ("clusters_used", "wall_s") else f"{m:.0f}"


def main() -> None:
    # A `kill` of this script must not leave its `imgcluster train` child running: as SystemExit, SIGTERM reaches
    # subprocess.run, which kills the child before the exception goes on (the child's checkpoints stay whole).
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--set", dest="dataset", help="a ../shared/data archive name: mnist, fashion_mnist, cifar10, cub100")
    src.add_argument("--folder", type=Path, help="any folder with one sub-folder per class")
    src.add_argument("--combine", type=Path, nargs="+", metavar="JSON",
                     help="merge the JSON files of one row run in pieces (e.g. one seed per process) into one")
    src.add_argument("--extend", type=Path, metavar="JSON",
                     help="take the row in this JSON to --steps: resume copies of its seeds' run directories")
    ap.add_argument("--prefix", default="", help="only files whose name starts with this (e.g. test_)")
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--clusters", type=int, help="K [default: the number of classes]")
    ap.add_argument("--method", default=None)
    ap.add_argument("--preset", default="c3gan-32")
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--set-option", dest="set", action="append", help="passed to train as --set")
    ap.add_argument("--seeds", type=int, nargs="+", help="[default: 0; with --extend, the row's seeds]")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--work", type=Path, default=Path.home() / ".cache" / "imgcluster-bench")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "quality")
    ap.add_argument("--tag", default="", help="names this variant in run folders and output files (e.g. wmi3)")
    args = ap.parse_args()
    if args.combine:
        combine(args.combine, args.out)
        return
    if args.extend:
        extend(args.extend, args)
        return
    args.seeds = args.seeds or [0]

    folder = args.folder or unpack(args.dataset, args.prefix, args.work)
    name = args.dataset or (folder.parent.name if folder.name == "images" else folder.name)   # NAME/images
    files = scan_folder(folder)
    classes = len(set(folder_labels(files)))
    args.clusters = args.clusters or classes
    print(f"{name}: {len(files)} files, {classes} classes, K = {args.clusters}", file=sys.stderr)

    baseline = [kmeans_baseline(folder, args.size, seed) for seed in args.seeds]
    print(f"k-means on PCA pixels: {summarise(baseline)}", file=sys.stderr, flush=True)
    runs = []
    for seed in args.seeds:
        run_dir = run_dir_of(args.work, {"set": name, "preset": args.preset, "tag": args.tag, "size": args.size}, seed)
        runs.append(imgcluster_run(folder, run_dir, args, seed))
        report_seed(seed, runs[-1])

    record = {"set": name, "images": len(files), "classes": classes, "size": args.size, "clusters": args.clusters,
              "preset": args.preset, "tag": args.tag, "method": args.method, "steps": runs[0]["steps"],
              "seeds": args.seeds, "command": " ".join(sys.argv), "baseline": baseline, "imgcluster": runs}
    write_record(record, args.out)


def report_seed(seed: int, result: dict) -> None:
    scores = {k: result[k] for k in ("acc", "nmi", "ari", "clusters_used", "wall_s")}
    print(f"seed {seed}: {json.dumps(scores)}", file=sys.stderr, flush=True)


def run_dir_of(work: Path, record: dict, seed: int) -> Path:
    tag = f"-{record['tag']}" if record.get("tag") else ""
    return work / "runs" / f"{record['set']}-{record['preset']}{tag}-{record['size']}-s{seed}"


def extend(path: Path, args) -> None:
    """The row of `path` with more steps: each seed's run directory is copied under --tag and resumed to
    --steps (exact resume, so the same as training that long from the start); the baseline is the row's."""
    earlier = json.loads(path.read_text())
    if not args.steps or args.steps <= earlier["steps"]:
        sys.exit(f"--extend: --steps must be more than the row's {earlier['steps']}")
    if not args.tag or args.tag == earlier.get("tag"):
        sys.exit("--extend: give a new --tag (the copies' run directories and the output are named by it)")
    seeds = args.seeds or earlier["seeds"]
    missing = sorted(set(seeds) - set(earlier["seeds"]))
    if missing:
        sys.exit(f"--extend: {path} has no run for seed(s) {missing}")
    runs = dict(zip(earlier["seeds"], earlier["imgcluster"]))
    record = dict(earlier, tag=args.tag, steps=args.steps, seeds=seeds, command=" ".join(sys.argv),
                  resume_set=args.set or [],
                  extended_from=str(path), baseline=[earlier["baseline"][earlier["seeds"].index(s)] for s in seeds],
                  imgcluster=[])
    for seed in seeds:
        before = runs[seed]
        source, run_dir = run_dir_of(args.work, earlier, seed), run_dir_of(args.work, record, seed)
        interrupted_s = interrupted_extension_s(run_dir, earlier["steps"], args.steps)
        if interrupted_s is None:
            if not (source / "checkpoint" / "state.safetensors").is_file():
                sys.exit(f"--extend: {source} holds no checkpoint to resume")
            shutil.rmtree(run_dir, ignore_errors=True)
            shutil.copytree(source, run_dir)
            interrupted_s = 0.0
        else:
            print(f"seed {seed}: continuing the interrupted extension in {run_dir} "
                  f"({interrupted_s:.0f} s of training logged before it stopped)", file=sys.stderr, flush=True)
        folder = Path(yaml_load(run_dir / "config.yaml")["data_dir"])
        cmd = [sys.executable, "-m", "imgcluster", "train", str(folder), "--out", str(run_dir),
               "--steps", str(args.steps), "--quiet", "--device", args.device]
        result = timed_train(cmd + set_options(args), run_dir)     # what a resume may change, e.g. precision
        result["wall_s"] = round(before["wall_s"] + interrupted_s + result["wall_s"], 1)
        record["imgcluster"].append(result)
        report_seed(seed, result)
    write_record(record, args.out)


def interrupted_extension_s(run_dir: Path, start: int, steps: int) -> float | None:
    """When `run_dir` is an extension to `steps` that stopped part-way (killed: its checkpoint lies after
    `start`, before `steps`), the training time its processes logged from `start` to the checkpoint: the
    last `elapsed_s` of each process (elapsed_s restarts with each process). None when there is none."""
    state = run_dir / "checkpoint" / "state.safetensors"
    if not state.is_file() or yaml_load(run_dir / "config.yaml")["steps"] != steps:
        return None
    reached = int(read_metadata(state)["step"])
    if not start < reached < steps:
        return None
    total, previous = 0.0, 0.0
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if not start < record["step"] <= reached:
            continue
        if record["elapsed_s"] < previous:            # a new process: the last one's time is complete
            total += previous
        previous = record["elapsed_s"]
    return total + previous


def yaml_load(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def combine(paths: list[Path], out: Path) -> None:
    """One record from several runs of the same row (e.g. seeds run side by side as separate processes)."""
    records = [json.loads(p.read_text()) for p in paths]
    first = records[0]
    same = ("set", "images", "size", "clusters", "preset", "steps")
    for path, r in zip(paths, records):
        for key in same + ("tag",):
            if r.get(key) != first.get(key) and not (key == "tag" and not r.get(key) and not first.get(key)):
                sys.exit(f"{path}: {key} is {r.get(key)!r}, {paths[0]} has {first.get(key)!r}: not the same row")
    seeds = [s for r in records for s in r["seeds"]]
    if len(set(seeds)) < len(seeds):
        sys.exit(f"--combine: seed given twice among {seeds}")
    record = dict(first, seeds=seeds,
                  command=[c for r in records for c in commands_of(r)],
                  baseline=[b for r in records for b in r["baseline"]],
                  imgcluster=[x for r in records for x in r["imgcluster"]])
    write_record(record, out)


def commands_of(record: dict) -> list[str]:
    """The command line of a record, or the lines of a combined one."""
    return record["command"] if isinstance(record["command"], list) else [record["command"]]


def write_record(record: dict, out: Path) -> None:
    """SET-PRESET[-TAG]-SIZEpx-kK.json (every run) and .md (mean and spread over seeds) in `out`; prints the table."""
    tag = f"-{record['tag']}" if record.get("tag") else ""
    label = f"{record['set']}-{record['preset']}{tag}-{record['size']}px-k{record['clusters']}"
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{label}.json").write_text(json.dumps(record, indent=2))
    b, r = summarise(record["baseline"]), summarise(record["imgcluster"])
    commands = commands_of(record)
    name, seeds = record["set"], len(record["seeds"])
    what = " ".join(w for w in ("imgcluster", record.get("method"), record["preset"], record.get("tag")) if w)
    table = [*(f"`python {c}`" for c in commands), "",
             "| set | images | size | K | what | steps | seeds | ACC | ACC (majority) | NMI | ARI | clusters used | wall s |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
             f"| {name} | {record['images']} | {record['size']} | {record['classes']} | k-means on 50 PCA of pixels | - | "
             f"{seeds} | {fmt(b, 'acc')} | {fmt(b, 'acc_majority')} | {fmt(b, 'nmi')} | {fmt(b, 'ari')} | "
             f"{fmt(b, 'clusters_used')} | {fmt(b, 'wall_s')} |",
             f"| {name} | {record['images']} | {record['size']} | {record['clusters']} | {what} | {record['steps']} | "
             f"{seeds} | {fmt(r, 'acc')} | {fmt(r, 'acc_majority')} | {fmt(r, 'nmi')} | {fmt(r, 'ari')} | "
             f"{fmt(r, 'clusters_used')} | {fmt(r, 'wall_s')} |", ""]
    (out / f"{label}.md").write_text("\n".join(table))
    print("\n".join(table))


if __name__ == "__main__":
    main()
