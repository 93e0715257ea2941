"""Measure the default encoders on this machine: load times and feature-extraction throughput.

    HF_HUB_OFFLINE=1 .venv/bin/python bench/bench_encoders.py [--batches 3] [--threads N] [--json out.json]

SmolLM2's first load converts the packaged GGUF into a fresh temporary cache (so it always
measures the conversion), then loads again from that cache. Throughput is prompts per second at
batch 64 for short (~8 words) and dense (~60-90 words) prompts, after one warm-up batch, plus the
feature cache's read speed. The load average is printed first: other processes skew the numbers,
and on a machine busier than its core count one torch thread can beat two several times over
(a waiting OpenMP thread spins while its partner is descheduled), hence `--threads`.
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import random
import tempfile
import time
import warnings

import torch

BATCH = 64
COLORS = ["red", "green", "blue", "yellow", "purple", "orange", "cyan", "white"]
SHAPES = ["circle", "square", "triangle", "diamond"]
PLACES = ["in the top left corner", "near the centre", "at the bottom right", "on the left edge", "above the middle"]


def short_prompt(rng: random.Random) -> str:
    size, color, shape = rng.choice(["small", "large"]), rng.choice(COLORS), rng.choice(SHAPES)
    return f"a {size} {color} {shape} left of a {rng.choice(COLORS)} {rng.choice(SHAPES)}"


def dense_prompt(rng: random.Random) -> str:
    parts = []
    for _ in range(rng.randint(3, 4)):
        parts.append(
            f"a {rng.choice(['small', 'large'])} {rng.choice(['filled', 'outline'])} {rng.choice(COLORS)} "
            f"{rng.choice(SHAPES)} sits {rng.choice(PLACES)}, clearly separated from the others"
        )
    return "The image shows " + "; ".join(parts) + ", all drawn on a plain black background with crisp edges."


def timed(fn):
    start = time.perf_counter()
    value = fn()
    return value, time.perf_counter() - start


def throughput(encoder, prompts: list[str], batches: int) -> float:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # dense prompts exceed 77 tokens in the CLIP role by design
        encoder.encode(prompts[:BATCH])  # warm-up
        _, seconds = timed(lambda: [encoder.encode(prompts[i * BATCH : (i + 1) * BATCH]) for i in range(batches)])
    return batches * BATCH / seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", type=int, default=3, help="timed batches of 64 per measurement")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's own choice)")
    parser.add_argument("--json", help="also write the results to this JSON file")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    print(f"load average {os.getloadavg()[0]:.2f}, torch threads {torch.get_num_threads()}, torch {torch.__version__}")

    _, import_s = timed(lambda: importlib.import_module("transformers.models.llama.modeling_llama"))
    from llm4gen_lite.encoders import LLMEncoder, MiniLMEncoder
    from llm4gen_lite.feature_cache import FeatureCache

    rng = random.Random(0)
    short = [short_prompt(rng) for _ in range(BATCH * (args.batches + 1))]
    dense = [dense_prompt(rng) for _ in range(BATCH * (args.batches + 1))]
    results: dict[str, float] = {"import_transformers_s": import_s}
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["LLM4GEN_CACHE"] = tmp
        _, results["smollm2_first_load_s"] = timed(LLMEncoder)
        smollm2, results["smollm2_cached_load_s"] = timed(LLMEncoder)
        minilm, results["minilm_load_s"] = timed(MiniLMEncoder)
        for name, encoder in (("smollm2", smollm2), ("minilm", minilm)):
            lengths = [len(encoder.tokenizer(p)["input_ids"]) for p in dense[:BATCH]]
            results[f"{name}_dense_tokens_mean"] = sum(lengths) / len(lengths)
            results[f"{name}_short_prompts_per_s"] = throughput(encoder, short, args.batches)
            results[f"{name}_dense_prompts_per_s"] = throughput(encoder, dense, args.batches)
        cache = FeatureCache(smollm2, root=os.path.join(tmp, "features"))
        _, build_s = timed(lambda: cache.build(dense[: BATCH * 2], progress=False))
        results["smollm2_cache_build_dense_prompts_per_s"] = BATCH * 2 / build_s
        _, get_s = timed(lambda: [cache.get(dense[i * BATCH : (i + 1) * BATCH]) for i in range(2)])
        results["smollm2_cache_get_dense_prompts_per_s"] = BATCH * 2 / get_s
        shard_bytes = sum(p.stat().st_size for p in cache.path.glob("shard-*.safetensors"))
        results["smollm2_cache_kb_per_dense_prompt"] = shard_bytes / 1024 / (BATCH * 2)
    for key, value in results.items():
        print(f"{key:45s} {value:10.2f}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(results, fh, indent=2)


if __name__ == "__main__":
    main()
