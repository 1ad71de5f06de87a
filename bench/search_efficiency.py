"""Benchmark: search efficiency, per generated token. How many problems MCTS solves, and how many distinct correct
solutions it finds, per 1,000 generated tokens, against plain sampling of full solutions at the same number of
tokens. The paper's premise (§3.1-3.2) is that step-level search finds more verified solutions than sampling for
the same compute; this measures whether ours does on a task.

    .venv/bin/python bench/search_efficiency.py                        # tiny default: round 1's search, 128 problems
    .venv/bin/python bench/search_efficiency.py --policy runs/tiny/round_2/policy --rollouts 16 --candidates 8
    .venv/bin/python bench/search_efficiency.py --policy runs/tiny/round_3/policy --ppm runs/tiny/round_3/ppm
    .venv/bin/python bench/search_efficiency.py --task chains            # long register programs (bench/_chains.py)

Tasks: `tiny` (the tiny default's word problems, 1-6 steps) and `chains` (register programs of 7-10 instructions,
8-11 steps; a policy is bootstrapped for it on first use, about 7 minutes on 2 CPU cores, and cached in
bench/.cache). The chains are the case the paper's premise is about: long solutions whose every step can go wrong.

Both sides use the same policy, backend, sampling settings (temperature, top-p, step and answer token limits,
maximum depth) and executor, and both verify answers against the gold answer (the training setting of a round).

- MCTS: `MCTSGenerator` with `--rollouts` x `--candidates` (round 1 of the tiny recipe: 8 x 5), PPM-guided with
  `--ppm`. Its tokens are everything it generated, failed candidates included.
- Sampling: `--max_samples` full solutions per problem, step by step with the executor (the Solver's `maj@N`
  sampling; sample k of a problem is the same whatever N is). Compared at k samples per problem, the largest k
  whose tokens do not exceed the search's (and k + 1, the smallest that does).

The headline ratios compare at equal tokens: sampling's solved and distinct correct counts interpolated linearly
between k and k + 1 samples per problem at the search's token count. The paired test (per problem, McNemar, 95%
interval of the difference) compares the search with k + 1 samples, which have at least the search's tokens. The
figures per 1,000 tokens at k samples are printed too; they lean towards sampling, whose per-token yield falls as k
grows.

Solved: problems with at least one correct answer. Distinct correct: distinct correct solution texts (what the SFT
data of a round can draw from). Token counts do not depend on the machine's speed, so neither do these ratios.

Why one side finds more: distinct correct per token = answers per token x correct share of answers x distinct share
of correct answers. The first factor is where step-level search saves (siblings share their prefix; a sample pays
for its whole solution), the second where it can lose (a search spends part of its budget on branches it found
wrong, sampling draws from the policy as it is). The bench prints the three factors for both sides, and the MCTS
tokens spent on candidates it dropped (duplicates of a sibling, code errors, no step marker).
Last line: one JSON object.
"""

import argparse
import json
import os
import time

from _chains import chain_splits
from _common import cpu_extensions, print_cpu

from rstar_trl import MCTSConfig, MCTSGenerator, SearchTree
from rstar_trl.grading import grade_answer
from rstar_trl.ppm import TransformersPPMScorer
from rstar_trl.solve import Solver, SolverConfig
from rstar_trl.stats import paired_comparison
from rstar_trl.tiny import build_tiny_policy, provide_tiny_policy, tiny_splits, to_dataset

# Bootstrap of the chains policy: SFT steps (batch 32) on `chain_splits()["bootstrap"]`, the tiny default's sizes.
CHAINS_BOOTSTRAP_STEPS = 500


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
    solved_each, distinct = [], 0
    for row in trees:
        tree = SearchTree.from_json(row["tree"])
        texts = {_normalise(tree.trajectory_text(n)) for n in tree.terminal_nodes() if n.correct}
        solved_each.append(bool(texts))
        distinct += len(texts)
    solved = sum(solved_each)
    dropped = {k.removeprefix("tokens_dropped_"): int(v) for k, v in stats.items() if k.startswith("tokens_dropped_")}
    return {"tokens": int(stats["tokens"]), "solved": solved, "distinct_correct": distinct,
            "answers": int(stats.get("answers_correct", 0) + stats.get("answers_wrong", 0)),
            "correct_answers": int(stats.get("answers_correct", 0)), "candidates": int(stats.get("candidates", 0)),
            "tokens_dropped": dropped, "seconds": seconds, "solved_each": solved_each}  # fmt: skip


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
            {"tokens": c.tokens or 0, "answered": c.answer is not None,
             "correct": c.answer is not None and bool(grade_answer(c.answer, gold)), "text": _normalise(c.text or "")}
            for c in solution.candidates
        ])  # fmt: skip
    return samples, seconds


