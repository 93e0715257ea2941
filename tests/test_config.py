"""TrainConfig: presets load, unknown keys and wrong types are refused naming the key, overrides are typed."""
from __future__ import annotations

import json

import pytest

from llm4gen_lite.config import ConfigError, TrainConfig, config_from_dict, load_config, parse_value


TRAINING_PRESETS = ("smoke", "quick", "full", "sd15")


@pytest.mark.parametrize("preset", TRAINING_PRESETS)
def test_every_shipped_preset_loads(preset):
    config = load_config(preset)
    assert isinstance(config, TrainConfig)
    assert config.output_dir, "every preset names its run folder"


def test_the_three_presets_exist_and_scale():
    smoke, quick, full = (load_config(name) for name in ("smoke", "quick", "full"))
    assert smoke.unet == "tiny" and smoke.steps <= 10
    assert smoke.steps < min(quick.steps, full.steps)
    assert (quick.max_objects, quick.dense_prob) == (1, 0.0), "quick: one object, short captions"
    assert full.max_objects > 1 and full.dense_prob > 0, "full: several objects, dense captions"


def test_unknown_key_names_the_closest_valid_one(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("stpes: 10\n")
    with pytest.raises(ConfigError, match=r"'stpes'.*did you mean 'steps'"):
        load_config(path)
    with pytest.raises(ConfigError, match=r"'learning_rate'.*overrides|'learning_rate'.*--set"):
        load_config(None, ["learning_rate=1e-3"])


@pytest.mark.parametrize("key, value", [
    ("steps", "ten"), ("steps", 1.5), ("steps", True), ("lr", "fast"), ("zero_terminal_snr", 1),
    ("variant", "t5"), ("entity_layers", "up_blocks.1"), ("unet_overrides", [1, 2]),
])
def test_wrong_types_are_refused_naming_the_key(key, value):
    with pytest.raises(ConfigError, match=repr(key)):
        config_from_dict({key: value})


def test_yaml_float_pitfall_gets_a_hint(tmp_path):
    path = tmp_path / "lr.yaml"
    path.write_text("lr: 1e-3\n")  # YAML 1.1 reads this as a string
    with pytest.raises(ConfigError, match="1.0e-3"):
        load_config(path)


def test_overrides_are_typed_by_the_field():
    config = load_config("smoke", [
        "lr=1e-3", "steps=7", "zero_terminal_snr=false", "prediction_type=epsilon", "resume_from=none",
        "entity_layers=up_blocks.1,mid_block", "unet_overrides={attention_head_dim: 2}", "llm_layer=6",
    ])
    assert config.lr == 1e-3 and config.steps == 7 and config.zero_terminal_snr is False
    assert config.resume_from is None and config.llm_layer == 6
    assert config.entity_layers == ["up_blocks.1", "mid_block"]
    assert config.unet_overrides == {"attention_head_dim": 2}
    assert parse_value("resume_from", "latest") == "latest"
    assert isinstance(parse_value("lr", "1"), float)


@pytest.mark.parametrize("override, needle", [
    ("steps=many", "steps"), ("variant=t5", "variant"), ("min_objects=3", "min_objects"),
    ("p_uncond=1.5", "p_uncond"), ("steps", "key=value"),
])
def test_bad_overrides_are_refused(override, needle):
    with pytest.raises(ConfigError, match=needle):
        load_config("smoke", [override])


def test_value_checks_across_fields():
    with pytest.raises(ConfigError, match="zero_terminal_snr"):
        TrainConfig(prediction_type="epsilon", zero_terminal_snr=True)
    with pytest.raises(ConfigError, match="entity_t_min"):
        TrainConfig(entity_t_min=500, entity_t_max=400)


def test_json_round_trip_and_json_files(tmp_path):
    config = load_config("quick", ["steps=5"])
    again = config_from_dict(json.loads(json.dumps(config.to_dict())))
    assert again == config
    path = tmp_path / "run.json"
    path.write_text(json.dumps(config.to_dict()))
    assert load_config(path) == config
    assert "steps" in config.pretty() and "variant" in config.pretty()


def test_unknown_preset_lists_the_presets():
    with pytest.raises(ConfigError, match="smoke"):
        load_config("no-such-preset")
