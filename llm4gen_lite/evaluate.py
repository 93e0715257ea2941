"""CompBench-lite: an exact scene parser and a T2I-CompBench-style scorer for the Shapes world.

No learned weights. `parse_image` reads an image into objects:

1. background: the 25th percentile of brightness V = max(R, G, B) and the mean colour of the
   pixels at or below it (robust to tinted or grainy backgrounds);
2. foreground: V above background + max(0.15, 0.4 × (bright level − background));
3. connected components (8-connectivity, `scipy.ndimage.label`), blobs smaller than `min_area`
   dropped; each pixel's colour is *which channels are on* (channel ≥ half the pixel's strongest
   channel, after subtracting the background colour) — the palette is the 7 non-black corners of
   the RGB cube; a component takes its majority colour, or is split by colour when no colour
   holds 60% of it (two touching objects);
4. geometry of the hole-filled mask in its bounding box: extent (area / box), corner coverage and
   top/bottom (left/right) asymmetry → nearest of four shape prototypes; box side → size;
   brightness of the interior core vs the whole object → filled or outlined; box centre → position.

`score_prompt` checks the facts a prompt states (read from its spans): every described object
(all its mentioned attributes bound together), exact counts for plural phrases ("three green
triangles"), and every stated relation; the score is the fraction of checks satisfied, in
[0, 1]. `score_batch` averages per category and reports 0–100 like T2I-CompBench. Objects are
matched one-to-one, choosing the assignment that satisfies the most checks.

Image-quality metrics (FID/KID, the ShapesCLIP score) live with ShapesCLIP, not here.
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
from scipy import ndimage

from .shapes.captions import Caption, Span
from .shapes.render import render_batch
from .shapes.world import (
    COLORS, SIZE_FRACTION, PlacedObject, Scene, is_clear, relation_between, relation_holds,
)

__all__ = [
    "ParsedObject", "parse_image", "parse_batch", "Requirements", "Group", "requirements",
    "score_prompt", "score_rows", "score_batch", "object_recall", "object_precision",
    "dense_metrics", "recall_by_window", "attribute_accuracy", "swap_accuracy", "compbench_report",
    "shuffled_baseline", "SHAPE_RULES", "FILL_THRESHOLD", "ATTRIBUTE_KEYS",
]

ATTRIBUTE_KEYS = ("shape", "color", "size", "fill")

# colour code = R_on + 2·G_on + 4·B_on
_CODE_TO_COLOR: dict[int, str] = {}
for _name, _rgb in COLORS.items():
    _CODE_TO_COLOR[(1 if _rgb[0] else 0) + (2 if _rgb[1] else 0) + (4 if _rgb[2] else 0)] = _name

SHAPE_RULES = {
    "triangle_skew": 0.3,   # |skewness| of the x or y projection at or above this → triangle
    "square_below": -0.3,   # kurtosis(axes) − kurtosis(diagonals) at or below this → square
    "diamond_above": 0.3,   # … at or above this → diamond
    "band_low": 0.15,       # between band_low and diamond_above: a diamond if extent < band_extent
    "band_extent": 0.74,    # (heavily blurred diamonds), else a circle
}
"""Shape rules on scale-free moments of the hole-filled mask. Projected onto the x/y axes a square
is uniform (kurtosis 1.8) and onto the diagonals triangular (2.4); a diamond the other way round;
a circle is the same in every direction. So d = kurtosis(axes) − kurtosis(diagonals) is ≈ −0.6
for squares, ≈ 0–0.2 for circles and ≈ +0.6 for diamonds; an upward triangle's vertical
projection is skewed (|skew| ≈ 0.5–0.56), the others' are not."""
FILL_THRESHOLD = 0.8
"""Outlined when the interior core is less than this bright, relative to the object's pixels."""
_SIZE_THRESHOLD = (SIZE_FRACTION["small"] + SIZE_FRACTION["large"]) / 2  # of the canvas side
_EIGHT = np.ones((3, 3), dtype=bool)
MAX_OBJECTS = 12


# --------------------------------------------------------------------------------------------
# Parsing
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ParsedObject(PlacedObject):
    """One object read off an image.

    centre: box centre (x, y), normalised to [0, 1] (y down); bbox: (x0, y0, x1, y1) in pixels,
    end-exclusive; area: foreground pixels; extent, kurtosis_diff, skew: the shape features (see
    SHAPE_RULES); fill_ratio: interior brightness / object brightness (≈1 filled, ≈0 outlined)."""

    shape: str
    color: str
    size: str
    fill: str
    centre: tuple[float, float]
    bbox: tuple[int, int, int, int]
    area: int
    extent: float = 0.0
    kurtosis_diff: float = 0.0
    skew: float = 0.0
    fill_ratio: float = 1.0

    def label(self) -> str:
        return f"{self.size} {self.fill} {self.color} {self.shape}"

    def attributes(self) -> dict[str, str]:
        return {"shape": self.shape, "color": self.color, "size": self.size, "fill": self.fill}


