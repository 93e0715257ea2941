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
from torch import nn

from .adapter import ConditioningAdapter, build_adapter
from .attention import capture_cross_attention
from .checkpoint import (
    capture_rng_state, list_checkpoints, load_checkpoint, resolve_checkpoint, restore_rng_state, save_checkpoint,
)
from .config import TrainConfig
from .io import atomic_write_bytes, atomic_write_json
from .losses import caption_pairs, diffusion_loss, diffusion_target, entity_loss, merge_token_pairs, token_pairs

NUM_TRAIN_TIMESTEPS = 1000


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
    """The UNet (and the frozen VAE for latent presets) named by `config.unet`.

    `tiny` / `small` are built from `unet.PRESETS` with `config.unet_overrides` applied;
    `sd15` or a folder loads a Stable Diffusion 1.5-layout checkpoint (`unet.load_sd15`).
    """
    from diffusers import UNet2DConditionModel

    from .unet import PRESETS, SD15_HUB_ID, load_sd15

    if config.unet in PRESETS:
        info = PRESETS[config.unet]
        kwargs: dict[str, Any] = dict(
            sample_size=config.resolution, in_channels=info.in_channels, out_channels=info.in_channels,
            cross_attention_dim=info.cross_attention_dim, **info.unet_config,
        )
        kwargs.update({k: tuple(v) if isinstance(v, list) else v for k, v in config.unet_overrides.items()})
        try:
            return UNet2DConditionModel(**kwargs), None
        except (TypeError, ValueError) as err:
            raise ValueError(f"unet_overrides {config.unet_overrides} do not build a UNet: {err}") from err
    if config.unet_overrides:
        raise ValueError("unet_overrides apply to the built presets (tiny, small) only, not to a loaded UNet")
    parts = load_sd15(SD15_HUB_ID if config.unet == "sd15" else config.unet)
    parts.vae.requires_grad_(False).eval()
    return parts.unet, parts.vae


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
    from diffusers import DDIMScheduler

    extra = {"set_alpha_to_one": False, "steps_offset": 0 if config.zero_terminal_snr else 1}
    return DDIMScheduler(**noise_scheduler_config(config), **extra)


