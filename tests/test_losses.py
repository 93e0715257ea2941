"""Diffusion targets, min-SNR weights, attribute–entity token pairs and the entity-guided loss."""
from __future__ import annotations

import math

import pytest
import torch
from diffusers import DDPMScheduler, UNet2DConditionModel

from llm4gen_lite.adapter import build_adapter
from llm4gen_lite.attention import capture_cross_attention
from llm4gen_lite.losses import (
    caption_pairs, diffusion_loss, diffusion_target, entity_loss, entity_map_distances, map_distance, merge_token_pairs,
    min_snr_weights, predicted_x0, token_pairs, TokenPairs,
)
from llm4gen_lite.shapes import ShapeObject, Scene, short_caption


def test_targets_match_the_diffusers_scheduler():
    sched = DDPMScheduler(prediction_type="v_prediction", rescale_betas_zero_snr=True, beta_schedule="squaredcos_cap_v2")
    x0, noise = torch.randn(4, 3, 8, 8), torch.randn(4, 3, 8, 8)
    t = torch.tensor([0, 10, 500, 999])
    v = diffusion_target(x0, noise, sched.alphas_cumprod[t], "v_prediction")
    assert torch.allclose(v, sched.get_velocity(x0, noise, t), atol=1e-6)
    assert diffusion_target(x0, noise, sched.alphas_cumprod[t], "epsilon") is noise
    assert diffusion_target(x0, noise, sched.alphas_cumprod[t], "sample") is x0
    with pytest.raises(ValueError, match="prediction_type"):
        diffusion_target(x0, noise, sched.alphas_cumprod[t], "x0")


def test_min_snr_weights():
    a = torch.tensor([0.0, 0.5, 0.99])  # snr 0, 1, 99
    v = min_snr_weights(a, 5.0, "v_prediction")
    assert torch.allclose(v, torch.tensor([0.0, 0.5, 5 / 100]), atol=1e-6)
    eps = min_snr_weights(a[1:], 5.0, "epsilon")
    assert torch.allclose(eps, torch.tensor([1.0, 5 / 99]), atol=1e-6)
    pred = torch.zeros(3, 2)
    target = torch.ones(3, 2)
    assert diffusion_loss(pred, target) == 1.0
    assert torch.isclose(diffusion_loss(pred, target, a, 5.0, "v_prediction"), v.mean())


def test_map_distance():
    a = torch.tensor([[1.0, 0.0, 0.0, 0.0]])
    b = torch.tensor([[0.0, 0.0, 0.0, 2.0]])
    assert map_distance(a, a * 3).item() == pytest.approx(0.0, abs=1e-6)  # spatially normalised first
    assert map_distance(a, b).item() == pytest.approx(1.0)
    assert map_distance(a, a * 3, "l2").item() == pytest.approx(0.0, abs=1e-9)
    small, big = map_distance(a, b, "l2"), map_distance(a.repeat_interleave(4, 1), b.repeat_interleave(4, 1), "l2")
    assert small.item() == pytest.approx(big.item())  # resolution-independent
    with pytest.raises(ValueError, match="distance"):
        map_distance(a, b, "kl")


def test_caption_pairs_for_shapes_captions_and_free_text():
    scene = Scene((ShapeObject("circle", "red", "small", "filled", (0.3, 0.5)),))
    caption = short_caption(scene, __import__("numpy").random.default_rng(0), mention=("size",))
    pairs = caption_pairs(caption)
    words = {(caption.text[a[0]:a[1]], caption.text[e[0]:e[1]]) for a, e in pairs}
    assert ("red", "circle") in words and ("small", "circle") in words
    text = "a fluffy white sheep next to a red car"
    free = {(text[a[0]:a[1]], text[e[0]:e[1]]) for a, e in caption_pairs(text)}
    assert {("white", "sheep"), ("red", "car")} <= free


def test_token_pairs_use_the_encoder_offsets_and_skip_dropped_rows():
    text = "a red circle"
    offsets = [(0, 0), (0, 1), (2, 5), (6, 12), (0, 0), (0, 0)]  # BOS, a, red, circle, padding
    pairs = token_pairs([[((2, 5), (6, 12))], [((2, 5), (6, 12))]], [offsets, offsets], total_tokens=10, token_offset=3,
                        keep_rows=[True, False])
    assert len(pairs) == 1 and pairs.batch_index.tolist() == [0]
    assert pairs.attr_weights[0].nonzero().flatten().tolist() == [3 + 2]
    assert pairs.entity_weights[0].nonzero().flatten().tolist() == [3 + 3]
    assert text[2:5] == "red"
    both = merge_token_pairs([pairs, pairs])
    assert len(both) == 2


def _tiny_unet(cross_dim: int = 16) -> UNet2DConditionModel:
    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=8, in_channels=3, out_channels=3, block_out_channels=(16, 16), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=cross_dim, norm_num_groups=8, attention_head_dim=2,
    )


