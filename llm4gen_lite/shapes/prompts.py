"""The committed CompBench-lite / DensePrompts-lite prompt sets (`data/prompts/*.jsonl`).

Each line is one prompt row:

    {"id": "color-007", "set": "color", "category": "color", "prompt": "...", "style": "short",
     "scene": {"objects": [{"shape", "color", "size", "fill", "centre": [x, y]}, ...]},
     "spans": [{"start", "end", "kind", "obj", "value", ("group"), ("ref")}, ...],
     "pairs": [[attribute span index, entity span index], ...],
     ("pair_id": "swap-003", "swap": "color" | "shape", "variant": 0 | 1)}   # attr_swap only

`scene` is the ground truth used to render a reference image; the scorer checks only what the
prompt states (its spans). `build_prompt_sets(seed)` is deterministic, and
`scripts/make_prompt_sets.py` writes the files byte-identically.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from .captions import Caption, approx_token_count, dense_caption, short_caption
from .world import (
    COLOR_NAMES, FILLS, HELD_OUT_COMBOS, SEEN_COMBOS, SHAPES, SIZES, Scene, ShapeObject, is_clear,
    place_objects, sample_scene,
)

COMPBENCH_CATEGORIES: tuple[str, ...] = ("color", "shape", "texture", "spatial", "counting", "complex")
"""CompBench-lite categories: colour binding, shape binding, size/texture (fill) binding,
spatial relations, counting, complex (3–4 objects, all attributes and a relation)."""

PROMPT_SETS: tuple[str, ...] = COMPBENCH_CATEGORIES + (
    "single", "test_iid", "test_comp", "attr_swap", "dense_long")
"""Every committed set. "single": one-object prompts (colour/shape accuracy); "test_iid" and
"test_comp": short prompts from the training distribution / with held-out combos; "attr_swap":
pairs of prompts with colours or shapes exchanged; "dense_long": dense prompts > 77 tokens."""

PROMPTS_SUBDIR = "prompts"
DEFAULT_SEED = 20240


def prompts_dir() -> Path:
    """`<data dir>/prompts` (the repo's `data/`, or `$LLM4GEN_DATA`)."""
    from ..paths import data_dir  # lazy: paths imports torch

    return data_dir() / PROMPTS_SUBDIR


# --------------------------------------------------------------------------------------------
# Rows
# --------------------------------------------------------------------------------------------


def make_row(set_name: str, k: int, scene: Scene, caption: Caption, category: str | None = None,
             **extra) -> dict:
    row = {"id": f"{set_name}-{k:03d}", "set": set_name, "category": category or set_name,
           "prompt": caption.text, "style": caption.style, "scene": scene.to_dict(),
           "spans": [s.to_dict() for s in caption.spans], "pairs": [list(p) for p in caption.pairs]}
    row.update(extra)
    return row


def row_scene(row: dict) -> Scene:
    return Scene.from_dict(row["scene"])


def row_caption(row: dict) -> Caption:
    return Caption.from_dict({"text": row["prompt"], "style": row.get("style", "short"),
                              "spans": row.get("spans", ()), "pairs": row.get("pairs", ())})


def _dump(rows: Sequence[dict]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False, separators=(",", ":")) + "\n" for r in rows)


def load_prompt_set(name: str, root: str | Path | None = None) -> list[dict]:
    """Rows of one committed set (`PROMPT_SETS`), or of any jsonl file given as a path."""
    path = Path(name) if str(name).endswith(".jsonl") else (
        Path(root) if root is not None else prompts_dir()) / f"{name}.jsonl"
    if not path.is_file():
        known = ", ".join(PROMPT_SETS)
        raise FileNotFoundError(f"{path}: no such prompt set (known sets: {known}; "
                                "regenerate with `python scripts/make_prompt_sets.py`)")
    rows = []
    for ln, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}:{ln}: bad JSON ({err})") from err
        for key in ("prompt", "scene", "category"):
            if key not in row:
                raise ValueError(f"{path}:{ln}: row has no {key!r}")
        rows.append(row)
    return rows


# --------------------------------------------------------------------------------------------
# Scene helpers
# --------------------------------------------------------------------------------------------


def _pick(rng: np.random.Generator, seq: Sequence):
    return seq[int(rng.integers(len(seq)))]


def _distinct(rng: np.random.Generator, seq: Sequence, k: int) -> list:
    pool = list(seq)
    out = []
    for _ in range(k):
        out.append(pool.pop(int(rng.integers(len(pool)))))
    return out


def _place(rng: np.random.Generator, attrs: Sequence[tuple[str, str, str, str]]) -> Scene | None:
    """attrs: (colour, shape, size, fill) per object."""
    centres = place_objects(rng, [a[2] for a in attrs])
    if centres is None:
        return None
    return Scene(tuple(ShapeObject(shape=s, color=c, size=z, fill=f, centre=xy)
                       for (c, s, z, f), xy in zip(attrs, centres)))


