"""The command line: help, exit codes, and a smoke train -> sample -> evaluate round trip."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from llm4gen_lite.cli import main

from test_train import REPO

COMMANDS = ("notebooks", "cache-features", "train", "sample", "evaluate")


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_help(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "usage" in out
    if command != "notebooks":
        assert "--config" in out and "--set" in out


@pytest.mark.parametrize("argv, needle", [
    (["train", "--set", "stpes=3"], "did you mean 'steps'"),
    (["train", "--set", "steps=three"], "steps"),
    (["train", "--config", "no-such-preset"], "no-such-preset"),
    (["train", "--set", "steps"], "key=value"),
    (["sample", "--set", "output_dir=/nonexistent/run", "--prompt", "a red circle"], "no saved pipeline"),
    (["sample", "--set", "output_dir=/nonexistent/run"], "--prompt"),
])
def test_bad_arguments_exit_2_with_a_message(argv, needle, capsys):
    assert main(argv) == 2
    assert needle in capsys.readouterr().err


def test_unknown_command_and_bad_flag_values_exit_2():
    for argv in (["fly"], ["sample", "--per-prompt", "0", "--prompt", "x"]):
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        assert exit_info.value.code == 2


def test_exit_code_2_from_a_real_process():
    proc = subprocess.run([sys.executable, "-m", "llm4gen_lite", "train", "--set", "variant=t5"],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert "variant" in proc.stderr


def test_smoke_round_trip_train_sample_evaluate(tiny_clip_text_dir, tiny_llama_dir, isolated_cache, tmp_path, capsys):
    run = tmp_path / "run"
    sets = ["--set", f"output_dir={run}", "--set", f"clip_encoder={tiny_clip_text_dir}",
            "--set", f"llm_encoder={tiny_llama_dir}", "--set", "cpu_threads=1", "--set", "sample_steps=2", "--set", "resolution=16"]
    assert main(["cache-features", "--config", "smoke", *sets]) == 0
    assert "captions cached" in capsys.readouterr().out
    assert main(["train", "--config", "smoke", *sets]) == 0
    assert (run / "pipeline" / "model_index.json").is_file()

    grid = tmp_path / "grid.png"
    assert main(["sample", "--config", "smoke", *sets, "--prompt", "a red circle", "--prompt", "a blue square",
                 "--per-prompt", "2", "--out", str(grid)]) == 0
    assert grid.is_file() and grid.stat().st_size > 0

    out = tmp_path / "eval.json"
    assert main(["evaluate", "--config", "smoke", *sets, "--prompts", "single", "--max-prompts", "3",
                 "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["sets"]["single"]["n"] == 3
    assert 0.0 <= report["sets"]["single"]["scores"]["single"] <= 100.0
    assert "colour_acc" in report["sets"]["single"]["attributes"]


def test_runtime_failure_exits_1(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("LLM4GEN_DEBUG", raising=False)
    broken = tmp_path / "run" / "pipeline"
    broken.mkdir(parents=True)
    (broken / "model_index.json").write_text("{not json")
    assert main(["sample", "--set", f"output_dir={tmp_path / 'run'}", "--prompt", "a red circle"]) == 1
    assert "model_index.json" in capsys.readouterr().err
    assert os.environ.get("LLM4GEN_DEBUG") is None