def _as_float_image(image: Any) -> np.ndarray:
    """→ float32 [H, W, 3] in [0, 1]. Accepts uint8 or float ([0, 1] or [-1, 1]) arrays or
    tensors, HWC or CHW, gray or RGBA."""
    if hasattr(image, "detach"):  # torch tensor
        image = image.detach().cpu().numpy()
    elif not isinstance(image, np.ndarray):
        if hasattr(image, "convert"):  # PIL image
            image = np.asarray(image.convert("RGB"))
        else:
            image = np.asarray(image)
    x = image
    if x.ndim == 2:
        x = np.stack([x] * 3, axis=-1)
    if x.ndim != 3:
        raise ValueError(f"expected one image [H, W, 3] or [3, H, W], got shape {tuple(image.shape)}")
    if x.shape[-1] not in (3, 4) and x.shape[0] in (1, 3, 4):
        x = np.moveaxis(x, 0, -1)
    if x.shape[-1] == 1:
        x = np.repeat(x, 3, axis=-1)
    if x.shape[-1] == 4:
        x = x[..., :3]
    if x.shape[-1] != 3:
        raise ValueError(f"expected 3 colour channels, got shape {tuple(image.shape)}")
    if x.dtype == np.uint8:
        return x.astype(np.float32) * np.float32(1 / 255)
    if x.dtype == bool or not np.issubdtype(x.dtype, np.number):
        raise ValueError(f"unsupported image dtype {x.dtype}")
    x = x.astype(np.float32)
    if not np.isfinite(x).all():
        x = np.nan_to_num(x, nan=0.0, posinf=1.0, neginf=0.0)
    if x.min() < -0.02:  # [-1, 1] convention
        x = (x + 1) * 0.5
    elif x.max() > 1.5:  # 0..255 floats
        x = x / 255.0
    return np.clip(x, 0.0, 1.0)


def _classify(d: float, skew: float, extent: float) -> str:
    """Shape from the moment features (see SHAPE_RULES)."""
    r = SHAPE_RULES
    if skew >= r["triangle_skew"]:
        return "triangle"
    if d <= r["square_below"]:
        return "square"
    if d >= r["diamond_above"]:
        return "diamond"
    if d > r["band_low"] and extent < r["band_extent"]:
        return "diamond"
    return "circle"


_PLANE8 = np.zeros((3, 3, 3), dtype=bool)
_PLANE8[1] = True  # 8-connectivity inside each image, none across the batch
_PLANE4 = np.zeros((3, 3, 3), dtype=bool)
_PLANE4[1] = ndimage.generate_binary_structure(2, 1)


def _bc(labels: np.ndarray, weights: np.ndarray | None, n: int) -> np.ndarray:
    return np.bincount(labels, weights=weights, minlength=n)[:n]


