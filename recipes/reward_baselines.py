"""Train the paper's reward-model baselines next to a round's PPM, on the same trees (paper §3.3, Table 8).

    python recipes/reward_baselines.py --round_dir runs/tiny/round_2 --loss_type pqm
    python recipes/reward_baselines.py --round_dir runs/tiny/round_2 --loss_type orm

`pqm`: the Q-value regression baseline (MSE of the value tanh(score / value_scale) vs each step's Q,
`build_step_values`);
`orm`: the outcome reward model (pairs of whole correct vs wrong trajectories, `build_outcome_pairs`).
Both start, like the round's PPM, from the round's fine-tuned policy with a one-output head, and train with the
same settings as the round's PPM (`PPMTrainer` with another `loss_type`). The checkpoint goes to
`<round_dir>/<loss_type>` and scores with `TransformersPPMScorer` exactly like the PPM.
"""

import json
import os
from dataclasses import dataclass, field

import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer
from trl import TrlParser

from rstar_trl import PPMConfig, PPMTrainer, build_outcome_pairs, build_step_values
from rstar_trl.hub import load_dataset_folder


@dataclass
class BaselineArguments:
    round_dir: str = field(metadata={"help": "A finished round folder (with trees/, policy/, ppm/)."})
    loss_type: str = field(default="pqm", metadata={"help": "'pqm' (Q regression) or 'orm' (outcome pairs).",
                                                    "choices": ["pqm", "orm"]})  # fmt: skip
    epochs: float = field(default=2.0, metadata={"help": "Training epochs (the tiny PPM's default)."})
    learning_rate: float = field(default=5e-4, metadata={"help": "Learning rate (the tiny PPM's default)."})
    batch_size: int = field(default=16, metadata={"help": "Per-device batch size."})
    max_length: int = field(default=1024, metadata={"help": "Tokens per example (prefix cut from the left)."})
    seed: int = field(default=42, metadata={"help": "Training seed."})


def main(args: BaselineArguments) -> None:
    for part in ("trees", "policy"):
        if not os.path.exists(os.path.join(args.round_dir, part)):
            raise SystemExit(f"{args.round_dir} has no {part}/: run the round first (recipes/round.py)")
    trees = load_dataset_folder(os.path.join(args.round_dir, "trees"))
    build = build_step_values if args.loss_type == "pqm" else build_outcome_pairs
    data, stats = build(trees, return_stats=True)
    policy = os.path.join(args.round_dir, "policy")
    tokenizer = AutoTokenizer.from_pretrained(policy)
    model = AutoModelForSequenceClassification.from_pretrained(policy, num_labels=1)
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (
            tokenizer.eos_token_id)  # fmt: skip
    output_dir = os.path.join(args.round_dir, args.loss_type)
    config = PPMConfig(
        output_dir=output_dir, loss_type=args.loss_type, num_train_epochs=args.epochs,
        learning_rate=args.learning_rate, per_device_train_batch_size=args.batch_size, max_length=args.max_length,
        bf16=False, gradient_checkpointing=False, use_cpu=not torch.cuda.is_available(), report_to="none",
        save_strategy="no", logging_steps=10, seed=args.seed, warmup_steps=0.05,
    )  # fmt: skip
    trainer = PPMTrainer(model=model, args=config, train_dataset=data, processing_class=tokenizer)
    result = trainer.train()
    trainer.save_model(output_dir)
    with open(os.path.join(output_dir, "baseline.json"), "w") as f:
        json.dump({"loss_type": args.loss_type, "rows": len(data), "data_stats": stats,
                   "train_loss": result.training_loss, "initialised_from": policy}, f, indent=2)  # fmt: skip
    print(f"{args.loss_type.upper()} trained on {len(data)} rows -> {output_dir}")


if __name__ == "__main__":
    main(*TrlParser((BaselineArguments,)).parse_args_and_config())