def at_k(samples: list[list[dict]], k: int) -> dict:
    """Sampling's figures with the first k samples of every problem."""
    tokens = distinct = answers = correct = 0
    solved_each = []
    for rows in samples:
        first = rows[:k]
        tokens += sum(r["tokens"] for r in first)
        right = {r["text"] for r in first if r["correct"]}
        solved_each.append(bool(right))
        distinct += len(right)
        answers += sum(r["answered"] for r in first)
        correct += sum(r["correct"] for r in first)
    return {"k": k, "tokens": tokens, "solved": sum(solved_each), "distinct_correct": distinct, "answers": answers,
            "correct_answers": correct, "solved_each": solved_each}  # fmt: skip


def at_tokens(below: dict, above: dict, tokens: int, key: str) -> float:
    """Sampling's `key` at exactly `tokens` tokens, interpolated linearly between k and k + 1 samples per problem.
    (Per-token figures fall as k grows, so comparing them at fewer tokens than the search's would favour
    sampling; at equal tokens neither side is favoured.)"""
    if above["tokens"] == below["tokens"]:
        return float(below[key])
    share = (tokens - below["tokens"]) / (above["tokens"] - below["tokens"])
    return below[key] + share * (above[key] - below[key])


def per_1k(side: dict) -> dict:
    """Per 1,000 tokens, and the factors of distinct correct per token (answers/token x correct x distinct share)."""
    thousands = max(side["tokens"], 1) / 1000
    return {**side, "solved_per_1k": side["solved"] / thousands,
            "distinct_per_1k": side["distinct_correct"] / thousands, "answers_per_1k": side["answers"] / thousands,
            "correct_share": side["correct_answers"] / max(side["answers"], 1),
            "distinct_share": side["distinct_correct"] / max(side["correct_answers"], 1)}  # fmt: skip


