"""The training loop: frozen encoders (features cached up front) → adapter → UNet, on Accelerate.

    from llm4gen_lite.config import load_config
    from llm4gen_lite.train import train
    pipeline_dir = train(load_config("quick"))

Runs unchanged on one CPU, under `torchrun --nproc_per_node N` / `accelerate launch` (each process
takes its own deterministic shard of every global batch), with mixed precision and on GPUs. A run
folder (`output_dir`) holds `config.json`, `metrics.jsonl`, `loss_curve.png`, validation grids
and scores, `checkpoints/step_*/` (exact resume) and, at the end, `pipeline/`: a saved
`LLM4GenPipeline` with the EMA weights.
"""
from __future__ import annotations

import contextlib
import functools
import io
import json
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from diffusers import DDIMScheduler, DDPMScheduler, UNet2DConditionModel
from matplotlib.figure import Figure
from torch import nn
from tqdm.auto import tqdm

from .adapter import ConditioningAdapter, build_adapter
from .attention import capture_cross_attention, cross_attention_layers
from .checkpoint import (
    capture_rng_state, list_checkpoints, load_checkpoint, resolve_checkpoint, restore_rng_state, save_checkpoint,
)
from .config import TrainConfig
from .encoders import load_encoder
from .evaluate import compbench_report
from .feature_cache import FeatureCache
from .io import atomic_write_bytes, atomic_write_json, load_safetensors
from .pipeline import LLM4GenPipeline
from .shapes import ImageFolderDataset, ShapesDataset, load_prompt_set
from .unet import PRESETS, SD15_HUB_ID, PixelShuffleAutoencoder, load_sd15, to_model_space
from .viz import image_grid
from .losses import caption_pairs, diffusion_loss, diffusion_target, entity_loss, merge_token_pairs, token_pairs

