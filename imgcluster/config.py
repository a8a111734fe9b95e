"""Run configuration: defaults, then a preset YAML, then flags; the resolved result is saved with the run.

A config is a `TrainConfig` (what every method shares) whose `method_settings` hold the chosen
method's own dataclass (network widths, learning rates, loss weights). In YAML the method's
settings sit under a section named after the method:

    method: c3gan
    clusters: 10
    c3gan:
      ngf: 32
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib.resources
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A bad preset, YAML file or --set override; the message names the key or file."""


@dataclass
class TrainConfig:
    method: str = "c3gan"
    clusters: int = 10
    image_size: int = 32
    batch_size: int = 64
    steps: int = 10_000
    seed: int = 0
    data_dir: str = ""
    log_every: int = 50           # steps between lines of metrics.jsonl
    sample_every: int = 1_000     # steps between sample grids in samples/
    checkpoint_every: int = 500   # steps between checkpoints
    sample_clusters: int = 64     # clusters drawn in a sample grid (the first N)
    precision: str = "auto"       # auto (bf16 autocast on a CUDA GPU with bf16, else fp32), bf16 or fp32
    memory_format: str = "auto"   # auto (channels_last on CUDA), channels_last or contiguous
    compile: bool = False         # torch.compile the networks' training passes
    select_model: str = "balance"  # which weights model.safetensors holds: balance (see selection.py) or last
    method_settings: Any = None   # the method's own dataclass; filled by resolve_config

    def to_dict(self) -> dict:
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "method_settings"}
        out[self.method] = dataclasses.asdict(self.method_settings)
        return out


def cache_side(image_size: int, load_ratio: float) -> int:
    """Side of the cached images: image_size * load_ratio, so training views can be random crops."""
    return max(image_size, round(image_size * load_ratio))


GENERAL_KEYS = [f.name for f in dataclasses.fields(TrainConfig) if f.name != "method_settings"]


# ---------------------------------------------------------------------------------------------
# Presets
# ---------------------------------------------------------------------------------------------

def preset_names() -> list[str]:
    files = importlib.resources.files("imgcluster.presets").iterdir()
    return sorted(p.name[:-5] for p in files if p.name.endswith(".yaml"))


SMALL_SIDE = 40      # px: a folder whose typical image side is at most this holds "small" images (32 px runs)


def pick_method(typical_side: int | None) -> tuple[str, str]:
    """(method, why) when the user names neither --method nor a preset: each paper's own kind of data.

    slcGAN was shown on small images of object classes (MNIST, CIFAR), C3-GAN on fine-grained photos
    of an object on a background (birds, cars, dogs, flowers). Measured here on a CPU at 32 px, 10,000
    images each, slcgan-32-cpu (3 seeds) against c3gan-32-cpu (1 seed), ACC: MNIST 0.526 against 0.295,
    Fashion-MNIST 0.445 against 0.327, CIFAR-10 0.241 against 0.199 (tests/bench/RESULTS.md). So small
    images get slcGAN; larger ones, or a folder with no readable image to size it by, get C3-GAN.
    """
    if typical_side is None:
        return "c3gan", "no readable image to size the folder by"
    if typical_side <= SMALL_SIDE:
        return "slcgan", f"typical image {typical_side} px: slcGAN is made for small images of object classes"
    return "c3gan", f"typical image {typical_side} px: C3-GAN is made for photos of objects on a background"


def pick_preset(method: str, image_size: int | None, typical_side: int | None,
                device_type: str = "cuda") -> tuple[str, str]:
    """(preset name, why) when the user names none: the method's preset for the image size and device.

    The size is --image-size when given, else the one closest to the folder's typical image side
    (median short side) without upscaling much: up to 40 px -> 32, up to 80 px -> 64, larger -> 128.
    Small images (digits, CIFAR) gain nothing from a larger canvas, and large ones lose the detail
    fine-grained classes need at 32 px. On a CPU the `-cpu` variant is taken where one exists:
    narrower networks and a step count that fits about an hour on a few cores; the other presets
    are sized for a GPU and would take days there.
    """
    if image_size is None:
        if typical_side is None:
            image_size, why = 32, "no readable image to size it by"
        else:
            image_size = 32 if typical_side <= SMALL_SIDE else 64 if typical_side <= 80 else 128
            why = f"typical image {typical_side} px"
    else:
        why = f"--image-size {image_size}"
    size = image_size if image_size in (32, 64, 128) else 32
    name = f"{method}-{size}"
    if device_type == "cpu":
        if f"{name}-cpu" in preset_names():
            return f"{name}-cpu", f"{why}, on a CPU"
        why += "; a GPU preset: slow on a CPU"
    return name, why


def read_yaml(text: str, source: str) -> dict:
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark else ""
        raise ConfigError(f"{source}: malformed YAML{where}: {getattr(e, 'problem', e)}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping of settings, got {type(data).__name__}")
    return data


