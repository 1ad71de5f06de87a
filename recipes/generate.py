"""MCTS data generation: problems in, search trees out (a `datasets.Dataset` saved under --output_dir).

    python recipes/generate.py                                  # the embedded tiny default, no downloads
    python recipes/generate.py --config recipes/tiny/generate.yaml --num_rollouts 16
    python recipes/generate.py --model_name_or_path path/to/policy --dataset ../shared/data/math500/test.jsonl

With no --model_name_or_path, a tiny policy is built locally (tokenizer + 1M-parameter Llama, bootstrapped for a
few minutes on template solutions) and searched on the tiny synthetic word problems.
"""

import json
import logging
import os
from dataclasses import dataclass, field

from trl import TrlParser

from rstar_trl import MCTSConfig, MCTSGenerator, load_problems, tree_to_html, tree_to_outline
from rstar_trl.tiny import build_tiny_policy, tiny_splits, to_dataset


@dataclass
class GenerateArguments:
    """What to search and where to write it."""

    model_name_or_path: str | None = field(
        default=None,
        metadata={"help": "Policy model (path or Hub id). Default: build the embedded tiny policy in output_dir."},
    )
    dataset: str | None = field(
        default=None,
        metadata={
            "help": "Problems: a JSONL file (e.g. ../shared/data/gsm8k/test.jsonl) or Hub dataset. "
            "Default: the tiny synthetic train split."
        },  # fmt: skip
    )
    dataset_split: str = field(default="train", metadata={"help": "Split of a Hub dataset."})
    limit: int | None = field(default=64, metadata={"help": "Search only the first N problems (None: all)."})
    output_dir: str = field(default="runs/generate", metadata={"help": "Where the trees and reports are written."})
    tiny_bootstrap_steps: int = field(
        default=600, metadata={"help": "Bootstrap training steps of the tiny policy (only without a model)."}
    )


def main(script_args: GenerateArguments, mcts_args: MCTSConfig) -> None:
    os.makedirs(script_args.output_dir, exist_ok=True)
    model = script_args.model_name_or_path
    if model is None:
        model = os.path.join(script_args.output_dir, "tiny_policy")
        if not os.path.exists(os.path.join(model, "config.json")):  # built once, reused on re-runs
            build_tiny_policy(model, bootstrap_steps=script_args.tiny_bootstrap_steps)
        if mcts_args.torch_threads is None:  # a 1M-parameter model generates fastest on one thread
            mcts_args.torch_threads = 1
    if script_args.dataset is None:
        problems = to_dataset(tiny_splits()["train"])
    else:
        problems = load_problems(script_args.dataset, split=script_args.dataset_split)
    if script_args.limit is not None:
        problems = problems.select(range(min(script_args.limit, len(problems))))

    generator = MCTSGenerator(model, args=mcts_args, train_dataset=problems)
    trees = generator.generate()

    trees_dir = os.path.join(script_args.output_dir, "trees")
    trees.save_to_disk(trees_dir)
    with open(os.path.join(script_args.output_dir, "generate_stats.json"), "w") as f:
        json.dump({"stats": generator.stats, "config": generator.config_dict()}, f, indent=2)
    example = max(range(len(trees)), key=lambda i: (trees[i]["solved"], trees[i]["num_nodes"]))
    with open(os.path.join(script_args.output_dir, "example_tree.html"), "w") as f:
        f.write(tree_to_html(trees[example]["tree"]))
    with open(os.path.join(script_args.output_dir, "example_tree.txt"), "w") as f:
        f.write(tree_to_outline(trees[example]["tree"]) + "\n")

    stats = generator.stats
    solved = sum(trees["solved"])
    print(f"\nSolved {solved}/{len(trees)} problems ({100 * solved / len(trees):.1f}%) with {mcts_args.num_rollouts} "
          f"rollouts x {mcts_args.num_candidates} candidates.")  # fmt: skip
    print(f"{stats['tokens']} tokens in {stats['time_s']:.1f} s ({stats['tokens_per_s']:.0f} tokens/s); time split: "
          + ", ".join(f"{p} {100 * stats[f'{p}_fraction']:.0f}%"
                      for p in ("generation", "execution", "scoring", "grading", "bookkeeping")))  # fmt: skip
    print(f"Trees dataset:  {trees_dir}  (datasets.load_from_disk)")
    print(f"Policy:         {model}")
    print(f"Example tree:   {os.path.join(script_args.output_dir, 'example_tree.html')} (and .txt)")
    print(f"Run report:     {os.path.join(script_args.output_dir, 'generate_stats.json')}")


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    parser = TrlParser((GenerateArguments, MCTSConfig))
    main(*parser.parse_args_and_config())