def select_trainable(model: Denoiser, train_unet: str) -> list[nn.Parameter]:
    """Freeze what does not train; return the trained parameters (adapter + UNet or its attn2)."""
    model.adapter.requires_grad_(True)
    if train_unet == "all":
        model.unet.requires_grad_(True)
    else:
        model.unet.requires_grad_(False)
        for name, module in model.unet.named_modules():
            if name.endswith("attn2"):
                module.requires_grad_(True)
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
        for name, p in named.items():
            self.shadow[name].lerp_(p.detach().float(), 1 - decay)

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
        from .shapes import ImageFolderDataset, ShapesDataset

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
        items = [dataset[i] for i in indices]
        drop_text = torch.rand(len(items), generator=generator) < cfg.p_uncond
        drop_llm = (torch.rand(len(items), generator=generator) < cfg.p_llm) & ~drop_text
        texts = ["" if d else it["text"] for it, d in zip(items, drop_text.tolist())]
        pairs = [
            [] if d else caption_pairs(it["caption"])
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
    from .encoders import load_encoder

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
    from .feature_cache import FeatureCache

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


# ----------------------------------------------------------------------------------------------
# validation
# ----------------------------------------------------------------------------------------------
def validation_rows(config: TrainConfig) -> list[dict]:
    """The fixed validation prompts: `validation_max_prompts` rows spread evenly over the set."""
    from .shapes import load_prompt_set

    rows = load_prompt_set(config.validation_prompts)
    n = min(len(rows), config.validation_max_prompts)
    return [rows[i * len(rows) // n] for i in range(n)] if n else []


def make_pipeline(model: Denoiser, vae: nn.Module | None, config: TrainConfig, clip_encoder: Any, llm_encoder: Any):
    """An `LLM4GenPipeline` around the (unwrapped) trained modules."""
    from .pipeline import LLM4GenPipeline

    return LLM4GenPipeline(
        unet=model.unet, scheduler=sampling_scheduler(config), adapter=model.adapter, vae=vae,
        clip_encoder=clip_encoder, llm_encoder=llm_encoder,
    )


@torch.no_grad()
def validate(pipeline, rows: list[dict], caches: dict[str, Any], config: TrainConfig, out_png: Path) -> dict[str, Any]:
    """Sample the validation prompts (fixed seed), save a grid, return CompBench-lite scores."""
    from .evaluate import compbench_report

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
    from .viz import image_grid

    _save_figure(image_grid(images, captions, ncols=8, title=title), path)


def plot_loss_curve(records: list[dict[str, Any]], path: Path) -> None:
    """Training loss (and the entity term, when used) against step, from `metrics.jsonl` records."""
    from matplotlib.figure import Figure

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


def train(config: TrainConfig) -> Path:
    """Train one run described by `config`; returns the saved pipeline folder `output_dir/pipeline`.

    Raises `NonFiniteLossError` (the last good checkpoint is kept) if the loss becomes NaN/inf.
    """
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from diffusers import DDPMScheduler
    from tqdm.auto import tqdm

    from .unet import to_model_space

    if config.cpu_threads:
        torch.set_num_threads(config.cpu_threads)
    accelerator = Accelerator(
        cpu=config.device == "cpu", mixed_precision=config.mixed_precision, gradient_accumulation_steps=config.grad_accum,
    )
    rank, world = accelerator.process_index, accelerator.num_processes
    is_main = accelerator.is_main_process
    run_dir = Path(config.output_dir)
    ckpt_root = run_dir / "checkpoints"
    if is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        print(f"training config ({world} process{'es' if world > 1 else ''}, {accelerator.device}):\n{config.pretty()}")
        atomic_write_json(run_dir / "config.json", config.to_dict())

    # ---- frozen encoders and their cached features (main process builds, the others read)
    set_seed(config.seed)
    data = TrainingData(config, rank, world)
    clip_encoder, llm_encoder = load_encoders(config)
    rows = validation_rows(config)
    data.caches = build_feature_caches(
        config, data, rows, {"clip": clip_encoder, "llm": llm_encoder}, is_main, accelerator.wait_for_everyone
    )

    # ---- trained modules
    set_seed(config.seed)
    unet, vae = build_unet(config)
    adapter = build_adapter(
        config.variant,
        clip_dim=clip_encoder.dim if clip_encoder is not None else 0,  # 0: unused by this variant
        llm_dim=llm_encoder.dim if llm_encoder is not None else 0,
        cross_attention_dim=unet.config.cross_attention_dim,
        num_heads=config.cam_heads,
        llm_scale=config.llm_scale,
    )
    model = Denoiser(unet, adapter)
    params = select_trainable(model, config.train_unet)
    named = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if is_main:
        total = sum(p.numel() for p in model.parameters())
        print(f"trainable parameters: {sum(p.numel() for p in params) / 1e6:.2f}M of {total / 1e6:.2f}M")
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    lr_scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, functools.partial(lr_lambda, config=config))
    ema = EMA(named, config.ema_decay) if config.ema_decay > 0 else None
    noise_scheduler = DDPMScheduler(**noise_scheduler_config(config))
    alphas_cumprod = noise_scheduler.alphas_cumprod.to(accelerator.device)
    model, optimizer = accelerator.prepare(model, optimizer)
    if vae is not None:
        vae.to(accelerator.device)
    base = accelerator.unwrap_model(model)
    generator = torch.Generator().manual_seed(config.seed * 7919 + rank)

    # ---- resume
    start_step, resumed_from = 0, None
    if config.resume_from is not None:
        resumed_from = resolve_checkpoint(ckpt_root, config.resume_from)
        parts, rank_state = load_checkpoint(resumed_from, rank)
        missing = set(named) ^ set(parts["model"])
        if missing:
            raise ValueError(f"{resumed_from} holds weights for a different model (e.g. {sorted(missing)[:3]})")
        with torch.no_grad():
            for name, p in named.items():
                p.copy_(parts["model"][name])
        optimizer.load_state_dict(parts["optimizer"])
        lr_scheduler.load_state_dict(parts["lr_scheduler"])
        if ema is not None:
            ema.load_state_dict(parts["ema"])
        if rank_state is None:
            raise ValueError(f"{resumed_from} has no RNG state for process {rank}; resume with the same number of processes")
        restore_rng_state(rank_state, {"train": generator})
        start_step = int(parts["progress"]["step"])
        if is_main:
            print(f"resumed from {resumed_from} at step {start_step}")
    metrics = _MetricsLog(run_dir / "metrics.jsonl", is_main, start_step if resumed_from else None)

    def checkpoint(step: int) -> Path:
        parts = {
            "model": {n: p.detach() for n, p in named.items()},
            "optimizer": optimizer.state_dict(),
            "lr_scheduler": lr_scheduler.state_dict(),
            "progress": {"step": step, "micro_step": step * config.grad_accum, "world_size": world},
        }
        if ema is not None:
            parts["ema"] = ema.state_dict()
        return save_checkpoint(
            ckpt_root, step, parts, rank_state=capture_rng_state({"train": generator}), rank=rank, is_main=is_main,
            barrier=accelerator.wait_for_everyone, keep_last=config.keep_last,
        )

    def run_validation(step: int) -> dict[str, Any]:
        report: dict[str, Any] = {}
        if is_main and rows:
            pipe = make_pipeline(base, vae, config, clip_encoder, llm_encoder)
            pipe.set_progress_bar_config(disable=True)
            swap = ema.swapped_into(named) if ema is not None else contextlib.nullcontext()
            base.eval()
            with swap:
                report = validate(pipe, rows, data.caches, config, run_dir / "samples" / f"step_{step:07d}.png")
            base.train()
            metrics.write({"kind": "validation", "step": step, **_flatten_scores(report)})
            plot_loss_curve(metrics.records(), run_dir / "loss_curve.png")
        accelerator.wait_for_everyone()
        return report

    # ---- entity-guided loss set-up (nothing is installed when λ_e = 0)
    use_entity = config.entity_weight > 0
    clip_tokens = clip_encoder.max_length if clip_encoder is not None else 0
    total_tokens = clip_tokens + (llm_encoder.max_length if llm_encoder is not None else 0)
    capture = (
        functools.partial(capture_cross_attention, base.unet, config.entity_layers or None, "last")
        if use_entity else contextlib.nullcontext
    )

    model.train()
    progress = tqdm(total=config.steps, initial=start_step, disable=not is_main, desc="training", dynamic_ncols=True)
    window: list[float] = []
    existing = list_checkpoints(ckpt_root)
    last_good = existing[-1] if existing else None
    t_start, train_seconds = time.perf_counter(), 0.0  # wall time; time in training steps only
    for step in range(start_step, config.steps):
        t_step = time.perf_counter()
        step_losses: dict[str, float] = {"loss": 0.0, "diffusion_loss": 0.0, "entity_loss": 0.0}
        grad_norm = float("nan")
        for micro in range(config.grad_accum):
            batch = data.batch(step * config.grad_accum + micro, generator)
            with accelerator.accumulate(model):
                with torch.no_grad():
                    x0 = to_model_space(batch.images.to(accelerator.device), vae, generator=None)
                noise = torch.randn(x0.shape, generator=generator).to(accelerator.device, x0.dtype)
                timesteps = torch.randint(0, NUM_TRAIN_TIMESTEPS, (x0.shape[0],), generator=generator).to(accelerator.device)
                a_t = alphas_cumprod[timesteps]
                noisy = noise_scheduler.add_noise(x0, noise, timesteps)
                feats = {}
                for role, f in (("clip", batch.clip), ("llm", batch.llm)):
                    feats[f"{role}_states"] = None if f is None else f.features.to(accelerator.device)
                    feats[f"{role}_mask"] = None if f is None else f.mask.to(accelerator.device)
                with capture() as store:
                    pred = model(noisy, timesteps, drop_llm=batch.drop_llm.to(accelerator.device), **feats)
                target = diffusion_target(x0, noise, a_t, config.prediction_type)
                d_loss = diffusion_loss(pred, target, a_t, config.min_snr_gamma, config.prediction_type)
                e_loss = torch.zeros((), device=accelerator.device)
                if use_entity:
                    e_loss = _entity_term(store, batch, timesteps, config, clip_tokens, total_tokens)
                loss = d_loss + config.entity_weight * e_loss
                if not _all_finite(loss, accelerator):
                    progress.close()
                    where = f"the last good checkpoint is {last_good}" if last_good else "no checkpoint was written yet"
                    raise NonFiniteLossError(
                        f"loss became {loss.item()} at step {step} (diffusion {d_loss.item()}, entity {e_loss.item()}): "
                        f"training stopped before the update; {where}. Lower lr, keep grad_clip > 0, or check the features."
                    )
                accelerator.backward(loss)
                if accelerator.sync_gradients and config.grad_clip > 0:
                    grad_norm = float(accelerator.clip_grad_norm_(params, config.grad_clip))
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            for key, value in (("loss", loss), ("diffusion_loss", d_loss), ("entity_loss", e_loss)):
                step_losses[key] += value.item() / config.grad_accum
        lr_scheduler.step()
        if ema is not None:
            ema.update(named)
        done = step + 1
        window.append(step_losses["loss"])
        train_seconds += time.perf_counter() - t_step
        progress.update(1)
        progress.set_postfix(loss=f"{np.mean(window[-20:]):.4f}", refresh=False)
        if done % config.log_every == 0 or done == config.steps:
            metrics.write({
                "kind": "train", "step": done, **step_losses, "lr": lr_scheduler.get_last_lr()[0],
                "grad_norm": grad_norm, "s_per_step": train_seconds / (done - start_step),
                "elapsed_s": time.perf_counter() - t_start,
            })
        if config.checkpoint_every and done % config.checkpoint_every == 0 and done < config.steps:
            last_good = checkpoint(done)
        if config.validate_every and done % config.validate_every == 0 and done < config.steps:
            run_validation(done)
    progress.close()

    # ---- final checkpoint, pipeline with EMA weights, final validation
    if start_step < config.steps or not list_checkpoints(ckpt_root):
        checkpoint(config.steps)
    pipeline_dir = run_dir / "pipeline"
    report = run_validation(config.steps)
    if is_main:
        swap = ema.swapped_into(named) if ema is not None else contextlib.nullcontext()
        with swap:
            make_pipeline(base, vae, config, clip_encoder, llm_encoder).save_pretrained(pipeline_dir)
        seconds = time.perf_counter() - t_start
        steps_run = max(1, config.steps - start_step)
        summary = {"steps": config.steps, "steps_this_session": config.steps - start_step, "wall_seconds": seconds,
                   "train_seconds": train_seconds, "s_per_step": train_seconds / steps_run,
                   "world_size": world, "validation": report}
        atomic_write_json(run_dir / "summary.json", summary)
        plot_loss_curve(metrics.records(), run_dir / "loss_curve.png")
        print(f"done: {steps_run} steps, {seconds / 60:.1f} min wall ({train_seconds / steps_run:.2f} s per training "
              f"step); pipeline: {pipeline_dir}")
        if report:
            print("validation:", json.dumps(_flatten_scores(report), indent=None))
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return pipeline_dir


def _all_finite(loss: torch.Tensor, accelerator) -> bool:
    """Whether the loss is finite on every process (all processes take the same decision)."""
    flag = torch.tensor([float(torch.isfinite(loss).item())], device=loss.device)
    if accelerator.num_processes > 1:
        flag = accelerator.reduce(flag, reduction="sum") / accelerator.num_processes
    return bool(flag.item() == 1.0)


def _entity_term(store, batch: TrainingBatch, timesteps: torch.Tensor, config: TrainConfig,
                 clip_tokens: int, total_tokens: int) -> torch.Tensor:
    """λ_e's term for one micro-batch from the captured (differentiable) cross-attention maps."""
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
    maps = [store.get(layer) for layer in store.layers]
    return entity_loss(maps, merge_token_pairs(parts), config.entity_distance, row_weights=in_range)
