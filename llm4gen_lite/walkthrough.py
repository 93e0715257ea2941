"""Execute the notebook walkthrough with papermill and write a short report linking the results.

`run_walkthrough(out_dir)` runs every `notebooks/NN_*.ipynb` in order, each on its own kernel
(state passes between notebooks only through files in `out_dir`), and writes `REPORT.md` that
links each executed notebook and the figures it saved under `out_dir/figures/`.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from .io import atomic_write_bytes
from .paths import REPO_ROOT

KERNEL_NAME = "llm4gen-lite"
NOTEBOOK_DIR = REPO_ROOT / "notebooks"


@dataclass
class NotebookRun:
    name: str  # notebook file name, e.g. "00_tour.ipynb"
    output: Path  # the executed copy
    seconds: float  # wall time of the execution
    error: str | None  # first line of the failure, None when it ran to the end


def list_notebooks(pattern: str = "[0-9][0-9]_*.ipynb") -> list[Path]:
    """The walkthrough's notebooks in order."""
    found = sorted(NOTEBOOK_DIR.glob(pattern))
    if not found:
        raise FileNotFoundError(f"no notebooks match {pattern!r} in {NOTEBOOK_DIR}")
    return found


def _check_kernel(kernel_name: str) -> None:
    from jupyter_client.kernelspec import KernelSpecManager

    if kernel_name not in KernelSpecManager().find_kernel_specs():
        raise RuntimeError(
            f"Jupyter kernel {kernel_name!r} is not registered; run `make setup` "
            f"(or `python -m ipykernel install --user --name {kernel_name}`)"
        )


def execute_notebook(
    path: Path, out_dir: Path, smoke: bool, seed: int = 0, device: str = "auto",
    kernel_name: str = KERNEL_NAME, timeout_s: int = 1800,
) -> NotebookRun:
    """Run one notebook with papermill, parameters injected; never raises on a cell failure."""
    import papermill

    out_dir = Path(out_dir).resolve()
    executed = out_dir / "notebooks" / path.name
    executed.parent.mkdir(parents=True, exist_ok=True)
    params = {"SMOKE": smoke, "seed": seed, "device": device, "out_dir": str(out_dir)}
    start = time.perf_counter()
    error = None
    try:
        papermill.execute_notebook(
            str(path), str(executed), parameters=params, kernel_name=kernel_name,
            cwd=str(path.parent), progress_bar=False, execution_timeout=timeout_s,
        )
    except papermill.PapermillExecutionError as err:
        error = f"{err.ename}: {err.evalue}".splitlines()[0]
    return NotebookRun(path.name, executed, time.perf_counter() - start, error)


def write_report(runs: list[NotebookRun], out_dir: Path, smoke: bool) -> Path:
    """`out_dir/REPORT.md`: one row per notebook (status, time, link) and every saved figure."""
    out_dir = Path(out_dir).resolve()
    lines = [
        "# llm4gen_lite walkthrough report", "",
        f"Mode: {'smoke (tiny settings, numbers not meaningful)' if smoke else 'full (shipped checkpoints)'}.",
        "", "| notebook | status | seconds |", "|---|---|---|",
    ]
    for run in runs:
        status = "ok" if run.error is None else f"FAILED: {run.error}"
        lines.append(f"| [{run.name}]({run.output.relative_to(out_dir)}) | {status} | {run.seconds:.0f} |")
    figures = sorted((out_dir / "figures").glob("*.png"))
    if figures:
        lines += ["", "## Figures", ""]
        lines += [f"### {fig.stem}\n\n![{fig.stem}]({fig.relative_to(out_dir)})\n" for fig in figures]
    report = out_dir / "REPORT.md"
    atomic_write_bytes(report, ("\n".join(lines) + "\n").encode())
    return report


def run_walkthrough(
    out_dir: str | Path, smoke: bool = False, seed: int = 0, device: str = "auto",
    pattern: str = "[0-9][0-9]_*.ipynb", kernel_name: str = KERNEL_NAME,
) -> list[NotebookRun]:
    """Execute every notebook in order into `out_dir`, then write the report. Returns the runs."""
    _check_kernel(kernel_name)
    out_dir = Path(out_dir)
    runs = []
    for path in list_notebooks(pattern):
        run = execute_notebook(path, out_dir, smoke, seed, device, kernel_name)
        print(f"{run.name}: {'ok' if run.error is None else 'FAILED ' + run.error} ({run.seconds:.0f} s)", flush=True)
        runs.append(run)
    write_report(runs, out_dir, smoke)
    return runs
