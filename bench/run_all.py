#!/usr/bin/env python
"""Performance of llm4gen_lite in one run, reported as ratios of configurations measured side by side.

    .venv/bin/python bench/run_all.py                    # full run (`make bench`), ~10-15 min on a busy 2-core CPU
    .venv/bin/python bench/run_all.py --quick            # sanity run on the tiny UNet; writes nothing unless asked
    .venv/bin/python bench/run_all.py --device cuda --mixed-precision bf16

Every comparison interleaves its configurations (round r runs A B C ..., round r+1 runs them in
reverse) after a warm-up call of each, so load from other processes hits all sides alike; a ratio is
the median over rounds of the ratio within a round, and absolute times (medians) are context only.
Measured: the training-step cost of the CAM (`cam` / `clip`), the feature cache against running both encoders every step, the
pipeline against a plain diffusers loop, LLM-guided sampling against CFG, the achieved FLOP/s of a
training step against a large matmul, step time against batch size and resolution, and peak memory
of training and of feature extraction (each in its own process, `bench/peak_memory.py`).

Writes `bench/results.json` (runs keyed by machine, device, threads and precision, so CPU and GPU
numbers live side by side) and the tables into docs/BENCHMARKS.md between its result markers.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from llm4gen_lite.encoders import TextFeatures  # noqa: E402
from llm4gen_lite.io import atomic_write_json  # noqa: E402
from workloads import (  # noqa: E402
    CATEGORIES, SamplingSetup, TrainStep, autocast, bench_config, count_flops, make_pipeline, matmul_reference,
    pipeline_sample, plain_sample, time_by_category,
)
from llm4gen_lite.adapter import trim_padding  # noqa: E402

RESULTS = BENCH / "results.json"
DOCS = REPO / "docs" / "BENCHMARKS.md"
BEGIN, END = "<!-- results:begin (written by bench/run_all.py) -->", "<!-- results:end -->"


@dataclass(frozen=True)
class Sizes:
    """How much to measure."""

    presets: tuple[str, ...]  # UNet presets of the CAM-overhead comparison; the first is used everywhere else
    batch: int  # training batch of the ratio measurements
    warmup: int  # untimed calls of each configuration before the rounds
    repeats: int  # timed, interleaved rounds per comparison
    sample_batch: int  # prompts per sampling call
    sample_steps: int  # DDIM steps per sampling call
    growth_batches: tuple[int, ...]  # batch sizes of the growth table, at 32 px
    growth_batches_64px: tuple[int, ...]  # batch sizes of the growth table, at 64 px
    growth_repeats: int  # timed rounds of the growth table
    memory_steps: int  # training steps of the peak-memory job
    dense_batch: int  # dense captions per feature-extraction call


FULL = Sizes(("small", "tiny"), 32, 1, 5, 8, 4, (8, 16, 32, 64), (8,), 2, 2, 16)
QUICK = Sizes(("tiny",), 8, 1, 2, 2, 2, (4, 8), (4,), 1, 1, 4)
ENTITY_WEIGHT = 0.1  # λ_e of the entity-loss step: that of the reproduction's `cam_entity` row


# ----------------------------------------------------------------------------------------------
# timing
# ----------------------------------------------------------------------------------------------
def synchronizer(device: torch.device) -> Callable[[], None]:
    """Waits for queued device work (CUDA), so a wall-clock interval covers it."""
    return (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)


def interleaved(cases: dict[str, Callable[[], object]], warmup: int, repeats: int,
                sync: Callable[[], None]) -> dict[str, list[float]]:
    """Seconds per call of each case: `warmup` untimed calls each, then `repeats` rounds in
    alternating order (A B C, C B A, ...)."""
    names = list(cases)
    for _ in range(warmup):
        for name in names:
            cases[name]()
    sync()
    times: dict[str, list[float]] = {name: [] for name in names}
    for round_ in range(repeats):
        for name in names if round_ % 2 == 0 else names[::-1]:
            start = time.perf_counter()
            cases[name]()
            sync()
            times[name].append(time.perf_counter() - start)
    return times


def paired_ratio(times: dict[str, list[float]], a: str, b: str) -> float:
    """Median over rounds of `time(a) / time(b)` within the round."""
    return statistics.median(x / y for x, y in zip(times[a], times[b]))


class Report:
    """Ratios and context collected over the run."""

    def __init__(self) -> None:
        self.ratios: list[dict[str, Any]] = []

    def ratio(self, what: str, times: dict[str, list[float]], a: str, b: str, target: float | None = None,
              expect: str = "", note: str = "") -> float:
        value = paired_ratio(times, a, b)
        self.ratios.append({
            "what": what, "ratio": round(value, 3), "target": target,
            "met": None if target is None else value <= target, "expect": expect,
            "a": a, "a_median_s": round(statistics.median(times[a]), 4),
            "b": b, "b_median_s": round(statistics.median(times[b]), 4), "rounds": len(times[a]), "note": note,
        })
        print(f"  {what}: {value:.3f}  ({a} {statistics.median(times[a]):.3f} s, {b} "
              f"{statistics.median(times[b]):.3f} s)", flush=True)
        return value


# ----------------------------------------------------------------------------------------------
# the lite text side
# ----------------------------------------------------------------------------------------------
class LiteText:
    """Both lite encoders (ShapesCLIP, SmolLM2), their feature caches built in `root`, and the
    training data of the `quick` recipe twice: reading the caches, and without them."""

    def __init__(self, device: torch.device, batch: int, batches: int, min_prompts: int, root: Path) -> None:
        from llm4gen_lite.encoders import load_encoder
        from llm4gen_lite.feature_cache import FeatureCache
        from llm4gen_lite.train import TrainingData

        self.clip_encoder = load_encoder("shapesclip").to(device)
        self.llm_encoder = load_encoder("smollm2").to(device)
        config = bench_config(batch)
        self.plain, self.cached = TrainingData(config, 0, 1), TrainingData(config, 0, 1)
        texts = [t for i in range(batches) for t in self.plain.batch(i, self.generator(i)).texts]
        texts += self.plain.main.texts(range(min_prompts))
        self.captions = list(dict.fromkeys(["", *texts]))
        self.prompts = [c for c in self.captions if c]
        self.caches = {"clip": FeatureCache(self.clip_encoder, root), "llm": FeatureCache(self.llm_encoder, root)}
        for cache in self.caches.values():
            cache.build(self.captions, progress=False)
        self.cached.caches = self.caches

    @staticmethod
    def generator(micro_step: int) -> torch.Generator:
        """The guidance-dropout generator of micro-step `micro_step` (the same for both data paths)."""
        return torch.Generator().manual_seed(micro_step)

    @property
    def dims(self) -> tuple[int, int]:
        return self.clip_encoder.dim, self.llm_encoder.dim

    def features(self, captions: list[str]) -> tuple[TextFeatures, TextFeatures]:
        """Cached (clip, llm) features of `captions`: `[B, 77, d_clip]`, `[B, 256, d_llm]`."""
        return self.caches["clip"].get(captions), self.caches["llm"].get(captions)


# ----------------------------------------------------------------------------------------------
# the measurements
# ----------------------------------------------------------------------------------------------
def cam_overhead(text: LiteText, preset: str, sizes: Sizes, device: torch.device, precision: str,
                 sync: Callable[[], None], report: Report, reference: Callable[[], object] | None) -> dict[str, Any]:
    """Training step `cam` / `clip` on one batch (the adapter trims the cached LLM sequence to the
    batch's longest prompt); with `reference` (a matmul loop) also interleaved, for the hardware
    efficiency of the main preset."""
    from llm4gen_lite.train import TrainingData

    config = bench_config(sizes.batch).replace(entity_weight=ENTITY_WEIGHT)
    with_pairs = TrainingData(config, 0, 1)  # the same batch as text.cached's, its attribute-entity pairs filled in
    with_pairs.caches = text.caches
    batch = with_pairs.batch(0, text.generator(0))
    clip, llm = batch.clip, batch.llm
    used = trim_padding(llm.features, llm.mask)[1].shape[1]
    steps = {v: TrainStep(preset, v.split("+")[0], *text.dims, config, device, precision)
             for v in ("clip", "cam", "cam+entity")}
    cases: dict[str, Callable[[], object]] = {
        "clip": lambda: steps["clip"](clip, None),
        "cam": lambda: steps["cam"](clip, llm),
        "cam+entity": lambda: steps["cam+entity"](clip, llm, batch),
    }
    if reference is not None:
        cases["matmul"] = reference
    times = interleaved(cases, sizes.warmup, sizes.repeats, sync)
    where = f"{preset}, batch {sizes.batch}"
    report.ratio(f"training step cam / clip ({where})", times, "cam", "clip", target=1.15,
                 note=f"LLM positions cached {llm.mask.shape[1]}, used {used}")
    report.ratio(f"training step cam + entity loss / cam ({where})", times, "cam+entity", "cam",
                 note=f"λ_e = {ENTITY_WEIGHT}, {sum(map(len, batch.pairs))} attribute-entity pairs, maps of every "
                      "cross-attention layer")
    out: dict[str, Any] = {
        "preset": preset, "batch": sizes.batch, "median_s": {k: statistics.median(v) for k, v in times.items()},
        "llm_positions": llm.mask.shape[1], "llm_positions_used": used,
        "llm_real_tokens_mean": float(llm.mask.sum(1).float().mean()),
        "clip_real_tokens_mean": float(clip.mask.sum(1).float().mean()),
    }
    if reference is not None:
        out["times"] = times
        out["flops"] = {name: count_flops(fn) for name, fn in cases.items() if name != "matmul"}
        out["adapter_gflop"] = count_flops(lambda: steps["cam"].adapter_only(clip, llm))["total"] / 1e9
        out["time_share"] = time_by_category(cases["cam"], device)
    return out


def efficiency(overhead: dict[str, Any], reference_flops: int) -> dict[str, Any]:
    """Achieved FLOP/s of each training step as a fraction of the matmul's, paired per round."""
    times = overhead["times"]
    peak = [reference_flops / t for t in times["matmul"]]
    out: dict[str, Any] = {"matmul_gflops": statistics.median(peak) / 1e9, "steps": {}}
    for name, flops in overhead["flops"].items():
        rates = [flops["total"] / t for t in times[name]]
        out["steps"][name] = {
            "gflop_per_step": flops["total"] / 1e9,
            "gflops": statistics.median(rates) / 1e9,
            "fraction_of_matmul": statistics.median(r / p for r, p in zip(rates, peak)),
            "flop_share": {k: flops[k] / flops["total"] for k in CATEGORIES[:-1]},
        }
    step_s = statistics.median(times["cam"])
    cam = overhead["flops"]["cam"]
    out["cam_by_category"] = {
        k: {"time_share": share,
            "gflops": cam[k] / (share * step_s) / 1e9 if cam[k] and share > 0 else None}
        for k, share in overhead["time_share"].items()
    }
    return out


def feature_cache(text: LiteText, preset: str, sizes: Sizes, device: torch.device, precision: str,
                  sync: Callable[[], None], report: Report) -> dict[str, Any]:
    """Training step reading cached features vs running ShapesCLIP + SmolLM2 on the batch's captions.

    Both sides walk the same micro-batches (warm-up: 0, rounds: 1, 2, ...), rendering included.
    """
    step = TrainStep(preset, "cam", *text.dims, bench_config(sizes.batch), device, precision)
    feature_s: dict[str, list[float]] = {"cached": [], "encoded": []}
    position = {"cached": 0, "encoded": 0}

    def run(side: str) -> None:
        micro = position[side]
        position[side] += 1
        start = time.perf_counter()
        if side == "cached":
            batch = text.cached.batch(micro, text.generator(micro))
            clip, llm = batch.clip, batch.llm
        else:
            batch = text.plain.batch(micro, text.generator(micro))
            clip, llm = text.clip_encoder.encode(batch.texts), text.llm_encoder.encode(batch.texts)
        sync()
        feature_s[side].append(time.perf_counter() - start)
        step(clip, llm)

    times = interleaved({"encoded": lambda: run("encoded"), "cached": lambda: run("cached")},
                        sizes.warmup, sizes.repeats, sync)
    report.ratio(f"training step, encoders every step / feature cache ({preset}, cam, batch {sizes.batch})",
                 times, "encoded", "cached", expect="well above 1.5")
    timed = {side: values[sizes.warmup:] for side, values in feature_s.items()}
    report.ratio(f"text features alone, encoders / feature cache (short captions, batch {sizes.batch})", timed,
                 "encoded", "cached", note="data loading and rendering included on both sides")
    dense = dense_features(text, sizes, sync, report)
    return {"median_s": {k: statistics.median(v) for k, v in times.items()},
            "features_median_s": {k: statistics.median(v) for k, v in timed.items()}, "dense_median_s": dense}


def dense_features(text: LiteText, sizes: Sizes, sync: Callable[[], None], report: Report) -> dict[str, float]:
    """Features alone for one batch of dense captions (60-90 words): both encoders vs the cache."""
    from llm4gen_lite.encoders import PromptTruncatedWarning
    from llm4gen_lite.shapes import ShapesDataset

    captions = ShapesDataset(sizes.dense_batch, split="train", seed=0, dense_prob=1.0).texts()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PromptTruncatedWarning)  # dense captions exceed the CLIP role's 77 tokens
        for cache in text.caches.values():
            cache.build(captions, progress=False)  # also the encoders' warm-up
        times = interleaved({"encoded": lambda: (text.clip_encoder.encode(captions), text.llm_encoder.encode(captions)),
                             "cached": lambda: text.features(captions)}, 0, max(2, sizes.repeats - 2), sync)
    report.ratio(f"text features alone, encoders / feature cache (dense captions, batch {sizes.dense_batch})", times,
                 "encoded", "cached")
    return {k: statistics.median(v) for k, v in times.items()}


