"""The training loop: overfitting, runs end to end, multi-process sharding, non-finite loss, λ_e = 0.

Runs use the tiny UNet and the tiny random encoders of conftest.py (a CLIP text model and a Llama),
so every `train()` call takes seconds.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from diffusers import UNet2DConditionModel

from llm4gen_lite import train as train_module
from llm4gen_lite.checkpoint import list_checkpoints, load_checkpoint
from llm4gen_lite.config import TrainConfig, load_config
from llm4gen_lite.losses import diffusion_loss, diffusion_target
from llm4gen_lite.train import Denoiser, NonFiniteLossError, build_unet, shard_indices, train

REPO = Path(__file__).resolve().parents[1]


def tiny_config(out: Path, clip_dir: Path, llm_dir: Path, **changes) -> TrainConfig:
    """The smoke preset on the tiny test encoders at 16 px, one CPU thread, no validation unless asked."""
    base = {
        "output_dir": str(out), "clip_encoder": str(clip_dir), "llm_encoder": str(llm_dir), "cpu_threads": 1,
        "validation_max_prompts": 0, "resolution": 16,
    }
    return load_config("smoke", {**base, **changes})


def test_overfitting_one_batch_drives_the_loss_down(tiny_clip_text_dir, tiny_llama_dir):
    """The loop's model and loss on one fixed batch (images, noise, timesteps): loss falls >= 5x."""
    from llm4gen_lite.adapter import build_adapter
    from llm4gen_lite.encoders import load_encoder

    config = TrainConfig(unet="tiny", variant="cam", resolution=16)
    torch.manual_seed(0)
    clip, llm = load_encoder(tiny_clip_text_dir, role="clip"), load_encoder(tiny_llama_dir, role="llm")
    prompts = ["a red circle", "a blue square", "a small green triangle", "a large white diamond"]
    cf, lf = clip.encode(prompts), llm.encode(prompts)
    unet, _ = build_unet(config)
    model = Denoiser(unet, build_adapter("cam", clip.dim, llm.dim, unet.config.cross_attention_dim, num_heads=4))
    from diffusers import DDPMScheduler

    from llm4gen_lite.train import noise_scheduler_config

    sched = DDPMScheduler(**noise_scheduler_config(config))
    x0 = torch.rand(4, 3, 16, 16) * 2 - 1
    noise, t = torch.randn_like(x0), torch.tensor([50, 300, 600, 900])
    a_t = sched.alphas_cumprod[t]
    noisy = sched.add_noise(x0, noise, t)
    target = diffusion_target(x0, noise, a_t, "v_prediction")
    opt = torch.optim.AdamW(model.parameters(), lr=5e-3)
    losses = []
    for _ in range(40):
        pred = model(noisy, t, cf.features, cf.mask, lf.features, lf.mask, torch.zeros(4, dtype=torch.bool))
        loss = diffusion_loss(pred, target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] / 5, f"loss only went from {losses[0]:.3f} to {losses[-1]:.3f}"


def test_shard_indices_split_each_global_batch_without_overlap():
    for micro in range(7):  # 12 items = 2 global batches of 2 ranks x 3: no batch straddles an epoch
        shards = [shard_indices(micro, 3, r, 2, 12, seed=5) for r in range(2)]
        assert not set(shards[0]) & set(shards[1])
        assert shard_indices(micro, 6, 0, 1, 12, seed=5)[0::2] == shards[0]
    epoch = [i for m in range(5) for i in shard_indices(m, 2, 0, 1, 10, seed=5)]
    assert sorted(epoch) == list(range(10)), "one epoch visits every item once"


def test_smoke_run_end_to_end_with_entity_loss(tiny_clip_text_dir, tiny_llama_dir, isolated_cache, tmp_path, monkeypatch):
    calls = []
    real_capture = train_module.capture_cross_attention

    def counting_capture(*args, **kwargs):
        calls.append(args)
        return real_capture(*args, **kwargs)

    monkeypatch.setattr(train_module, "capture_cross_attention", counting_capture)
    config = tiny_config(tmp_path / "run", tiny_clip_text_dir, tiny_llama_dir, validation_max_prompts=4)
    pipeline_dir = train(config)
    assert calls, "entity_weight > 0 must capture cross-attention"
    run = tmp_path / "run"
    assert (pipeline_dir / "model_index.json").is_file() and (pipeline_dir / "adapter").is_dir()
    assert json.loads((run / "config.json").read_text()) == config.to_dict()
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train_records = [r for r in records if r["kind"] == "train"]
    assert [r["step"] for r in train_records] == [1, 2, 3, 4]
    assert all(r["entity_loss"] > 0 for r in train_records), "the entity term is logged separately"
    assert any(r["kind"] == "validation" and "score/single" in r for r in records)
    assert (run / "loss_curve.png").is_file() and list((run / "samples").glob("*.png"))
    assert [p.name for p in list_checkpoints(run / "checkpoints")] == ["step_0000002", "step_0000004"]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["setup_seconds"] > 0 and summary["wall_seconds"] >= summary["train_seconds"] > 0


