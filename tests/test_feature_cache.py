"""Feature cache: hits and misses, key invalidation, interrupted builds (exception and SIGKILL),
corrupt / truncated / orphan shards, and bad input."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from conftest import HashEncoder

from llm4gen_lite.encoders import LLMEncoder, PromptTruncatedWarning
from llm4gen_lite.feature_cache import FeatureCache

CAPTIONS = [f"caption {i} with {'many ' * (i % 5)}words" for i in range(10)]


def assert_same(a, b) -> None:
    assert torch.equal(a.features, b.features) and torch.equal(a.mask, b.mask)
    assert a.offsets == b.offsets and a.truncated == b.truncated


def rounded(encoder, captions):
    """What the cache must return: the encoder's features rounded through fp16."""
    feats = encoder.encode(captions)
    feats.features = feats.features.half().float()
    return feats


def shard_files(cache: FeatureCache) -> list[Path]:
    return sorted(cache.path.glob("shard-*.safetensors"))


def test_build_then_get_hits_without_encoding(tmp_path, hash_encoder):
    cache = FeatureCache(hash_encoder, root=tmp_path, shard_size=4)
    assert cache.build(CAPTIONS + CAPTIONS[:3], progress=False) == 10
    assert len(cache) == 10 and len(shard_files(cache)) == 3 and CAPTIONS[7] in cache and "other" not in cache
    hash_encoder.calls.clear()
    reopened = FeatureCache(hash_encoder, root=tmp_path, shard_size=4)
    assert reopened.build(CAPTIONS, progress=False) == 0
    got = reopened.get([CAPTIONS[9], CAPTIONS[0], CAPTIONS[9]])
    assert hash_encoder.calls == [], "a cache hit never runs the encoder"
    assert got.features.shape == (3, hash_encoder.max_length, hash_encoder.dim)
    assert_same(got, rounded(hash_encoder, [CAPTIONS[9], CAPTIONS[0], CAPTIONS[9]]))


def test_stored_tokens_are_unpadded(tmp_path, hash_encoder):
    from safetensors.torch import load_file

    cache = FeatureCache(hash_encoder, root=tmp_path)
    cache.build(["a b", "a b c d e"], progress=False)
    stored = load_file(str(shard_files(cache)[0]))
    assert sorted(stored["lengths"].tolist()) == [3, 6] and stored["features"].shape == (9, hash_encoder.dim)
    assert stored["features"].dtype == torch.float16


def test_miss_is_computed_on_the_fly_and_optionally_added(tmp_path, hash_encoder):
    cache = FeatureCache(hash_encoder, root=tmp_path)
    cache.build(CAPTIONS[:2], progress=False)
    got = cache.get([CAPTIONS[0], "a new caption", ""])
    assert_same(got, rounded(hash_encoder, [CAPTIONS[0], "a new caption", ""]))
    assert "a new caption" not in cache
    cache.get(["a new caption"], add_missing=True)
    assert "a new caption" in FeatureCache(hash_encoder, root=tmp_path)


def test_truncation_flags_and_offsets_survive_the_round_trip(tmp_path):
    encoder = HashEncoder(max_length=4)
    cache = FeatureCache(encoder, root=tmp_path)
    with pytest.warns(PromptTruncatedWarning, match="6 tokens"):
        cache.build(["one two three four five", "short"], progress=False)
    got = cache.get(["one two three four five", "short"])
    assert got.truncated == [True, False] and got.offsets[0] == [(0, 0), (0, 3), (4, 7), (8, 13)]
    assert got.mask.sum(1).tolist() == [4, 2]


def test_any_key_change_is_a_miss(tmp_path):
    base = FeatureCache(HashEncoder(), root=tmp_path)
    base.build(CAPTIONS, progress=False)
    for other in (HashEncoder(seed=1), HashEncoder(max_length=13), HashEncoder(dim=9)):
        cache = FeatureCache(other, root=tmp_path)
        assert cache.path != base.path and len(cache) == 0 and CAPTIONS[0] not in cache
        assert_same(cache.get(CAPTIONS[:2]), rounded(other, CAPTIONS[:2]))
    assert CAPTIONS[0] + " " not in base, "the caption text is part of the key"


