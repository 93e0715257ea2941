"""ShapesCLIP: tower shapes, causal padding invariance, InfoNCE learning, shipped weights, text-encoder contract."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from llm4gen_lite.encoders import PromptTruncatedWarning, TextEncoder, load_encoder
from llm4gen_lite.io import read_json
from llm4gen_lite.shapes_clip import (
    ShapesCLIP,
    ShapesCLIPConfig,
    ShapesCLIPTrainConfig,
    clip_score,
    contrastive_loss,
    default_checkpoint_dir,
    evaluation_pairs,
    load_model,
    load_recipe,
    retrieval_accuracy,
    save_model,
    shipped_model,
    tokenize,
    train_shapes_clip,
)

TINY = ShapesCLIPConfig(image_channels=(8, 16, 16), image_heads=2, token_dim=8, text_width=32, text_layers=2, text_heads=2, embed_dim=16)


def tiny_model(seed: int = 0, **overrides) -> ShapesCLIP:
    torch.manual_seed(seed)
    return ShapesCLIP(dataclasses.replace(TINY, **overrides))


@pytest.mark.parametrize("size", [32, 64])
def test_tower_shapes(size: int) -> None:
    model = tiny_model(image_size=size)
    images = torch.rand(3, 3, size, size) * 2 - 1
    tok = tokenize(["a red circle", "two blue squares left of a green triangle", ""])
    assert tok.input_ids.shape == (3, 77) and tok.attention_mask.dtype == torch.bool
    assert model.image_features(images).shape == (3, 16)
    assert model.text_tower(tok.input_ids).shape == (3, 77, 32)
    img, txt = model.encode_image(images), model.encode_text(tok.input_ids, tok.attention_mask)
    assert img.shape == txt.shape == (3, 16)
    assert torch.allclose(img.norm(dim=-1), torch.ones(3), atol=1e-5)
    logits = model(images, tok.input_ids, tok.attention_mask)
    assert logits.shape == (3, 3)


def test_bad_input_is_refused() -> None:
    model = tiny_model()
    with pytest.raises(ValueError, match=r"\[batch, 3, 32, 32\]"):
        model.encode_image(torch.zeros(2, 3, 64, 64))
    with pytest.raises(ValueError, match=r"\[-1, 1\]"):
        model.encode_image(torch.full((2, 3, 32, 32), 200.0))
    with pytest.raises(TypeError):
        tokenize("a red circle")
    with pytest.raises(ValueError, match="unknown ShapesCLIP config keys"):
        ShapesCLIPConfig.from_dict({"text_width": 32, "widht": 3})


def test_padding_never_reaches_real_tokens() -> None:
    """Causal mask: features of real tokens and pooled embeddings do not depend on trailing padding."""
    model = tiny_model()
    prompts = ["a small red circle", "a picture of two large blue squares above a cyan diamond on black"]
    full, cut = tokenize(prompts, pad_to_max=True), tokenize(prompts, pad_to_max=False)
    n = cut.input_ids.shape[1]
    with torch.no_grad():
        a, b = model.text_tower(full.input_ids)[:, :n], model.text_tower(cut.input_ids)
        assert torch.allclose(a[cut.attention_mask], b[cut.attention_mask], atol=1e-5)
        grouped = model.encode_text_grouped(cut.input_ids, cut.attention_mask)
        assert torch.allclose(grouped, model.encode_text(full.input_ids, full.attention_mask), atol=1e-5)


def test_infonce_loss_falls_on_a_small_batch() -> None:
    model = tiny_model()
    images, captions = evaluation_pairs("train", 16)
    tok = tokenize(captions, pad_to_max=False)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(20):
        loss = contrastive_loss(model(images, tok.input_ids, tok.attention_mask))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


def test_training_is_deterministic_and_round_trips(tmp_path) -> None:
    cfg = ShapesCLIPTrainConfig(steps=2, batch_size=8, warmup_steps=1, log_every=1)
    a, history = train_shapes_clip(TINY, cfg, log=lambda _: None)
    b, _ = train_shapes_clip(TINY, cfg, log=lambda _: None)
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(x, y), name
    assert len(history["loss"]) == 2 and history["wall_seconds"] > 0
    save_model(a, tmp_path, fp16=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]
    loaded = load_model(tmp_path)
    assert not any(p.requires_grad for p in loaded.parameters()) and not loaded.training
    for (name, x), y in zip(a.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(x, y), name


def test_shipped_recipe_matches_shipped_config() -> None:
    model_cfg, _ = load_recipe()
    assert model_cfg.to_dict() == read_json(default_checkpoint_dir() / "config.json")


# ---- shipped weights -----------------------------------------------------------------------


def test_shipped_weights_are_small_safetensors_only() -> None:
    folder = default_checkpoint_dir()
    assert (folder / "model.safetensors").stat().st_size <= 5_000_000
    assert not list(folder.glob("*.bin")) + list(folder.glob("*.pt")) + list(folder.glob("*.pkl"))


def test_shipped_weights_reproduce_recorded_retrieval() -> None:
    recorded = read_json(default_checkpoint_dir() / "metrics.json")["retrieval"]["test_iid/short"]
    images, captions = evaluation_pairs("test_iid", 256, dense_prob=0.0)
    measured = retrieval_accuracy(shipped_model(), images, captions)
    for direction in ("image_to_text", "text_to_image"):
        assert measured[direction] == pytest.approx(recorded[direction], abs=0.02)
        assert measured[direction] > 20 / 256  # far above chance (1/256)


def test_clip_score_prefers_matching_captions() -> None:
    images, captions = evaluation_pairs("test_iid", 32)
    matched = clip_score(images, captions)
    shuffled = clip_score(images, captions[1:] + captions[:1])
    assert matched.shape == (32,) and matched.min() >= 0 and matched.max() <= 100
    assert matched.mean() > shuffled.mean() + 5
    with pytest.raises(ValueError, match="32 images but 31 prompts"):
        clip_score(images, captions[:31])


def test_text_encoder_satisfies_the_contract() -> None:
    encoder = load_encoder("shapesclip")
    assert isinstance(encoder, TextEncoder)
    assert encoder.max_length == 77 and encoder.dim == 128
    assert encoder.model.weights_id in encoder.identity and "max_length=77" in encoder.identity
    assert not any(p.requires_grad for p in encoder.model.parameters()) and not encoder.model.training
    prompt = "a red circle"
    out = encoder.encode([prompt, ""])
    assert out.features.shape == (2, 77, 128) and out.features.dtype == torch.float32
    assert out.mask.dtype == torch.bool and out.mask.sum(1).tolist() == [5, 2]  # [CLS] a red circle [SEP]
    assert out.truncated == [False, False]
    assert (out.features[~out.mask] == 0).all()
    spans = [prompt[a:b] for a, b in out.offsets[0] if b > a]
    assert spans == ["a", "red", "circle"] and out.offsets[0][0] == (0, 0) and len(out.offsets[0]) == 77
    alone = encoder.encode([prompt]).features[0]
    assert torch.allclose(alone, out.features[0], atol=1e-6)  # independent of batch-mates
    long_prompt = "a red circle and a blue square " * 12
    with pytest.warns(PromptTruncatedWarning, match="a red circle and a blue square"):
        long = encoder.encode([long_prompt, prompt])
    assert long.truncated == [True, False] and long.mask[0].all()