def test_zero_entity_weight_installs_no_capture(tiny_clip_text_dir, tiny_llama_dir, isolated_cache, tmp_path, monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("capture_cross_attention must not be used when entity_weight = 0")

    monkeypatch.setattr(train_module, "capture_cross_attention", forbidden)
    config = tiny_config(tmp_path / "run", tiny_clip_text_dir, tiny_llama_dir, entity_weight=0.0, steps=2,
                         variant="clip", checkpoint_every=0)
    train(config)
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert all(r["entity_loss"] == 0 for r in records if r["kind"] == "train")


def test_non_finite_loss_stops_and_keeps_the_last_checkpoint(tiny_clip_text_dir, tiny_llama_dir, isolated_cache, tmp_path, monkeypatch):
    calls = {"n": 0}

    def exploding(pred, *args, **kwargs):
        calls["n"] += 1
        loss = diffusion_loss(pred, *args, **kwargs)
        return loss * float("nan") if calls["n"] == 3 else loss

    monkeypatch.setattr(train_module, "diffusion_loss", exploding)
    config = tiny_config(tmp_path / "run", tiny_clip_text_dir, tiny_llama_dir, checkpoint_every=2, steps=4)
    with pytest.raises(NonFiniteLossError, match=r"step 2.*step_0000002"):
        train(config)
    kept = list_checkpoints(tmp_path / "run" / "checkpoints")
    assert [p.name for p in kept] == ["step_0000002"]
    parts, _ = load_checkpoint(kept[0])
    assert all(torch.isfinite(t).all() for t in parts["model"].values())
    assert not (tmp_path / "run" / "pipeline").exists()


TORCHRUN_SCRIPT = textwrap.dedent(
    """
    import hashlib, json, os, sys
    import llm4gen_lite.train as T
    from llm4gen_lite.config import load_config

    out = sys.argv[1]
    seen, digests = [], {}
    real_shard, real_save = T.shard_indices, T.save_checkpoint

    def recording_shard(micro_step, batch_size, rank, world_size, dataset_size, seed):
        idx = real_shard(micro_step, batch_size, rank, world_size, dataset_size, seed)
        seen.append({"micro_step": micro_step, "rank": rank, "world": world_size, "indices": idx})
        return idx

    def recording_save(root, step, parts, **kwargs):
        h = hashlib.sha256()
        for name in sorted(parts["model"]):
            h.update(parts["model"][name].detach().float().numpy().tobytes())
        digests[step] = h.hexdigest()
        return real_save(root, step, parts, **kwargs)

    T.shard_indices, T.save_checkpoint = recording_shard, recording_save
    config = load_config("smoke", json.loads(sys.argv[2]))
    from accelerate import PartialState
    T.train(config)
    state = PartialState()
    with open(os.path.join(out, f"rank{state.process_index}.json"), "w") as fh:
        json.dump({"type": str(state.distributed_type), "seen": seen, "digests": digests}, fh)
    """
)


def test_two_process_torchrun_shards_data_and_agrees_on_weights(tiny_clip_text_dir, tiny_llama_dir, isolated_cache, tmp_path):
    script = tmp_path / "run_train.py"
    script.write_text(TORCHRUN_SCRIPT)
    overrides = {
        "output_dir": str(tmp_path / "run"), "clip_encoder": str(tiny_clip_text_dir), "llm_encoder": str(tiny_llama_dir),
        "cpu_threads": 1, "validation_max_prompts": 0, "steps": 2, "batch_size": 2, "checkpoint_every": 0,
        "resolution": 16,
    }
    torchrun = Path(sys.executable).parent / "torchrun"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [str(torchrun), "--standalone", "--nproc_per_node", "2", str(script), str(tmp_path), json.dumps(overrides)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert all("MULTI_CPU" in r["type"] for r in ranks)
    for micro in range(2):
        a, b = (next(s for s in r["seen"] if s["micro_step"] == micro) for r in ranks)
        assert a["world"] == b["world"] == 2 and {a["rank"], b["rank"]} == {0, 1}
        assert not set(a["indices"]) & set(b["indices"]), "ranks must see different items"
    assert ranks[0]["digests"] == ranks[1]["digests"] and ranks[0]["digests"], "ranks disagree on the final weights"
    assert (tmp_path / "run" / "pipeline" / "model_index.json").is_file()


def test_init_unet_starts_from_a_saved_unet_and_refuses_another_architecture(tmp_path):
    shipped = REPO / "data" / "checkpoints" / "clip" / "pipeline"
    unet, _ = build_unet(load_config("full", {"variant": "cam", "init_unet": str(shipped)}))
    saved = UNet2DConditionModel.from_pretrained(shipped / "unet", local_files_only=True, dtype=torch.float32)
    assert all(torch.equal(a, b) for a, b in zip(unet.state_dict().values(), saved.state_dict().values()))
    fresh, _ = build_unet(load_config("full", {"variant": "cam"}))
    assert not torch.equal(next(iter(fresh.state_dict().values())), next(iter(saved.state_dict().values())))
    with pytest.raises(ValueError, match="init_unet=.*not the one this config builds"):
        build_unet(load_config("smoke", {"init_unet": str(shipped)}))
    with pytest.raises(ValueError, match="init_unet=.*no saved UNet there"):
        build_unet(load_config("smoke", {"init_unet": str(tmp_path)}))
