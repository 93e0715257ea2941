"""Conditioning adapters: how CLIP-role and LLM token features become the UNet's context.

One trainable module, `ConditioningAdapter`, with four variants chosen by name:

| variant  | UNet context                        | what it stands for                         |
|----------|-------------------------------------|--------------------------------------------|
| `clip`   | `C`                                 | the Stable Diffusion baseline              |
| `llm`    | `Linear(L)`                         | LLM tokens replace CLIP (ELLA / LaVi-Bridge) |
| `concat` | `[C ; λ·Linear(L)]`                 | CAM without its cross-attention (ablation) |
| `cam`    | `[C ; λ·CAM(L, C)]`                 | LLM4GEN's Cross-Adapter Module             |

`C` is the CLIP-role token sequence after the shared clip-side projection (identity when the
CLIP-role width already equals the UNet's cross-attention width, as in SD1.5), `L` the LLM token
sequence. Every variant returns a `Conditioning`: states for `encoder_hidden_states` and a boolean
mask for `encoder_attention_mask`; padded positions are masked *and* zeroed, so their features can
never reach the image.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from diffusers import ConfigMixin, ModelMixin  # ModelMixin must be importable from here for pipeline loading
from diffusers.configuration_utils import register_to_config
from diffusers.utils import SAFETENSORS_WEIGHTS_NAME, _add_variant
from torch import nn

from .io import atomic_save_safetensors

VARIANTS = ("clip", "llm", "concat", "cam")
FFN_ACTIVATIONS = ("gelu", "quick_gelu")


@dataclass
class Conditioning:
    """The UNet's text context.

    The sequence is `[CLIP-role tokens ; LLM tokens]`; either part may be empty (`clip` has no LLM
    tokens, `llm` no CLIP-role tokens).
    """

    states: torch.Tensor  # [batch, tokens, cross_attention_dim] -> UNet encoder_hidden_states
    mask: torch.Tensor  # [batch, tokens] bool, True = real token -> UNet encoder_attention_mask
    clip_tokens: int  # number of leading positions that come from the CLIP-role encoder
    llm_tokens: int  # number of following positions that come from the LLM branch

    @property
    def clip_slice(self) -> slice:
        """Positions of the CLIP-role tokens in `states`."""
        return slice(0, self.clip_tokens)

    @property
    def llm_slice(self) -> slice:
        """Positions of the LLM-branch tokens in `states`."""
        return slice(self.clip_tokens, self.clip_tokens + self.llm_tokens)

    def repeat(self, times: int) -> Conditioning:
        """Each row repeated `times` times in place (`[a, b]` -> `[a, a, b, b]`)."""
        if times == 1:
            return self
        return Conditioning(
            self.states.repeat_interleave(times, 0), self.mask.repeat_interleave(times, 0),
            self.clip_tokens, self.llm_tokens,
        )

    @property
    def pooled(self) -> torch.Tensor:
        """`[batch, cross_attention_dim]`: the mean of the real tokens' states (zeros for a row with none)."""
        count = self.mask.sum(dim=1, keepdim=True).clamp(min=1).to(self.states.dtype)
        return self.states.sum(dim=1) / count  # masked positions are zero

    def unet_kwargs(self) -> dict[str, torch.Tensor]:
        """Keyword arguments for `UNet2DConditionModel.forward`.

        `class_labels` carries `pooled`: a UNet built with `class_embed_type="projection"` adds it
        to the timestep embedding (pooled text conditioning, as in Imagen); any other UNet,
        Stable Diffusion 1.5's included, ignores it.
        """
        return {"encoder_hidden_states": self.states, "encoder_attention_mask": self.mask, "class_labels": self.pooled}

    def padded(self, llm_tokens: int) -> Conditioning:
        """The same context with its LLM part padded (zero states, masked) to `llm_tokens` positions."""
        extra = llm_tokens - self.llm_tokens
        if extra < 0:
            raise ValueError(f"cannot pad {self.llm_tokens} LLM tokens down to {llm_tokens}")
        if extra == 0:
            return self
        batch, _, dim = self.states.shape
        return Conditioning(
            torch.cat([self.states, self.states.new_zeros(batch, extra, dim)], dim=1),
            torch.cat([self.mask, self.mask.new_zeros(batch, extra)], dim=1),
            self.clip_tokens, llm_tokens,
        )

    @staticmethod
    def cat(parts: list[Conditioning]) -> Conditioning:
        """Stack conditionings along the batch (e.g. the branches of guidance).

        They must have the same CLIP-role layout; LLM parts of different lengths (trimmed to each
        batch's longest prompt) are padded to the longest, masked, which changes no output.
        """
        clip_layouts = {p.clip_tokens for p in parts}
        if len(clip_layouts) != 1:
            raise ValueError(f"cannot stack conditionings with different CLIP-role token counts {sorted(clip_layouts)}")
        llm_tokens = max(p.llm_tokens for p in parts)
        parts = [p.padded(llm_tokens) for p in parts]
        return Conditioning(
            states=torch.cat([p.states for p in parts]),
            mask=torch.cat([p.mask for p in parts]),
            clip_tokens=parts[0].clip_tokens,
            llm_tokens=llm_tokens,
        )


