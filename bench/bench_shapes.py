#!/usr/bin/env python
"""Throughput of the Shapes world and the CompBench-lite scorer on this CPU.

    python bench/bench_shapes.py                 # prints a table
    python bench/bench_shapes.py --json out.json # also writes the numbers

Targets (docs/SHAPES.md): render ≥ 2,000 scenes/s (sampling included) and score ≥ 500 images/s
(parsing included), at 32×32. Each figure is the best of `--repeats` timed runs.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402

from llm4gen_lite import evaluate as E  # noqa: E402
from llm4gen_lite import shapes as S  # noqa: E402


def best_rate(fn, n: int, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return n / best


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=4000, help="scenes/images per timed run")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = ap.parse_args(argv)
    n, r = args.n, args.repeats

    results: dict[str, float] = {}
    seeds = iter(range(10**6))
    results["sample+render scenes/s (32px)"] = best_rate(
        lambda: S.render_batch(S.scenes_from_seed(next(seeds), n), 32), n, r)
    scenes = S.scenes_from_seed(0, n)
    results["sample only scenes/s"] = best_rate(lambda: S.scenes_from_seed(next(seeds), n), n, r)
    results["render only scenes/s (32px)"] = best_rate(lambda: S.render_batch(scenes, 32), n, r)
    results["render only scenes/s (64px)"] = best_rate(lambda: S.render_batch(scenes, 64), n, r)
    rng = np.random.default_rng(0)
    k = min(n, 1000)
    results["short captions/s"] = best_rate(lambda: [S.short_caption(s, rng) for s in scenes[:k]], k, r)
    results["dense captions/s"] = best_rate(lambda: [S.dense_caption(s, rng) for s in scenes[:k]], k, r)
    ds = S.ShapesDataset(num_samples=k, dense_prob=0.3)
    results["ShapesDataset items/s"] = best_rate(lambda: [ds[i] for i in range(k)], k, r)

    rows = (S.load_prompt_set("test_iid") * (n // 200 + 1))[:n]
    images32 = S.render_batch([S.row_scene(row) for row in rows], 32)
    images64 = S.render_batch([S.row_scene(row) for row in rows], 64)
    results["score_batch images/s (32px, parse+score)"] = best_rate(lambda: E.score_batch(images32, rows), n, r)
    results["parse_batch images/s (32px)"] = best_rate(lambda: E.parse_batch(images32), n, r)
    results["parse_batch images/s (64px)"] = best_rate(lambda: E.parse_batch(images64), n, r)
    m = min(n, 500)
    results["parse_image one at a time images/s (32px)"] = best_rate(
        lambda: [E.parse_image(im) for im in images32[:m]], m, r)

    import scipy

    print(f"# Shapes / CompBench-lite throughput — {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} CPUs, Python {platform.python_version()}, numpy {np.__version__}, "
          f"scipy {scipy.__version__}")
    print(f"# n={n}, best of {r}")
    width = max(len(k) for k in results)
    for key, val in results.items():
        print(f"{key:<{width}}  {val:>10,.0f}")
    ok_render = results["sample+render scenes/s (32px)"] >= 2000
    ok_score = results["score_batch images/s (32px, parse+score)"] >= 500
    print(f"targets: render ≥ 2,000/s {'met' if ok_render else 'MISSED'}; "
          f"score ≥ 500/s {'met' if ok_score else 'MISSED'}")
    if args.json:
        args.json.write_text(json.dumps({"n": n, "repeats": r, "results": results}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
