"""The full reproduction: train every variant at an equal budget, evaluate, regenerate docs/RESULTS.md.

    python scripts/reproduce.py --jobs 2 --ship   # `make full`: the `full` preset, every variant, two at a time
    python scripts/reproduce.py --only clip cam --jobs 2   # the headline pair, side by side (≤ 45 min)
    python scripts/reproduce.py --smoke --out /tmp/repro   # seconds, to check the script itself
    python scripts/reproduce.py --only clip cam --jobs 2 --set logit_mean=1 --out runs/x --results runs/x/RESULTS.md
                                                           # a changed preset, every row alike

Each run trains with `configs/full.yaml` (plus the row's overrides) into `<out>/<row>/`, validating
colour binding every `steps/8` steps (the sample-efficiency curve), then `report.evaluate_pipeline`
scores it on test-iid/test-compositional/attribute-swap/dense prompts. Finished runs and their
evaluations are reused and interrupted runs resume, so the command can simply be rerun. The `clip` and `cam` pipelines are
copied as fp16 safetensors to `data/checkpoints/<variant>/` (with `--ship`), and the results
document is written atomically.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import shutil
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from importlib import metadata
from pathlib import Path

import torch

from llm4gen_lite import report, viz
from llm4gen_lite.config import ConfigError, load_config
from llm4gen_lite.io import atomic_write_bytes, atomic_write_json
from llm4gen_lite.paths import REPO_ROOT, data_dir
from llm4gen_lite.pipeline import LLM4GenPipeline
from llm4gen_lite.pretrained import read_metrics
from llm4gen_lite.train import cache_features, train

ROWS: dict[str, dict] = {  # row name -> overrides of the full preset; everything else is equal
    "clip": {"variant": "clip"},
    "cam": {"variant": "cam"},
    "cam_entity": {"variant": "cam", "entity_weight": 0.1},  # the slowest row (~1.35x a cam step): started early
    "llm": {"variant": "llm"},
    "concat": {"variant": "concat"},
    "cam_minilm": {"variant": "cam", "clip_encoder": "minilm"},
    "clip_minilm": {"variant": "clip", "clip_encoder": "minilm"},
}


RUN_ONLY = ("resume_from", "cpu_threads")  # config fields a reused or resumed run may change
EVAL_PROMPTS = 64  # prompts scored per set (spread evenly over each file), except report.TARGET_SETS: all
FID_SAMPLES = 256  # test-iid samples (and renders) behind FID/KID


def row_config(name: str, overrides: dict, out: Path, smoke: bool, seed: int, threads: int = 0,
               preset_changes: Sequence[str] = ()):
    """The `TrainConfig` of one row: the full (or smoke) preset with `preset_changes` ("key=value",
    every row alike), the row's overrides, its folder."""
    base = load_config("smoke" if smoke else "full", list(preset_changes)).replace(seed=seed, cpu_threads=threads)
    return base.replace(output_dir=str(out / name), validation_prompts="color",
                        validate_every=max(1, base.steps // 8), checkpoint_every=max(1, base.steps // 8),
                        resume_from="latest" if (out / name / "checkpoints").is_dir() else None, **overrides)


def run_row(name: str, overrides: dict, out: Path, smoke: bool, seed: int, threads: int = 0,
            preset_changes: Sequence[str] = ()) -> dict:
    """Train (or reuse, or resume) one row and evaluate it; `threads`: torch CPU threads (0 = default)."""
    if threads:
        torch.set_num_threads(threads)
    config = row_config(name, overrides, out, smoke, seed, threads, preset_changes)
    settings = {"max_prompts": 4 if smoke else EVAL_PROMPTS, "steps": config.sample_steps,
                "guidance_scale": config.guidance_scale, "llm_guidance_scale": None, "seed": seed,
                "fid_samples": 8 if smoke else FID_SAMPLES, "all_prompts": [] if smoke else list(report.TARGET_SETS)}
    start = time.perf_counter()
    pipeline_dir = out / name / "pipeline"
    if not (pipeline_dir / "model_index.json").is_file():
        pipeline_dir = train(config)
    previous = _finished_evaluation(out / name, config, settings)
    if previous is not None:
        return previous
    pipe = LLM4GenPipeline.from_pretrained(pipeline_dir)
    evaluation_start = time.perf_counter()
    result = report.evaluate_pipeline(pipe, **settings)
    result["cost"] = {"train_and_load_s": round(evaluation_start - start, 1),
                      "evaluate_s": round(time.perf_counter() - evaluation_start, 1),
                      **json.loads((out / name / "summary.json").read_text())}
    result["config"] = config.to_dict()
    atomic_write_json(out / name / "evaluation.json", result)
    return result


def _finished_evaluation(run: Path, config, settings: dict) -> dict | None:
    """The run's evaluation.json if it scored this run's pipeline (same config) with these settings
    and records what an evaluation records now (`report.EVALUATION_VERSION`)."""
    path = run / "evaluation.json"
    if not path.is_file() or path.stat().st_mtime < (run / "pipeline" / "model_index.json").stat().st_mtime:
        return None
    previous = json.loads(path.read_text())
    same_run = {**previous.get("config", {}), "resume_from": None} == {**config.to_dict(), "resume_from": None}
    current = previous.get("version") == report.EVALUATION_VERSION and previous.get("settings") == settings
    return previous if same_run and current else None


def trained_with_another_config(run: Path, config) -> list[str]:
    """The config fields in which the run folder's `config.json` differs from `config`, but those that
    do not change what is trained (`RUN_ONLY`): a finished or interrupted run is reused or resumed
    only with the config it began with."""
    path = run / "config.json"
    if not path.is_file():
        return []
    previous, current = json.loads(path.read_text()), json.loads(json.dumps(config.to_dict()))
    return [f"{key}: {previous.get(key)!r} there, {current.get(key)!r} now"
            for key in sorted(previous.keys() | current.keys())
            if key not in RUN_ONLY and previous.get(key) != current.get(key)]


def sample_efficiency(out: Path, names: list[str]):
    """Colour-binding score against training steps, from each run's validation records."""
    curves = {}
    for name in names:
        records = [r for r in read_metrics(out / name) if r.get("kind") == "validation"]
        curves[name] = [{"kind": "train", "step": r["step"], "score": r.get("score/color", 0.0) + 1e-3}
                        for r in records]
    fig = viz.loss_curves(curves, key="score", smooth=1, title="colour binding during training")
    fig.axes[0].set_yscale("linear")
    fig.axes[0].set_ylabel("CompBench-lite colour score (validation)")
    return fig


def ship(out: Path, variant: str) -> Path:
    """Copy a trained pipeline to data/checkpoints/<variant>/ as fp16 safetensors, with its metrics."""
    pipe = LLM4GenPipeline.from_pretrained(out / variant / "pipeline")
    target = data_dir() / "checkpoints" / variant
    tmp = target.with_name(f".{variant}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    pipe.to(dtype=torch.float16).save_pretrained(tmp / "pipeline")
    for extra in ("metrics.jsonl", "config.json", "summary.json", "evaluation.json"):
        if (out / variant / extra).is_file():
            shutil.copy2(out / variant / extra, tmp / extra)
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)
    return target


def targets(results: dict[str, dict]) -> str:
    """Markdown table: the results targets for `cam` against `clip`, met or not, from the numbers."""
    if not {"clip", "cam"} <= results.keys():
        return "(needs both the `clip` and the `cam` row)"
    base, ours = report.headline(results["clip"]), report.headline(results["cam"])
    lines = ["| target | clip | cam | cam − clip | 95% interval | met |", "|---|---|---|---|---|---|"]
    for label, key, need in (("colour binding, compositional split (`test_comp`) ≥ +10", "test_comp", 10.0),
                             ("object recall, dense prompts > 77 tokens ≥ +10", "dense_recall", 10.0)):
        a, b = base.get(key), ours.get(key)
        if a is None or b is None:
            lines.append(f"| {label} | – | – | – | – | not measured |")
            continue
        paired = report.paired_delta(results["clip"], results["cam"], key)
        interval = "–" if paired is None else f"{paired[1]:+.1f} to {paired[2]:+.1f}"
        lines.append(f"| {label} | {a:.1f} | {b:.1f} | {b - a:+.1f} | {interval} | {'yes' if b - a >= need else '**no**'} |")
    fa, fb = results["clip"].get("fid", {}), results["cam"].get("fid", {})
    if "value" in fa and "value" in fb:
        worse = fb["value"] > fa["value"] + max(fa.get("std") or 0.0, fb.get("std") or 0.0)
        lines.append(f"| FID not worse (ShapesCLIP features, {fb['n_fake']} samples) | {fa['value']:.1f} | "
                     f"{fb['value']:.1f} | {fb['value'] - fa['value']:+.1f} | – | {'**no**' if worse else 'yes'} |")
    else:
        lines.append("| FID not worse | – | – | – | – | not measured |")
    sizes = " and ".join(f"{results['cam']['sets'][k]['n']} {k}" for k in report.TARGET_SETS if k in results["cam"]["sets"])
    lines += ["", f"95% interval: of `cam − clip` over the prompts of the set ({sizes} prompts), resampled in "
              "pairs (both rows drew every prompt with the same seed; `report.paired_delta`). It shows how much of "
              "a difference the choice of prompts alone can make; a second training seed would add its own spread."]
    return "\n".join(lines)


def delta_table(results: dict[str, dict]) -> str:
    """Markdown: every row's difference from `clip` on the target sets, with paired 95% intervals."""
    if "clip" not in results:
        return "(needs the `clip` row)"
    keys = [k for k in report.PER_PROMPT if report.per_prompt(results["clip"], k) is not None]
    lines = ["| variant | " + " | ".join(f"Δ {k} (95% interval)" for k in keys) + " |", "|---" * (len(keys) + 1) + "|"]
    for name, result in results.items():
        if name == "clip":
            continue
        cells = []
        for key in keys:
            paired = report.paired_delta(results["clip"], result, key)
            cells.append("–" if paired is None else f"{paired[0]:+.1f} ({paired[1]:+.1f} to {paired[2]:+.1f})")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def scheduled_minutes(minutes: list[float], jobs: int) -> float:
    """Wall time of rows taking `minutes` each when `jobs` workers take them in this order, each
    next row going to the first worker free (how `ProcessPoolExecutor` hands out the grid)."""
    free = [0.0] * max(1, jobs)
    for m in minutes:
        free[free.index(min(free))] += m
    return max(free)


def cost_section(results: dict[str, dict], jobs: int) -> str:
    """Markdown: each row's measured setup, training and evaluation time, their sum, and how long
    the `clip` and `cam` pair took. Rows that predate `setup_seconds` count without their setup."""
    lines = ["| run | steps | s/step | setup (min) | train (min) | evaluate (min) | total (min) |",
             "|---|---|---|---|---|---|---|"]
    minutes = {}
    for name, result in results.items():
        c = result["cost"]
        setup = c.get("setup_seconds")
        minutes[name] = ((setup or 0.0) + c["wall_seconds"] + c["evaluate_s"]) / 60
        lines.append(f"| {name} | {c['steps']} | {c['s_per_step']:.2f} | "
                     f"{'–' if setup is None else f'{setup / 60:.1f}'} | {c['wall_seconds'] / 60:.1f} | "
                     f"{c['evaluate_s'] / 60:.1f} | {minutes[name]:.1f} |")
    total = sum(minutes.values())
    if any("setup_seconds" not in r["cost"] for r in results.values()):
        lines += ["", "– : a run from before setup (model loading, feature cache) was timed; its total leaves it out."]
    lines += ["", f"In all, {total:.0f} min of run time"
              + (f"; {scheduled_minutes(list(minutes.values()), jobs):.0f} min of wall time with {jobs} rows side by "
                 "side in this order (the rows' own times; the feature caches, filled before them, not counted)."
                 if jobs > 1 else ".")]
    pair = [n for n in ("clip", "cam") if n in results]
    if len(pair) == 2:
        together = max if jobs > 1 else sum
        counted = ("setup, training and evaluation" if all("setup_seconds" in results[n]["cost"] for n in pair) else
                   "training and evaluation, without the setup (model loading, feature cache) these runs did not record")
        lines.append(f"The `clip` and `cam` rows took {together(minutes[n] for n in pair):.0f} min together "
                     f"({'side by side' if jobs > 1 else 'one after the other'}; {counted}).")
    return "\n".join(lines)


def write_results(results: dict[str, dict], out: Path, command: str, smoke: bool, path: Path, jobs: int = 1) -> Path:
    figures = path.parent / "figures"
    figures.mkdir(parents=True, exist_ok=True)
    sample_efficiency(out, [n for n in ("clip", "cam") if n in results]).savefig(figures / "sample_efficiency.png", dpi=130)
    versions = {p: metadata.version(p) for p in ("torch", "diffusers", "transformers", "accelerate")}
    text = f"""# Results

Generated by `{command}` on {time.strftime('%Y-%m-%d')} ({platform.processor() or platform.machine()},
{os.cpu_count()} cores, {jobs} run(s) at a time; {', '.join(f'{k} {v}' for k, v in versions.items())}).
{'**Smoke run: tiny settings, the numbers below are not meaningful.**' if smoke else ''}
Seed {next(iter(results.values()))['config']['seed']}; configs: `configs/full.yaml` plus each row's overrides
(`scripts/reproduce.py`, `ROWS`). Every row has the same UNet, data, steps and seed.

## CompBench-lite, compositional split, dense prompts, image quality

{report.comparison_table(results)}

Columns: CompBench-lite category scores (0–100); `test_comp` — prompts with held-out (colour,
shape) combinations; `swap_pair_acc` — both prompts of an attribute-swap pair drawn right;
`dense_recall` — objects of >77-token dense prompts found in the image; ShapesCLIP scores; FID on
ShapesCLIP features (test-iid samples vs ground-truth renders). The last row is the paper's
LLM4GEN-SD1.5 − SD1.5 delta (T2I-CompBench v1, MS-COCO FID/CLIP score, DensePrompts CLIP score).

## Dense prompts: inside and beyond CLIP's 77 tokens

{report.window_table(results)}

Objects of the >77-token dense prompts, split by whether the CLIP-role encoder read all of their
description: `inside` when every colour, shape, size and fill mention of the object lies within
its 77 tokens, `beyond` when at least one lies past them, where only the LLM branch reads it.
`recall`: found with every mentioned attribute; `colour+shape`: found with the right colour and
shape.

## Targets

{targets(results)}

Every row against `clip`, the same way:

{delta_table(results)}

What was tried to make the lite UNet follow prompts on this budget, and what each attempt
measured: [docs/TRAINING.md](TRAINING.md), "The recipe (measured)"; the earlier `full` presets
and what each gave `cam` against `clip`: the same file, "`cam` against `clip`".

## Sample efficiency

![colour binding against training steps](figures/sample_efficiency.png)

## Cost

{cost_section(results, jobs)}
"""
    atomic_write_bytes(path, text.encode())
    atomic_write_json(path.with_name("results.json"), results)  # beside the document, for notebook 08
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/full", help="run folder (finished rows are reused, interrupted ones resume)")
    parser.add_argument("--only", nargs="+", choices=sorted(ROWS), help="rows to run (default: all)")
    parser.add_argument("--smoke", action="store_true", help="tiny settings to check the script (numbers meaningless)")
    parser.add_argument("--seed", type=int, default=0, help="seed of every run")
    parser.add_argument("--jobs", type=int, default=1,
                        help="rows trained side by side, each on cpu_count/jobs threads (2 on a 2-core CPU is fastest)")
    parser.add_argument("--ship", action="store_true", help="copy the clip and cam pipelines to data/checkpoints/")
    parser.add_argument("--results", default=str(REPO_ROOT / "docs" / "RESULTS.md"), help="results document to write")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="change one config field of every row (repeatable), e.g. --set steps=4800")
    args = parser.parse_args(argv)
    out = Path(args.out)
    names = args.only or list(ROWS)
    per_row = sorted({s.split("=", 1)[0].strip() for s in args.set} & {k for n in names for k in ROWS[n]})
    if per_row:
        parser.error(f"--set {', '.join(per_row)}: the grid sets this per row (ROWS); leave it to the rows")
    try:
        row_config(names[0], ROWS[names[0]], out, args.smoke, args.seed, 0, args.set)
    except ConfigError as error:
        parser.error(str(error))
    for name in names:
        changed = trained_with_another_config(out / name, row_config(name, ROWS[name], out, args.smoke, args.seed, 0, args.set))
        if changed:
            parser.error(f"{out / name} was trained with another config ({'; '.join(changed)}); pass another --out, "
                         "or delete that folder to train the row again")
    results = {}
    if args.jobs > 1:  # rows side by side, each on its share of the cores (spawned: no forked torch state)
        threads = max(1, (os.cpu_count() or 1) // args.jobs)
        for name in names:  # their feature caches first, here: a cache folder takes one writer at a time
            if not (out / name / "pipeline" / "model_index.json").is_file():
                cache_features(row_config(name, ROWS[name], out, args.smoke, args.seed, threads, args.set))
        with ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
            futures = {name: pool.submit(run_row, name, ROWS[name], out, args.smoke, args.seed, threads, args.set)
                       for name in names}
            for name, future in futures.items():
                results[name] = future.result()
                print(f"=== {name}: {ROWS[name]}\n{json.dumps(report.headline(results[name]))}", flush=True)
    else:
        for name in names:
            print(f"=== {name}: {ROWS[name]}", flush=True)
            results[name] = run_row(name, ROWS[name], out, args.smoke, args.seed, 0, args.set)
            print(json.dumps(report.headline(results[name])), flush=True)
    command = "python scripts/reproduce.py " + " ".join(argv if argv is not None else sys.argv[1:])
    if args.ship:
        for variant in ("clip", "cam"):
            if variant in results:
                print("shipped", ship(out, variant))
    print("wrote", write_results(results, out, command.strip(), args.smoke, Path(args.results), args.jobs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
