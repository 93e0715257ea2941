"""Shared test fixtures: tiny random Hugging Face models saved as local folders, a model-free
deterministic `TextEncoder`, and an isolated cache directory.

The tiny folders are built once per session with `save_pretrained`, so tests load them through the
same `load_encoder(path, ...)` code path a user's real SD1.5 / Llama / T5 folder goes through.
"""
from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Sequence
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"  # tests never reach a hub, whatever the shell says

import pytest  # noqa: E402
import torch  # noqa: E402

from llm4gen_lite.encoders import TextEncoder, TextFeatures, check_prompts, report_truncation  # noqa: E402
from llm4gen_lite.tiny_models import TINY_HIDDEN, write_tiny_clip_text, write_tiny_llama, write_tiny_t5  # noqa: E402,F401

# Test models are tiny: a second torch thread gains nothing, and on a machine busier than its cores
# it costs up to 20x (one OpenMP thread spins while its partner is descheduled; see ENCODERS.md).
torch.set_num_threads(1)

@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory) -> Path:
    """A random 2-layer `LlamaForCausalLM` (hidden 32) + a BPE tokenizer that adds no BOS itself."""
    return write_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def tiny_t5_dir(tmp_path_factory) -> Path:
    """A random 2-layer T5 checkpoint (encoder + decoder, d_model 32) + a tokenizer appending `</s>`."""
    return write_tiny_t5(tmp_path_factory.mktemp("tiny-t5"))


@pytest.fixture(scope="session")
def tiny_clip_text_dir(tmp_path_factory) -> Path:
    """An SD1.5-layout folder: `text_encoder/` (random 2-layer `CLIPTextModel`) and `tokenizer/`."""
    return write_tiny_clip_text(tmp_path_factory.mktemp("tiny-sd"))


class HashEncoder(TextEncoder):
    """Model-free `TextEncoder`: one token per whitespace word plus a leading BOS, each token's
    feature a deterministic function of (word, position, seed). Fast stand-in for cache tests."""

    def __init__(self, dim: int = 8, max_length: int = 12, seed: int = 0) -> None:
        self.dim, self.max_length, self.seed = dim, max_length, seed
        self.identity = f"hash:dim={dim}:max_length={max_length}:seed={seed}"
        self.tokenizer = str.split
        self.calls: list[list[str]] = []  # every encode() batch, for asserting what was computed

    def to(self, device: str | torch.device) -> HashEncoder:
        return self

    def _vector(self, word: str, position: int) -> torch.Tensor:
        digest = hashlib.sha256(f"{self.seed}:{position}:{word}".encode()).digest()
        return torch.tensor(list((digest * (self.dim // 32 + 1))[: self.dim]), dtype=torch.float32) / 64.0 - 2.0

    def encode(self, prompts: Sequence[str]) -> TextFeatures:
        prompts = check_prompts(prompts)
        self.calls.append(prompts)
        words = [[(m.start(), m.end(), m.group()) for m in re.finditer(r"\S+", p)] for p in prompts]
        truncated = report_truncation("hash", prompts, [len(w) + 1 for w in words], self.max_length)
        features = torch.zeros(len(prompts), self.max_length, self.dim)
        mask = torch.zeros(len(prompts), self.max_length, dtype=torch.bool)
        offsets = []
        for row, row_words in enumerate(words):
            kept = [(0, 0, "<bos>")] + row_words[: self.max_length - 1]
            for pos, (_, _, word) in enumerate(kept):
                features[row, pos] = self._vector(word, pos)
            mask[row, : len(kept)] = True
            spans = [(0, 0)] + [(a, b) for a, b, _ in kept[1:]]
            offsets.append(spans + [(0, 0)] * (self.max_length - len(spans)))
        return TextFeatures(features, mask, offsets, truncated)


@pytest.fixture
def hash_encoder() -> HashEncoder:
    return HashEncoder()


@pytest.fixture
def isolated_cache(tmp_path, monkeypatch) -> Path:
    """Point `paths.cache_dir()` at a fresh temporary folder for one test."""
    root = tmp_path / "cache"
    monkeypatch.setenv("LLM4GEN_CACHE", str(root))
    return root