NUM_TRAIN_TIMESTEPS = 1000
ITEM_CACHE_LIMIT = 16_384  # training datasets up to this many items keep their rendered items in memory


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; the run stopped before the bad update was applied."""


# ----------------------------------------------------------------------------------------------
# model pieces
# ----------------------------------------------------------------------------------------------
class Denoiser(nn.Module):
    """The trained parts as one module (one DDP wrapper, one EMA, one state dict): adapter → UNet."""
    def __init__(self, unet: nn.Module, adapter: ConditioningAdapter) -> None:
        super().__init__()
        self.unet = unet
        self.adapter = adapter

    def forward(
        self,
        sample: torch.Tensor,
        timesteps: torch.Tensor,
        clip_states: torch.Tensor | None,
        clip_mask: torch.Tensor | None,
        llm_states: torch.Tensor | None,
        llm_mask: torch.Tensor | None,
        drop_llm: torch.Tensor,
    ) -> torch.Tensor:
        """Predict the diffusion target.

        Args:
            sample: noisy images/latents `[batch, channels, h, w]`; timesteps `[batch]` long.
            clip_states, llm_states: `[batch, tokens, dim]` frozen features (None when unused).
            clip_mask, llm_mask: `[batch, tokens]` bool; drop_llm: `[batch]` bool.
        Returns:
            `[batch, channels, h, w]` prediction (ε or v).
        """
        cond = self.adapter(clip_states, clip_mask, llm_states, llm_mask, drop_llm=drop_llm)
        return self.unet(sample, timesteps, **cond.unet_kwargs()).sample


def build_unet(config: TrainConfig) -> tuple[nn.Module, nn.Module | None]:
    """The UNet and, for latent models, its frozen (auto)encoder, named by `config.unet`.

    `tiny` / `small` are built from `unet.PRESETS` with `config.unet_overrides` applied, on pixels
    or, with `space_to_depth` f > 1 or a pixel shift/scale, on `PixelShuffleAutoencoder` latents; `sd15` or a folder loads
    a Stable Diffusion 1.5-layout checkpoint and its VAE (`unet.load_sd15`).
    """
    if config.unet in PRESETS:
        info, f = PRESETS[config.unet], config.space_to_depth
        if config.resolution % f:
            raise ValueError(f"resolution {config.resolution} is not divisible by space_to_depth={f}")
        channels = info.in_channels * f * f
        kwargs: dict[str, Any] = dict(
            sample_size=config.resolution // f, in_channels=channels, out_channels=channels,
            cross_attention_dim=info.cross_attention_dim, **info.unet_config,
        )
        kwargs.update({k: tuple(v) if isinstance(v, list) else v for k, v in config.unet_overrides.items()})
        try:
            unet = UNet2DConditionModel(**kwargs)
        except (TypeError, ValueError) as err:
            raise ValueError(f"unet_overrides {config.unet_overrides} do not build a UNet: {err}") from err
        if config.init_unet:
            init_unet_weights(unet, Path(config.init_unet))
        plain = f == 1 and config.pixel_shift == 0 and config.pixel_scale == 1
        vae = None if plain else PixelShuffleAutoencoder(
            f, info.in_channels, scaling_factor=config.pixel_scale, shift_factor=config.pixel_shift)
        return unet, vae
    if (config.unet_overrides or config.init_unet or config.space_to_depth > 1 or config.pixel_shift != 0
            or config.pixel_scale != 1):
        raise ValueError(
            "unet_overrides, init_unet, space_to_depth, pixel_shift and pixel_scale apply to the built presets "
            "(tiny, small), not to a loaded UNet")
    parts = load_sd15(SD15_HUB_ID if config.unet == "sd15" else config.unet)
    parts.vae.requires_grad_(False).eval()
    return parts.unet, parts.vae


def init_unet_weights(unet: nn.Module, source: Path) -> None:
    """Start `unet` from a saved UNet's weights (a model pretrained on another conditioning, as
    LLM4GEN starts from Stable Diffusion). `source`: a pipeline folder (its `unet/`) or a UNet folder.

    Raises:
        ValueError: naming `source`, when it holds no UNet or one of another architecture.
    """
    weights = "diffusion_pytorch_model.safetensors"
    file = source / "unet" / weights if (source / "unet" / weights).is_file() else source / weights
    if not file.is_file():
        raise ValueError(f"init_unet={source}: no saved UNet there (no {source}/unet/{weights}); pass a trained "
                         "pipeline folder, e.g. runs/full/clip/pipeline or data/checkpoints/clip/pipeline")
    try:
        unet.load_state_dict(load_safetensors(file))  # copied into the built UNet's fp32 parameters
    except RuntimeError as err:
        first = (str(err).splitlines()[1:] or [str(err)])[0].strip()[:200]
        raise ValueError(f"init_unet={source}: its UNet is not the one this config builds; unet, unet_overrides and "
                         f"space_to_depth must be those of the run that saved it ({first})") from err


def noise_scheduler_config(config: TrainConfig) -> dict[str, Any]:
    """Scheduler arguments shared by training (DDPM) and sampling (DDIM)."""
    return dict(
        num_train_timesteps=NUM_TRAIN_TIMESTEPS,
        beta_schedule=config.beta_schedule,
        prediction_type=config.prediction_type,
        rescale_betas_zero_snr=config.zero_terminal_snr,
        timestep_spacing="trailing" if config.zero_terminal_snr else "leading",
        clip_sample=False,
    )


def sampling_scheduler(config: TrainConfig):
    """The DDIM scheduler saved with the pipeline (same betas and target as training)."""
    extra = {"set_alpha_to_one": False, "steps_offset": 0 if config.zero_terminal_snr else 1}
    return DDIMScheduler(**noise_scheduler_config(config), **extra)


def select_trainable(model: Denoiser, train_unet: str) -> list[nn.Parameter]:
    """Freeze what does not train; return the trained parameters (adapter + UNet or its cross-attention)."""
    model.adapter.requires_grad_(True)
    if train_unet == "all":
        model.unet.requires_grad_(True)
    else:
        model.unet.requires_grad_(False)
        modules = dict(model.unet.named_modules())
        for name in cross_attention_layers(model.unet):
            modules[name].requires_grad_(True)
    return [p for p in model.parameters() if p.requires_grad]


class EMA:
    """Exponential moving average of named parameters, warmed up as `min(decay, (1+n)/(10+n))`."""
    def __init__(self, named: dict[str, nn.Parameter], decay: float) -> None:
        self.decay = decay
        self.updates = 0
        self.shadow = {name: p.detach().clone().float() for name, p in named.items()}

    @torch.no_grad()
    def update(self, named: dict[str, nn.Parameter]) -> None:
        """Move the shadow weights towards the current ones."""
        self.updates += 1
        decay = min(self.decay, (1 + self.updates) / (10 + self.updates))
        torch._foreach_lerp_(list(self.shadow.values()), [named[n].detach().float() for n in self.shadow], 1 - decay)

    def state_dict(self) -> dict[str, Any]:
        return {"updates": self.updates, "shadow": self.shadow}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        missing = set(self.shadow) ^ set(state["shadow"])
        if missing:
            raise ValueError(f"EMA state does not fit this model (differs in {sorted(missing)[:3]} ...)")
        self.updates = int(state["updates"])
        self.shadow = {k: v.float().clone() for k, v in state["shadow"].items()}

    @contextlib.contextmanager
    def swapped_into(self, named: dict[str, nn.Parameter]) -> Iterator[None]:
        """Temporarily load the EMA weights into the parameters (restored on exit)."""
        backup = {name: p.detach().clone() for name, p in named.items()}
        with torch.no_grad():
            for name, p in named.items():
                p.copy_(self.shadow[name])
        try:
            yield
        finally:
            with torch.no_grad():
                for name, p in named.items():
                    p.copy_(backup[name])


def lr_lambda(step: int, config: TrainConfig) -> float:
    """LR multiplier after `step` optimiser steps: linear warm-up, then cosine to 0 or constant."""
    if step < config.warmup_steps:
        return (step + 1) / config.warmup_steps
    if config.lr_schedule == "constant":
        return 1.0
    progress = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def sample_timesteps(batch: int, config: TrainConfig, generator: torch.Generator) -> torch.Tensor:
    """Training timesteps `[batch]` in `[0, T)`: uniform, or `t/T = sigmoid(N(logit_mean, logit_std))`."""
    if config.timestep_sampling == "uniform":
        return torch.randint(0, NUM_TRAIN_TIMESTEPS, (batch,), generator=generator)
    u = torch.sigmoid(config.logit_mean + config.logit_std * torch.randn(batch, generator=generator))
    return (u * NUM_TRAIN_TIMESTEPS).long().clamp(0, NUM_TRAIN_TIMESTEPS - 1)


# ----------------------------------------------------------------------------------------------
# data
# ----------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=8)
def _epoch_permutation(size: int, seed: int, epoch: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch]).permutation(size)


def shard_indices(micro_step: int, batch_size: int, rank: int, world_size: int, dataset_size: int, seed: int) -> list[int]:
    """Dataset indices of one process's micro-batch.

    A deterministic stream: epoch e visits the items in the order `permutation(seed, e)`; global
    micro-batch m takes stream positions `[m·B·W, (m+1)·B·W)`, and rank r every W-th of them from
    offset r (as `DistributedSampler` interleaves). Any process, any resume gets the same items.
    """
    start = micro_step * batch_size * world_size
    out = []
    for k in range(batch_size):
        epoch, offset = divmod(start + rank + k * world_size, dataset_size)
        out.append(int(_epoch_permutation(dataset_size, seed, epoch)[offset]))
    return out


@dataclass
class TrainingBatch:
    """One process's micro-batch, features looked up from the cache."""
    images: torch.Tensor  # [batch, 3, H, W] in [-1, 1]
    texts: list[str]  # captions ("" where the text was dropped for guidance)
    pairs: list[list[tuple[tuple[int, int], tuple[int, int]]]]  # per row: (attribute span, entity span)
    clip: Any  # TextFeatures [batch, clip_tokens, clip_dim] or None
    llm: Any  # TextFeatures [batch, llm_tokens, llm_dim] or None
    drop_text: torch.Tensor  # [batch] bool: all text dropped
    drop_llm: torch.Tensor  # [batch] bool: LLM branch dropped


