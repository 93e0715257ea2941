"""Conditioning adapters: CAM equations, variants, masking, drop_llm, persistence, bad input."""
from __future__ import annotations

import pytest
import torch
from diffusers import UNet2DConditionModel
from torch import nn

from llm4gen_lite.adapter import VARIANTS, ConditioningAdapter, CrossAdapterModule, build_adapter
from llm4gen_lite.unet import build_unet

CLIP_DIM, LLM_DIM, D = 24, 40, 32


def features(batch: int = 2, clip_len: int = 6, llm_len: int = 9, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    clip = torch.randn(batch, clip_len, CLIP_DIM, generator=g)
    llm = torch.randn(batch, llm_len, LLM_DIM, generator=g)
    clip_mask = torch.zeros(batch, clip_len, dtype=torch.bool)
    llm_mask = torch.zeros(batch, llm_len, dtype=torch.bool)
    for row in range(batch):  # different real lengths per row, the rest padding
        clip_mask[row, : clip_len - 2 - row] = True
        llm_mask[row, : llm_len - 3 - row] = True
    return clip, clip_mask, llm, llm_mask


def adapter(variant: str, seed: int = 0, **kw) -> ConditioningAdapter:
    torch.manual_seed(seed)
    return build_adapter(variant, CLIP_DIM, LLM_DIM, D, num_heads=4, **kw).eval()


@pytest.mark.parametrize("variant", VARIANTS)
def test_variant_layout_and_masks(variant):
    clip, clip_mask, llm, llm_mask = features()
    cond = adapter(variant)(clip, clip_mask, llm, llm_mask)
    # LLM tokens are trimmed to the batch's longest real prompt (6 of 9 here)
    expected = {"clip": (6, 0), "llm": (0, 6), "concat": (6, 6), "cam": (6, 6)}[variant]
    assert (cond.clip_tokens, cond.llm_tokens) == expected
    assert cond.states.shape == (2, sum(expected), D)
    assert cond.mask.dtype == torch.bool and cond.mask.shape == (2, sum(expected))
    if expected[0]:
        assert torch.equal(cond.mask[:, cond.clip_slice], clip_mask)
    if expected[1]:
        assert torch.equal(cond.mask[:, cond.llm_slice], llm_mask[:, :6])
    assert torch.all(cond.states[~cond.mask] == 0), "padded positions must be zeroed"


@pytest.mark.parametrize("variant", ["llm", "concat", "cam"])
def test_trimmed_llm_padding_changes_no_unet_output(variant):
    clip, clip_mask, llm, llm_mask = features()
    torch.manual_seed(0)
    unet = build_unet("tiny", cross_attention_dim=D, sample_size=8).eval()
    x, t = torch.randn(2, 3, 8, 8), torch.tensor([10, 500])
    with torch.no_grad():
        cond = adapter(variant)(clip, clip_mask, llm, llm_mask)
        full = cond.padded(9)  # the untrimmed layout: 9 LLM positions, the last 3 masked in both rows
        a = unet(x, t, **cond.unet_kwargs()).sample
        b = unet(x, t, **full.unet_kwargs()).sample
    assert cond.llm_tokens == 6 and full.states.shape[1] == cond.clip_tokens + 9
    assert torch.allclose(a, b, atol=1e-6)


def test_stacking_pads_llm_parts_of_different_lengths():
    clip, clip_mask, llm, llm_mask = features()
    cam = adapter("cam")
    with torch.no_grad():
        long = cam(clip, clip_mask, llm, llm_mask)
        short = cam(clip, clip_mask, llm[:, :3], llm_mask[:, :3])
    both = type(long).cat([short, long])
    assert (short.llm_tokens, long.llm_tokens, both.llm_tokens) == (3, 6, 6)
    assert torch.equal(both.states[2:], long.states) and torch.equal(both.states[:2, :9], short.states)
    assert not both.mask[:2, 9:].any() and torch.all(both.states[:2, 9:] == 0)


def test_cam_matches_reference_equations():
    """CAM = Linear -> MHA(Q=LN(L1), K=V=LN(C)) with residual -> FFN(LN(X)) with residual (torch's MHA as reference)."""
    torch.manual_seed(0)
    cam = CrossAdapterModule(LLM_DIM, D, num_heads=4).eval()
    clip = torch.randn(2, 6, D)
    clip_mask = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 0, 0, 0, 0]], dtype=torch.bool)
    llm = torch.randn(2, 9, LLM_DIM)

    mha = nn.MultiheadAttention(D, 4, batch_first=True).eval()
    with torch.no_grad():
        mha.in_proj_weight.copy_(torch.cat([cam.to_q.weight, cam.to_k.weight, cam.to_v.weight]))
        mha.in_proj_bias.copy_(torch.cat([cam.to_q.bias, cam.to_k.bias, cam.to_v.bias]))
        mha.out_proj.weight.copy_(cam.to_out.weight)
        mha.out_proj.bias.copy_(cam.to_out.bias)
        l1 = cam.llm_proj(llm)
        ctx = cam.norm_context(clip)
        attn, _ = mha(cam.norm_query(l1), ctx, ctx, key_padding_mask=~clip_mask, need_weights=False)
        x = l1 + attn
        reference = x + cam.ffn[2](nn.functional.gelu(cam.ffn[0](cam.norm_ffn(x))))
        assert torch.allclose(cam(clip, clip_mask, llm), reference, atol=1e-5)


