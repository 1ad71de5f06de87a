"""Benchmark: training pairs/s of `PPMTrainer` vs TRL's `RewardTrainer` on the same step pairs, same run.

Step pairs as MCTS makes them: a long shared prefix (the question and the earlier steps) and two short steps.
`RewardTrainer` reads `prompt + chosen` and `prompt + rejected` as two full rows per pair; `PPMTrainer` runs the
prefix once per pair (`share_prefix=True`: one row `prefix | chosen | rejected` with a block attention mask), and
is also timed with `share_prefix=False` (two rows per pair, like `RewardTrainer`) to show what the packing buys.
Same tiny Qwen2 (random init, same seed), same batch size, same number of optimizer steps; each trainer is timed
`--repeats` times, interleaved, and the median is kept.

    OMP_NUM_THREADS=1 .venv/bin/python bench/ppm_trainer.py [--steps 12] [--batch-size 8] [--prefix-steps 12]

Last line: one JSON object with "ratio" = ppm_pairs_per_s / reward_trainer_pairs_per_s and "peak_rss_mb".
"""

import argparse
import json
import logging
import os
import random
import resource
import statistics
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import datasets
import torch
from _common import cpu_extensions, print_cpu
from transformers import PrinterCallback, Qwen2Config, Qwen2ForSequenceClassification
from transformers.utils import logging as hf_logging
from trl import RewardConfig, RewardTrainer

from rstar_trl.format import STEP_END, format_prompt
from rstar_trl.ppm.trainer import PPMConfig, PPMTrainer
from rstar_trl.tiny.policy import train_tokenizer


def _step(rng: random.Random, i: int) -> str:
    a, b = rng.randint(2, 999), rng.randint(2, 999)
    return f"# Step {i}: combine {a} and {b} into the running total.\ntotal_{i} = {a} * {b} + {i}\n{STEP_END}\n"


def make_pairs(n: int, prefix_steps: int, seed: int = 0) -> datasets.Dataset:
    """Pairs sharing a prefix of `prefix_steps` earlier steps; the chosen and rejected steps differ."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        question = f"A shop sells {rng.randint(2, 99)} boxes of {rng.randint(2, 99)} pens each. " * 3
        prompt = format_prompt(question + "How many pens are there in all?")
        prompt += "".join(_step(rng, i) for i in range(1, prefix_steps + 1))
        rows.append(
            {"prompt": prompt, "chosen": _step(rng, prefix_steps + 1), "rejected": _step(rng, prefix_steps + 1)}
        )
    return datasets.Dataset.from_list(rows)


def _model(tokenizer, hidden_size: int, layers: int) -> Qwen2ForSequenceClassification:
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=4 * hidden_size,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        num_labels=1,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    return Qwen2ForSequenceClassification(config)


def _common_args(output_dir: str, args: argparse.Namespace) -> dict:
    return {
        "output_dir": output_dir,
        "per_device_train_batch_size": args.batch_size,
        "max_steps": args.steps,
        "learning_rate": 1e-4,
        "bf16": False,
        "gradient_checkpointing": False,
        "use_cpu": True,
        "report_to": "none",
        "save_strategy": "no",
        "logging_steps": args.steps,
        "disable_tqdm": True,
        "dataloader_num_workers": 0,
        "max_length": None,
        "seed": 0,
    }


def time_trainer(kind: str, pairs: datasets.Dataset, tokenizer, args: argparse.Namespace) -> dict:
    model = _model(tokenizer, args.hidden_size, args.layers)
    with tempfile.TemporaryDirectory() as scratch:
        if kind == "reward_trainer":
            texts = pairs.map(lambda r: {"chosen": r["prompt"] + r["chosen"], "rejected": r["prompt"] + r["rejected"]})
            trainer = RewardTrainer(
                model,
                args=RewardConfig(**_common_args(scratch, args)),
                train_dataset=texts.remove_columns("prompt"),
                processing_class=tokenizer,
            )
        else:
            config = PPMConfig(**_common_args(scratch, args), share_prefix=kind == "ppm_shared_prefix")
            trainer = PPMTrainer(model, args=config, train_dataset=pairs, processing_class=tokenizer)
        trainer.remove_callback(PrinterCallback)  # the log lines would bury the figures
        batch = trainer.data_collator([trainer.train_dataset[i] for i in range(args.batch_size)])
        metrics = trainer.train().metrics
    return {
        "pairs_per_s": args.steps * args.batch_size / metrics["train_runtime"],
        "tokens_per_batch": int(batch["input_ids"].numel()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=12, help="optimizer steps per timed run")
    parser.add_argument("--batch-size", type=int, default=8, help="pairs per step (both trainers)")
    parser.add_argument("--prefix-steps", type=int, default=12, help="earlier steps in the shared prefix")
    parser.add_argument("--hidden-size", type=int, default=128)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per trainer (median kept)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    args = parser.parse_args()
    print_cpu()
    torch.set_num_threads(args.threads)
    datasets.disable_progress_bars()
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    logging.getLogger("rstar_trl").setLevel(logging.ERROR)

    pairs = make_pairs(args.steps * args.batch_size, args.prefix_steps)
    tokenizer = train_tokenizer([row["prompt"] + row["chosen"] for row in make_pairs(200, args.prefix_steps, seed=1)])
    prefix_tokens = statistics.mean(len(tokenizer(p)["input_ids"]) for p in pairs["prompt"][:50])
    step_tokens = statistics.mean(len(tokenizer(c)["input_ids"]) for c in pairs["chosen"][:50])
    print(f"pairs: {len(pairs)}, prefix ~{prefix_tokens:.0f} tokens, step ~{step_tokens:.0f} tokens; "
          f"model: Qwen2 hidden {args.hidden_size}, {args.layers} layers; batch {args.batch_size} pairs, "
          f"{args.steps} steps, torch threads {torch.get_num_threads()}")  # fmt: skip

    kinds = ("reward_trainer", "ppm_two_rows", "ppm_shared_prefix")
    runs: dict[str, list[dict]] = {kind: [] for kind in kinds}
    for repeat in range(args.repeats):
        for kind in kinds:
            runs[kind].append(time_trainer(kind, pairs, tokenizer, args))
            print(f"  repeat {repeat}: {kind:18s} {runs[kind][-1]['pairs_per_s']:7.1f} pairs/s", flush=True)
    speed = {kind: statistics.median(run["pairs_per_s"] for run in runs[kind]) for kind in kinds}
    tokens = {kind: runs[kind][0]["tokens_per_batch"] for kind in kinds}
    for kind in kinds:
        print(
            f"{kind:18s} {speed[kind]:7.1f} pairs/s (median of {args.repeats}), {tokens[kind]} token slots per batch"
        )
    peak_rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(
        json.dumps(
            {
                "ratio": round(speed["ppm_shared_prefix"] / speed["reward_trainer"], 3),
                "ratio_two_rows": round(speed["ppm_two_rows"] / speed["reward_trainer"], 3),
                "ppm_pairs_per_s": round(speed["ppm_shared_prefix"], 2),
                "ppm_two_rows_pairs_per_s": round(speed["ppm_two_rows"], 2),
                "reward_trainer_pairs_per_s": round(speed["reward_trainer"], 2),
                "token_slots_per_batch": tokens,
                "prefix_tokens": round(prefix_tokens),
                "step_tokens": round(step_tokens),
                "batch_size": args.batch_size,
                "steps": args.steps,
                "peak_rss_mb": round(peak_rss_mb, 1),
                "threads": torch.get_num_threads(),
                "cpu": cpu_extensions(),
            }
        )
    )


if __name__ == "__main__":
    main()
