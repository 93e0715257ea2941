"""How well does a trained pipeline follow single-object prompts? The `quick` preset's target.

    python scripts/single_object_accuracy.py RUN_OR_PIPELINE [RUN_OR_PIPELINE ...] [--seeds 0 1 2]

Samples every prompt of the `single` set (data/prompts/single.jsonl: 84 prompts such as "a small
outlined red circle") once per sampling seed (DDIM 25, CFG 3 unless given, as at validation) and
prints per pipeline the mean colour / shape / size / fill accuracy of the largest parsed object
(`evaluate.attribute_accuracy`) and the shape accuracy of each seed. A training run's validation
samples each prompt once with one seed; on one checkpoint the seed alone moves shape accuracy by
up to ±0.05, as much as many recipe changes (docs/TRAINING.md).
"""
from __future__ import annotations

import argparse
import json
import os
from collections.abc import Sequence

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from llm4gen_lite import evaluate, report  # noqa: E402
from llm4gen_lite.pipeline import LLM4GenPipeline, saved_pipeline_dir  # noqa: E402
from llm4gen_lite.shapes import load_prompt_set  # noqa: E402

ATTRIBUTES = ("colour_acc", "shape_acc", "size_acc", "fill_acc")


def accuracy(pipe: LLM4GenPipeline, seeds: Sequence[int] = (0, 1, 2), steps: int = 25,
             guidance_scale: float = 3.0) -> dict:
    """`{"mean": {attribute: accuracy}, "shape_per_seed": [...], "prompts": n}` over every
    `single` prompt, sampled once per seed."""
    if not seeds:
        raise ValueError("give at least one sampling seed")
    rows = load_prompt_set("single")
    prompts = [r["prompt"] for r in rows]
    per_seed = [evaluate.attribute_accuracy(report.sample_images(pipe, prompts, steps, guidance_scale, seed), rows)
                for seed in seeds]
    return {"mean": {a: sum(s[a] for s in per_seed) / len(per_seed) for a in ATTRIBUTES},
            "shape_per_seed": [s["shape_acc"] for s in per_seed], "prompts": len(rows)}


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", help="training run folders or saved pipelines")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="sampling seeds (default 0 1 2)")
    parser.add_argument("--steps", type=int, default=25, help="DDIM steps (default 25)")
    parser.add_argument("--guidance", type=float, default=3.0, help="CFG scale (default 3)")
    args = parser.parse_args(argv)
    for run in args.runs:
        pipe = LLM4GenPipeline.from_pretrained(saved_pipeline_dir(run))
        pipe.set_progress_bar_config(disable=True)
        result = accuracy(pipe, args.seeds, args.steps, args.guidance)
        print(run, f"({result['prompts']} prompts x {len(args.seeds)} seeds, {args.steps} steps, CFG {args.guidance})",
              json.dumps({k: round(v, 3) for k, v in result["mean"].items()}),
              "shape per seed", [round(v, 3) for v in result["shape_per_seed"]], flush=True)


if __name__ == "__main__":
    main()
