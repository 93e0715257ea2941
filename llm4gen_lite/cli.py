"""Command line: `python -m llm4gen_lite {notebooks,cache-features,train,sample,evaluate} --help`.

Exit codes: 0 success, 2 bad arguments or config (the message names the problem), 1 a failure
while running (e.g. a non-finite loss, a corrupt checkpoint); `LLM4GEN_DEBUG=1` shows tracebacks.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

EXIT_OK, EXIT_FAILURE, EXIT_USAGE = 0, 1, 2


class UsageError(Exception):
    """Bad arguments: reported with exit code 2."""


def _cmd_notebooks(args: argparse.Namespace) -> int:
    from .walkthrough import run_walkthrough

    runs = run_walkthrough(args.out, smoke=args.smoke, seed=args.seed, device=args.device, pattern=args.pattern)
    failed = [r.name for r in runs if r.error is not None]
    print(f"report: {args.out}/REPORT.md")
    if failed:
        print(f"failed notebooks: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


# ----------------------------------------------------------------------------------------------
# training commands
# ----------------------------------------------------------------------------------------------
def _config(args: argparse.Namespace):
    from .config import load_config

    return load_config(args.config, args.set)


def _cmd_cache_features(args: argparse.Namespace) -> int:
    from .train import cache_features

    caches = cache_features(_config(args))
    for role, cache in caches.items():
        print(f"{role}: {len(cache)} captions cached in {cache.path}")
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    from .train import train

    print(f"pipeline: {train(_config(args))}")
    return 0


def _load_pipeline(args: argparse.Namespace, config):
    folder = Path(args.pipeline) if args.pipeline else Path(config.output_dir) / "pipeline"
    if not (folder / "model_index.json").is_file():
        raise UsageError(f"{folder}: no saved pipeline there (train one first, or pass --pipeline DIR)")
    from .paths import resolve_device
    from .pipeline import LLM4GenPipeline

    pipe = LLM4GenPipeline.from_pretrained(folder)
    adapter = pipe.adapter
    if (adapter.uses_clip and pipe.clip_encoder is None) or (adapter.uses_llm and pipe.llm_encoder is None):
        # encoders.json names no loadable encoder: take them from the run's config.json (or --config)
        from .config import config_from_dict
        from .io import read_json
        from .train import load_encoders

        run_config = folder.parent / "config.json"
        source = config_from_dict(read_json(run_config), str(run_config)) if run_config.is_file() else config
        clip, llm = load_encoders(source)
        pipe.clip_encoder = pipe.clip_encoder or clip
        pipe.llm_encoder = pipe.llm_encoder or llm
    pipe.to(resolve_device(config.device))
    pipe.set_progress_bar_config(disable=True)
    return pipe, folder


def _sample(pipe, prompts: list[str], config, seed: int, batch: int = 64):
    import numpy as np
    import torch

    images = []
    for start in range(0, len(prompts), batch):
        generator = torch.Generator().manual_seed(seed + start)
        out = pipe(
            prompts[start : start + batch], num_inference_steps=config.sample_steps,
            guidance_scale=config.guidance_scale, generator=generator, output_type="np",
        )
        images.append(out.images)
    return np.concatenate(images)


def _cmd_sample(args: argparse.Namespace) -> int:
    from .train import save_grid

    config = _config(args)
    prompts = [p for p in args.prompt for _ in range(args.per_prompt)]
    if not prompts:
        raise UsageError("give at least one --prompt")
    pipe, folder = _load_pipeline(args, config)
    images = _sample(pipe, prompts, config, config.seed)
    out = Path(args.out)
    save_grid(images, prompts, out, title=f"{folder} (CFG {config.guidance_scale}, {config.sample_steps} steps)")
    print(f"wrote {out} ({len(prompts)} images)")
    return 0


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from .evaluate import compbench_report
    from .io import atomic_write_json
    from .shapes import load_prompt_set

    config = _config(args)
    pipe, folder = _load_pipeline(args, config)
    results = {"pipeline": str(folder), "guidance_scale": config.guidance_scale, "sample_steps": config.sample_steps,
               "seed": config.seed, "sets": {}}
    for name in args.prompts:
        try:
            rows = load_prompt_set(name)
        except FileNotFoundError as err:
            raise UsageError(str(err)) from err
        if args.max_prompts:
            rows = rows[: args.max_prompts]
        images = _sample(pipe, [r["prompt"] for r in rows], config, config.seed)
        results["sets"][name] = compbench_report(images, rows)
        print(f"{name}: {json.dumps(results['sets'][name]['scores'])}")
    out = Path(args.out) if args.out else folder.parent / "evaluation.json"
    atomic_write_json(out, results)
    print(f"wrote {out}")
    return 0


# ----------------------------------------------------------------------------------------------
# parser
# ----------------------------------------------------------------------------------------------
def _add_config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default=None,
                        help="preset name (configs/<name>.yaml: smoke, quick, full) or a YAML/JSON file; default: built-in defaults")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override one config field, typed by the field (repeatable), e.g. --set steps=100")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m llm4gen_lite", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    nb = sub.add_parser("notebooks", help="execute the notebook walkthrough with papermill and write a report")
    nb.add_argument("--out", default="outputs/main", help="output folder (executed notebooks, figures, REPORT.md)")
    nb.add_argument("--smoke", action="store_true", help="tiny settings, for tests (numbers not meaningful)")
    nb.add_argument("--seed", type=int, default=0, help="seed passed to every notebook")
    nb.add_argument("--device", default="auto", help="'auto', 'cpu' or 'cuda'")
    nb.add_argument("--pattern", default="[0-9][0-9]_*.ipynb", help="glob of notebooks to run")
    nb.set_defaults(func=_cmd_notebooks)

    cf = sub.add_parser("cache-features", help="encode the captions of a run once into the feature cache")
    _add_config_args(cf)
    cf.set_defaults(func=_cmd_cache_features)

    tr = sub.add_parser("train", help="train a run (writes output_dir: checkpoints, metrics, pipeline/)")
    _add_config_args(tr)
    tr.set_defaults(func=_cmd_train)

    sa = sub.add_parser("sample", help="sample prompts with a saved pipeline into a PNG grid")
    _add_config_args(sa)
    sa.add_argument("--pipeline", default=None, help="saved pipeline folder (default: <output_dir>/pipeline)")
    sa.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable)")
    sa.add_argument("--per-prompt", type=int, default=4, help="images per prompt")
    sa.add_argument("--out", default="samples.png", help="output PNG")
    sa.set_defaults(func=_cmd_sample)

    ev = sub.add_parser("evaluate", help="score a saved pipeline on prompt sets (data/prompts/*.jsonl) into JSON")
    _add_config_args(ev)
    ev.add_argument("--pipeline", default=None, help="saved pipeline folder (default: <output_dir>/pipeline)")
    ev.add_argument("--prompts", action="append", default=None,
                    help="prompt set name or .jsonl path (repeatable; default: single)")
    ev.add_argument("--max-prompts", type=int, default=0, help="score only the first N rows of each set (0 = all)")
    ev.add_argument("--out", default=None, help="output JSON (default: <pipeline>/../evaluation.json)")
    ev.set_defaults(func=_cmd_evaluate)
    return parser


def main(argv: list[str] | None = None) -> int:
    from .config import ConfigError

    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "prompts", "absent") is None:
        args.prompts = ["single"]
    if getattr(args, "per_prompt", 1) < 1 or getattr(args, "max_prompts", 0) < 0:
        parser.error("--per-prompt must be >= 1 and --max-prompts >= 0")
    try:
        return args.func(args)
    except (ConfigError, UsageError) as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_FAILURE
    except Exception as err:  # a runtime failure: one clear line, exit code 1 (LLM4GEN_DEBUG=1: traceback)
        if os.environ.get("LLM4GEN_DEBUG"):
            raise
        print(f"error: {type(err).__name__}: {err}", file=sys.stderr)
        return EXIT_FAILURE
