"""The run directory: where each file lives, and how a later command rebuilds the method from it."""

from __future__ import annotations

import platform
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from imgcluster import __version__
from imgcluster.checkpoint import MODEL_FORMAT, CheckpointError, atomic_write_text, read_state, write_state
from imgcluster.config import ConfigError, TrainConfig, cache_side, config_from_dict, dump_config, read_yaml

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class RunDir:
    root: Path

    @property
    def config(self) -> Path:
        return self.root / "config.yaml"

    @property
    def model(self) -> Path:
        return self.root / "model.safetensors"

    @property
    def checkpoint(self) -> Path:
        return self.root / "checkpoint" / "state.safetensors"

    @property
    def best_model(self) -> Path:
        """The inference weights of the checkpoint that label-free selection rates best so far."""
        return self.root / "checkpoint" / "best-model.safetensors"

    @property
    def metrics(self) -> Path:
        return self.root / "metrics.jsonl"

    @property
    def samples(self) -> Path:
        return self.root / "samples"

    @property
    def assignments(self) -> Path:
        return self.root / "assignments.csv"

    @property
    def bad_images(self) -> Path:
        return self.root / "bad_images.csv"

    @property
    def sheets(self) -> Path:
        return self.root / "sheets"

    def make(self) -> None:
        for folder in (self.root, self.checkpoint.parent, self.samples):
            folder.mkdir(parents=True, exist_ok=True)


def versions() -> dict:
    import torch      # here, not at the top: reading a run's config (evaluate) does not need torch

    return {"imgcluster": __version__, "torch": str(torch.__version__), "python": platform.python_version()}


def save_config(run: RunDir, cfg: TrainConfig) -> None:
    atomic_write_text(run.config, dump_config(cfg, {"versions": versions()}))


def read_config(run: RunDir) -> dict:
    """config.yaml as plain data, unchecked; load_config checks it (and imports the method to do so)."""
    if not run.config.is_file():
        raise ConfigError(f"{run.root}: not a run directory (no config.yaml)")
    return read_yaml(run.config.read_text(encoding="utf-8"), str(run.config))


def saved_cache_side(run: RunDir) -> tuple[Path, int] | None:
    """(training folder, cache side) as config.yaml gives them, read without checking the config (which
    imports the method's module, and torch), so `assign` can start decoding while torch loads; None if
    the file does not say. A hint only: the checked config decides (pipeline.assign_folder)."""
    try:
        raw = read_config(run)
        section = raw[raw["method"]]
        return Path(raw["data_dir"]), cache_side(int(raw["image_size"]), float(section["load_ratio"]))
    except (ConfigError, OSError, KeyError, TypeError, ValueError):
        return None


def saved_clusters(run: RunDir) -> int:
    """K of a run, from config.yaml alone: for `evaluate`, which should not pay for importing torch."""
    clusters = read_config(run).get("clusters")
    if isinstance(clusters, bool) or not isinstance(clusters, int) or clusters < 2:
        raise ConfigError(f"{run.config}: clusters must be a whole number of at least 2, got {clusters!r}")
    return clusters


def load_config(run: RunDir) -> TrainConfig:
    return config_from_dict(read_config(run), str(run.config))


def save_model(run: RunDir, method, cfg: TrainConfig, step: int, *, path: Path | None = None,
               extra: dict | None = None) -> None:
    """Inference weights (every network, buffers included) with format, method and config in the metadata.

    Written to `path` (default RUN_DIR/model.safetensors); `extra` adds metadata (e.g. the selection score).
    """
    state = {name: net.state_dict() for name, net in method.networks().items()}
    write_state(path or run.model, state, MODEL_FORMAT,
                {"method": cfg.method, "step": step, "config": dump_config(cfg), "imgcluster_version": __version__,
                 **(extra or {})})


def load_model(run: RunDir, device: torch.device, precision: str | None = None, *, path: Path | None = None):
    """Rebuild the method of a finished run from its directory alone: (cfg, method) in eval mode.

    The weights come from `path` (default RUN_DIR/model.safetensors; checkpoint/best-model.safetensors
    holds the best-balanced checkpoint's, see selection.py).

    `precision` (auto, bf16 or fp32; default: the run's own, as `train` used it) is what the method's
    `assign` runs in. On a CPU with bf16 units, bf16 autocast ran the models 1.5-2.7x faster and moved
    0.4-1.5 % of the images to another cluster, all near ties (tests/bench/RESULTS.md).
    """
    from imgcluster.methods import METHODS
    from imgcluster.methods.common import load_weights
    from imgcluster.precision import resolve_precision

    cfg = load_config(run)
    path = path or run.model
    if not path.is_file():
        raise CheckpointError(f"{path}: missing; has training finished? (run `imgcluster train` again to resume)")
    state, meta = read_state(path, MODEL_FORMAT, device="cpu")
    if meta.get("method") != cfg.method:
        raise CheckpointError(f"{path}: made by method {meta.get('method')!r} but config.yaml says {cfg.method!r}")
    method = METHODS[cfg.method](cfg, device, training=False)     # no optimizers: weights from the file
    for name, net in method.networks().items():
        load_weights(net, state[name], device).eval()
    method.assign_amp = resolve_precision(precision or cfg.precision, device)
    return cfg, method