def load_preset(name_or_file: str) -> dict:
    """A preset by name (presets/NAME.yaml, shipped in the package) or a path to a YAML file."""
    path = Path(name_or_file)
    if name_or_file.endswith((".yaml", ".yml")) or path.is_file():
        if not path.is_file():
            raise ConfigError(f"--preset: file not found: {name_or_file}")
        return read_yaml(path.read_text(encoding="utf-8"), str(path))
    resource = importlib.resources.files("imgcluster.presets") / f"{name_or_file}.yaml"
    if not resource.is_file():
        close = difflib.get_close_matches(name_or_file, preset_names(), n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        raise ConfigError(f"--preset: unknown preset '{name_or_file}'{hint}; known: {', '.join(preset_names())}")
    return read_yaml(resource.read_text(encoding="utf-8"), f"preset {name_or_file}")


# ---------------------------------------------------------------------------------------------
# Typed assignment of values (from YAML or --set key=value)
# ---------------------------------------------------------------------------------------------

def _coerce(value: Any, kind: Any, key: str) -> Any:
    """Check or convert a value to a dataclass field's type; strings from --set are parsed as YAML."""
    if isinstance(value, str) and kind is not str:
        try:
            value = yaml.safe_load(value)
        except yaml.YAMLError:
            raise ConfigError(f"{key}: cannot parse value {value!r}") from None
    origin = typing.get_origin(kind)
    if kind is bool:
        if isinstance(value, bool):
            return value
    elif kind is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif kind is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif kind is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
    elif origin is tuple:
        inner = typing.get_args(kind)
        if isinstance(value, (list, tuple)) and len(value) == len(inner):
            return tuple(_coerce(v, t, key) for v, t in zip(value, inner))
    else:
        return value
    expected = getattr(kind, "__name__", str(kind))
    raise ConfigError(f"{key}: expected {expected}, got {value!r}")


def _field_types(cls) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _apply(obj, values: dict, prefix: str, source: str) -> None:
    types = _field_types(type(obj))
    for key, value in values.items():
        name = f"{prefix}{key}"
        if key not in types or key == "method_settings":
            known = [k for k in types if k != "method_settings"]
            close = difflib.get_close_matches(str(key), known, n=1)
            hint = f" (did you mean {prefix}{close[0]}?)" if close else ""
            raise ConfigError(f"{source}: unknown setting '{name}'{hint}")
        setattr(obj, key, _coerce(value, types[key], f"{source}: {name}"))


def parse_overrides(pairs: list[str]) -> dict:
    """['c3gan.ngf=32', 'steps=10'] -> {'c3gan': {'ngf': '32'}, 'steps': '10'} (values typed later)."""
    out: dict = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set: expected key=value, got {pair!r}")
        parts = key.strip().split(".")
        node = out
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set: {key} conflicts with an earlier --set")
        node[parts[-1]] = value
    return out


def resolve_config(*layers: tuple[dict, str]) -> TrainConfig:
    """Merge (values, source-name) layers in order, onto the defaults; later layers win.

    Each layer may hold general keys and a section named after a method. The method comes from
    the last layer that names one.
    """
    from imgcluster.methods import METHODS

    method = "c3gan"
    for values, _ in layers:
        method = values.get("method", method)
    if method not in METHODS:
        raise ConfigError(f"method: unknown method '{method}'; known: {', '.join(METHODS)}")
    cfg = TrainConfig(method=method, method_settings=METHODS[method].Settings())
    for values, source in layers:
        general = {k: v for k, v in values.items() if k not in METHODS}
        _apply(cfg, general, "", source)
        for name in METHODS:
            section = values.get(name)
            if section is None or name != method:
                continue          # another method's section: ignored, so one preset file can serve both
            if not isinstance(section, dict):
                raise ConfigError(f"{source}: '{name}' must be a mapping of settings")
            _apply(cfg.method_settings, section, f"{name}.", source)
    validate(cfg)
    return cfg


def validate(cfg: TrainConfig) -> None:
    if cfg.image_size not in (16, 32, 64, 128):
        raise ConfigError(f"image_size: must be 16, 32, 64 or 128, got {cfg.image_size}")
    if cfg.clusters < 2:
        raise ConfigError(f"clusters: must be at least 2, got {cfg.clusters}")
    for key in ("batch_size", "steps", "log_every", "sample_every", "checkpoint_every"):
        if getattr(cfg, key) < 1:
            raise ConfigError(f"{key}: must be at least 1, got {getattr(cfg, key)}")
    from imgcluster.precision import MEMORY_FORMATS, PRECISIONS

    if cfg.precision not in PRECISIONS:
        raise ConfigError(f"precision: must be one of {', '.join(PRECISIONS)}, got {cfg.precision!r}")
    if cfg.memory_format not in MEMORY_FORMATS:
        raise ConfigError(f"memory_format: must be one of {', '.join(MEMORY_FORMATS)}, got {cfg.memory_format!r}")
    if cfg.select_model not in ("balance", "last"):
        raise ConfigError(f"select_model: must be balance or last, got {cfg.select_model!r}")
    if cfg.batch_size < 2:
        raise ConfigError(f"batch_size: must be at least 2 (BatchNorm needs a batch), got {cfg.batch_size}")
    check = getattr(cfg.method_settings, "validate", None)
    if check:
        check()


RECORD_KEYS = ("versions",)   # written to config.yaml for the record, not settings


def config_from_dict(data: dict, source: str = "config.yaml") -> TrainConfig:
    """Rebuild a saved config (config.yaml of a run)."""
    return resolve_config(({k: v for k, v in data.items() if k not in RECORD_KEYS}, source))


def dump_config(cfg: TrainConfig, extra: dict | None = None) -> str:
    data = cfg.to_dict()
    for key, value in data[cfg.method].items():
        if isinstance(value, tuple):
            data[cfg.method][key] = list(value)
    if extra:
        data.update(extra)
    return yaml.safe_dump(data, sort_keys=False)

