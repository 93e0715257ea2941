"""`TrainConfig`: every setting of a training run, loaded from `configs/*.yaml|json` plus overrides.

    config = load_config("quick", overrides=["steps=200", "variant=clip"])

Unknown keys and values of the wrong type are refused with a `ConfigError` naming the key (and,
for unknown keys, the closest valid one). A run prints its config and saves it as `config.json`.
"""
from __future__ import annotations

import dataclasses
import difflib
import json
import math
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from .paths import REPO_ROOT

CONFIG_DIR = REPO_ROOT / "configs"


class ConfigError(ValueError):
    """A configuration file or override is invalid; the message names the key and the fix."""


@dataclass
class TrainConfig:
    """One training run. Defaults are the `quick` recipe; presets in `configs/` change a few fields."""

    # --- conditioning -------------------------------------------------------------------------
    variant: Literal["clip", "llm", "concat", "cam"] = "cam"  # how text features reach the UNet (adapter.py)
    clip_encoder: str = "shapesclip"  # CLIP-role encoder: "shapesclip", "minilm" or a local model folder
    llm_encoder: str = "smollm2"  # LLM: "smollm2" or a local Llama/T5 folder
    llm_layer: int | None = None  # LLM hidden layer whose tokens are used; None = the encoder's default (SmolLM2: 18)
    llm_scale: float = 1.0  # λ on the appended LLM branch (concat, cam); 1 as in the LLM4GEN release
    cam_heads: int = 8  # attention heads of the Cross-Adapter Module
    # --- model ----------------------------------------------------------------------------------
    unet: str = "small"  # UNet preset: "tiny", "small", or "sd15" / a local SD1.5-layout folder
    unet_overrides: dict[str, Any] = field(default_factory=dict)  # UNet2DConditionModel args replacing the preset's
    init_unet: str | None = None  # built presets: a saved pipeline (or UNet) folder whose UNet starts the run; None = random
    resolution: int = 32  # image side in pixels (Shapes world renders at this size)
    space_to_depth: int = 1  # built presets: UNet on pixel-unshuffled images (3·f² channels at 1/f size); lossless
    pixel_shift: float = 0.0  # built presets: the UNet denoises (pixels - shift) · scale; -1 puts a black background at 0
    pixel_scale: float = 1.0  # built presets: see pixel_shift; ≈ 1 / the shifted pixels' std gives unit-variance data
    train_unet: Literal["all", "cross_attention"] = "all"  # "cross_attention": UNet frozen except its cross-attention layers
    # --- training data --------------------------------------------------------------------------
    train_data: str = "shapes"  # "shapes" (the procedural world) or an imagefolder (metadata.jsonl: file_name, text)
    dataset_size: int = 4096  # distinct training items (index -> item is deterministic); cycled in epochs
    min_objects: int = 1  # fewest objects per training scene
    max_objects: int = 1  # most objects per training scene
    dense_prob: float = 0.0  # probability that a training caption is dense rather than short
    curriculum_steps: int = 0  # first N optimiser steps use single-object scenes with short captions only
    # --- optimisation ---------------------------------------------------------------------------
    steps: int = 600  # optimiser steps
    batch_size: int = 32  # images per step per process (before gradient accumulation)
    grad_accum: int = 1  # micro-batches accumulated per optimiser step
    lr: float = 2.0e-3  # peak learning rate (AdamW)
    warmup_steps: int = 30  # linear warm-up steps
    lr_schedule: Literal["cosine", "constant"] = "cosine"  # after warm-up: cosine decay to 0, or constant
    weight_decay: float = 0.01  # AdamW weight decay
    grad_clip: float = 1.0  # max gradient norm; 0 disables clipping
    ema_decay: float = 0.999  # EMA of trained weights (warmed up as min(decay, (1+n)/(10+n))); 0 disables EMA
    # --- diffusion ------------------------------------------------------------------------------
    prediction_type: Literal["epsilon", "v_prediction", "sample"] = "v_prediction"  # UNet target: ε, v or x0
    zero_terminal_snr: bool = True  # rescale betas to zero SNR at t=T (not with epsilon), "trailing" spacing
    beta_schedule: Literal["squaredcos_cap_v2", "scaled_linear", "linear"] = "squaredcos_cap_v2"  # noise schedule
    min_snr_gamma: float = 0.0  # min-SNR-γ loss weighting; 0 = plain MSE
    timestep_sampling: Literal["uniform", "logit_normal"] = "uniform"  # training t: uniform, or t/T ~ logit-normal
    logit_mean: float = 0.0  # logit-normal: mean of logit(t/T) (> 0 favours noisier timesteps)
    logit_std: float = 1.0  # logit-normal: std of logit(t/T)
    # --- guidance training ----------------------------------------------------------------------
    p_uncond: float = 0.1  # probability of dropping all text (empty-prompt features) for CFG
    p_llm: float = 0.1  # probability of dropping the LLM branch alone (two-scale guidance)
    # --- entity-guided regularisation -----------------------------------------------------------
    entity_weight: float = 0.0  # λ_e; 0 turns the term off and installs no attention capture
    entity_layers: list[str] = field(default_factory=list)  # cross-attention layer names/prefixes; [] = all
    entity_distance: Literal["cosine", "l2"] = "cosine"  # d(A_attr, A_entity): 1 - cosine, or L2 of normalised maps
    entity_tokens: Literal["clip", "llm", "both"] = "both"  # which branch's tokens form the pairs (if present)
    entity_t_min: int = 0  # entity loss applies only to timesteps >= this
    entity_t_max: int = 1000  # ... and < this
    # --- validation and sampling ----------------------------------------------------------------
    validate_every: int = 0  # steps between validations (grid + CompBench-lite scores); 0 = only at the end
    validation_prompts: str = "single"  # prompt set in data/prompts/ scored at validation
    validation_max_prompts: int = 48  # prompts of that set used (first N) at validation
    guidance_scale: float = 3.0  # CFG scale of validation samples and of the CLI's sample/evaluate
    sample_steps: int = 25  # DDIM steps of validation samples and of the CLI's sample/evaluate
    # --- system ---------------------------------------------------------------------------------
    mixed_precision: Literal["no", "bf16", "fp16"] = "no"  # Accelerate autocast precision
    device: str = "cpu"  # "cpu" (default), or "auto" to use a GPU when present
    cpu_threads: int = 0  # torch CPU threads per process; 0 = torch's default (1 is faster on a busy shared CPU)
    seed: int = 0  # fixes model init, data order, noise, dropout
    log_every: int = 10  # steps between metrics.jsonl records
    checkpoint_every: int = 0  # steps between checkpoints; 0 = only the final one
    keep_last: int = 2  # checkpoints kept on disk
    output_dir: str = "runs/quick"  # run folder: config.json, metrics.jsonl, checkpoints/, pipeline/
    resume_from: str | None = None  # "latest", a checkpoint folder, or None to start fresh

    # ------------------------------------------------------------------------------------------
    def __post_init__(self) -> None:
        _check_types(self)
        self._check_values()

    def _check_values(self) -> None:
        problems = []

        def need(ok: bool, msg: str) -> None:
            if not ok:
                problems.append(msg)

        for key in ("steps", "batch_size", "grad_accum", "resolution", "space_to_depth", "dataset_size", "cam_heads",
                    "log_every", "keep_last", "sample_steps"):
            need(getattr(self, key) >= 1, f"{key} must be >= 1 (got {getattr(self, key)})")
        for key in ("cpu_threads", "warmup_steps", "checkpoint_every", "validate_every", "curriculum_steps", "validation_max_prompts"):
            need(getattr(self, key) >= 0, f"{key} must be >= 0 (got {getattr(self, key)})")
        for key in ("dense_prob", "p_uncond", "p_llm"):
            need(0.0 <= getattr(self, key) <= 1.0, f"{key} must lie in [0, 1] (got {getattr(self, key)})")
        for key in ("lr", "weight_decay", "grad_clip", "min_snr_gamma", "entity_weight", "guidance_scale", "logit_std"):
            need(getattr(self, key) >= 0, f"{key} must be >= 0 (got {getattr(self, key)})")
        need(self.lr > 0, "lr must be > 0")
        need(self.pixel_scale > 0, f"pixel_scale must be > 0 (got {self.pixel_scale})")
        need(0.0 <= self.ema_decay < 1.0, f"ema_decay must lie in [0, 1) (got {self.ema_decay})")
        need(1 <= self.min_objects <= self.max_objects,
             f"need 1 <= min_objects <= max_objects (got {self.min_objects}, {self.max_objects})")
        need(0 <= self.entity_t_min < self.entity_t_max <= 1000,
             f"need 0 <= entity_t_min < entity_t_max <= 1000 (got {self.entity_t_min}, {self.entity_t_max})")
        need(not (self.zero_terminal_snr and self.prediction_type == "epsilon"),
             "zero_terminal_snr needs prediction_type v_prediction or sample (ε cannot be predicted at SNR 0)")
        need(self.train_data == "shapes" or self.curriculum_steps == 0,
             "curriculum_steps needs train_data=shapes (the curriculum stage is single Shapes objects)")
        if problems:
            raise ConfigError("invalid config: " + "; ".join(problems))

    # ------------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """JSON-able dict of every field."""
        return dataclasses.asdict(self)

    def replace(self, **changes: Any) -> TrainConfig:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    def pretty(self) -> str:
        """One `key: value` line per field, for printing at the start of a run."""
        width = max(len(f.name) for f in dataclasses.fields(self))
        return "\n".join(f"  {f.name:<{width}} : {getattr(self, f.name)!r}" for f in dataclasses.fields(self))

    @property
    def uses_llm(self) -> bool:
        """Whether this variant reads LLM features (and so needs the LLM feature cache)."""
        return self.variant != "clip"

    @property
    def uses_clip(self) -> bool:
        """Whether this variant reads CLIP-role features."""
        return self.variant != "llm"


