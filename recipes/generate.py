"""MCTS data generation: problems in, search trees out (a `datasets.Dataset` saved under --output_dir).

    python recipes/generate.py                                  # the embedded tiny default, no downloads
    python recipes/generate.py --config recipes/tiny/generate.yaml --num_rollouts 16
    python recipes/generate.py --model_name_or_path path/to/policy --dataset openai/gsm8k --dataset_split train
    python recipes/generate.py --model_name_or_path path/to/policy --dataset path/to/problems.jsonl  # offline
    python recipes/generate.py --backend vllm --gpu_memory_utilization 0.9 ...             # vLLM offline engine
    python recipes/generate.py --backend server --server_url http://gpu-node:8000 ...      # `vllm serve` elsewhere
    accelerate launch --num_processes 8 recipes/generate.py ...                           # one shard per process

With no --model_name_or_path, a tiny policy is built locally (tokenizer + 1M-parameter Llama, bootstrapped for a
few minutes on template solutions) and searched on the tiny synthetic word problems.

Finished trees are saved in shards under --output_dir as they complete: re-running the same command after an
interruption (even `kill -9`) skips them and ends with the dataset an uninterrupted run gives.
"""

import json
import logging
import os
import sys
from dataclasses import asdict, dataclass, field

import torch
from accelerate import PartialState
from trl import TrlParser

from rstar_trl import MCTSConfig, MCTSGenerator, load_problems, tree_to_html, tree_to_outline
from rstar_trl.hub import HubPushError, push_folder, render_card, save_dataset_folder
from rstar_trl.rounds import provide_tiny_policy_once
from rstar_trl.search.tree import TREE_SCHEMA_VERSION
from rstar_trl.tiny import tiny_splits, to_dataset

DEFAULT_OUTPUT_DIR = "runs/generate"


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
            "help": "Problems with gold answers: a benchmark's Hub dataset id (e.g. openai/gsm8k, "
            "HuggingFaceH4/MATH-500; presets in rstar_trl.data.BENCHMARKS), any Hub dataset, or a local JSON/JSONL "
            "file (the offline path, e.g. path/to/problems.jsonl). Default: the tiny synthetic train split."
        },  # fmt: skip
    )
    dataset_split: str = field(
        default="train",
        metadata={"help": "Split of a Hub dataset (a benchmark published as one split, such as "
                  "HuggingFaceH4/MATH-500, is read whatever the split)."},
    )  # fmt: skip
    limit: int | None = field(default=64, metadata={"help": "Search only the first N problems (None: all)."})
    tiny_bootstrap_steps: int = field(
        default=600,
        metadata={"help": "Bootstrap training steps of the tiny policy (only without a model). With the default "
                  "(600) the policy shipped with rstar_trl is copied; any other value builds one."},
    )  # fmt: skip
    tiny_build_policy: bool = field(
        default=False,
        metadata={"help": "Build the tiny policy from scratch (python -m rstar_trl.tiny) even when the shipped one "
                  "matches --tiny_bootstrap_steps."},
    )  # fmt: skip
    push_to_hub: bool = field(
        default=False, metadata={"help": "Push the trees dataset (parquet + dataset card) to the Hub at the end."}
    )
    hub_repo_id: str | None = field(
        default=None, metadata={"help": "Hub dataset repo for --push_to_hub, e.g. my-org/my-run-trees (required)."}
    )
    hub_private: bool = field(default=False, metadata={"help": "Create the Hub repo as private."})


