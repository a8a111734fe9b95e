"""Checkpoints and model files: safetensors only, written atomically, never unpickled.

A training state is a nested structure (module and optimiser state dicts, RNG states, the step).
`flatten` stores its tensors under path-like keys and the rest as JSON in the safetensors metadata;
`unflatten` rebuilds it. Writes go to a temporary file, are fsynced, then renamed over the old file,
so a crash or a full disk at any moment leaves the previous file whole.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

from safetensors import safe_open

MODEL_FORMAT = "imgcluster-model"
CHECKPOINT_FORMAT = "imgcluster-checkpoint"
FORMAT_VERSION = 1


class CheckpointError(RuntimeError):
    """A checkpoint or model file that cannot be used; the message names the file and the cause."""


# ---------------------------------------------------------------------------------------------
# Nested state <-> (tensors, JSON tree)
# ---------------------------------------------------------------------------------------------

def flatten(obj, prefix: str = "", tensors: dict | None = None):
    """Return (json_tree, tensors): tensors replaced by {"__tensor__": key}; dict keys keep their type."""
    import torch      # here, not at the top: `evaluate RUN_DIR` reads run files without loading torch

    tensors = {} if tensors is None else tensors
    if isinstance(obj, torch.Tensor):
        key = prefix or "_"
        tensors[key] = obj.detach().cpu().contiguous().clone()
        return {"__tensor__": key}, tensors
    if isinstance(obj, dict):
        items = [[k, flatten(v, f"{prefix}/{k}" if prefix else str(k), tensors)[0]] for k, v in obj.items()]
        return {"__dict__": items}, tensors
    if isinstance(obj, (list, tuple)):
        return {"__list__": [flatten(v, f"{prefix}/{i}", tensors)[0] for i, v in enumerate(obj)],
                "tuple": isinstance(obj, tuple)}, tensors
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj, tensors
    raise TypeError(f"cannot store {type(obj).__name__} at {prefix}")


def unflatten(tree, tensors: dict):
    if isinstance(tree, dict):
        if "__tensor__" in tree:
            return tensors[tree["__tensor__"]]
        if "__dict__" in tree:
            return {k: unflatten(v, tensors) for k, v in tree["__dict__"]}
        if "__list__" in tree:
            items = [unflatten(v, tensors) for v in tree["__list__"]]
            return tuple(items) if tree.get("tuple") else items
    return tree


# ---------------------------------------------------------------------------------------------
# Atomic files
# ---------------------------------------------------------------------------------------------

def atomic_write(path: Path, write: Callable[[BinaryIO], object], tmp_suffix: str = ".tmp") -> None:
    """write(f) into path + tmp_suffix, fsync, rename over path, fsync the folder. On error (a full disk,
    Ctrl-C) the temporary file is removed and the old file stays."""
    path = Path(path)
    tmp = path.with_name(path.name + tmp_suffix)
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    atomic_write(path, lambda f: f.write(data))


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def write_state(path: Path, state: dict, kind: str, metadata: dict | None = None) -> None:
    """Save a nested state as one safetensors file (tensors) with its JSON tree in the metadata."""
    from safetensors.torch import save as save_bytes

    tree, tensors = flatten(state)
    meta = {"format": kind, "format_version": str(FORMAT_VERSION), "tree": json.dumps(tree)}
    meta.update({k: str(v) for k, v in (metadata or {}).items()})
    atomic_write_bytes(path, save_bytes(tensors, metadata=meta))


def read_metadata(path: Path) -> dict:
    try:
        with safe_open(str(path), framework="pt") as f:
            return f.metadata() or {}
    except FileNotFoundError:
        raise CheckpointError(f"{path}: file not found") from None
    except Exception as e:  # safetensors raises its own error types for damaged headers
        raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from None


def read_state(path: Path, kind: str, device="cpu") -> tuple[dict, dict]:
    """Load (state, metadata) written by write_state; checks the format and its version."""
    meta = read_metadata(path)
    if meta.get("format") != kind:
        raise CheckpointError(f"{path}: not an {kind} file (format {meta.get('format')!r})")
    if meta.get("format_version") != str(FORMAT_VERSION):
        raise CheckpointError(f"{path}: format version {meta.get('format_version')} is not supported "
                              f"by this imgcluster (needs {FORMAT_VERSION}); retrain or use a matching version")
    with safe_open(str(path), framework="pt", device=str(device)) as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    return unflatten(json.loads(meta["tree"]), tensors), meta
