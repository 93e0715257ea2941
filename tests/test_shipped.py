"""The shipped checkpoints: small fp16 safetensors pipelines that reproduce docs/RESULTS.md.

`scripts/reproduce.py --ship` evaluates each run in fp32 and then ships it in fp16; here the
shipped pipeline re-scores one set with the recorded settings and must land within noise of the
recorded number (fp16 rounding of the weights moves a few of the 64 images), and the results
document must show the recorded numbers.
"""
from __future__ import annotations

import re

import pytest
import torch

from llm4gen_lite import report
from llm4gen_lite.io import read_json
from llm4gen_lite.paths import REPO_ROOT
from llm4gen_lite.pipeline import LLM4GenPipeline
from llm4gen_lite.pretrained import shipped_pipeline_dir

VARIANTS = ("clip", "cam")
RESULTS = REPO_ROOT / "docs" / "RESULTS.md"
TOLERANCE = 8.0  # points of a 0–100 score over 64 prompts: a few images changing their verdict


def evaluation(variant: str) -> dict:
    return read_json(shipped_pipeline_dir(variant).parent / "evaluation.json")


def test_shipped_checkpoints_are_fp16_safetensors_within_30_mb():
    files = [f for v in VARIANTS for f in shipped_pipeline_dir(v).rglob("*") if f.is_file()]
    weights = [f for f in files if f.suffix == ".safetensors"]
    assert weights and not [f for f in files if f.suffix in (".bin", ".pt", ".pkl", ".ckpt")]
    assert sum(f.stat().st_size for f in files) < 30e6
    for variant in VARIANTS:
        unet = shipped_pipeline_dir(variant) / "unet" / "diffusion_pytorch_model.safetensors"
        with open(unet, "rb") as fh:
            header = fh.read(4096)
        assert b'"F16"' in header and b'"F32"' not in header, f"{unet} is not fp16"


@pytest.mark.parametrize("variant", VARIANTS)
def test_results_document_shows_the_recorded_numbers(variant):
    text = RESULTS.read_text()
    row = re.search(rf"^\| {variant} \|(.+)$", text, flags=re.M)
    assert row, f"no `{variant}` row in {RESULTS}"
    cells = [c.strip() for c in row.group(1).split("|") if c.strip()]
    recorded = report.headline(evaluation(variant))
    for value in (recorded["color"], recorded["test_comp"]):
        assert f"{value:.1f}" in cells, f"{variant}: {value:.1f} not in {RESULTS} ({cells})"


@pytest.mark.parametrize("variant", VARIANTS)
def test_shipped_pipeline_recomputes_its_colour_score(variant):
    recorded = evaluation(variant)
    settings = recorded["settings"]
    pipe = LLM4GenPipeline.from_pretrained(shipped_pipeline_dir(variant), torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    again = report.evaluate_pipeline(pipe, sets=("color",), max_prompts=settings["max_prompts"],
                                     steps=settings["steps"], guidance_scale=settings["guidance_scale"],
                                     seed=settings["seed"], fid_samples=0)
    was, now = recorded["sets"]["color"]["scores"]["color"], again["sets"]["color"]["scores"]["color"]
    assert abs(now - was) <= TOLERANCE, f"{variant}: colour score {now:.1f} now vs {was:.1f} recorded"
