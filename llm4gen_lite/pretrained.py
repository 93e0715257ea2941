"""Trained pipelines for the notebooks: shipped checkpoints first, then a run in `out_dir`, else train.

A notebook never relies on an earlier notebook's kernel: `trained_pipeline(variant, out_dir)` uses
`data/checkpoints/<variant>/pipeline` when it ships, else `out_dir/train/<variant>/pipeline` if an
earlier notebook (or the CLI) trained one there, else trains one now (the `smoke` preset in smoke
mode, the `quick` preset otherwise) into that folder.
"""
from __future__ import annotations

import json
from pathlib import Path

from .paths import data_dir


def shipped_pipeline_dir(variant: str) -> Path:
    """Where the shipped pipeline of a variant lives (it may not exist)."""
    return data_dir() / "checkpoints" / variant / "pipeline"


def _is_pipeline(folder: Path) -> bool:
    return (folder / "model_index.json").is_file()


def run_dir(out_dir: str | Path, variant: str) -> Path:
    """The training run folder a notebook uses for `variant` inside `out_dir`."""
    return Path(out_dir) / "train" / variant


def train_variant(variant: str, out_dir: str | Path, smoke: bool, seed: int = 0, device: str = "cpu",
                  **overrides: object) -> Path:
    """Train `variant` with the `smoke` or `quick` preset into `out_dir/train/<variant>`; returns the
    pipeline folder. An existing finished run there is reused; an interrupted one resumes."""
    from .config import load_config
    from .train import train

    folder = run_dir(out_dir, variant)
    if _is_pipeline(folder / "pipeline"):
        return folder / "pipeline"
    has_checkpoint = (folder / "checkpoints").is_dir() and any((folder / "checkpoints").iterdir())
    config = load_config("smoke" if smoke else "quick", {
        "variant": variant, "seed": seed, "device": device, "output_dir": str(folder),
        "resume_from": "latest" if has_checkpoint else None, **overrides,
    })
    return train(config)


def trained_pipeline(variant: str, out_dir: str | Path, smoke: bool = False, seed: int = 0, device: str = "cpu"):
    """`(pipeline, source)`: the shipped pipeline of `variant`, else one trained in `out_dir`, else a
    freshly trained one. `source` says which, for the notebook to print."""
    import torch

    from .paths import resolve_device
    from .pipeline import LLM4GenPipeline

    shipped = shipped_pipeline_dir(variant)
    if _is_pipeline(shipped) and not smoke:
        folder, source = shipped, f"shipped checkpoint {shipped}"
    elif _is_pipeline(run_dir(out_dir, variant) / "pipeline"):
        folder, source = run_dir(out_dir, variant) / "pipeline", f"run in {run_dir(out_dir, variant)}"
    else:
        folder = train_variant(variant, out_dir, smoke, seed, device)
        source = f"trained now ({'smoke' if smoke else 'quick'} preset) in {folder.parent}"
    pipe = LLM4GenPipeline.from_pretrained(folder, torch_dtype=torch.float32)  # shipped weights are fp16
    return pipe.to(resolve_device(device)), source


def read_metrics(run_folder: str | Path) -> list[dict]:
    """The records of a run's `metrics.jsonl` (empty when there is none)."""
    path = Path(run_folder) / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
