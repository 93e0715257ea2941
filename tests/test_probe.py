"""The word-swap probe (scripts/probe_conditioning.py) measures how far each prompt word moves the denoiser."""
from __future__ import annotations

import sys

import pytest
import torch
from diffusers import DDIMScheduler

from llm4gen_lite.adapter import build_adapter
from llm4gen_lite.attention import cross_attention_layers
from llm4gen_lite.config import load_config
from llm4gen_lite.paths import REPO_ROOT
from llm4gen_lite.pipeline import LLM4GenPipeline
from llm4gen_lite.train import build_unet


@pytest.fixture
def probe_module(monkeypatch):
    monkeypatch.syspath_prepend(str(REPO_ROOT / "scripts"))
    import probe_conditioning

    yield probe_conditioning
    sys.modules.pop("probe_conditioning", None)


def _pipeline(space_to_depth: int) -> LLM4GenPipeline:
    from conftest import HashEncoder

    torch.manual_seed(0)
    unet, vae = build_unet(load_config("smoke", {"space_to_depth": space_to_depth}))
    clip = HashEncoder(24, max_length=12, seed=1)
    adapter = build_adapter("clip", 24, 0, unet.config.cross_attention_dim)
    scheduler = DDIMScheduler(num_train_timesteps=1000, prediction_type="v_prediction")
    return LLM4GenPipeline(unet=unet, scheduler=scheduler, adapter=adapter, vae=vae, clip_encoder=clip)


@pytest.mark.parametrize("space_to_depth", [1, 2])
def test_probe_sees_words_the_unet_reads_and_not_those_it_cannot(probe_module, space_to_depth):
    pipe = _pipeline(space_to_depth)
    rows = probe_module.probe(pipe, n_images=4)
    assert [r["t"] for r in rows] == list(probe_module.TIMESTEPS)
    assert all(r["shape Δ"] > 0 and r["colour Δ"] > 0 and r["err"] > 0 for r in rows), rows

    with torch.no_grad():  # cut every cross-attention output: the text can no longer reach the image
        modules = dict(pipe.unet.named_modules())
        for name in cross_attention_layers(pipe.unet):
            modules[name].to_out[0].weight.zero_()
            modules[name].to_out[0].bias.zero_()
    deaf = probe_module.probe(pipe, n_images=4)
    assert all(r["shape Δ"] == 0 and r["colour Δ"] == 0 and r["shape gain"] == 0 for r in deaf), deaf


def test_attention_selectivity_reports_own_and_other_entity_distances(monkeypatch):
    monkeypatch.syspath_prepend(str(REPO_ROOT / "scripts"))
    import attention_selectivity

    try:
        rows = attention_selectivity.selectivity(_pipeline(2), n_prompts=4, steps=2)
    finally:
        sys.modules.pop("attention_selectivity", None)
    assert rows and {r["branch"] for r in rows} == {"clip"}
    assert all(r["pairs"] > 0 and r["other_pairs"] > 0 and 0 <= r["own"] <= 2 and 0 <= r["other"] <= 2 for r in rows), rows


def test_single_object_accuracy_scores_the_prompted_objects(monkeypatch):
    """Renders of the prompts' own scenes score (near) 1; the same renders with every shape
    exchanged score 0 on shape and still 1 on colour; a real pipeline goes through."""
    monkeypatch.syspath_prepend(str(REPO_ROOT / "scripts"))
    import dataclasses

    import single_object_accuracy as soa

    from llm4gen_lite import shapes

    rows = shapes.load_prompt_set("single")
    scenes = [shapes.row_scene(r) for r in rows]
    other = {s: shapes.SHAPES[(i + 1) % len(shapes.SHAPES)] for i, s in enumerate(shapes.SHAPES)}
    swapped = [dataclasses.replace(s, objects=[dataclasses.replace(o, shape=other[o.shape]) for o in s.objects])
               for s in scenes]
    try:
        for drawn, want_shape in ((scenes, 1.0), (swapped, 0.0)):
            monkeypatch.setattr(soa.report, "sample_images", lambda *a, **k: shapes.render_batch(drawn))
            result = soa.accuracy(None, seeds=(0, 1))
            assert result["prompts"] == len(rows) and len(result["shape_per_seed"]) == 2
            assert abs(result["mean"]["shape_acc"] - want_shape) <= 0.05, result
            assert result["mean"]["colour_acc"] >= 0.95, result
        monkeypatch.undo()
        real = soa.accuracy(_pipeline(2), seeds=(0,), steps=2)
        assert all(0 <= v <= 1 for v in real["mean"].values()), real
        with pytest.raises(ValueError, match="seed"):
            soa.accuracy(None, seeds=())
    finally:
        sys.modules.pop("single_object_accuracy", None)
