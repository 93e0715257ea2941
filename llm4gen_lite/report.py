"""Evaluate trained pipelines the way the paper reports, and put the paper's numbers beside ours.

`evaluate_pipeline` samples every prompt of the chosen prompt sets with one seed and scores the
images with the exact CompBench-lite parser (per category, 0–100), dense-prompt object recall
(also split into objects inside and beyond the CLIP-role encoder's token window), the ShapesCLIP
score, and FID/KID of test-iid samples against ground-truth renders (refused, with the reason
recorded, when there are too few samples to mean anything).
"""
from __future__ import annotations

import warnings
from typing import Any, Sequence

import numpy as np
import torch

from . import evaluate, shapes
from .encoders import PromptTruncatedWarning
from .image_metrics import MIN_FID_SAMPLES, MIN_KID_SAMPLES, clip_score_mean, fid, kid

# LLM4GEN-SD1.5 minus SD1.5 on T2I-CompBench (v1 table, points) and MS-COCO FID / CLIP score (v1);
# DensePrompts CLIP score read off the paper's plot. See docs/RESULTS.md for the sources.
PAPER_DELTAS: dict[str, float] = {
    "color": 45.34 - 37.65,
    "shape": 43.28 - 35.76,
    "texture": 51.52 - 41.56,
    "spatial": 13.12 - 12.46,
    "complex": 32.33 - 30.80,
    "fid": 25.20 - 26.89,
    "clip_score": 29.45 - 28.66,
    "dense_clip_score": 26.2 - 24.2,
}

EVALUATION_VERSION = 2  # what an evaluation records; 2 added per-prompt values (`PER_PROMPT`)

DEFAULT_SETS = ("color", "shape", "texture", "spatial", "counting", "complex", "test_comp", "attr_swap", "dense_long")


def sample_images(pipe, prompts: Sequence[str], steps: int, guidance_scale: float, seed: int,
                  llm_guidance_scale: float | None = None, batch_size: int = 64) -> np.ndarray:
    """Sample one image per prompt: uint8 `[N, H, W, 3]`. Batch `k` uses seed `seed + k`, so a
    prompt's image does not depend on how many prompts follow it."""
    out = []
    for k, i in enumerate(range(0, len(prompts), batch_size)):
        g = torch.Generator().manual_seed(seed + k)
        res = pipe(list(prompts[i:i + batch_size]), num_inference_steps=steps, guidance_scale=guidance_scale,
                   llm_guidance_scale=llm_guidance_scale, generator=g, output_type="np")
        out.append(np.clip(np.round(np.asarray(res.images) * 255), 0, 255).astype(np.uint8))
    return np.concatenate(out)