def _rand_sf(rng: np.random.Generator) -> tuple[str, str]:
    return _pick(rng, SIZES), _pick(rng, FILLS)


def _has_clear_pair(scene: Scene) -> bool:
    n = len(scene)
    return any(is_clear(scene[i], scene[j]) for i in range(n) for j in range(n) if i != j)


SEEN = set(SEEN_COMBOS)


def _seen_distinct_pairs(rng: np.random.Generator, k: int) -> list[tuple[str, str]]:
    """k seen combos with pairwise distinct colours and distinct shapes."""
    while True:
        colours = _distinct(rng, COLOR_NAMES, k)
        shapes = _distinct(rng, SHAPES, k)
        combos = list(zip(colours, shapes))
        if all(c in SEEN for c in combos):
            return combos


# --------------------------------------------------------------------------------------------
# Set builders: each takes its own Generator and returns rows
# --------------------------------------------------------------------------------------------


def _single(rng: np.random.Generator) -> list[dict]:
    rows = []
    k = 0
    for colour, shape in sorted(SEEN_COMBOS):
        for size in SIZES:
            for fill in FILLS:
                scene = _place(rng, [(colour, shape, size, fill)])
                mention = _pick(rng, ((), (), ("size",), ("fill",), ("size", "fill")))
                cap = short_caption(scene, rng, mention=mention, relation=False)
                rows.append(make_row("single", k, scene, cap))
                k += 1
    return rows


def _color(rng: np.random.Generator, n: int = 128) -> list[dict]:
    rows = []
    while len(rows) < n:
        k = 2 + int(rng.integers(1000) < 300)
        combos = _seen_distinct_pairs(rng, k)
        scene = _place(rng, [(c, s, *_rand_sf(rng)) for c, s in combos])
        cap = short_caption(scene, rng, mention=(), relation=False)
        rows.append(make_row("color", len(rows), scene, cap))
    return rows


def _shape(rng: np.random.Generator, n: int = 128) -> list[dict]:
    rows = []
    while len(rows) < n:
        k = 2 + int(rng.integers(1000) < 300)
        shapes = _distinct(rng, SHAPES, k)
        if len(rows) % 2 == 0:  # one colour for all: only the shapes tell the objects apart
            colour = _pick(rng, COLOR_NAMES)
            combos = [(colour, s) for s in shapes]
        else:
            combos = [(_pick(rng, COLOR_NAMES), s) for s in shapes]
        if not all(c in SEEN for c in combos):
            continue
        scene = _place(rng, [(c, s, *_rand_sf(rng)) for c, s in combos])
        cap = short_caption(scene, rng, mention=(), relation=False)
        rows.append(make_row("shape", len(rows), scene, cap))
    return rows


def _texture(rng: np.random.Generator, n: int = 128) -> list[dict]:
    rows = []
    variants = (("small", "filled"), ("small", "outlined"), ("large", "filled"), ("large", "outlined"))
    while len(rows) < n:
        a, b = _distinct(rng, variants, 2)  # the two objects differ in size, fill or both
        if len(rows) % 2 == 0:  # same colour and shape: only size/fill tell them apart
            c, s = _pick(rng, SEEN_COMBOS)
            attrs = [(c, s, *a), (c, s, *b)]
        else:
            (c1, s1), (c2, s2) = _seen_distinct_pairs(rng, 2)
            attrs = [(c1, s1, *a), (c2, s2, *b)]
        scene = _place(rng, attrs)
        cap = short_caption(scene, rng, mention=("size", "fill"), relation=False)
        rows.append(make_row("texture", len(rows), scene, cap))
    return rows


def _spatial(rng: np.random.Generator, n: int = 128) -> list[dict]:
    rows = []
    while len(rows) < n:
        (c1, s1), (c2, s2) = _seen_distinct_pairs(rng, 2)
        scene = _place(rng, [(c1, s1, *_rand_sf(rng)), (c2, s2, *_rand_sf(rng))])
        if not _has_clear_pair(scene):
            continue
        cap = short_caption(scene, rng, mention=(), relation=True)
        rows.append(make_row("spatial", len(rows), scene, cap))
    return rows


def _counting(rng: np.random.Generator, n: int = 128) -> list[dict]:
    rows = []
    while len(rows) < n:
        n1 = 2 + int(rng.integers(3))  # 2..4
        n2 = int(rng.integers(5 - n1))  # 0..(4 - n1)
        combos = _distinct(rng, SEEN_COMBOS, 2)
        attrs = [(*combos[0], *_rand_sf(rng)) for _ in range(n1)]
        attrs += [(*combos[1], *_rand_sf(rng)) for _ in range(n2)]
        scene = _place(rng, attrs)
        if scene is None:
            continue
        cap = short_caption(scene, rng, mention=(), relation=False)
        rows.append(make_row("counting", len(rows), scene, cap))
    return rows