def sampling(text: LiteText, preset: str, sizes: Sizes, device: torch.device, precision: str,
             sync: Callable[[], None], report: Report) -> dict[str, Any]:
    """`clip` pipeline vs a plain diffusers CFG loop; LLM-guided (3 branches) vs CFG (2) on `cam`."""
    from llm4gen_lite.adapter import build_adapter
    from llm4gen_lite.unet import build_unet

    torch.manual_seed(0)
    unet = build_unet(preset).to(device).eval()
    config = bench_config(sizes.sample_batch)
    clip, llm = text.features(text.prompts[: sizes.sample_batch])
    null_clip, null_llm = text.features([""])
    size = unet.config.sample_size
    latents = torch.randn(sizes.sample_batch, 3, size, size, generator=torch.Generator().manual_seed(0)).to(device)
    setup = SamplingSetup(unet, config, clip, llm, null_clip, null_llm, latents, sizes.sample_steps)
    width = unet.config.cross_attention_dim
    adapters = {v: build_adapter(v, *text.dims, width).to(device).eval() for v in ("clip", "cam")}
    pipes = {v: make_pipeline(setup, a) for v, a in adapters.items()}

    def amp(fn: Callable[[], torch.Tensor]) -> Callable[[], torch.Tensor]:
        def run() -> torch.Tensor:
            with torch.no_grad(), autocast(device, precision):
                return fn()
        return run

    cases = {"pipeline": amp(lambda: pipeline_sample(pipes["clip"], setup)),
             "plain loop": amp(lambda: plain_sample(adapters["clip"], setup))}
    parity = float((cases["pipeline"]().float() - cases["plain loop"]().float()).abs().max())
    where = f"{preset}, {sizes.sample_batch} images, {sizes.sample_steps} DDIM steps"
    times = interleaved(cases, sizes.warmup, sizes.repeats, sync)
    report.ratio(f"sampling, LLM4GenPipeline (clip) / plain diffusers loop ({where})", times, "pipeline",
                 "plain loop", target=1.05, note=f"largest image difference {parity:.1e}")
    guided = interleaved({"LLM-guided": amp(lambda: pipeline_sample(pipes["cam"], setup, llm_guidance_scale=4.0)),
                          "CFG": amp(lambda: pipeline_sample(pipes["cam"], setup))},
                         sizes.warmup, sizes.repeats, sync)
    report.ratio(f"sampling, LLM-guided (3 branches) / CFG (2 branches) (cam, {where})", guided, "LLM-guided", "CFG",
                 expect="about 1.5")
    return {"parity_max_abs": parity,
            "median_s": {k: statistics.median(v) for k, v in {**times, **guided}.items()}}