# ----------------------------------------------------------------------------------------------
# type checking
# ----------------------------------------------------------------------------------------------
def _field_types() -> dict[str, Any]:
    return typing.get_type_hints(TrainConfig)


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _matches(value: Any, tp: Any) -> bool:
    origin = typing.get_origin(tp)
    if tp is Any:
        return True
    if origin is Literal:
        return value in typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, arg) for arg in typing.get_args(tp))
    if tp is type(None):
        return value is None
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is str:
        return isinstance(value, str)
    if origin is list:
        (item,) = typing.get_args(tp)
        return isinstance(value, list) and all(_matches(v, item) for v in value)
    if origin is dict:
        key, item = typing.get_args(tp)
        return isinstance(value, dict) and all(_matches(k, key) and _matches(v, item) for k, v in value.items())
    raise TypeError(f"unsupported config field type {tp}")


def _check_types(config: TrainConfig) -> None:
    for name, tp in _field_types().items():
        value = getattr(config, name)
        if not _matches(value, tp):
            hint = ""
            if tp is float and isinstance(value, str):
                hint = " (YAML reads 1e-3 as text: write 1.0e-3)"
            raise ConfigError(f"config key {name!r}: expected {_type_name(tp)}, got {value!r}{hint}")
        if tp is float:
            try:
                value = float(value)
            except OverflowError:
                raise ConfigError(f"config key {name!r}: {value!r} is too large for a float") from None
            if not math.isfinite(value):
                raise ConfigError(f"config key {name!r}: must be a finite number, got {value!r}")
            setattr(config, name, value)


