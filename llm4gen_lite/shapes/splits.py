"""Data splits: train, test-iid and test-compositional, and per-example deterministic streams.

- "train": scenes whose objects never use a HELD_OUT_COMBOS (colour, shape) pair — so those
  combinations appear in no training image and no training caption.
- "test_iid": the training distribution, drawn from a different random stream.
- "test_comp": every scene holds at least one held-out combination (other objects unrestricted).
- "all": no restriction (demos).

Example i of a split is generated from `np.random.default_rng([seed, split_id, i])`, so any example
can be produced on its own, in any order, by any worker, and is the same everywhere.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from .captions import Caption, make_caption
from .world import ALL_COMBOS, HELD_OUT_COMBOS, SEEN_COMBOS, Scene, sample_scene

SPLITS: tuple[str, ...] = ("train", "test_iid", "test_comp", "all")
SPLIT_IDS: dict[str, int] = {"train": 0, "test_iid": 1, "test_comp": 2, "all": 3}


def _check_split(split: str) -> None:
    if split not in SPLIT_IDS:
        raise ValueError(f"unknown split {split!r}; expected one of {list(SPLITS)}")


def is_held_out(color: str, shape: str) -> bool:
    return (color, shape) in HELD_OUT_COMBOS


def split_combos(split: str) -> tuple[tuple[tuple[str, str], ...], tuple[tuple[str, str], ...] | None]:
    """(allowed combos, required combos or None) of a split."""
    _check_split(split)
    if split in ("train", "test_iid"):
        return SEEN_COMBOS, None
    if split == "test_comp":
        return ALL_COMBOS, tuple(sorted(HELD_OUT_COMBOS))
    return ALL_COMBOS, None


def scene_in_split(scene: Scene, split: str) -> bool:
    """Could `scene` have been drawn for `split`?"""
    allowed, required = split_combos(split)
    combos = scene.combos
    if any(c not in allowed for c in combos):
        return False
    return required is None or any(c in required for c in combos)


def sample_split_scene(rng: np.random.Generator, split: str = "train",
                       n_objects: int | Sequence[int] = (1, 4), **kwargs) -> Scene:
    """`sample_scene` restricted to a split's combinations."""
    allowed, required = split_combos(split)
    return sample_scene(rng, n_objects, combos=allowed, require_combos=required, **kwargs)


def example_rng(seed: int, split: str, index: int) -> np.random.Generator:
    """The random stream of example `index` of `split`."""
    _check_split(split)
    if index < 0:
        raise IndexError(f"negative example index {index}")
    return np.random.default_rng([int(seed), SPLIT_IDS[split], int(index)])


def make_example(seed: int, split: str, index: int, *, n_objects: int | Sequence[int] = (1, 4),
                 dense_prob: float = 0.0, p_repeat: float = 0.25,
                 caption_kwargs: dict | None = None) -> tuple[Scene, Caption]:
    """(scene, caption) of example `index`: the caption is dense with probability `dense_prob`."""
    if not 0.0 <= dense_prob <= 1.0:
        raise ValueError(f"dense_prob must lie in [0, 1] (got {dense_prob})")
    rng = example_rng(seed, split, index)
    scene = sample_split_scene(rng, split, n_objects, p_repeat=p_repeat)
    dense = int(rng.integers(1000)) < int(round(dense_prob * 1000))
    kwargs = dict(caption_kwargs or {})
    if dense:
        kwargs = {k: v for k, v in kwargs.items() if k in ("min_words", "max_words", "extra_words")}
    else:
        kwargs = {k: v for k, v in kwargs.items() if k not in ("min_words", "max_words", "extra_words")}
    caption = make_caption(scene, rng, "dense" if dense else "short", **kwargs)
    return scene, caption
