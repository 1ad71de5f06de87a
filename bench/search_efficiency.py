"""Benchmark: search efficiency, per generated token. How many problems MCTS solves, and how many distinct correct
solutions it finds, per 1,000 generated tokens, against plain sampling of full solutions at the same number of
tokens. The paper's premise (§3.1-3.2) is that step-level search finds more verified solutions than sampling for
the same compute; this measures whether ours does on a task.

    .venv/bin/python bench/search_efficiency.py                        # tiny default: round 1's search, 128 problems
    .venv/bin/python bench/search_efficiency.py --policy runs/tiny/round_2/policy --rollouts 16 --candidates 8
    .venv/bin/python bench/search_efficiency.py --policy runs/tiny/round_3/policy --ppm runs/tiny/round_3/ppm

Both sides use the same policy, backend, sampling settings (temperature, top-p, step and answer token limits,
maximum depth) and executor, and both verify answers against the gold answer (the training setting of a round).

- MCTS: `MCTSGenerator` with `--rollouts` x `--candidates` (round 1 of the tiny recipe: 8 x 5), PPM-guided with
  `--ppm`. Its tokens are everything it generated, failed candidates included.
- Sampling: `--max_samples` full solutions per problem, step by step with the executor (the Solver's `maj@N`
  sampling; sample k of a problem is the same whatever N is). Compared at k samples per problem, the largest k
  whose tokens do not exceed the search's (and k + 1, the smallest that does).

Solved: problems with at least one correct answer. Distinct correct: distinct correct solution texts (what the SFT
data of a round can draw from). Token counts do not depend on the machine's speed, so neither do these ratios.
Last line: one JSON object.
"""

import argparse
import json
import os
import time

from _common import cpu_extensions, print_cpu

from rstar_trl import MCTSConfig, MCTSGenerator, SearchTree
from rstar_trl.grading import grade_answer
from rstar_trl.ppm import TransformersPPMScorer
from rstar_trl.solve import Solver, SolverConfig
from rstar_trl.tiny import provide_tiny_policy, tiny_splits, to_dataset


def _normalise(text: str) -> str:
    return " ".join(text.split())


def run_mcts(policy: str, ppm: str | None, problems, settings: dict, rollouts: int, candidates: int) -> dict:
    config = MCTSConfig(num_rollouts=rollouts, num_candidates=candidates, **settings)
    scorer = TransformersPPMScorer(ppm, device="cpu") if ppm else None
    start = time.perf_counter()
    with MCTSGenerator(policy, config, problems, ppm=scorer) as generator:
        trees = generator.generate()
        stats = generator.stats
    seconds = time.perf_counter() - start
    solved = distinct = 0
    for row in trees:
        tree = SearchTree.from_json(row["tree"])
        texts = {_normalise(tree.trajectory_text(n)) for n in tree.terminal_nodes() if n.correct}
        solved += bool(texts)
        distinct += len(texts)
    return {"tokens": int(stats["tokens"]), "solved": solved, "distinct_correct": distinct, "seconds": seconds}


def run_sampling(policy: str, problems, settings: dict, max_samples: int) -> tuple[list[list[dict]], float]:
    """Per problem, its samples in order: tokens, whether right, the normalised text."""
    config = SolverConfig(**{k: v for k, v in settings.items() if k != "problems_in_flight"},
                          problems_in_flight=settings["problems_in_flight"])  # fmt: skip
    start = time.perf_counter()
    with Solver(policy, args=config) as solver:
        (result,) = solver.iter_solve(list(problems["problem"]), [f"maj@{max_samples}"])
    seconds = time.perf_counter() - start
    samples = []
    for solution in sorted(result.solutions, key=lambda s: s.index):
        gold = problems[solution.index]["answer"]
        samples.append([
            {"tokens": c.tokens or 0, "correct": c.answer is not None and bool(grade_answer(c.answer, gold)),
             "text": _normalise(c.text or "")}
            for c in solution.candidates
        ])  # fmt: skip
    return samples, seconds


def at_k(samples: list[list[dict]], k: int) -> dict:
    """Sampling's figures with the first k samples of every problem."""
    tokens = solved = distinct = 0
    for rows in samples:
        first = rows[:k]
        tokens += sum(r["tokens"] for r in first)
        right = {r["text"] for r in first if r["correct"]}
        solved += bool(right)
        distinct += len(right)
    return {"k": k, "tokens": tokens, "solved": solved, "distinct_correct": distinct}