def _unknown_key(key: str, where: str) -> ConfigError:
    names = [f.name for f in dataclasses.fields(TrainConfig)]
    close = difflib.get_close_matches(key, names, n=1, cutoff=0.5)
    hint = f"; did you mean {close[0]!r}?" if close else f"; valid keys: {', '.join(names)}"
    return ConfigError(f"unknown config key {key!r} in {where}{hint}")


def parse_value(key: str, text: str) -> Any:
    """Convert the text of a `--set key=value` override to the type of field `key`."""
    types_ = _field_types()
    if key not in types_:
        raise _unknown_key(key, "--set")
    tp = types_[key]
    candidates = [tp]
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        candidates = sorted(typing.get_args(tp), key=lambda t: t is not type(None))  # "none" -> None first
    for cand in candidates:
        try:
            value = _convert(text, cand)
        except ValueError:
            continue
        if _matches(value, cand):
            return value
    raise ConfigError(f"--set {key}={text}: expected {_type_name(tp)}")


def _convert(text: str, tp: Any) -> Any:
    origin = typing.get_origin(tp)
    if tp is type(None):
        if text.strip().lower() in ("none", "null", ""):
            return None
        raise ValueError(text)
    if tp is bool:
        low = text.strip().lower()
        if low in ("true", "yes", "1", "on"):
            return True
        if low in ("false", "no", "0", "off"):
            return False
        raise ValueError(text)
    if tp is int:
        return int(text)
    if tp is float:
        return float(text)
    if tp is str or origin is Literal:
        return text
    if origin in (list, dict):
        try:
            value = yaml.safe_load(text)
        except (yaml.YAMLError, RecursionError) as err:  # RecursionError: absurdly deep nesting
            raise ValueError(text) from err
        if origin is list and isinstance(value, str):  # a,b,c
            value = [v.strip() for v in value.split(",") if v.strip()]
        if origin is list and value is None:
            value = []
        return value
    raise ValueError(text)


