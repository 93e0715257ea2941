"""UNet presets on diffusers' `UNet2DConditionModel`: `tiny` (CI), `small` (the lite run), `sd15`.

`tiny` and `small` are built from scratch and denoise 32×32 RGB pixels, or (`space_to_depth`)
the same pixels rearranged losslessly by `PixelShuffleAutoencoder` into 2×2-patch channels at half
the side, which makes a CPU training step several times cheaper. `sd15` loads a real
Stable Diffusion 1.5 UNet and VAE from a local folder in the diffusers layout (`unet/`, `vae/`,
`scheduler/`) or from an existing Hugging Face cache, never from the network, and denoises in the
VAE's latent space. `to_model_space` / `from_model_space` move images in and out of whichever
space a UNet works in, so training and sampling code never branch on the preset.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, ConfigMixin, DDIMScheduler, ModelMixin, PNDMScheduler, UNet2DConditionModel
from diffusers.configuration_utils import register_to_config
from diffusers.models.autoencoders.autoencoder_kl import AutoencoderKLOutput
from diffusers.models.autoencoders.vae import DecoderOutput
from diffusers.schedulers.scheduling_utils import SchedulerMixin


@dataclass(frozen=True)
class UNetPreset:
    """What a UNet denoises and how wide its text context is."""

    name: str  # preset name: "tiny", "small", "sd15", or "custom" for a UNet described after loading
    in_channels: int  # channels of the denoised tensor: 3 (RGB pixels) or the VAE's latent channels
    sample_size: int  # spatial side of the denoised tensor (pixels, or latent cells)
    cross_attention_dim: int  # width d of the conditioning tokens, i.e. the adapter's output width
    latent: bool  # True: denoises VAE latents (needs a VAE); False: denoises pixels in [-1, 1]
    unet_config: dict[str, Any] = field(default_factory=dict)  # UNet2DConditionModel arguments (built presets)


_LITE_BLOCKS = {
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    "layers_per_block": 1,
}

PRESETS: dict[str, UNetPreset] = {
    "tiny": UNetPreset(
        "tiny", 3, 32, 32, False,
        {**_LITE_BLOCKS, "block_out_channels": (16, 32, 32), "norm_num_groups": 8, "attention_head_dim": 4},
    ),
    "small": UNetPreset(
        "small", 3, 32, 256, False,
        {**_LITE_BLOCKS, "block_out_channels": (32, 64, 128), "norm_num_groups": 32, "attention_head_dim": 8},
    ),
}
"""Presets built from scratch; `sd15` is loaded, see `load_sd15`."""

SD15_HUB_ID = "stable-diffusion-v1-5/stable-diffusion-v1-5"


def build_unet(
    preset: str = "small", cross_attention_dim: int | None = None, sample_size: int | None = None
) -> UNet2DConditionModel:
    """A freshly initialised UNet of a built preset (`tiny`, `small`); seed torch first for reproducibility.

    `cross_attention_dim` / `sample_size` override the preset's values.
    """
    if preset not in PRESETS:
        hint = " (load it with load_sd15)" if preset == "sd15" else ""
        raise ValueError(f"unknown UNet preset {preset!r}{hint}; built presets: {sorted(PRESETS)}")
    info = PRESETS[preset]
    return UNet2DConditionModel(
        sample_size=sample_size or info.sample_size,
        in_channels=info.in_channels,
        out_channels=info.in_channels,
        cross_attention_dim=cross_attention_dim or info.cross_attention_dim,
        **info.unet_config,
    )


def describe_unet(unet: UNet2DConditionModel, vae: AutoencoderKL | None = None, name: str = "custom") -> UNetPreset:
    """The preset record of an already built or loaded UNet (latent when a VAE is given)."""
    cfg = unet.config
    if vae is not None and vae.config.latent_channels != cfg.in_channels:
        raise ValueError(
            f"the VAE makes {vae.config.latent_channels}-channel latents but the UNet takes "
            f"{cfg.in_channels} input channels; use the VAE the UNet was trained with"
        )
    size = cfg.sample_size if isinstance(cfg.sample_size, int) else cfg.sample_size[0]
    return UNetPreset(name, cfg.in_channels, size, cfg.cross_attention_dim, vae is not None)


@dataclass
class SD15Components:
    """The parts of a Stable Diffusion 1.5 checkpoint that LLM4GEN fine-tunes or samples with."""

    unet: UNet2DConditionModel  # the denoiser, cross-attention width 768
    vae: AutoencoderKL  # image <-> latent, 8× downsampling, 4 latent channels
    scheduler: SchedulerMixin  # DDIM, configured from the checkpoint's scheduler/ folder
    preset: UNetPreset  # name "sd15", latent=True, dims read from the loaded configs


def load_sd15(
    name_or_path: str | os.PathLike = SD15_HUB_ID, dtype: torch.dtype = torch.float32
) -> SD15Components:
    """Load an SD1.5-structured UNet + VAE (+ scheduler config) without touching the network.

    `name_or_path` is a local folder with `unet/`, `vae/` and `scheduler/` subfolders (the diffusers
    layout of `stable-diffusion-v1-5/stable-diffusion-v1-5`) or a hub id already in the local
    Hugging Face cache. The scheduler comes back as `DDIMScheduler` with the checkpoint's betas.
    """
    source = str(name_or_path)
    try:
        unet = UNet2DConditionModel.from_pretrained(source, subfolder="unet", dtype=dtype, local_files_only=True)
        vae = AutoencoderKL.from_pretrained(source, subfolder="vae", dtype=dtype, local_files_only=True)
        scheduler = DDIMScheduler.from_pretrained(source, subfolder="scheduler", local_files_only=True)
    except (OSError, EnvironmentError) as err:
        raise FileNotFoundError(
            f"could not load Stable Diffusion 1.5 from {source!r} offline: expected a folder (or a cached "
            f"hub id) with unet/, vae/ and scheduler/ subfolders in the diffusers layout ({err})"
        ) from err
    return SD15Components(unet, vae, scheduler, describe_unet(unet, vae, name="sd15"))


def write_tiny_sd15(path: str | os.PathLike, cross_attention_dim: int = 768, seed: int = 0) -> Path:
    """Write a randomly initialised, SD1.5-structured checkpoint folder (for offline tests and smoke runs).

    Same block types, latent channels, VAE depth (8× downsampling), scaling factor and scheduler
    config as SD1.5, with tiny channel counts; `load_sd15(path)` loads it like the real one.
    """
    path = Path(path)
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=(16, 16, 32, 32),
        layers_per_block=2,
        norm_num_groups=8,
        attention_head_dim=8,
        cross_attention_dim=cross_attention_dim,
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 8, 16, 16),
        layers_per_block=1,
        norm_num_groups=8,
        latent_channels=4,
        sample_size=64,
        scaling_factor=0.18215,
    )
    scheduler = PNDMScheduler(  # SD1.5's shipped scheduler config
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
        set_alpha_to_one=False, skip_prk_steps=True, steps_offset=1,
    )
    unet.save_pretrained(path / "unet", safe_serialization=True)
    vae.save_pretrained(path / "vae", safe_serialization=True)
    scheduler.save_pretrained(path / "scheduler")
    return path


@dataclass
class _PixelLatent:
    """What `encode` returns in place of a VAE's latent distribution (deterministic)."""

    latents: torch.Tensor  # [batch, 3·f², H/f, W/f]

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        return self.latents

    def mode(self) -> torch.Tensor:
        return self.latents


