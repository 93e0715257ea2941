"""The project's packaging stays coherent: pyproject and environment.yml agree, CI runs the
README's test command, and notebooks are committed clean."""
from __future__ import annotations

import json
import re
import tomllib
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def _norm(req: str) -> str:
    return re.sub(r"\s+", "", req).lower()


def test_environment_yml_matches_pyproject():
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    pip_block = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict) and "pip" in d)
    assert sorted(map(_norm, deps)) == sorted(map(_norm, pip_block)), (
        "environment.yml's pip list and pyproject.toml's dependencies disagree"
    )


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    quick = readme.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    commands = re.findall(r"^(make \w+)\s*(?:#.*)?$", quick, flags=re.M)
    assert len(commands) == 2, f"the quick start must show exactly two commands, found {commands}"
    ci = [ln.strip() for ln in (ROOT / ".ci/run").read_text().splitlines()
          if ln.strip() and not ln.startswith("#") and not ln.startswith(("set ", "cd "))]
    assert ci == [commands[1]], f".ci/run must call the README's test command {commands[1]!r} only"


def test_notebooks_committed_without_outputs_and_parameterised():
    notebooks = sorted((ROOT / "notebooks").glob("*.ipynb"))
    assert notebooks, "no notebooks found"
    for path in notebooks:
        nb = json.loads(path.read_text())
        code = [c for c in nb["cells"] if c["cell_type"] == "code"]
        assert all(not c.get("outputs") and c.get("execution_count") is None for c in code), (
            f"{path.name} has outputs committed; clear them"
        )
        tagged = [c for c in nb["cells"] if "parameters" in c.get("metadata", {}).get("tags", [])]
        assert len(tagged) == 1, f"{path.name} needs exactly one cell tagged 'parameters'"
        src = "".join(tagged[0]["source"])
        for name in ("SMOKE", "seed", "device", "out_dir"):
            assert re.search(rf"^{name}\s*=", src, flags=re.M), f"{path.name}: parameter {name} missing"