class TrainingData:
    """The datasets of a run (Shapes curriculum stage first, or an imagefolder) and their cached features."""
    def __init__(self, config: TrainConfig, rank: int, world_size: int) -> None:

        self.config, self.rank, self.world_size = config, rank, world_size
        if config.train_data == "shapes":
            self.main = ShapesDataset(
                config.dataset_size, image_size=config.resolution, split="train", seed=config.seed,
                dense_prob=config.dense_prob, n_objects=(config.min_objects, config.max_objects),
            )
        else:
            self.main = ImageFolderDataset(config.train_data, image_size=config.resolution)
        self.curriculum = (
            ShapesDataset(config.dataset_size, image_size=config.resolution, split="train", seed=config.seed + 1,
                          dense_prob=0.0, n_objects=1)
            if config.curriculum_steps > 0 else None
        )
        self.caches: dict[str, Any] = {}
        # rendered items, kept once seen: a Shapes item is a pure function of its index, and
        # re-rendering 32 of them every step cost ~23 ms of a ~0.3 s `tiny` step
        self._items: dict[tuple[int, int], dict] = {}

    def item(self, dataset, index: int) -> dict:
        """`dataset[index]`, memoised for datasets of at most `ITEM_CACHE_LIMIT` items."""
        if len(dataset) > ITEM_CACHE_LIMIT:
            return dataset[index]
        key = (id(dataset), index)
        if key not in self._items:
            self._items[key] = dataset[index]
        return self._items[key]

    def captions(self) -> list[str]:
        """Every caption the run can see (to precompute features), plus the empty prompt."""
        texts = [""] + self.main.texts()
        if self.curriculum is not None:
            texts += self.curriculum.texts()
        return list(dict.fromkeys(texts))

    def dataset_and_position(self, micro_step: int):
        """The dataset of this micro-step and the micro-step's position within its stage."""
        stage = self.config.curriculum_steps * self.config.grad_accum
        if self.curriculum is not None and micro_step < stage:
            return self.curriculum, micro_step
        return self.main, micro_step - (stage if self.curriculum is not None else 0)

    def batch(self, micro_step: int, generator: torch.Generator) -> TrainingBatch:
        """Micro-batch `micro_step` of this process; guidance dropout drawn from `generator`."""
        cfg = self.config
        dataset, position = self.dataset_and_position(micro_step)
        seed = getattr(dataset, "seed", cfg.seed)  # Shapes datasets carry their own seed
        indices = shard_indices(position, cfg.batch_size, self.rank, self.world_size, len(dataset), seed)
        items = [self.item(dataset, i) for i in indices]
        drop_text = torch.rand(len(items), generator=generator) < cfg.p_uncond
        drop_llm = (torch.rand(len(items), generator=generator) < cfg.p_llm) & ~drop_text
        texts = ["" if d else it["text"] for it, d in zip(items, drop_text.tolist())]
        pairs = [  # only the entity loss reads them
            [] if d or cfg.entity_weight == 0 else caption_pairs(it["caption"])
            for it, d in zip(items, drop_text.tolist())
        ]
        return TrainingBatch(
            images=torch.stack([it["pixel_values"] for it in items]),
            texts=texts,
            pairs=pairs,
            clip=self.caches["clip"].get(texts) if "clip" in self.caches else None,
            llm=self.caches["llm"].get(texts) if "llm" in self.caches else None,
            drop_text=drop_text,
            drop_llm=drop_llm,
        )


