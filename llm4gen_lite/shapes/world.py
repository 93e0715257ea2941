"""The Shapes world: vocabulary, scene objects, spatial relations and the deterministic sampler.

A scene is 1–4 flat shapes on a black canvas. Every object has four attributes — shape, colour,
size, fill — and a centre in normalised canvas coordinates (x to the right, y downwards, both in
[0, 1]), so the same scene renders at 32×32, 64×64 or any other size.

Determinism: everything random goes through a caller-supplied `numpy.random.Generator`
(`random()` doubles mapped to integers by exact IEEE multiplication, `integers()` elsewhere; no
transcendental functions), and centres live on a 1/64 grid that binary floating point represents
exactly. Same seed → same scenes on any machine.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Iterable, Sequence

import numpy as np

# --------------------------------------------------------------------------------------------
# Vocabulary
# --------------------------------------------------------------------------------------------

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond")
"""Shape nouns. Triangles point up; diamonds are squares turned 45°."""

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (255, 0, 0),
    "green": (0, 255, 0),
    "blue": (0, 0, 255),
    "yellow": (255, 255, 0),
    "magenta": (255, 0, 255),
    "cyan": (0, 255, 255),
    "white": (255, 255, 255),
}
"""Colour names → RGB. The seven non-black corners of the RGB cube: any two differ by a full
channel, so the parser tells them apart by *which channels are on*, whatever the brightness."""

COLOURS = COLORS  # British spelling alias
COLOR_NAMES: tuple[str, ...] = tuple(COLORS)
SIZES: tuple[str, ...] = ("small", "large")
FILLS: tuple[str, ...] = ("filled", "outlined")
RELATIONS: tuple[str, ...] = ("left of", "right of", "above", "below")
INVERSE_RELATION: dict[str, str] = {
    "left of": "right of", "right of": "left of", "above": "below", "below": "above",
}

SIZE_FRACTION: dict[str, float] = {"small": 7 / 32, "large": 12 / 32}
"""Side of an object's bounding box as a fraction of the canvas side (7 px / 12 px at 32×32)."""

GRID = 64
"""Centres are multiples of 1/GRID."""
MIN_GAP = 3 / 32
"""Minimum gap between two objects' boxes along at least one axis (3 px at 32×32)."""
MARGIN = 1 / 32
"""Minimum distance from an object's box to the canvas edge."""
CLEAR_MARGIN = 2 / 32
"""A relation is *clear* when the dominant-axis distance beats the other axis by this much."""

ALL_COMBOS: tuple[tuple[str, str], ...] = tuple((c, s) for c in COLOR_NAMES for s in SHAPES)

HELD_OUT_COMBOS: frozenset[tuple[str, str]] = frozenset({
    ("red", "triangle"),
    ("green", "circle"),
    ("blue", "diamond"),
    ("yellow", "square"),
    ("magenta", "circle"),
    ("cyan", "triangle"),
    ("white", "square"),
})
"""(colour, shape) combinations never shown in training (7 of 28 = 25%). Every colour keeps three
shapes in training and every shape keeps at least five colours, so each word is still learned."""

SEEN_COMBOS: tuple[tuple[str, str], ...] = tuple(c for c in ALL_COMBOS if c not in HELD_OUT_COMBOS)


def _check(value: str, allowed: Sequence[str], what: str) -> None:
    if value not in allowed:
        raise ValueError(f"unknown {what} {value!r}; expected one of {list(allowed)}")


# --------------------------------------------------------------------------------------------
# Objects and scenes
# --------------------------------------------------------------------------------------------


class PlacedObject:
    """What every object description shares: `color` (also spelled `colour`) and `centre` = (x, y)."""

    color: str
    centre: tuple[float, float]

    @property
    def colour(self) -> str:
        return self.color

    @property
    def x(self) -> float:
        return self.centre[0]

    @property
    def y(self) -> float:
        return self.centre[1]


