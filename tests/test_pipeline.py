"""LLM4GenPipeline: parity with a plain diffusers loop, guidance, schedulers, attention capture,
save/load round trip, the sd15 path and bad input."""
from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler
from diffusers.models.attention_processor import AttnProcessor2_0

from llm4gen_lite.adapter import build_adapter
from llm4gen_lite.attention import capture_cross_attention, cross_attention_layers
from conftest import HashEncoder  # model-free deterministic TextEncoder
from llm4gen_lite.encoders import PromptTruncatedWarning, TextFeatures, load_encoder
from llm4gen_lite.pipeline import ENCODERS_FILE, LLM4GenPipeline
from llm4gen_lite.unet import build_unet, load_sd15, write_tiny_sd15

D, CLIP_DIM, LLM_DIM = 32, 32, 24  # CLIP-role dim = UNet dim: the clip-side projection is the identity
PROMPTS = ["a red circle left of a blue square", "a small green triangle"]
STEPS = 2


@pytest.fixture(scope="module")
def unet():
    torch.manual_seed(0)
    return build_unet("tiny", cross_attention_dim=D).eval()


@pytest.fixture(scope="module")
def encoders():
    return HashEncoder(CLIP_DIM, max_length=12, seed=1), HashEncoder(LLM_DIM, max_length=16, seed=2)


def make_pipe(unet, encoders, variant="cam", seed=0, scheduler=None, **adapter_kw) -> LLM4GenPipeline:
    torch.manual_seed(seed)
    adapter = build_adapter(variant, CLIP_DIM, LLM_DIM, D, num_heads=4, **adapter_kw).eval()
    pipe = LLM4GenPipeline(
        unet=unet, scheduler=scheduler or DDIMScheduler(), adapter=adapter,
        clip_encoder=encoders[0], llm_encoder=encoders[1],
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def sample(pipe, seed=0, **kw) -> torch.Tensor:
    kw.setdefault("prompt", PROMPTS)
    return pipe(num_inference_steps=STEPS, generator=torch.Generator().manual_seed(seed), output_type="pt", **kw).images


def test_clip_variant_matches_a_plain_diffusers_loop(unet, encoders):
    """Parity: the `clip` pipeline is exactly SD-style CFG on the same UNet, scheduler, features and seed."""
    pipe = make_pipe(unet, encoders, "clip")
    images = sample(pipe, guidance_scale=3.0)

    clip = encoders[0]
    cond, null = clip.encode(PROMPTS), clip.encode([""])
    states = torch.cat([null.features.expand(2, -1, -1), cond.features])
    mask = torch.cat([null.mask.expand(2, -1), cond.mask])
    scheduler = DDIMScheduler()
    scheduler.set_timesteps(STEPS)
    latents = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * scheduler.init_noise_sigma
    with torch.no_grad():
        for t in scheduler.timesteps:
            model_in = scheduler.scale_model_input(torch.cat([latents] * 2), t)
            uncond, text = unet(model_in, t, encoder_hidden_states=states, encoder_attention_mask=mask).sample.chunk(2)
            latents = scheduler.step(uncond + 3.0 * (text - uncond), t, latents).prev_sample
    expected = (latents.clamp(-1, 1) + 1) / 2
    assert torch.allclose(images, expected, atol=1e-6)


def test_cam_with_zeroed_and_masked_llm_branch_matches_clip(unet, encoders):
    clip_feats = encoders[0].encode(PROMPTS)
    llm_feats = encoders[1].encode(PROMPTS)

    def masked(f: TextFeatures) -> TextFeatures:
        return TextFeatures(f.features, torch.zeros_like(f.mask), f.offsets, f.truncated)

    negatives = {"negative_clip_features": encoders[0].encode([""])}
    base = sample(make_pipe(unet, encoders, "clip"), prompt=None, clip_features=clip_feats, **negatives)
    cam = make_pipe(unet, encoders, "cam", llm_scale=0.0)
    off = sample(
        cam, prompt=None, clip_features=clip_feats, llm_features=masked(llm_feats),
        negative_llm_features=masked(encoders[1].encode([""])), **negatives,
    )
    assert torch.allclose(base, off, atol=1e-5)
    visible = sample(
        cam, prompt=None, clip_features=clip_feats, llm_features=llm_feats,
        negative_llm_features=encoders[1].encode([""]), **negatives,
    )
    assert not torch.allclose(base, visible, atol=1e-3), "unmasked LLM tokens must change the images"


def test_same_seed_same_images_and_seed_matters(unet, encoders):
    pipe = make_pipe(unet, encoders, "cam")
    assert torch.equal(sample(pipe, seed=3), sample(pipe, seed=3))
    assert not torch.allclose(sample(pipe, seed=3), sample(pipe, seed=4))


def test_llm_guidance_reduces_to_cfg_when_scales_are_equal(unet, encoders):
    pipe = make_pipe(unet, encoders, "cam")
    cfg = sample(pipe, guidance_scale=4.0)  # two branches
    guided = sample(pipe, guidance_scale=4.0, llm_guidance_scale=4.0)  # three branches
    assert torch.allclose(cfg, guided, atol=1e-4)  # same formula, different float order and batch
    assert not torch.allclose(cfg, sample(pipe, guidance_scale=4.0, llm_guidance_scale=8.0), atol=1e-3)
    clip_pipe = make_pipe(unet, encoders, "clip")  # no LLM branch: s_llm has nothing to act on
    clip_cfg = sample(clip_pipe, guidance_scale=4.0)
    assert torch.allclose(clip_cfg, sample(clip_pipe, guidance_scale=4.0, llm_guidance_scale=9.0), atol=1e-4)


@pytest.mark.parametrize("variant", ["llm", "concat"])
def test_other_variants_sample(unet, encoders, variant):
    images = sample(make_pipe(unet, encoders, variant), guidance_scale=2.0, llm_guidance_scale=3.0)
    assert images.shape == (2, 3, 32, 32) and torch.isfinite(images).all()


def test_schedulers_and_prediction_types_swap_in(unet, encoders):
    pipe = make_pipe(unet, encoders, "cam")
    eps_ddim = sample(pipe)
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
    dpm = sample(pipe)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config, prediction_type="v_prediction")
    v_ddim = sample(pipe)
    for images in (dpm, v_ddim):
        assert images.shape == eps_ddim.shape and torch.isfinite(images).all()
        assert not torch.allclose(images, eps_ddim, atol=1e-3)


