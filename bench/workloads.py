"""What `bench/run_all.py` measures: the lite training step, the two ways of getting text features,
sampling with and without the pipeline, and FLOP / time accounting of a step.

Everything is built from the library (`unet.build_unet`, `adapter.build_adapter`, `train.Denoiser`,
`losses`, `train.TrainingData`, `FeatureCache`, `LLM4GenPipeline`); only the plain denoising loop,
the reference the pipeline is compared against, is written out here.
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

from llm4gen_lite.adapter import ConditioningAdapter, build_adapter
from llm4gen_lite.attention import capture_cross_attention
from llm4gen_lite.config import TrainConfig, load_config
from llm4gen_lite.encoders import TextFeatures
from llm4gen_lite.losses import diffusion_loss, diffusion_target
from llm4gen_lite.train import (
    NUM_TRAIN_TIMESTEPS, Denoiser, TrainingBatch, entity_term, noise_scheduler_config, sampling_scheduler,
)
from llm4gen_lite.unet import build_unet


def bench_config(batch_size: int, resolution: int = 32) -> TrainConfig:
    """The `quick` recipe (diffusion settings of the lite run) with the `cam` variant at this size."""
    return load_config("quick", {"variant": "cam", "batch_size": batch_size, "resolution": resolution})


def autocast(device: torch.device, mixed_precision: str) -> contextlib.AbstractContextManager:
    """bf16 autocast when asked for, else nothing."""
    if mixed_precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


class TrainStep:
    """One optimiser step of the lite training loop on a fixed batch of noisy images.

    Adapter -> UNet forward, the diffusion loss of `config` (prediction type, min-SNR weighting),
    backward, AdamW step — what `train.train` does per step, without Accelerate, EMA and the LR
    schedule. Images `[B, 3, R, R]`, noise and timesteps are drawn once; features come per call.
    """

    def __init__(self, preset: str, variant: str, clip_dim: int, llm_dim: int, config: TrainConfig,
                 device: torch.device, mixed_precision: str = "no", seed: int = 0) -> None:
        from diffusers import DDPMScheduler

        torch.manual_seed(seed)
        unet = build_unet(preset, sample_size=config.resolution)
        adapter = build_adapter(variant, clip_dim, llm_dim, unet.config.cross_attention_dim, num_heads=config.cam_heads)
        self.model = Denoiser(unet, adapter).to(device).train()
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
        self.config, self.device, self.mixed_precision = config, device, mixed_precision
        generator = torch.Generator().manual_seed(seed)
        shape = (config.batch_size, 3, config.resolution, config.resolution)
        self.x0 = (torch.rand(shape, generator=generator) * 2 - 1).to(device)
        self.noise = torch.randn(shape, generator=generator).to(device)
        self.timesteps = torch.randint(0, NUM_TRAIN_TIMESTEPS, (config.batch_size,), generator=generator).to(device)
        scheduler = DDPMScheduler(**noise_scheduler_config(config))
        self.a_t = scheduler.alphas_cumprod.to(device)[self.timesteps]
        self.noisy = scheduler.add_noise(self.x0, self.noise, self.timesteps)
        self.target = diffusion_target(self.x0, self.noise, self.a_t, config.prediction_type)
        self.drop_llm = torch.zeros(config.batch_size, dtype=torch.bool, device=device)

    def _inputs(self, clip: TextFeatures | None, llm: TextFeatures | None) -> dict[str, torch.Tensor | None]:
        feats = {}
        for role, f in (("clip", clip), ("llm", llm)):
            feats[f"{role}_states"] = None if f is None else f.features.to(self.device, non_blocking=True)
            feats[f"{role}_mask"] = None if f is None else f.mask.to(self.device, non_blocking=True)
        return feats

    def __call__(self, clip: TextFeatures | None, llm: TextFeatures | None,
                 entity_batch: TrainingBatch | None = None) -> torch.Tensor:
        """Run the step on CLIP-role features `[B, Tc, dc]` and LLM features `[B, Tl, dl]`; returns the loss.

        With `entity_batch` (the batch the features came from, its attribute–entity pairs filled
        in) the step adds the entity-guided term as training does: cross-attention captured on
        `config.entity_layers`, `config.entity_weight · train.entity_term(...)`.
        """
        feats = self._inputs(clip, llm)
        capture = (contextlib.nullcontext() if entity_batch is None else
                   capture_cross_attention(self.model.unet, self.config.entity_layers or None, "last"))
        with autocast(self.device, self.mixed_precision):
            with capture as store:
                pred = self.model(self.noisy, self.timesteps, drop_llm=self.drop_llm, **feats)
            loss = diffusion_loss(pred, self.target, self.a_t, self.config.min_snr_gamma, self.config.prediction_type)
            if store is not None:
                loss = loss + self.config.entity_weight * entity_term(store, entity_batch, self.timesteps, self.config,
                                                                       clip_tokens=clip.features.shape[1])
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    def adapter_only(self, clip: TextFeatures | None, llm: TextFeatures | None) -> None:
        """Forward and backward through the adapter alone (its share of a step, for FLOP counts)."""
        with autocast(self.device, self.mixed_precision):
            cond = self.model.adapter(**self._inputs(clip, llm))
        cond.states.float().sum().backward()
        self.optimizer.zero_grad(set_to_none=True)


# ----------------------------------------------------------------------------------------------
# sampling
# ----------------------------------------------------------------------------------------------
@dataclass
class SamplingSetup:
    """Everything both samplers share: one UNet, one scheduler, features and initial noise."""

    unet: torch.nn.Module
    config: TrainConfig
    clip: TextFeatures  # prompts, [B, 77, d_clip]
    llm: TextFeatures  # prompts, [B, 256, d_llm]
    null_clip: TextFeatures  # the empty prompt, [1, 77, d_clip]
    null_llm: TextFeatures  # the empty prompt, [1, 256, d_llm]
    latents: torch.Tensor  # [B, 3, R, R] initial noise
    steps: int
    guidance_scale: float = 3.0


def make_pipeline(setup: SamplingSetup, adapter: ConditioningAdapter):
    """An `LLM4GenPipeline` around the shared UNet and a fresh copy of the lite sampling scheduler."""
    from llm4gen_lite.pipeline import LLM4GenPipeline

    pipe = LLM4GenPipeline(setup.unet, sampling_scheduler(setup.config), adapter)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def pipeline_sample(pipe, setup: SamplingSetup, llm_guidance_scale: float | None = None) -> torch.Tensor:
    """Images `[B, 3, R, R]` in [0, 1] from the pipeline, on precomputed features."""
    kwargs = {}
    if pipe.adapter.uses_llm:
        kwargs = {"llm_features": setup.llm, "negative_llm_features": setup.null_llm}
    return pipe(clip_features=setup.clip, negative_clip_features=setup.null_clip, num_inference_steps=setup.steps,
                guidance_scale=setup.guidance_scale, llm_guidance_scale=llm_guidance_scale,
                latents=setup.latents.clone(), output_type="pt", **kwargs).images


@torch.no_grad()
def plain_sample(adapter: ConditioningAdapter, setup: SamplingSetup) -> torch.Tensor:
    """The reference: a bare diffusers loop with classifier-free guidance (`clip` adapter only).

    `set_timesteps`, `scale_model_input`, one UNet call on `[null ; prompt]`, CFG, `step`; returns
    images `[B, 3, R, R]` in [0, 1].
    """
    device = setup.latents.device
    batch = setup.clip.features.shape[0]
    cond = adapter(setup.clip.features.to(device), setup.clip.mask.to(device))
    null = adapter(setup.null_clip.features.to(device), setup.null_clip.mask.to(device))
    states = torch.cat([null.states.expand(batch, -1, -1), cond.states])
    mask = torch.cat([null.mask.expand(batch, -1), cond.mask])
    scheduler = sampling_scheduler(setup.config)
    scheduler.set_timesteps(setup.steps, device=device)
    latents = setup.latents * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        model_in = scheduler.scale_model_input(torch.cat([latents] * 2), t)
        uncond, text = setup.unet(model_in, t, encoder_hidden_states=states, encoder_attention_mask=mask).sample.chunk(2)
        latents = scheduler.step(uncond + setup.guidance_scale * (text - uncond), t, latents).prev_sample
    return (latents.clamp(-1, 1) + 1) / 2


# ----------------------------------------------------------------------------------------------
# accounting
# ----------------------------------------------------------------------------------------------
def _sdpa(query, key, value, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query, key, value)


def _sdpa_backward(grad_out, query, key, value, *args, out_shape=None, **kwargs) -> int:
    return sdpa_backward_flop_count(grad_out, query, key, value)


def _cpu_sdpa_formulas() -> dict:
    """FlopCounterMode counts the CUDA attention kernels but not the CPU one; add it."""
    aten = torch.ops.aten
    if not hasattr(aten, "_scaled_dot_product_flash_attention_for_cpu"):
        return {}
    return {aten._scaled_dot_product_flash_attention_for_cpu: _sdpa,
            aten._scaled_dot_product_flash_attention_for_cpu_backward: _sdpa_backward}


CATEGORIES = ("convolution", "matmul", "attention", "other")


def categorize(op: str) -> str:
    """Which kind of work an aten op (or profiler event) is: one of `CATEGORIES`."""
    parts = op.replace("::", ".").split(".")  # "aten::mm" (profiler), "aten.mm" (flop counter)
    name = parts[1] if parts[0] == "aten" and len(parts) > 1 else parts[0]
    if "conv" in name:
        return "convolution"
    if name in ("mm", "addmm", "bmm", "baddbmm", "_scaled_mm"):
        return "matmul"
    if "scaled_dot_product" in name or "attention" in name or "softmax" in name:
        return "attention"
    return "other"


def count_flops(fn: Callable[[], object]) -> dict[str, int]:
    """FLOPs of one call of `fn` by category (`CATEGORIES`) plus "total"."""
    with FlopCounterMode(display=False, custom_mapping=_cpu_sdpa_formulas()) as counter:
        fn()
    out = dict.fromkeys(CATEGORIES, 0)
    for op, flops in counter.get_flop_counts()["Global"].items():
        out[categorize(str(op))] += int(flops)
    out["total"] = int(counter.get_total_flops())
    return out


def time_by_category(fn: Callable[[], object], device: torch.device) -> dict[str, float]:
    """Share of one call's self time (CPU ops, or GPU kernels on CUDA) per category; sums to 1."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    totals = dict.fromkeys(CATEGORIES, 0.0)
    for event in prof.key_averages():
        spent = event.self_device_time_total if device.type == "cuda" else event.self_cpu_time_total
        totals[categorize(event.key)] += spent
    whole = sum(totals.values()) or 1.0
    return {k: v / whole for k, v in totals.items()}


def matmul_reference(device: torch.device, dtype: torch.dtype, size: int) -> Callable[[], None]:
    """One `[size, size] @ [size, size]` product (2·size³ FLOPs) on `device`, the peak-rate yardstick."""
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    return lambda: torch.mm(a, b)
