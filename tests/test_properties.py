"""Property tests (hypothesis): any input to the config loader and to prompt handling ends in a valid
result or a clear `ValueError` / `TypeError` (`ConfigError` is a ValueError) — never another
exception type, a deep traceback from a dependency, or a hang.

Examples are derandomised (the same on every run) and capped by `max_examples` and a `deadline`;
the explicit cases next to the property tests pin inputs random generation rarely reaches (deep
YAML nesting, integers beyond float range, NaN and infinity).
"""
from __future__ import annotations

import dataclasses
import json
import tempfile
import typing
import warnings
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import yaml
from diffusers import DDIMScheduler
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from conftest import HashEncoder
from llm4gen_lite.adapter import build_adapter
from llm4gen_lite.config import TrainConfig, config_from_dict, load_config
from llm4gen_lite.encoders import PromptTruncatedWarning, TextFeatures, check_prompts, load_encoder
from llm4gen_lite.pipeline import LLM4GenPipeline
from llm4gen_lite.shapes import attribute_pairs, caption_from_text
from llm4gen_lite.unet import build_unet

pytestmark = pytest.mark.timeout(300)  # a hang fails the test instead of stalling the suite

FAST = settings(max_examples=60, deadline=timedelta(seconds=2), derandomize=True,
                suppress_health_check=[HealthCheck.too_slow])
MODEL = settings(max_examples=25, deadline=timedelta(seconds=10), derandomize=True,
                 suppress_health_check=[HealthCheck.too_slow])
CLEAR = (ValueError, TypeError)  # the only errors bad input may raise

# ----------------------------------------------------------------------------------------------
# strategies
# ----------------------------------------------------------------------------------------------
FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}
HINTS = typing.get_type_hints(TrainConfig)

scalars = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20)
json_values = st.recursive(
    scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)


def typed_value(name: str) -> st.SearchStrategy:
    """Values of roughly the field's type (so some configs are valid), mixed with anything at all."""
    hint = HINTS[name]
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is typing.Literal:
        plausible = st.sampled_from(args)
    elif hint is bool:
        plausible = st.booleans()
    elif hint is int or int in args:
        plausible = st.integers(-3, 5000)
    elif hint is float:
        plausible = st.floats(-1.0, 2.0)
    elif hint is str or str in args:
        plausible = st.text(max_size=12)
    elif origin is list:
        plausible = st.lists(st.text(max_size=8), max_size=3)
    else:
        plausible = st.dictionaries(st.text(max_size=8), scalars, max_size=3)
    return st.one_of(plausible, json_values)


config_dicts = st.lists(st.sampled_from(sorted(FIELDS)), max_size=6, unique=True).flatmap(
    lambda names: st.fixed_dictionaries({name: typed_value(name) for name in names})
)
foreign_keys = st.dictionaries((st.text(max_size=12) | st.integers() | st.none()).filter(lambda k: k not in FIELDS),
                               json_values, min_size=1, max_size=3)

# text: any unicode except surrogates (which cannot be encoded as UTF-8), control characters,
# whitespace, and long strings built by repetition (cheap to generate)
any_text = st.text(st.characters(blacklist_categories=("Cs",)), max_size=60)
control_text = st.text(st.characters(max_codepoint=0x1F) | st.sampled_from(" \t\n\r\x0b\x0c\x7f\u200b\ufeff"),
                       max_size=20)