def _chw(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()


def spread_rows(rows: list[dict], n: int | None) -> list[dict]:
    """At most `n` rows spread evenly over the file (not its head); rows that share a `pair_id`
    (attribute-swap twins) are kept or dropped together."""
    if n is None or len(rows) <= n:
        return rows
    groups: dict[Any, list[dict]] = {}
    for i, row in enumerate(rows):
        groups.setdefault(row.get("pair_id", ("row", i)), []).append(row)
    units = list(groups.values())
    per_unit = max(len(u) for u in units)
    k = max(1, n // per_unit)
    return [row for j in range(k) for row in units[j * len(units) // k]]


def evaluate_pipeline(pipe, sets: Sequence[str] = DEFAULT_SETS, max_prompts: int | None = None,
                      steps: int = 25, guidance_scale: float = 3.0, llm_guidance_scale: float | None = None,
                      seed: int = 0, fid_samples: int = MIN_FID_SAMPLES, all_prompts: Sequence[str] = ()
                      ) -> dict[str, Any]:
    """Score `pipe` on prompt sets; returns a JSON-able dict (see module docstring).

    At most `max_prompts` prompts per set (spread over the file), except for the sets named in
    `all_prompts`, which are scored on every prompt (the sets a comparison hinges on: fewer
    prompts, wider intervals). `fid_samples` test-iid prompts are sampled for FID/KID (at least
    `MIN_FID_SAMPLES` for a number; fewer records why FID was not computed; 0 skips it)."""
    result: dict[str, Any] = {"version": EVALUATION_VERSION, "settings": {
        "steps": steps, "guidance_scale": guidance_scale, "llm_guidance_scale": llm_guidance_scale, "seed": seed,
        "max_prompts": max_prompts, "all_prompts": list(all_prompts), "fid_samples": fid_samples}, "sets": {}}
    for name in sets:
        rows = spread_rows(shapes.load_prompt_set(name), None if name in all_prompts else max_prompts)
        images = sample_images(pipe, [r["prompt"] for r in rows], steps, guidance_scale, seed, llm_guidance_scale)
        report = evaluate.compbench_report(images, rows)
        report["shapesclip_score"] = clip_score_mean(_chw(images), [r["prompt"] for r in rows]).mean
        if name == "dense_long" and getattr(pipe, "clip_encoder", None) is not None:
            report["by_clip_window"] = evaluate.recall_by_window(images, rows, clip_window_ends(pipe, rows))
        result["sets"][name] = report
    if fid_samples <= 0:
        result["fid"] = result["kid"] = {"refused": "not requested (fid_samples=0)"}
        return result
    iid = shapes.load_prompt_set("test_iid")
    iid = (iid * (fid_samples // len(iid) + 1))[:fid_samples]
    fake = _chw(sample_images(pipe, [r["prompt"] for r in iid], steps, guidance_scale, seed + 10_000,
                              llm_guidance_scale))
    real = _chw(shapes.render_batch([shapes.row_scene(r) for r in iid], fake.shape[-1]))
    for name, fn, minimum in (("fid", fid, MIN_FID_SAMPLES), ("kid", kid, MIN_KID_SAMPLES)):
        if len(iid) < minimum:
            result[name] = {"refused": f"{len(iid)} samples < the minimum of {minimum}"}
        else:
            r = fn(real, fake)
            result[name] = {"value": r.value, "std": r.std, "n_real": r.n_real, "n_fake": r.n_fake,
                            "features": r.features}
    return result


def clip_window_ends(pipe, rows: Sequence[dict]) -> list[int]:
    """Per prompt, the last character the pipeline's CLIP-role encoder reads (its tokens' offsets:
    the end of the prompt unless it was truncated, e.g. at CLIP's 77 tokens)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PromptTruncatedWarning)
        offsets = pipe.clip_encoder.encode([r["prompt"] for r in rows]).offsets
    return [max((b for a, b in row if a < b), default=0) for row in offsets]


def headline(result: dict[str, Any]) -> dict[str, float | None]:
    """The numbers the results tables compare: CompBench-lite categories, compositional colour
    binding, dense-prompt object recall, ShapesCLIP scores, FID."""
    sets = result["sets"]
    row: dict[str, float | None] = {c: sets[c]["scores"][c] for c in shapes.COMPBENCH_CATEGORIES if c in sets}
    if "test_comp" in sets:
        row["test_comp"] = sets["test_comp"]["scores"]["test_comp"]
    if "attr_swap" in sets:
        row["swap_pair_acc"] = 100 * sets["attr_swap"].get("swap_pair_acc", float("nan"))
    if "dense_long" in sets:
        row["dense_recall"] = 100 * sets["dense_long"]["dense"]["object_recall"]
        row["dense_clip_score"] = sets["dense_long"]["shapesclip_score"]
    if "test_comp" in sets:
        row["clip_score"] = sets["test_comp"]["shapesclip_score"]
    row["fid"] = result["fid"].get("value")
    return row


# the sets the results targets are measured on, scored on every prompt by the reproduction
TARGET_SETS = ("test_comp", "dense_long")

# where each headline number's per-prompt values live in an evaluation (`evaluate_pipeline`)
PER_PROMPT: dict[str, tuple[str, ...]] = {
    "test_comp": ("sets", "test_comp", "per_prompt"),
    "dense_recall": ("sets", "dense_long", "dense", "per_prompt_recall"),
}


def per_prompt(result: dict[str, Any], key: str) -> np.ndarray | None:
    """The per-prompt values `[prompts]` behind headline number `key`, or None if not recorded."""
    node: Any = result
    for part in PER_PROMPT[key]:
        node = node.get(part) if isinstance(node, dict) else None
    return None if node is None else np.asarray(node, dtype=float)


def paired_delta(base: dict[str, Any], ours: dict[str, Any], key: str, n_boot: int = 10_000,
                 seed: int = 0) -> tuple[float, float, float] | None:
    """`ours − base` on a headline number (points, 0–100) with a 95% bootstrap interval.

    Both evaluations scored the same prompts with the same sampling seeds, so the prompts are
    resampled in pairs: the interval is the spread of the difference that comes from which
    prompts were drawn. Returns `(delta, low, high)`, or None when either evaluation lacks the
    per-prompt values (`PER_PROMPT[key]`)."""
    a, b = per_prompt(base, key), per_prompt(ours, key)
    if a is None or b is None:
        return None
    if len(a) != len(b) or len(a) == 0:
        raise ValueError(f"{key}: {len(a)} and {len(b)} per-prompt values; both runs must score the same prompts")
    diff = 100.0 * (b - a)
    picks = np.random.default_rng(seed).integers(len(diff), size=(n_boot, len(diff)))
    low, high = np.percentile(diff[picks].mean(1), [2.5, 97.5])
    return float(diff.mean()), float(low), float(high)


def window_table(results: dict[str, dict[str, Any]]) -> str:
    """Markdown: dense-prompt object recall of each variant for the objects whose description fits
    in CLIP's token window and those it cuts (`evaluate.recall_by_window`); variants without the
    split are left out."""
    lines = ["| variant | objects inside / beyond | recall inside | recall beyond | colour+shape inside | colour+shape beyond |",
             "|---|---|---|---|---|---|"]
    for name, result in results.items():
        split = result["sets"].get("dense_long", {}).get("by_clip_window")
        if split:
            inside, beyond = split["inside"], split["beyond"]
            lines.append(f"| {name} | {inside['n']} / {beyond['n']} | {100 * inside['recall']:.1f} | "
                         f"{100 * beyond['recall']:.1f} | {100 * inside['colour_shape_recall']:.1f} | "
                         f"{100 * beyond['colour_shape_recall']:.1f} |")
    return "\n".join(lines) if len(lines) > 2 else "(no run recorded the split)"


def comparison_table(results: dict[str, dict[str, Any]], baseline: str = "clip") -> str:
    """Markdown: one row per variant's headline numbers, then our delta vs `baseline` beside the
    paper's LLM4GEN-SD1.5 − SD1.5 delta where the paper reports one."""
    rows = {name: headline(r) for name, r in results.items()}
    keys = [k for k in rows[next(iter(rows))]]
    fmt = lambda v: "–" if v is None or (isinstance(v, float) and np.isnan(v)) else f"{v:.1f}"  # noqa: E731
    lines = ["| variant | " + " | ".join(keys) + " |", "|---|" + "---|" * len(keys)]
    for name, row in rows.items():
        lines.append(f"| {name} | " + " | ".join(fmt(row.get(k)) for k in keys) + " |")
    if baseline in rows:
        for name, row in rows.items():
            if name == baseline:
                continue
            delta = {k: (row[k] - rows[baseline][k]) if row.get(k) is not None and rows[baseline].get(k) is not None
                     else None for k in keys}
            lines.append(f"| Δ {name} − {baseline} (ours) | " + " | ".join(fmt(delta[k]) for k in keys) + " |")
        lines.append("| Δ LLM4GEN − SD1.5 (paper) | " + " | ".join(fmt(PAPER_DELTAS.get(k)) for k in keys) + " |")
    return "\n".join(lines)