def growth(text: LiteText, preset: str, sizes: Sizes, device: torch.device, precision: str,
           sync: Callable[[], None]) -> list[dict[str, Any]]:
    """Training-step time (`cam`) against batch size at 32 px and at 64 px, all interleaved."""
    configs = [(b, 32) for b in sizes.growth_batches] + [(b, 64) for b in sizes.growth_batches_64px]
    cases = {}
    for batch, resolution in configs:
        step = TrainStep(preset, "cam", *text.dims, bench_config(batch, resolution), device, precision)
        clip, llm = text.features(text.prompts[:batch])
        cases[f"batch {batch} @ {resolution} px"] = (lambda s=step, c=clip, f=llm: s(c, f))
    times = interleaved(cases, sizes.warmup, sizes.growth_repeats, sync)
    base = statistics.median(times[f"batch {configs[0][0]} @ 32 px"]) / configs[0][0]
    rows = []
    for (batch, resolution), name in zip(configs, cases):
        seconds = statistics.median(times[name])
        rows.append({"batch": batch, "resolution": resolution, "s_per_step": seconds, "s_per_image": seconds / batch,
                     "per_image_vs_first": seconds / batch / base})
        print(f"  {name}: {seconds:.3f} s/step, {seconds / batch * 1000:.1f} ms/image", flush=True)
    return rows