def test_real_encoder_layer_or_max_length_change_is_a_miss(tmp_path, tiny_llama_dir):
    encoder = LLMEncoder(tiny_llama_dir)
    cache = FeatureCache(encoder, root=tmp_path)
    cache.build(CAPTIONS[:3], progress=False)
    assert CAPTIONS[0] in FeatureCache(LLMEncoder(tiny_llama_dir), root=tmp_path)
    for changed in (LLMEncoder(tiny_llama_dir, layer=2), LLMEncoder(tiny_llama_dir, max_length=64)):
        assert CAPTIONS[0] not in FeatureCache(changed, root=tmp_path)
    got = cache.get(CAPTIONS[:3])
    fresh = encoder.encode(CAPTIONS[:3])
    assert got.features.shape == (3, 256, 32) and torch.equal(got.mask, fresh.mask) and got.offsets == fresh.offsets
    torch.testing.assert_close(got.features, fresh.features, atol=2e-3, rtol=1e-3)


class FailingEncoder(HashEncoder):
    """Raises on the n-th encode call, as if the process died mid-build."""

    def __init__(self, fail_at: int) -> None:
        super().__init__()
        self.fail_at = fail_at

    def encode(self, prompts):
        if len(self.calls) + 1 == self.fail_at:
            raise KeyboardInterrupt("simulated interruption")
        return super().encode(prompts)


def test_interrupted_build_resumes_to_the_same_result(tmp_path):
    reference = FeatureCache(HashEncoder(), root=tmp_path / "ref", shard_size=4)
    reference.build(CAPTIONS, batch_size=2, progress=False)
    failing = FailingEncoder(fail_at=3)  # batches of 2, shards of 4: dies during the second shard
    with pytest.raises(KeyboardInterrupt):
        FeatureCache(failing, root=tmp_path / "run", shard_size=4).build(CAPTIONS, batch_size=2, progress=False)
    resumed_encoder = HashEncoder()
    resumed = FeatureCache(resumed_encoder, root=tmp_path / "run", shard_size=4)
    assert len(resumed) == 4 and not list(resumed.path.glob(".*"))
    assert resumed.build(CAPTIONS, batch_size=2, progress=False) == 6
    assert sum(len(c) for c in resumed_encoder.calls) == 6
    assert_same(resumed.get(CAPTIONS), reference.get(CAPTIONS))