@dataclass(frozen=True)
class ShapeObject(PlacedObject):
    """One object: `shape`, `color`, `size`, `fill` and `centre` = (x, y) in [0, 1] (y down)."""

    shape: str
    color: str
    size: str = "large"
    fill: str = "filled"
    centre: tuple[float, float] = (0.5, 0.5)

    def __post_init__(self) -> None:
        _check(self.shape, SHAPES, "shape")
        _check(self.color, COLOR_NAMES, "colour")
        _check(self.size, SIZES, "size")
        _check(self.fill, FILLS, "fill")
        cx, cy = (float(v) for v in self.centre)
        if not (0.0 <= cx <= 1.0 and 0.0 <= cy <= 1.0):
            raise ValueError(f"centre {self.centre} outside the unit square")
        object.__setattr__(self, "centre", (cx, cy))

    @property
    def combo(self) -> tuple[str, str]:
        """(colour, shape)."""
        return (self.color, self.shape)

    @property
    def half(self) -> float:
        """Half the box side, normalised."""
        return SIZE_FRACTION[self.size] / 2

    def box(self) -> tuple[float, float, float, float]:
        """(x0, y0, x1, y1), normalised."""
        h = self.half
        return (self.x - h, self.y - h, self.x + h, self.y + h)

    def attributes(self) -> dict[str, str]:
        return {"shape": self.shape, "color": self.color, "size": self.size, "fill": self.fill}

    def to_dict(self) -> dict:
        return {"shape": self.shape, "color": self.color, "size": self.size, "fill": self.fill,
                "centre": [self.x, self.y]}

    @classmethod
    def from_dict(cls, d: dict) -> "ShapeObject":
        colour = d.get("color", d.get("colour"))
        return cls(shape=d["shape"], color=colour, size=d.get("size", "large"),
                   fill=d.get("fill", "filled"), centre=tuple(d.get("centre", (0.5, 0.5))))