def _complex(rng: np.random.Generator, n: int = 128) -> list[dict]:
    rows = []
    while len(rows) < n:
        k = 3 + int(rng.integers(2))
        scene = sample_scene(rng, k, combos=SEEN_COMBOS, p_repeat=0.0)
        keys = {(o.color, o.shape, o.size, o.fill) for o in scene}
        if len(keys) < k or not _has_clear_pair(scene):
            continue
        cap = short_caption(scene, rng, mention=("size", "fill"), relation=True)
        rows.append(make_row("complex", len(rows), scene, cap))
    return rows


def _test_split(split: str, rng: np.random.Generator, n: int = 200) -> list[dict]:
    rows = []
    for k in range(n):
        if split == "test_iid":
            scene = sample_scene(rng, (1, 4), combos=SEEN_COMBOS)
        else:
            scene = sample_scene(rng, (1, 4), require_combos=sorted(HELD_OUT_COMBOS))
        cap = short_caption(scene, rng)
        rows.append(make_row(split, k, scene, cap))
    return rows


def _attr_swap(rng: np.random.Generator, n_pairs: int = 64) -> list[dict]:
    from .world import swap_attribute

    rows = []
    p = 0
    while p < n_pairs:
        kind = "color" if p < n_pairs // 2 else "shape"
        with_relation = p % 2 == 1
        (c1, s1), (c2, s2) = _seen_distinct_pairs(rng, 2)
        scene = _place(rng, [(c1, s1, *_rand_sf(rng)), (c2, s2, *_rand_sf(rng))])
        twin = swap_attribute(scene, 0, 1, kind)
        if not all(c in SEEN for c in twin.combos):
            continue
        if with_relation and not _has_clear_pair(scene):
            continue
        cap_seed = int(rng.integers(2**31))
        caps = [short_caption(sc, np.random.default_rng(cap_seed), mention=(),
                              relation=with_relation) for sc in (scene, twin)]
        for v, (sc, cap) in enumerate(zip((scene, twin), caps)):
            rows.append(make_row("attr_swap", len(rows), sc, cap, pair_id=f"swap-{p:03d}",
                                 swap=kind, variant=v))
        p += 1
    return rows


def _dense_long(rng: np.random.Generator, n: int = 100, min_tokens: int = 78) -> list[dict]:
    rows = []
    while len(rows) < n:
        k = 3 + int(rng.integers(2))
        scene = sample_scene(rng, k, combos=SEEN_COMBOS, p_repeat=0.0)
        cap = dense_caption(scene, rng)
        if approx_token_count(cap.text) < min_tokens:
            continue
        rows.append(make_row("dense_long", len(rows), scene, cap))
    return rows


_BUILDERS: dict[str, Callable[[np.random.Generator], list[dict]]] = {
    "color": _color,
    "shape": _shape,
    "texture": _texture,
    "spatial": _spatial,
    "counting": _counting,
    "complex": _complex,
    "single": _single,
    "test_iid": lambda rng: _test_split("test_iid", rng),
    "test_comp": lambda rng: _test_split("test_comp", rng),
    "attr_swap": _attr_swap,
    "dense_long": _dense_long,
}


def build_prompt_set(name: str, seed: int = DEFAULT_SEED) -> list[dict]:
    """Rows of one set, deterministically from `seed`."""
    if name not in _BUILDERS:
        raise ValueError(f"unknown prompt set {name!r}; expected one of {list(PROMPT_SETS)}")
    rng = np.random.default_rng([int(seed), PROMPT_SETS.index(name)])
    return _BUILDERS[name](rng)


def build_prompt_sets(seed: int = DEFAULT_SEED) -> dict[str, list[dict]]:
    return {name: build_prompt_set(name, seed) for name in PROMPT_SETS}


def prompt_set_text(name: str, seed: int = DEFAULT_SEED) -> str:
    """The exact jsonl text of a set (what the committed file holds)."""
    return _dump(build_prompt_set(name, seed))


def write_prompt_sets(out_dir: str | Path | None = None, seed: int = DEFAULT_SEED,
                      names: Sequence[str] = PROMPT_SETS) -> list[Path]:
    """Write `<out_dir>/<name>.jsonl` for each set (atomically); returns the paths."""
    from ..io import atomic_write_bytes

    out = Path(out_dir) if out_dir is not None else prompts_dir()
    paths = []
    for name in names:
        paths.append(atomic_write_bytes(out / f"{name}.jsonl", prompt_set_text(name, seed).encode()))
    return paths