def per_1k(side: dict) -> dict:
    thousands = max(side["tokens"], 1) / 1000
    return {**side, "solved_per_1k": side["solved"] / thousands,
            "distinct_per_1k": side["distinct_correct"] / thousands}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--policy", help="Policy checkpoint (default: the shipped tiny policy).")
    parser.add_argument("--ppm", help="PPM checkpoint: the search is PPM-guided (Eq. 3), as in rounds 3-4.")
    parser.add_argument("--split", default="train", help="Tiny split the problems come from (train: the rounds').")
    parser.add_argument("--problems", type=int, default=128, help="How many problems (the split's first).")
    parser.add_argument("--rollouts", type=int, default=8, help="MCTS rollouts per problem (tiny round 1: 8).")
    parser.add_argument("--candidates", type=int, default=5, help="Candidates per expansion (tiny round 1: 5).")
    parser.add_argument("--max_samples", type=int, default=32, help="Full solutions sampled per problem, at most.")
    parser.add_argument("--seed", type=int, default=0, help="Seed of both sides.")
    args = parser.parse_args()
    print_cpu()

    policy = args.policy
    if policy is None:
        policy = os.path.join(os.path.dirname(os.path.abspath(__file__)), ".cache", "tiny_policy_shipped")
        provide_tiny_policy(policy)
    problems = to_dataset(tiny_splits()[args.split][: args.problems])
    # The tiny recipe's search settings (recipes/tiny/round*.yaml), shared by both sides.
    settings = {"temperature": 0.8, "top_p": 0.95, "max_step_tokens": 64, "max_answer_tokens": 32, "max_depth": 16,
                "c_puct": 2.0, "prompt_template": "policy", "torch_threads": 1, "seed": args.seed, "device": "cpu",
                "problems_in_flight": 128, "generation_batch_size": 256}  # fmt: skip
    mcts = per_1k(run_mcts(policy, args.ppm, problems, settings, args.rollouts, args.candidates))
    samples, sampling_s = run_sampling(policy, problems, {k: v for k, v in settings.items() if k != "c_puct"},
                                       args.max_samples)  # fmt: skip
    curve = [at_k(samples, k) for k in range(1, args.max_samples + 1)]
    within = [point for point in curve if point["tokens"] <= mcts["tokens"]]
    below = per_1k(within[-1] if within else curve[0])
    above = per_1k(next((p for p in curve if p["tokens"] > mcts["tokens"]), curve[-1]))
    print(f"\n{len(problems)} problems ({args.split}), policy {policy}, PPM {args.ppm or 'none'}\n")
    print("| | samples / problem | tokens | solved | distinct correct | solved / 1k tokens | distinct / 1k tokens |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    rows = [(f"MCTS {args.rollouts}x{args.candidates}", "-", mcts)]
    sides = [below, above] if above != below else [below]
    rows += [(f"sampling, k = {side['k']}", side["k"], side) for side in sides]
    for name, k, side in rows:
        print(f"| {name} | {k} | {side['tokens']} | {side['solved']} | {side['distinct_correct']} | "
              f"{side['solved_per_1k']:.3f} | {side['distinct_per_1k']:.3f} |")  # fmt: skip
    record = {
        "bench": "search_efficiency", "problems": len(problems), "split": args.split, "policy": policy,
        "ppm": args.ppm, "rollouts": args.rollouts, "candidates": args.candidates, "cpu": cpu_extensions(),
        "mcts": mcts, "sampling_at_most_mcts_tokens": below, "sampling_above_mcts_tokens": above,
        "ratio_solved_per_1k": mcts["solved_per_1k"] / max(below["solved_per_1k"], 1e-9),
        "ratio_distinct_per_1k": mcts["distinct_per_1k"] / max(below["distinct_per_1k"], 1e-9),
        "sampling_seconds": sampling_s,
    }  # fmt: skip
    print("\nMCTS / sampling at matched tokens: solved per 1k tokens x{:.2f}, distinct correct per 1k tokens x{:.2f}"
          .format(record["ratio_solved_per_1k"], record["ratio_distinct_per_1k"]))  # fmt: skip
    print(json.dumps(record))


if __name__ == "__main__":
    main()
