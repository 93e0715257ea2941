"""Every notebook runs top to bottom under papermill in smoke mode.

The walkthrough runs in order into one `out_dir`, as the main job does (later notebooks reuse the
pipelines notebook 05 trained there). A notebook must also run on its own: the sampling notebook
is executed once more into an empty `out_dir`, where it has to make its own inputs.
"""
from __future__ import annotations

from llm4gen_lite.walkthrough import execute_notebook, list_notebooks, run_walkthrough


def test_walkthrough_runs_in_smoke_mode(tmp_path):
    runs = run_walkthrough(tmp_path, smoke=True, seed=0, device="cpu")
    failed = {r.name: r.error for r in runs if r.error is not None}
    assert not failed, f"notebooks failed: {failed} (executed copies in {tmp_path / 'notebooks'})"
    assert [r.name for r in runs] == [p.name for p in list_notebooks()]
    report = (tmp_path / "REPORT.md").read_text()
    assert all(r.name in report for r in runs)


def test_a_notebook_makes_its_own_inputs(tmp_path):
    (path,) = list_notebooks("06_*.ipynb")
    run = execute_notebook(path, tmp_path, smoke=True, seed=0, device="cpu", timeout_s=900)
    assert run.error is None, f"{path.name} failed on an empty out_dir: {run.error}"
    assert (tmp_path / "train" / "cam" / "pipeline" / "model_index.json").is_file()
