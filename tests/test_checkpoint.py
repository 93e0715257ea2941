"""Checkpoints: pickle-free round trips, atomic writes, keep-last-N, corrupt files refused, exact resume."""
from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from llm4gen_lite import checkpoint as ckpt
from llm4gen_lite.checkpoint import (
    capture_rng_state, flatten_state, list_checkpoints, load_checkpoint, resolve_checkpoint, restore_rng_state,
    save_checkpoint, unflatten_state,
)
from llm4gen_lite.io import load_safetensors
from llm4gen_lite.train import train

from test_train import REPO, tiny_config


def _optimizer_state() -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.8, 0.9))
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    return model, opt


def test_nested_state_round_trip_keeps_int_keys_tuples_and_tensors():
    _, opt = _optimizer_state()
    state = {"optimizer": opt.state_dict(), "misc": {"t": (1, 2.5, None, "x"), "n": np.int64(3)}}
    structure, tensors = flatten_state(state)
    json.dumps(structure)  # JSON-able: no pickle anywhere
    back = unflatten_state(json.loads(json.dumps(structure)), tensors)
    assert back["optimizer"]["param_groups"][0]["betas"] == (0.8, 0.9)
    assert set(back["optimizer"]["state"]) == {0, 1}
    assert torch.equal(back["optimizer"]["state"][0]["exp_avg"], state["optimizer"]["state"][0]["exp_avg"])
    assert back["misc"] == {"t": (1, 2.5, None, "x"), "n": 3}
    with pytest.raises(TypeError, match="cannot store"):
        flatten_state({"bad": object()})


def test_rng_states_restore_exactly():
    g = torch.Generator().manual_seed(1)
    state = capture_rng_state({"train": g})
    first = (torch.rand(3), np.random.rand(), random.random(), torch.rand(2, generator=g))
    structure, tensors = flatten_state(state)
    restore_rng_state(unflatten_state(json.loads(json.dumps(structure)), tensors), {"train": g})
    again = (torch.rand(3), np.random.rand(), random.random(), torch.rand(2, generator=g))
    assert torch.equal(first[0], again[0]) and first[1] == again[1] and first[2] == again[2]
    assert torch.equal(first[3], again[3])
    assert state["torch_cpu"].dtype == torch.uint8


def test_save_load_keep_last_and_resolve(tmp_path):
    model, opt = _optimizer_state()
    for step in (1, 2, 3):
        save_checkpoint(tmp_path, step, {"model": model.state_dict(), "optimizer": opt.state_dict(),
                                         "progress": {"step": step}}, rank_state=capture_rng_state(), keep_last=2)
    kept = list_checkpoints(tmp_path)
    assert [p.name for p in kept] == ["step_0000002", "step_0000003"]
    assert resolve_checkpoint(tmp_path, "latest") == kept[-1]
    parts, rank_state = load_checkpoint(kept[-1])
    assert parts["progress"]["step"] == 3 and rank_state is not None
    fresh = torch.optim.AdamW(model.parameters(), lr=1e-3)
    fresh.load_state_dict(parts["optimizer"])
    assert fresh.state_dict()["param_groups"][0]["betas"] == (0.8, 0.9)
    with pytest.raises(FileNotFoundError, match="not a checkpoint"):
        resolve_checkpoint(tmp_path, str(tmp_path / "nope"))
    with pytest.raises(FileNotFoundError, match="no complete checkpoint"):
        resolve_checkpoint(tmp_path / "empty", "latest")


def test_a_failed_write_leaves_the_previous_checkpoint_intact(tmp_path, monkeypatch):
    model, _ = _optimizer_state()
    save_checkpoint(tmp_path, 1, {"model": model.state_dict()})
    before = (tmp_path / "step_0000001" / "model.safetensors").read_bytes()
    real = ckpt.atomic_write_json

    def crash(path, obj):
        if Path(path).name == "state.json":
            raise OSError("disk full")
        return real(path, obj)

    monkeypatch.setattr(ckpt, "atomic_write_json", crash)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(tmp_path, 2, {"model": model.state_dict()})
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_0000001"], "a half-written checkpoint must not count"
    assert (tmp_path / "step_0000001" / "model.safetensors").read_bytes() == before


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_corrupt_checkpoint_is_refused_naming_the_file(tmp_path, damage):
    model, _ = _optimizer_state()
    path = save_checkpoint(tmp_path, 1, {"model": model.state_dict()})
    target = path / "model.safetensors"
    data = target.read_bytes()
    target.write_bytes(data[: len(data) // 2] if damage == "truncate" else b"\x00" * len(data))
    with pytest.raises(ValueError, match="model.safetensors"):
        load_checkpoint(path)


def test_corrupt_state_json_is_refused_naming_the_file(tmp_path):
    model, _ = _optimizer_state()
    path = save_checkpoint(tmp_path, 1, {"model": model.state_dict()})
    (path / "state.json").write_text("{not json")
    with pytest.raises(ValueError, match="state.json"):
        load_checkpoint(path)


KILLED_RUN = textwrap.dedent(
    """
    import json, os, signal, sys
    from pathlib import Path
    import llm4gen_lite.checkpoint as C
    from llm4gen_lite.config import load_config
    from llm4gen_lite.train import train

    kill_step = int(sys.argv[2])
    real = C.atomic_write_json

    def dying(path, obj):  # SIGKILL in the middle of writing checkpoint `kill_step`, after its tensors
        if Path(path).name == "state.json" and Path(path).parent.name == f".tmp-step_{kill_step:07d}":
            os.kill(os.getpid(), signal.SIGKILL)
        return real(path, obj)

    C.atomic_write_json = dying
    train(load_config("smoke", json.loads(sys.argv[1])))
    """
)


def test_resume_after_sigkill_matches_a_straight_run(tiny_clip_text_dir, tiny_llama_dir, isolated_cache, tmp_path):
    """2k steps straight == k steps, SIGKILL (mid-checkpoint), resume from 'latest', k more steps."""
    k = 3
    common = {"steps": 2 * k, "checkpoint_every": k, "keep_last": 3, "grad_accum": 2, "validation_max_prompts": 0}
    straight = tiny_config(tmp_path / "straight", tiny_clip_text_dir, tiny_llama_dir, **common)
    train(straight)

    killed = tiny_config(tmp_path / "killed", tiny_clip_text_dir, tiny_llama_dir, **common)
    script = tmp_path / "killed_run.py"
    script.write_text(KILLED_RUN)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(script), json.dumps(killed.to_dict()), str(2 * k)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == -9, f"the run should have been SIGKILLed: {proc.returncode}\n{proc.stderr[-2000:]}"
    ckpts = tmp_path / "killed" / "checkpoints"
    assert [p.name for p in list_checkpoints(ckpts)] == [f"step_{k:07d}"], "only the complete checkpoint counts"
    assert (ckpts / f".tmp-step_{2 * k:07d}").is_dir(), "the kill hit the second checkpoint mid-write"

    train(killed.replace(resume_from="latest"))
    for part in ("model", "ema", "optimizer"):
        a = load_safetensors(tmp_path / "straight" / "checkpoints" / f"step_{2 * k:07d}" / f"{part}.safetensors")
        b = load_safetensors(ckpts / f"step_{2 * k:07d}" / f"{part}.safetensors")
        assert a.keys() == b.keys()
        assert all(torch.equal(a[name], b[name]) for name in a), f"{part} differs after resume"
    metrics = [json.loads(line) for line in (tmp_path / "killed" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in metrics if r["kind"] == "train"] == list(range(1, 2 * k + 1))
    assert not (ckpts / f".tmp-step_{2 * k:07d}").exists()
