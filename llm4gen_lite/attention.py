"""Cross-attention capture: per-token attention maps from a UNet's cross-attention layers.

Nothing changes in the UNet until capture is asked for. `capture_cross_attention(unet)` swaps a
recording processor into the chosen cross-attention layers (every `attn2`, and `attn1` too in a
UNet built with `only_cross_attention`) and restores the original
processors on exit:

    with capture_cross_attention(unet, mode="mean") as store:
        ...                                   # any number of UNet calls
    maps = store.get(store.layers[0])         # [batch, tokens, h, w]

The recording processor computes attention exactly as diffusers' `AttnProcessor` does (same
`prepare_attention_mask` / `get_attention_scores` path, so `encoder_attention_mask` is honoured
identically) and records the head-averaged probabilities `[batch, h·w, tokens]` of every call.
`mode="last"` keeps the latest call per layer *with its autograd graph* (for training losses on
the maps); `mode="mean"` keeps a detached running mean over calls (for sampling, where one map per
denoising step would not fit in memory at SD1.5 scale).
"""
from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Literal

import torch
from diffusers.models.attention_processor import Attention
from torch import nn

CaptureMode = Literal["last", "mean"]


def average_by_resolution(maps: Mapping[str, torch.Tensor]) -> dict[tuple[int, int], torch.Tensor]:
    """Average `{layer: [batch, tokens, h, w]}` over the layers of each resolution: `{(h, w): map}`."""
    groups: dict[tuple[int, int], list[torch.Tensor]] = {}
    for layer_map in maps.values():
        groups.setdefault(tuple(layer_map.shape[-2:]), []).append(layer_map)
    return {size: torch.stack(group).mean(0) for size, group in groups.items()}


@dataclass
class AttentionMaps:
    """Cross-attention maps of sampled images, averaged over the denoising steps."""

    maps: dict[str, torch.Tensor]  # layer name -> [batch, tokens, h, w]
    mask: torch.Tensor  # [batch, tokens] bool: the conditioning's token mask (False = padding)
    clip_tokens: int  # the first clip_tokens token positions are CLIP-role tokens
    llm_tokens: int  # the next llm_tokens positions are LLM-branch tokens

    def by_resolution(self) -> dict[tuple[int, int], torch.Tensor]:
        """Maps averaged over the layers of each resolution: `{(h, w): [batch, tokens, h, w]}`."""
        return average_by_resolution(self.maps)

    def token_map(self, index: int, positions: Sequence[int], resolution: tuple[int, int] | None = None
                  ) -> torch.Tensor:
        """Image `index`'s attention on the given token positions (summed), at one resolution
        (default: the finest captured), normalised to sum 1: `[h, w]`. Positions index the
        conditioning sequence: CLIP-role tokens first, LLM tokens from `clip_tokens` on."""
        levels = self.by_resolution()
        maps = levels[resolution if resolution is not None else max(levels)]
        if not positions:
            raise ValueError("no token positions given: the word was not found among the prompt's tokens")
        picked = maps[index, list(positions)].sum(0)
        return picked / picked.sum().clamp_min(1e-12)


