"""Command-line tools of the PPM package.

    python -m rstar_trl.ppm tiny-processbench --output runs/data/tiny_processbench.jsonl --num 400 --split validation

`tiny-processbench`: a ProcessBench-layout JSONL file (problem, steps, label, ...) made of tiny problems with injected
wrong steps (`rstar_trl.ppm.quality.make_tiny_processbench`); evaluate a PPM on it with
`recipes/eval_ppm.py --processbench FILE`.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from .quality import make_tiny_processbench, write_jsonl


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m rstar_trl.ppm", description="Command-line tools of rstar_trl.ppm."
    )
    commands = parser.add_subparsers(dest="command", required=True)
    tiny = commands.add_parser(
        "tiny-processbench",
        help="Write a ProcessBench-layout JSONL file of tiny problems with injected wrong steps.",
        description="Write a ProcessBench-layout JSONL file from tiny problems with injected wrong steps "
        "(make_tiny_processbench); evaluate a PPM on it with recipes/eval_ppm.py --processbench FILE.",
    )
    tiny.add_argument("--output", required=True, help="The JSONL file to write.")
    tiny.add_argument("--num", type=int, default=400, help="Rows: the first NUM problems of the split.")
    tiny.add_argument("--split", default="validation", help="Tiny split: train, validation or test.")
    tiny.add_argument("--error_fraction", type=float, default=0.5, help="Share of rows with an injected error.")
    tiny.add_argument("--seed", type=int, default=0, help="Seed of which rows get an error, where and which.")
    args = parser.parse_args(argv)
    try:
        rows = make_tiny_processbench(args.num, args.split, args.error_fraction, args.seed)
    except ValueError as exc:
        tiny.error(str(exc))
    write_jsonl(rows, args.output)
    wrong = sum(row["label"] != -1 for row in rows)
    print(f"Wrote {len(rows)} rows ({wrong} with an injected error, {len(rows) - wrong} correct) to {args.output}")


if __name__ == "__main__":
    main()
