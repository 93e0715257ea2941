"""UNet presets: tiny/small sizes and structure; the sd15 path on a tiny SD1.5-structured folder."""
from __future__ import annotations

import pytest
import torch
from diffusers import DDIMScheduler

from llm4gen_lite.adapter import build_adapter
from llm4gen_lite.unet import (
    PRESETS, build_unet, describe_unet, from_model_space, load_sd15, to_model_space, write_tiny_sd15,
)


def n_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_tiny_preset_is_small_and_denoises_32px_rgb():
    unet = build_unet("tiny")
    assert n_params(unet) < 1_000_000
    info = describe_unet(unet)
    assert (info.in_channels, info.sample_size, info.cross_attention_dim, info.latent) == (3, 32, 32, False)
    with torch.no_grad():
        context = torch.randn(2, 5, 32)
        out = unet(torch.randn(2, 3, 32, 32), torch.tensor([1, 999]), encoder_hidden_states=context).sample
    assert out.shape == (2, 3, 32, 32)


def test_small_preset_structure():
    info = PRESETS["small"]
    assert (info.in_channels, info.sample_size, info.cross_attention_dim, info.latent) == (3, 32, 256, False)
    unet = build_unet("small")
    cfg = unet.config
    assert tuple(cfg.down_block_types) == ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D")
    assert tuple(cfg.up_block_types) == ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D")
    assert cfg.layers_per_block == 1
    assert 4_000_000 < n_params(unet) < 5_000_000  # design.md sizing table: (32, 64, 128) -> 4.40M
    assert build_unet("small", cross_attention_dim=64).config.cross_attention_dim == 64


def test_unknown_preset_names_the_choices():
    with pytest.raises(ValueError, match="unknown UNet preset 'sd15' \\(load it with load_sd15\\)"):
        build_unet("sd15")


