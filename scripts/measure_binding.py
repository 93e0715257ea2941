"""Measure ShapesCLIP (retrieval, attribute binding) and where binding lives in each frozen encoder.

    python scripts/measure_binding.py [--checkpoint DIR] [--out DIR/metrics.json] [--quick]

1. Retrieval: top-1 image->text and text->image over 256 pairs of test-iid and test-comp, short
   and dense captions.
2. Binding test, ShapesCLIP zero-shot: two-object scenes whose objects differ in colour and shape;
   the twin exchanges the two colours (or shapes); both captions come from one caption seed, so
   they hold exactly the same words. Accuracy = share of images scored higher with their own
   caption than with the twin's (both images of every pair; ties count 1/2). Chance = 50%.
3. Binding probe: the same test through one identical, small head trained on each encoder's
   frozen token features (ShapesCLIP text tower, MiniLM last layer, SmolLM2 layers 6-30, and a
   bag-of-words control). Its image side is the ground-truth scene (per-object attributes and
   position, encoded object by object, so binding is available on that side by construction);
   the head is trained with InfoNCE on train-split swap pairs (twins in the same batch, so
   reading binding pays off) and tested on test-iid pairs. Only the text features differ.

Writes metrics.json next to the checkpoint and prints a markdown table (docs/SHAPES_CLIP.md).
"""
from __future__ import annotations

import argparse
import os
import time
import warnings
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # idle OpenMP threads sleep: same numbers, less wasted CPU

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

from llm4gen_lite.encoders import PromptTruncatedWarning, load_encoder  # noqa: E402
from llm4gen_lite.io import atomic_write_json  # noqa: E402
from llm4gen_lite.shapes import (  # noqa: E402
    COLOR_NAMES, FILLS, SHAPES, SIZES, Scene, image_to_tensor, render_scene, sample_split_scene,
    scene_in_split, short_caption, swap_attribute,
)
from llm4gen_lite.shapes_clip import (  # noqa: E402
    ShapesCLIP, default_checkpoint_dir, evaluation_pairs, load_model, retrieval_accuracy,
    swap_preference, tokenize,
)

SMOLLM2_LAYERS = (6, 12, 18, 24, 30)  # the last must be SmolLM2's depth (one pass, lower layers hooked)
SHAPESCLIP = "ShapesCLIP text tower (final layer)"
BAG_OF_WORDS = "bag-of-words control (ShapesCLIP token embeddings, no position)"
MINILM = "MiniLM-L6 (last layer)"
SPLIT_SEEDS = {"train": 100, "test_iid": 200, "test_comp": 300}  # swap-pair streams (distinct per split)


# ------------------------------------------------------------------------------------------------
# Swap pairs
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SwapPair:
    scene: Scene  # two objects with different colours and different shapes
    twin: Scene  # the same scene with the two colours (or shapes) exchanged
    caption: str  # short caption of `scene`
    twin_caption: str  # the same caption template for `twin`: exactly the same words, rebound
    kind: str  # "color" or "shape"


def swap_pairs(split: str, n: int, kind: str) -> list[SwapPair]:
    """`n` deterministic attribute-swap pairs from `split` (both scenes stay inside the split)."""
    rng = np.random.default_rng([SPLIT_SEEDS[split], 0 if kind == "color" else 1])
    pairs: list[SwapPair] = []
    while len(pairs) < n:
        scene = sample_split_scene(rng, split, 2, p_repeat=0.0)
        a, b = scene.objects
        if a.color == b.color or a.shape == b.shape:
            continue
        twin = swap_attribute(scene, 0, 1, kind)
        if not scene_in_split(twin, split):
            continue
        cap_seed = int(rng.integers(2**31))
        cap, twin_cap = (short_caption(s, np.random.default_rng(cap_seed)).text for s in (scene, twin))
        if cap == twin_cap or Counter(cap.split()) != Counter(twin_cap.split()):
            continue
        pairs.append(SwapPair(scene, twin, cap, twin_cap, kind))
    return pairs


def both_kinds(split: str, n: int) -> list[SwapPair]:
    return swap_pairs(split, n, "color") + swap_pairs(split, n, "shape")


# ------------------------------------------------------------------------------------------------
# ShapesCLIP zero-shot
# ------------------------------------------------------------------------------------------------


def shapesclip_swap_accuracy(model: ShapesCLIP, pairs: list[SwapPair]) -> float:
    """Both images of every pair, each against its own caption and the twin's."""
    size = model.config.image_size
    images = torch.stack([image_to_tensor(render_scene(s, size)) for p in pairs for s in (p.scene, p.twin)])
    own = [c for p in pairs for c in (p.caption, p.twin_caption)]
    other = [c for p in pairs for c in (p.twin_caption, p.caption)]
    return swap_preference(model, images, own, other)


