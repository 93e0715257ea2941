"""CompBench-lite: the scene parser and the scorer."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import llm4gen_lite.shapes as S
from llm4gen_lite import evaluate as E
from llm4gen_lite.shapes import Scene, ShapeObject

ALL_SETS = S.PROMPT_SETS


@pytest.fixture(scope="module")
def sets():
    return {name: S.load_prompt_set(name) for name in ALL_SETS}


def _renders(rows, size=32):
    return S.render_batch([S.row_scene(r) for r in rows], size)


def _degraded(images, seed=0, **kw):
    rng = np.random.default_rng(seed)
    return np.stack([S.degrade(im, rng, **kw) for im in images])


# --------------------------------------------------------------------------------------------
# Parser
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [32, 64])
def test_parser_reads_ground_truth_renders_exactly(size):
    scenes = S.scenes_from_seed(21, 300)
    parsed = E.parse_batch(S.render_batch(scenes, size))
    for scene, objs in zip(scenes, parsed):
        assert len(objs) == len(scene)
        left = list(objs)
        for o in scene:
            # the nearest parsed object has the same attributes and a centre within a pixel
            p = min(left, key=lambda q: abs(q.x - o.x) + abs(q.y - o.y))
            left.remove(p)
            assert (p.shape, p.color, p.size, p.fill) == (o.shape, o.color, o.size, o.fill)
            assert abs(p.x - o.x) <= 1 / size and abs(p.y - o.y) <= 1 / size


def test_parse_image_accepts_every_image_convention():
    scene = S.scenes_from_seed(4, 1, n_objects=3)[0]
    img = S.render_scene(scene, 32)
    want = E.parse_image(img)
    as_float = img.astype(np.float32) / 255
    chw_signed = torch.from_numpy(as_float * 2 - 1).permute(2, 0, 1)
    from PIL import Image

    for variant in (as_float, chw_signed, chw_signed.numpy(), Image.fromarray(img),
                    np.concatenate([img, np.full((32, 32, 1), 255, np.uint8)], axis=2)):
        assert E.parse_image(variant) == want
    assert E.parse_batch(torch.from_numpy(as_float).permute(2, 0, 1)[None].repeat(2, 1, 1, 1)) == [want, want]
    assert E.parse_batch([img, S.render_scene(scene, 64)])[0] == want  # mixed sizes
    assert E.parse_image(np.zeros((32, 32, 3), np.uint8)) == []
    with pytest.raises(ValueError):
        E.parse_image(np.zeros((4, 5, 6, 7)))


def test_parser_is_robust_to_tinted_grainy_backgrounds():
    scenes = S.scenes_from_seed(5, 100)
    rng = np.random.default_rng(0)
    for scene in scenes:
        img = S.render_scene(scene, 32).astype(np.float32) / 255
        tint = np.array([0.15, 0.1, 0.25], np.float32)  # a bluish-grey background
        grain = rng.normal(0, 0.04, img.shape).astype(np.float32)
        out = np.clip(img * 0.85 + tint + grain, 0, 1)
        got = sorted((o.shape, o.color, o.size, o.fill) for o in E.parse_image(out))
        assert got == sorted((o.shape, o.color, o.size, o.fill) for o in scene)


def test_touching_objects_of_different_colours_are_split():
    a = ShapeObject("square", "red", "large", "filled", (0.3, 0.5))
    b = ShapeObject("square", "blue", "large", "filled", (0.3 + 12 / 32, 0.5))  # edge to edge
    img = S.render_scene(Scene((a,)), 32) | S.render_scene(Scene((b,)), 32)
    got = sorted((o.color, o.shape) for o in E.parse_image(img))
    assert got == [("blue", "square"), ("red", "square")]


# --------------------------------------------------------------------------------------------
# Scorer: ground truth, robustness, chance
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [32, 64])
def test_ground_truth_renders_score_at_least_99_in_every_category(sets, size):
    for name, rows in sets.items():
        scores = E.score_batch(_renders(rows, size), rows)
        assert scores[name] >= 99.0, (name, scores)


@pytest.mark.parametrize("corruption", [
    dict(noise=0.05),
    dict(blur=0.5),
    dict(jitter=0.15),
    dict(tint=0.15),
    dict(noise=0.05, blur=0.5, jitter=0.1, tint=0.1),
], ids=["noise", "blur", "jitter", "tint", "all"])
def test_mildly_corrupted_renders_score_at_least_95(sets, corruption):
    for name, rows in sets.items():
        images = _degraded(_renders(rows), seed=1, **corruption)
        scores = E.score_batch(images, rows)
        assert scores[name] >= 95.0, (name, corruption, scores)


def test_mildly_corrupted_renders_at_64px(sets):
    for name in ("color", "texture", "counting", "complex", "dense_long"):
        rows = sets[name]
        images = _degraded(_renders(rows, 64), seed=2, noise=0.05, blur=0.5, jitter=0.1, tint=0.1)
        assert E.score_batch(images, rows)[name] >= 95.0, name


def test_shuffled_pairs_score_near_chance(sets):
    """No picture satisfies a prompt by accident: a render of another prompt's scene scores low,
    and an empty or a crowded image scores low too."""
    for name, rows in sets.items():
        base = E.shuffled_baseline(rows, seed=3)[name]
        assert base <= 20.0, (name, base)
        assert E.score_batch(np.zeros((len(rows), 32, 32, 3), np.uint8), rows)[name] == 0.0
    # one busy image with four random objects, scored against every prompt
    busy = S.render_scene(S.scenes_from_seed(8, 1, n_objects=4)[0], 32)
    rows = sets["color"]
    assert E.score_batch(np.stack([busy] * len(rows)), rows)["color"] <= 20.0


def test_bag_of_words_images_fail_binding(sets):
    """The twin of an attribute-swap pair (same words, attributes exchanged) scores 0."""
    rows = sets["attr_swap"]
    images = _renders(rows)
    twins = images[np.arange(len(rows)) ^ 1]
    assert E.score_batch(twins, rows)["attr_swap"] == 0.0
    assert E.swap_accuracy(images, rows) == 1.0
    assert E.swap_accuracy(twins, rows) == 0.0
    # a model that draws the same picture for both prompts of a pair gets at most half
    same = images[np.arange(len(rows)) & ~1]
    assert E.swap_accuracy(same, rows) == 0.0
    assert E.score_batch(same, rows)["attr_swap"] == pytest.approx(50.0)


# --------------------------------------------------------------------------------------------
# Scorer: the individual checks
# --------------------------------------------------------------------------------------------


def _row(scene: Scene, text: str) -> dict:
    cap = S.caption_from_text(text)
    return {"scene": scene.to_dict(), "spans": [s.to_dict() for s in _align(scene, cap)],
            "category": "x", "prompt": text}


def _align(scene, cap):
    """Free-text spans use entity order as object index; the test scenes list objects in the
    same order as the text, so the indices already agree."""
    return cap.spans


RED_CIRCLE = ShapeObject("circle", "red", "large", "filled", (0.25, 0.5))
BLUE_SQUARE = ShapeObject("square", "blue", "small", "outlined", (0.75, 0.5))


def test_binding_relation_and_attribute_checks():
    scene = Scene((RED_CIRCLE, BLUE_SQUARE))
    img = S.render_scene(scene)
    assert E.score_prompt(img, _row(scene, "a red circle and a blue square")) == 1.0
    swapped = S.render_scene(S.color_swap(scene))
    assert E.score_prompt(swapped, _row(scene, "a red circle and a blue square")) == 0.0
    row = _row(scene, "a red circle to the left of a blue square")
    assert E.score_prompt(img, row) == 1.0
    mirrored = Scene((RED_CIRCLE.__class__(**{**RED_CIRCLE.__dict__, "centre": (0.75, 0.5)}),
                      BLUE_SQUARE.__class__(**{**BLUE_SQUARE.__dict__, "centre": (0.25, 0.5)})))
    assert E.score_prompt(S.render_scene(mirrored), row) == pytest.approx(2 / 3)  # objects ok, relation not
    texture = _row(scene, "a large solid red circle and a small hollow blue square")
    assert E.score_prompt(img, texture) == 1.0
    wrong_fill = Scene((RED_CIRCLE, S.swap_attribute(scene, 0, 1, "fill")[1]))
    assert E.score_prompt(S.render_scene(wrong_fill), texture) == 0.5


def test_counting_is_exact():
    tri = [ShapeObject("triangle", "green", "small", "filled", (x, 0.25)) for x in (0.2, 0.5, 0.8)]
    three = Scene(tuple(tri))
    rng = np.random.default_rng(0)
    cap = S.short_caption(three, rng, mention=(), relation=False)
    row = {"scene": three.to_dict(), "spans": [s.to_dict() for s in cap.spans], "category": "counting"}
    assert "three green triangles" in cap.text
    assert E.score_prompt(S.render_scene(three), row) == 1.0
    assert E.score_prompt(S.render_scene(Scene(tuple(tri[:2]))), row) == 0.0
    four = Scene(tuple(tri) + (ShapeObject("triangle", "green", "small", "filled", (0.5, 0.75)),))
    assert E.score_prompt(S.render_scene(four), row) == 0.0


def test_scene_without_caption_requires_everything():
    scene = S.scenes_from_seed(9, 1, n_objects=3)[0]
    req = E.requirements(scene)
    assert len(req.groups) == 3 and all(len(g.attrs) == 4 for g in req.groups)
    assert E.score_prompt(S.render_scene(scene), scene) == 1.0
    assert E.score_prompt(S.render_scene(scene), (scene, None)) == 1.0


def test_attribute_accuracy_on_single_object_prompts(sets):
    rows = sets["single"]
    images = _renders(rows)
    acc = E.attribute_accuracy(images, rows)
    assert acc["colour_acc"] == acc["shape_acc"] == acc["object_acc"] == 1.0 and acc["n"] == len(rows)
    # recolour every object: colour accuracy collapses, shape accuracy stays
    names = list(S.COLORS)
    recoloured = [S.row_scene(r).replace_object(0, color=names[(names.index(S.row_scene(r)[0].color) + 1) % len(names)])
                  for r in rows]
    acc = E.attribute_accuracy(S.render_batch(recoloured), rows)
    assert acc["colour_acc"] == 0.0 and acc["shape_acc"] == 1.0
    with pytest.raises(ValueError, match="single-object"):
        E.attribute_accuracy(_renders(sets["color"]), sets["color"])


def test_dense_recall_and_precision(sets):
    rows = sets["dense_long"][:20]
    images = _renders(rows)
    m = E.dense_metrics(images, rows)
    assert m["object_recall"] == 1.0 and m["object_precision"] == 1.0
    row = rows[0]
    scene = S.row_scene(row)
    fewer = Scene(scene.objects[1:])
    assert E.object_recall(S.render_scene(fewer), row) == pytest.approx((len(scene) - 1) / len(scene))
    assert E.object_precision(S.render_scene(fewer), row) == 1.0
    extra = ShapeObject("circle", "white", "small", "filled", (0.5, 0.5))
    crowded = Scene(scene.objects + (extra,))
    if crowded.min_gap() >= 0.06:
        p = E.object_precision(S.render_scene(crowded), row)
        assert p == pytest.approx(len(scene) / (len(scene) + 1))


def test_recall_by_window_splits_objects_by_whether_their_description_fits(sets):
    rows = sets["dense_long"][:12]
    last = []  # per row: the object whose last attribute mention comes last, and where it starts
    for row in rows:
        ends = {}
        for span in row["spans"]:
            if span["kind"] in E.ATTRIBUTE_KEYS:
                ends[span["obj"]] = max(ends.get(span["obj"], span["start"]), span["start"])
        obj = max(ends, key=ends.get)
        last.append((obj, ends[obj]))
    window = [start for _, start in last]  # the window stops just before that mention
    full = E.recall_by_window(_renders(rows), rows, window)
    assert full["beyond"]["n"] >= len(rows) and full["inside"]["n"] + full["beyond"]["n"] > len(rows)
    assert full["inside"]["recall"] == full["beyond"]["recall"] == 1.0
    scenes = [S.row_scene(r) for r in rows]
    every_beyond = E.recall_by_window(_renders(rows), rows, [0] * len(rows))
    assert every_beyond["inside"]["n"] == 0 and every_beyond["beyond"]["n"] == full["inside"]["n"] + full["beyond"]["n"]
    recoloured = S.render_batch([sc.replace_object(obj, color="red" if sc[obj].color != "red" else "blue")
                                 for sc, (obj, _) in zip(scenes, last)], 32)
    split = E.recall_by_window(recoloured, rows, window)
    assert split["beyond"]["recall"] < 1.0 and split["beyond"]["colour_shape_recall"] < 1.0
    everything_inside = E.recall_by_window(recoloured, rows, [len(r["prompt"]) for r in rows])
    assert everything_inside["beyond"]["n"] == 0 and everything_inside["inside"]["recall"] < 1.0
    with pytest.raises(ValueError, match="window ends"):
        E.recall_by_window(recoloured, rows, window[:-1])


def test_compbench_report_collects_everything(sets):
    rows = sets["attr_swap"][:20] + sets["single"][:10] + sets["dense_long"][:10]
    report = E.compbench_report(_renders(rows), rows)
    assert report["scores"] == {"attr_swap": 100.0, "single": 100.0, "dense_long": 100.0}
    assert report["full_match"]["dense_long"] == 100.0
    assert report["attributes"]["colour_acc"] == 1.0
    assert report["dense"]["object_recall"] == 1.0
    assert report["swap_pair_acc"] == 1.0
    assert report["per_prompt"] == [1.0] * len(rows), "each prompt's score, in row order"
    assert report["dense"]["per_prompt_recall"] == [1.0] * 10


def test_scorer_rejects_bad_input(sets):
    rows = sets["color"][:3]
    with pytest.raises(ValueError, match="images but"):
        E.score_batch(_renders(rows)[:2], rows)
    with pytest.raises(TypeError):
        E.score_prompt(np.zeros((32, 32, 3), np.uint8), 42)
    with pytest.raises(ValueError, match="no 'scene'"):
        E.score_prompt(np.zeros((32, 32, 3), np.uint8), {"prompt": "x"})


def test_overlay_parse_draws_one_box_per_object(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.patches import Rectangle

    from llm4gen_lite import viz

    scene = S.scenes_from_seed(2, 1, n_objects=3)[0]
    img = S.render_scene(scene, 64)
    fig = viz.overlay_parse(img)
    ax = fig.axes[0]
    assert sum(isinstance(p, Rectangle) for p in ax.patches) == 3
    labels = {t.get_text().split(": ", 1)[1] for t in ax.texts}
    assert labels == {f"{o.size} {o.fill} {o.color} {o.shape}" for o in scene}
    fig.savefig(tmp_path / "overlay.png")