def peak_memory(text: LiteText, preset: str, sizes: Sizes, device: torch.device, precision: str,
                root: Path) -> dict[str, Any]:
    """Peak memory of importing, of training on cached features and of feature extraction, each in a
    fresh process (`bench/peak_memory.py`)."""
    spec = {
        "preset": preset, "batch": sizes.batch, "resolution": 32, "device": str(device),
        "mixed_precision": precision, "steps": sizes.memory_steps, "threads": torch.get_num_threads(),
        "captions": text.prompts[: sizes.batch], "cache_root": str(root),
        "encoders": {role: {"identity": e.identity, "dim": e.dim, "max_length": e.max_length}
                     for role, e in (("clip", text.clip_encoder), ("llm", text.llm_encoder))},
    }
    spec_file = root / "memory_spec.json"
    spec_file.write_text(json.dumps(spec))
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}
    out = {}
    for job in ("baseline", "train", "features"):
        proc = subprocess.run([sys.executable, str(BENCH / "peak_memory.py"), job, "--spec", str(spec_file)],
                              capture_output=True, text=True, env=env, cwd=REPO, timeout=1200)
        if proc.returncode != 0:
            raise RuntimeError(f"peak-memory job {job!r} failed:\n{proc.stderr[-3000:]}")
        out[job] = json.loads(proc.stdout.strip().splitlines()[-1])
        print(f"  {job}: peak RSS {out[job]['peak_rss_mb']:.0f} MiB", flush=True)
    return out


