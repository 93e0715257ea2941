"""Train ShapesCLIP from scratch on the Shapes train split and save it (safetensors + JSON).

    python scripts/train_shapes_clip.py [--config configs/shapes_clip.yaml] [--out DIR]

With the default recipe and `--out data/checkpoints/shapes_clip` this reproduces the shipped
weights (same seed, same thread count, CPU). Writes `model.safetensors` (fp16), `config.json`
and `training.json` (recipe, loss curve, wall time).
"""
from __future__ import annotations

import argparse
import dataclasses
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Idle OpenMP threads sleep instead of spinning: same numbers, far less wasted CPU on a shared machine.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from llm4gen_lite.io import atomic_write_json  # noqa: E402
from llm4gen_lite.paths import REPO_ROOT  # noqa: E402
from llm4gen_lite.shapes_clip import (  # noqa: E402
    default_checkpoint_dir,
    load_recipe,
    save_model,
    train_shapes_clip,
    weights_hash,
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=REPO_ROOT / "configs" / "shapes_clip.yaml",
                        help="YAML recipe with model: and train: sections")
    parser.add_argument("--out", type=Path, default=default_checkpoint_dir(),
                        help="output folder (default: the shipped checkpoint folder)")
    parser.add_argument("--steps", type=int, default=None, help="override train.steps (for a quick try)")
    args = parser.parse_args()

    model_cfg, train_cfg = load_recipe(args.config)
    if args.steps is not None:
        train_cfg = dataclasses.replace(train_cfg, steps=args.steps)
    print(f"model: {model_cfg}\ntrain: {train_cfg}")
    model, history = train_shapes_clip(model_cfg, train_cfg)
    save_model(model, args.out)
    atomic_write_json(args.out / "training.json", {
        "recipe": {"model": model_cfg.to_dict(), "train": dataclasses.asdict(train_cfg)},
        "history": history,
        "weights_sha256_16": weights_hash(args.out),
    })
    size_mb = (args.out / "model.safetensors").stat().st_size / 1e6
    print(f"saved {args.out} ({size_mb:.2f} MB, sha256 {weights_hash(args.out)}) "
          f"after {history['wall_seconds']:.0f} s of training")


if __name__ == "__main__":
    main()
