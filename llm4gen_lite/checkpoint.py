"""Training checkpoints: safetensors + JSON only, written atomically, kept last-N, resumable exactly.

A checkpoint is a folder `checkpoints/step_0000120/` holding named *parts* — arbitrary nested
states (model / EMA / optimizer / LR-scheduler state dicts, progress counters) — flattened into
`<part>.safetensors` (every tensor) and `state.json` (the structure around them, plus anything
JSON-able). Per-process states (RNGs) go in `rank<r>.safetensors` + `rank<r>.json`. Nothing is
ever pickled.

The folder is built under a temporary name and renamed into place only when complete, so the
previous checkpoint stays intact until the new one exists; a crash mid-write leaves at most a
`.tmp-*` folder, which is ignored and cleaned up later.
"""
from __future__ import annotations

import os
import random
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .io import atomic_save_safetensors, atomic_write_json, load_safetensors, read_json

FORMAT_VERSION = 1
STATE_FILE = "state.json"
_NAME = re.compile(r"^step_(\d+)$")


# ----------------------------------------------------------------------------------------------
# nested state <-> (JSON structure, flat tensors)
# ----------------------------------------------------------------------------------------------
def flatten_state(obj: Any, prefix: str = "") -> tuple[Any, dict[str, torch.Tensor]]:
    """Split a nested state into a JSON-able structure and a flat `{key: tensor}` dict.

    Tensors become `{"__tensor__": key}`, dicts `{"__dict__": [[key, value], ...]}` (so integer
    keys such as optimizer parameter ids survive), tuples `{"__tuple__": [...]}`. Numpy scalars
    and arrays are stored as Python numbers / lists.
    """
    tensors: dict[str, torch.Tensor] = {}

    def encode(value: Any, path: str) -> Any:
        if isinstance(value, torch.Tensor):
            tensors[path] = value.detach()
            return {"__tensor__": path}
        if isinstance(value, dict):
            return {"__dict__": [[k, encode(v, f"{path}.{k}" if path else str(k))] for k, v in value.items()]}
        if isinstance(value, tuple):
            return {"__tuple__": [encode(v, f"{path}.{i}") for i, v in enumerate(value)]}
        if isinstance(value, list):
            return [encode(v, f"{path}.{i}") for i, v in enumerate(value)]
        if isinstance(value, np.ndarray):
            return value.tolist()
        if isinstance(value, np.generic):
            return value.item()
        if value is None or isinstance(value, (bool, int, float, str)):
            return value
        raise TypeError(f"cannot store {type(value).__name__} at {path!r} in a checkpoint (only tensors and JSON types)")

    return encode(obj, prefix), tensors


def unflatten_state(structure: Any, tensors: dict[str, torch.Tensor], source: str = "checkpoint") -> Any:
    """Inverse of `flatten_state`; a tensor key missing from `tensors` raises naming `source`."""

    def decode(value: Any) -> Any:
        if isinstance(value, dict):
            if "__tensor__" in value:
                key = value["__tensor__"]
                if key not in tensors:
                    raise ValueError(f"{source}: tensor {key!r} is missing; the checkpoint is incomplete")
                return tensors[key]
            if "__dict__" in value:
                return {_key(k): decode(v) for k, v in value["__dict__"]}
            if "__tuple__" in value:
                return tuple(decode(v) for v in value["__tuple__"])
            raise ValueError(f"{source}: unexpected entry {sorted(value)} in the state structure")
        if isinstance(value, list):
            return [decode(v) for v in value]
        return value

    return decode(structure)


def _key(key: Any) -> Any:
    return tuple(key) if isinstance(key, list) else key