class CrossAttentionStore:
    """Maps recorded by `CaptureCrossAttnProcessor`s, keyed by layer name."""

    def __init__(self, mode: CaptureMode = "last") -> None:
        if mode not in ("last", "mean"):
            raise ValueError(f"unknown capture mode {mode!r}; use 'last' (keeps the graph) or 'mean' (detached)")
        self.mode = mode
        self.sample_size: tuple[int, int] | None = None  # (height, width) of the UNet input, set per call
        self._maps: dict[str, torch.Tensor] = {}  # layer -> [batch, h*w, tokens]
        self._sizes: dict[str, tuple[int, int]] = {}  # layer -> (h, w)
        self._calls: dict[str, int] = {}  # layer -> number of calls in its running mean ("mean" mode)

    @property
    def layers(self) -> list[str]:
        """Names of the layers that recorded at least one map, in recording order."""
        return list(self._maps)

    def record(self, layer: str, probs: torch.Tensor) -> None:
        """Store head-averaged probabilities `[batch, h*w, tokens]` of one call of `layer`."""
        self._sizes[layer] = self._spatial_size(probs.shape[1])
        if self.mode == "last":
            self._maps[layer] = probs
            return
        probs = probs.detach()
        count = self._calls.get(layer, 0)
        previous = self._maps.get(layer)
        if previous is None or previous.shape != probs.shape:  # first call, or a new batch layout
            self._maps[layer], self._calls[layer] = probs.clone(), 1
        else:
            self._maps[layer] = previous + (probs - previous) / (count + 1)
            self._calls[layer] = count + 1

    def get(self, layer: str) -> torch.Tensor:
        """The map of one layer as `[batch, tokens, h, w]` (keeps its graph in `last` mode)."""
        if layer not in self._maps:
            raise KeyError(f"no attention recorded for layer {layer!r}; recorded layers: {self.layers}")
        h, w = self._sizes[layer]
        return self._maps[layer].transpose(1, 2).unflatten(2, (h, w))

    def by_resolution(self) -> dict[tuple[int, int], torch.Tensor]:
        """Maps averaged over the layers of each resolution: `{(h, w): [batch, tokens, h, w]}`."""
        return average_by_resolution({layer: self.get(layer) for layer in self._maps})

    def _spatial_size(self, positions: int) -> tuple[int, int]:
        """(h, w) of a layer with `positions` = h·w query positions, from the UNet input size."""
        if self.sample_size is None:
            side = math.isqrt(positions)
            if side * side != positions:
                raise ValueError(f"cannot infer the shape of a {positions}-position map without the input size")
            return side, side
        height, width = self.sample_size
        factor = round(math.sqrt(height * width / positions))
        h, w = math.ceil(height / factor), math.ceil(width / factor)
        if h * w != positions:
            raise ValueError(f"a {positions}-position map does not fit an input of {height}x{width}")
        return h, w


class CaptureCrossAttnProcessor:
    """Attention processor that computes attention like `AttnProcessor` and records the probabilities."""

    def __init__(self, store: CrossAttentionStore, layer: str) -> None:
        self.store = store
        self.layer = layer

    def __call__(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
    ) -> torch.Tensor:
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch_size, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)
        batch_size, sequence_length, _ = (
            hidden_states.shape if encoder_hidden_states is None else encoder_hidden_states.shape
        )
        attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        query = attn.to_q(hidden_states)
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)
        query, key, value = (attn.head_to_batch_dim(x) for x in (query, key, value))

        probs = attn.get_attention_scores(query, key, attention_mask)  # [batch*heads, h*w, tokens]
        self.store.record(self.layer, probs.unflatten(0, (batch_size, attn.heads)).mean(1))

        hidden_states = attn.batch_to_head_dim(torch.bmm(probs, value))
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


def cross_attention_layers(unet: nn.Module) -> list[str]:
    """Names of the UNet's cross-attention layers (`...attn2`; with `only_cross_attention` also
    `...attn1`, which then reads the text too), in module order."""
    return [name for name, module in unet.named_modules() if isinstance(module, Attention) and module.is_cross_attention]


@contextmanager
def capture_cross_attention(
    unet: nn.Module, layers: Sequence[str] | None = None, mode: CaptureMode = "last"
) -> Iterator[CrossAttentionStore]:
    """Record cross-attention maps of `layers` (None = all) while the block runs.

    `layers` entries are layer names or name prefixes (e.g. `"up_blocks.1"`); see
    `cross_attention_layers(unet)`. The original processors are restored on exit, even on error.
    """
    available = cross_attention_layers(unet)
    if not available:
        raise ValueError("this UNet has no cross-attention layers to capture")
    chosen = available if layers is None else [n for n in available if any(n.startswith(p) for p in layers)]
    if not chosen:
        raise ValueError(f"no cross-attention layer matches {list(layers or [])}; available: {available}")
    store = CrossAttentionStore(mode)
    modules = dict(unet.named_modules())

    def remember_size(_module: nn.Module, args: tuple, kwargs: dict) -> None:
        sample = args[0] if args else kwargs["sample"]
        store.sample_size = tuple(sample.shape[-2:])

    originals = {name: modules[name].processor for name in chosen}
    hook = unet.register_forward_pre_hook(remember_size, with_kwargs=True)
    try:
        for name in chosen:
            modules[name].set_processor(CaptureCrossAttnProcessor(store, name))
        yield store
    finally:
        hook.remove()
        for name, processor in originals.items():
            modules[name].set_processor(processor)