def test_sigkill_mid_build_leaves_only_complete_shards(tmp_path):
    script = textwrap.dedent(f"""
        import sys, time
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        from conftest import HashEncoder
        from llm4gen_lite.feature_cache import FeatureCache

        class Slow(HashEncoder):
            def encode(self, prompts):
                if self.calls:
                    time.sleep(0.3)
                return super().encode(prompts)

        captions = [f"caption {{i}} with {{'many ' * (i % 5)}}words" for i in range(10)]
        FeatureCache(Slow(), root={str(tmp_path / "run")!r}, shard_size=2).build(captions, batch_size=1, progress=False)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script])
    index = None
    try:
        deadline = time.time() + 60
        while time.time() < deadline and proc.poll() is None:
            found = list((tmp_path / "run").glob("*/index.json"))
            if found and json.loads(found[0].read_text())["shards"]:
                index = found[0]
                break
            time.sleep(0.05)
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    assert index is not None, "the child never wrote a shard"
    resumed = FeatureCache(HashEncoder(), root=tmp_path / "run", shard_size=2)
    assert 2 <= len(resumed) < 10
    resumed.build(CAPTIONS, progress=False)
    reference = FeatureCache(HashEncoder(), root=tmp_path / "ref", shard_size=2)
    reference.build(CAPTIONS, progress=False)
    assert_same(resumed.get(CAPTIONS), reference.get(CAPTIONS))


def test_truncated_shard_is_dropped_and_recomputed(tmp_path, hash_encoder):
    cache = FeatureCache(hash_encoder, root=tmp_path, shard_size=4)
    cache.build(CAPTIONS, progress=False)
    expected = cache.get(CAPTIONS)
    victim = shard_files(cache)[1]
    count = json.loads((cache.path / "index.json").read_text())["shards"][victim.name]["count"]
    victim.write_bytes(victim.read_bytes()[:-50])
    with pytest.warns(UserWarning, match="dropped"):
        reopened = FeatureCache(hash_encoder, root=tmp_path, shard_size=4)
    assert len(reopened) == 10 - count and not victim.exists()
    hash_encoder.calls.clear()
    assert reopened.build(CAPTIONS, progress=False) == count
    assert_same(reopened.get(CAPTIONS), expected)


def test_corrupt_shard_bytes_are_caught_by_the_checksum(tmp_path, hash_encoder):
    cache = FeatureCache(hash_encoder, root=tmp_path, shard_size=4)
    cache.build(CAPTIONS, progress=False)
    expected = cache.get(CAPTIONS)
    victim = shard_files(cache)[0]
    count = json.loads((cache.path / "index.json").read_text())["shards"][victim.name]["count"]
    data = bytearray(victim.read_bytes())
    data[-20:] = bytes(20)  # same size, valid header, different features
    victim.write_bytes(bytes(data))
    reopened = FeatureCache(hash_encoder, root=tmp_path, shard_size=4)
    assert len(reopened) == 10, "the size still matches, so the shard is registered"
    with pytest.warns(UserWarning, match="checksum"):
        got = reopened.get(CAPTIONS)
    assert_same(got, expected)
    assert len(reopened) == 10 - count and reopened.build(CAPTIONS, progress=False) == count


def test_orphan_shards_are_adopted_and_a_bad_index_is_rebuilt(tmp_path, hash_encoder):
    cache = FeatureCache(hash_encoder, root=tmp_path, shard_size=4)
    cache.build(CAPTIONS, progress=False)
    (cache.path / "index.json").unlink()  # as if killed between a shard and its index update
    hash_encoder.calls.clear()
    adopted = FeatureCache(hash_encoder, root=tmp_path, shard_size=4)
    assert len(adopted) == 10 and (cache.path / "index.json").is_file()
    (cache.path / "index.json").write_text("{not json")
    with pytest.warns(UserWarning, match="rebuilding the index"):
        again = FeatureCache(hash_encoder, root=tmp_path, shard_size=4)
    assert len(again) == 10 and again.build(CAPTIONS, progress=False) == 0
    assert hash_encoder.calls == []


def test_foreign_shard_and_stale_temp_files(tmp_path, hash_encoder):
    cache = FeatureCache(hash_encoder, root=tmp_path)
    cache.build(CAPTIONS[:2], progress=False)
    other = FeatureCache(HashEncoder(seed=5), root=tmp_path)
    other.build(["x"], progress=False)
    foreign = cache.path / "shard-ffffffffffffffff.safetensors"
    foreign.write_bytes(shard_files(other)[0].read_bytes())  # a shard of another encoder
    stale, fresh = cache.path / ".shard-x.safetensors.abc.tmp", cache.path / ".shard-y.safetensors.def.tmp"
    stale.write_bytes(b"partial")
    fresh.write_bytes(b"partial")
    os.utime(stale, (time.time() - 7200, time.time() - 7200))
    with pytest.warns(UserWarning, match="foreign"):
        reopened = FeatureCache(hash_encoder, root=tmp_path)
    assert len(reopened) == 2 and not foreign.exists()
    assert not stale.exists() and fresh.exists(), "only old temp files are removed"


def test_fp16_overflow_is_an_error(tmp_path):
    class Huge(HashEncoder):
        def encode(self, prompts):
            feats = super().encode(prompts)
            feats.features = feats.features * 1e6
            return feats

    with pytest.raises(ValueError, match="overflow fp16"):
        FeatureCache(Huge(), root=tmp_path).build(["a b c"], progress=False)


def test_progress_bar_and_bad_input(tmp_path, hash_encoder, capsys):
    cache = FeatureCache(hash_encoder, root=tmp_path)
    cache.build(CAPTIONS[:3], batch_size=2, progress=True)
    assert "caching features" in capsys.readouterr().err
    with pytest.raises(ValueError, match="empty"):
        cache.get([])
    with pytest.raises(TypeError, match="single string"):
        cache.get(CAPTIONS[0])
    with pytest.raises(TypeError, match="prompt 1"):
        cache.build(["a", None], progress=False)
    with pytest.raises(ValueError, match="batch_size"):
        cache.build(CAPTIONS, batch_size=0, progress=False)
    with pytest.raises(ValueError, match="shard_size"):
        FeatureCache(hash_encoder, root=tmp_path, shard_size=0)


def test_default_root_is_the_user_cache(isolated_cache, hash_encoder):
    cache = FeatureCache(hash_encoder)
    assert cache.path.parent == isolated_cache / "features"
