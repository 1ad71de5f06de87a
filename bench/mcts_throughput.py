"""Benchmark: generated tokens/s of `MCTSGenerator` vs the same backend's raw batched generation, same run.

The raw baseline samples the same number of sequences (step candidates + answers that MCTS sampled) from the
problem prompts, with the same batch size, stop strings and token budget, so the ratio shows what the search adds
on top of generation: code execution, grading, bookkeeping and smaller / less regular batches.

    .venv/bin/python bench/mcts_throughput.py --backend transformers [--problems 256 --in_flight 64] [--policy DIR]

Without --policy, the embedded tiny policy is built once into bench/.cache/tiny_policy.
Last line: one JSON object with "ratio" = mcts_tokens_per_s / raw_tokens_per_s.
"""

import argparse
import json
import os
import resource
import time

from rstar_trl import MCTSConfig, MCTSGenerator, format_prompt
from rstar_trl.format import STEP_STOP_STRINGS
from rstar_trl.tiny import build_tiny_policy, tiny_splits, to_dataset


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backend", default="transformers", choices=["transformers"], help="generation backend")
    parser.add_argument("--policy", default=None, help="policy directory (default: build the tiny policy)")
    parser.add_argument("--problems", type=int, default=256, help="problems searched")
    parser.add_argument(
        "--in_flight", type=int, default=64, help="trees searched at once (MCTSConfig.problems_in_flight)"
    )
    parser.add_argument("--rollouts", type=int, default=4, help="rollouts per problem")
    parser.add_argument("--candidates", type=int, default=4, help="candidates per expansion")
    parser.add_argument("--batch", type=int, default=256, help="sequences per generate call")
    parser.add_argument("--torch_threads", type=int, default=1, help="CPU threads for torch")
    args = parser.parse_args()

    policy = args.policy or os.path.join(os.path.dirname(__file__), ".cache", "tiny_policy")
    if not os.path.exists(os.path.join(policy, "config.json")):
        build_tiny_policy(policy)
    problems = to_dataset(tiny_splits()["train"][: args.problems])
    config = MCTSConfig(
        num_rollouts=args.rollouts, num_candidates=args.candidates, problems_in_flight=args.in_flight,
        generation_batch_size=args.batch, max_step_tokens=64, backend=args.backend, seed=0, device="cpu",
        torch_threads=args.torch_threads,
    )  # fmt: skip
    generator = MCTSGenerator(policy, config, problems)
    generator.backend.generate(["warm-up"], 4, STEP_STOP_STRINGS, 8)  # first-call costs belong to neither side
    trees = generator.generate()
    stats = generator.stats
    mcts_tokens_per_s = stats["tokens"] / stats["time_s"]

    # Raw baseline: the same number of sequences, same batch size, same budget, from the problem prompts.
    sequences = stats["candidates"] + stats.get("answers_correct", 0) + stats.get("answers_wrong", 0)
    prompts = [format_prompt(p) for p in problems["problem"]]
    per_prompt = max(1, sequences // len(prompts))
    start = time.perf_counter()
    raw = generator.backend.generate(prompts, per_prompt, STEP_STOP_STRINGS, config.max_step_tokens,
                                     config.temperature, config.top_p, seed=0)  # fmt: skip
    raw_s = time.perf_counter() - start
    raw_tokens = sum(c.num_tokens for row in raw for c in row)
    raw_tokens_per_s = raw_tokens / raw_s

    peak_rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"MCTS: {sum(trees['solved'])}/{len(trees)} solved, {stats['tokens']} tokens in {stats['time_s']:.1f} s "
          f"= {mcts_tokens_per_s:.0f} tokens/s over {stats['waves']} waves")  # fmt: skip
    print("MCTS time split: " + ", ".join(f"{p} {100 * stats[f'{p}_fraction']:.1f}%"
                                          for p in ("generation", "execution", "grading", "bookkeeping")))  # fmt: skip
    print(f"raw : {len(prompts) * per_prompt} sequences, {raw_tokens} tokens in {raw_s:.1f} s = "
          f"{raw_tokens_per_s:.0f} tokens/s")  # fmt: skip
    print(
        json.dumps(
            {
                "ratio": round(mcts_tokens_per_s / raw_tokens_per_s, 3),
                "mcts_tokens_per_s": round(mcts_tokens_per_s, 1),
                "raw_tokens_per_s": round(raw_tokens_per_s, 1),
                "backend": args.backend,
                "problems": len(trees),
                "sequences": sequences,
                "generation_fraction": stats["generation_fraction"],
                "execution_fraction": stats["execution_fraction"],
                "bookkeeping_fraction": stats["bookkeeping_fraction"],
                "peak_rss_mb": round(peak_rss_mb, 1),
            }
        )
    )


if __name__ == "__main__":
    main()