# ----------------------------------------------------------------------------------------------
# loading
# ----------------------------------------------------------------------------------------------
def resolve_config_path(name_or_path: str | os.PathLike) -> Path:
    """`"quick"` -> `configs/quick.yaml`; an existing path is returned as is."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    for suffix in (".yaml", ".yml", ".json"):
        candidate = CONFIG_DIR / f"{name_or_path}{suffix}"
        if candidate.is_file():
            return candidate
    presets = sorted(p.stem for p in CONFIG_DIR.glob("*.y*ml")) if CONFIG_DIR.is_dir() else []
    raise ConfigError(f"no config file {str(name_or_path)!r}; give a path or a preset name ({', '.join(presets)})")


def read_config_file(path: str | os.PathLike) -> dict[str, Any]:
    """The key/value mapping of a YAML or JSON config file (not yet validated)."""
    path = Path(path)
    try:
        text = path.read_text()
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, yaml.YAMLError, RecursionError) as err:
        raise ConfigError(f"{path}: cannot read config ({err})") from err
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a config must be a mapping of key: value, got {type(data).__name__}")
    return data


def config_from_dict(data: dict[str, Any], where: str = "config") -> TrainConfig:
    """Build a validated `TrainConfig`; unknown keys are refused, naming the closest valid key."""
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    for key in data:
        if key not in names:
            raise _unknown_key(str(key), where)
    return TrainConfig(**data)


def load_config(
    name_or_path: str | os.PathLike | None = None, overrides: list[str] | dict[str, Any] | None = None
) -> TrainConfig:
    """Load a preset name or config file (or the defaults when None) and apply overrides.

    `overrides` is a list of `"key=value"` strings (typed by the field) or a dict of typed values.
    """
    data: dict[str, Any] = {}
    where = "defaults"
    if name_or_path is not None:
        path = resolve_config_path(name_or_path)
        data = read_config_file(path)
        where = str(path)
    config = config_from_dict(data, where)
    changes: dict[str, Any] = {}
    if isinstance(overrides, dict):
        changes.update(overrides)
    else:
        for item in overrides or []:
            key, sep, text = item.partition("=")
            if not sep or not key.strip():
                raise ConfigError(f"override {item!r} is not key=value (e.g. --set steps=100)")
            changes[key.strip()] = parse_value(key.strip(), text)
    for key in changes:
        if key not in {f.name for f in dataclasses.fields(TrainConfig)}:
            raise _unknown_key(key, "overrides")
    return config.replace(**changes) if changes else config
