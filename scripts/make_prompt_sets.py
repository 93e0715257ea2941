#!/usr/bin/env python
"""Regenerate the committed CompBench-lite / DensePrompts-lite prompt sets in data/prompts/.

    python scripts/make_prompt_sets.py            # write every set (byte-identical to the repo)
    python scripts/make_prompt_sets.py --check    # exit 1 if a committed file differs
    python scripts/make_prompt_sets.py --out DIR --seed 7 --sets color spatial

The output is a pure function of the seed (numpy Generator streams, integer rasterisation), so
the same command gives the same bytes on any machine.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from llm4gen_lite.shapes.prompts import (  # noqa: E402
    DEFAULT_SEED, PROMPT_SETS, prompt_set_text, prompts_dir, write_prompt_sets,
)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=None, help="output folder (default: data/prompts)")
    ap.add_argument("--seed", type=int, default=DEFAULT_SEED, help=f"base seed (default {DEFAULT_SEED})")
    ap.add_argument("--sets", nargs="+", default=list(PROMPT_SETS), choices=PROMPT_SETS,
                    metavar="NAME", help=f"sets to write (default: all of {', '.join(PROMPT_SETS)})")
    ap.add_argument("--check", action="store_true", help="compare with the files instead of writing")
    args = ap.parse_args(argv)
    out = args.out if args.out is not None else prompts_dir()
    if args.check:
        bad = [n for n in args.sets
               if not (out / f"{n}.jsonl").is_file()
               or (out / f"{n}.jsonl").read_text(encoding="utf-8") != prompt_set_text(n, args.seed)]
        for n in bad:
            print(f"differs or missing: {out / (n + '.jsonl')}", file=sys.stderr)
        print(f"{len(args.sets) - len(bad)} identical, {len(bad)} differ")
        return 1 if bad else 0
    paths = write_prompt_sets(out, args.seed, args.sets)
    total = 0
    for p in paths:
        n = sum(1 for _ in p.open(encoding="utf-8"))
        total += p.stat().st_size
        print(f"{p}  {n} prompts  {p.stat().st_size / 1024:.0f} KiB")
    print(f"total {total / 1024:.0f} KiB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
