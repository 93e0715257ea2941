"""The full-reproduction script runs end to end at smoke size and writes its results document."""
from __future__ import annotations

import sys

from llm4gen_lite.paths import REPO_ROOT


def test_reproduce_smoke(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(REPO_ROOT / "scripts"))
    import reproduce

    results = tmp_path / "RESULTS.md"
    assert reproduce.main(["--smoke", "--only", "clip", "cam", "--out", str(tmp_path / "runs"),
                           "--results", str(results)]) == 0
    text = results.read_text()
    assert "| clip |" in text and "| cam |" in text and "Δ cam − clip (ours)" in text
    assert (tmp_path / "figures" / "sample_efficiency.png").is_file()
    assert (tmp_path / "runs" / "cam" / "evaluation.json").is_file()
    sys.modules.pop("reproduce", None)