def test_entity_loss_sends_gradients_into_the_adapter_and_cross_attention():
    unet = _tiny_unet()
    adapter = build_adapter("cam", clip_dim=12, llm_dim=20, cross_attention_dim=16, num_heads=2)
    clip, llm = torch.randn(2, 6, 12), torch.randn(2, 7, 20)
    clip_mask, llm_mask = torch.ones(2, 6, dtype=torch.bool), torch.ones(2, 7, dtype=torch.bool)
    offsets_clip = [[(0, 0), (0, 1), (2, 5), (6, 12), (0, 0), (0, 0)]] * 2
    offsets_llm = [[(0, 1), (2, 5), (6, 12)] + [(0, 0)] * 4] * 2
    span_pairs = [[((2, 5), (6, 12))]] * 2
    pairs = merge_token_pairs([
        token_pairs(span_pairs, offsets_clip, 13, 0),
        token_pairs(span_pairs, offsets_llm, 13, 6),
    ])
    with capture_cross_attention(unet, mode="last") as store:
        cond = adapter(clip, clip_mask, llm, llm_mask)
        unet(torch.randn(2, 3, 8, 8), torch.tensor([10, 900]), **cond.unet_kwargs())
    loss = entity_loss([store.get(layer) for layer in store.layers], pairs, "cosine")
    assert loss.item() > 0
    loss.backward()
    cam_grad = sum(p.grad.abs().sum() for p in adapter.cam.parameters() if p.grad is not None)
    attn2 = [p for n, p in unet.named_parameters() if "attn2.to_k" in n or "attn2.to_q" in n]
    assert cam_grad > 0, "no gradient reached the Cross-Adapter Module"
    assert attn2 and all(p.grad is not None and p.grad.abs().sum() > 0 for p in attn2), "no gradient in attn2"
    # rows outside the timestep range contribute nothing
    zero = entity_loss([store.get(layer) for layer in store.layers], pairs, "cosine", row_weights=torch.zeros(2))
    assert zero.item() == 0.0


def test_entity_loss_matches_the_definition_on_random_maps_and_pairs():
    """The sparse token selection gives the loss (and gradient) of the written-out definition:
    mean over layers and pairs of 1 - cos(A_attr, A_entity), maps normalised to sum 1."""
    g = torch.Generator().manual_seed(0)
    batch, tokens = 3, 9
    layers = [torch.rand(batch, tokens, 4, 4, generator=g).requires_grad_() for _ in range(2)]
    weights = {}
    for side in ("attr", "ent"):
        w = torch.zeros(5, tokens)
        for p in range(5):
            picked = torch.randperm(tokens, generator=g)[: 1 + p % 2]
            w[p, picked] = 1.0 / len(picked)
        weights[side] = w
    pairs = TokenPairs(torch.tensor([0, 2, 1, 2, 0]), weights["attr"], weights["ent"])
    loss = entity_loss(layers, pairs, "cosine")
    (grads,) = torch.autograd.grad(loss, [layers[1]])

    def definition(maps):
        per_layer = []
        for m in maps:
            flat = m.flatten(2)
            d = []
            for p, b in enumerate(pairs.batch_index.tolist()):
                a = (weights["attr"][p, :, None] * flat[b]).sum(0)
                e = (weights["ent"][p, :, None] * flat[b]).sum(0)
                d.append(1 - torch.nn.functional.cosine_similarity(a / a.sum(), e / e.sum(), dim=0))
            per_layer.append(torch.stack(d).mean())
        return torch.stack(per_layer).mean()

    expected = definition(layers)
    (expected_grads,) = torch.autograd.grad(expected, [layers[1]])
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    torch.testing.assert_close(grads, expected_grads, rtol=1e-4, atol=1e-7)


def test_entity_map_distances_tell_selective_maps_from_uniform_ones():
    offsets = [[(0, 1), (2, 5), (6, 12), (13, 17), (18, 24)]]  # "a red circle blue square"
    pairs = token_pairs([[((2, 5), (6, 12)), ((13, 17), (18, 24))]], offsets, total_tokens=5)
    uniform = torch.ones(1, 5, 4, 4)
    d = entity_map_distances(uniform, pairs)
    assert d["own"] == pytest.approx(0.0, abs=1e-6) and d["other"] == pytest.approx(0.0, abs=1e-6)
    assert d["pairs"] == 2 and d["other_pairs"] == 2
    selective = torch.full((1, 5, 4, 4), 1e-3)
    selective[0, 1:3, :, :2] = 1.0  # "red" and "circle" on the left half
    selective[0, 3:5, :, 2:] = 1.0  # "blue" and "square" on the right half
    d = entity_map_distances(selective, pairs)
    assert d["own"] < 1e-3 and d["other"] > 0.9, "bound maps: close to their own entity, far from the other"
    alone = token_pairs([[((2, 5), (6, 12))]], offsets, total_tokens=5)
    assert math.isnan(entity_map_distances(selective, alone)["other"]), "one entity: nothing to compare with"


def test_entity_loss_without_pairs_is_a_zero_with_a_graph():
    maps = [torch.rand(2, 5, 4, 4, requires_grad=True)]
    empty = token_pairs([[], []], [[(0, 0)] * 5] * 2, total_tokens=5)
    loss = entity_loss(maps, empty)
    assert loss.item() == 0.0 and loss.requires_grad


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_predicted_x0_inverts_the_diffusion_target(prediction_type):
    torch.manual_seed(0)
    x0, noise = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8)
    a = torch.tensor([0.9, 0.5, 0.05])
    xt = a.sqrt().view(-1, 1, 1, 1) * x0 + (1 - a).sqrt().view(-1, 1, 1, 1) * noise
    target = diffusion_target(x0, noise, a, prediction_type)
    assert torch.allclose(predicted_x0(target, xt, a, prediction_type), x0, atol=1e-5)
