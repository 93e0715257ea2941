"""The synthetic Shapes world: scenes, renderer, captions with spans, splits, prompt sets, datasets.

    from llm4gen_lite.shapes import sample_scene, render_scene, short_caption, dense_caption
    rng = np.random.default_rng(0)
    scene = sample_scene(rng, n_objects=(1, 4))
    image = render_scene(scene, image_size=32)        # uint8 [32, 32, 3]
    caption = short_caption(scene, rng)               # Caption(text, spans, pairs)

The torch datasets (`ShapesDataset`, `ImageFolderDataset`) are imported lazily so that the
numpy-only parts load without torch.
"""
from __future__ import annotations

from .captions import (
    ATTRIBUTE_KINDS, ENTITY_KINDS, SPAN_KINDS, Caption, Span, approx_token_count, attribute_pairs,
    caption_from_text, dense_caption, make_caption, region_of, short_caption,
)
from .prompts import (
    COMPBENCH_CATEGORIES, PROMPT_SETS, build_prompt_set, build_prompt_sets, load_prompt_set,
    prompts_dir, row_caption, row_scene, write_prompt_sets,
)
from .render import (
    DEFAULT_IMAGE_SIZE, degrade, object_box_px, render_batch, render_scene, shape_template, side_px,
)
from .splits import (
    SPLITS, example_rng, is_held_out, make_example, sample_split_scene, scene_in_split, split_combos,
)
from .world import (
    ALL_COMBOS, COLOR_NAMES, COLORS, COLOURS, FILLS, HELD_OUT_COMBOS, RELATIONS, SEEN_COMBOS,
    SHAPES, SIZE_FRACTION, SIZES, Scene, ShapeObject, color_swap, is_clear, relation_between,
    relation_holds, sample_scene, scenes_from_seed, shape_swap, swap_attribute,
)

_LAZY = {"ShapesDataset", "ImageFolderDataset", "collate_examples", "image_to_tensor",
         "tensor_to_image"}


def __getattr__(name: str):
    if name in _LAZY:
        from . import datasets

        return getattr(datasets, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    # world
    "SHAPES", "COLORS", "COLOURS", "COLOR_NAMES", "SIZES", "FILLS", "RELATIONS", "SIZE_FRACTION",
    "ALL_COMBOS", "HELD_OUT_COMBOS", "SEEN_COMBOS", "ShapeObject", "Scene", "sample_scene",
    "scenes_from_seed", "relation_between", "relation_holds", "is_clear", "swap_attribute",
    "color_swap", "shape_swap",
    # render
    "DEFAULT_IMAGE_SIZE", "render_scene", "render_batch", "shape_template", "side_px",
    "object_box_px", "degrade",
    # captions
    "Span", "Caption", "SPAN_KINDS", "ENTITY_KINDS", "ATTRIBUTE_KINDS", "short_caption",
    "dense_caption", "make_caption", "caption_from_text", "attribute_pairs", "approx_token_count",
    "region_of",
    # splits
    "SPLITS", "split_combos", "sample_split_scene", "scene_in_split", "is_held_out", "example_rng",
    "make_example",
    # prompt sets
    "COMPBENCH_CATEGORIES", "PROMPT_SETS", "build_prompt_set", "build_prompt_sets",
    "load_prompt_set", "write_prompt_sets", "prompts_dir", "row_scene", "row_caption",
    # datasets (lazy)
    "ShapesDataset", "ImageFolderDataset", "collate_examples", "image_to_tensor", "tensor_to_image",
]