def chains_policy(path: str) -> str:
    """The chains policy at `path`, bootstrapped there first when missing (about 7 minutes on 2 CPU cores)."""
    if not os.path.exists(os.path.join(path, "model.safetensors")):
        print(f"bootstrapping the chains policy in {path} ({CHAINS_BOOTSTRAP_STEPS} SFT steps) ...", flush=True)
        build_tiny_policy(path, bootstrap_steps=CHAINS_BOOTSTRAP_STEPS,
                          bootstrap_problems=chain_splits()["bootstrap"])  # fmt: skip
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--task", choices=("tiny", "chains"), default="tiny",
                        help="tiny: the tiny default's word problems; chains: long register programs "
                             "(bench/_chains.py).")  # fmt: skip
    parser.add_argument(
        "--policy",
        help="Policy checkpoint (default: the shipped tiny policy, or for --task chains "
        "one bootstrapped on the chains and cached in bench/.cache).",
    )
    parser.add_argument("--ppm", help="PPM checkpoint: the search is PPM-guided (Eq. 3), as in rounds 3-4.")
    parser.add_argument(
        "--split",
        help="Split the problems come from: for tiny, train (the default, the rounds' problems), validation or test; "
        "chains have one, bench.",
    )
    parser.add_argument("--problems", type=int, default=128, help="How many problems (the split's first).")
    parser.add_argument("--rollouts", type=int, default=8, help="MCTS rollouts per problem (tiny round 1: 8).")
    parser.add_argument("--candidates", type=int, default=5, help="Candidates per expansion (tiny round 1: 5).")
    parser.add_argument("--max_samples", type=int, default=32, help="Full solutions sampled per problem, at most.")
    parser.add_argument("--seed", type=int, default=0, help="Seed of both sides.")
    args = parser.parse_args()
    print_cpu()

    cache = os.path.join(os.path.dirname(os.path.abspath(__file__)), ".cache")
    policy = args.policy
    if args.task == "chains":
        if args.split not in (None, "bench"):
            parser.error(f"--split {args.split}: the chains have one split, bench")
        policy = policy or chains_policy(os.path.join(cache, f"chains_policy_{CHAINS_BOOTSTRAP_STEPS}"))
        args.split = "bench"
        problems = to_dataset(chain_splits()["bench"][: args.problems])
    else:
        args.split = args.split or "train"
        splits = tiny_splits()
        if args.split not in splits or args.split == "bootstrap":
            parser.error(f"--split {args.split}: the tiny splits are train, validation and test")
        if policy is None:
            policy = os.path.join(cache, "tiny_policy_shipped")
            provide_tiny_policy(policy)
        problems = to_dataset(splits[args.split][: args.problems])
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
    print(f"\n{len(problems)} problems ({args.task}, {args.split}), policy {policy}, PPM {args.ppm or 'none'}\n")
    print(
        "| | samples / problem | tokens | solved | distinct correct | solved / 1k tokens | distinct / 1k tokens "
        "| answers / 1k tokens | correct share | distinct share |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    rows = [(f"MCTS {args.rollouts}x{args.candidates}", "-", mcts)]
    sides = [below, above] if above != below else [below]
    rows += [(f"sampling, k = {side['k']}", side["k"], side) for side in sides]
    for name, k, side in rows:
        print(f"| {name} | {k} | {side['tokens']} | {side['solved']} | {side['distinct_correct']} | "
              f"{side['solved_per_1k']:.3f} | {side['distinct_per_1k']:.3f} | {side['answers_per_1k']:.2f} | "
              f"{side['correct_share']:.3f} | {side['distinct_share']:.3f} |")  # fmt: skip
    dropped = sum(mcts["tokens_dropped"].values())
    print(
        f"\nMCTS tokens on dropped candidates: {dropped} ({dropped / max(mcts['tokens'], 1):.1%}): "
        + ", ".join(f"{k} {v}" for k, v in sorted(mcts["tokens_dropped"].items()))
    )
    if above["tokens"] < mcts["tokens"]:
        print(f"\nWARNING: {args.max_samples} samples per problem use fewer tokens than the search "
              f"({above['tokens']} < {mcts['tokens']}): the comparisons below give sampling fewer tokens; "
              "raise --max_samples.")  # fmt: skip
    # Paired, per problem: solved by the search vs by sampling with at least as many tokens (k + 1 samples).
    paired = paired_comparison(mcts["solved_each"], above["solved_each"])
    equal = {key: at_tokens(below, above, mcts["tokens"], key) for key in ("solved", "distinct_correct")}
    record = {
        "bench": "search_efficiency", "task": args.task, "problems": len(problems), "split": args.split,
        "policy": policy,
        "ppm": args.ppm, "rollouts": args.rollouts, "candidates": args.candidates, "cpu": cpu_extensions(),
        "mcts": _without_lists(mcts), "sampling_at_most_mcts_tokens": _without_lists(below),
        "sampling_above_mcts_tokens": _without_lists(above), "sampling_at_mcts_tokens": equal,
        "ratio_solved_equal_tokens": mcts["solved"] / max(equal["solved"], 1e-9),
        "ratio_distinct_equal_tokens": mcts["distinct_correct"] / max(equal["distinct_correct"], 1e-9),
        "ratio_solved_per_1k": mcts["solved_per_1k"] / max(below["solved_per_1k"], 1e-9),
        "ratio_distinct_per_1k": mcts["distinct_per_1k"] / max(below["distinct_per_1k"], 1e-9),
        "paired_solved_vs_k_above": paired.to_dict(), "sampling_seconds": sampling_s,
    }  # fmt: skip
    print("\nMCTS / sampling at equal tokens (interpolated between k and k + 1): solved x{:.2f}, distinct correct "
          "x{:.2f}".format(record["ratio_solved_equal_tokens"], record["ratio_distinct_equal_tokens"]))  # fmt: skip
    low, high = paired.ci95
    print(f"Per problem, MCTS vs sampling with k = {above['k']} (at least the search's tokens): solved "
          f"{paired.correct_a} vs {paired.correct_b}, difference {100 * paired.difference:+.1f} points "
          f"(95% CI {100 * low:+.1f} to {100 * high:+.1f}), McNemar p = {paired.p_value:.3g}")  # fmt: skip
    print(json.dumps(record))


def _without_lists(side: dict) -> dict:
    return {k: v for k, v in side.items() if k != "solved_each"}


if __name__ == "__main__":
    main()
