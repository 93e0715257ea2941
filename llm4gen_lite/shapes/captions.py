"""Captions with character spans: short and dense paraphrase templates, and a free-text parse.

A `Caption` is the text plus one `Span` per entity/attribute mention (character start/end, kind,
the object it describes) and the (attribute span, entity span) `pairs` the entity-guided loss
uses. Short captions name every object ("two small red circles and a blue square", optionally
with one spatial relation); dense captions are several sentences (40–120 words) giving every
object's shape, colour, size, fill and rough position, plus relations between objects.

Span kinds: "shape" (the entity noun), "color", "size", "fill", "count", "relation",
"position"; free text parsed by `caption_from_text` also yields "entity" (an unknown noun) and
"attribute" (a known non-Shapes adjective such as "wooden").
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterable, Sequence

import numpy as np

from .world import COLOR_NAMES, SHAPES, Scene, is_clear, relation_between

# --------------------------------------------------------------------------------------------
# Data structures
# --------------------------------------------------------------------------------------------

ENTITY_KINDS = ("shape", "entity")
ATTRIBUTE_KINDS = ("color", "size", "fill", "count", "attribute")
DEFAULT_PAIR_KINDS = ("color", "size", "fill", "attribute")
SPAN_KINDS = ENTITY_KINDS + ATTRIBUTE_KINDS + ("relation", "position")


@dataclass(frozen=True)
class Span:
    """A mention in a caption: text[start:end].

    kind: one of SPAN_KINDS. obj: index of the scene object described (the first one for a
    plural phrase). value: the canonical vocabulary value ("red", "circle", "left of", "3",
    "top left"…). group: every object a plural phrase covers ("three green triangles"), else ().
    ref: for relations, the index of the reference object ("the circle is left of *the square*").
    """

    start: int
    end: int
    kind: str
    obj: int
    value: str = ""
    group: tuple[int, ...] = ()
    ref: int | None = None

    @property
    def objects(self) -> tuple[int, ...]:
        """All object indices this span describes."""
        return self.group if self.group else (self.obj,)

    def to_dict(self) -> dict:
        d = {"start": self.start, "end": self.end, "kind": self.kind, "obj": self.obj,
             "value": self.value}
        if self.group:
            d["group"] = list(self.group)
        if self.ref is not None:
            d["ref"] = self.ref
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "Span":
        return cls(start=int(d["start"]), end=int(d["end"]), kind=str(d["kind"]), obj=int(d["obj"]),
                   value=str(d.get("value", "")), group=tuple(int(g) for g in d.get("group", ())),
                   ref=None if d.get("ref") is None else int(d["ref"]))


@dataclass(frozen=True)
class Caption:
    """Text + spans + (attribute span index, entity span index) pairs. style: short|dense|free."""

    text: str
    spans: tuple[Span, ...] = ()
    pairs: tuple[tuple[int, int], ...] = ()
    style: str = "short"

    def __str__(self) -> str:
        return self.text

    def span_text(self, span: Span | int) -> str:
        s = self.spans[span] if isinstance(span, int) else span
        return self.text[s.start:s.end]

    def spans_of(self, kind: str) -> list[Span]:
        return [s for s in self.spans if s.kind == kind]

    def to_dict(self) -> dict:
        return {"text": self.text, "style": self.style, "spans": [s.to_dict() for s in self.spans],
                "pairs": [list(p) for p in self.pairs]}

    @classmethod
    def from_dict(cls, d: dict) -> "Caption":
        text = d.get("text", d.get("prompt"))
        return cls(text=text, spans=tuple(Span.from_dict(s) for s in d.get("spans", ())),
                   pairs=tuple((int(a), int(b)) for a, b in d.get("pairs", ())),
                   style=d.get("style", "short"))


def attribute_pairs(caption: Caption | str, kinds: Sequence[str] = DEFAULT_PAIR_KINDS
                    ) -> list[tuple[Span, Span]]:
    """(attribute span, entity span) pairs of a caption, e.g. "red"→"circle", "small"→"square".

    A `str` is parsed with `caption_from_text` first (adjective+noun heuristics). `kinds` picks
    the attribute kinds (default colour, size, fill and other adjectives; add "count" for
    "three"→"triangles"). Character positions: `span.start`, `span.end`.
    """
    if isinstance(caption, str):
        caption = caption_from_text(caption)
    if not isinstance(caption, Caption):
        raise TypeError(f"attribute_pairs expects a Caption or str, got {type(caption).__name__}")
    out = []
    for a, e in caption.pairs:
        sa, se = caption.spans[a], caption.spans[e]
        if sa.kind in kinds:
            out.append((sa, se))
    return out


# --------------------------------------------------------------------------------------------
# Token counts (MiniLM WordPiece) without loading the tokenizer
# --------------------------------------------------------------------------------------------

_MULTI_PIECE = {"magenta": 2, "cyan": 2, "shading": 2}
_TOKEN_RE = re.compile(r"[A-Za-z]+|\d+|[^\sA-Za-z\d]")


def approx_token_count(text: str) -> int:
    """MiniLM (BERT uncased WordPiece) token count including [CLS]/[SEP] for Shapes captions.

    Exact for the vocabulary the caption templates use (a test checks it against the real
    tokenizer); for other text it is a lower bound."""
    return 2 + sum(_MULTI_PIECE.get(m.group().lower(), 1) for m in _TOKEN_RE.finditer(text))


# --------------------------------------------------------------------------------------------
# Word lists
# --------------------------------------------------------------------------------------------

PLURAL = {s: s + "s" for s in SHAPES}
COUNT_WORDS = {1: "one", 2: "two", 3: "three", 4: "four"}
SIZE_WORDS = {"small": ("small", "little"), "large": ("large", "big")}
FILL_WORDS = {"filled": ("solid", "filled"), "outlined": ("outlined", "hollow")}
FILL_POST = {"filled": ("filled in", "drawn as a solid shape"),
             "outlined": ("drawn only as an outline", "just an outline")}
REL_WORDS = {
    "left of": ("to the left of", "left of"),
    "right of": ("to the right of", "right of"),
    "above": ("above", "over"),
    "below": ("below", "under", "beneath"),
}
REGION_NAMES = (("top left", "top", "top right"), ("left", "centre", "right"),
                ("bottom left", "bottom", "bottom right"))
REGION_PHRASES = {
    "top left": ("in the top left corner", "near the top left"),
    "top": ("at the top", "near the top edge"),
    "top right": ("in the top right corner", "near the top right"),
    "left": ("on the left side", "at the left"),
    "centre": ("in the centre", "near the middle"),
    "right": ("on the right side", "at the right"),
    "bottom left": ("in the bottom left corner", "near the bottom left"),
    "bottom": ("at the bottom", "near the bottom edge"),
    "bottom right": ("in the bottom right corner", "near the bottom right"),
}


def region_of(x: float, y: float) -> str:
    """Name of the 3×3 cell holding a centre ("top left", …, "centre", …)."""
    col = 0 if x < 1 / 3 else (1 if x < 2 / 3 else 2)
    row = 0 if y < 1 / 3 else (1 if y < 2 / 3 else 2)
    return REGION_NAMES[row][col]


# --------------------------------------------------------------------------------------------
# Builder
# --------------------------------------------------------------------------------------------


def _pick(rng: np.random.Generator, options: Sequence):
    return options[int(rng.integers(len(options)))]


def _shuffled(rng: np.random.Generator, items: Sequence) -> list:
    out = list(items)
    for i in range(len(out) - 1, 0, -1):  # Fisher–Yates with integer draws only
        j = int(rng.integers(i + 1))
        out[i], out[j] = out[j], out[i]
    return out


class _Builder:
    """Accumulates text while recording spans and pairs at exact character offsets."""

    def __init__(self) -> None:
        self.parts: list[str] = []
        self.n = 0
        self.spans: list[Span] = []
        self.pairs: list[tuple[int, int]] = []
        self._cap_next = False

    def _push(self, s: str) -> None:
        if self._cap_next and s:
            s = s[0].upper() + s[1:]
            self._cap_next = False
        self.parts.append(s)
        self.n += len(s)

    def text(self, s: str) -> None:
        self._push(s)

    def capital(self) -> None:
        """Capitalise the next thing written."""
        self._cap_next = True

    def span(self, s: str, kind: str, obj: int, value: str, group: Sequence[int] = (),
             ref: int | None = None) -> int:
        start = self.n
        self._push(s)
        self.spans.append(Span(start, self.n, kind, int(obj), str(value),
                               tuple(int(g) for g in group) if len(group) > 1 else (), ref))
        return len(self.spans) - 1

    def pair(self, attr: int, entity: int) -> None:
        self.pairs.append((attr, entity))

    def build(self, style: str) -> Caption:
        text = "".join(self.parts)
        return Caption(text=text, spans=tuple(self.spans), pairs=tuple(self.pairs), style=style)

    def last_char(self) -> str:
        for p in reversed(self.parts):
            if p:
                return p[-1]
        return ""


def _article_for(word: str) -> str:
    return "an" if word[:1].lower() in "aeiou" else "a"


def _noun_phrase(b: _Builder, scene: Scene, idxs: Sequence[int], mention: Iterable[str],
                 rng: np.random.Generator, definite: bool = False) -> int:
    """Write "[article|count] [size] [fill] [colour] shape(s)"; returns the entity span index."""
    mention = set(mention)
    o = scene.objects[idxs[0]]
    n = len(idxs)
    words: list[tuple[str, str, str]] = []  # (text, kind, value)
    if "size" in mention:
        words.append((_pick(rng, SIZE_WORDS[o.size]), "size", o.size))
    if "fill" in mention:
        words.append((_pick(rng, FILL_WORDS[o.fill]), "fill", o.fill))
    if "color" in mention:
        words.append((o.color, "color", o.color))
    noun = PLURAL[o.shape] if n > 1 else o.shape
    attr_ids = []
    if n > 1:
        attr_ids.append(b.span(COUNT_WORDS[n], "count", idxs[0], str(n), idxs))
        b.text(" ")
    else:
        b.text("the " if definite else _article_for(words[0][0] if words else noun) + " ")
    for text, kind, value in words:
        attr_ids.append(b.span(text, kind, idxs[0], value, idxs))
        b.text(" ")
    ent = b.span(noun, "shape", idxs[0], o.shape, idxs)
    for a in attr_ids:
        b.pair(a, ent)
    return ent


def _group_objects(scene: Scene, mention: Iterable[str]) -> list[list[int]]:
    """Group objects that the caption cannot tell apart: same colour, shape and mentioned attrs."""
    mention = set(mention)
    groups: dict[tuple, list[int]] = {}
    for i, o in enumerate(scene.objects):
        key = (o.color, o.shape, o.size if "size" in mention else None,
               o.fill if "fill" in mention else None)
        groups.setdefault(key, []).append(i)
    return list(groups.values())


# --------------------------------------------------------------------------------------------
# Short captions
# --------------------------------------------------------------------------------------------

SHORT_PREFIXES = ("", "a picture of ", "an image of ", "a drawing of ", "a black canvas with ")
SHORT_SUFFIXES = ("", " on a black background", " on black")
REL_FORMS = ("{A} {R} {B}", "{A} placed {R} {B}", "{A} is {R} {B}")


def short_caption(
    scene: Scene,
    rng: np.random.Generator,
    *,
    mention: Iterable[str] | None = None,
    p_size: float = 0.5,
    p_fill: float = 0.5,
    relation: bool | None = None,
    p_relation: float = 0.5,
) -> Caption:
    """A one-line caption naming every object with its colour and shape.

    mention: the extra attributes to name ("size", "fill"); None draws each with p_size/p_fill.
    relation: True/False forces/forbids one spatial relation between two single objects (needs a
        clear pair); None uses p_relation. Identical objects are counted ("three green triangles").
    """
    if len(scene) == 0:
        raise ValueError("cannot caption an empty scene")
    if mention is None:
        mention = set()
        if int(rng.integers(1000)) < int(p_size * 1000):
            mention.add("size")
        if int(rng.integers(1000)) < int(p_fill * 1000):
            mention.add("fill")
    mention = set(mention) | {"color"}
    unknown = mention - {"color", "size", "fill"}
    if unknown:
        raise ValueError(f"cannot mention {sorted(unknown)}")
    groups = _shuffled(rng, _group_objects(scene, mention))
    singles = [g[0] for g in groups if len(g) == 1]
    clear_pairs = [(a, c) for a in singles for c in singles
                   if a != c and is_clear(scene.objects[a], scene.objects[c])]
    use_rel = relation if relation is not None else (int(rng.integers(1000)) < int(p_relation * 1000))
    if relation and not clear_pairs:
        raise ValueError("relation requested but the scene has no clear pair of single objects")
    use_rel = bool(use_rel and clear_pairs)

    b = _Builder()
    if use_rel:
        a, c = clear_pairs[int(rng.integers(len(clear_pairs)))]
        form = int(rng.integers(len(REL_FORMS)))
        prefix = _pick(rng, SHORT_PREFIXES) if form != 2 else ""
        suffix = _pick(rng, SHORT_SUFFIXES)
        suffix = "" if "black" in prefix else suffix
        rel = relation_between(scene.objects[a], scene.objects[c])
        b.text(prefix)
        _noun_phrase(b, scene, [a], mention, rng)
        b.text(" placed " if form == 1 else (" is " if form == 2 else " "))
        b.span(_pick(rng, REL_WORDS[rel]), "relation", a, rel, ref=c)
        b.text(" ")
        _noun_phrase(b, scene, [c], mention, rng)
        rest = [g for g in groups if g != [a] and g != [c]]
        for k, g in enumerate(rest):
            b.text(", and " if k == 0 else ", ")
            _noun_phrase(b, scene, g, mention, rng)
        b.text(suffix)
    else:
        prefix = _pick(rng, SHORT_PREFIXES)
        suffix = _pick(rng, SHORT_SUFFIXES)
        b.text(prefix)
        for k, g in enumerate(groups):
            if k > 0:
                b.text(" and " if k == len(groups) - 1 else ", ")
            _noun_phrase(b, scene, g, mention, rng)
        b.text("" if "black" in prefix else suffix)
    return b.build("short")


# --------------------------------------------------------------------------------------------
# Dense captions
# --------------------------------------------------------------------------------------------

OPENINGS = (
    "The image shows {n} on a plain black background.",
    "A black canvas with {n} drawn on it.",
    "This picture contains {n} against a dark, empty background.",
    "In this image there {be} {n} on black.",
)
CLOSINGS = (
    "The rest of the canvas is empty and black.",
    "Nothing else appears in the picture.",
    "No other shapes are present.",
    "The background is plain black and nothing else is drawn.",
)


def _shape_count_phrase(n: int) -> str:
    return "one simple shape" if n == 1 else f"{COUNT_WORDS[n]} simple shapes"


def _unique_description(scene: Scene, i: int) -> tuple[str, ...] | None:
    """Smallest attribute set (beyond shape) that singles object i out, or None."""
    o = scene.objects[i]
    for mention in (("color",), ("size", "color"), ("fill", "color"), ("size", "fill", "color")):
        key = tuple(getattr(o, m) for m in mention) + (o.shape,)
        same = [j for j, p in enumerate(scene.objects)
                if tuple(getattr(p, m) for m in mention) + (p.shape,) == key]
        if same == [i]:
            return mention
    return None


def _word_count(b: _Builder) -> int:
    return len("".join(b.parts).split())


def _sentence_gap(b: _Builder) -> None:
    if b.n:
        b.text(" ")
    b.capital()


def _object_sentence(b: _Builder, scene: Scene, i: int, rng: np.random.Generator,
                     form: int) -> None:
    o = scene.objects[i]
    region = region_of(o.x, o.y)
    pos = _pick(rng, REGION_PHRASES[region])
    full = ("size", "fill", "color")
    _sentence_gap(b)
    if form == 0:
        b.text("There is ")
        _noun_phrase(b, scene, [i], full, rng)
        b.text(" ")
        b.span(pos, "position", i, region)
        b.text(".")
    elif form == 1:
        b.span(pos, "position", i, region)
        b.text(", you can see ")
        _noun_phrase(b, scene, [i], full, rng)
        b.text(".")
    elif form == 2:
        _noun_phrase(b, scene, [i], full, rng)
        b.text(_pick(rng, (" sits ", " appears ", " is drawn ")))
        b.span(pos, "position", i, region)
        b.text(".")
    elif form == 3:
        ent = _noun_phrase(b, scene, [i], ("color",), rng)
        b.text(" is placed ")
        b.span(pos, "position", i, region)
        b.text("; it is ")
        b.pair(b.span(_pick(rng, SIZE_WORDS[o.size]), "size", i, o.size), ent)
        b.text(" and ")
        b.pair(b.span(_pick(rng, FILL_WORDS[o.fill]), "fill", i, o.fill), ent)
        b.text(".")
    else:
        b.text("One of the shapes is ")
        ent = _noun_phrase(b, scene, [i], ("color",), rng)
        b.text(", ")
        b.pair(b.span(_pick(rng, SIZE_WORDS[o.size]), "size", i, o.size), ent)
        b.text(" and ")
        b.pair(b.span(_pick(rng, FILL_POST[o.fill]), "fill", i, o.fill), ent)
        b.text(", located ")
        b.span(pos, "position", i, region)
        b.text(".")


N_OBJECT_FORMS = 5


def _relation_sentence(b: _Builder, scene: Scene, a: int, c: int, ma: tuple[str, ...],
                       mc: tuple[str, ...], rng: np.random.Generator, form: int) -> None:
    rel = relation_between(scene.objects[a], scene.objects[c])
    rel_text = _pick(rng, REL_WORDS[rel])
    _sentence_gap(b)
    if form == 1:
        b.span(rel_text, "relation", a, rel, ref=c)
        b.text(" ")
        _noun_phrase(b, scene, [c], mc, rng, definite=True)
        b.text(" is ")
        _noun_phrase(b, scene, [a], ma, rng, definite=True)
        b.text(".")
        return
    _noun_phrase(b, scene, [a], ma, rng, definite=True)
    b.text({0: " is ", 2: " lies ", 3: " is placed "}[form])
    b.span(rel_text, "relation", a, rel, ref=c)
    b.text(" ")
    _noun_phrase(b, scene, [c], mc, rng, definite=True)
    b.text(".")


N_RELATION_FORMS = 4


FILLERS = (
    "Every shape is drawn in a flat colour without any shading.",
    "The shapes do not touch or overlap each other.",
    "Each shape has sharp, clean edges.",
)


def _detail_sentence(b: _Builder, scene: Scene, i: int, m: tuple[str, ...],
                     rng: np.random.Generator, form: int) -> None:
    o = scene.objects[i]
    _sentence_gap(b)
    ent = _noun_phrase(b, scene, [i], m, rng, definite=True)
    if form == 0 and m == ("color",):
        b.text(" is ")
        b.pair(b.span(_pick(rng, SIZE_WORDS[o.size]), "size", i, o.size), ent)
        b.text(" compared with the canvas, and it is ")
        b.pair(b.span(_pick(rng, FILL_POST[o.fill]), "fill", i, o.fill), ent)
        b.text(".")
    else:
        b.text(" has a pure, bright ")
        b.pair(b.span(o.color, "color", i, o.color), ent)
        b.text(" colour with crisp edges.")


def dense_caption(scene: Scene, rng: np.random.Generator, *, min_words: int = 40,
                  max_words: int = 120, extra_words: int = 40) -> Caption:
    """Several sentences: an opening, one sentence per object (shape, colour, size, fill and rough
    position), relations between clearly separated distinguishable objects, and a closing;
    padded with detail sentences to a target drawn from [min_words, min_words + extra_words]
    and trimmed to at most `max_words`."""
    n = len(scene)
    target = min_words + int(rng.integers(extra_words + 1))
    if n == 0:
        raise ValueError("cannot caption an empty scene")
    order = _shuffled(rng, range(n))
    refs = {i: _unique_description(scene, i) for i in range(n)}
    # relation pairs: each later object relative to an earlier one, clear and distinguishable
    rel_pairs: list[tuple[int, int]] = []
    for k in range(1, n):
        a = order[k]
        if refs[a] is None:
            continue
        cands = [c for c in order[:k] if refs[c] is not None
                 and is_clear(scene.objects[a], scene.objects[c])]
        if cands:
            rel_pairs.append((a, cands[int(rng.integers(len(cands)))]))
    opening = _pick(rng, OPENINGS)
    closing = _pick(rng, CLOSINGS)
    forms = [int(rng.integers(N_OBJECT_FORMS)) for _ in range(n)]
    rforms = [int(rng.integers(N_RELATION_FORMS)) for _ in rel_pairs]
    details = [i for i in order if refs[i] is not None]
    details = [(i, f) for f in (1, 0) for i in details]
    fillers = list(_shuffled(rng, FILLERS))

    def build(n_rel: int, use_closing: bool, n_detail: int) -> _Builder:
        sub = np.random.default_rng(int(rng_state))  # same word choices on every rebuild
        b = _Builder()
        b.capital()
        b.text(opening.format(n=_shape_count_phrase(n), be="is" if n == 1 else "are"))
        for i, f in zip(order, forms):
            _object_sentence(b, scene, i, sub, f)
        for (a, c), f in list(zip(rel_pairs, rforms))[:n_rel]:
            _relation_sentence(b, scene, a, c, refs[a], refs[c], sub, f)
        for i, f in details[:n_detail]:
            _detail_sentence(b, scene, i, refs[i], sub, f)
        for k in range(max(0, n_detail - len(details))):
            _sentence_gap(b)
            b.text(fillers[k])
        if use_closing:
            _sentence_gap(b)
            b.text(closing)
        return b

    rng_state = int(rng.integers(2**31))
    n_rel, use_closing, n_detail = len(rel_pairs), True, 0
    b = build(n_rel, use_closing, n_detail)
    while _word_count(b) < target and n_detail < len(details) + len(fillers):
        n_detail += 1
        b = build(n_rel, use_closing, n_detail)
    while _word_count(b) > max_words and (use_closing or n_rel > 0):
        if use_closing:
            use_closing = False
        else:
            n_rel -= 1
        b = build(n_rel, use_closing, n_detail)
    return b.build("dense")


def make_caption(scene: Scene, rng: np.random.Generator, style: str = "short", **kwargs) -> Caption:
    """`short_caption` or `dense_caption` by `style`."""
    if style == "short":
        return short_caption(scene, rng, **kwargs)
    if style == "dense":
        return dense_caption(scene, rng, **kwargs)
    raise ValueError(f"unknown caption style {style!r}; expected 'short' or 'dense'")


# --------------------------------------------------------------------------------------------
# Free text: a small adjective + noun parse
# --------------------------------------------------------------------------------------------

_EXTRA_COLOURS = ("orange", "purple", "pink", "brown", "black", "grey", "gray", "gold", "silver",
                  "violet", "beige", "turquoise", "navy", "maroon")
_FREE_COLOURS = {c: c for c in COLOR_NAMES} | {c: c for c in _EXTRA_COLOURS}
_FREE_SIZES = {"small": "small", "little": "small", "tiny": "small", "large": "large",
               "big": "large", "huge": "large"}
_FREE_FILLS = {"solid": "filled", "filled": "filled", "outlined": "outlined",
               "hollow": "outlined"}
_FREE_ATTRS = {w: w for w in (
    "wooden", "metallic", "metal", "plastic", "glass", "leather", "fluffy", "furry", "rubber",
    "striped", "spotted", "shiny", "round", "square", "rectangular", "old", "new", "tall", "short",
    "long", "soft", "hard", "smooth", "rough", "bright", "dark", "fabric", "stone", "ceramic",
)}
_FREE_COUNTS = {"one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6"}
_SHAPE_NOUNS = {s: s for s in SHAPES} | {PLURAL[s]: s for s in SHAPES}
_STOP = {"a", "an", "the", "and", "or", "of", "on", "in", "with", "to", "is", "are", "at", "it",
         "its", "this", "that", "there", "some", "by", "for", "from", "as", "be", "next", "near",
         "placed", "left", "right", "above", "below", "under", "over", "beneath", "picture",
         "image", "photo", "drawing"}
_REL_PATTERNS = (("to the left of", "left of"), ("left of", "left of"),
                 ("to the right of", "right of"), ("right of", "right of"),
                 ("above", "above"), ("over", "above"), ("below", "below"), ("under", "below"),
                 ("beneath", "below"))
_WORD_RE = re.compile(r"[A-Za-z]+(?:-[A-Za-z]+)*")


def caption_from_text(text: str) -> Caption:
    """Parse free text into the same Caption structure (style "free").

    Known adjectives (colours, sizes, fill words, a few textures/materials) and count words attach
    to the next noun: a Shapes noun if present, else the first following word that is neither a
    stop word nor a known adjective (kind "entity"). Relation words between two entities become
    relation spans. Objects are numbered in order of their entity nouns. Heuristic by design."""
    if not isinstance(text, str):
        raise TypeError(f"caption text must be a str, got {type(text).__name__}")
    words = [(m.start(), m.end(), m.group().lower()) for m in _WORD_RE.finditer(text)]
    spans: list[Span] = []
    pairs: list[tuple[int, int]] = []
    pending: list[tuple[int, int, str, str]] = []  # (start, end, kind, value) attributes
    entity_pos: list[int] = []  # char start of each entity, in object order
    for s, e, w in words:
        if w in _SHAPE_NOUNS:
            kind, value = "shape", _SHAPE_NOUNS[w]
        elif w in _FREE_COLOURS:
            pending.append((s, e, "color", _FREE_COLOURS[w]))
            continue
        elif w in _FREE_SIZES:
            pending.append((s, e, "size", _FREE_SIZES[w]))
            continue
        elif w in _FREE_FILLS:
            pending.append((s, e, "fill", _FREE_FILLS[w]))
            continue
        elif w in _FREE_COUNTS:
            pending.append((s, e, "count", _FREE_COUNTS[w]))
            continue
        elif w in _FREE_ATTRS:
            pending.append((s, e, "attribute", w))
            continue
        elif pending and w not in _STOP:
            kind, value = "entity", w
        else:
            if w in _STOP and w not in ("a", "an", "the"):
                pending = []  # an attribute run ends at a function word
            continue
        obj = len(entity_pos)
        entity_pos.append(s)
        attr_ids = []
        for ps, pe, pk, pv in pending:
            spans.append(Span(ps, pe, pk, obj, pv))
            attr_ids.append(len(spans) - 1)
        spans.append(Span(s, e, kind, obj, value))
        for a in attr_ids:
            pairs.append((a, len(spans) - 1))
        pending = []
    # relations: a relation phrase between two entities
    low = text.lower()
    taken: list[tuple[int, int]] = []
    for pat, rel in _REL_PATTERNS:
        for m in re.finditer(r"\b" + re.escape(pat) + r"\b", low):
            if any(m.start() < e and s < m.end() for s, e in taken):
                continue
            before = [k for k, p in enumerate(entity_pos) if p < m.start()]
            after = [k for k, p in enumerate(entity_pos) if p >= m.end()]
            if before and after:
                taken.append((m.start(), m.end()))
                spans.append(Span(m.start(), m.end(), "relation", before[-1], rel, ref=after[0]))
    order = sorted(range(len(spans)), key=lambda k: (spans[k].start, spans[k].end))
    remap = {old: new for new, old in enumerate(order)}
    spans_sorted = tuple(spans[k] for k in order)
    pairs_sorted = tuple(sorted((remap[a], remap[e]) for a, e in pairs))
    return Caption(text=text, spans=spans_sorted, pairs=pairs_sorted, style="free")
