"""Peak memory of one job, measured in a fresh process (run by `bench/run_all.py`, one job per process).

    python bench/peak_memory.py baseline                      # imports only: the floor of every job
    python bench/peak_memory.py train --spec spec.json        # training steps on cached features
    python bench/peak_memory.py features --spec spec.json     # load both encoders, encode one batch

`spec.json` holds the job's settings (preset, batch, resolution, device, mixed precision, captions,
and for `train` the feature cache root and the cached encoders' identities). The last line printed
is JSON: `{"job": ..., "peak_rss_mb": ..., "cuda_peak_mb": ...}`. Peak RSS is the kernel's
high-water mark (`VmHWM` in /proc/self/status; `ru_maxrss` where there is no /proc).
"""
from __future__ import annotations

import argparse
import json
import resource
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from llm4gen_lite.encoders import TextEncoder, TextFeatures  # noqa: E402


def peak_rss_mb() -> float:
    """This process's peak resident set size in MiB."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024


class CachedOnly(TextEncoder):
    """Stands in for an encoder whose features are all cached: `FeatureCache` needs only its
    identity, dim and max_length, so a training job never holds the encoder's weights."""

    def __init__(self, identity: str, dim: int, max_length: int) -> None:
        self.identity, self.dim, self.max_length, self.tokenizer = identity, dim, max_length, None

    def encode(self, prompts: list[str]) -> TextFeatures:
        raise RuntimeError(f"{self.identity}: a caption is missing from the feature cache")

    def to(self, device: str | torch.device) -> CachedOnly:
        return self


def train_job(spec: dict[str, Any]) -> None:
    """`spec["steps"]` training steps (`cam`) reading a batch of cached features each step."""
    from llm4gen_lite.feature_cache import FeatureCache
    from workloads import TrainStep, bench_config

    caches = {role: FeatureCache(CachedOnly(**spec["encoders"][role]), root=spec["cache_root"])
              for role in ("clip", "llm")}
    captions = spec["captions"][: spec["batch"]]
    device = torch.device(spec["device"])
    config = bench_config(spec["batch"], spec["resolution"])
    step = TrainStep(spec["preset"], "cam", caches["clip"].encoder.dim, caches["llm"].encoder.dim, config, device,
                     spec["mixed_precision"])
    for _ in range(spec["steps"]):
        step(caches["clip"].get(captions), caches["llm"].get(captions)).item()


def features_job(spec: dict[str, Any]) -> None:
    """Load the lite encoders and encode one batch of captions."""
    from llm4gen_lite.encoders import load_encoder

    captions = spec["captions"][: spec["batch"]]
    for name in ("shapesclip", "smollm2"):
        load_encoder(name).to(spec["device"]).encode(captions)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("job", choices=["baseline", "train", "features"])
    parser.add_argument("--spec", type=Path, help="JSON file with the job's settings (train, features)")
    args = parser.parse_args()
    spec = json.loads(args.spec.read_text()) if args.spec else {}
    torch.set_num_threads(spec.get("threads") or torch.get_num_threads())
    if args.job == "baseline":
        import diffusers  # noqa: F401

        import llm4gen_lite.train  # noqa: F401
    elif args.job == "train":
        train_job(spec)
    else:
        features_job(spec)
    cuda = torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None
    print(json.dumps({"job": args.job, "peak_rss_mb": round(peak_rss_mb(), 1),
                      "cuda_peak_mb": None if cuda is None else round(cuda, 1)}))


if __name__ == "__main__":
    main()
