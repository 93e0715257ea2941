"""Does a trained pipeline read each word of its prompt? A word-swap probe of the denoiser.

    python scripts/probe_conditioning.py RUN_OR_PIPELINE [RUN_OR_PIPELINE ...] [--images 32]

For single-object test-iid scenes, one noisy image x_t per scene and timestep is denoised under
its true caption ("a large outlined red circle") and under the same caption with one word
exchanged (each other shape; three other colours). Printed per timestep t, in pixel units:

- `err`: mean squared error of the predicted clean image x̂₀ under the true caption;
- `shape Δ` / `colour Δ`: mean |x̂₀(true) − x̂₀(swapped)|, how much the prediction moves when that
  word changes (0 = the word is ignored);
- `shape gain` / `colour gain`: mean squared error under a swapped caption minus under the true
  one (> 0: the word makes the prediction more correct).

A UNet that reads the colour word but ignores the shape word (docs/TRAINING.md) shows a colour Δ
and gain at high noise and a shape Δ of zero at every t.
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from llm4gen_lite.losses import predicted_x0  # noqa: E402
from llm4gen_lite.pipeline import LLM4GenPipeline, saved_pipeline_dir  # noqa: E402
from llm4gen_lite.shapes import COLOR_NAMES, SHAPES, ShapesDataset  # noqa: E402
from llm4gen_lite.unet import from_model_space, to_model_space  # noqa: E402

TIMESTEPS = (950, 900, 850, 800, 700, 500)


def caption(obj, shape: str | None = None, colour: str | None = None) -> str:
    """`a {size} {fill} {colour} {shape}` for one object, with an optional word exchanged."""
    return f"a {obj.size} {obj.fill} {colour or obj.color} {shape or obj.shape}"


@torch.no_grad()
def conditioning(pipe: LLM4GenPipeline, prompts: list[str]):
    """The pipeline's own prompt conditioning (its encoders, then its adapter), encoded once."""
    clip, llm = pipe._features(prompts, None, None, "prompt")
    return pipe._condition(clip, llm, len(prompts), pipe.device)


@torch.no_grad()
def predict_x0(pipe: LLM4GenPipeline, xt: torch.Tensor, t: int, cond) -> torch.Tensor:
    """Clean images `[batch, 3, H, W]` in [-1, 1] that the pipeline's UNet predicts from `xt`."""
    steps = torch.full((xt.shape[0],), t)
    pred = pipe.unet(xt, steps, **cond.unet_kwargs()).sample
    x0 = predicted_x0(pred, xt, pipe.scheduler.alphas_cumprod[steps], pipe.scheduler.config.prediction_type)
    return from_model_space(x0, pipe.vae)


def probe(pipe: LLM4GenPipeline, n_images: int, seed: int = 0) -> list[dict[str, float]]:
    """One row per timestep: err, shape/colour Δ and gain (see the module docstring)."""
    cfg = pipe.unet.config
    size = from_model_space(torch.zeros(1, cfg.in_channels, cfg.sample_size, cfg.sample_size), pipe.vae).shape[-1]
    data = ShapesDataset(n_images, image_size=size, split="test_iid", seed=seed, n_objects=1)
    items = [data[i] for i in range(n_images)]
    images = torch.stack([it["pixel_values"] for it in items])
    objects = [it["scene"].objects[0] for it in items]
    x0 = to_model_space(images, pipe.vae)
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(seed))
    true_cond = conditioning(pipe, [caption(o) for o in objects])
    swaps = {}  # kind -> three conditionings: each other shape / three other colours
    for kind, names in (("shape", SHAPES), ("colour", COLOR_NAMES)):
        swaps[kind] = []
        for k in range(1, 4):
            swapped = []
            for i, o in enumerate(objects):
                own = names.index(o.shape if kind == "shape" else o.color)
                other = names[(own + k + (i % (len(names) - 3)) * (kind == "colour")) % len(names)]
                swapped.append(caption(o, **({"shape": other} if kind == "shape" else {"colour": other})))
            swaps[kind].append(conditioning(pipe, swapped))
    rows = []
    for t in TIMESTEPS:
        xt = pipe.scheduler.add_noise(x0, noise, torch.full((n_images,), t))
        true = predict_x0(pipe, xt, t, true_cond)
        err = ((true - images) ** 2).mean(dim=(1, 2, 3))
        row = {"t": t, "err": float(err.mean())}
        for kind, conds in swaps.items():
            deltas, gains = [], []
            for cond in conds:
                moved = predict_x0(pipe, xt, t, cond)
                deltas.append((moved - true).abs().mean())
                gains.append((((moved - images) ** 2).mean(dim=(1, 2, 3)) - err).mean())
            row[f"{kind} Δ"] = float(torch.stack(deltas).mean())
            row[f"{kind} gain"] = float(torch.stack(gains).mean())
        rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", type=Path, help="training run folders (their pipeline/) or pipelines")
    parser.add_argument("--images", type=int, default=32, help="single-object test-iid scenes per timestep")
    args = parser.parse_args()
    for run in args.runs:
        pipe = LLM4GenPipeline.from_pretrained(saved_pipeline_dir(run))
        pipe.unet.eval()
        pipe.adapter.eval()
        rows = probe(pipe, args.images)
        keys = list(rows[0])
        print(f"\n{run}\n| " + " | ".join(keys) + " |\n|" + "---|" * len(keys))
        for r in rows:
            print("| " + " | ".join(f"{r[k]:.4f}" if k != "t" else str(r[k]) for k in keys) + " |")


if __name__ == "__main__":
    main()
