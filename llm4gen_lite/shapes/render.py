"""Rasterise scenes to RGB uint8 images — integer geometry, no antialiasing, no fonts.

Each shape is a cached binary template computed with integer arithmetic in half-pixel units
(pixel i of a side-s box has centre coordinate u = 2i + 1 - s), so the pixels are identical on
every machine. An outline keeps the pixels within the stroke width of the edge (perpendicular
distance, compared in squared integers). Rendering pastes the templates into a black canvas.
"""
from __future__ import annotations

from functools import lru_cache
from typing import Sequence

import numpy as np

from .world import COLORS, FILLS, SHAPES, SIZE_FRACTION, Scene, ShapeObject

DEFAULT_IMAGE_SIZE = 32
_RGB = {name: np.array(rgb, dtype=np.uint8) for name, rgb in COLORS.items()}


def side_px(size: str, image_size: int) -> int:
    """Box side in pixels of a `size` object on an `image_size` canvas (7/12 at 32, 14/24 at 64)."""
    return max(3, int(SIZE_FRACTION[size] * image_size + 0.5))


def stroke_px(side: int) -> int:
    """Outline stroke width for a box side (1 px for 7, 2 px for 12, 4 px for 24)."""
    return max(1, int(side / 6 + 0.5))


@lru_cache(maxsize=None)
def shape_template(shape: str, side: int, fill: str = "filled") -> np.ndarray:
    """Boolean [side, side] mask of a shape (read-only, cached)."""
    if shape not in SHAPES:
        raise ValueError(f"unknown shape {shape!r}")
    if fill not in FILLS:
        raise ValueError(f"unknown fill {fill!r}")
    u = (2 * np.arange(side) + 1 - side).astype(np.int64)  # half-pixel units, centred
    v = u[:, None]
    uu = u[None, :]
    s = side
    t2 = 2 * stroke_px(side)  # stroke in half-pixels
    au, av = np.abs(uu), np.abs(v)
    if shape == "circle":
        r2 = uu * uu + v * v
        m = r2 <= s * s
        inner = r2 <= (s - t2) ** 2
    elif shape == "square":
        m = np.ones((s, s), dtype=bool)
        inner = np.maximum(au, av) <= s - 1 - t2
    elif shape == "diamond":
        c = s - au - av  # √2 × distance to the nearest edge
        m = c >= 0
        inner = (c >= 0) & (c * c >= 2 * t2 * t2)
    else:  # triangle, apex up, base on the bottom row
        c = v + s + 1 - 2 * au  # √5 × distance to the nearest slanted edge
        m = c >= 0
        inner = (c >= 0) & (c * c >= 5 * t2 * t2) & (v <= s - 1 - t2)
    m = np.ascontiguousarray(m, dtype=bool)
    if fill == "outlined":
        m = m & ~inner
    m.setflags(write=False)
    return m


def object_box_px(obj: ShapeObject, image_size: int) -> tuple[int, int, int]:
    """(x0, y0, side) of an object's box in pixels."""
    s = side_px(obj.size, image_size)
    x0 = int(np.floor(obj.x * image_size - s / 2 + 0.5))
    y0 = int(np.floor(obj.y * image_size - s / 2 + 0.5))
    return x0, y0, s


def _paint(canvas: np.ndarray, obj: ShapeObject, image_size: int) -> None:
    x0, y0, s = object_box_px(obj, image_size)
    m = shape_template(obj.shape, s, obj.fill)
    # clip to the canvas (sampled scenes are always inside; hand-made ones may not be)
    ya, yb = max(0, y0), min(image_size, y0 + s)
    xa, xb = max(0, x0), min(image_size, x0 + s)
    if ya >= yb or xa >= xb:
        return
    sub = m[ya - y0:yb - y0, xa - x0:xb - x0]
    canvas[ya:yb, xa:xb][sub] = _RGB[obj.color]


def render_scene(scene: Scene, image_size: int = DEFAULT_IMAGE_SIZE) -> np.ndarray:
    """uint8 [image_size, image_size, 3] image of `scene` on black."""
    if image_size < 16:
        raise ValueError(f"image_size must be at least 16 (got {image_size})")
    canvas = np.zeros((image_size, image_size, 3), dtype=np.uint8)
    for obj in scene.objects:
        _paint(canvas, obj, image_size)
    return canvas


def render_batch(scenes: Sequence[Scene], image_size: int = DEFAULT_IMAGE_SIZE) -> np.ndarray:
    """uint8 [N, image_size, image_size, 3]."""
    out = np.zeros((len(scenes), image_size, image_size, 3), dtype=np.uint8)
    for i, scene in enumerate(scenes):
        for obj in scene.objects:
            _paint(out[i], obj, image_size)
    return out


def degrade(
    image: np.ndarray,
    rng: np.random.Generator,
    *,
    noise: float = 0.0,
    blur: float = 0.0,
    jitter: float = 0.0,
    tint: float = 0.0,
) -> np.ndarray:
    """A corrupted copy of a uint8 [H, W, 3] image, for robustness checks of the scorer.

    noise: std of additive Gaussian noise (fraction of full scale);
    blur: Gaussian blur sigma in pixels (scaled with the image: sigma is given for 32 px);
    jitter: per-channel gain drawn from [1 - jitter, 1 + jitter] plus a global brightness
        factor from [1 - jitter, 1];
    tint: a random background tint, each channel up to `tint` of full scale, added everywhere.
    """
    from scipy.ndimage import gaussian_filter

    x = image.astype(np.float32) / 255.0
    h = x.shape[0]
    if blur > 0:
        sig = blur * h / 32
        x = gaussian_filter(x, sigma=(sig, sig, 0), mode="constant")
    if jitter > 0:
        gain = 1 + jitter * (2 * rng.random(3) - 1)
        x = x * gain[None, None, :].astype(np.float32) * np.float32(1 - jitter * rng.random())
    if tint > 0:
        x = x + (tint * rng.random(3)).astype(np.float32)[None, None, :]
    if noise > 0:
        x = x + rng.normal(0, noise, x.shape).astype(np.float32)
    return (np.clip(x, 0, 1) * 255 + 0.5).astype(np.uint8)
