"""Benchmark: programs/s of the sandboxed `PythonExecutor` pool vs plain in-process `exec`, same run.

The mix looks like what MCTS executes: cumulative step programs of short arithmetic (most of them), some using
fractions/math, some sympy. Every program is distinct (different constants), and the executor's cache is off,
so the pool really runs every program.

    .venv/bin/python bench/executor.py [--programs 2000] [--max_workers N]

The headline compares like with like: a pool of ONE worker (one CPU running programs, plus the IPC to it) against
one thread of in-process `exec` over the same programs, so the ratio is what the sandbox costs per program, not
how many cores the machine has. How the pool scales is reported apart: programs/s with 1, 2, ... --max_workers
workers (default: the machine's CPU count), each as a ratio to the 1-worker pool.

Last line: one JSON object with "ratio" = sandboxed_per_s (1 worker) / inprocess_per_s and "scaling".
"""

import argparse
import contextlib
import io
import json
import os
import random
import time

from _common import cpu_extensions, print_cpu

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


def run_pool(programs: list[str], warm: list[str], workers: int, batch: int, latency_calls: int = 0) -> dict:
    """Seconds the pool takes to run `programs` in waves of `batch` (start-up and warm-up not counted)."""
    start = time.perf_counter()
    with PythonExecutor(max_workers=workers, cache_size=0) as executor:
        figures = {"startup_s": time.perf_counter() - start, "isolation": executor.isolation["namespaces"]}
        executor.run_batch(warm)
        seconds = 0.0
        for i in range(0, len(programs), batch):
            t0 = time.perf_counter()
            results = executor.run_batch(programs[i : i + batch])
            seconds += time.perf_counter() - t0
            assert all(r.ok for r in results), [r.error for r in results if not r.ok][:3]
        figures["per_s"] = len(programs) / seconds
        if latency_calls:
            t0 = time.perf_counter()
            for code in programs[:latency_calls]:
                executor.run(code)
            figures["single_call_s"] = (time.perf_counter() - t0) / min(latency_calls, len(programs))
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--programs", type=int, default=2000, help="number of distinct programs in the mix")
    parser.add_argument(
        "--max_workers", type=int, default=os.cpu_count(), help="largest pool of the scaling series (1, 2, ...)"
    )
    parser.add_argument("--batch", type=int, default=256, help="programs per run_batch call (one MCTS wave)")
    args = parser.parse_args()
    print_cpu()

    programs = make_programs(args.programs)
    warm = make_programs(50, seed=1)
    run_inprocess(warm)  # import sympy etc. once, as the pool workers do at start-up
    inprocess_s = run_inprocess(programs)
    inprocess_per_s = len(programs) / inprocess_s

    pools = {}
    for workers in range(1, max(1, args.max_workers) + 1):
        pools[workers] = run_pool(programs, warm, workers, args.batch, latency_calls=200 if workers == 1 else 0)
        print(f"sandboxed pool, {workers:2d} worker(s): {pools[workers]['per_s']:9.0f} programs/s "
              f"(start-up {pools[workers]['startup_s']:.2f} s)", flush=True)  # fmt: skip
    one = pools[1]
    scaling = {str(w): round(p["per_s"] / one["per_s"], 3) for w, p in pools.items()}
    print(f"in-process exec : {inprocess_per_s:9.0f} programs/s ({1e3 * inprocess_s / len(programs):.3f} ms each)")
    print(f"sandboxed pool  : {one['per_s']:9.0f} programs/s with 1 worker, batches of {args.batch}: "
          f"ratio {one['per_s'] / inprocess_per_s:.3f}")  # fmt: skip
    print("pool scaling    : workers " + ", ".join(f"{w}: x{r:.2f}" for w, r in scaling.items()))
    print(f"one-at-a-time   : {1e3 * one['single_call_s']:.3f} ms per program through the pool (latency incl. IPC)")
    print(f"pool start-up   : {one['startup_s']:.2f} s with 1 worker (namespaces: {one['isolation']})")
    print(
        json.dumps(
            {
                "ratio": round(one["per_s"] / inprocess_per_s, 3),
                "sandboxed_per_s": round(one["per_s"], 1),
                "inprocess_per_s": round(inprocess_per_s, 1),
                "scaling": scaling,
                "pool_per_s": {str(w): round(p["per_s"], 1) for w, p in pools.items()},
                "single_call_ms": round(1e3 * one["single_call_s"], 3),
                "max_workers": args.max_workers,
                "batch": args.batch,
                "programs": len(programs),
                "startup_s": round(one["startup_s"], 2),
                "cpu": cpu_extensions(),
            }
        )
    )


if __name__ == "__main__":
    main()
