"""On-disk cache of frozen-encoder features, so training never runs the text encoders per step.

Features live as fp16 safetensors shards under `cache_dir()/features/<sha256(identity)[:16]>/`,
keyed by the encoder's `identity` (model files + layer + max_length + normalisation) and the
SHA-256 of each caption's text: a change of any key part is a miss, never a stale hit.

Folder layout:
    encoder.json            the full identity, dim and max_length (written once)
    index.json              shard name -> {count, bytes, digest}; rewritten after every new shard
    shard-<hash>.safetensors one shard, up to `shard_size` captions:
        keys       uint8 [n, 32]              SHA-256 of each caption's UTF-8 text
        lengths    int32 [n]                  stored tokens per caption (through its last real token)
        truncated  bool  [n]                  did the caption exceed max_length?
        features   fp16  [sum(lengths), dim]  the stored tokens of all captions, concatenated
        mask       bool  [sum(lengths)]
        offsets    int32 [sum(lengths), 2]    character span of each token
      metadata: identity and format version.
Only the unpadded tokens are stored (a short caption costs a few KB, not 256 x dim x 2 bytes);
`get` pads them back to `max_length` with zero features, False mask and (0, 0) offsets.

Robustness: every file is written atomically (temp name + rename, `llm4gen_lite.io`), the index
after its shard, so an interrupted build leaves complete shards only and a rebuild computes just
the rest. On open, a shard whose size disagrees with the index, or whose header does not parse, is
dropped; a shard on disk but missing from the index (a build killed between the two writes) is
checked and adopted. Before a shard's features are first read its SHA-256 is checked against the
index; a mismatch drops it and its captions are recomputed. One writer at a time per folder
(with several processes, build on the main process first).
"""
from __future__ import annotations

import hashlib
import os
import time
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from tqdm.auto import tqdm

from .encoders import STALE_TEMP_SECONDS, TextEncoder, TextFeatures, check_prompts
from .io import atomic_save_safetensors, atomic_write_json, load_safetensors, read_json
from .paths import cache_dir, resolve_device

FORMAT_VERSION = 1  # bump when the shard layout changes: old folders are simply never looked up
_TENSORS = ("keys", "lengths", "truncated", "features", "mask", "offsets")


def caption_key(caption: str) -> bytes:
    """SHA-256 digest of a caption's UTF-8 text: the per-caption part of the cache key."""
    return hashlib.sha256(caption.encode("utf-8")).digest()


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


@dataclass
class _Shard:
    """A registered shard: where each caption's tokens start, how many there are, its checksum."""

    path: Path
    digest: str  # SHA-256 of the file, from the index
    starts: list[int]  # first stored token of each row
    lengths: list[int]  # stored tokens of each row
    truncated: list[bool]  # per row
    verified: bool = False  # checksum checked in this process