def test_sd15_scale_parameter_count_matches_paper():
    """At SD1.5 scale (d = 768, T5-XL d_llm = 2048) the CAM has ~8.7M parameters, as the paper reports."""
    cam = CrossAdapterModule(2048, 768, num_heads=8)
    count = sum(p.numel() for p in cam.parameters())
    assert 8.6e6 < count < 8.8e6
    sd15 = build_adapter("cam", 768, 2048, 768)
    assert isinstance(sd15.clip_proj, nn.Identity), "SD1.5: CLIP tokens pass through unchanged"


def test_padding_features_change_nothing_in_the_unet():
    """Features at padded positions (CLIP and LLM) cannot change the UNet output."""
    torch.manual_seed(0)
    unet = build_unet("tiny", cross_attention_dim=D).eval()
    cam = adapter("cam")
    clip, clip_mask, llm, llm_mask = features()
    clip2, llm2 = clip.clone(), llm.clone()
    clip2[~clip_mask] = 100 * torch.randn(int((~clip_mask).sum()), CLIP_DIM)
    llm2[~llm_mask] = 100 * torch.randn(int((~llm_mask).sum()), LLM_DIM)
    x, t = torch.randn(2, 3, 32, 32), torch.tensor([10, 500])
    with torch.no_grad():
        a = unet(x, t, **cam(clip, clip_mask, llm, llm_mask).unet_kwargs()).sample
        b = unet(x, t, **cam(clip2, clip_mask, llm2, llm_mask).unet_kwargs()).sample
        c = unet(x, t, **cam(clip, clip_mask, llm + 1, llm_mask).unet_kwargs()).sample
    assert torch.allclose(a, b, atol=1e-6)
    assert not torch.allclose(a, c, atol=1e-3), "real LLM tokens must matter"


def test_drop_llm_leaves_exactly_the_clip_condition():
    clip, clip_mask, llm, llm_mask = features()
    cam, base = adapter("cam"), adapter("clip")
    base.clip_proj.load_state_dict(cam.clip_proj.state_dict())
    drop = torch.tensor([True, False])
    with torch.no_grad():
        cond = cam(clip, clip_mask, llm, llm_mask, drop_llm=drop)
        ref = base(clip, clip_mask)
    assert cond.states.shape == (2, 6 + 5, D), "the LLM part keeps row 1's 5 real tokens"
    assert not cond.mask[0, cond.llm_slice].any() and torch.all(cond.states[0, cond.llm_slice] == 0)
    assert torch.equal(cond.mask[1, cond.llm_slice], llm_mask[1, :5])
    assert torch.allclose(cond.states[:, cond.clip_slice], ref.states)
    # clip: a no-op; llm: the null condition (no token left)
    assert torch.equal(base(clip, clip_mask, drop_llm=drop).states, ref.states)
    null = adapter("llm")(None, None, llm, llm_mask, drop_llm=torch.tensor([True, True]))
    assert not null.mask.any() and torch.all(null.states == 0)


def test_llm_scale_multiplies_the_appended_branch():
    clip, clip_mask, llm, llm_mask = features()
    with torch.no_grad():
        one = adapter("cam", llm_scale=1.0)(clip, clip_mask, llm, llm_mask)
        two = adapter("cam", llm_scale=2.0)(clip, clip_mask, llm, llm_mask)
    assert torch.allclose(two.states[:, one.llm_slice], 2 * one.states[:, one.llm_slice], atol=1e-6)
    assert torch.equal(two.states[:, one.clip_slice], one.states[:, one.clip_slice])