# ----------------------------------------------------------------------------------------------
# the run
# ----------------------------------------------------------------------------------------------
def machine_facts(device: torch.device, precision: str, quick: bool) -> dict[str, Any]:
    """What the numbers were measured on, and with which command."""
    import diffusers
    import transformers

    cpu = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        names = [ln.split(":", 1)[1].strip() for ln in cpuinfo.read_text().splitlines() if ln.startswith("model name")]
        cpu = names[0] if names else cpu
    python = os.path.relpath(sys.executable, REPO) if sys.executable.startswith(str(REPO)) else sys.executable
    return {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": shlex.join([python, os.path.relpath(__file__, REPO), *sys.argv[1:]]),
        "cpu": cpu, "logical_cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "device": device.type, "mixed_precision": precision, "quick": quick,
        "python": platform.python_version(), "torch": torch.__version__, "diffusers": diffusers.__version__,
        "transformers": transformers.__version__, "platform": platform.platform(),
        "load_average_start": [round(x, 2) for x in os.getloadavg()],
    }


def run_key(machine: dict[str, Any]) -> str:
    """Where a run is filed in results.json: one entry per machine, device, threads and precision."""
    threads = f"{machine['torch_threads']} thread{'s' if machine['torch_threads'] != 1 else ''}"
    parts = [machine["gpu"] or machine["cpu"], machine["device"], threads, machine["mixed_precision"]]
    return " · ".join(parts) + (" · quick" if machine["quick"] else "")