class PixelShuffleAutoencoder(ModelMixin, ConfigMixin):
    """A lossless, parameter-free latent space for pixel-space UNets: space-to-depth by `factor`.

    `encode`: images `[batch, 3, H, W]` -> `[batch, 3·f², H/f, W/f]` (`pixel_unshuffle`); `decode`
    inverts it exactly (`pixel_shuffle`). It fills the pipeline's `vae` slot with AutoencoderKL's
    interface (`encode(x).latent_dist.sample()`, `decode(z).sample`, `scaling_factor` and
    `shift_factor`, 1 and 0 unless `pixel_scale` / `pixel_shift` are set), so the
    sampler, `unet.to_model_space` and saving/loading need nothing new. With f = 2 the `small`
    UNet's top level runs at 16×16 instead of 32×32: a training step (batch 32, 2 CPU threads)
    measured 3.8× cheaper (docs/TRAINING.md).
    """

    @register_to_config
    def __init__(
        self, factor: int = 2, in_channels: int = 3, latent_channels: int | None = None, scaling_factor: float = 1.0,
        shift_factor: float = 0.0,
    ) -> None:
        super().__init__()
        if latent_channels not in (None, in_channels * factor * factor):
            raise ValueError(f"latent_channels must be in_channels·factor² = {in_channels * factor * factor}")
        self.register_to_config(latent_channels=in_channels * factor * factor)
        # a dtype/device for the pipeline, and one stored tensor so the folder holds a safetensors file
        self.register_buffer("anchor", torch.zeros(1))

    def encode(self, images: torch.Tensor) -> AutoencoderKLOutput:
        return AutoencoderKLOutput(latent_dist=_PixelLatent(F.pixel_unshuffle(images, self.config.factor)))

    def decode(self, latents: torch.Tensor) -> DecoderOutput:
        return DecoderOutput(sample=F.pixel_shuffle(latents, self.config.factor))


def _shift(vae: AutoencoderKL | PixelShuffleAutoencoder) -> float:
    """The latent shift (diffusers' `shift_factor`, SD3 convention; None or absent = 0)."""
    return getattr(vae.config, "shift_factor", None) or 0.0


def to_model_space(
    images: torch.Tensor, vae: AutoencoderKL | None = None, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Images `[batch, 3, H, W]` in [-1, 1] -> what the UNet denoises: pixels, or VAE latents as
    `(latents - shift_factor) · scaling_factor`."""
    if vae is None:
        return images
    posterior = vae.encode(images.to(vae.dtype)).latent_dist
    return (posterior.sample(generator) - _shift(vae)) * vae.config.scaling_factor


def from_model_space(sample: torch.Tensor, vae: AutoencoderKL | None = None) -> torch.Tensor:
    """Denoised samples -> images `[batch, 3, H, W]` in [-1, 1] (clamped)."""
    if vae is not None:
        sample = vae.decode(sample.to(vae.dtype) / vae.config.scaling_factor + _shift(vae)).sample
    return sample.clamp(-1, 1)
