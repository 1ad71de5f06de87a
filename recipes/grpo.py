"""GRPO from a round's policy, rewarded by the round's PPM (step values, `rstar_trl.ppm.PPMReward`) and by execution
correctness (`CorrectnessReward`), with TRL's `GRPOTrainer`.

    python recipes/grpo.py --config recipes/tiny/grpo.yaml                         # the tiny default's round 2
    python recipes/grpo.py --round_dir runs/tiny/round_2 --output_dir runs/tiny/grpo --max_steps 50
    accelerate launch recipes/grpo.py --round_dir runs/round_4 --output_dir runs/grpo \\
        --dataset HuggingFaceH4/MATH-500 --use_vllm --ppm_aggregation min

Each completion is judged as the search would have written it (see `rstar_trl.ppm.reward`): its steps' programs
run in the sandbox, the executed output replaces the one the policy guessed, and the PPM values every step prefix
(paper Eq. 4's model, read as in Eq. 3). Rewards: the PPM's aggregated step value (`--ppm_weight`) plus 1 for an
executed program that prints the gold answer (`--correctness_weight`); a completion the search would reject gets
-1 from the PPM and 0 for correctness. Every `GRPOConfig` option is accepted (`--help`); the defaults that matter
here are set in recipes/tiny/grpo.yaml. The trained policy and its tokenizer go to --output_dir; checkpoints every
--save_steps let an interrupted run resume (re-run the same command).
"""

import json
import logging
import os
from dataclasses import dataclass, field

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.trainer_utils import get_last_checkpoint
from trl import GRPOConfig, GRPOTrainer, TrlParser

from rstar_trl.evaluation import load_eval_problems
from rstar_trl.format import format_prompt
from rstar_trl.ppm import CompletionJudge, CorrectnessReward, PPMReward, ServerPPMScorer
from rstar_trl.search.generator import PROMPT_TEMPLATES


@dataclass
class GRPOScriptArguments:
    round_dir: str | None = field(
        default=None,
        metadata={"help": "A finished round folder (round_<k>/ with policy/ and ppm/): GRPO starts from its policy "
                  "and is rewarded by its PPM. --model_name_or_path / --ppm_path override either."},
    )  # fmt: skip
    model_name_or_path: str | None = field(default=None, metadata={"help": "The policy to train (path or Hub id)."})
    ppm_path: str | None = field(default=None, metadata={"help": "The PPM checkpoint that rewards the steps."})
    ppm_backend: str = field(
        default="transformers",
        metadata={"help": "Where the PPM runs: 'transformers' or 'vllm' (pooling runner).",
                  "choices": ["transformers", "vllm"]},
    )  # fmt: skip
    ppm_server_url: str | None = field(
        default=None,
        metadata={"help": "Score with the PPM served by `vllm serve <ppm> --runner pooling` at this URL "
                  "(ServerPPMScorer), shared by every training process; --ppm_path then names a local copy of the "
                  "served checkpoint (its tokenizer and config), or is left out to use the path the server reports."},
    )  # fmt: skip
    ppm_aggregation: str = field(
        default="min",
        metadata={"help": "How a completion's step values become its reward: min, last, mean or prod.",
                  "choices": ["min", "last", "mean", "prod"]},
    )  # fmt: skip
    ppm_weight: float = field(default=1.0, metadata={"help": "Weight of the PPM reward (0 drops it)."})
    correctness_weight: float = field(
        default=1.0, metadata={"help": "Weight of the execution-correctness reward, 1 or 0 (0 drops it)."}
    )
    ppm_batch_size: int = field(default=64, metadata={"help": "Texts per PPM forward pass (transformers)."})
    ppm_max_length: int = field(default=1024, metadata={"help": "Tokens of a PPM input kept (the last ones)."})
    dataset: str = field(
        default="tiny-train",
        metadata={"help": "Problems with gold answers: tiny-train (the embedded task's train split), a Hub dataset id "
                  "or a local JSON/JSONL file (columns found like recipes/eval.py does)."},
    )  # fmt: skip
    dataset_split: str = field(default="train", metadata={"help": "Split of a Hub or folder dataset."})
    limit: int | None = field(default=None, metadata={"help": "Use only the first N problems."})
    prompt_template: str = field(
        default="policy",
        metadata={"help": "The policy prompt: 'policy' (fine-tuned policies), 'few_shot', or a template with a "
                  "'{question}' field. The PPM reads the same prompt."},
    )  # fmt: skip
    executor_timeout: float = field(default=10.0, metadata={"help": "Seconds per executed program."})


@dataclass
class RecipeGRPOConfig(GRPOConfig):
    """`GRPOConfig` whose bf16 default follows the machine (TRL's default, bf16, fails on a CPU)."""

    bf16: bool | None = field(
        default=None, metadata={"help": "Train in bf16 (default: when a CUDA GPU supports it; never on CPU)."}
    )

    def __post_init__(self):
        if self.bf16 is None:
            self.bf16 = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
        super().__post_init__()