def test_gradients_flow_and_stay_finite_even_without_clip_tokens():
    clip, clip_mask, llm, llm_mask = features()
    clip_mask[0] = False  # a row with no real CLIP token at all
    cam = adapter("cam").train()
    cam(clip, clip_mask, llm, llm_mask).states.square().sum().backward()
    for name, p in cam.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert any(p.grad.abs().sum() > 0 for p in cam.cam.to_k.parameters())


def test_save_and_load_round_trip_with_safetensors(tmp_path):
    clip, clip_mask, llm, llm_mask = features()
    cam = adapter("cam", llm_scale=0.5, ffn_activation="quick_gelu")
    cam.save_pretrained(tmp_path, safe_serialization=True)
    assert (tmp_path / "diffusion_pytorch_model.safetensors").is_file()
    assert not list(tmp_path.glob("*.bin"))
    loaded = ConditioningAdapter.from_pretrained(tmp_path).eval()
    assert loaded.config.variant == "cam" and loaded.config.llm_scale == 0.5
    with torch.no_grad():
        assert torch.equal(cam(clip, clip_mask, llm, llm_mask).states, loaded(clip, clip_mask, llm, llm_mask).states)


def test_bad_input_gives_clear_errors():
    clip, clip_mask, llm, llm_mask = features()
    with pytest.raises(ValueError, match="unknown conditioning variant 'fused'"):
        build_adapter("fused", CLIP_DIM, LLM_DIM, D)
    with pytest.raises(ValueError, match="not divisible by num_heads=5"):
        build_adapter("cam", CLIP_DIM, LLM_DIM, D, num_heads=5)
    cam = adapter("cam")
    with pytest.raises(ValueError, match=f"feature dim {LLM_DIM + 1} but the adapter was built for {LLM_DIM}"):
        cam(clip, clip_mask, torch.randn(2, 9, LLM_DIM + 1), llm_mask)
    with pytest.raises(ValueError, match="needs llm_states"):
        cam(clip, clip_mask)
    with pytest.raises(ValueError, match="mask of clip_states must have shape"):
        cam(clip, clip_mask[:, :3], llm, llm_mask)
    with pytest.raises(ValueError, match="different batch sizes"):
        cam(clip, clip_mask, llm[:1], llm_mask[:1])
    with pytest.raises(ValueError, match="drop_llm must have shape"):
        cam(clip, clip_mask, llm, llm_mask, drop_llm=torch.tensor([True]))


def test_cam_attention_weights_are_a_distribution_over_real_clip_tokens():
    cam = CrossAdapterModule(llm_dim=LLM_DIM, dim=D, num_heads=4)
    clip, clip_mask, llm, _ = features()
    clip = torch.nn.functional.pad(clip, (0, D - CLIP_DIM))
    probs = cam.attention_weights(clip, clip_mask, llm)
    assert probs.shape == (clip.shape[0], 4, llm.shape[1], clip.shape[1])
    assert torch.allclose(probs.sum(-1), torch.ones(probs.shape[:-1]), atol=1e-5)
    assert (probs.masked_select(~clip_mask[:, None, None, :].expand_as(probs)) == 0).all()


def test_pooled_text_is_the_mean_of_real_tokens_and_reaches_a_projection_unet():
    clip, clip_mask, llm, llm_mask = features()
    with torch.no_grad():
        cond = adapter("cam")(clip, clip_mask, llm, llm_mask)
    for row in range(2):
        real = cond.states[row, cond.mask[row]]
        assert torch.allclose(cond.pooled[row], real.mean(0), atol=1e-6)
    x, t = torch.randn(2, 3, 8, 8), torch.tensor([10, 500])
    torch.manual_seed(0)
    plain = build_unet("tiny", cross_attention_dim=D, sample_size=8).eval()
    torch.manual_seed(0)
    pooled = UNet2DConditionModel(**{**dict(plain.config), "class_embed_type": "projection",
                                     "projection_class_embeddings_input_dim": D}).eval()
    with torch.no_grad():
        kwargs = cond.unet_kwargs()
        a = pooled(x, t, **kwargs).sample
        b = pooled(x, t, **{**kwargs, "class_labels": kwargs["class_labels"] + 1}).sample
        assert not torch.allclose(a, b, atol=1e-4), "a projection-class UNet reads the pooled text"
        assert torch.equal(plain(x, t, **kwargs).sample, plain(x, t, **{k: v for k, v in kwargs.items()
                                                                          if k != "class_labels"}).sample)
