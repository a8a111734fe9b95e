"""The imgcluster command line: parse, validate (errors name the flag), build the config, call the core.

stdout carries data only (CSV, JSON, written paths); everything for people goes to stderr.
Exit codes: 0 success, 1 runtime failure, 2 usage error, 3 no usable images, 130/143 interrupted.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Optional

import typer

from imgcluster import console
from imgcluster.config import ConfigError, load_preset, parse_overrides, resolve_config

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Sort a folder of unlabelled images into clusters by training a GAN on it.")

EXIT_RUNTIME, EXIT_USAGE, EXIT_NO_IMAGES = 1, 2, 3
# Settings a resumed run may change: they do not change what the saved state means.
RESUMABLE_KEYS = {"steps", "log_every", "sample_every", "checkpoint_every", "sample_clusters",
                  "precision", "memory_format", "compile", "select_model",
                  "slcgan.split_empty", "slcgan.split_every", "slcgan.split_start"}


def flat_settings(cfg) -> dict:
    """The config as {"steps": ..., "slcgan.lr": ...}: the method's settings one by one."""
    out = cfg.to_dict()
    return {**{k: v for k, v in out.items() if k != cfg.method},
            **{f"{cfg.method}.{k}": v for k, v in out[cfg.method].items()}}


def fail(message: str, code: int = EXIT_RUNTIME):
    console.error_line(message)
    raise typer.Exit(code)


@contextmanager
def errors_as_exit_codes():
    """Map the core's exceptions to one stderr line and the documented exit code."""
    from imgcluster.checkpoint import CheckpointError
    from imgcluster.data import DataError, NoUsableImages

    try:
        yield
    except (ConfigError, DataError) as e:
        fail(str(e), EXIT_USAGE)
    except CheckpointError as e:
        fail(str(e), EXIT_USAGE)
    except NoUsableImages as e:
        fail(str(e), EXIT_NO_IMAGES)
    except OSError as e:
        fail(f"{getattr(e, 'filename', '') or ''}: {e.strerror or e}".lstrip(": "), EXIT_RUNTIME)


def data_stdout():
    """stdout for data: file names that are not UTF-8 go out as their original bytes."""
    try:
        sys.stdout.reconfigure(errors="surrogateescape")
    except (AttributeError, ValueError):
        pass
    return sys.stdout


def device_or_exit(name: str):
    from imgcluster.pipeline import resolve_device

    try:
        return resolve_device(name)
    except ValueError as e:
        fail(str(e), EXIT_USAGE)


