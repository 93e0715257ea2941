"""Where things live: the shipped data folder, the user cache, and device selection."""
from __future__ import annotations

import os
from pathlib import Path

import torch

PACKAGE_DIR = Path(__file__).resolve().parent
REPO_ROOT = PACKAGE_DIR.parent


def data_dir() -> Path:
    """The shipped `data/` folder (prompt sets, checkpoints); `LLM4GEN_DATA` overrides it."""
    return Path(os.environ.get("LLM4GEN_DATA", REPO_ROOT / "data"))


def cache_dir() -> Path:
    """User cache for converted models and feature shards; `LLM4GEN_CACHE` overrides it."""
    default = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "llm4gen_lite"
    path = Path(os.environ.get("LLM4GEN_CACHE", default))
    path.mkdir(parents=True, exist_ok=True)
    return path


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """`"auto"` picks CUDA, then MPS, then CPU; anything else is passed to `torch.device`."""
    if isinstance(device, torch.device):
        return device
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        return torch.device(device)
    except RuntimeError as err:
        raise ValueError(f"unknown device {device!r}: use 'auto', 'cpu', 'cuda' or 'cuda:N'") from err
