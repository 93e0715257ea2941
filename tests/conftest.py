"""Shared test fixtures: tiny random Hugging Face models saved as local folders, a model-free
deterministic `TextEncoder`, and an isolated cache directory.

The tiny folders are built once per session with `save_pretrained`, so tests load them through the
same `load_encoder(path, ...)` code path a user's real SD1.5 / Llama / T5 folder goes through.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Sequence
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"  # tests never reach a hub, whatever the shell says

import pytest  # noqa: E402
import torch  # noqa: E402

from llm4gen_lite.encoders import TextEncoder, TextFeatures, check_prompts, report_truncation  # noqa: E402

# Test models are tiny: a second torch thread gains nothing, and on a machine busier than its cores
# it costs up to 20x (one OpenMP thread spins while its partner is descheduled; see ENCODERS.md).
torch.set_num_threads(1)

CORPUS = [
    "a small red circle left of a large blue square",
    "two green triangles above an outline yellow diamond",
    "a filled purple square below a small orange circle",
    "one large cyan diamond and a red triangle on the right",
    "an outline blue circle, a filled green square, and a small yellow triangle",
]
TINY_HIDDEN = 32  # hidden size of every tiny model
TINY_LAYERS = 2  # blocks of every tiny model


def _byte_bpe(specials: list[str]):
    """A byte-level BPE tokenizer trained on CORPUS (no post-processing, like SmolLM2's)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS * 4, trainer)
    return tok


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory) -> Path:
    """A random 2-layer `LlamaForCausalLM` (hidden 32) + a BPE tokenizer that adds no BOS itself."""
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    out = tmp_path_factory.mktemp("tiny-llama")
    tok = PreTrainedTokenizerFast(
        tokenizer_object=_byte_bpe(["<unk>", "<s>", "</s>"]), unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )
    config = LlamaConfig(
        vocab_size=len(tok), hidden_size=TINY_HIDDEN, intermediate_size=64, num_hidden_layers=TINY_LAYERS,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_t5_dir(tmp_path_factory) -> Path:
    """A random 2-layer T5 checkpoint (encoder + decoder, d_model 32) + a tokenizer appending `</s>`."""
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast, T5Config, T5ForConditionalGeneration

    out = tmp_path_factory.mktemp("tiny-t5")
    backend = _byte_bpe(["<pad>", "</s>", "<unk>"])
    backend.post_processor = processors.TemplateProcessing(
        single="$A </s>", special_tokens=[("</s>", backend.token_to_id("</s>"))]
    )
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")
    config = T5Config(
        vocab_size=len(tok), d_model=TINY_HIDDEN, d_kv=8, d_ff=64, num_layers=TINY_LAYERS, num_heads=4,
        pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, decoder_start_token_id=tok.pad_token_id,
    )
    torch.manual_seed(0)
    T5ForConditionalGeneration(config).save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_clip_text_dir(tmp_path_factory) -> Path:
    """An SD1.5-layout folder: `text_encoder/` (random 2-layer `CLIPTextModel`, hidden 32) and
    `tokenizer/` (SD1.5's file layout: vocab.json + merges.txt over byte-level characters plus a few
    word merges, and a tokenizer_config.json naming `CLIPTokenizer`)."""
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import AutoTokenizer, CLIPTextConfig, CLIPTextModel

    out = tmp_path_factory.mktemp("tiny-sd")
    chars = sorted(ByteLevel.alphabet())
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": len(chars) + i for i, c in enumerate(chars)})
    merges = []
    for word in ("red", "blue", "circle", "square"):  # merge left to right: r+e, re+d</w>, ...
        parts = list(word[:-1]) + [word[-1] + "</w>"]
        while len(parts) > 1:
            merges.append(f"{parts[0]} {parts[1]}")
            vocab.setdefault(parts[0] + parts[1], len(vocab))
            parts = [parts[0] + parts[1]] + parts[2:]
    for special in ("<|startoftext|>", "<|endoftext|>"):
        vocab[special] = len(vocab)
    tok_dir = out / "tokenizer"
    tok_dir.mkdir()
    (tok_dir / "vocab.json").write_text(json.dumps(vocab))
    (tok_dir / "merges.txt").write_text("#version: 0.2\n" + "\n".join(dict.fromkeys(merges)) + "\n")
    (tok_dir / "tokenizer_config.json").write_text(
        json.dumps({"tokenizer_class": "CLIPTokenizer", "model_max_length": 77, "pad_token": "<|endoftext|>"})
    )
    tok = AutoTokenizer.from_pretrained(str(tok_dir))
    config = CLIPTextConfig(
        vocab_size=len(vocab), hidden_size=TINY_HIDDEN, intermediate_size=64, num_hidden_layers=TINY_LAYERS,
        num_attention_heads=4, max_position_embeddings=77, projection_dim=TINY_HIDDEN,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(0)
    CLIPTextModel(config).save_pretrained(out / "text_encoder")
    return out


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