def main(script_args: GenerateArguments, mcts_args: MCTSConfig) -> None:
    if script_args.push_to_hub and not script_args.hub_repo_id:  # checked before any compute
        raise SystemExit("--push_to_hub needs --hub_repo_id (e.g. my-org/my-run-trees)")
    if mcts_args.output_dir is None:
        mcts_args.output_dir = DEFAULT_OUTPUT_DIR
    output_dir = mcts_args.output_dir
    state = PartialState(cpu=not torch.cuda.is_available())  # the same shared state MCTSGenerator uses
    os.makedirs(output_dir, exist_ok=True)
    model = script_args.model_name_or_path
    if model is None:
        model = os.path.join(output_dir, "tiny_policy")
        with state.main_process_first():  # provided once (by the main process), reused on re-runs
            if not os.path.exists(os.path.join(model, "config.json")):
                # A copy of the shipped policy, or a build; under a multi-process launch a build runs outside the
                # process group (its trainer would join the group and wait for the other processes).
                provide_tiny_policy_once(
                    model, script_args.tiny_bootstrap_steps, state.num_processes, build=script_args.tiny_build_policy
                )
        if mcts_args.torch_threads is None:  # a 1M-parameter model generates fastest on one thread
            mcts_args.torch_threads = 1
    elif not os.path.exists(model) and os.path.sep in model.rstrip("/") and model.startswith((".", "/")):
        raise SystemExit(f"--model_name_or_path {model!r} does not exist")
    if script_args.dataset is None:
        problems = to_dataset(tiny_splits()["train"])
    else:
        problems = load_problems(script_args.dataset, split=script_args.dataset_split)
    if script_args.limit is not None:
        problems = problems.select(range(min(script_args.limit, len(problems))))

    mcts_args.gather_trees = "main"  # only the main process writes the trees: the others need not hold them
    with MCTSGenerator(model, args=mcts_args, train_dataset=problems) as generator:
        trees = generator.generate()
    if not state.is_main_process:
        return

    trees_dir = os.path.join(output_dir, "trees")
    trees.save_to_disk(trees_dir)
    with open(os.path.join(output_dir, "generate_stats.json"), "w") as f:
        json.dump({"stats": generator.stats, "config": generator.config_dict()}, f, indent=2)
    example = max(range(len(trees)), key=lambda i: (trees[i]["solved"], trees[i]["num_nodes"]))
    with open(os.path.join(output_dir, "example_tree.html"), "w") as f:
        f.write(tree_to_html(trees[example]["tree"]))
    with open(os.path.join(output_dir, "example_tree.txt"), "w") as f:
        f.write(tree_to_outline(trees[example]["tree"]) + "\n")
    solved = sum(trees["solved"])
    hub_dir = save_dataset_folder(trees, os.path.join(output_dir, "hub", "trees"), render_card(
        "trees_dataset_card.md", repo_id=script_args.hub_repo_id or "MCTS trees", schema_version=TREE_SCHEMA_VERSION,
        model=model, round="-", num_problems=len(trees), num_solved=solved,
        solved_rate=f"{100 * solved / len(trees):.1f}%", num_rollouts=mcts_args.num_rollouts,
        num_candidates=mcts_args.num_candidates, config=json.dumps(asdict(mcts_args), indent=2),
    ))  # fmt: skip

    stats = generator.stats
    print(f"\nSolved {solved}/{len(trees)} problems ({100 * solved / len(trees):.1f}%) with {mcts_args.num_rollouts} "
          f"rollouts x {mcts_args.num_candidates} candidates.")  # fmt: skip
    print(f"{stats['tokens']} tokens in {stats['time_s']:.1f} s ({stats['tokens_per_s']:.0f} tokens/s); time split: "
          + ", ".join(f"{p} {100 * stats[f'{p}_fraction']:.0f}%"
                      for p in ("generation", "execution", "scoring", "grading", "bookkeeping")))  # fmt: skip
    print(f"Trees dataset:  {trees_dir}  (datasets.load_from_disk)")
    print(f"Hub folder:     {hub_dir}  (parquet + dataset card)")
    print(f"Policy:         {model}")
    print(f"Example tree:   {os.path.join(output_dir, 'example_tree.html')} (and .txt)")
    print(f"Run report:     {os.path.join(output_dir, 'generate_stats.json')}")
    if script_args.push_to_hub:
        try:
            url = push_folder(hub_dir, script_args.hub_repo_id, private=script_args.hub_private)
        except HubPushError as exc:
            print(f"\n{exc}", file=sys.stderr)
            sys.exit(1)
        print(f"Pushed to:      {url}")


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    parser = TrlParser((GenerateArguments, MCTSConfig))
    main(*parser.parse_args_and_config())