def markdown(key: str, record: dict[str, Any]) -> str:
    """The tables of one run."""
    m = record["machine"]
    lines = [f"### {key}", "",
             f"{m['date']}, `{m['command']}`; torch {m['torch']}, diffusers {m['diffusers']}, {m['logical_cpus']} "
             f"logical CPUs, load average {m['load_average_start'][0]} at the start and "
             f"{record['load_average_end'][0]} at the end; {record['wall_s'] / 60:.1f} min.", "",
             "| comparison | ratio | target | met | A: median | B: median | rounds |", "|---|---|---|---|---|---|---|"]
    for r in record["ratios"]:
        target = f"≤ {r['target']}" if r["target"] is not None else (r["expect"] and f"({r['expect']})") or "–"
        met = "–" if r["met"] is None else ("yes" if r["met"] else "**no**")
        note = f" — {r['note']}" if r["note"] else ""
        lines.append(f"| {r['what']}{note} | **{r['ratio']:.2f}** | {target} | {met} | {r['a']}: {r['a_median_s']:.3f} s "
                     f"| {r['b']}: {r['b_median_s']:.3f} s | {r['rounds']} |")
    eff = record["efficiency"]
    lines += ["", f"Hardware efficiency ({record['cam_overhead'][0]['preset']}, batch "
              f"{record['cam_overhead'][0]['batch']}): large {eff['matmul_dtype']} matmul "
              f"{eff['matmul_gflops']:.1f} GFLOP/s.", "",
              "| training step | GFLOP per step | GFLOP/s | fraction of matmul | FLOPs in conv / matmul / attention |",
              "|---|---|---|---|---|"]
    for name, s in eff["steps"].items():
        share = " / ".join(f"{100 * s['flop_share'][k]:.0f}%" for k in CATEGORIES[:-1])
        lines.append(f"| {name} | {s['gflop_per_step']:.1f} | {s['gflops']:.1f} | **{100 * s['fraction_of_matmul']:.0f}%** "
                     f"| {share} |")
    steps = eff["steps"]
    adapter = record["cam_overhead"][0]["adapter_gflop"]
    lines += ["", f"The `cam` step does {steps['cam']['gflop_per_step'] - steps['clip']['gflop_per_step']:.1f} GFLOP more "
              f"than `clip` ({steps['cam']['gflop_per_step'] / steps['clip']['gflop_per_step']:.2f}×); the CAM itself "
              f"(forward + backward) is {adapter:.3g} GFLOP of it, the rest is the UNet's cross-attention over the "
              "longer context."]
    lines += ["", "Where the `cam` step's time goes (profiler self time):", "",
              "| kind of op | share of step time | achieved GFLOP/s |", "|---|---|---|"]
    for k, v in eff["cam_by_category"].items():
        rate = "–" if v["gflops"] is None else f"{v['gflops']:.1f}"
        lines.append(f"| {k} | {100 * v['time_share']:.0f}% | {rate} |")
    lines += ["", "Growth (`cam`, training step):", "", "| batch | resolution | s / step | ms / image | per image vs first row |",
              "|---|---|---|---|---|"]
    for g in record["growth"]:
        lines.append(f"| {g['batch']} | {g['resolution']} px | {g['s_per_step']:.2f} | {1000 * g['s_per_image']:.1f} "
                     f"| {g['per_image_vs_first']:.2f} |")
    mem = record["memory"]
    cuda = any(j["cuda_peak_mb"] for j in mem.values())
    lines += ["", "Peak memory, each job in a fresh process:", "",
              "| job | peak RSS |" + (" peak CUDA memory |" if cuda else ""), "|---|---|" + ("---|" if cuda else "")]
    labels = {"baseline": "import torch, diffusers, llm4gen_lite (the floor)",
              "train": f"{record['memory_train_job']} on cached features (no encoder loaded)",
              "features": f"load ShapesCLIP + SmolLM2, encode {record['cam_overhead'][0]['batch']} captions"}
    for job, values in mem.items():
        extra = f" {values['cuda_peak_mb']:.0f} MiB |" if cuda and values["cuda_peak_mb"] is not None else (" – |" if cuda else "")
        lines.append(f"| {labels[job]} | {values['peak_rss_mb']:.0f} MiB |{extra}")
    return "\n".join(lines) + "\n"


def write_docs(path: Path, runs: dict[str, Any]) -> None:
    """Replace the text between the result markers of `path` with the tables of every full run."""
    tables = "\n".join(markdown(k, r) for k, r in runs.items())
    block = f"{BEGIN}\n\n{tables}\n{END}"
    text = path.read_text() if path.is_file() else f"# Benchmarks\n\n{BEGIN}\n{END}\n"
    if BEGIN not in text or END not in text:
        raise ValueError(f"{path} lacks the result markers {BEGIN!r} ... {END!r}; put them back where the tables go")
    head, rest = text.split(BEGIN, 1)
    path.write_text(head + block + rest.split(END, 1)[1])