def test_output_types(unet, encoders):
    pipe = make_pipe(unet, encoders, "cam")
    kw = {"prompt": PROMPTS[0], "num_inference_steps": 2, "generator": torch.Generator().manual_seed(0)}
    pil = pipe(output_type="pil", **kw).images
    kw["generator"] = torch.Generator().manual_seed(0)
    arr = pipe(output_type="np", num_images_per_prompt=2, **kw).images
    assert len(pil) == 1 and pil[0].size == (32, 32)
    assert arr.shape == (2, 32, 32, 3) and 0 <= arr.min() and arr.max() <= 1
    assert np.abs(np.asarray(pil[0]).astype(int) - (arr[0] * 255).round()).max() <= 1  # batch 1 vs 2: float noise
    assert not np.allclose(arr[0], arr[1], atol=1e-3), "images of one prompt get different noise"


def test_attention_capture_in_the_pipeline(unet, encoders):
    pipe = make_pipe(unet, encoders, "cam")
    before = dict(unet.attn_processors)
    out = pipe(PROMPTS, num_inference_steps=STEPS, generator=torch.Generator().manual_seed(0), output_type="pt",
               return_attention=True)
    assert dict(unet.attn_processors) == before, "capture must restore the original processors"
    assert all(isinstance(p, AttnProcessor2_0) for p in unet.attn_processors.values())
    att = out.attention
    assert set(att.maps) == set(cross_attention_layers(unet)) and len(att.maps) == 7
    tokens = att.clip_tokens + att.llm_tokens
    for layer_map in att.maps.values():
        assert layer_map.shape[:2] == (2, tokens)
        assert torch.allclose(layer_map.sum(1), torch.ones(()), atol=1e-5), "probabilities over tokens"
        assert torch.all(layer_map[~att.mask] == 0), "padding tokens get no attention"
    assert {size for size in att.by_resolution()} == {(16, 16), (8, 8)}
    assert torch.allclose(out.images, sample(pipe), atol=1e-4), "capturing does not change the images"


def test_attention_capture_keeps_the_graph_for_training(unet, encoders):
    adapter = build_adapter("cam", CLIP_DIM, LLM_DIM, D, num_heads=4)
    clip, llm = encoders[0].encode(PROMPTS), encoders[1].encode(PROMPTS)
    with capture_cross_attention(unet, layers=["up_blocks.1"], mode="last") as store:
        cond = adapter(clip.features, clip.mask, llm.features, llm.mask)
        unet(torch.randn(2, 3, 32, 32), torch.tensor([5, 50]), **cond.unet_kwargs())
        assert len(store.layers) == 2 and all(name.startswith("up_blocks.1") for name in store.layers)
        maps = store.get(store.layers[0])
        assert maps.shape == (2, cond.states.shape[1], 16, 16) and maps.requires_grad
        maps[:, cond.llm_slice].square().sum().backward()
    assert adapter.cam.llm_proj.weight.grad.abs().sum() > 0
    assert unet.up_blocks[1].attentions[0].transformer_blocks[0].attn2.to_k.weight.grad.abs().sum() > 0
    unet.zero_grad(set_to_none=True)
    with pytest.raises(ValueError, match="no cross-attention layer matches"):
        with capture_cross_attention(unet, layers=["nowhere"]):
            pass