def trim_padding(states: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Drop the trailing positions no row attends to (right padding); keep at least one.

    states `[batch, tokens, dim]`, mask `[batch, tokens]` -> `[batch, n, dim]`, `[batch, n]` with n
    one past the last real token of the batch. Every position dropped is masked in every row, so
    attention over the result equals attention over the input; the cost of the LLM branch (and of
    every UNet cross-attention) then follows the batch's longest prompt, not the encoder's
    `max_length`.
    """
    real = mask.any(dim=0).nonzero()
    n = int(real[-1]) + 1 if len(real) else 1
    return (states, mask) if n == mask.shape[1] else (states[:, :n], mask[:, :n])


class QuickGELU(nn.Module):
    """`x · sigmoid(1.702 x)`, the GELU approximation of OpenAI's CLIP and the LLM4GEN release."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


class CrossAdapterModule(nn.Module):
    """LLM4GEN's Cross-Adapter Module: LLM tokens attend to the CLIP tokens, then an FFN.

    `L1 = Linear(L)`; `X = L1 + W_o·MHA(Q=LN(L1), K=V=LN(C))`; `F = X + FFN(LN(X))` with
    FFN = `d -> ffn_mult·d -> d`. Queries come from the LLM tokens, keys and values from the CLIP
    tokens; padded CLIP tokens are masked out of the attention.
    """

    def __init__(
        self, llm_dim: int, dim: int, num_heads: int = 8, ffn_mult: int = 4, ffn_activation: str = "gelu"
    ) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"CAM width {dim} is not divisible by num_heads={num_heads}; choose a divisor of {dim}")
        if ffn_activation not in FFN_ACTIVATIONS:
            raise ValueError(f"unknown ffn_activation {ffn_activation!r}; choose one of {FFN_ACTIVATIONS}")
        self.num_heads = num_heads
        self.llm_proj = nn.Linear(llm_dim, dim)
        self.norm_query = nn.LayerNorm(dim)
        self.norm_context = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, dim)
        self.to_k = nn.Linear(dim, dim)
        self.to_v = nn.Linear(dim, dim)
        self.to_out = nn.Linear(dim, dim)
        self.norm_ffn = nn.LayerNorm(dim)
        self.ffn = nn.Sequential(
            nn.Linear(dim, ffn_mult * dim),
            nn.GELU() if ffn_activation == "gelu" else QuickGELU(),
            nn.Linear(ffn_mult * dim, dim),
        )

    def _split(self, x: torch.Tensor) -> torch.Tensor:
        """`[batch, tokens, dim]` -> `[batch, heads, tokens, dim / heads]`."""
        return x.unflatten(-1, (self.num_heads, -1)).transpose(1, 2)

    def _attend(self, context: torch.Tensor, clip_mask: torch.Tensor, projected: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """Attention of the projected LLM tokens over the normalised CLIP tokens.

        Returns (probabilities `[batch, heads, llm_tokens, clip_tokens]`, values
        `[batch, heads, clip_tokens, dim / heads]`).
        """
        query = self._split(self.to_q(self.norm_query(projected)))
        key = self._split(self.to_k(context))
        scores = (query @ key.transpose(-1, -2)) * query.shape[-1] ** -0.5
        # masked_fill (not an additive bias) cannot overflow, so a row whose CLIP tokens are all padding
        # gets a uniform, finite softmax, zeroed in `forward`: no NaN in values or gradients.
        scores = scores.masked_fill(~clip_mask[:, None, None, :], torch.finfo(scores.dtype).min)
        return scores.softmax(dim=-1), self._split(self.to_v(context))

    def attention_weights(self, clip_states: torch.Tensor, clip_mask: torch.Tensor, llm_states: torch.Tensor
                          ) -> torch.Tensor:
        """Which CLIP tokens each LLM token reads: `[batch, heads, llm_tokens, clip_tokens]`, rows sum to 1
        over real CLIP tokens (0 on padding). Same inputs as `forward`."""
        probs, _ = self._attend(self.norm_context(clip_states), clip_mask, self.llm_proj(llm_states))
        return probs

    def forward(self, clip_states: torch.Tensor, clip_mask: torch.Tensor, llm_states: torch.Tensor) -> torch.Tensor:
        """Fuse LLM tokens with CLIP tokens.

        Args:
            clip_states: `[batch, clip_tokens, dim]` CLIP-role tokens (keys and values).
            clip_mask: `[batch, clip_tokens]` bool, True = real token.
            llm_states: `[batch, llm_tokens, llm_dim]` LLM tokens (queries).
        Returns:
            `[batch, llm_tokens, dim]` fused LLM tokens `F`.
        """
        batch, llm_len, _ = llm_states.shape
        projected = self.llm_proj(llm_states)  # L1 [batch, llm_tokens, dim]
        probs, value = self._attend(self.norm_context(clip_states), clip_mask, projected)
        attended = (probs @ value) * clip_mask.any(dim=1).to(probs.dtype)[:, None, None, None]
        fused = projected + self.to_out(attended.transpose(1, 2).reshape(batch, llm_len, -1))  # X
        return fused + self.ffn(self.norm_ffn(fused))  # F


class ConditioningAdapter(ModelMixin, ConfigMixin):
    """All conditioning variants behind one forward; saved and loaded with safetensors.

    `drop_llm` removes the LLM branch for chosen rows, keeping every shape fixed: for `cam` and
    `concat` the LLM tokens of those rows are masked (what remains is exactly the `clip`
    conditioning); for `clip` it changes nothing; for `llm` every token is masked, which is the null
    condition: the UNet's cross-attention then reads nothing (zeroed states give zero values).
    """

    @register_to_config
    def __init__(
        self,
        variant: str = "cam",  # one of VARIANTS
        clip_dim: int = 768,  # width of the CLIP-role token features
        llm_dim: int = 2048,  # width of the LLM token features
        cross_attention_dim: int = 768,  # the UNet's cross-attention width d (output width)
        num_heads: int = 8,  # attention heads in the CAM
        llm_scale: float = 1.0,  # λ on the appended LLM branch (`concat`, `cam`); 1 in the LLM4GEN release
        ffn_mult: int = 4,  # CAM feed-forward expansion: d -> ffn_mult·d -> d
        ffn_activation: str = "gelu",  # CAM feed-forward nonlinearity: "gelu" or "quick_gelu" (the release)
    ) -> None:
        super().__init__()
        if variant not in VARIANTS:
            raise ValueError(f"unknown conditioning variant {variant!r}; choose one of {VARIANTS}")
        self.variant = variant
        # one clip-side projection for every variant that reads C, so comparisons stay fair;
        # identity when the widths already agree (SD1.5: 768 = 768), as in the paper
        needs_proj = variant != "llm" and clip_dim != cross_attention_dim
        self.clip_proj = nn.Linear(clip_dim, cross_attention_dim) if needs_proj else nn.Identity()
        self.llm_proj = nn.Linear(llm_dim, cross_attention_dim) if variant in ("llm", "concat") else None
        self.cam = (
            CrossAdapterModule(llm_dim, cross_attention_dim, num_heads, ffn_mult, ffn_activation)
            if variant == "cam"
            else None
        )
        # a weightless variant (`clip` at equal widths) still needs a tensor for `.device` / `.dtype`
        self.register_buffer("device_anchor", torch.zeros(()), persistent=False)

    @property
    def uses_clip(self) -> bool:
        """Whether this variant reads CLIP-role features at all."""
        return self.variant != "llm"

    @property
    def uses_llm(self) -> bool:
        """Whether this variant reads LLM features at all."""
        return self.variant != "clip"

    def save_pretrained(self, save_directory: str | os.PathLike, **kwargs: Any) -> None:
        """Save config and safetensors weights; a weightless adapter (`clip` at equal widths, as
        SD1.5's) gets an empty weights file, which diffusers would skip but loading requires."""
        super().save_pretrained(save_directory, **kwargs)
        if not self.state_dict() and kwargs.get("is_main_process", True):
            file = Path(save_directory) / _add_variant(SAFETENSORS_WEIGHTS_NAME, kwargs.get("variant"))
            atomic_save_safetensors({}, file)

    def forward(
        self,
        clip_states: torch.Tensor | None,
        clip_mask: torch.Tensor | None,
        llm_states: torch.Tensor | None = None,
        llm_mask: torch.Tensor | None = None,
        drop_llm: torch.Tensor | None = None,
    ) -> Conditioning:
        """Build the UNet's context.

        Args:
            clip_states: `[batch, clip_tokens, clip_dim]` CLIP-role token features; the `llm`
                variant ignores them (None allowed there).
            clip_mask: `[batch, clip_tokens]` bool, True = real token.
            llm_states: `[batch, llm_tokens, llm_dim]` LLM token features; the `clip` variant
                ignores them (None allowed there).
            llm_mask: `[batch, llm_tokens]` bool; None = all tokens real.
            drop_llm: `[batch]` bool; True removes the LLM branch of that row (see class docstring).
        Returns:
            `Conditioning` with states `[batch, tokens, cross_attention_dim]` and mask `[batch, tokens]`.
        """
        cfg = self.config
        batches = set()
        if self.variant != "llm":
            batches.add(self._check_features("clip_states", clip_states, clip_mask, cfg.clip_dim))
            clip_mask = clip_mask.to(device=clip_states.device, dtype=torch.bool)
        if self.variant != "clip":
            if llm_mask is None and llm_states is not None:
                llm_mask = torch.ones(llm_states.shape[:2], dtype=torch.bool, device=llm_states.device)
            batches.add(self._check_features("llm_states", llm_states, llm_mask, cfg.llm_dim))
            llm_mask = llm_mask.to(device=llm_states.device, dtype=torch.bool)
        if len(batches) != 1:
            raise ValueError(f"clip_states and llm_states have different batch sizes {sorted(batches)}")
        batch = batches.pop()
        if drop_llm is not None:
            if tuple(drop_llm.shape) != (batch,):
                raise ValueError(f"drop_llm must have shape [batch] = [{batch}], got {list(drop_llm.shape)}")
            if self.variant != "clip":
                llm_mask = llm_mask & ~drop_llm.to(device=llm_mask.device, dtype=torch.bool)[:, None]
        if self.variant != "clip":
            llm_states, llm_mask = trim_padding(llm_states, llm_mask)

        if self.variant == "clip":
            return self._finish(self.clip_proj(clip_states), clip_mask, clip_states.shape[1], 0)
        if self.variant == "llm":
            return self._finish(self.llm_proj(llm_states), llm_mask, 0, llm_states.shape[1])
        clip_part = self.clip_proj(clip_states)
        if self.variant == "concat":
            llm_part = self.llm_proj(llm_states)
        else:
            llm_part = self.cam(clip_part, clip_mask, llm_states)
        states = torch.cat([clip_part, cfg.llm_scale * llm_part], dim=1)
        mask = torch.cat([clip_mask, llm_mask], dim=1)
        return self._finish(states, mask, clip_states.shape[1], llm_states.shape[1])

    @staticmethod
    def _finish(states: torch.Tensor, mask: torch.Tensor, clip_tokens: int, llm_tokens: int) -> Conditioning:
        """Zero the masked positions so that padding can never carry information."""
        return Conditioning(states.masked_fill(~mask[..., None], 0.0), mask, clip_tokens, llm_tokens)

    @staticmethod
    def _check_features(name: str, states: torch.Tensor | None, mask: torch.Tensor | None, dim: int) -> int:
        """Validate `[batch, tokens, dim]` features and their `[batch, tokens]` mask; return the batch."""
        if states is None:
            raise ValueError(f"this adapter variant needs {name} [batch, tokens, {dim}]; pass the encoder's features")
        if states.ndim != 3:
            raise ValueError(f"{name} must be [batch, tokens, dim], got shape {list(states.shape)}")
        if states.shape[-1] != dim:
            raise ValueError(
                f"{name} has feature dim {states.shape[-1]} but the adapter was built for {dim}; "
                "use the encoder the adapter was trained with, or build a new adapter"
            )
        if mask is None or tuple(mask.shape) != tuple(states.shape[:2]):
            got = None if mask is None else list(mask.shape)
            raise ValueError(f"the mask of {name} must have shape {list(states.shape[:2])}, got {got}")
        return states.shape[0]


def build_adapter(
    variant: str,
    clip_dim: int,
    llm_dim: int,
    cross_attention_dim: int,
    num_heads: int = 8,
    llm_scale: float = 1.0,
    **options: object,
) -> ConditioningAdapter:
    """Build a conditioning adapter by variant name (`clip`, `llm`, `concat`, `cam`).

    `options` are the remaining `ConditioningAdapter` config fields (`ffn_mult`, `ffn_activation`).
    """
    return ConditioningAdapter(
        variant=variant,
        clip_dim=clip_dim,
        llm_dim=llm_dim,
        cross_attention_dim=cross_attention_dim,
        num_heads=num_heads,
        llm_scale=llm_scale,
        **options,
    )
