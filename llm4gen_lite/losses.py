"""Training losses: the diffusion loss (ε / v / x0 targets, min-SNR weighting) and LLM4GEN's
entity-guided regularisation on cross-attention maps, with the token bookkeeping it needs.

Entity-guided loss: for every (attribute, entity) pair of a caption ("red" → "circle"), the
head-averaged cross-attention maps of the attribute's tokens and the entity's tokens are pulled
together: `λ_e · mean over pairs and layers of d(A_attr, A_entity)`, each map spatially normalised
to sum to 1, `d = 1 − cosine` or the mean squared difference of the maps scaled to mean 1.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from .encoders import token_indices_for_span

Span = tuple[int, int]  # character [start, end) in a prompt


# ----------------------------------------------------------------------------------------------
# diffusion loss
# ----------------------------------------------------------------------------------------------
def diffusion_target(
    x0: torch.Tensor, noise: torch.Tensor, alphas_cumprod_t: torch.Tensor, prediction_type: str
) -> torch.Tensor:
    """What the UNet regresses for clean samples `x0` noised with `noise` at ᾱ_t.

    Args:
        x0, noise: `[batch, channels, h, w]`.
        alphas_cumprod_t: `[batch]` ᾱ_t of each sample's timestep.
        prediction_type: `"epsilon"` (target ε), `"v_prediction"` (target v = √ᾱ ε − √(1−ᾱ) x0) or
            `"sample"` (target x0).
    """
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "sample":
        return x0
    if prediction_type == "v_prediction":
        a = alphas_cumprod_t.to(x0.dtype).view(-1, *([1] * (x0.ndim - 1)))
        return a.sqrt() * noise - (1 - a).sqrt() * x0
    raise ValueError(f"unknown prediction_type {prediction_type!r}; use 'epsilon', 'v_prediction' or 'sample'")


def predicted_x0(
    pred: torch.Tensor, xt: torch.Tensor, alphas_cumprod_t: torch.Tensor, prediction_type: str
) -> torch.Tensor:
    """The clean sample a UNet output implies: the inverse of `diffusion_target`.

    Args:
        pred, xt: `[batch, channels, h, w]` UNet output and the noisy input it was given.
        alphas_cumprod_t: `[batch]` ᾱ_t of each sample's timestep.
        prediction_type: as in `diffusion_target`.
    Returns:
        x̂0 `[batch, channels, h, w]`.
    """
    if prediction_type == "sample":
        return pred
    a = alphas_cumprod_t.to(xt.dtype).view(-1, *([1] * (xt.ndim - 1)))
    if prediction_type == "epsilon":
        return (xt - (1 - a).sqrt() * pred) / a.sqrt()
    if prediction_type == "v_prediction":
        return a.sqrt() * xt - (1 - a).sqrt() * pred
    raise ValueError(f"unknown prediction_type {prediction_type!r}; use 'epsilon', 'v_prediction' or 'sample'")


def min_snr_weights(alphas_cumprod_t: torch.Tensor, gamma: float, prediction_type: str) -> torch.Tensor:
    """Min-SNR-γ weights `[batch]` (Hang et al. 2023) for the ε, v or x0 loss.

    ε: `min(snr, γ) / snr`; v: `min(snr, γ) / (snr + 1)`; x0: `min(snr, γ)`. All weight the
    implied x0 error by `min(snr, γ)`, so at zero terminal SNR the weight is 0.
    """
    a = alphas_cumprod_t.double()
    snr = a / (1 - a).clamp(min=1e-12)
    clipped = snr.clamp(max=gamma)
    if prediction_type == "epsilon":
        weights = clipped / snr.clamp(min=1e-12)
    elif prediction_type == "v_prediction":
        weights = clipped / (snr + 1)
    elif prediction_type == "sample":
        weights = clipped
    else:
        raise ValueError(f"unknown prediction_type {prediction_type!r}; use 'epsilon', 'v_prediction' or 'sample'")
    return weights.float()


def diffusion_loss(
    pred: torch.Tensor,
    target: torch.Tensor,
    alphas_cumprod_t: torch.Tensor | None = None,
    min_snr_gamma: float = 0.0,
    prediction_type: str = "v_prediction",
) -> torch.Tensor:
    """Mean squared error `[batch, ...]` → scalar, optionally min-SNR-γ weighted per sample."""
    per_sample = (pred.float() - target.float()).pow(2).flatten(1).mean(1)
    if min_snr_gamma > 0:
        if alphas_cumprod_t is None:
            raise ValueError("min-SNR weighting needs alphas_cumprod_t")
        per_sample = per_sample * min_snr_weights(alphas_cumprod_t, min_snr_gamma, prediction_type).to(pred.device)
    return per_sample.mean()


# ----------------------------------------------------------------------------------------------
# attribute–entity pairs
# ----------------------------------------------------------------------------------------------
def caption_pairs(caption: Any) -> list[tuple[Span, Span]]:
    """`(attribute span, entity span)` character spans of a caption, e.g. "red" → "circle".

    A Shapes `Caption` carries its pairs exactly (recorded when it was generated); free text (a
    `str`) goes through the adjective+noun parse of `shapes.caption_from_text`: each attribute
    word binds to the head noun that follows it.
    """
    from .shapes import attribute_pairs

    return [((a.start, a.end), (e.start, e.end)) for a, e in attribute_pairs(caption)]


@dataclass
class TokenPairs:
    """Attribute/entity token selections for a batch, ready for `entity_loss`.

    `P` pairs in all; each row selects (averages) the tokens of one side of one pair.
    """

    batch_index: torch.Tensor  # [P] long: the batch row of each pair
    attr_weights: torch.Tensor  # [P, tokens] float: 1/n on the attribute's n tokens, else 0
    entity_weights: torch.Tensor  # [P, tokens] float: 1/n on the entity's n tokens, else 0

    def __len__(self) -> int:
        return int(self.batch_index.numel())


def token_pairs(
    pairs_per_row: Sequence[Sequence[tuple[Span, Span]]],
    offsets_per_row: Sequence[Sequence[tuple[int, int]]],
    total_tokens: int,
    token_offset: int = 0,
    keep_rows: Sequence[bool] | None = None,
) -> TokenPairs:
    """Map character-span pairs to token selections of a conditioning sequence.

    Args:
        pairs_per_row: per batch row, `(attribute span, entity span)` pairs in the prompt text.
        offsets_per_row: per batch row, the encoder's per-token character offsets.
        total_tokens: length of the UNet's context sequence.
        token_offset: where this encoder's tokens start in that sequence (CLIP first, then LLM).
        keep_rows: rows to use (e.g. False where the text was dropped); None = all.
    """
    index, attr_rows, ent_rows = [], [], []
    for row, (pairs, offsets) in enumerate(zip(pairs_per_row, offsets_per_row)):
        if keep_rows is not None and not keep_rows[row]:
            continue
        for attr_span, ent_span in pairs:
            attr, ent = token_indices_for_span(offsets, *attr_span), token_indices_for_span(offsets, *ent_span)
            if not attr or not ent or set(attr) & set(ent):
                continue  # truncated away, or one token covering both: no information
            a, e = torch.zeros(total_tokens), torch.zeros(total_tokens)
            a[[token_offset + i for i in attr]] = 1.0 / len(attr)
            e[[token_offset + i for i in ent]] = 1.0 / len(ent)
            index.append(row)
            attr_rows.append(a)
            ent_rows.append(e)
    if not index:
        empty = torch.zeros(0, total_tokens)
        return TokenPairs(torch.zeros(0, dtype=torch.long), empty, empty.clone())
    return TokenPairs(torch.tensor(index), torch.stack(attr_rows), torch.stack(ent_rows))


def merge_token_pairs(parts: Sequence[TokenPairs]) -> TokenPairs:
    """Concatenate pair selections (e.g. the CLIP-branch and the LLM-branch pairs of one batch)."""
    return TokenPairs(
        torch.cat([p.batch_index for p in parts]),
        torch.cat([p.attr_weights for p in parts]),
        torch.cat([p.entity_weights for p in parts]),
    )


# ----------------------------------------------------------------------------------------------
# entity-guided loss
# ----------------------------------------------------------------------------------------------
def map_distance(a: torch.Tensor, b: torch.Tensor, distance: str = "cosine") -> torch.Tensor:
    """Distance `[P]` between spatial maps `[P, positions]`, each normalised to sum to 1 first.

    `"cosine"`: 1 − cosine similarity. `"l2"`: mean squared difference of the maps scaled to mean 1
    (so the value does not depend on the resolution).
    """
    a = a / a.sum(-1, keepdim=True).clamp(min=1e-12)
    b = b / b.sum(-1, keepdim=True).clamp(min=1e-12)
    if distance == "cosine":
        return 1 - F.cosine_similarity(a, b, dim=-1, eps=1e-12)
    if distance == "l2":
        n = a.shape[-1]
        return ((a - b) * n).pow(2).mean(-1)
    raise ValueError(f"unknown entity distance {distance!r}; use 'cosine' or 'l2'")


def _pair_maps(maps: torch.Tensor, pairs: TokenPairs) -> tuple[torch.Tensor, torch.Tensor]:
    """The attribute's and the entity's spatial map of every pair, each `[P, positions]`, from
    cross-attention maps `[batch, tokens, h, w]`."""
    flat = maps.flatten(2).float()  # [batch, tokens, positions]
    batch_index = pairs.batch_index.to(flat.device)
    return _weighted_rows(flat, batch_index, pairs.attr_weights), _weighted_rows(flat, batch_index, pairs.entity_weights)


def _weighted_rows(flat: torch.Tensor, batch_index: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """`sum_t weights[p, t] · flat[batch_index[p], t]` for every pair: `[P, positions]`.

    Reads only the few tokens each pair selects (`weights` is sparse) instead of a `[P, tokens,
    positions]` copy of the maps per layer, which made an entity-loss step of the `full` preset
    2.6x a plain `cam` step; this way it is 1.35x (measured, docs/TRAINING.md).
    """
    weights = weights.to(flat)
    pair, token = weights.nonzero(as_tuple=True)
    picked = flat[batch_index[pair], token] * weights[pair, token, None]  # [selected tokens, positions]
    return flat.new_zeros(weights.shape[0], flat.shape[-1]).index_add(0, pair, picked)


def entity_loss(
    maps: Mapping[str, torch.Tensor] | Sequence[torch.Tensor],
    pairs: TokenPairs,
    distance: str = "cosine",
    row_weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean over layers and pairs of `d(A_attr, A_entity)`; 0 (with a graph) when there are no pairs.

    Args:
        maps: cross-attention maps, one per layer, `[batch, tokens, h, w]` (head-averaged,
            differentiable — `attention.capture_cross_attention(mode="last")`).
        pairs: token selections from `token_pairs`.
        row_weights: `[batch]` 0/1 weights (e.g. timestep in range); pairs of 0-rows are ignored.
    """
    layer_maps = list(maps.values()) if isinstance(maps, Mapping) else list(maps)
    if not layer_maps:
        raise ValueError("entity_loss needs at least one cross-attention map")
    zero = sum(m.sum() for m in layer_maps) * 0.0
    if len(pairs) == 0:
        return zero
    weights = torch.ones(len(pairs), device=layer_maps[0].device)
    if row_weights is not None:
        weights = row_weights.to(weights)[pairs.batch_index.to(weights.device)]
    if weights.sum() <= 0:
        return zero
    total = 0.0
    for m in layer_maps:
        attr, ent = _pair_maps(m, pairs)
        total = total + (map_distance(attr, ent, distance) * weights).sum() / weights.sum()
    return total / len(layer_maps)