class FeatureCache:
    """Precomputed features of one encoder, looked up by caption text.

    encoder: any `TextEncoder` (its `identity`, `dim`, `max_length` and `encode` are used).
    root: folder holding per-encoder feature folders; None = `cache_dir()/features`.
    shard_size: captions per shard written by `build`.
    """

    def __init__(self, encoder: TextEncoder, root: str | os.PathLike | None = None, shard_size: int = 1024) -> None:
        if not isinstance(shard_size, int) or shard_size < 1:
            raise ValueError(f"shard_size must be a positive int, got {shard_size!r}")
        self.encoder = encoder
        self.shard_size = shard_size
        self.root = Path(root) if root is not None else cache_dir() / "features"
        name = hashlib.sha256(f"features-v{FORMAT_VERSION}\n{encoder.identity}".encode()).hexdigest()[:16]
        self.path = self.root / name  # this encoder's folder
        self._shards: dict[str, _Shard] = {}
        self._rows: dict[bytes, tuple[str, int]] = {}  # caption key -> (shard name, row)
        self._open()

    # ---- public API -------------------------------------------------------------------------

    def __contains__(self, caption: object) -> bool:
        return isinstance(caption, str) and caption_key(caption) in self._rows

    def __len__(self) -> int:
        return len(self._rows)

    def build(self, captions: Sequence[str], batch_size: int = 64, progress: bool = True) -> int:
        """Encode and store every caption not cached yet; returns how many were computed.

        Shards already holding some of `captions` are checksum-verified first, so a corrupt shard
        is dropped and recomputed here rather than discovered during training.
        """
        captions = check_prompts(captions)
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        keys = [caption_key(c) for c in captions]
        for name in {self._rows[k][0] for k in keys if k in self._rows}:
            self._verify(name)
        todo = list({k: c for k, c in zip(keys, captions) if k not in self._rows}.items())
        with tqdm(total=len(todo), disable=not progress, desc="caching features", unit="caption") as bar:
            for start in range(0, len(todo), self.shard_size):
                chunk = todo[start : start + self.shard_size]
                self._write_shard(chunk, self._compute([c for _, c in chunk], batch_size, bar))
        return len(todo)

    def get(
        self, captions: Sequence[str], add_missing: bool = False, device: str | torch.device = "cpu"
    ) -> TextFeatures:
        """Features of `captions` padded to `encoder.max_length`: `[batch, max_length, dim]` float32.

        A caption not in the cache is encoded on the fly (rounded through fp16 like stored
        features, so a caption reads the same cached or not) and, with `add_missing`, stored.
        """
        captions = check_prompts(captions)
        keys = [caption_key(c) for c in captions]
        for name in {self._rows[k][0] for k in keys if k in self._rows}:
            self._verify(name)
        rows: dict[bytes, tuple[torch.Tensor, torch.Tensor, list[tuple[int, int]], bool]] = {}
        by_shard: dict[str, list[bytes]] = {}
        for key in dict.fromkeys(keys):
            if key in self._rows:
                by_shard.setdefault(self._rows[key][0], []).append(key)
        for name, shard_keys in by_shard.items():
            rows.update(self._read(name, shard_keys))
        missing = list({k: c for k, c in zip(keys, captions) if k not in rows}.items())
        if missing:
            computed = self._compute([c for _, c in missing], batch_size=len(missing))
            rows.update(zip([k for k, _ in missing], computed))
            if add_missing:
                self._write_shard(missing, computed)
        return self._assemble([rows[k] for k in keys], resolve_device(device))

    # ---- computing and writing --------------------------------------------------------------

    def _compute(self, captions: list[str], batch_size: int, bar: Any = None) -> list[tuple]:
        """Per caption: (fp16 features [n, dim], mask [n], offsets, truncated), n = stored tokens.

        Captions are batched by length (less padding); results come back in input order.
        """
        order = sorted(range(len(captions)), key=lambda i: len(captions[i]))
        out: list[tuple] = [None] * len(captions)
        for start in range(0, len(order), batch_size):
            batch = order[start : start + batch_size]
            feats = self.encoder.encode([captions[i] for i in batch])
            features = feats.features.detach().to("cpu", torch.float16)
            if not torch.isfinite(features).all():
                raise ValueError(
                    f"features of {self.encoder.identity} overflow fp16; use an encoder with "
                    "normalization='layernorm'"
                )
            mask = feats.mask.to("cpu")
            for row, i in enumerate(batch):
                real = mask[row].nonzero()
                n = int(real[-1]) + 1 if len(real) else 0
                out[i] = (features[row, :n], mask[row, :n], list(feats.offsets[row][:n]), bool(feats.truncated[row]))
            if bar is not None:
                bar.update(len(batch))
        return out

    def _write_shard(self, chunk: list[tuple[bytes, str]], computed: list[tuple]) -> None:
        keys = [k for k, _ in chunk]
        tensors = {
            "keys": torch.tensor([list(k) for k in keys], dtype=torch.uint8),
            "lengths": torch.tensor([len(f) for f, _, _, _ in computed], dtype=torch.int32),
            "truncated": torch.tensor([t for _, _, _, t in computed], dtype=torch.bool),
            "features": torch.cat([f for f, _, _, _ in computed]).to(torch.float16),
            "mask": torch.cat([m for _, m, _, _ in computed]).to(torch.bool),
            "offsets": torch.tensor([o for _, _, offs, _ in computed for o in offs], dtype=torch.int32).reshape(-1, 2),
        }
        name = f"shard-{hashlib.sha256(b''.join(keys)).hexdigest()[:16]}.safetensors"
        path = atomic_save_safetensors(tensors, self.path / name, metadata=self._metadata())
        self._register(name, path, _file_sha256(path), tensors["keys"], tensors["lengths"], tensors["truncated"])
        self._shards[name].verified = True
        self._write_index()

    def _metadata(self) -> dict[str, str]:
        return {"identity": self.encoder.identity, "format": str(FORMAT_VERSION)}

    def _write_index(self) -> None:
        shards = {
            name: {"count": len(s.lengths), "bytes": s.path.stat().st_size, "digest": s.digest}
            for name, s in sorted(self._shards.items())
        }
        atomic_write_json(self.path / "index.json", {"identity": self.encoder.identity, "shards": shards})

    # ---- reading ----------------------------------------------------------------------------

    def _read(self, name: str, keys: list[bytes]) -> Iterator[tuple[bytes, tuple]]:
        """(key, (fp16 features, mask, offsets, truncated)) for `keys` stored in shard `name`."""
        shard = self._shards[name]
        with safe_open(str(shard.path), framework="pt") as fh:
            features, mask, offsets = fh.get_slice("features"), fh.get_slice("mask"), fh.get_slice("offsets")
            for key in keys:
                row = self._rows[key][1]
                a, b = shard.starts[row], shard.starts[row] + shard.lengths[row]
                spans = [tuple(o) for o in offsets[a:b].tolist()]
                yield key, (features[a:b], mask[a:b], spans, shard.truncated[row])

    def _assemble(self, rows: list[tuple], device: torch.device) -> TextFeatures:
        size, dim = self.encoder.max_length, self.encoder.dim
        features = torch.zeros(len(rows), size, dim)
        mask = torch.zeros(len(rows), size, dtype=torch.bool)
        offsets = []
        for i, (f, m, spans, _) in enumerate(rows):
            features[i, : len(f)] = f.float()
            mask[i, : len(m)] = m
            offsets.append(list(spans) + [(0, 0)] * (size - len(spans)))
        return TextFeatures(features.to(device), mask.to(device), offsets, [t for *_, t in rows])

    # ---- opening, checking, dropping --------------------------------------------------------

    def _open(self) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        meta = self.path / "encoder.json"
        try:
            found = read_json(meta).get("identity")
        except (FileNotFoundError, ValueError, AttributeError):
            found = None
            info = {"identity": self.encoder.identity, "dim": self.encoder.dim, "max_length": self.encoder.max_length}
            atomic_write_json(meta, info)
        if found not in (None, self.encoder.identity):
            raise ValueError(f"{self.path} belongs to another encoder ({found!r}); delete the folder")
        now = time.time()
        for tmp in self.path.glob(".*.tmp"):
            if now - tmp.stat().st_mtime > STALE_TEMP_SECONDS:
                tmp.unlink(missing_ok=True)
        try:
            indexed = read_json(self.path / "index.json").get("shards", {})
        except FileNotFoundError:
            indexed = {}
        except ValueError as err:
            warnings.warn(f"{err}; rebuilding the index from the shards", stacklevel=3)
            indexed = {}
        changed = False
        for path in sorted(self.path.glob("shard-*.safetensors")):
            entry = indexed.get(path.name)
            if entry is not None and self._load_indexed(path, entry):
                continue
            if entry is None:
                self._adopt(path)
            changed = True
        if changed or set(indexed) != set(self._shards):
            self._write_index()

    def _load_indexed(self, path: Path, entry: dict) -> bool:
        """Register an indexed shard from its header and small tensors; False (dropped) if unreadable."""
        try:
            if path.stat().st_size != entry["bytes"]:
                raise ValueError(f"{path.stat().st_size} bytes, index says {entry['bytes']}")
            with safe_open(str(path), framework="pt") as fh:
                if fh.metadata() != self._metadata() or set(fh.keys()) != set(_TENSORS):
                    raise ValueError("metadata or tensor names differ from this encoder's")
                small = {k: fh.get_tensor(k) for k in ("keys", "lengths", "truncated")}
            if len(small["keys"]) != entry["count"]:
                raise ValueError(f"{len(small['keys'])} rows, index says {entry['count']}")
        except Exception as err:  # any unreadable shard is dropped, never trusted
            self._drop_file(path, err)
            return False
        self._register(path.name, path, entry["digest"], small["keys"], small["lengths"], small["truncated"])
        return True

    def _adopt(self, path: Path) -> None:
        """Register a complete shard the index does not list yet; drop it if it is not one."""
        try:
            tensors = load_safetensors(path)
            with safe_open(str(path), framework="pt") as fh:
                if fh.metadata() != self._metadata() or set(tensors) != set(_TENSORS):
                    raise ValueError("metadata or tensor names differ from this encoder's")
            if int(tensors["lengths"].sum()) != len(tensors["features"]):
                raise ValueError("lengths do not add up to the stored tokens")
        except Exception as err:  # any unreadable shard is dropped, never trusted
            self._drop_file(path, err)
            return
        self._register(path.name, path, _file_sha256(path), tensors["keys"], tensors["lengths"], tensors["truncated"])
        self._shards[path.name].verified = True

    def _register(
        self, name: str, path: Path, digest: str, keys: torch.Tensor, lengths: torch.Tensor, truncated: torch.Tensor
    ) -> None:
        lengths_list = [int(n) for n in lengths.tolist()]
        starts = [0]
        for n in lengths_list[:-1]:
            starts.append(starts[-1] + n)
        self._shards[name] = _Shard(path, digest, starts, lengths_list, [bool(t) for t in truncated.tolist()])
        for row, key in enumerate(keys.tolist()):
            self._rows[bytes(key)] = (name, row)

    def _verify(self, name: str) -> None:
        """Check a shard's SHA-256 once per process; a mismatch drops it (its captions become misses)."""
        shard = self._shards[name]
        if shard.verified:
            return
        if not shard.path.is_file() or _file_sha256(shard.path) != shard.digest:
            self._drop(name, "checksum mismatch")
            return
        shard.verified = True

    def _drop(self, name: str, reason: object) -> None:
        shard = self._shards.pop(name)
        self._rows = {k: v for k, v in self._rows.items() if v[0] != name}
        self._drop_file(shard.path, reason)
        self._write_index()

    def _drop_file(self, path: Path, reason: object) -> None:
        warnings.warn(
            f"{path}: corrupt or foreign feature shard dropped ({reason}); its captions will be recomputed",
            stacklevel=4,
        )
        path.unlink(missing_ok=True)
