"""The full-reproduction script runs end to end at smoke size and writes its results document."""
from __future__ import annotations

import sys
from concurrent.futures import Future

import pytest
import torch

from llm4gen_lite.paths import REPO_ROOT


class InlinePool:
    """`ProcessPoolExecutor` stand-in that runs each row in this process when it is submitted."""

    def __init__(self, workers, mp_context=None):
        self.workers = workers

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def submit(self, fn, *args):
        future = Future()
        future.set_result(fn(*args))
        return future


def test_reproduce_smoke(tmp_path, monkeypatch, capsys):
    monkeypatch.syspath_prepend(str(REPO_ROOT / "scripts"))
    import reproduce

    events = []
    real_cache, real_run = reproduce.cache_features, reproduce.run_row
    monkeypatch.setattr(reproduce, "ProcessPoolExecutor", InlinePool)
    monkeypatch.setattr(reproduce, "cache_features", lambda config: events.append(("cache", config.variant)) or real_cache(config))
    monkeypatch.setattr(reproduce, "run_row", lambda name, *a: events.append(("run", name)) or real_run(name, *a))
    threads = torch.get_num_threads()
    results = tmp_path / "RESULTS.md"
    try:
        assert reproduce.main(["--smoke", "--only", "clip", "cam", "--jobs", "2", "--out", str(tmp_path / "runs"),
                               "--results", str(results)]) == 0
    finally:
        torch.set_num_threads(threads)
    assert events == [("cache", "clip"), ("cache", "cam"), ("run", "clip"), ("run", "cam")], \
        "side by side, the rows' feature caches are filled first, one writer at a time"
    text = results.read_text()
    assert "| clip |" in text and "| cam |" in text and "Δ cam − clip (ours)" in text
    targets = text[text.index("## Targets"):text.index("## Sample efficiency")]
    assert "dense prompts > 77 tokens" in targets and "FID not worse" in targets
    assert " to " in targets.split("test_comp")[1].split("\n")[0], "the Δ has its bootstrap interval"
    assert "| cam | " in targets.split("Every row against `clip`")[1], "each row's Δ with its interval"
    assert "| cam | " in text[text.index("inside and beyond CLIP's 77 tokens"):text.index("## Targets")]
    cost = text[text.index("## Cost"):]
    assert "| setup (min) |" in cost and "In all, " in cost, "each row's setup, training, evaluation and their sum"
    assert "The `clip` and `cam` rows took" in cost and "setup, training and evaluation" in cost
    assert (tmp_path / "results.json").is_file(), "the numbers beside the document, for notebook 08"
    assert (tmp_path / "figures" / "sample_efficiency.png").is_file()
    assert (tmp_path / "runs" / "cam" / "evaluation.json").is_file()

    def no_second_evaluation(*args, **kwargs):
        raise AssertionError("a finished run with a finished evaluation was scored again")

    monkeypatch.setattr(reproduce.report, "evaluate_pipeline", no_second_evaluation)
    before = (tmp_path / "results.json").read_text()
    events.clear()
    try:
        assert reproduce.main(["--smoke", "--only", "clip", "cam", "--jobs", "2", "--out", str(tmp_path / "runs"),
                               "--results", str(results)]) == 0
    finally:
        torch.set_num_threads(threads)
    assert events == [("run", "clip"), ("run", "cam")], "finished rows need no caching"
    assert (tmp_path / "results.json").read_text() == before, "the rerun reports the same numbers"

    with pytest.raises(SystemExit) as exit_:  # a changed preset never reuses or resumes the old runs
        reproduce.main(["--smoke", "--only", "clip", "cam", "--out", str(tmp_path / "runs"), "--set", "steps=7"])
    assert exit_.value.code == 2
    message = capsys.readouterr().err
    assert "runs/clip was trained with another config" in message and "steps: " in message and "--out" in message
    assert (tmp_path / "results.json").read_text() == before
    sys.modules.pop("reproduce", None)


