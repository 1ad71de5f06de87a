"""The paper's SFT-data comparison next to a round's policy: the same training on other data (paper §4.3).

    python recipes/sft_data_baselines.py --round_dir runs/tiny/round_1 --kind rejection
    python recipes/sft_data_baselines.py --round_dir runs/tiny/round_1 --kind random

The paper fine-tunes the same base model on three kinds of data and compares greedy accuracy: random samples,
rejection-sampled correct solutions, and its step-verified MCTS trajectories. Here the round's own SFT data is the
MCTS side. The baselines sample `--num_samples` full solutions per problem from the policy that searched the
round, on the same problems, with the search's temperature, top-p, step format and executor (so every output block
is real), and keep:

- `rejection`: solutions whose answer is right (graded against the gold answer);
- `random`: solutions that end with an answer, right or wrong;

at most `sft_top_k` distinct solutions per problem (the round's own cap), then a seeded random draw down to the
round's number of SFT rows. If the samples give fewer rows than that, all are used and `baseline.json` says so.
The policy is fine-tuned from the round's base model with the round's SFT settings, through the same function as
the round's policy stage (`rstar_trl.rounds.fine_tune_policy`), into `<round_dir>/sft_baselines/<kind>/policy`,
with the data in `.../data`. Re-running skips finished parts.
"""

import json
import os
import random
from dataclasses import dataclass, field, fields

import torch
from accelerate import PartialState
from datasets import Dataset
from trl import TrlParser

from rstar_trl.format import POLICY_PROMPT, format_prompt
from rstar_trl.grading import grade_answer
from rstar_trl.hub import load_dataset_folder, save_dataset_folder
from rstar_trl.rounds import DONE_FILE, RoundArguments, RoundModelConfig, RoundSearchConfig, fine_tune_policy
from rstar_trl.solve import Solver, SolverConfig


@dataclass
class SFTBaselineArguments:
    round_dir: str = field(metadata={"help": "A finished round folder (round.json, trees/, sft/, policy/)."})
    kind: str = field(
        default="rejection",
        metadata={"help": "'rejection' (correct samples only) or 'random' (any sample that ends with an answer).",
                  "choices": ["rejection", "random"]},
    )  # fmt: skip
    num_samples: int = field(default=8, metadata={"help": "Full solutions sampled per problem."})
    seed: int = field(default=42, metadata={"help": "Seed of the sampling and of the draw down to the row count."})


def _read_round(round_dir: str) -> tuple[dict, RoundArguments, RoundSearchConfig, RoundModelConfig]:
    path = os.path.join(round_dir, "round.json")
    for part in (path, os.path.join(round_dir, "trees", DONE_FILE), os.path.join(round_dir, "sft", DONE_FILE)):
        if not os.path.exists(part):
            raise SystemExit(f"{round_dir} is not a finished round ({part} is missing): run recipes/round.py first")
    with open(path) as f:
        record = json.load(f)
    names = {f.name for f in fields(RoundArguments)}
    args = RoundArguments(**{k: v for k, v in record["config"]["round"].items() if k in names})
    search_names = {f.name for f in fields(RoundSearchConfig)}
    search = RoundSearchConfig(**{k: v for k, v in record["config"]["search"].items() if k in search_names})
    lora = RoundModelConfig(**record["config"].get("peft", {}))  # trained as the round's policy was
    return record, args, search, lora


