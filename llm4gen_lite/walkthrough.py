"""Execute the notebook walkthrough with papermill and write a short report linking the results.

`run_walkthrough(out_dir)` runs every `notebooks/NN_*.ipynb` in order, each on its own kernel
(state passes between notebooks only through files in `out_dir`), and writes `REPORT.md` that
links each executed notebook and the figures it saved under `out_dir/figures/`.
"""
from __future__ import annotations

import functools
import os
import sys
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


@functools.lru_cache(maxsize=None)
def ensure_kernel(kernel_name: str = KERNEL_NAME) -> Path:
    """Register this interpreter as Jupyter kernel `kernel_name` inside its own environment.

    The spec goes to `<sys.prefix>/share/jupyter/kernels/` (what `ipykernel install --sys-prefix`
    writes), and that folder is put first on `JUPYTER_PATH`, so papermill runs the notebooks on
    this checkout's environment even when a user-level kernel of the same name (say, from another
    clone) points elsewhere. Returns the kernel's folder.
    """
    from ipykernel.kernelspec import install

    data_dir = Path(sys.prefix) / "share" / "jupyter"
    folder = Path(install(kernel_name=kernel_name, display_name=f"Python ({kernel_name})", prefix=sys.prefix))
    paths = [str(data_dir), *[p for p in os.environ.get("JUPYTER_PATH", "").split(os.pathsep) if p]]
    os.environ["JUPYTER_PATH"] = os.pathsep.join(dict.fromkeys(paths))
    return folder


def execute_notebook(
    path: Path, out_dir: Path, smoke: bool, seed: int = 0, device: str = "auto",
    kernel_name: str = KERNEL_NAME, timeout_s: int = 1800,
) -> NotebookRun:
    """Run one notebook with papermill, parameters injected; never raises on a cell failure."""
    import papermill

    ensure_kernel(kernel_name)
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
    ensure_kernel(kernel_name)
    out_dir = Path(out_dir)
    runs = []
    for path in list_notebooks(pattern):
        run = execute_notebook(path, out_dir, smoke, seed, device, kernel_name)
        print(f"{run.name}: {'ok' if run.error is None else 'FAILED ' + run.error} ({run.seconds:.0f} s)", flush=True)
        runs.append(run)
    write_report(runs, out_dir, smoke)
    return runs