def _stop(signum: int, frame: object) -> None:
    """SIGTERM ends the run like Ctrl-C: children are stopped and temporary folders removed."""
    raise SystemExit(f"stopped by signal {signum}; completed sections are kept in the results file")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small sizes, tiny UNet, one or two rounds: a sanity run")
    parser.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:N or auto")
    parser.add_argument("--mixed-precision", choices=["no", "bf16"], default="no", help="bf16 autocast for every step")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (default 1: on a machine busier than its cores one thread is faster, "
                             "see docs/ENCODERS.md); 0 = torch's default")
    parser.add_argument("--out", type=Path, help=f"results file (default {RESULTS.relative_to(REPO)}; none for --quick)")
    parser.add_argument("--docs", type=Path, help=f"docs page (default {DOCS.relative_to(REPO)}; none for --quick)")
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, _stop)
    out = args.out or (None if args.quick else RESULTS)
    docs = args.docs or (None if args.quick else DOCS)

    from llm4gen_lite.paths import resolve_device

    device = resolve_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    sizes = QUICK if args.quick else FULL
    main_preset = sizes.presets[0]
    sync = synchronizer(device)
    machine = machine_facts(device, args.mixed_precision, args.quick)
    key = run_key(machine)
    print(f"{key}\nload average {machine['load_average_start']}", flush=True)
    started = time.perf_counter()
    report = Report()
    record: dict[str, Any] = {"machine": machine, "sizes": asdict(sizes)}

    def save(complete: bool) -> dict[str, Any]:
        """File the record in `out` after every section: under `key` once complete, before that under
        `key · incomplete`, so a run stopped midway keeps what it measured and never replaces a full one."""
        results = json.loads(out.read_text()) if out is not None and out.is_file() else {"runs": {}}
        results["runs"].pop(f"{key} · incomplete", None)
        results["runs"][key if complete else f"{key} · incomplete"] = {**record, "ratios": report.ratios}
        if out is not None:
            atomic_write_json(out, results)
        return results

    with tempfile.TemporaryDirectory(prefix="llm4gen-bench-") as tmp:
        print("encoders and feature caches ...", flush=True)
        batches = sizes.warmup + sizes.repeats
        text = LiteText(device, sizes.batch, batches, max(sizes.growth_batches + (sizes.sample_batch,)), Path(tmp))
        matmul_dtype = torch.bfloat16 if args.mixed_precision == "bf16" else torch.float32
        size, calls = (8192, 20) if device.type == "cuda" else (2048, 3)
        product = matmul_reference(device, matmul_dtype, size)
        reference_flops = calls * 2 * size**3

        def reference() -> None:
            for _ in range(calls):
                product()

        record["cam_overhead"] = []
        for preset in sizes.presets:
            print(f"CAM overhead ({preset}) ...", flush=True)
            record["cam_overhead"].append(cam_overhead(text, preset, sizes, device, args.mixed_precision, sync, report,
                                                       reference if preset == main_preset else None))
            save(complete=False)
        main_overhead = record["cam_overhead"][0]
        record["efficiency"] = {"matmul_dtype": str(matmul_dtype).replace("torch.", ""), "matmul_size": size,
                                **efficiency(main_overhead, reference_flops)}
        del main_overhead["times"]
        print(f"  achieved / matmul: " + ", ".join(
            f"{k} {100 * v['fraction_of_matmul']:.0f}%" for k, v in record["efficiency"]["steps"].items()), flush=True)
        print("feature cache ...", flush=True)
        record["feature_cache"] = feature_cache(text, main_preset, sizes, device, args.mixed_precision, sync, report)
        save(complete=False)
        print("sampling ...", flush=True)
        record["sampling"] = sampling(text, main_preset, sizes, device, args.mixed_precision, sync, report)
        save(complete=False)
        print("growth ...", flush=True)
        record["growth"] = growth(text, main_preset, sizes, device, args.mixed_precision, sync)
        save(complete=False)
        print("peak memory ...", flush=True)
        record["memory"] = peak_memory(text, main_preset, sizes, device, args.mixed_precision, Path(tmp))
        record["memory_train_job"] = (f"{sizes.memory_steps} training step{'s' if sizes.memory_steps > 1 else ''} "
                                      f"({main_preset}, batch {sizes.batch})")
    record["load_average_end"] = [round(x, 2) for x in os.getloadavg()]
    record["wall_s"] = time.perf_counter() - started
    results = save(complete=True)
    print("\n" + markdown(key, results["runs"][key]))
    if out is not None:
        print(f"wrote {out}")
    if docs is not None:
        shown = {k: r for k, r in results["runs"].items()
                 if not k.endswith("· incomplete") and (not r["machine"]["quick"] or k == key)}
        write_docs(docs, shown)
        print(f"wrote {docs}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