# ----------------------------------------------------------------------------------------------
# RNG states
# ----------------------------------------------------------------------------------------------
def capture_rng_state(generators: dict[str, torch.Generator] | None = None) -> dict[str, Any]:
    """The global torch (CPU and CUDA), numpy and python RNG states, plus named torch generators."""
    py_version, py_state, py_gauss = random.getstate()
    state: dict[str, Any] = {
        "torch_cpu": torch.get_rng_state(),  # uint8 tensor
        "numpy": np.random.get_state(legacy=False),  # JSON-able dict
        "python": {"version": py_version, "state": list(py_state), "gauss_next": py_gauss},
        "generators": {name: g.get_state() for name, g in (generators or {}).items()},
    }
    if torch.cuda.is_available():
        state["torch_cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any], generators: dict[str, torch.Generator] | None = None) -> None:
    """Put back what `capture_rng_state` recorded (and the named generators' states)."""
    torch.set_rng_state(state["torch_cpu"])
    np.random.set_state(state["numpy"])
    py = state["python"]
    random.setstate((py["version"], tuple(py["state"]), py["gauss_next"]))
    if "torch_cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["torch_cuda"])
    for name, g in (generators or {}).items():
        if name not in state["generators"]:
            raise ValueError(f"checkpoint has no state for generator {name!r}")
        g.set_state(state["generators"][name])


# ----------------------------------------------------------------------------------------------
# folders
# ----------------------------------------------------------------------------------------------
def checkpoint_name(step: int) -> str:
    """Folder name of the checkpoint after `step` optimiser steps."""
    return f"step_{step:07d}"


def list_checkpoints(root: str | os.PathLike) -> list[Path]:
    """Complete checkpoints under `root` (a run's `checkpoints/` folder), oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _NAME.match(p.name))]
    return [p for _, p in sorted(found) if (p / STATE_FILE).is_file()]


def resolve_checkpoint(root: str | os.PathLike, resume_from: str) -> Path:
    """`"latest"` -> the newest complete checkpoint under `root`; otherwise the given folder."""
    if resume_from == "latest":
        found = list_checkpoints(root)
        if not found:
            raise FileNotFoundError(f"resume_from='latest' but {root} holds no complete checkpoint")
        return found[-1]
    path = Path(resume_from)
    if not (path / STATE_FILE).is_file():
        raise FileNotFoundError(f"{path}: not a checkpoint folder (no {STATE_FILE}); give a step_* folder or 'latest'")
    return path


def _tmp_dir(root: Path, step: int) -> Path:
    return root / f".tmp-{checkpoint_name(step)}"


def save_checkpoint(
    root: str | os.PathLike,
    step: int,
    parts: dict[str, Any],
    rank_state: dict[str, Any] | None = None,
    rank: int = 0,
    is_main: bool = True,
    barrier: Callable[[], None] = lambda: None,
    keep_last: int = 2,
) -> Path:
    """Write checkpoint `step` atomically; every process calls this (with its own `rank_state`).

    Args:
        root: the run's `checkpoints/` folder.
        step: optimiser steps done; names the folder.
        parts: shared named states (the main process writes them), e.g. `{"model": sd, ...}`.
        rank_state: this process's own state (RNGs), written as `rank<r>.*`.
        barrier: synchronises the processes (`accelerator.wait_for_everyone`).
        keep_last: complete checkpoints kept after this one is in place (older ones deleted).
    Returns:
        The final checkpoint folder.
    """
    root = Path(root)
    tmp, final = _tmp_dir(root, step), root / checkpoint_name(step)
    if is_main:
        root.mkdir(parents=True, exist_ok=True)
        _recover_interrupted(root)
        tmp.mkdir()
    barrier()
    if rank_state is not None:
        structure, tensors = flatten_state(rank_state)
        atomic_save_safetensors(tensors, tmp / f"rank{rank}.safetensors")
        atomic_write_json(tmp / f"rank{rank}.json", structure)
    barrier()
    if is_main:
        structures = {}
        for name, state in parts.items():
            structures[name], tensors = flatten_state(state)
            if tensors:
                atomic_save_safetensors(tensors, tmp / f"{name}.safetensors")
        atomic_write_json(tmp / STATE_FILE, {"format_version": FORMAT_VERSION, "step": step, "parts": structures})
        if final.exists():  # re-saving a step (e.g. after a resume): swap, then drop the old copy
            old = root / f".old-{final.name}"
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
            try:
                os.replace(tmp, final)
            except BaseException:
                os.replace(old, final)  # the previous copy of this step goes back in place
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
        _fsync_dir(root)
        for stale in list_checkpoints(root)[:-keep_last] if keep_last > 0 else []:
            shutil.rmtree(stale, ignore_errors=True)
    barrier()
    return final


def _recover_interrupted(root: Path) -> None:
    """Clean up after an interrupted save: drop `.tmp-*` folders; put back an `.old-step_*` copy
    whose replacement never arrived (a re-save killed between its two renames), drop the rest."""
    for stale in root.glob(".tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)
    for old in root.glob(".old-*"):
        final = root / old.name[len(".old-"):]
        if final.exists():
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(old, final)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def load_checkpoint(path: str | os.PathLike, rank: int | None = 0) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """Read a checkpoint folder: `(parts, rank_state)`; `rank_state` is None if absent or `rank` is None.

    A missing, truncated or corrupt file raises `ValueError`/`FileNotFoundError` naming it.
    """
    path = Path(path)
    meta = read_json(path / STATE_FILE)
    if not isinstance(meta, dict) or meta.get("format_version") != FORMAT_VERSION or "parts" not in meta:
        raise ValueError(f"{path / STATE_FILE}: not a checkpoint of format version {FORMAT_VERSION}")
    parts = {}
    for name, structure in meta["parts"].items():
        file = path / f"{name}.safetensors"
        tensors = load_safetensors(file) if _has_tensors(structure) else {}
        parts[name] = unflatten_state(structure, tensors, source=str(file))
    rank_state = None
    if rank is not None and (path / f"rank{rank}.json").is_file():
        file = path / f"rank{rank}.safetensors"
        rank_state = unflatten_state(read_json(path / f"rank{rank}.json"), load_safetensors(file), source=str(file))
    return parts, rank_state


def _has_tensors(structure: Any) -> bool:
    if isinstance(structure, dict):
        return "__tensor__" in structure or any(_has_tensors(v) for v in structure.values())
    if isinstance(structure, list):
        return any(_has_tensors(v) for v in structure)
    return False