def load_encoders(config: TrainConfig) -> tuple[Any, Any]:
    """The frozen CLIP-role and LLM encoders the variant reads (None for a role it ignores)."""
    clip = load_encoder(config.clip_encoder, role="clip") if config.uses_clip else None
    llm_kwargs = {} if config.llm_layer is None else {"layer": config.llm_layer}
    llm = load_encoder(config.llm_encoder, role="llm", **llm_kwargs) if config.uses_llm else None
    return clip, llm


def build_feature_caches(
    config: TrainConfig,
    data: TrainingData,
    rows: list[dict],
    encoders: dict[str, Any],
    is_main: bool = True,
    barrier: Callable[[], None] = lambda: None,
) -> dict[str, Any]:
    """Encode every training and validation caption once (main process), then open the caches.

    Returns `{role: FeatureCache}` for the roles whose encoder is not None.
    """
    captions = list(dict.fromkeys(data.captions() + [r["prompt"] for r in rows]))
    caches = {}
    for role, encoder in encoders.items():
        if encoder is None:
            continue
        if is_main:
            computed = FeatureCache(encoder).build(captions, progress=True)
            print(f"{role} features: {len(captions)} captions, {computed} newly encoded ({encoder.identity})")
        barrier()
        caches[role] = FeatureCache(encoder)
    return caches


def cache_features(config: TrainConfig) -> dict[str, Any]:
    """Fill the feature caches a run of `config` reads (its training and validation captions, every
    encoder it has), in this process. A feature folder takes one writer at a time, so runs that
    start side by side are cached first, one after the other."""
    clip, llm = load_encoders(config)
    return build_feature_caches(config, TrainingData(config, 0, 1), validation_rows(config), {"clip": clip, "llm": llm})