def test_spread_rows_covers_the_file_and_keeps_swap_pairs_together():
    from llm4gen_lite.report import spread_rows
    from llm4gen_lite.shapes import load_prompt_set

    colour = load_prompt_set("color")
    picked = spread_rows(colour, 16)
    assert len(picked) == 16 and picked[0] is colour[0] and picked[-1] is not colour[15], "spread, not the head"
    pairs = spread_rows(load_prompt_set("attr_swap"), 16)
    ids = [r["pair_id"] for r in pairs]
    assert len(pairs) == 16 and all(ids.count(i) == 2 for i in ids)
    assert spread_rows(colour, None) is colour and spread_rows(colour[:3], 16) == colour[:3]


def test_scheduled_minutes_hands_each_row_to_the_first_free_worker(monkeypatch):
    monkeypatch.syspath_prepend(str(REPO_ROOT / "scripts"))
    import reproduce

    assert reproduce.scheduled_minutes([20, 29, 35, 23], 2) == 20 + 35  # 20|29, 35 after 20, 23 after 29
    assert reproduce.scheduled_minutes([20, 29, 35, 23], 1) == 107
    assert reproduce.scheduled_minutes([10, 10, 10], 4) == 10


def test_paired_delta_resamples_prompts_in_pairs():
    from llm4gen_lite.report import paired_delta

    def run(scores, recall=None):
        sets = {"test_comp": {"per_prompt": scores}}
        if recall is not None:
            sets["dense_long"] = {"dense": {"per_prompt_recall": recall}}
        return {"sets": sets}

    base = run([0.0, 0.5, 1.0, 0.25])
    assert paired_delta(base, base, "test_comp") == (0.0, 0.0, 0.0)
    assert paired_delta(base, run([0.1, 0.6, 1.1, 0.35]), "test_comp") == pytest.approx((10.0, 10.0, 10.0))
    delta, low, high = paired_delta(base, run([1.0, 0.5, 0.0, 0.25]), "test_comp")
    assert delta == 0.0 and low < 0.0 < high, "a difference of one prompt either way spreads both ways"
    assert paired_delta(base, base, "dense_recall") is None, "no per-prompt values, no interval"
    with pytest.raises(ValueError, match="same prompts"):
        paired_delta(base, run([0.0, 0.5]), "test_comp")


def test_reproduce_set_changes_every_row_and_refuses_what_rows_set(tmp_path, monkeypatch, capsys):
    monkeypatch.syspath_prepend(str(REPO_ROOT / "scripts"))
    import reproduce

    try:
        seen = []
        monkeypatch.setattr(reproduce, "run_row", lambda name, overrides, out, smoke, seed, threads, changes: seen.append(
            reproduce.row_config(name, overrides, out, smoke, seed, threads, changes)) or {})
        monkeypatch.setattr(reproduce, "write_results", lambda *a, **k: tmp_path / "RESULTS.md")
        monkeypatch.setattr(reproduce.report, "headline", lambda result: {})
        assert reproduce.main(["--smoke", "--only", "clip", "cam", "--out", str(tmp_path),
                               "--set", "timestep_sampling=logit_normal", "--set", "logit_mean=0.5"]) == 0
        assert [(c.variant, c.timestep_sampling, c.logit_mean) for c in seen] == [
            ("clip", "logit_normal", 0.5), ("cam", "logit_normal", 0.5)]
        for bad, message in ((["--set", "variant=llm"], "per row"), (["--set", "logit_mean=high"], "logit_mean"),
                             (["--set", "logit_man=1"], "logit_man")):
            try:
                reproduce.main(["--smoke", "--only", "clip", "--out", str(tmp_path), *bad])
            except SystemExit as exit_:
                assert exit_.code == 2
            else:
                raise AssertionError(f"{bad} was accepted")
            assert message in capsys.readouterr().err
    finally:
        sys.modules.pop("reproduce", None)
