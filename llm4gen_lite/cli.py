"""Command line: `python -m llm4gen_lite {notebooks,...} --help`."""
from __future__ import annotations

import argparse
import sys


def _cmd_notebooks(args: argparse.Namespace) -> int:
    from .walkthrough import run_walkthrough

    runs = run_walkthrough(args.out, smoke=args.smoke, seed=args.seed, device=args.device, pattern=args.pattern)
    failed = [r.name for r in runs if r.error is not None]
    print(f"report: {args.out}/REPORT.md")
    if failed:
        print(f"failed notebooks: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m llm4gen_lite", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    nb = sub.add_parser("notebooks", help="execute the notebook walkthrough with papermill and write a report")
    nb.add_argument("--out", default="outputs/main", help="output folder (executed notebooks, figures, REPORT.md)")
    nb.add_argument("--smoke", action="store_true", help="tiny settings, for tests (numbers not meaningful)")
    nb.add_argument("--seed", type=int, default=0, help="seed passed to every notebook")
    nb.add_argument("--device", default="auto", help="'auto', 'cpu' or 'cuda'")
    nb.add_argument("--pattern", default="[0-9][0-9]_*.ipynb", help="glob of notebooks to run")
    nb.set_defaults(func=_cmd_notebooks)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)
