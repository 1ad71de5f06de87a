"""Benchmark: programs/s of the sandboxed `PythonExecutor` pool vs plain in-process `exec`, same run.

The mix looks like what MCTS executes: cumulative step programs of short arithmetic (most of them), some using
fractions/math, some sympy. Every program is distinct (different constants), and the executor's cache is off,
so the pool really runs every program.

    .venv/bin/python bench/executor.py [--programs 2000] [--workers N]

Last line: one JSON object with "ratio" = sandboxed_per_s / inprocess_per_s.
"""

import argparse
import contextlib
import io
import json
import os
import random
import time

from rstar_trl import PythonExecutor


def _arithmetic(rng: random.Random) -> str:
    a, b, c, d = (rng.randint(2, 999) for _ in range(4))
    steps = [f"# Step 1: start with {a} items\nitems = {a}", f"# Step 2: buy {b} more\nitems += {b}",
             f"# Step 3: {c} boxes of {d}\nitems += {c} * {d}", f"# Step 4: share between {d % 7 + 2}\n"
             f"items = items // {d % 7 + 2}"]  # fmt: skip
    return "\n".join(steps[: rng.randint(1, 4)] + ["print(items)"]) + "\n"


def _fractions_math(rng: random.Random) -> str:
    a, b, c = (rng.randint(2, 99) for _ in range(3))
    return (
        "from fractions import Fraction\nimport math\n"
        f"share = Fraction({a}, {b}) + Fraction(1, {c})\n"
        f"area = math.pi * {c} ** 2\nprint(share, round(area, 4), math.gcd({a}, {b}), math.comb({a % 20 + 5}, 3))\n"
    )


def _sympy(rng: random.Random) -> str:
    a, b = rng.randint(1, 9), rng.randint(1, 20)
    return (
        "from sympy import symbols, solve, Rational, simplify\n"
        f"x = symbols('x')\nroots = solve(x**2 - {a + b}*x + {a * b}, x)\n"
        f"print(sorted(roots), simplify(Rational({b}, {a}) + Rational(1, 3)))\n"
    )


def make_programs(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    kinds = [_arithmetic] * 14 + [_fractions_math] * 3 + [_sympy] * 3  # 70% / 15% / 15%
    return [rng.choice(kinds)(rng) for _ in range(n)]


def run_inprocess(programs: list[str]) -> float:
    start = time.perf_counter()
    for code in programs:
        with contextlib.redirect_stdout(io.StringIO()):
            exec(compile(code, "<program>", "exec"), {"__name__": "__main__"})
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--programs", type=int, default=2000, help="number of distinct programs in the mix")
    parser.add_argument("--workers", type=int, default=os.cpu_count(), help="sandbox worker processes")
    parser.add_argument("--batch", type=int, default=256, help="programs per run_batch call (one MCTS wave)")
    args = parser.parse_args()

    programs = make_programs(args.programs)
    warm = make_programs(50, seed=1)
    run_inprocess(warm)  # import sympy etc. once, as the pool workers do at start-up

    start = time.perf_counter()
    with PythonExecutor(max_workers=args.workers, cache_size=0) as executor:
        startup_s = time.perf_counter() - start
        executor.run_batch(warm)
        sandbox_s = 0.0
        for i in range(0, len(programs), args.batch):
            t0 = time.perf_counter()
            results = executor.run_batch(programs[i : i + args.batch])
            sandbox_s += time.perf_counter() - t0
            assert all(r.ok for r in results), [r.error for r in results if not r.ok][:3]
        single_s = time.perf_counter()
        for code in programs[:200]:
            executor.run(code)
        single_s = (time.perf_counter() - single_s) / 200
        isolation = executor.isolation["namespaces"]
    inprocess_s = run_inprocess(programs)

    sandboxed_per_s = len(programs) / sandbox_s
    inprocess_per_s = len(programs) / inprocess_s
    print(f"in-process exec : {inprocess_per_s:9.0f} programs/s ({1e3 * inprocess_s / len(programs):.3f} ms each)")
    print(f"sandboxed pool  : {sandboxed_per_s:9.0f} programs/s with {args.workers} workers, batches of {args.batch}")
    print(f"one-at-a-time   : {1e3 * single_s:.3f} ms per program through the pool (latency incl. IPC)")
    print(f"pool start-up   : {startup_s:.2f} s (namespaces: {isolation})")
    print(
        json.dumps(
            {
                "ratio": round(sandboxed_per_s / inprocess_per_s, 3),
                "sandboxed_per_s": round(sandboxed_per_s, 1),
                "inprocess_per_s": round(inprocess_per_s, 1),
                "single_call_ms": round(1e3 * single_s, 3),
                "workers": args.workers,
                "programs": len(programs),
                "startup_s": round(startup_s, 2),
            }
        )
    )


if __name__ == "__main__":
    main()