def test_mean_capture_averages_calls_and_handles_non_square_inputs(unet, encoders):
    clip = encoders[0].encode(PROMPTS)
    kw = {"encoder_hidden_states": clip.features, "encoder_attention_mask": clip.mask}
    inputs = [torch.randn(2, 3, 32, 16, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    layer = "down_blocks.1.attentions.0.transformer_blocks.0.attn2"
    singles = []
    with torch.no_grad():
        for x in inputs:
            with capture_cross_attention(unet, layers=[layer]) as store:
                unet(x, torch.tensor([3, 300]), **kw)
            singles.append(store.get(layer))
        with capture_cross_attention(unet, layers=[layer], mode="mean") as store:
            for x in inputs:
                unet(x, torch.tensor([3, 300]), **kw)
    assert singles[0].shape == (2, 12, 16, 8), "maps keep the input's aspect ratio"
    assert torch.allclose(store.get(layer), (singles[0] + singles[1]) / 2, atol=1e-6)


@pytest.mark.parametrize("variant", ["cam", "clip"])
def test_save_and_load_round_trip(unet, encoders, tmp_path, variant):
    """`clip` at CLIP width = UNet width has no weights at all (as SD1.5's): it must round-trip too."""
    pipe = make_pipe(unet, encoders, variant, llm_scale=0.7)
    assert bool(pipe.adapter.state_dict()) == (variant == "cam")
    with pytest.warns(UserWarning, match="has no load_spec"):
        pipe.save_pretrained(tmp_path)
    saved = {p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*") if p.is_file()}
    assert {"model_index.json", ENCODERS_FILE, "unet/diffusion_pytorch_model.safetensors",
            "adapter/diffusion_pytorch_model.safetensors", "scheduler/scheduler_config.json"} <= saved
    assert not [p for p in saved if p.endswith((".bin", ".pt", ".pkl", ".ckpt"))], "no pickle files"
    index = json.loads((tmp_path / "model_index.json").read_text())
    assert index["adapter"] == ["llm4gen_lite.adapter", "ConditioningAdapter"]

    loaded = LLM4GenPipeline.from_pretrained(tmp_path, clip_encoder=encoders[0], llm_encoder=encoders[1])
    loaded.set_progress_bar_config(disable=True)
    assert loaded.adapter.config.llm_scale == 0.7
    assert torch.equal(sample(loaded), sample(pipe))
    with pytest.raises(ValueError, match="without a load spec; pass it as clip_encoder"):
        LLM4GenPipeline.from_pretrained(tmp_path)
    features_only = LLM4GenPipeline.from_pretrained(tmp_path, load_encoders=False)
    assert features_only.clip_encoder is None and features_only.llm_encoder is None


def test_real_encoders_are_rebuilt_from_encoders_json(unet, tiny_clip_text_dir, tiny_llama_dir, tmp_path):
    """Tiny random CLIPTextModel + Llama folders, loaded through `load_encoder` as a user's would be."""
    clip = load_encoder(str(tiny_clip_text_dir), role="clip")
    llm = load_encoder(str(tiny_llama_dir), role="llm", layer=1, max_length=24)
    torch.manual_seed(0)
    adapter = build_adapter("cam", clip.dim, llm.dim, D, num_heads=4)
    pipe = LLM4GenPipeline(unet, DDIMScheduler(), adapter, clip_encoder=clip, llm_encoder=llm)
    pipe.set_progress_bar_config(disable=True)
    pipe.save_pretrained(tmp_path)
    assert json.loads((tmp_path / ENCODERS_FILE).read_text())["llm"]["spec"] == llm.load_spec
    rebuilt = LLM4GenPipeline.from_pretrained(tmp_path)
    rebuilt.set_progress_bar_config(disable=True)
    assert (rebuilt.clip_encoder.identity, rebuilt.llm_encoder.identity) == (clip.identity, llm.identity)
    assert torch.equal(sample(rebuilt), sample(pipe))

    long_prompt = "a red circle left of a blue square " * 3  # fits 77 CLIP tokens, not 24 LLM tokens
    with pytest.warns(PromptTruncatedWarning, match=re.escape(long_prompt[:30])):
        rebuilt(long_prompt, num_inference_steps=1, output_type="pt")


def test_sd15_structured_checkpoint_samples_in_latent_space(encoders, tmp_path):
    # SD1.5's structure at width 64 (test_unet runs the real width, 768)
    parts = load_sd15(write_tiny_sd15(tmp_path / "sd15", cross_attention_dim=64))
    clip64 = HashEncoder(64, max_length=77, seed=3)
    torch.manual_seed(0)
    adapter = build_adapter("cam", 64, LLM_DIM, 64)  # CLIP width = UNet width: CLIP tokens pass through unchanged
    pipe = LLM4GenPipeline(
        parts.unet, parts.scheduler, adapter, vae=parts.vae, clip_encoder=clip64, llm_encoder=encoders[1]
    )
    pipe.set_progress_bar_config(disable=True)
    images = sample(pipe, llm_guidance_scale=5.0)
    assert images.shape == (2, 3, 64, 64) and torch.isfinite(images).all()
    with pytest.warns(UserWarning, match="has no load_spec"):
        pipe.save_pretrained(tmp_path / "saved")
    reloaded = LLM4GenPipeline.from_pretrained(tmp_path / "saved", clip_encoder=clip64, llm_encoder=encoders[1])
    reloaded.set_progress_bar_config(disable=True)
    assert reloaded.vae is not None and torch.equal(sample(reloaded, llm_guidance_scale=5.0), images)


def test_bad_prompts(unet, encoders):
    pipe = make_pipe(unet, encoders, "cam")
    with pytest.raises(ValueError, match="prompts is empty"):
        pipe([], num_inference_steps=1)
    with pytest.raises(TypeError, match="prompt 1 is a int"):
        pipe(["a red circle", 7], num_inference_steps=1)
    long_prompt = "a red circle " * 10
    with pytest.warns(PromptTruncatedWarning, match=re.escape(long_prompt[:20])):
        pipe([long_prompt], num_inference_steps=1, output_type="pt")
    with pytest.warns(PromptTruncatedWarning):
        cut = encoders[0].encode([long_prompt])
    with pytest.warns(PromptTruncatedWarning, match=r"precomputed clip features of prompt\(s\) \[0\]"):
        pipe(clip_features=cut, llm_features=encoders[1].encode(["a"]), num_inference_steps=1, output_type="pt")
    with pytest.raises(ValueError, match="has no llm_encoder"):
        LLM4GenPipeline(unet, DDIMScheduler(), pipe.adapter, clip_encoder=encoders[0])(PROMPTS, num_inference_steps=1)


@pytest.mark.filterwarnings("ignore:encoder hash.*has no load_spec")
def test_dimension_mismatches_name_both_sides(unet, encoders, tmp_path):
    pipe = make_pipe(unet, encoders, "cam")
    pipe.save_pretrained(tmp_path)
    config_file = tmp_path / "adapter" / "config.json"
    config = json.loads(config_file.read_text())
    config_file.write_text(json.dumps({**config, "cross_attention_dim": 48}))
    unet_file = re.escape(str(tmp_path / "unet" / "config.json"))
    expected = rf"cross_attention_dim=48 in {re.escape(str(config_file))} but cross_attention_dim=32 in {unet_file}"
    with pytest.raises(ValueError, match=expected):
        LLM4GenPipeline.from_pretrained(tmp_path, clip_encoder=encoders[0], llm_encoder=encoders[1])
    config_file.write_text(json.dumps(config))
    with pytest.raises(ValueError, match="dim=40 in the llm_encoder passed in but llm_dim=24"), \
            pytest.warns(UserWarning, match="differs from the one this pipeline was saved with"):
        LLM4GenPipeline.from_pretrained(tmp_path, clip_encoder=encoders[0], llm_encoder=HashEncoder(40, max_length=16))
    expected = "cross_attention_dim=64 in adapter.config but cross_attention_dim=32 in unet.config"
    with pytest.raises(ValueError, match=expected):
        LLM4GenPipeline(unet, DDIMScheduler(), build_adapter("clip", CLIP_DIM, LLM_DIM, 64))


def test_evaluate_pipeline_scores_every_prompt_of_the_sets_it_is_told_to(unet, encoders):
    from llm4gen_lite import report

    pipe = make_pipe(unet, encoders, "clip")
    pipe.set_progress_bar_config(disable=True)
    result = report.evaluate_pipeline(pipe, sets=("color", "test_comp"), max_prompts=2, steps=1, fid_samples=0,
                                      all_prompts=("test_comp",))
    assert result["sets"]["color"]["n"] == 2 and len(result["sets"]["color"]["per_prompt"]) == 2
    n = len(report.shapes.load_prompt_set("test_comp"))
    assert result["sets"]["test_comp"]["n"] == n and len(result["sets"]["test_comp"]["per_prompt"]) == n
    assert result["settings"]["all_prompts"] == ["test_comp"] and result["version"] == report.EVALUATION_VERSION