long_text = st.builds(lambda piece: (piece * (10_000 // len(piece) + 1))[:10_000], any_text.filter(bool))
prompt_text = st.one_of(any_text, control_text, long_text)
non_strings = st.one_of(st.none(), st.integers(), st.floats(), st.binary(max_size=8), st.lists(st.text(max_size=3),
                        max_size=2), st.dictionaries(st.text(max_size=3), st.integers(), max_size=2))
prompt_lists = st.lists(prompt_text | non_strings, max_size=4)


# ----------------------------------------------------------------------------------------------
# the config loader
# ----------------------------------------------------------------------------------------------
def assert_valid(config: TrainConfig) -> None:
    """An accepted config is a TrainConfig whose dict form (JSON-able) loads back to an equal config."""
    assert isinstance(config, TrainConfig)
    data = json.loads(json.dumps(config.to_dict()))
    again = config_from_dict(data)
    assert json.dumps(again.to_dict(), sort_keys=True) == json.dumps(config.to_dict(), sort_keys=True)


@FAST
@given(config_dicts)
@example({})
@example({"steps": 0})
@example({"variant": "t5", "lr": -1.0})
def test_random_config_dicts_load_or_are_refused_clearly(data):
    try:
        config = config_from_dict(data)
    except CLEAR:
        return
    assert_valid(config)


@FAST
@given(foreign_keys)
def test_unknown_and_non_string_keys_are_refused(data):
    with pytest.raises(ValueError, match="unknown config key"):
        config_from_dict(data)


@FAST
@given(st.sampled_from(sorted(FIELDS)), prompt_text)
@example("steps", "9" * 5000)
@example("unet_overrides", "{a: !!python/object/apply:os.system [echo]}")
@example("entity_layers", "[a, [b, {c: d}]]")
def test_random_override_text_loads_or_is_refused_clearly(key, text):
    try:
        config = load_config(None, [f"{key}={text}"])
    except CLEAR:
        return
    assert_valid(config)


@FAST
@given(st.one_of(json_values.map(lambda v: yaml.safe_dump(v)), any_text, st.binary(max_size=64)),
       st.sampled_from([".yaml", ".json"]))
def test_random_config_files_load_or_are_refused_clearly(content, suffix):
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / f"config{suffix}"
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
        try:
            config = load_config(path)
        except CLEAR:
            return
    assert_valid(config)


@pytest.mark.parametrize("key", ["unet_overrides", "entity_layers"])
def test_deeply_nested_yaml_is_refused_clearly(key, tmp_path):
    """Nesting deeper than the YAML parser's recursion limit, in an override and in a config file."""
    with pytest.raises(CLEAR):
        load_config(None, [f"{key}={'[' * 2000}"])
    path = tmp_path / "deep.yaml"
    path.write_text(f"{key}: {'[' * 2000}\n")
    with pytest.raises(CLEAR, match="deep.yaml"):
        load_config(path)


def test_a_huge_int_in_a_float_field_is_refused_clearly():
    with pytest.raises(CLEAR, match="'lr'"):
        config_from_dict({"lr": 10**400})


@pytest.mark.parametrize("override", ["llm_scale=nan", "lr=inf", "guidance_scale=inf", "dense_prob=nan"])
def test_non_finite_floats_are_refused(override):
    with pytest.raises(ValueError, match=override.split("=")[0]):
        load_config(None, [override])


# ----------------------------------------------------------------------------------------------
# prompt handling
# ----------------------------------------------------------------------------------------------
@FAST
@given(prompt_lists | non_strings | prompt_text)
@example([])
@example("a red circle")
@example(["", " ", "\x00"])
def test_check_prompts_returns_the_list_or_refuses_clearly(prompts):
    try:
        checked = check_prompts(prompts)
    except CLEAR:
        return
    assert checked == list(prompts) and checked and all(isinstance(p, str) for p in checked)


def assert_features(features: TextFeatures, prompts: list[str], max_length: int, dim: int) -> None:
    """Shapes fixed by the encoder, finite, zero at padding, offsets inside each prompt."""
    assert features.features.shape == (len(prompts), max_length, dim)
    assert features.mask.shape == (len(prompts), max_length) and features.mask.dtype == torch.bool
    assert torch.isfinite(features.features).all()
    assert torch.all(features.features[~features.mask] == 0)
    assert len(features.truncated) == len(prompts)
    for prompt, row in zip(prompts, features.offsets):
        assert len(row) == max_length
        assert all(0 <= start <= end <= len(prompt) for start, end in row)


@FAST
@given(st.lists(prompt_text, min_size=1, max_size=4))
@example([""])
@example(["   ", "\t\n"])
def test_a_fast_encoder_encodes_any_text(prompts):
    encoder = HashEncoder(dim=8, max_length=12)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PromptTruncatedWarning)
        features = encoder.encode(prompts)
    assert_features(features, prompts, 12, 8)


@pytest.fixture(scope="module")
def minilm():
    return load_encoder("minilm")


@MODEL
@given(st.lists(prompt_text, min_size=1, max_size=3))
@example([""])
@example(["\x00\x01\x02", "\u200b\ufeff"])
@example(["红色的圆 " * 2000])
def test_the_minilm_tokenizer_path_encodes_any_text(minilm, prompts):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PromptTruncatedWarning)
        features = minilm.encode(prompts)
    assert_features(features, prompts, minilm.max_length, minilm.dim)
    assert features.mask[:, 0].all(), "every prompt keeps its leading special token"


@FAST
@given(prompt_text)
@example("")
@example("a red circle left of a blue square")
@example("red red red")
def test_caption_from_text_parses_any_text(text):
    caption = caption_from_text(text)
    assert caption.text == text
    for span in caption.spans:
        assert 0 <= span.start < span.end <= len(text)
    for attribute, entity in attribute_pairs(caption):
        assert attribute in caption.spans and entity in caption.spans


@FAST
@given(non_strings)
def test_caption_from_text_refuses_non_text(value):
    with pytest.raises(TypeError):
        caption_from_text(value)


@pytest.fixture(scope="module")
def tiny_pipeline() -> LLM4GenPipeline:
    torch.manual_seed(0)
    pipe = LLM4GenPipeline(
        build_unet("tiny"), DDIMScheduler(), build_adapter("cam", 16, 8, 32, num_heads=4),
        clip_encoder=HashEncoder(16, max_length=12, seed=1), llm_encoder=HashEncoder(8, max_length=12, seed=2),
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


@MODEL
@given(prompt_lists | non_strings | prompt_text)
@example([])
@example([""])
@example(["a red circle", 7])
def test_the_pipeline_samples_any_prompt_or_refuses_it_clearly(tiny_pipeline, prompt):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PromptTruncatedWarning)
        try:
            images = tiny_pipeline(prompt, num_inference_steps=1, guidance_scale=1.0, output_type="pt").images
        except CLEAR:
            return
    count = 1 if isinstance(prompt, str) else len(prompt)
    assert images.shape == (count, 3, 32, 32) and torch.isfinite(images).all()