class StopFlag:
    """SIGINT/SIGTERM set a flag; the training loop checkpoints at the end of the step and stops."""

    def __init__(self):
        self.signum = None

    def __call__(self):
        return self.signum

    def __enter__(self):
        self._old = {s: signal.signal(s, self._handle) for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def _handle(self, signum, frame):
        # A second signal of the same kind (Ctrl-C twice) stops now. A SIGTERM after a Ctrl-C does not:
        # torchrun's agent sends one to its workers when it sees the Ctrl-C, and they are saving.
        if self.signum == signum:
            raise KeyboardInterrupt
        if self.signum is None:
            self.signum = signum
            console.warn("stopping: finishing this step and saving a checkpoint (Ctrl-C again to abort)")

    def __exit__(self, *exc):
        for s, handler in self._old.items():
            signal.signal(s, handler)
        return False


# ---------------------------------------------------------------------------------------------
# train
# ---------------------------------------------------------------------------------------------

def auto_preset(data_dir: Path, files: list[str], method: str | None, image_size: int | None,
                device_type: str) -> str:
    """The preset for a new run without --preset (`files`: the folder's scan), announced on stderr;
    without --method too, the method is picked from the folder first."""
    from imgcluster import distributed
    from imgcluster.config import pick_method, pick_preset
    from imgcluster.data import typical_side

    side = typical_side(data_dir, files)
    speak = distributed.launch_rank() == 0             # under torchrun every rank picks; one says so
    if method is None:
        method, why = pick_method(side)
        if speak:
            console.info(f"no --method given: using {method} ({why}); pass --method to choose")
    name, why = pick_preset(method, image_size, side, device_type)
    if speak:
        console.info(f"no --preset given: using {name} ({len(files)} files, {why}); pass --preset to choose")
    return name


def default_run_root(data_dir: Path, method: str, clusters: int) -> Path:
    """Where a run goes without --out: runs/<folder>-<method>-k<K>."""
    return Path("runs") / f"{data_dir.resolve().name}-{method}-k{clusters}"


def check_method_sections(overrides: dict, method: str) -> None:
    """A --set for another method's settings would be ignored (a preset file may hold both methods'
    sections; a command line that names one means it): refuse it, naming the key."""
    from imgcluster.methods import METHODS

    for name in METHODS:
        if name != method and name in overrides:
            section = overrides[name]
            key = f"{name}.{next(iter(section))}" if isinstance(section, dict) and section else name
            raise ConfigError(f"--set {key}: a {name} setting, but this run uses {method}; "
                              f"pass --method {name} or drop it")


def build_config(data_dir: Path, run_root: Path | None, flags: dict, preset: str | None, sets: list[str],
                 restart: bool, device_type: str = "cuda", files: list[str] | None = None):
    """(cfg, run, resuming): a new config from defaults < preset < flags, or the saved one of a run.

    `files` is the folder's scan when the caller has it (a preset is picked from it when none is given).
    """
    from imgcluster.rundir import RunDir, load_config

    overrides = parse_overrides(sets)
    explicit = {k: v for k, v in flags.items() if v is not None}
    explicit["data_dir"] = str(data_dir.resolve())
    if run_root is not None:
        run = RunDir(run_root)
        if run.checkpoint.exists() and not restart:
            saved = load_config(run)
            cfg = resolve_config((saved.to_dict(), str(run.config)), (explicit, "flags"), (overrides, "--set"))
            check_method_sections(overrides, cfg.method)
            if cfg.method != saved.method:
                raise ConfigError(f"{run.root} was trained with {saved.method}, not {cfg.method}; "
                                  f"pass --restart to start over or --out for a new run")
            before = flat_settings(saved)
            changed = sorted(k for k, v in flat_settings(cfg).items() if v != before.get(k) and k not in RESUMABLE_KEYS)
            if changed:
                raise ConfigError(f"{run.root} was trained with other settings ({', '.join(changed)}); "
                                  f"pass --restart to start over or --out for a new run")
            return cfg, run, True
    if preset is None:
        from imgcluster.data import scan_folder
        from imgcluster.methods import METHODS

        method = overrides.get("method") or explicit.get("method")      # None: picked from the folder
        if method is not None and method not in METHODS:
            flag = "--set method" if overrides.get("method") else "--method"
            raise ConfigError(f"{flag}: unknown method '{method}'; known: {', '.join(METHODS)}")
        if method is None and run_root is None and "clusters" in explicit and not restart:
            # Before picking: the default run directory of one method already holds a run (say, from
            # before the method was picked from the folder): resume that one.
            roots = [default_run_root(data_dir, name, explicit["clusters"]) for name in METHODS]
            found = [root for root in roots if RunDir(root).checkpoint.exists()]
            if len(found) == 1:
                return build_config(data_dir, found[0], flags, preset, sets, restart, device_type, files)
        files = scan_folder(data_dir) if files is None else files
        preset = auto_preset(data_dir, files, method, explicit.get("image_size"), device_type)
    layers = [(load_preset(preset), f"preset {preset}")] if preset else []
    for values, source in layers:
        if "method" in explicit and values.get("method", explicit["method"]) != explicit["method"]:
            raise ConfigError(f"--method {explicit['method']} conflicts with {source}, which is for "
                              f"{values['method']}; pick a {explicit['method']} preset or drop --method")
    cfg = resolve_config(*layers, (explicit, "flags"), (overrides, "--set"))
    check_method_sections(overrides, cfg.method)
    if run_root is None:
        run_root = default_run_root(data_dir, cfg.method, cfg.clusters)
        run = RunDir(run_root)
        if run.checkpoint.exists() and not restart:
            return build_config(data_dir, run_root, flags, preset, sets, restart, device_type, files)
    return cfg, RunDir(run_root), False


def run_training(cfg, run, device, resuming: bool, quiet: bool, strict: bool = False,
                 max_pixels: int | None = None, files: list[str] | None = None) -> None:
    """Scan (unless `files` is the folder's scan), cache, train, assign, draw sheets; shared by `train` and `demo`.

    Under torchrun every rank calls it: rank 0 builds the cache while the others wait, then reads it;
    rank 0 alone reports, writes files, assigns and draws the sheets.
    """
    from imgcluster import distributed, pipeline, training
    from imgcluster.data import DEFAULT_MAX_PIXELS

    main = distributed.is_main()
    data_dir = Path(cfg.data_dir)
    for turn in (True, False):             # rank 0 first, then the others from its cache
        if main == turn:
            with console.Reporter("caching images", quiet or not main) as rep:
                images = pipeline.prepare_images(data_dir, pipeline.cache_size(cfg), files=files, strict=strict,
                                                 max_pixels=max_pixels or DEFAULT_MAX_PIXELS,
                                                 progress=lambda d, t: rep.update(d, t))
        if turn:
            distributed.barrier()
    if main:
        bad = pipeline.record_bad_images(run, images)
        console.info(f"{len(images.files)} files: {len(images.files) - bad} usable images, {bad} not usable"
                     + (f" (listed in {run.bad_images})" if bad else ""))
    pipeline.check_usable(images, cfg.clusters)
    where = f"{distributed.world_size()} processes ({device.type})" if distributed.active() else str(device)
    if main:
        console.info(f"{'resuming' if resuming else 'training'} {cfg.method}, {cfg.clusters} clusters, "
                     f"{cfg.image_size} px, {cfg.steps} steps on {where} -> {run.root}")

    with console.Reporter("training", quiet or not main) as rep, StopFlag() as stop:
        most = min(cfg.clusters, cfg.batch_size)    # clusters a batch can show at most

        def on_log(event):
            m = event["metrics"]
            used = f"{m['clusters_in_batch']:.1f}/{most} clusters per batch " if "clusters_in_batch" in m else ""
            rep.update(event["step"], event["total"], f"D {m['d_loss']:.3f} G {m['g_loss']:.3f} "
                       f"{used}{m['images_per_s']:.0f} img/s")
            if main and not quiet:
                for line in m.get("events", []):                  # e.g. "step 1250: empty cluster 3 took ..."
                    console.info(f"step {line}")
        try:
            chosen = training.train(cfg, run, images, device, resume=resuming, progress_fn=on_log, stop_fn=stop)
        except training.Interrupted as e:
            code = 130 if e.signum == signal.SIGINT else 143
            if main:
                console.info(f"checkpoint saved at step {e.step} in {run.checkpoint}; run the same command to resume")
            raise typer.Exit(code)
        except (training.NonFiniteLoss, training.CheckpointSaveError) as e:
            fail(str(e), EXIT_RUNTIME)
    # Every rank is done with its collectives before any tears its process group down: a gloo rank that
    # left while another was still finishing once died with SIGABRT at exit (fresh-clone CI, 2026-11-28).
    distributed.barrier()
    distributed.shutdown()                 # the rest is rank 0's alone
    if not main:
        return
    passed_over = chosen.get("best_step") not in (None, chosen["step"])   # the best-balanced was another step
    if chosen["step"] != chosen["last_step"]:
        console.info(f"model.safetensors holds step {chosen['step']}: the last step's clusters have collapsed "
                     f"against it (cluster balance {chosen['last_balance']:.3f} against "
                     f"{chosen['cluster_balance']:.3f}); --set select_model=last keeps the last")
    elif passed_over and chosen["best_balance"] > chosen["cluster_balance"]:
        console.info(f"model.safetensors holds the last step, {chosen['step']} (cluster balance "
                     f"{chosen['cluster_balance']:.3f}; step {chosen['best_step']}'s {chosen['best_balance']:.3f} "
                     f"is not enough better to replace it)")
    else:
        console.info(f"model.safetensors holds the last step, {chosen['step']} "
                     f"(cluster balance {chosen['cluster_balance']:.3f})")
    seeds = chosen["consistency"]
    if seeds is not None:
        console.info(f"{seeds['loss']} over steps {seeds['first_step']}-{seeds['last_step']}: {seeds['mean']:.3f}; "
                     f"between seeds of one command, keep a run with a high cluster balance and a low "
                     f"{seeds['loss']} (README, \"Several seeds\")")
    summary = pipeline.finish_run(run, device, images)
    console.info(f"assigned {summary['images']} images to {summary['clusters_used']} of {cfg.clusters} clusters: "
                 f"{run.assignments}; sheets in {run.sheets}")


@app.command()
def train(
    data_dir: Annotated[Path, typer.Argument(help="Folder of images, scanned recursively.")],
    clusters: Annotated[Optional[int], typer.Option("--clusters", "-k", help="Number of clusters K.")] = None,
    method: Annotated[Optional[str], typer.Option(help="c3gan or slcgan.")] = None,
    preset: Annotated[Optional[str], typer.Option(help="Preset name or YAML file.")] = None,
    image_size: Annotated[Optional[int], typer.Option(help="16, 32, 64 or 128.")] = None,
    steps: Annotated[Optional[int], typer.Option(help="Training steps (iterations).")] = None,
    batch_size: Annotated[Optional[int], typer.Option(help="Images per step.")] = None,
    out: Annotated[Optional[Path], typer.Option(help="Run directory \\[default: runs/DATA-METHOD-kK].")] = None,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N.")] = "auto",
    seed: Annotated[Optional[int], typer.Option(help="Random seed.")] = None,
    set_: Annotated[Optional[list[str]], typer.Option("--set", help="Override a setting: key=value.")] = None,
    dry_run: Annotated[bool, typer.Option(help="Print the resolved config and the scan summary, then exit.")] = False,
    restart: Annotated[bool, typer.Option(help="Start over instead of resuming RUN_DIR.")] = False,
    strict: Annotated[bool, typer.Option(help="Stop if any file cannot be used (default: list it and go on).")] = False,
    max_pixels: Annotated[Optional[int], typer.Option(help="Largest image accepted, in pixels (decompression-bomb guard).")] = None,
    precision: Annotated[Optional[str], typer.Option(help="auto (bf16 on a CUDA GPU with bf16, else fp32), bf16 or fp32.")] = None,
    compile_: Annotated[Optional[bool], typer.Option("--compile/--no-compile", help="torch.compile the training passes.")] = None,
    quiet: Annotated[bool, typer.Option(help="No progress output.")] = False,
):
    """Train a clustering GAN on DATA_DIR; re-running on the same run directory resumes.

    Several GPUs or nodes: start it with torchrun (see the README, "Multiple GPUs").
    """
    from imgcluster import distributed
    from imgcluster.data import scan_folder
    from imgcluster.precision import cpu_bf16_hint
    from imgcluster.rundir import RunDir

    if not data_dir.is_dir():
        fail(f"DATA_DIR {data_dir}: {'not a folder' if data_dir.exists() else 'no such folder'}", EXIT_USAGE)
    resuming_possible = out is not None and RunDir(out).checkpoint.exists() and not restart
    if clusters is None and not resuming_possible:
        fail("--clusters: required (the number of clusters K to find)", EXIT_USAGE)
    dev = device_or_exit(device)
    if distributed.launched() and not dry_run:
        try:
            dev = distributed.rank_device(dev)
        except ValueError as e:
            fail(str(e), EXIT_USAGE)
        distributed.init(dev)
    main = distributed.is_main()
    with errors_as_exit_codes():
        flags = {"clusters": clusters, "method": method, "image_size": image_size, "steps": steps,
                 "batch_size": batch_size, "seed": seed, "precision": precision, "compile": compile_}
        files = scan_folder(data_dir)            # once: the preset pick, the dry run and the cache use it
        cfg, run, resuming = build_config(data_dir, out, flags, preset, set_ or [], restart, dev.type, files)
        hint = cpu_bf16_hint(cfg.precision, dev)
        if hint and not quiet and distributed.launch_rank() == 0:
            console.info(hint)
        if dry_run:
            from imgcluster.config import dump_config

            if distributed.launch_rank() != 0:         # under torchrun rank 0 alone prints
                return
            sys.stdout.write(dump_config(cfg))
            console.info(f"{data_dir}: {len(files)} files found; run directory {run.root} "
                         f"({'resume' if resuming else 'new run'}); nothing trained (--dry-run)")
            return
        try:
            run_training(cfg, run, dev, resuming, quiet, strict, max_pixels, files)
        finally:
            distributed.shutdown()
    if main:
        print(run.root)


# ---------------------------------------------------------------------------------------------
# assign, generate, evaluate
# ---------------------------------------------------------------------------------------------

def load_run_or_exit(run_dir: Path, device: str, precision: str | None = None):
    from imgcluster.precision import PRECISIONS
    from imgcluster.rundir import RunDir, load_model

    dev = device_or_exit(device)
    if precision is not None and precision not in PRECISIONS:
        fail(f"--precision: must be one of {', '.join(PRECISIONS)}, got {precision!r}", EXIT_USAGE)
    if not run_dir.is_dir():
        fail(f"RUN_DIR {run_dir}: no such folder", EXIT_USAGE)
    with errors_as_exit_codes():
        cfg, method = load_model(RunDir(run_dir), dev, precision)
    return cfg, method


@app.command()
def assign(
    run_dir: Annotated[Path, typer.Argument(help="A trained run directory.")],
    data_dir: Annotated[Optional[Path], typer.Argument(help="Images to assign \\[default: the training folder].")] = None,
    output: Annotated[str, typer.Option("--output", "-o", help="CSV/JSONL file, or - for stdout.")] = "-",
    fmt: Annotated[str, typer.Option("--format", help="csv or jsonl.")] = "csv",
    sheets: Annotated[Optional[Path], typer.Option(help="Also write per-cluster sheets into this folder.")] = None,
    batch_size: Annotated[int, typer.Option(help="Images per inference batch.")] = 256,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N.")] = "auto",
    precision: Annotated[Optional[str], typer.Option(help="auto (bf16 on a CUDA GPU with bf16, else fp32), bf16 or fp32 \\[default: the run's].")] = None,
    strict: Annotated[bool, typer.Option(help="Stop if any file cannot be used.")] = False,
    max_pixels: Annotated[Optional[int], typer.Option(help="Largest image accepted, in pixels.")] = None,
    quiet: Annotated[bool, typer.Option(help="No progress output.")] = False,
):
    """Write path,cluster,confidence,error for every file found (unusable files keep their row)."""
    from imgcluster.data import DEFAULT_MAX_PIXELS

    if fmt not in ("csv", "jsonl"):
        fail(f"--format: must be csv or jsonl, got {fmt!r}", EXIT_USAGE)
    max_pixels = max_pixels or DEFAULT_MAX_PIXELS
    early = None if strict else start_build_early(run_dir, data_dir, max_pixels)
    with early or contextlib.nullcontext():         # stopped if the command fails before it uses the rows
        from imgcluster import pipeline
        from imgcluster.assignments import write_assignments
        from imgcluster.inference import SHEET_MEMBERS, write_sheets
        from imgcluster.precision import cpu_bf16_hint

        cfg, method = load_run_or_exit(run_dir, device, precision)
        folder = data_dir or Path(cfg.data_dir)
        if not folder.is_dir():
            fail(f"DATA_DIR {folder}: no such folder", EXIT_USAGE)
        hint = cpu_bf16_hint(precision or cfg.precision, method.device, "assign")
        if hint and not quiet:
            console.info(hint)
        with errors_as_exit_codes():
            with console.Reporter("assigning", quiet) as rep:
                # rows stream out as they are assigned; only the sheets' members are kept
                rows = pipeline.assign_folder(method, folder, pipeline.cache_size(cfg), batch_size=batch_size,
                                              strict=strict, max_pixels=max_pixels, build=early,
                                              progress=lambda d, t: rep.update(d, t))
                out = data_stdout() if output == "-" else open(output, "w", newline="", encoding="utf-8",
                                                               errors="surrogateescape")
                try:
                    tally = write_assignments(rows, out, fmt, keep=SHEET_MEMBERS if sheets else 0)
                finally:
                    if out is not sys.stdout:
                        out.close()
            if sheets:
                write_sheets(method, rows.images, tally.kept, sheets, seed=cfg.seed)
    console.info(f"assigned {tally.assigned} images, {tally.bad} unusable files listed with their reason"
                 + (f"; wrote {output}" if output != "-" else ""))


def start_build_early(run_dir: Path, data_dir: Path | None, max_pixels: int):
    """A BackgroundBuild of the folder at the side the run's config.yaml gives, started before torch is
    imported (2-3 s of a cold `assign` on a 2-core CPU) so the workers decode meanwhile; None where the
    run directory or the folder does not say or is not usable: the checked path reports why later."""
    from imgcluster.data import BackgroundBuild, DataError, scan_folder
    from imgcluster.rundir import RunDir, saved_cache_side

    hint = saved_cache_side(RunDir(run_dir)) if run_dir.is_dir() else None
    if hint is None:
        return None
    folder = data_dir or hint[0]
    try:
        files = scan_folder(folder) if folder.is_dir() else []
    except (DataError, OSError):
        return None
    return BackgroundBuild(folder, hint[1], files, max_pixels=max_pixels) if files else None


@app.command()
def generate(
    run_dir: Annotated[Path, typer.Argument(help="A trained run directory.")],
    cluster: Annotated[Optional[int], typer.Option("--cluster", "-c", help="Cluster to draw.")] = None,
    all_: Annotated[bool, typer.Option("--all", help="Draw every cluster, one row each.")] = False,
    n: Annotated[int, typer.Option("-n", help="Samples per cluster.")] = 16,
    seed: Annotated[int, typer.Option(help="Random seed of the samples.")] = 0,
    output: Annotated[Optional[Path], typer.Option("--output", "-o", help="FILE.png for a grid, or a folder for one PNG per sample.")] = None,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N.")] = "auto",
):
    """Draw images of one cluster (--cluster K) or of all (--all); prints the written paths."""
    from imgcluster.inference import generate_images, save_grid

    if (cluster is None) == (not all_):
        fail("give exactly one of --cluster K or --all", EXIT_USAGE)
    if n < 1:
        fail(f"-n: must be at least 1, got {n}", EXIT_USAGE)
    cfg, method = load_run_or_exit(run_dir, device)
    if cluster is not None and not 0 <= cluster < cfg.clusters:
        fail(f"--cluster {cluster}: out of range, this run has clusters 0..{cfg.clusters - 1}", EXIT_USAGE)
    clusters = list(range(cfg.clusters)) if all_ else [cluster]
    images = generate_images(method, clusters, n, seed)
    name = "all" if all_ else f"cluster-{cluster:03d}"
    target = output or run_dir / "generated" / f"{name}.png"
    if target.suffix.lower() == ".png":
        target.parent.mkdir(parents=True, exist_ok=True)
        save_grid(images, target, nrow=n if all_ else min(n, 8))
        print(target)
        return
    target.mkdir(parents=True, exist_ok=True)
    for i, img in enumerate(images):
        path = target / f"cluster-{clusters[i // n]:03d}-{i % n:04d}.png"
        save_grid(img[None], path, nrow=1)
        print(path)


@app.command()
def evaluate(
    source: Annotated[Path, typer.Argument(help="A run directory or an assignments CSV.")],
    labels: Annotated[Optional[Path], typer.Option(help="CSV of path,label.")] = None,
    labels_from_folders: Annotated[bool, typer.Option(help="Each image's class is its folder's name.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="JSON on stdout instead of a table on stderr.")] = False,
):
    """Score clusters against labels: ACC (Hungarian, majority vote, balanced), NMI, ARI, purity."""
    from imgcluster.evaluation import labels_from_csv, labels_from_folders as folder_labels, score
    from imgcluster.assignments import read_assignments

    if (labels is None) == (not labels_from_folders):
        fail("give exactly one of --labels FILE.csv or --labels-from-folders", EXIT_USAGE)
    csv_path = source / "assignments.csv" if source.is_dir() else source
    if not csv_path.is_file():
        fail(f"{csv_path}: no such file (train writes RUN_DIR/assignments.csv; assign -o writes one)", EXIT_USAGE)
    if labels is not None and not labels.is_file():
        fail(f"--labels {labels}: no such file", EXIT_USAGE)
    num_clusters = None
    if source.is_dir():
        from imgcluster.rundir import RunDir, saved_clusters

        with errors_as_exit_codes():
            num_clusters = saved_clusters(RunDir(source))
    try:
        rows = read_assignments(csv_path)
        label_map = labels_from_csv(labels) if labels else folder_labels(rows)
        result = score(rows, label_map, num_clusters)
    except ValueError as e:
        fail(str(e), EXIT_USAGE)
    if as_json:
        print(json.dumps(result, indent=2))
        return
    print_scores(result)


def print_scores(result: dict) -> None:
    from rich.table import Table

    table = Table(title=f"{result['n']} images, {result['classes']} classes, {result['clusters_used']} clusters used")
    table.add_column("score")
    table.add_column("value", justify="right")
    names = [("acc", "ACC (Hungarian)"), ("acc_majority", "ACC (majority vote)"), ("acc_balanced", "ACC (balanced, C3-GAN)"),
             ("nmi", "NMI (arithmetic)"), ("nmi_max", "NMI (max, C3-GAN code)"), ("ari", "ARI"), ("purity", "purity")]
    for key, label in names:
        if key in result:
            table.add_row(label, f"{result[key]:.4f}")
    sizes = result.get("sizes", {})
    if sizes:
        table.add_row("cluster size min / median / max", f"{sizes['min']} / {sizes['median']:.0f} / {sizes['max']}")
    console.err.print(table)


# ---------------------------------------------------------------------------------------------
# demo
# ---------------------------------------------------------------------------------------------

@app.command()
def demo(
    out_dir: Annotated[Path, typer.Argument(help="Where to write the digits and the run.")] = Path("imgcluster-demo"),
    steps: Annotated[Optional[int], typer.Option(help="Training steps \\[default: the demo preset's].")] = None,
    quiet: Annotated[bool, typer.Option(help="No progress output.")] = False,
):
    """No data needed: cluster scikit-learn's 1,797 bundled 8x8 digits on the CPU and score the result."""
    from imgcluster.demo import write_digits
    from imgcluster.evaluation import labels_from_folders as folder_labels, score
    from imgcluster.assignments import read_assignments

    data_dir = write_digits(out_dir / "digits")
    console.info(f"wrote {data_dir}: 1,797 digit images in one folder per class")
    with errors_as_exit_codes():
        flags = {"clusters": 10, "steps": steps, "method": None, "image_size": None, "batch_size": None, "seed": None}
        cfg, run, resuming = build_config(data_dir, out_dir / "run", flags, "demo", [], restart=True)
        run_training(cfg, run, device_or_exit("cpu"), False, quiet)
    rows = read_assignments(run.assignments)
    result = score(rows, folder_labels(rows), cfg.clusters)
    print_scores(result)
    print(json.dumps({k: result[k] for k in ("acc", "nmi", "ari")}))


def main():
    # distributed.launched() and launch_rank(), read without importing torch
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or os.environ.get("RANK", "0") == "0":
        app()                                     # one process, or torchrun's rank 0
        return
    # torchrun's other ranks write no files and print little; they leave without the interpreter's
    # teardown. After a good run, a gloo rank 1 was sometimes aborted there by a C++ thread's destructor
    # ("terminate called without an active exception", SIGABRT; three times in suite runs up to
    # 2026-11-30), although its process group had been destroyed, which failed the whole torchrun.
    try:
        app()
        code = 0
    except SystemExit as e:                      # typer ends every command with one
        if isinstance(e.code, str):
            print(e.code, file=sys.stderr)
        code = e.code if isinstance(e.code, int) else int(e.code is not None)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    main()