def test_sd15_path_loads_offline_and_runs_in_latent_space(tmp_path):
    folder = write_tiny_sd15(tmp_path / "sd15")
    assert {p.name for p in folder.iterdir()} == {"unet", "vae", "scheduler"}
    parts = load_sd15(folder)
    info = parts.preset
    assert (info.name, info.in_channels, info.cross_attention_dim, info.latent) == ("sd15", 4, 768, True)
    assert tuple(parts.unet.config.down_block_types)[:3] == ("CrossAttnDownBlock2D",) * 3
    assert isinstance(parts.scheduler, DDIMScheduler)
    assert parts.scheduler.config.beta_schedule == "scaled_linear" and parts.scheduler.config.beta_end == 0.012

    images = torch.rand(2, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        latents = to_model_space(images, parts.vae, generator=torch.Generator().manual_seed(0))
        assert latents.shape == (2, 4, 8, 8)
        raw = parts.vae.encode(images).latent_dist.mean
        assert latents.std() < raw.std(), "latents are scaled by vae.config.scaling_factor (0.18215)"

        cam = build_adapter("cam", clip_dim=768, llm_dim=48, cross_attention_dim=768)
        cond = cam(torch.randn(2, 77, 768), torch.ones(2, 77, dtype=torch.bool), torch.randn(2, 16, 48))
        pred = parts.unet(latents, torch.tensor([10, 900]), **cond.unet_kwargs()).sample
        decoded = from_model_space(pred, parts.vae)
    assert pred.shape == latents.shape
    assert decoded.shape == (2, 3, 64, 64) and decoded.abs().max() <= 1


def test_sd15_missing_folder_explains_the_layout(tmp_path):
    with pytest.raises(FileNotFoundError, match="unet/, vae/ and scheduler/ subfolders"):
        load_sd15(tmp_path / "nowhere")


def test_pixel_space_is_the_identity():
    x = torch.rand(1, 3, 32, 32) * 4 - 2
    assert torch.equal(to_model_space(x), x)
    assert torch.equal(from_model_space(x), x.clamp(-1, 1))


def test_space_to_depth_is_lossless_and_survives_a_pipeline_round_trip(tmp_path):
    from conftest import HashEncoder
    from llm4gen_lite.config import load_config
    from llm4gen_lite.pipeline import LLM4GenPipeline
    from llm4gen_lite.train import build_unet as build_for_training
    from llm4gen_lite.unet import PixelShuffleAutoencoder

    vae = PixelShuffleAutoencoder(factor=2)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    z = to_model_space(x, vae)
    assert z.shape == (2, 12, 16, 16) and torch.equal(from_model_space(z, vae), x)

    torch.manual_seed(0)
    unet, vae = build_for_training(load_config("smoke", {"space_to_depth": 2}))
    assert isinstance(vae, PixelShuffleAutoencoder) and unet.config.in_channels == 12 and unet.config.sample_size == 16
    clip, llm = HashEncoder(24, max_length=8, seed=1), HashEncoder(40, max_length=8, seed=2)
    adapter = build_adapter("cam", 24, 40, unet.config.cross_attention_dim, num_heads=4)
    scheduler = DDIMScheduler(num_train_timesteps=1000, prediction_type="v_prediction")
    pipe = LLM4GenPipeline(unet=unet, scheduler=scheduler, adapter=adapter, vae=vae, clip_encoder=clip, llm_encoder=llm)
    pipe.set_progress_bar_config(disable=True)
    pipe.save_pretrained(tmp_path / "pipe")
    loaded = LLM4GenPipeline.from_pretrained(tmp_path / "pipe", clip_encoder=clip, llm_encoder=llm)
    loaded.set_progress_bar_config(disable=True)
    assert isinstance(loaded.vae, PixelShuffleAutoencoder)
    kwargs = dict(num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="np")
    a = pipe(["a red circle"], **kwargs).images
    kwargs["generator"] = torch.Generator().manual_seed(0)
    b = loaded(["a red circle"], **kwargs).images
    assert a.shape == (1, 32, 32, 3) and abs(a - b).max() < 1e-5, abs(a - b).max()
    with pytest.raises(ValueError, match="not divisible"):
        build_for_training(load_config("smoke", {"space_to_depth": 3}))


def test_pixel_shift_and_scale_give_the_unet_standardised_data_and_invert_exactly():
    from llm4gen_lite.config import ConfigError, load_config
    from llm4gen_lite.train import build_unet as build_for_training
    from llm4gen_lite.unet import PixelShuffleAutoencoder

    unet, vae = build_for_training(load_config("smoke", {"pixel_shift": -1.0, "pixel_scale": 3.0}))
    assert isinstance(vae, PixelShuffleAutoencoder) and vae.config.factor == 1 and unet.config.in_channels == 3
    x = torch.full((1, 3, 32, 32), -1.0)
    x[..., 8:20, 8:20] = 1.0  # a white square on black
    z = to_model_space(x, vae)
    assert z[..., 0, 0].abs().max() == 0 and torch.allclose(z[..., 10, 10], torch.full((1, 3), 6.0))
    assert torch.allclose(from_model_space(z, vae), x)
    assert build_for_training(load_config("smoke"))[1] is None  # plain pixels keep no vae
    with pytest.raises(ConfigError, match="pixel_scale"):
        load_config("smoke", {"pixel_scale": 0.0})
    with pytest.raises(ValueError, match="pixel_shift"):
        build_for_training(load_config("smoke", {"unet": "sd15", "pixel_shift": -1.0}))


def test_only_cross_attention_unet_reads_the_text_in_both_attention_layers():
    """With `only_cross_attention` (the `quick` recipe) attn1 reads the text too: it is listed,
    captured and trained as cross-attention like attn2."""
    from llm4gen_lite.attention import capture_cross_attention, cross_attention_layers
    from llm4gen_lite.config import load_config
    from llm4gen_lite.train import Denoiser, build_unet as build_for_training, select_trainable

    plain = build_unet("tiny")
    assert all(name.endswith("attn2") for name in cross_attention_layers(plain))
    unet, _ = build_for_training(load_config("smoke").replace(unet_overrides={"only_cross_attention": True}))
    layers = cross_attention_layers(unet)
    assert set(cross_attention_layers(plain)) < set(layers)  # every attn2, plus the blocks' attn1
    assert {n.split(".")[0] for n in layers if n.endswith("attn1")} == {"down_blocks", "up_blocks"}
    context = torch.randn(2, 5, 32)
    with torch.no_grad(), capture_cross_attention(unet, mode="mean") as store:
        unet(torch.randn(2, 3, 32, 32), torch.tensor([1, 999]), encoder_hidden_states=context)
    assert sorted(store.layers) == sorted(layers)
    maps = store.get(layers[0])
    assert maps.shape[:2] == (2, 5) and torch.allclose(maps.sum(1), torch.ones(()), atol=1e-5)
    model = Denoiser(unet, build_adapter("clip", clip_dim=8, llm_dim=0, cross_attention_dim=32))
    trained = {id(p) for p in select_trainable(model, "cross_attention")}
    modules = dict(unet.named_modules())
    assert all(id(p) in trained for name in layers for p in modules[name].parameters())
    assert not any(id(p) in trained for p in unet.conv_in.parameters())