def sample_rows(record: dict, args: RoundArguments, search: RoundSearchConfig, trees: Dataset,
                script: SFTBaselineArguments) -> tuple[Dataset, dict]:  # fmt: skip
    """Sample solutions of the round's problems with the round's search policy and keep those `kind` asks for."""
    config = SolverConfig(
        temperature=search.temperature, top_p=search.top_p, max_step_tokens=search.max_step_tokens,
        max_answer_tokens=search.max_answer_tokens, max_depth=search.max_depth, backend=search.backend,
        prompt_template=search.prompt_template, torch_threads=search.torch_threads, seed=script.seed,
        problems_in_flight=search.problems_in_flight, generation_batch_size=search.generation_batch_size,
    )  # fmt: skip
    rows: dict[str, list] = {"prompt": [], "completion": [], "problem_index": [], "correct": []}
    stats = {"samples": 0, "answered": 0, "correct": 0, "problems_with_rows": 0}
    with Solver(record["search_policy"], args=config) as solver:
        (result,) = solver.iter_solve(list(trees["problem"]), [f"maj@{script.num_samples}"])
    for solution in result.solutions:
        gold = trees[solution.index]["answer"]
        kept: list[str] = []
        for candidate in solution.candidates:
            stats["samples"] += 1
            if candidate.answer is None or candidate.text is None:
                continue
            stats["answered"] += 1
            right = bool(grade_answer(candidate.answer, gold))
            stats["correct"] += right
            if (right or script.kind == "random") and candidate.text not in kept and len(kept) < args.sft_top_k:
                kept.append(candidate.text)
                rows["prompt"].append(format_prompt(solution.problem, POLICY_PROMPT))  # as build_sft_dataset does
                rows["completion"].append(candidate.text)
                rows["problem_index"].append(solution.index)
                rows["correct"].append(right)
        stats["problems_with_rows"] += bool(kept)
    return Dataset.from_dict(rows), stats


def main(script: SFTBaselineArguments) -> None:
    record, args, search, lora = _read_round(script.round_dir)
    out = os.path.join(script.round_dir, "sft_baselines", script.kind)
    data_dir, policy_dir = os.path.join(out, "data"), os.path.join(out, "policy")
    if search.torch_threads:
        torch.set_num_threads(search.torch_threads)
    mcts = load_dataset_folder(os.path.join(script.round_dir, "sft"))
    if os.path.exists(os.path.join(data_dir, DONE_FILE)):
        data = load_dataset_folder(data_dir)
        with open(os.path.join(out, "sampling.json")) as f:
            stats = json.load(f)
    else:
        trees = load_dataset_folder(os.path.join(script.round_dir, "trees")).select_columns(["problem", "answer"])
        pool, stats = sample_rows(record, args, search, trees, script)
        order = list(range(len(pool)))
        random.Random(script.seed).shuffle(order)
        data = pool.select(sorted(order[: len(mcts)]))
        stats = {**stats, "pool_rows": len(pool), "rows": len(data), "mcts_rows": len(mcts),
                 "short_of_mcts_rows": max(0, len(mcts) - len(pool))}  # fmt: skip
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, "sampling.json"), "w") as f:
            json.dump(stats, f, indent=2)
        save_dataset_folder(data, data_dir, f"{script.kind} SFT baseline of {script.round_dir}")
        with open(os.path.join(data_dir, DONE_FILE), "w") as f:
            json.dump(stats, f)
    if not os.path.exists(os.path.join(policy_dir, DONE_FILE)):
        state = PartialState(cpu=not torch.cuda.is_available())
        info = fine_tune_policy(record["base_model"], data, args, search, state, policy_dir, lora)
        with open(os.path.join(policy_dir, DONE_FILE), "w") as f:
            json.dump(info, f, default=str)
        with open(os.path.join(out, "baseline.json"), "w") as f:
            json.dump({"kind": script.kind, "round_dir": script.round_dir, "base_model": record["base_model"],
                       "sampled_by": record["search_policy"], "num_samples": script.num_samples, "sampling": stats,
                       "training": info}, f, indent=2, default=str)  # fmt: skip
    print(
        f"{script.kind}: {len(data)} rows (the round's MCTS data: {len(mcts)}; {stats['correct']}/{stats['samples']} "
        f"samples right) -> {policy_dir}"
    )


if __name__ == "__main__":
    main(*TrlParser((SFTBaselineArguments,)).parse_args_and_config())
