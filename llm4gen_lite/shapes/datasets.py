"""Torch datasets: the procedural Shapes world, and users' own `imagefolder` data.

Both return the same example dict, so one training loop serves both:

    {"pixel_values": float32 tensor [3, H, W] in [-1, 1],
     "text": str,                      # the caption
     "caption": Caption,               # text + spans + (attribute, entity) pairs
     "scene": Scene | None,            # ground truth (None for real images)
     "index": int}

Use `collate_examples` (also `ShapesDataset.collate_fn`) as the DataLoader's `collate_fn`: it
stacks `pixel_values` and keeps the rest as lists.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from .captions import Caption, caption_from_text
from .render import render_scene
from .splits import SPLITS, make_example
from .world import Scene

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")


def image_to_tensor(image: np.ndarray) -> torch.Tensor:
    """uint8 [H, W, 3] → float32 [3, H, W] in [-1, 1]."""
    x = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float()
    return x.div_(127.5).sub_(1.0)


def tensor_to_image(x: torch.Tensor) -> np.ndarray:
    """float [3, H, W] (or [N, 3, H, W]) in [-1, 1] → uint8 [H, W, 3] (or [N, H, W, 3])."""
    x = x.detach().float().cpu().clamp(-1, 1).add(1).mul(127.5).round().to(torch.uint8)
    return x.movedim(-3, -1).numpy()


def collate_examples(batch: Sequence[dict]) -> dict:
    """Stack `pixel_values`; every other key becomes a list (index → LongTensor)."""
    if not batch:
        raise ValueError("empty batch")
    out: dict = {"pixel_values": torch.stack([b["pixel_values"] for b in batch])}
    for key in batch[0]:
        if key == "pixel_values":
            continue
        vals = [b[key] for b in batch]
        out[key] = torch.tensor(vals, dtype=torch.long) if key == "index" else vals
    return out


class ShapesDataset(Dataset):
    """Procedural Shapes examples: rendered image + short or dense caption + spans + scene.

    Args:
        num_samples: length of the dataset (examples are generated on the fly, never stored).
        image_size: canvas side in pixels (32 default; 64 works too).
        split: "train" (held-out combos excluded), "test_iid", "test_comp" or "all".
        seed: base seed; example i is a pure function of (seed, split, i).
        dense_prob: probability that an example's caption is dense rather than short.
        n_objects: objects per scene, an int or an inclusive (lo, hi) range in 1..4 — e.g. 1 for
            a single-object curriculum stage, (1, 4) for the full world.
        p_repeat: chance that an object copies an earlier one (counting phrases).
        caption_kwargs: passed to the captioner, e.g. {"p_size": 0.5, "p_fill": 0.5,
            "p_relation": 0.5} for short captions, {"min_words": 40} for dense ones.
    """

    collate_fn = staticmethod(collate_examples)

    def __init__(self, num_samples: int = 50_000, image_size: int = 32, split: str = "train",
                 seed: int = 0, dense_prob: float = 0.0, n_objects: int | Sequence[int] = (1, 4),
                 p_repeat: float = 0.25, caption_kwargs: dict | None = None) -> None:
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; expected one of {list(SPLITS)}")
        if int(num_samples) < 1:
            raise ValueError(f"num_samples must be positive (got {num_samples})")
        if not 0.0 <= float(dense_prob) <= 1.0:
            raise ValueError(f"dense_prob must lie in [0, 1] (got {dense_prob})")
        if int(image_size) < 16:
            raise ValueError(f"image_size must be at least 16 (got {image_size})")
        self.num_samples = int(num_samples)
        self.image_size = int(image_size)
        self.split = split
        self.seed = int(seed)
        self.dense_prob = float(dense_prob)
        self.n_objects = n_objects
        self.p_repeat = float(p_repeat)
        self.caption_kwargs = dict(caption_kwargs or {})
        self.example(0)  # validate the settings early

    def __len__(self) -> int:
        return self.num_samples

    def example(self, index: int) -> tuple[Scene, Caption]:
        """(scene, caption) of example `index`, without rendering."""
        if not 0 <= index < self.num_samples:
            raise IndexError(f"index {index} out of range for a dataset of {self.num_samples}")
        return make_example(self.seed, self.split, int(index), n_objects=self.n_objects,
                            dense_prob=self.dense_prob, p_repeat=self.p_repeat,
                            caption_kwargs=self.caption_kwargs)

    def texts(self, indices: Sequence[int] | None = None) -> list[str]:
        """Captions of the given examples (all by default) — e.g. to pre-compute text features."""
        idx = range(self.num_samples) if indices is None else indices
        return [self.example(int(i))[1].text for i in idx]

    def __getitem__(self, index: int) -> dict:
        index = int(index)
        if index < 0:
            index += self.num_samples
        scene, caption = self.example(index)
        image = render_scene(scene, self.image_size)
        return {"pixel_values": image_to_tensor(image), "text": caption.text, "caption": caption,
                "scene": scene, "index": index}


class ImageFolderDataset(Dataset):
    """A Hugging Face `imagefolder`-style folder: images plus `metadata.jsonl` whose lines hold
    `file_name` (relative to the folder) and `text`. Images are converted to RGB, resized so the
    shorter side is `image_size` and centre-cropped (no flips: they would break left/right).
    Captions get spans from the free-text parse (`caption_from_text`). Problems are reported with
    the file and line at construction time."""

    collate_fn = staticmethod(collate_examples)

    def __init__(self, root: str | Path, image_size: int = 32, *, metadata: str = "metadata.jsonl",
                 image_column: str = "file_name", caption_column: str = "text") -> None:
        self.root = Path(root)
        self.image_size = int(image_size)
        if self.image_size < 8:
            raise ValueError(f"image_size must be at least 8 (got {image_size})")
        if not self.root.is_dir():
            raise FileNotFoundError(f"{self.root}: no such image folder")
        meta = self.root / metadata
        if not meta.is_file():
            raise FileNotFoundError(
                f"{meta}: missing; an imagefolder needs a {metadata} with one JSON object per "
                f'line, e.g. {{"{image_column}": "0001.png", "{caption_column}": "a red circle"}}')
        self.items: list[tuple[Path, str]] = []
        for ln, line in enumerate(meta.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            where = f"{meta}:{ln}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{where}: not valid JSON ({err.msg})") from err
            if not isinstance(row, dict):
                raise ValueError(f"{where}: expected a JSON object, got {type(row).__name__}")
            for key in (image_column, caption_column):
                if key not in row:
                    raise ValueError(f"{where}: missing key {key!r} (has {sorted(row)})")
            name, text = row[image_column], row[caption_column]
            if not isinstance(name, str) or not name:
                raise ValueError(f"{where}: {image_column!r} must be a non-empty string")
            if not isinstance(text, str):
                raise ValueError(f"{where}: {caption_column!r} must be a string, "
                                 f"got {type(text).__name__}")
            path = (self.root / name)
            if Path(name).is_absolute() or ".." in Path(name).parts:
                raise ValueError(f"{where}: {image_column!r} must be a path inside the folder")
            if not path.is_file():
                raise FileNotFoundError(f"{where}: image {path} does not exist")
            if path.suffix.lower() not in IMAGE_EXTENSIONS:
                raise ValueError(f"{where}: {path.name} is not an image ({', '.join(IMAGE_EXTENSIONS)})")
            self.items.append((path, text))
        if not self.items:
            raise ValueError(f"{meta}: no rows")

    def __len__(self) -> int:
        return len(self.items)

    def texts(self, indices: Sequence[int] | None = None) -> list[str]:
        idx = range(len(self.items)) if indices is None else indices
        return [self.items[int(i)][1] for i in idx]

    def load_image(self, index: int) -> np.ndarray:
        """uint8 [image_size, image_size, 3]."""
        from PIL import Image, UnidentifiedImageError

        path = self.items[index][0]
        try:
            with Image.open(path) as im:
                im = im.convert("RGB")
                w, h = im.size
                scale = self.image_size / min(w, h)
                nw, nh = max(self.image_size, round(w * scale)), max(self.image_size, round(h * scale))
                im = im.resize((nw, nh), Image.Resampling.BICUBIC)
                left, top = (nw - self.image_size) // 2, (nh - self.image_size) // 2
                im = im.crop((left, top, left + self.image_size, top + self.image_size))
                return np.asarray(im, dtype=np.uint8).copy()
        except (UnidentifiedImageError, OSError) as err:
            raise ValueError(f"{path}: cannot read image ({err})") from err

    def __getitem__(self, index: int) -> dict:
        index = int(index)
        if index < 0:
            index += len(self.items)
        if not 0 <= index < len(self.items):
            raise IndexError(f"index {index} out of range for {len(self.items)} images")
        text = self.items[index][1]
        return {"pixel_values": image_to_tensor(self.load_image(index)), "text": text,
                "caption": caption_from_text(text), "scene": None, "index": index}