# ----------------------------------------------------------------------------------------------
# validation
# ----------------------------------------------------------------------------------------------
def validation_rows(config: TrainConfig) -> list[dict]:
    """The fixed validation prompts: `validation_max_prompts` rows spread evenly over the set."""
    rows = load_prompt_set(config.validation_prompts)
    n = min(len(rows), config.validation_max_prompts)
    return [rows[i * len(rows) // n] for i in range(n)] if n else []


def make_pipeline(model: Denoiser, vae: nn.Module | None, config: TrainConfig, clip_encoder: Any, llm_encoder: Any):
    """An `LLM4GenPipeline` around the (unwrapped) trained modules."""
    return LLM4GenPipeline(
        unet=model.unet, scheduler=sampling_scheduler(config), adapter=model.adapter, vae=vae,
        clip_encoder=clip_encoder, llm_encoder=llm_encoder,
    )


@torch.no_grad()
def validate(pipeline, rows: list[dict], caches: dict[str, Any], config: TrainConfig, out_png: Path) -> dict[str, Any]:
    """Sample the validation prompts (fixed seed), save a grid, return CompBench-lite scores."""
    prompts = [r["prompt"] for r in rows]
    kwargs: dict[str, Any] = {}
    for role in ("clip", "llm"):
        if role in caches:
            kwargs[f"{role}_features"] = caches[role].get(prompts)
            kwargs[f"negative_{role}_features"] = caches[role].get([""])
    generator = torch.Generator().manual_seed(config.seed)
    images = pipeline(
        num_inference_steps=config.sample_steps, guidance_scale=config.guidance_scale, generator=generator,
        output_type="np", **kwargs,
    ).images
    save_grid(images, prompts, out_png, title=f"{config.variant}, CFG {config.guidance_scale}")
    report = compbench_report(images, rows)
    return {"scores": report["scores"], "full_match": report["full_match"], **(
        {"attributes": report["attributes"]} if "attributes" in report else {})}


# ----------------------------------------------------------------------------------------------
# the loop
# ----------------------------------------------------------------------------------------------
def _flatten_scores(report: dict[str, Any]) -> dict[str, float]:
    out = {f"score/{k}": v for k, v in report.get("scores", {}).items()}
    out.update({f"attr/{k}": v for k, v in report.get("attributes", {}).items() if k != "n"})
    return out


class _MetricsLog:
    """`metrics.jsonl` (one JSON record per line), written by the main process only."""
    def __init__(self, path: Path, enabled: bool, resume_step: int | None) -> None:
        self.path, self.enabled = path, enabled
        if enabled and resume_step is not None and path.is_file():  # drop records past the checkpoint
            kept = [ln for ln in path.read_text().splitlines() if ln.strip() and json.loads(ln)["step"] <= resume_step]
            atomic_write_bytes(path, ("\n".join(kept) + "\n" if kept else "").encode())
        elif enabled and resume_step is None:
            atomic_write_bytes(path, b"")

    def write(self, record: dict[str, Any]) -> None:
        if self.enabled:
            with self.path.open("a") as fh:
                fh.write(json.dumps(record) + "\n")

    def records(self) -> list[dict[str, Any]]:
        return [json.loads(ln) for ln in self.path.read_text().splitlines() if ln.strip()]


def _save_figure(fig, path: Path) -> None:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    atomic_write_bytes(path, buffer.getvalue())


def save_grid(images: Any, captions: list[str], path: Path, title: str | None = None) -> None:
    """Save sampled images `[batch, H, W, 3]` with their prompts as one PNG grid."""
    _save_figure(image_grid(images, captions, ncols=8, title=title), path)


def plot_loss_curve(records: list[dict[str, Any]], path: Path) -> None:
    """Training loss (and the entity term, when used) against step, from `metrics.jsonl` records."""
    train = [r for r in records if r.get("kind") == "train"]
    if not train:
        return
    fig = Figure(figsize=(6, 3.2))
    ax = fig.add_subplot()
    steps = [r["step"] for r in train]
    ax.plot(steps, [r["diffusion_loss"] for r in train], label="diffusion loss", lw=1)
    if any(r["entity_loss"] for r in train):
        ax.plot(steps, [r["entity_loss"] for r in train], label="entity loss (before λ_e)", lw=1)
    ax.set_xlabel("step")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    _save_figure(fig, path)


class Trainer:
    """One training run: set up from a config, then `run()`; `train(config)` is the short form.

    Holds the accelerator, data, frozen encoders and caches, the trained `Denoiser` (prepared for
    DDP), optimizer, LR schedule, EMA and the per-process training generator.
    """

    def __init__(self, config: TrainConfig) -> None:
        self.created = time.perf_counter()  # setup (models, feature cache) is timed from here to the first step
        if config.cpu_threads:
            torch.set_num_threads(config.cpu_threads)
        self.config = config
        self.accelerator = Accelerator(
            cpu=config.device == "cpu", mixed_precision=config.mixed_precision,
            gradient_accumulation_steps=config.grad_accum,
        )
        self.rank, self.world = self.accelerator.process_index, self.accelerator.num_processes
        self.is_main = self.accelerator.is_main_process
        self.run_dir = Path(config.output_dir)
        self.ckpt_root = self.run_dir / "checkpoints"
        if self.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            where = f"{self.world} process{'es' if self.world > 1 else ''}, {self.accelerator.device}"
            print(f"training config ({where}):\n{config.pretty()}")
            atomic_write_json(self.run_dir / "config.json", config.to_dict())

        # frozen encoders and their cached features (the main process builds, the others read)
        set_seed(config.seed)
        self.data = TrainingData(config, self.rank, self.world)
        self.clip_encoder, self.llm_encoder = load_encoders(config)
        self.rows = validation_rows(config)
        self.data.caches = build_feature_caches(
            config, self.data, self.rows, {"clip": self.clip_encoder, "llm": self.llm_encoder}, self.is_main,
            self.accelerator.wait_for_everyone,
        )

        # trained modules (identical initialisation on every process)
        set_seed(config.seed)
        unet, self.vae = build_unet(config)
        adapter = build_adapter(
            config.variant,
            clip_dim=self.clip_encoder.dim if self.clip_encoder is not None else 0,  # 0: unused by this variant
            llm_dim=self.llm_encoder.dim if self.llm_encoder is not None else 0,
            cross_attention_dim=unet.config.cross_attention_dim,
            num_heads=config.cam_heads,
            llm_scale=config.llm_scale,
        )
        model = Denoiser(unet, adapter)
        self.params = select_trainable(model, config.train_unet)
        self.named = {n: p for n, p in model.named_parameters() if p.requires_grad}
        if self.is_main:
            total = sum(p.numel() for p in model.parameters())
            print(f"trainable parameters: {sum(p.numel() for p in self.params) / 1e6:.2f}M of {total / 1e6:.2f}M")
        # fused: one kernel over all parameters (CPU and CUDA) instead of a Python loop per
        # tensor, which took ~28 ms of a ~0.3 s `tiny` step
        optimizer = torch.optim.AdamW(self.params, lr=config.lr, weight_decay=config.weight_decay, fused=True)
        self.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, functools.partial(lr_lambda, config=config))
        self.ema = EMA(self.named, config.ema_decay) if config.ema_decay > 0 else None
        self.noise_scheduler = DDPMScheduler(**noise_scheduler_config(config))
        self.alphas_cumprod = self.noise_scheduler.alphas_cumprod.to(self.accelerator.device)
        self.model, self.optimizer = self.accelerator.prepare(model, optimizer)
        if self.vae is not None:
            self.vae.to(self.accelerator.device)
        self.base = self.accelerator.unwrap_model(self.model)
        self.generator = torch.Generator().manual_seed(config.seed * 7919 + self.rank)

        # entity-guided loss: nothing is installed when λ_e = 0
        self.clip_tokens = self.clip_encoder.max_length if self.clip_encoder is not None else 0
        self.capture = (
            functools.partial(capture_cross_attention, self.base.unet, config.entity_layers or None, "last")
            if config.entity_weight > 0 else contextlib.nullcontext
        )
        self.start_step = 0
        self.resumed_from: Path | None = None

    # ------------------------------------------------------------------ state
    def restore(self, resume_from: str) -> None:
        """Load a checkpoint ("latest" or a folder) into every piece of state, RNGs included."""
        path = resolve_checkpoint(self.ckpt_root, resume_from)
        parts, rank_state = load_checkpoint(path, self.rank)
        missing = set(self.named) ^ set(parts["model"])
        if missing:
            raise ValueError(f"{path} holds weights for a different model (e.g. {sorted(missing)[:3]})")
        reshaped = [
            f"{name} {tuple(parts['model'][name].shape)} in the checkpoint, {tuple(p.shape)} in this model"
            for name, p in self.named.items() if parts["model"][name].shape != p.shape
        ]
        if reshaped:
            raise ValueError(
                f"{path / 'model.safetensors'} holds weights of another shape ({len(reshaped)} tensors, e.g. "
                f"{reshaped[0]}): it was trained with a different UNet/adapter config; resume with the run's own config"
            )
        if rank_state is None:
            raise ValueError(f"{path} has no RNG state for process {self.rank}; resume with the same number of processes")
        with torch.no_grad():
            for name, p in self.named.items():
                p.copy_(parts["model"][name])
        self.optimizer.load_state_dict(parts["optimizer"])
        self.lr_scheduler.load_state_dict(parts["lr_scheduler"])
        if self.ema is not None:
            self.ema.load_state_dict(parts["ema"])
        restore_rng_state(rank_state, {"train": self.generator})
        self.start_step, self.resumed_from = int(parts["progress"]["step"]), path
        if self.is_main:
            print(f"resumed from {path} at step {self.start_step}")

    def checkpoint(self, step: int) -> Path:
        """Write checkpoint `step` (every process takes part: each saves its RNG states)."""
        parts = {
            "model": {n: p.detach() for n, p in self.named.items()},
            "optimizer": self.optimizer.state_dict(),
            "lr_scheduler": self.lr_scheduler.state_dict(),
            "progress": {"step": step, "micro_step": step * self.config.grad_accum, "world_size": self.world},
        }
        if self.ema is not None:
            parts["ema"] = self.ema.state_dict()
        return save_checkpoint(
            self.ckpt_root, step, parts, rank_state=capture_rng_state({"train": self.generator}), rank=self.rank,
            is_main=self.is_main, barrier=self.accelerator.wait_for_everyone, keep_last=self.config.keep_last,
        )

    def ema_weights(self) -> contextlib.AbstractContextManager:
        """Context in which the trained modules hold the EMA weights (the raw ones without EMA)."""
        return self.ema.swapped_into(self.named) if self.ema is not None else contextlib.nullcontext()

    def pipeline(self):
        """An `LLM4GenPipeline` around the current (unwrapped) modules."""
        return make_pipeline(self.base, self.vae, self.config, self.clip_encoder, self.llm_encoder)

    def validate(self, step: int, metrics: _MetricsLog) -> dict[str, Any]:
        """Sample and score the validation prompts with the EMA weights (main process)."""
        report: dict[str, Any] = {}
        if self.is_main and self.rows:
            pipe = self.pipeline()
            pipe.set_progress_bar_config(disable=True)
            self.base.eval()
            with self.ema_weights():
                out_png = self.run_dir / "samples" / f"step_{step:07d}.png"
                report = validate(pipe, self.rows, self.data.caches, self.config, out_png)
            self.base.train()
            metrics.write({"kind": "validation", "step": step, **_flatten_scores(report)})
            plot_loss_curve(metrics.records(), self.run_dir / "loss_curve.png")
        self.accelerator.wait_for_everyone()
        return report

    # ------------------------------------------------------------------ one micro-batch
    def losses(self, batch: TrainingBatch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """`(loss, diffusion_loss, entity_loss)` of one micro-batch (noise, timesteps from the generator)."""
        config, device = self.config, self.accelerator.device
        with torch.no_grad():
            x0 = to_model_space(batch.images.to(device), self.vae, generator=None)
        noise = torch.randn(x0.shape, generator=self.generator).to(device, x0.dtype)
        timesteps = sample_timesteps(x0.shape[0], config, self.generator).to(device)
        a_t = self.alphas_cumprod[timesteps]
        noisy = self.noise_scheduler.add_noise(x0, noise, timesteps)
        feats = {}
        for role, f in (("clip", batch.clip), ("llm", batch.llm)):
            feats[f"{role}_states"] = None if f is None else f.features.to(device)
            feats[f"{role}_mask"] = None if f is None else f.mask.to(device)
        with self.capture() as store:
            pred = self.model(noisy, timesteps, drop_llm=batch.drop_llm.to(device), **feats)
        target = diffusion_target(x0, noise, a_t, config.prediction_type)
        d_loss = diffusion_loss(pred, target, a_t, config.min_snr_gamma, config.prediction_type)
        e_loss = torch.zeros((), device=device)
        if store is not None:
            e_loss = entity_term(store, batch, timesteps, config, self.clip_tokens)
        return d_loss + config.entity_weight * e_loss, d_loss, e_loss

    # ------------------------------------------------------------------ the loop
    def run(self) -> Path:
        """Train to `config.steps`; returns the saved pipeline folder `output_dir/pipeline`."""
        config, accelerator = self.config, self.accelerator
        if config.resume_from is not None:
            self.restore(config.resume_from)
        start = self.start_step
        metrics = _MetricsLog(self.run_dir / "metrics.jsonl", self.is_main, start if self.resumed_from else None)
        existing = list_checkpoints(self.ckpt_root)
        last_good = existing[-1] if existing else None
        self.model.train()
        progress = tqdm(total=config.steps, initial=start, disable=not self.is_main, desc="training", dynamic_ncols=True)
        window: list[float] = []
        t_start, train_seconds = time.perf_counter(), 0.0  # wall time; time in training steps only
        setup_seconds = t_start - self.created
        for step in range(start, config.steps):
            t_step = time.perf_counter()
            logged = {"loss": 0.0, "diffusion_loss": 0.0, "entity_loss": 0.0}
            grad_norm = float("nan")
            for micro in range(config.grad_accum):
                batch = self.data.batch(step * config.grad_accum + micro, self.generator)
                with accelerator.accumulate(self.model):
                    loss, d_loss, e_loss = self.losses(batch)
                    if not _all_finite(loss, accelerator):
                        progress.close()
                        kept = f"the last good checkpoint is {last_good}" if last_good else "no checkpoint was written yet"
                        raise NonFiniteLossError(
                            f"loss became {loss.item()} at step {step} (diffusion {d_loss.item()}, entity "
                            f"{e_loss.item()}): training stopped before the update; {kept}. Lower lr, keep "
                            "grad_clip > 0, or check the features."
                        )
                    accelerator.backward(loss)
                    if accelerator.sync_gradients and config.grad_clip > 0:
                        grad_norm = float(accelerator.clip_grad_norm_(self.params, config.grad_clip))
                    self.optimizer.step()
                    self.optimizer.zero_grad(set_to_none=True)
                for key, value in zip(logged, (loss, d_loss, e_loss)):
                    logged[key] += value.item() / config.grad_accum
            self.lr_scheduler.step()
            if self.ema is not None:
                self.ema.update(self.named)
            done = step + 1
            window.append(logged["loss"])
            train_seconds += time.perf_counter() - t_step
            progress.update(1)
            progress.set_postfix(loss=f"{np.mean(window[-20:]):.4f}", refresh=False)
            if done % config.log_every == 0 or done == config.steps:
                metrics.write({
                    "kind": "train", "step": done, **logged, "lr": self.lr_scheduler.get_last_lr()[0],
                    "grad_norm": grad_norm, "s_per_step": train_seconds / (done - start),
                    "elapsed_s": time.perf_counter() - t_start,
                })
            if config.checkpoint_every and done % config.checkpoint_every == 0 and done < config.steps:
                last_good = self.checkpoint(done)
            if config.validate_every and done % config.validate_every == 0 and done < config.steps:
                self.validate(done, metrics)
        progress.close()
        return self._finish(metrics, start, setup_seconds, time.perf_counter() - t_start, train_seconds)

    def _finish(self, metrics: _MetricsLog, start: int, setup_seconds: float, seconds: float,
                train_seconds: float) -> Path:
        """Final checkpoint, final validation, the pipeline with EMA weights, `summary.json`."""
        config = self.config
        if start < config.steps or not list_checkpoints(self.ckpt_root):
            self.checkpoint(config.steps)
        report = self.validate(config.steps, metrics)
        pipeline_dir = self.run_dir / "pipeline"
        if self.is_main:
            with self.ema_weights():
                self.pipeline().save_pretrained(pipeline_dir)
            steps_run = max(1, config.steps - start)
            summary = {
                "steps": config.steps, "steps_this_session": config.steps - start, "wall_seconds": seconds,
                "setup_seconds": setup_seconds,
                "train_seconds": train_seconds, "s_per_step": train_seconds / steps_run, "world_size": self.world,
                "validation": report,
            }
            atomic_write_json(self.run_dir / "summary.json", summary)
            plot_loss_curve(metrics.records(), self.run_dir / "loss_curve.png")
            print(f"done: {steps_run} steps, {seconds / 60:.1f} min wall ({train_seconds / steps_run:.2f} s per "
                  f"training step); pipeline: {pipeline_dir}")
            if report:
                print("validation:", json.dumps(_flatten_scores(report)))
        self.accelerator.wait_for_everyone()
        self.accelerator.end_training()
        return pipeline_dir


def train(config: TrainConfig) -> Path:
    """Train one run described by `config`; returns the saved pipeline folder `output_dir/pipeline`.

    Raises `NonFiniteLossError` (the last good checkpoint is kept) if the loss becomes NaN/inf.
    """
    return Trainer(config).run()


def _all_finite(loss: torch.Tensor, accelerator) -> bool:
    """Whether the loss is finite on every process (all processes take the same decision)."""
    flag = torch.tensor([float(torch.isfinite(loss).item())], device=loss.device)
    if accelerator.num_processes > 1:
        flag = accelerator.reduce(flag, reduction="sum") / accelerator.num_processes
    return bool(flag.item() == 1.0)


def entity_term(store, batch: TrainingBatch, timesteps: torch.Tensor, config: TrainConfig,
                clip_tokens: int) -> torch.Tensor:
    """λ_e's term for one micro-batch from the captured (differentiable) cross-attention maps."""
    maps = [store.get(layer) for layer in store.layers]
    total_tokens = maps[0].shape[1]  # [batch, tokens, H, W]: the context as the adapter trimmed it
    keep = (~batch.drop_text).tolist()
    parts = []
    if config.entity_tokens in ("clip", "both") and batch.clip is not None:
        parts.append(token_pairs(batch.pairs, batch.clip.offsets, total_tokens, 0, keep))
    if config.entity_tokens in ("llm", "both") and batch.llm is not None:
        keep_llm = [k and not d for k, d in zip(keep, batch.drop_llm.tolist())]
        parts.append(token_pairs(batch.pairs, batch.llm.offsets, total_tokens, clip_tokens, keep_llm))
    if not parts:
        raise ValueError(
            f"entity_tokens={config.entity_tokens!r} selects no branch of the {config.variant!r} variant; "
            "use 'both', or the branch this variant has"
        )
    in_range = ((timesteps >= config.entity_t_min) & (timesteps < config.entity_t_max)).float()
    return entity_loss(maps, merge_token_pairs(parts), config.entity_distance, row_weights=in_range)