# ------------------------------------------------------------------------------------------------
# Frozen token features of each encoder
# ------------------------------------------------------------------------------------------------


@dataclass
class Features:
    tokens: torch.Tensor  # [N, T, dim] fp16, cut to the longest prompt
    mask: torch.Tensor  # [N, T] bool


Encode = Callable[[list[str]], tuple[dict[str, torch.Tensor], torch.Tensor]]  # -> ({name: [B, L, dim]}, mask [B, L])


def encode_all(encode: Encode, prompts: list[str], batch_size: int = 64) -> dict[str, Features]:
    """Run `encode` over prompts in batches; every named feature set padded to the longest prompt."""
    chunks = [encode(prompts[i : i + batch_size]) for i in range(0, len(prompts), batch_size)]
    longest = max(m.shape[1] for _, m in chunks)
    mask = torch.cat([F.pad(m, (0, longest - m.shape[1])) for _, m in chunks])
    return {
        name: Features(torch.cat([F.pad(f[name], (0, 0, 0, longest - f[name].shape[1])) for f, _ in chunks]).half(), mask)
        for name in chunks[0][0]
    }


def _cut(features: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    longest = int(mask.sum(1).max())
    return features[:, :longest].float().cpu(), mask[:, :longest].cpu()


def encoder_fn(name: str, encoder) -> Encode:
    """`TextEncoder.encode` reduced to ({name: features cut to the longest real prompt}, mask)."""

    def encode(batch: list[str]) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        out = encoder.encode(batch)
        features, mask = _cut(out.features, out.mask)
        return {name: features}, mask

    return encode


def smollm2_fn(layers: tuple[int, ...]) -> Encode:
    """SmolLM2 hidden states of several layers in one pass.

    The full-depth encoder gives layer 30 (`load_encoder("smollm2", layer=30)`); forward hooks on
    its blocks capture the lower layers, normalised exactly as `load_encoder("smollm2", layer=k)`
    would (per-token LayerNorm, zero at padding) — `check_smollm2_hooks` asserts the match.
    """
    encoder = load_encoder("smollm2", layer=layers[-1])
    depth = len(encoder.model.layers)
    if layers[-1] != depth:
        raise ValueError(f"the last layer must be SmolLM2's depth ({depth})")
    captured: dict[int, torch.Tensor] = {}
    for k in layers[:-1]:
        encoder.model.layers[k - 1].register_forward_hook(
            lambda _m, _i, out, k=k: captured.__setitem__(k, out[0] if isinstance(out, tuple) else out)
        )

    def encode(batch: list[str]) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        out = encoder.encode(batch)
        top, mask = _cut(out.features, out.mask)
        result = {}
        for k in layers[:-1]:
            hidden = F.layer_norm(captured[k].float(), captured[k].shape[-1:])[:, : mask.shape[1]].cpu()
            result[smollm2_name(k)] = hidden.masked_fill(~mask[..., None], 0.0)
        result[smollm2_name(layers[-1])] = top
        return result, mask

    return encode


def smollm2_name(layer: int) -> str:
    return f"SmolLM2-135M layer {layer}"


def check_smollm2_hooks(encode: Encode, layer: int, prompts: list[str]) -> None:
    """The hooked features of `layer` equal what `load_encoder("smollm2", layer=layer)` returns."""
    hooked, mask = encode(prompts)
    direct, direct_mask = encoder_fn("direct", load_encoder("smollm2", layer=layer))(prompts)
    if not (torch.equal(mask, direct_mask) and torch.allclose(hooked[smollm2_name(layer)], direct["direct"], atol=1e-3)):
        raise RuntimeError(f"hooked SmolLM2 layer {layer} differs from load_encoder('smollm2', layer={layer})")


def bag_of_words_fn(model: ShapesCLIP, name: str) -> Encode:
    """Control: ShapesCLIP's token embeddings with no position and no context (a bag of words)."""

    @torch.no_grad()
    def encode(batch: list[str]) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        tok = tokenize(batch, model.config.max_length, pad_to_max=False)
        emb = model.text_tower.token_up(model.text_tower.token_embedding(tok.input_ids))
        return {name: emb.masked_fill(~tok.attention_mask[..., None], 0.0)}, tok.attention_mask

    return encode


# ------------------------------------------------------------------------------------------------
# The probe: one identical head per encoder; image side = the ground-truth scene
# ------------------------------------------------------------------------------------------------

OBJ_DIM = len(COLOR_NAMES) + len(SHAPES) + len(SIZES) + len(FILLS) + 2


def scene_tensor(scenes: list[Scene]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-object one-hot attributes + centre: `[N, 4, OBJ_DIM]` and object mask `[N, 4]`."""
    x = torch.zeros(len(scenes), 4, OBJ_DIM)
    mask = torch.zeros(len(scenes), 4, dtype=torch.bool)
    offsets = np.cumsum([0, len(COLOR_NAMES), len(SHAPES), len(SIZES), len(FILLS)])
    for n, scene in enumerate(scenes):
        for k, o in enumerate(scene.objects):
            for off, vocab, value in zip(offsets, (COLOR_NAMES, SHAPES, SIZES, FILLS), (o.color, o.shape, o.size, o.fill)):
                x[n, k, off + vocab.index(value)] = 1.0
            x[n, k, -2:] = torch.tensor(o.centre)
            mask[n, k] = True
    return x, mask


class ProbeHead(nn.Module):
    """Text: LayerNorm -> linear -> 4-query attention pooling -> MLP. Scene: per-object MLP -> sum."""

    def __init__(self, text_dim: int, width: int = 128, queries: int = 4) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(text_dim, elementwise_affine=False)  # evens out LLM activation scales
        self.text_in = nn.Linear(text_dim, width)
        self.queries = nn.Parameter(torch.randn(queries, width) / width**0.5)
        self.text_out = nn.Sequential(nn.Linear(queries * width, width), nn.GELU(), nn.Linear(width, width))
        self.scene_obj = nn.Sequential(nn.Linear(OBJ_DIM, width), nn.GELU(), nn.Linear(width, width))
        self.scene_out = nn.Sequential(nn.GELU(), nn.Linear(width, width))

    def text(self, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = self.text_in(self.norm(tokens.float()))  # [B, T, W]
        scores = torch.einsum("qw,btw->bqt", self.queries, x) / x.shape[-1] ** 0.5
        attn = scores.masked_fill(~mask[:, None, :], float("-inf")).softmax(-1)  # [B, Q, T]
        pooled = torch.einsum("bqt,btw->bqw", attn, x).flatten(1)
        return F.normalize(self.text_out(pooled), dim=-1)

    def scene(self, objects: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        per_object = self.scene_obj(objects) * mask[..., None]
        return F.normalize(self.scene_out(per_object.sum(1)), dim=-1)


def train_probe(train: Features, scenes: tuple[torch.Tensor, torch.Tensor], steps: int, seed: int) -> ProbeHead:
    """InfoNCE between captions and their scenes; batches hold whole swap pairs (twins adjacent)."""
    torch.manual_seed(seed)
    head = ProbeHead(train.tokens.shape[-1])
    opt = torch.optim.AdamW(head.parameters(), lr=2e-3, weight_decay=0.01)
    n_pairs, batch_pairs = train.tokens.shape[0] // 2, 64
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        pick = torch.randperm(n_pairs, generator=gen)[:batch_pairs]
        idx = torch.stack([2 * pick, 2 * pick + 1], dim=1).flatten()  # each pair: scene, twin
        logits = 20.0 * head.text(train.tokens[idx], train.mask[idx]) @ head.scene(scenes[0][idx], scenes[1][idx]).T
        target = torch.arange(len(idx))
        loss = (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return head


@torch.no_grad()
def probe_swap_accuracy(head: ProbeHead, test: Features, scenes: tuple[torch.Tensor, torch.Tensor]) -> float:
    """Rows come as (scene, twin) pairs: each scene must score its own caption above its twin's."""
    text = head.text(test.tokens, test.mask)
    scene = head.scene(*scenes)
    sims = (scene * text).sum(-1)  # own caption
    swapped = (scene * text.view(-1, 2, text.shape[-1]).flip(1).reshape_as(text)).sum(-1)
    return ((sims > swapped).float() + 0.5 * (sims == swapped).float()).mean().item()


def pair_rows(pairs: list[SwapPair]) -> tuple[list[str], list[Scene]]:
    """Flatten pairs into rows (scene, twin, scene, twin, ...) with their captions."""
    captions = [c for p in pairs for c in (p.caption, p.twin_caption)]
    scenes = [s for p in pairs for s in (p.scene, p.twin)]
    return captions, scenes


# ------------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path, default=default_checkpoint_dir())
    parser.add_argument("--out", type=Path, default=None, help="metrics.json path (default: in the checkpoint)")
    parser.add_argument("--quick", action="store_true", help="small sets, for a smoke run (numbers not saved)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    n_swap, n_probe, probe_steps, seeds = (32, 64, 20, (0,)) if args.quick else (500, 512, 300, (0, 1, 2))
    n_probe_test = 32 if args.quick else 256

    model = load_model(args.checkpoint)
    metrics: dict = {"checkpoint_sha256_16": model.weights_id, "retrieval": {}, "swap_zero_shot": {}, "probe": {}}

    for split in ("test_iid", "test_comp"):
        for style, dense_prob in (("short", 0.0), ("dense", 1.0)):
            images, captions = evaluation_pairs(split, 256, dense_prob)
            with warnings.catch_warnings():  # dense captions often exceed 77 tokens: truncated, as CLIP would
                warnings.simplefilter("ignore", PromptTruncatedWarning)
                result = retrieval_accuracy(model, images, captions)
            lengths = tokenize(captions, model.config.max_length).lengths
            result["truncated_share"] = float(np.mean([n > model.config.max_length for n in lengths]))
            metrics["retrieval"][f"{split}/{style}"] = result
    for split in ("test_iid", "test_comp"):
        for kind in ("color", "shape"):
            metrics["swap_zero_shot"][f"{split}/{kind}"] = shapesclip_swap_accuracy(model, swap_pairs(split, n_swap, kind))
    print(f"ShapesCLIP retrieval and zero-shot swap test done ({time.perf_counter() - start:.0f} s)")

    train_caps, train_scenes = pair_rows(both_kinds("train", n_probe))
    test_rows = {kind: pair_rows(swap_pairs("test_iid", n_probe_test, kind)) for kind in ("color", "shape")}
    train_objs = scene_tensor(train_scenes)
    encoders: list[tuple[str, Callable[[], Encode]]] = [
        ("ShapesCLIP", lambda: encoder_fn(SHAPESCLIP, load_encoder("shapesclip", path=args.checkpoint))),
        ("bag of words", lambda: bag_of_words_fn(model, BAG_OF_WORDS)),
        ("MiniLM", lambda: encoder_fn(MINILM, load_encoder("minilm"))),
        ("SmolLM2", lambda: smollm2_fn(SMOLLM2_LAYERS)),
    ]
    for label, make in encoders:
        t0 = time.perf_counter()
        encode = make()
        if label == "SmolLM2":
            check_smollm2_hooks(encode, SMOLLM2_LAYERS[0], train_caps[:8])
        train_feats = encode_all(encode, train_caps)
        tests = {kind: (encode_all(encode, caps), scene_tensor(scenes)) for kind, (caps, scenes) in test_rows.items()}
        print(f"{label}: features of {len(train_caps) + sum(len(c) for c, _ in test_rows.values())} captions "
              f"({time.perf_counter() - t0:.0f} s)")
        for name in train_feats:
            t1 = time.perf_counter()
            scores: dict[str, list[float]] = {kind: [] for kind in tests}
            for seed in seeds:
                head = train_probe(train_feats[name], train_objs, probe_steps, seed)
                for kind, (feats, objs) in tests.items():
                    scores[kind].append(probe_swap_accuracy(head, feats[name], objs))
            metrics["probe"][name] = {
                k: {"mean": float(np.mean(v)), "std": float(np.std(v)), "seeds": v} for k, v in scores.items()
            }
            print(f"  {name}: " + ", ".join(f"{k} {np.mean(v):.3f}" for k, v in scores.items())
                  + f" ({time.perf_counter() - t1:.0f} s)")
        del encode, train_feats, tests

    metrics["settings"] = {
        "retrieval_pairs": 256, "swap_pairs_per_kind": n_swap, "probe_train_pairs_per_kind": n_probe,
        "probe_test_pairs_per_kind": n_probe_test, "probe_steps": probe_steps, "probe_seeds": list(seeds),
        "threads": args.threads, "wall_seconds": round(time.perf_counter() - start, 1),
    }
    print(markdown(metrics))
    if not args.quick:
        out = args.out or args.checkpoint / "metrics.json"
        atomic_write_json(out, metrics)
        print(f"wrote {out}")


def markdown(m: dict) -> str:
    pct = lambda x: f"{100 * x:.1f}"  # noqa: E731
    lines = ["| retrieval (top-1 of 256, chance 0.4) | image→text | text→image | captions > 77 tokens |", "|---|---|---|---|"]
    lines += [f"| {k} | {pct(v['image_to_text'])} | {pct(v['text_to_image'])} | {pct(v['truncated_share'])} |"
              for k, v in m["retrieval"].items()]
    lines += ["", "| ShapesCLIP zero-shot swap test (chance 50) | colour swap | shape swap |", "|---|---|---|"]
    for split in ("test_iid", "test_comp"):
        z = m["swap_zero_shot"]
        lines.append(f"| {split} | {pct(z[f'{split}/color'])} | {pct(z[f'{split}/shape'])} |")
    n_seeds = len(m["settings"]["probe_seeds"]) if "settings" in m else 1
    lines += ["", f"| binding probe on frozen token features, test-iid (mean ± std over {n_seeds} seeds) | colour swap | shape swap |",
              "|---|---|---|"]
    for name, r in m["probe"].items():
        lines.append(f"| {name} | {pct(r['color']['mean'])} ± {pct(r['color']['std'])} | "
                     f"{pct(r['shape']['mean'])} ± {pct(r['shape']['std'])} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
