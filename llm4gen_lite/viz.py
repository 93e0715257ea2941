"""Figures: image grids with captions, Shapes scenes, the CompBench-lite parser's reading, loss curves.

Every helper returns a `matplotlib.figure.Figure` built without pyplot's global state (no
`plt.show()`, no current-figure side effects), so it works under papermill, in CI (Agg) and in
Jupyter (a returned Figure displays itself). Save with `fig.savefig(path)`.
"""
from __future__ import annotations

import textwrap
from typing import Any, Sequence

import numpy as np
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

__all__ = ["image_grid", "show_scenes", "overlay_parse", "to_display_image", "loss_curves", "attention_overlay"]


def to_display_image(image: Any) -> np.ndarray:
    """Any image the library produces → uint8 [H, W, 3] for imshow (torch or numpy; HWC or CHW;
    uint8, [0, 1] or [-1, 1] floats; PIL)."""
    from .evaluate import _as_float_image

    return (np.clip(_as_float_image(image), 0, 1) * 255 + 0.5).astype(np.uint8)


def _grid_figure(n: int, ncols: int, cell: float, caption_lines: int) -> tuple[Figure, list]:
    ncols = max(1, min(int(ncols), n))
    nrows = (n + ncols - 1) // ncols
    text_h = 0.16 * caption_lines
    fig = Figure(figsize=(ncols * cell, nrows * (cell + text_h)), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel().tolist()
    for ax in axes:
        ax.set_axis_off()
    return fig, axes


def image_grid(images: Any, captions: Sequence[str] | None = None, ncols: int = 8, *,
               cell: float = 1.6, wrap: int = 28, max_lines: int = 4, title: str | None = None
               ) -> Figure:
    """A grid of images with optional captions under each (wrapped to `wrap` characters, at most
    `max_lines` lines). `images`: a batch array/tensor ([N, H, W, 3] or [N, 3, H, W]) or a list."""
    if hasattr(images, "detach"):
        images = images.detach().cpu().numpy()
    items = list(images)
    if not items:
        raise ValueError("image_grid needs at least one image")
    if captions is not None and len(captions) != len(items):
        raise ValueError(f"{len(items)} images but {len(captions)} captions")
    wrapped = None
    lines = 0
    if captions is not None:
        wrapped = []
        for c in captions:
            ws = textwrap.wrap(str(c), wrap) or [""]
            if len(ws) > max_lines:
                ws = ws[:max_lines]
                ws[-1] = ws[-1][: max(0, wrap - 1)] + "…"
            wrapped.append("\n".join(ws))
            lines = max(lines, len(ws))
    fig, axes = _grid_figure(len(items), ncols, cell, lines)
    for k, im in enumerate(items):
        ax = axes[k]
        ax.imshow(to_display_image(im), interpolation="nearest")
        if wrapped is not None:
            ax.set_title(wrapped[k], fontsize=6, loc="center", pad=2)
    if title:
        fig.suptitle(title, fontsize=9)
    return fig


def show_scenes(scenes: Sequence, captions: Sequence[Any] | None = None, ncols: int = 6, *,
                image_size: int = 32, **kwargs) -> Figure:
    """Render Shapes scenes and show them in a grid with their captions (str or Caption)."""
    from .shapes.render import render_batch

    scenes = list(scenes)
    texts = None if captions is None else [getattr(c, "text", c) for c in captions]
    return image_grid(render_batch(scenes, image_size), texts, ncols, **kwargs)


def overlay_parse(image: Any, parsed_objects: Sequence | None = None, *, title: str | None = None,
                  size: float = 4.0) -> Figure:
    """The image with the parser's reading drawn on it: a box per object and its label
    ("large outlined red circle"). `parsed_objects` defaults to `evaluate.parse_image(image)`."""
    from .evaluate import parse_image

    img = to_display_image(image)
    objs = parse_image(img) if parsed_objects is None else list(parsed_objects)
    H, W = img.shape[:2]
    fig = Figure(figsize=(size, size), layout="constrained")
    ax = fig.subplots()
    ax.imshow(img, interpolation="nearest", extent=(0, W, H, 0))
    ax.set_xlim(0, W)
    ax.set_ylim(H, 0)
    ax.set_xticks([])
    ax.set_yticks([])
    for i, o in enumerate(objs):
        x0, y0, x1, y1 = o.bbox
        ax.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, lw=1.2,
                               ec="white", ls="--"))
        ax.text(x0, y0 - 0.3, f"{i}: {o.size} {o.fill} {o.color} {o.shape}", fontsize=6,
                color="black", va="bottom", ha="left",
                bbox=dict(boxstyle="square,pad=0.15", fc="white", ec="none", alpha=0.85))
    ax.set_title(title if title is not None else f"parser reads {len(objs)} object(s)", fontsize=8)
    return fig


def loss_curves(runs: dict[str, Sequence[dict]], key: str = "diffusion_loss", smooth: int = 10,
                title: str | None = None) -> Figure:
    """Training curves of several runs on one axis: `runs` maps a label to its `metrics.jsonl`
    records; curves are smoothed with a running mean over `smooth` logged points."""
    fig = Figure(figsize=(6, 3.4), layout="constrained")
    ax = fig.subplots()
    for label, records in runs.items():
        train = [r for r in records if r.get("kind") == "train" and key in r]
        if not train:
            continue
        steps = np.array([r["step"] for r in train])
        values = np.array([r[key] for r in train], dtype=float)
        k = max(1, min(smooth, len(values)))
        smoothed = np.convolve(values, np.ones(k) / k, mode="valid")
        ax.plot(steps[k - 1:], smoothed, label=label, lw=1.2)
    ax.set_xlabel("step")
    ax.set_ylabel(key.replace("_", " "))
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    if title:
        ax.set_title(title, fontsize=9)
    return fig


def attention_overlay(image: Any, maps: dict[str, Any], *, title: str | None = None, size: float = 1.8) -> Figure:
    """The image, then one panel per labelled attention map `[h, w]` (upsampled to the image and
    drawn over a faded copy of it), e.g. `{"CLIP 'red'": map, "LLM 'red'": map}`."""
    img = to_display_image(image).astype(np.float32)
    img = img / 255.0 if img.max() > 1.0 else img
    H, W = img.shape[:2]
    fig = Figure(figsize=(size * (1 + len(maps)), size * 1.15), layout="constrained")
    axes = np.atleast_1d(fig.subplots(1, 1 + len(maps)))
    axes[0].imshow(img, interpolation="nearest")
    axes[0].set_title("image", fontsize=7)
    for ax, (label, amap) in zip(axes[1:], maps.items()):
        amap = np.asarray(amap.detach().cpu() if hasattr(amap, "detach") else amap, dtype=np.float32)
        reps = (H // amap.shape[0], W // amap.shape[1])
        up = np.kron(amap, np.ones(reps, dtype=np.float32))
        ax.imshow(img.mean(-1), cmap="gray", alpha=0.5, interpolation="nearest")
        ax.imshow(up / max(up.max(), 1e-12), cmap="magma", alpha=0.7, interpolation="bilinear")
        ax.set_title(label, fontsize=7)
    for ax in axes:
        ax.set_xticks([])
        ax.set_yticks([])
    if title:
        fig.suptitle(title, fontsize=8)
    return fig