def _parse_stack(x: np.ndarray, min_area: int | None) -> list[list[ParsedObject]]:
    """The parser on a float32 [N, H, W, 3] stack in [0, 1], vectorised over the batch."""
    N, H, W, _ = x.shape
    if min_area is None:
        min_area = max(4, int(round(6 * H * W / 1024)))
    P = H * W
    v = x.max(axis=3)  # [N, H, W]
    vf = v.reshape(N, P)
    q25, q99 = P // 4, int(P * 0.99)
    part = np.partition(vf, (q25, q99), axis=1)
    bg_level = part[:, q25].astype(np.float64)
    hi = part[:, q99].astype(np.float64)
    thr = bg_level + np.maximum(0.12, 0.25 * (hi - bg_level))
    fg = v > thr[:, None, None].astype(np.float32)
    if not fg.any():
        return [[] for _ in range(N)]
    # background colour and per-pixel colour code (which channels are on)
    bgm = (v <= bg_level[:, None, None].astype(np.float32))
    cnt = bgm.reshape(N, P).sum(axis=1)
    bg_col = np.einsum("nhwc,nhw->nc", x, bgm.astype(np.float32)) / np.maximum(cnt, 1)[:, None]
    c = x - bg_col[:, None, None, :].astype(np.float32)
    half_max = c.max(axis=3) * 0.5
    code = ((c[..., 0] >= half_max).astype(np.int64) + 2 * (c[..., 1] >= half_max)
            + 4 * (c[..., 2] >= half_max))
    # components, 8-connected within each image
    lab, n = ndimage.label(fg, structure=_PLANE8)
    lab = lab.ravel()
    code = code.ravel()
    nl = n + 1
    hist = _bc(lab * 8 + code, None, nl * 8).reshape(nl, 8)
    hist[:, 0] = 0
    area = hist.sum(axis=1)
    dom = hist.argmax(axis=1)
    big = area >= min_area
    big[0] = False
    mixed = big & (hist.max(axis=1) < 0.6 * np.maximum(area, 1))
    colour_of = dom.copy()
    if mixed.any():  # touching objects of different colours: split them by colour
        mpix = mixed[lab]
        next_id = nl
        lab = lab.copy()
        extra_colours = []
        for cc in range(1, 8):
            sel = mpix & (code == cc)
            if not sel.any():
                continue
            sub, k = ndimage.label(sel.reshape(N, H, W), structure=_PLANE8)
            sub = sub.ravel()
            lab[sel] = sub[sel] + next_id - 1
            extra_colours += [cc] * k
            next_id += k
        nl = next_id
        area = _bc(lab, None, nl)
        colour_of = np.concatenate([colour_of, np.array(extra_colours, dtype=colour_of.dtype)])
        big = area >= min_area
        big[0] = False
        big[: mixed.size][mixed] = False
    keep_lab = np.where(big[lab], lab, 0)
    # each object at half its own peak (robust to blur and to objects of different brightness)
    vflat = v.ravel().astype(np.float64)
    sel = keep_lab > 0
    L = keep_lab[sel]
    vals = vflat[sel]
    a = _bc(L, None, nl)
    mean = _bc(L, vals, nl) / np.maximum(a, 1)
    upper = vals > mean[L]
    peak = _bc(L[upper], vals[upper], nl) / np.maximum(_bc(L[upper], None, nl), 1)
    peak = np.where(peak > 0, peak, mean)
    img_of = np.zeros(nl, dtype=np.int64)
    idx_sel = np.flatnonzero(sel)
    img_of[L] = idx_sel // P
    half_thr = bg_level[img_of] + 0.5 * (peak - bg_level[img_of])
    strong = vals > half_thr[L]
    n_strong = _bc(L[strong], None, nl)
    use_half = n_strong >= np.maximum(3, 0.25 * a)
    keep_px = strong | ~use_half[L]
    obj = np.zeros(N * P, dtype=np.int64)
    obj[idx_sel[keep_px]] = L[keep_px]
    # fill holes: complement components that do not reach the padded border of their image
    inv = np.pad((obj == 0).reshape(N, H, W), ((0, 0), (1, 1), (1, 1)), constant_values=True)
    hl_pad, _ = ndimage.label(inv, structure=_PLANE4)
    ring = hl_pad[:, 0, 0]  # the border component of each image
    hl = hl_pad[:, 1:-1, 1:-1].reshape(N, P)
    hole = (hl > 0) & (hl != ring[:, None])
    filled = obj.copy()
    if hole.any():
        hflat = hl.ravel()
        hidx = np.flatnonzero(hole.ravel())
        ids, first = np.unique(hflat[hidx], return_index=True)
        # the first pixel of a hole in raster order has an object pixel on its left: its owner
        owner_of = np.zeros(int(hflat.max()) + 1, dtype=np.int64)
        owner_of[ids] = obj[hidx[first] - 1]
        filled[hidx] = owner_of[hflat[hidx]]
    return _finish(v, obj, filled, colour_of, bg_level, nl, N, H, W)