@dataclass(frozen=True)
class Scene:
    """A frozen tuple of `ShapeObject`s."""

    objects: tuple[ShapeObject, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        object.__setattr__(self, "objects", tuple(self.objects))
        for o in self.objects:
            if not isinstance(o, ShapeObject):
                raise TypeError(f"Scene objects must be ShapeObject, got {type(o).__name__}")

    def __len__(self) -> int:
        return len(self.objects)

    def __iter__(self):
        return iter(self.objects)

    def __getitem__(self, i: int) -> ShapeObject:
        return self.objects[i]

    @property
    def combos(self) -> tuple[tuple[str, str], ...]:
        return tuple(o.combo for o in self.objects)

    def has_held_out(self) -> bool:
        return any(c in HELD_OUT_COMBOS for c in self.combos)

    def relation(self, i: int, j: int) -> str:
        """Relation of object i to object j along the dominant axis ("left of", …)."""
        return relation_between(self.objects[i], self.objects[j])

    def to_dict(self) -> dict:
        return {"objects": [o.to_dict() for o in self.objects]}

    @classmethod
    def from_dict(cls, d: dict) -> "Scene":
        return cls(tuple(ShapeObject.from_dict(o) for o in d["objects"]))

    def replace_object(self, i: int, **changes) -> "Scene":
        objs = list(self.objects)
        objs[i] = replace(objs[i], **changes)
        return Scene(tuple(objs))

    def min_gap(self) -> float:
        """Smallest separation between two boxes (along their best axis); +inf for < 2 objects."""
        best = float("inf")
        for a in range(len(self)):
            for b in range(a + 1, len(self)):
                best = min(best, box_separation(self.objects[a], self.objects[b]))
        return best


# --------------------------------------------------------------------------------------------
# Relations
# --------------------------------------------------------------------------------------------


def relation_from_delta(dx: float, dy: float) -> str:
    """Relation of a subject at offset (-dx, -dy) from its reference, i.e. dx = ref.x - subj.x."""
    if abs(dx) >= abs(dy):
        return "left of" if dx > 0 else "right of"
    return "above" if dy > 0 else "below"


def relation_between(a: ShapeObject, b: ShapeObject) -> str:
    """Where `a` is relative to `b` on the dominant axis: "left of", "right of", "above", "below"."""
    return relation_from_delta(b.x - a.x, b.y - a.y)


def relation_clarity(a: ShapeObject, b: ShapeObject) -> float:
    """|dominant-axis distance| − |other-axis distance|: ≥ CLEAR_MARGIN means unambiguous."""
    dx, dy = abs(b.x - a.x), abs(b.y - a.y)
    return abs(dx - dy)


def is_clear(a: ShapeObject, b: ShapeObject) -> bool:
    return relation_clarity(a, b) >= CLEAR_MARGIN - 1e-9


def relation_holds(subject_centre: Sequence[float], ref_centre: Sequence[float], relation: str,
                   margin: float = 0.04) -> bool:
    """Does `relation` hold between two centres (the T2I-CompBench rule: right direction along
    the relation's axis, that axis dominant, and at least `margin` of the canvas apart)?"""
    dx = float(ref_centre[0]) - float(subject_centre[0])
    dy = float(ref_centre[1]) - float(subject_centre[1])
    if relation in ("left of", "right of"):
        d, other = (dx if relation == "left of" else -dx), abs(dy)
    elif relation in ("above", "below"):
        d, other = (dy if relation == "above" else -dy), abs(dx)
    else:
        raise ValueError(f"unknown relation {relation!r}; expected one of {list(RELATIONS)}")
    return d >= margin and d >= other


def box_separation(a: ShapeObject, b: ShapeObject) -> float:
    """Gap between two boxes along the axis where they are furthest apart (negative = overlap)."""
    gx = abs(a.x - b.x) - a.half - b.half
    gy = abs(a.y - b.y) - a.half - b.half
    return max(gx, gy)


# --------------------------------------------------------------------------------------------
# Sampling
# --------------------------------------------------------------------------------------------

_GRID_STEPS = np.arange(GRID + 1)


def _count_range(n_objects: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(n_objects, (int, np.integer)):
        lo = hi = int(n_objects)
    else:
        lo, hi = (int(v) for v in n_objects)
    if not (1 <= lo <= hi <= 4):
        raise ValueError(f"n_objects must lie in 1..4 (got {n_objects!r})")
    return lo, hi


def _valid_positions(half: float, placed: Sequence[tuple[int, int, float]]) -> np.ndarray:
    """All grid positions [(kx, ky), ...] where a box of half-side `half` fits."""
    lo = int(np.ceil((MARGIN + half) * GRID - 1e-9))
    hi = int(np.floor((1 - MARGIN - half) * GRID + 1e-9))
    xs = _GRID_STEPS[lo:hi + 1]
    valid = np.ones((xs.size, xs.size), dtype=bool)  # [ky, kx]
    for px, py, ph in placed:
        need = (half + ph + MIN_GAP) * GRID - 1e-9
        valid &= (np.abs(xs - px) >= need)[None, :] | (np.abs(xs - py) >= need)[:, None]
    ky, kx = np.nonzero(valid)
    return np.stack([xs[kx], xs[ky]], axis=1)


def _fits(kx: int, ky: int, half: float, placed: Sequence[tuple[int, int, float]]) -> bool:
    for px, py, ph in placed:
        need = (half + ph + MIN_GAP) * GRID - 1e-9
        if abs(kx - px) < need and abs(ky - py) < need:
            return False
    return True


def _uniform_int(u: float, n: int) -> int:
    """Map u in [0, 1) to {0, …, n-1} (exact IEEE arithmetic: same on every machine)."""
    return min(int(u * n), n - 1)


def place_objects(rng: np.random.Generator, sizes: Sequence[str], attempts: int = 500
                  ) -> list[tuple[float, float]] | None:
    """Draw centres (on the 1/64 grid) for boxes of the given sizes: inside the canvas with MARGIN,
    and every pair at least MIN_GAP apart along one axis. Large boxes are placed first, each at a
    uniformly drawn grid position that fits (8 tries, else the whole layout restarts); with three
    or more large boxes those are drawn from the edge bands, where a layout exists. Smaller boxes
    that miss 8 times (and every box after 100 quick restarts) are drawn exactly from the
    enumerated free positions. Returns
    centres in the order of `sizes`, or None if `attempts` restarts all fail."""
    halves = [SIZE_FRACTION[s] / 2 for s in sizes]
    order = sorted(range(len(sizes)), key=lambda i: -halves[i])
    bounds = {}
    for h in set(halves):
        lo = int(np.ceil((MARGIN + h) * GRID - 1e-9))
        bounds[h] = (lo, int(np.floor((1 - MARGIN - h) * GRID + 1e-9)) - lo + 1)
    # Crowded (three or more boxes that cannot sit side by side unless pushed to the edges):
    # draw those boxes' coordinates from the two edge bands only, where a layout always exists.
    hmax = max(halves)
    lo_m, span_m = bounds[hmax]
    band = span_m - int(np.ceil((2 * hmax + MIN_GAP) * GRID - 1e-9))
    crowded = sum(h == hmax for h in halves) >= 3 and 0 < band < span_m // 2

    def coord(u: float, half: float) -> int:
        lo, span = bounds[half]
        if crowded and half == hmax:
            j = _uniform_int(u, 2 * band)
            return lo + j if j < band else lo + span - 2 * band + j
        return lo + _uniform_int(u, span)

    for attempt in range(attempts):
        exact = attempt >= 100
        placed: list[tuple[int, int, float]] = []
        ok = True
        for i in order:
            half = halves[i]
            u = rng.random(16).tolist()
            for t in range(0, 16, 2):
                kx, ky = coord(u[t], half), coord(u[t + 1], half)
                if _fits(kx, ky, half, placed):
                    placed.append((kx, ky, half))
                    break
            else:
                if not exact and half == hmax:
                    ok = False
                    break
                free = _valid_positions(half, placed)
                if free.shape[0] == 0:
                    ok = False
                    break
                kx, ky = free[_uniform_int(float(rng.random()), free.shape[0])]
                placed.append((int(kx), int(ky), half))
        if ok:
            centres: list[tuple[float, float]] = [(0.0, 0.0)] * len(sizes)
            for i, (px, py, _) in zip(order, placed):
                centres[i] = (px / GRID, py / GRID)
            return centres
    return None


def sample_scene(
    rng: np.random.Generator,
    n_objects: int | Sequence[int] = (1, 4),
    *,
    combos: Sequence[tuple[str, str]] | None = None,
    require_combos: Sequence[tuple[str, str]] | None = None,
    sizes: Sequence[str] = SIZES,
    fills: Sequence[str] = FILLS,
    p_repeat: float = 0.25,
) -> Scene:
    """Sample a scene.

    n_objects: an int or an inclusive (lo, hi) range within 1..4.
    combos: allowed (colour, shape) pairs (default: all 28).
    require_combos: if given, at least one object uses one of these pairs (e.g. HELD_OUT_COMBOS).
    p_repeat: chance that an object after the first copies an earlier object's attributes
        exactly (this makes counting phrases like "three green triangles").
    """
    lo, hi = _count_range(n_objects)
    allowed = list(ALL_COMBOS if combos is None else combos)
    if not allowed:
        raise ValueError("no allowed (colour, shape) combinations")
    required = sorted(set(require_combos)) if require_combos else None
    if required is not None and combos is not None:
        required = [c for c in required if c in set(allowed)]
        if not required:
            raise ValueError("require_combos has no combination inside the allowed combos")
    for v, name, pool in ((sizes, "size", SIZES), (fills, "fill", FILLS)):
        if not v or any(x not in pool for x in v):
            raise ValueError(f"bad {name} list {list(v)!r}")
    # one draw for the count and the forced slot, five per object
    head = rng.random(2).tolist()
    n = lo + _uniform_int(head[0], hi - lo + 1)
    forced = _uniform_int(head[1], n) if required is not None else -1
    u = rng.random(5 * n).tolist()
    attrs: list[tuple[str, str, str, str]] = []  # (colour, shape, size, fill)
    for i in range(n):
        r, which, k, z, f = u[5 * i:5 * i + 5]
        if i > 0 and i != forced and r < p_repeat:
            attrs.append(attrs[_uniform_int(which, i)])
            continue
        pool = required if i == forced else allowed
        colour, shape = pool[_uniform_int(k, len(pool))]
        attrs.append((colour, shape, sizes[_uniform_int(z, len(sizes))],
                      fills[_uniform_int(f, len(fills))]))
    centres = place_objects(rng, [a[2] for a in attrs])
    while centres is None:  # practically never: shrink the biggest object and retry
        big = [i for i, a in enumerate(attrs) if a[2] == "large"]
        if not big:
            raise RuntimeError("cannot place the objects")  # 4 small objects always fit
        c, s, _, f = attrs[big[0]]
        attrs[big[0]] = (c, s, "small", f)
        centres = place_objects(rng, [a[2] for a in attrs])
    return Scene(tuple(ShapeObject(shape=s, color=c, size=z, fill=f, centre=xy)
                       for (c, s, z, f), xy in zip(attrs, centres)))


def scenes_from_seed(seed: int, count: int, **kwargs) -> list[Scene]:
    """`count` scenes from one seed (convenience for notebooks and benchmarks)."""
    rng = np.random.default_rng(seed)
    return [sample_scene(rng, **kwargs) for _ in range(count)]


# --------------------------------------------------------------------------------------------
# Attribute swaps (to catch bag-of-words behaviour)
# --------------------------------------------------------------------------------------------


def swap_attribute(scene: Scene, i: int, j: int, attribute: str = "color") -> Scene:
    """Exchange one attribute ("color"/"colour", "shape", "size", "fill") between objects i and j;
    positions and everything else stay."""
    attribute = "color" if attribute == "colour" else attribute
    if attribute not in ("color", "shape", "size", "fill"):
        raise ValueError(f"cannot swap {attribute!r}")
    a, b = scene.objects[i], scene.objects[j]
    va, vb = getattr(a, attribute), getattr(b, attribute)
    return scene.replace_object(i, **{attribute: vb}).replace_object(j, **{attribute: va})


def color_swap(scene: Scene, i: int = 0, j: int = 1) -> Scene:
    return swap_attribute(scene, i, j, "color")


def shape_swap(scene: Scene, i: int = 0, j: int = 1) -> Scene:
    return swap_attribute(scene, i, j, "shape")


def combos_of(scenes: Iterable[Scene]) -> set[tuple[str, str]]:
    return {c for s in scenes for c in s.combos}
