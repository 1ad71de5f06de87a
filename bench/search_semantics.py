"""Benchmark: what the search finds per generated token, for comparing search rules (same policy, same seeds).

    .venv/bin/python bench/search_semantics.py --policy runs/fid/tiny_policy --out runs/fid/semantics/after_node.json
    .venv/bin/python bench/search_semantics.py --policy ... --set dead_end_backup=path --out .../after_path.json

Searches the first --limit problems of the tiny train split (the problems a tiny round searches) with the tiny
round-1 settings and reports: problems solved, solutions found (correct answer nodes), wrong answers, rollouts,
generated tokens, and problems solved / solutions found per 1,000 generated tokens, per level. The same script ran
against an earlier version of the library gives the "before" figures (docs/method.md, "Dead ends"); --set passes
any other `MCTSConfig` field. Finished results are kept: a re-run with the same --out prints them again.
Last line: one JSON object.
"""

import argparse
import json
import os
import time
from collections import Counter

from _common import cpu_extensions, print_cpu

from rstar_trl import MCTSConfig, MCTSGenerator
from rstar_trl.search import SearchTree
from rstar_trl.tiny import tiny_splits, to_dataset


def _value(text: str):
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return {"true": True, "false": False}.get(text.lower(), text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--policy", required=True, help="Policy checkpoint folder (e.g. runs/tiny/tiny_policy).")
    parser.add_argument("--limit", type=int, default=256, help="Problems of the tiny train split searched.")
    parser.add_argument("--num_rollouts", type=int, default=8, help="Rollouts per problem (tiny round 1: 8).")
    parser.add_argument("--num_candidates", type=int, default=5, help="Candidates per expansion (round 1: 5).")
    parser.add_argument("--set", nargs="*", default=[], metavar="FIELD=VALUE", help="Other MCTSConfig fields.")
    parser.add_argument("--out", required=True, help="JSON file of the result (kept; a re-run prints it).")
    args = parser.parse_args()
    print_cpu()
    if os.path.exists(args.out):
        with open(args.out) as f:
            kept = json.load(f)
        # The CPU the kept figures were measured on, not this one ("unknown" for results kept before it was noted).
        print(json.dumps({**kept, "cpu": kept.get("cpu", "unknown")}))
        return
    extra = dict(item.split("=", 1) for item in args.set)
    settings = dict(
        num_rollouts=args.num_rollouts, num_candidates=args.num_candidates, max_step_tokens=64, max_answer_tokens=32,
        temperature=0.8, top_p=0.95, seed=42, torch_threads=1, problems_in_flight=256, generation_batch_size=256,
    )  # fmt: skip
    config = MCTSConfig(**{**settings, **{k: _value(v) for k, v in extra.items()}})
    problems = to_dataset(tiny_splits()["train"][: args.limit])
    start = time.perf_counter()
    with MCTSGenerator(args.policy, config, problems) as generator:
        trees = generator.generate()
    elapsed = time.perf_counter() - start
    stats = generator.stats
    by_level: dict[int, Counter] = {}
    answers: Counter = Counter()
    for row in trees:
        tree = SearchTree.from_json(row["tree"])
        level = by_level.setdefault(row["level"], Counter())
        level["problems"] += 1
        level["solved"] += row["solved"]
        correct = sum(1 for n in tree.nodes if n.correct)
        level["solutions"] += correct
        answers["correct"] += correct
        answers["wrong"] += sum(1 for n in tree.nodes if n.terminal_reason == "answer" and not n.correct)
        for n in tree.nodes:
            if n.terminal and n.terminal_reason != "answer":
                answers[f"dead_end_{n.terminal_reason}"] += 1
    tokens = stats["tokens"]
    result = {
        "benchmark": "search_semantics",
        "settings": {
            "limit": args.limit,
            "num_rollouts": args.num_rollouts,
            "num_candidates": args.num_candidates,
            **extra,
        },  # fmt: skip
        "problems": len(trees),
        "solved": int(sum(trees["solved"])),
        "solutions": answers["correct"],
        "wrong_answers": answers["wrong"],
        "dead_ends": {k.removeprefix("dead_end_"): v for k, v in answers.items() if k.startswith("dead_end_")},
        "rollouts": int(sum(trees["rollouts"])),
        "tokens": int(tokens),
        "solved_per_1k_tokens": round(1000 * sum(trees["solved"]) / tokens, 4),
        "solutions_per_1k_tokens": round(1000 * answers["correct"] / tokens, 4),
        "failed_expansions": int(stats.get("failed_expansions", 0)),
        "dropped": {k.removeprefix("dropped_"): int(v) for k, v in stats.items() if k.startswith("dropped_")},
        "by_level": {str(k): dict(v) for k, v in sorted(by_level.items())},
        "time_s": round(elapsed, 1),
        "cpu": cpu_extensions(),
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