def _resolve_models(args: GRPOScriptArguments) -> tuple[str, str | None]:
    policy, ppm = args.model_name_or_path, args.ppm_path
    if args.round_dir is not None:
        if not os.path.isdir(args.round_dir):
            raise SystemExit(f"--round_dir {args.round_dir!r} does not exist")
        policy = policy or os.path.join(args.round_dir, "policy")
        ppm = ppm or os.path.join(args.round_dir, "ppm")
    if policy is None:
        raise SystemExit("give --round_dir (a finished round) or --model_name_or_path (the policy to train)")
    if args.ppm_weight != 0 and ppm is None and not args.ppm_server_url:
        raise SystemExit("the PPM reward needs --ppm_path (or --round_dir); --ppm_weight 0 trains without it")
    for name, path in (("policy", policy), ("PPM", ppm if args.ppm_weight != 0 else None)):
        if path and (path.startswith((".", "/")) or path.count("/") > 1) and not os.path.exists(path):
            raise SystemExit(f"the {name} {path!r} does not exist (run the round first: recipes/round.py)")
    return policy, ppm


def _scorer_options(args: GRPOScriptArguments, template: str, served: bool) -> dict:
    """Options of the scorer PPMReward builds from a path (none for a server scorer, built here)."""
    if served:
        return {}
    options = {"max_length": args.ppm_max_length, "prompt_template": template}
    if args.ppm_backend == "transformers":
        options["batch_size"] = args.ppm_batch_size
    return options


def main(script_args: GRPOScriptArguments, training_args: GRPOConfig) -> None:
    policy, ppm_path = _resolve_models(script_args)
    if script_args.prompt_template not in PROMPT_TEMPLATES and "{question}" not in script_args.prompt_template:
        raise SystemExit(f"--prompt_template must be one of {sorted(PROMPT_TEMPLATES)} or contain '{{question}}'")
    template = PROMPT_TEMPLATES.get(script_args.prompt_template, script_args.prompt_template)
    try:
        problems = load_eval_problems(script_args.dataset, script_args.dataset_split, script_args.limit)
    except (ValueError, FileNotFoundError) as exc:
        raise SystemExit(f"--dataset {script_args.dataset!r}: {exc}") from None
    dataset = problems.map(lambda row: {"prompt": format_prompt(row["problem"], template)})

    tokenizer = AutoTokenizer.from_pretrained(policy)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(policy)
    judge = CompletionJudge(tokenizer, executor_timeout=script_args.executor_timeout)
    rewards, weights, served = [], [], []
    if script_args.ppm_weight != 0:
        ppm = ppm_path
        if script_args.ppm_server_url:
            ppm = ServerPPMScorer(
                script_args.ppm_server_url, checkpoint=ppm_path, max_length=script_args.ppm_max_length,
                prompt_template=template, batch_size=script_args.ppm_batch_size,
            )  # fmt: skip
            served.append(ppm)
        rewards.append(
            PPMReward(
                ppm,
                aggregation=script_args.ppm_aggregation,
                backend=script_args.ppm_backend,
                judge=judge,
                **_scorer_options(script_args, template, served=ppm is not ppm_path),
            )
        )
        weights.append(script_args.ppm_weight)
    if script_args.correctness_weight != 0:
        rewards.append(CorrectnessReward(judge=judge))
        weights.append(script_args.correctness_weight)
    if not rewards:
        raise SystemExit("--ppm_weight and --correctness_weight are both 0: there is nothing to reward")
    training_args.reward_weights = weights

    trainer = GRPOTrainer(model=model, reward_funcs=rewards, args=training_args, train_dataset=dataset,
                          processing_class=tokenizer)  # fmt: skip
    last = get_last_checkpoint(training_args.output_dir) if os.path.isdir(training_args.output_dir) else None
    if last is not None:
        print(f"Resuming from {last}")
    try:
        trainer.train(resume_from_checkpoint=last)
        trainer.save_model(training_args.output_dir)
        if trainer.accelerator.is_main_process:
            tokenizer.save_pretrained(training_args.output_dir)
            trainer.create_model_card(model_name=os.path.basename(os.path.normpath(training_args.output_dir)),
                                      dataset_name=script_args.dataset)  # fmt: skip
            record = {"policy": policy, "ppm": ppm_path, "rewards": [r.__name__ for r in rewards],
                      "reward_weights": weights, "dataset": script_args.dataset, "problems": len(dataset),
                      "steps": trainer.state.global_step}  # fmt: skip
            with open(os.path.join(training_args.output_dir, "grpo.json"), "w") as f:
                json.dump(record, f, indent=2)
            print(f"Wrote the GRPO policy to {training_args.output_dir}: {json.dumps(record)}")
    finally:
        for closeable in [*rewards, *served]:
            closeable.close()
        judge.close()


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    parser = TrlParser((GRPOScriptArguments, RecipeGRPOConfig))
    main(*parser.parse_args_and_config())
