"""Every notebook runs top to bottom on its own, in smoke mode, under papermill.

Each notebook gets a fresh, empty `out_dir`: a notebook whose inputs are missing must make them
(or use the shipped checkpoints), never rely on an earlier notebook or kernel.
"""
from __future__ import annotations

import pytest

from llm4gen_lite.walkthrough import execute_notebook, list_notebooks, write_report


@pytest.mark.parametrize("path", list_notebooks(), ids=lambda p: p.stem)
def test_notebook_runs_in_smoke_mode(path, tmp_path):
    run = execute_notebook(path, tmp_path, smoke=True, seed=0, device="cpu", timeout_s=600)
    assert run.error is None, f"{path.name} failed: {run.error} (executed copy: {run.output})"
    report = write_report([run], tmp_path, smoke=True)
    assert path.name in report.read_text()
