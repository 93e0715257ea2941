"""Tiny, randomly initialised text models saved in the real folder layouts.

They exercise the real-model code paths offline (tests, and notebook 10's smoke mode): a Llama
causal LM, a T5 checkpoint and an SD1.5-layout CLIP text encoder, each with a small tokenizer,
written with `save_pretrained` and loaded back through `encoders.load_encoder` like real ones.
(`unet.write_tiny_sd15` writes the matching UNet/VAE/scheduler.)
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

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


def write_tiny_llama(out: str | Path) -> Path:
    """A random 2-layer `LlamaForCausalLM` (hidden 32) + a BPE tokenizer that adds no BOS itself."""
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    out = Path(out)
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


def write_tiny_t5(out: str | Path) -> Path:
    """A random 2-layer T5 checkpoint (encoder + decoder, d_model 32) + a tokenizer appending `</s>`."""
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast, T5Config, T5ForConditionalGeneration

    out = Path(out)
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


def write_tiny_clip_text(out: str | Path) -> Path:
    """An SD1.5-layout folder: `text_encoder/` (random 2-layer `CLIPTextModel`, hidden 32) and
    `tokenizer/` (SD1.5's file layout: vocab.json + merges.txt over byte-level characters plus a few
    word merges, and a tokenizer_config.json naming `CLIPTokenizer`)."""
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import AutoTokenizer, CLIPTextConfig, CLIPTextModel

    out = Path(out)
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
    tok_dir.mkdir(parents=True, exist_ok=True)
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