def entity_map_distances(maps: torch.Tensor, pairs: TokenPairs, distance: str = "cosine") -> dict[str, float]:
    """How far each attribute's map lies from its own entity's and from the prompt's other entities'.

    The entity loss pulls `own` toward 0; it can only teach binding where `own` starts out no
    smaller than `other` (maps that are the same for every token satisfy it from the start).

    Args:
        maps: cross-attention maps of one resolution, `[batch, tokens, h, w]`.
        pairs: pairs from one encoder branch (`token_pairs`); an entity counts as "other" for a
            pair when it is in the same prompt and shares no token with the pair's own entity
            (meant for prompts that name each object once, such as the attribute-swap set).
    Returns: `{"own": mean d(attr, own entity), "other": mean d(attr, other entity), "pairs": P,
        "other_pairs": count}` (`other` is NaN when no prompt has two entities).
    """
    attr, ent = _pair_maps(maps, pairs)
    own = map_distance(attr, ent, distance)
    n = len(pairs)
    support = (pairs.entity_weights > 0).float()  # [P, tokens]
    is_other = (pairs.batch_index[:, None] == pairs.batch_index[None, :]) & (support @ support.T == 0)  # [P, P]
    every = map_distance(attr[:, None].expand(-1, n, -1).reshape(n * n, -1),
                         ent[None].expand(n, -1, -1).reshape(n * n, -1), distance).view(n, n)  # [P attr, P entity]
    other = every[is_other]
    return {"own": float(own.mean()) if n else float("nan"),
            "other": float(other.mean()) if len(other) else float("nan"),
            "pairs": n, "other_pairs": len(other)}