def _finish(v: np.ndarray, obj: np.ndarray, filled: np.ndarray, colour_of: np.ndarray,
            bg_level: np.ndarray, nl: int, N: int, H: int, W: int) -> list[list[ParsedObject]]:
    """Per-object features from the object map `obj` and its hole-filled version `filled`."""
    P = H * W
    fidx = np.flatnonzero(filled)
    if fidx.size == 0:
        return [[] for _ in range(N)]
    F = filled[fidx]
    img = fidx // P
    rem = fidx - img * P
    yy = (rem // W).astype(np.float64)
    xx = (rem - (rem // W) * W).astype(np.float64)
    n_f = _bc(F, None, nl)
    present = np.flatnonzero(n_f)
    # boxes
    x0 = np.full(nl, W, dtype=np.int64)
    y0 = np.full(nl, H, dtype=np.int64)
    x1 = np.zeros(nl, dtype=np.int64)
    y1 = np.zeros(nl, dtype=np.int64)
    np.minimum.at(x0, F, xx.astype(np.int64))
    np.minimum.at(y0, F, yy.astype(np.int64))
    np.maximum.at(x1, F, xx.astype(np.int64) + 1)
    np.maximum.at(y1, F, yy.astype(np.int64) + 1)
    bw, bh = np.maximum(x1 - x0, 1), np.maximum(y1 - y0, 1)
    extent = n_f / (bw * bh)
    # moments of the filled mask
    nn = np.maximum(n_f, 1)
    mx = _bc(F, xx, nl) / nn
    my = _bc(F, yy, nl) / nn
    dx = xx - mx[F]
    dy = yy - my[F]
    proj = (dx, dy, dx + dy, dx - dy)
    m2 = [np.maximum(_bc(F, p * p, nl) / nn, 1e-12) for p in proj]
    m4 = [_bc(F, (p * p) ** 2, nl) / nn for p in proj]
    m3 = [_bc(F, p * p * p, nl) / nn for p in proj[:2]]
    kurt = [m4[i] / (m2[i] * m2[i]) for i in range(4)]
    kdiff = (kurt[0] + kurt[1] - kurt[2] - kurt[3]) / 2
    skew = np.maximum(np.abs(m3[0]) / m2[0] ** 1.5, np.abs(m3[1]) / m2[1] ** 1.5)
    # filled vs outlined: brightness of the interior core vs the object's own pixels
    fmask = np.zeros(N * P, dtype=bool)
    fmask[fidx] = True
    dist = ndimage.distance_transform_cdt(
        np.pad(fmask.reshape(N, H, W), ((0, 0), (1, 1), (1, 1))), metric=_PLANE8)
    dist = dist[:, 1:-1, 1:-1].ravel()[fidx]
    k = np.maximum(1, np.round(0.2 * np.maximum(bw, bh))).astype(np.int64)
    core = dist > k[F]
    vflat = v.ravel()
    oidx = np.flatnonzero(obj)
    O = obj[oidx]
    n_o = _bc(O, None, nl)
    obj_level = _bc(O, vflat[oidx].astype(np.float64), nl) / np.maximum(n_o, 1)
    n_core = _bc(F[core], None, nl)
    core_level = _bc(F[core], vflat[fidx[core]].astype(np.float64), nl) / np.maximum(n_core, 1)
    img_of = np.zeros(nl, dtype=np.int64)
    img_of[F] = img
    bgl = bg_level[img_of]
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.where((n_core > 0) & (obj_level - bgl > 1e-6),
                         (core_level - bgl) / (obj_level - bgl), 1.0)
    side = min(H, W)
    out: list[list[ParsedObject]] = [[] for _ in range(N)]
    for l in present:
        if l == 0:
            continue
        w_, h_ = int(bw[l]), int(bh[l])
        ext = float(extent[l])
        kd, sk = float(kdiff[l]), float(skew[l])
        out[int(img_of[l])].append(ParsedObject(
            shape=_classify(kd, sk, ext),
            color=_CODE_TO_COLOR.get(int(colour_of[l]), "white"),
            size="large" if max(w_, h_) / side >= _SIZE_THRESHOLD else "small",
            fill="outlined" if ratio[l] < FILL_THRESHOLD else "filled",
            centre=((int(x0[l]) + w_ / 2) / W, (int(y0[l]) + h_ / 2) / H),
            bbox=(int(x0[l]), int(y0[l]), int(x0[l]) + w_, int(y0[l]) + h_),
            area=int(n_o[l]), extent=ext, kurtosis_diff=kd, skew=sk, fill_ratio=float(ratio[l])))
    for objs in out:
        objs.sort(key=lambda o: (-o.area, o.bbox[1], o.bbox[0]))
        del objs[MAX_OBJECTS:]
    return out


def parse_batch(images: Any, *, min_area: int | None = None) -> list[list[ParsedObject]]:
    """`parse_image` over a batch — [N, H, W, 3] / [N, 3, H, W] array or tensor, or a list of
    images — vectorised: one pass of numpy/scipy calls for the whole batch."""
    if hasattr(images, "detach"):
        images = images.detach().cpu().numpy()
    if isinstance(images, np.ndarray):
        if images.ndim == 3:
            raise ValueError("parse_batch expects a batch [N, H, W, 3]; use parse_image for one image")
        if images.ndim != 4:
            raise ValueError(f"expected a batch [N, H, W, 3] or [N, 3, H, W], got {images.shape}")
        if images.shape[-1] not in (3, 4) and images.shape[1] in (1, 3, 4):
            images = np.moveaxis(images, 1, -1)
        if images.shape[-1] == 3 and images.dtype == np.uint8:  # fast path
            return _parse_in_chunks(images.astype(np.float32) * np.float32(1 / 255),
                                    min_area)
    items = list(images)
    if not items:
        return []
    floats = [_as_float_image(im) for im in items]
    if len({f.shape for f in floats}) == 1:
        return _parse_in_chunks(np.stack(floats), min_area)
    return [_parse_stack(f[None], min_area)[0] for f in floats]


def _parse_in_chunks(stack: np.ndarray, min_area: int | None, chunk: int = 512
                     ) -> list[list[ParsedObject]]:
    out: list[list[ParsedObject]] = []
    for s0 in range(0, len(stack), chunk):  # bounded memory
        out += _parse_stack(stack[s0:s0 + chunk], min_area)
    return out


def parse_image(image: Any, *, min_area: int | None = None) -> list[ParsedObject]:
    """Objects in one image (uint8 or float in [0, 1] or [-1, 1]; [H, W, 3] or [3, H, W]; numpy,
    torch or PIL), largest first.

    min_area: smallest blob kept, in pixels (default 6 at 32×32, scaled with the image area)."""
    return _parse_stack(_as_float_image(image)[None], min_area)[0]


# --------------------------------------------------------------------------------------------
# What a prompt asks for
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Group:
    """Objects the prompt describes together: `attrs` to match, how many (`count`), whether the
    count must be exact (plural phrases), and the scene indices they came from."""

    attrs: tuple[tuple[str, str], ...]
    count: int = 1
    exact: bool = False
    objects: tuple[int, ...] = ()

    def matches(self, p: ParsedObject) -> bool:
        return all(getattr(p, k) == v for k, v in self.attrs)

    def describe(self) -> str:
        d = dict(self.attrs)
        words = [d[k] for k in ("size", "fill", "color") if k in d] + [d.get("shape", "object")]
        return (f"{self.count}× " if self.count > 1 else "") + " ".join(words)


@dataclass(frozen=True)
class Requirements:
    """groups: described objects; relations: (group index, relation, group index)."""

    groups: tuple[Group, ...]
    relations: tuple[tuple[int, str, int], ...]

    @property
    def n_checks(self) -> int:
        return len(self.groups) + len(self.relations)

    @property
    def n_objects(self) -> int:
        return sum(g.count for g in self.groups)


def _spans_of(row: Any) -> tuple[Scene, list[Span] | None]:
    if isinstance(row, Scene):
        return row, None
    if isinstance(row, tuple) and len(row) == 2 and isinstance(row[0], Scene):
        cap = row[1]
        if isinstance(cap, Caption):
            return row[0], list(cap.spans)
        if cap is None:
            return row[0], None
        raise TypeError("expected (Scene, Caption)")
    if isinstance(row, dict):
        if "scene" not in row:
            raise ValueError("prompt row has no 'scene'")
        scene = row["scene"] if isinstance(row["scene"], Scene) else Scene.from_dict(row["scene"])
        spans = row.get("spans")
        if spans is None:
            return scene, None
        return scene, [s if isinstance(s, Span) else Span.from_dict(s) for s in spans]
    raise TypeError(f"expected a prompt row (dict), a Scene or (Scene, Caption), got {type(row).__name__}")


def requirements(row: Any) -> Requirements:
    """The checks a prompt implies. From a row's spans: each object with the attributes the text
    mentions; count spans → one group with an exact count; relation spans → relations between
    single objects. A bare Scene (no caption): every object with all attributes, and the
    dominant-axis relation of every clearly separated pair of distinguishable objects."""
    scene, spans = _spans_of(row)
    if spans is None:
        keys = [tuple(sorted(o.attributes().items())) for o in scene]
        groups = [Group(attrs=k, objects=(i,)) for i, k in enumerate(keys)]
        rels = []
        for i in range(len(scene)):
            for j in range(i + 1, len(scene)):
                if keys.count(keys[i]) == 1 and keys.count(keys[j]) == 1 and is_clear(scene[i], scene[j]):
                    rels.append((i, relation_between(scene[i], scene[j]), j))
        return Requirements(tuple(groups), tuple(rels))
    mentioned: dict[int, set[str]] = defaultdict(set)
    counted: dict[tuple[int, ...], int] = {}
    for s in spans:
        if s.kind in ATTRIBUTE_KEYS:
            for o in s.objects:
                mentioned[o].add(s.kind)
        elif s.kind == "count" and len(s.objects) > 1:
            counted[tuple(s.objects)] = int(s.value) if s.value.isdigit() else len(s.objects)
    groups: list[Group] = []
    where: dict[int, int] = {}
    in_count = {o for g in counted for o in g}
    for objs, n in counted.items():
        kinds = set().union(*(mentioned[o] for o in objs))
        o0 = scene[objs[0]]
        groups.append(Group(attrs=tuple(sorted((k, getattr(o0, k)) for k in kinds)), count=n,
                            exact=True, objects=objs))
    for i in sorted(mentioned):
        if i in in_count or i >= len(scene):
            continue
        o = scene[i]
        where[i] = len(groups)
        groups.append(Group(attrs=tuple(sorted((k, getattr(o, k)) for k in mentioned[i])),
                            objects=(i,)))
    rels = []
    for s in spans:
        if s.kind == "relation" and s.ref is not None and s.obj in where and s.ref in where:
            rels.append((where[s.obj], s.value, where[s.ref]))
    return Requirements(tuple(groups), tuple(rels))


# --------------------------------------------------------------------------------------------
# Matching and scoring
# --------------------------------------------------------------------------------------------


def _is_parsed(item: Any) -> bool:
    return isinstance(item, list) and all(isinstance(p, ParsedObject) for p in item)


def _as_parsed(image: Any) -> list[ParsedObject]:
    return image if _is_parsed(image) else parse_image(image)


def _parse_all(images: Any) -> list[list[ParsedObject]]:
    """Parsed objects per image; already-parsed lists pass through (batched parsing otherwise)."""
    if isinstance(images, list) and images and all(_is_parsed(i) for i in images):
        return images
    return parse_batch(images)


def _match(req: Requirements, parsed: Sequence[ParsedObject], with_relations: bool = True
           ) -> tuple[list[bool], list[bool], list[int | None], int]:
    """Best one-to-one assignment. Returns (group ok, relation ok, assignment of single groups,
    number of parsed objects used)."""
    singles = [gi for gi, g in enumerate(req.groups) if not g.exact]
    group_ok = [False] * len(req.groups)
    used_by_counts = 0
    for gi, g in enumerate(req.groups):
        if g.exact:
            n = sum(1 for p in parsed if g.matches(p))
            group_ok[gi] = n == g.count
            used_by_counts += min(n, g.count)
    cands = [[k for k, p in enumerate(parsed) if req.groups[gi].matches(p)][:6] for gi in singles]
    rels = [(a, r, b) for a, r, b in req.relations] if with_relations else []
    best_val, best_assign = -1, [None] * len(singles)
    assign: list[int | None] = [None] * len(singles)
    used: set[int] = set()
    pos = {gi: k for k, gi in enumerate(singles)}

    def value() -> int:
        v = sum(1 for a in assign if a is not None) * 2
        for a, r, b in rels:
            pa, pb = assign[pos[a]] if a in pos else None, assign[pos[b]] if b in pos else None
            if pa is not None and pb is not None and relation_holds(parsed[pa].centre,
                                                                    parsed[pb].centre, r):
                v += 1
        return v

    def rec(i: int) -> None:
        nonlocal best_val, best_assign
        if i == len(singles):
            v = value()
            if v > best_val:
                best_val, best_assign = v, list(assign)
            return
        free = [k for k in cands[i] if k not in used]
        if not free:  # assigning is never worse than leaving a group unmatched
            assign[i] = None
            rec(i + 1)
            return
        for k in free:
            assign[i] = k
            used.add(k)
            rec(i + 1)
            used.discard(k)
        assign[i] = None

    rec(0)
    for k, gi in enumerate(singles):
        group_ok[gi] = best_assign[k] is not None
    rel_ok = []
    for a, r, b in req.relations:
        pa = best_assign[pos[a]] if a in pos else None
        pb = best_assign[pos[b]] if b in pos else None
        rel_ok.append(pa is not None and pb is not None
                      and relation_holds(parsed[pa].centre, parsed[pb].centre, r))
    n_used = sum(1 for a in best_assign if a is not None) + used_by_counts
    return group_ok, rel_ok, best_assign, n_used


def _category(row: Any, category: str | None) -> str:
    if category is not None:
        return category
    if isinstance(row, dict):
        return str(row.get("category", "all"))
    return "all"


def score_prompt(image: Any, row: Any, category: str | None = None) -> float:
    """Fraction in [0, 1] of the prompt's checks the image satisfies.

    image: an image (or the list `parse_image` returned for it). row: a prompt row (dict with
    `scene` and `spans`), a `Scene`, or `(Scene, Caption)`. category: only used to name the
    result in batch reports; every category is scored by the same rule — each described object
    present with all its mentioned attributes, plural counts exact, stated relations true."""
    req = requirements(row)
    if req.n_checks == 0:
        raise ValueError("the prompt states nothing checkable (no object attributes in its spans)")
    g_ok, r_ok, _, _ = _match(req, _as_parsed(image))
    return (sum(g_ok) + sum(r_ok)) / req.n_checks


def score_rows(images: Any, rows: Sequence[Any]) -> list[float]:
    """Per-row scores in [0, 1] (images and rows aligned)."""
    if len(images) != len(rows):
        raise ValueError(f"{len(images)} images but {len(rows)} rows")
    return [score_prompt(p, row) for p, row in zip(_parse_all(images), rows)]


def score_batch(images: Any, rows: Sequence[Any]) -> dict[str, float]:
    """Mean score per category, 0–100 (T2I-CompBench style). Categories come from
    `row["category"]` ("all" for rows without one)."""
    scores = score_rows(images, rows)
    acc: dict[str, list[float]] = defaultdict(list)
    for s, row in zip(scores, rows):
        acc[_category(row, None)].append(s)
    return {k: 100.0 * float(np.mean(v)) for k, v in acc.items()}


def object_recall(image: Any, row: Any) -> float:
    """Fraction of the prompt's objects found with all their mentioned attributes (one-to-one)."""
    req = requirements(row)
    if req.n_objects == 0:
        raise ValueError("the prompt describes no objects")
    parsed = _as_parsed(image)
    _, _, _, n_used = _match(req, parsed, with_relations=False)
    return n_used / req.n_objects


def object_precision(image: Any, row: Any) -> float:
    """Fraction of the parsed objects that match a described object (1.0 for an empty image)."""
    req = requirements(row)
    parsed = _as_parsed(image)
    if not parsed:
        return 1.0
    _, _, _, n_used = _match(req, parsed, with_relations=False)
    return n_used / len(parsed)


def recall_by_window(images: Any, rows: Sequence[dict], window_ends: Sequence[int]) -> dict[str, dict[str, float]]:
    """Object recall split by whether a text encoder with a limited window read each object's whole
    description: `inside` when every attribute mention of the object (colour, shape, size, fill)
    starts before `window_ends[i]` (the last character the encoder's tokens cover, e.g. CLIP's
    77 tokens), `beyond` when at least one of them lies past it.

    For each part: `n` objects, `recall` (found with every mentioned attribute, as `object_recall`)
    and `colour_shape_recall` (found with the right colour and shape, size and fill ignored).
    Objects of exact-count phrases are left out."""
    if not (len(images) == len(rows) == len(window_ends)):
        raise ValueError(f"{len(images)} images, {len(rows)} rows and {len(window_ends)} window ends must match")
    found: dict[str, dict[str, list[bool]]] = {part: {"recall": [], "colour_shape_recall": []}
                                               for part in ("inside", "beyond")}
    for parsed, row, end in zip(_parse_all(images), rows, window_ends):
        req = requirements(row)
        last = {}
        for span in row["spans"]:
            if span["kind"] in ATTRIBUTE_KEYS:
                last[span["obj"]] = max(last.get(span["obj"], span["start"]), span["start"])
        loose = Requirements(tuple(Group(tuple((k, v) for k, v in g.attrs if k in ("color", "shape")), g.count,
                                         g.exact, g.objects) for g in req.groups), ())
        strict_ok, _, _, _ = _match(req, parsed, with_relations=False)
        loose_ok, _, _, _ = _match(loose, parsed, with_relations=False)
        for g, ok, ok_loose in zip(req.groups, strict_ok, loose_ok):
            if g.exact or g.objects[0] not in last:
                continue
            part = found["inside" if last[g.objects[0]] < end else "beyond"]
            part["recall"].append(ok)
            part["colour_shape_recall"].append(ok_loose)
    return {part: {"n": len(v["recall"]), **{k: float(np.mean(x)) if x else float("nan") for k, x in v.items()}}
            for part, v in found.items()}


def dense_metrics(images: Any, rows: Sequence[Any]) -> dict[str, Any]:
    """Mean object recall / precision / F1 (in [0, 1]) — DensePrompts-lite — and each prompt's
    recall (`per_prompt_recall`, in row order, for paired comparisons)."""
    if len(images) != len(rows):
        raise ValueError(f"{len(images)} images but {len(rows)} rows")
    rec, prec = [], []
    for parsed, row in zip(_parse_all(images), rows):
        rec.append(object_recall(parsed, row))
        prec.append(object_precision(parsed, row))
    r, p = float(np.mean(rec)), float(np.mean(prec))
    return {"object_recall": r, "object_precision": p,
            "object_f1": 0.0 if r + p == 0 else 2 * r * p / (r + p), "n": len(rows),
            "per_prompt_recall": [float(x) for x in rec]}


def attribute_accuracy(images: Any, rows: Sequence[Any]) -> dict[str, float]:
    """Per-attribute accuracy on single-object prompts (other rows are skipped), in [0, 1].

    The largest parsed object is compared with the prompt's object: `colour_acc`, `shape_acc`,
    `object_acc` (both right); `size_acc` / `fill_acc` over the prompts that mention them. An
    image with no object counts as wrong."""
    if len(images) != len(rows):
        raise ValueError(f"{len(images)} images but {len(rows)} rows")
    hits: dict[str, list[bool]] = defaultdict(list)
    for parsed, row in zip(_parse_all(images), rows):
        req = requirements(row)
        if len(req.groups) != 1 or req.groups[0].count != 1:
            continue
        want = dict(req.groups[0].attrs)
        got = parsed[0] if parsed else None
        for key, name in (("color", "colour_acc"), ("shape", "shape_acc"), ("size", "size_acc"),
                          ("fill", "fill_acc")):
            if key in want:
                hits[name].append(got is not None and getattr(got, key) == want[key])
        if "color" in want and "shape" in want:
            hits["object_acc"].append(got is not None and got.color == want["color"]
                                      and got.shape == want["shape"])
    if not hits:
        raise ValueError("no single-object prompts among the rows")
    out = {k: float(np.mean(v)) for k, v in hits.items()}
    out["n"] = len(hits.get("object_acc", hits.get("colour_acc", [])))
    return out


def swap_accuracy(images: Any, rows: Sequence[dict]) -> float:
    """Attribute-swap pairs (rows sharing `pair_id`): the fraction of pairs whose two images both
    score 1. A bag-of-words model, which draws the same picture for both prompts of a pair,
    cannot get both right."""
    scores = score_rows(images, rows)
    by_pair: dict[str, list[float]] = defaultdict(list)
    for s, row in zip(scores, rows):
        if "pair_id" in row:
            by_pair[row["pair_id"]].append(s)
    pairs = [v for v in by_pair.values() if len(v) == 2]
    if not pairs:
        raise ValueError("no complete attribute-swap pairs (rows with a shared 'pair_id')")
    return float(np.mean([a == 1.0 and b == 1.0 for a, b in pairs]))


def compbench_report(images: Any, rows: Sequence[dict]) -> dict[str, Any]:
    """Everything at once: per-category scores (0–100), full-match rate (0–100), each prompt's
    score (`per_prompt`, in [0, 1], in row order), and where the rows allow it attribute accuracy,
    dense metrics and swap-pair accuracy."""
    parsed = parse_batch(images)
    scores = score_rows(parsed, rows)
    report: dict[str, Any] = {"scores": {}, "full_match": {}, "n": len(rows),
                              "per_prompt": [float(x) for x in scores]}
    acc: dict[str, list[float]] = defaultdict(list)
    for s, row in zip(scores, rows):
        acc[_category(row, None)].append(s)
    for k, v in acc.items():
        report["scores"][k] = 100.0 * float(np.mean(v))
        report["full_match"][k] = 100.0 * float(np.mean([x == 1.0 for x in v]))
    try:
        report["attributes"] = attribute_accuracy(parsed, rows)
    except ValueError:
        pass
    dense_rows = [(p, r) for p, r in zip(parsed, rows) if r.get("style") == "dense"]
    if dense_rows:
        report["dense"] = dense_metrics([p for p, _ in dense_rows], [r for _, r in dense_rows])
    if any("pair_id" in r for r in rows):
        try:
            report["swap_pair_acc"] = swap_accuracy(parsed, rows)
        except ValueError:
            pass
    return report


def shuffled_baseline(rows: Sequence[dict], image_size: int = 32, seed: int = 0) -> dict[str, float]:
    """Scores of ground-truth renders paired with the *wrong* prompts (a random derangement):
    the chance level each category's score should be read against."""
    scenes = [Scene.from_dict(r["scene"]) for r in rows]
    images = render_batch(scenes, image_size)
    rng = np.random.default_rng(seed)
    n = len(rows)
    if n < 2:
        raise ValueError("need at least two rows to shuffle")
    perm = np.arange(n)
    while True:
        for i in range(n - 1, 0, -1):
            j = int(rng.integers(i + 1))
            perm[i], perm[j] = perm[j], perm[i]
        if not (perm == np.arange(n)).any():
            break
    return score_batch(images[perm], rows)
