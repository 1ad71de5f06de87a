"""One self-evolution round of rStar-Math (paper §3.4) as resumable stages: search, data, policy SFT, PPM, Hub push.

Round k, under `output_dir/round_<k>/`:

| stage | folder | what |
|---|---|---|
| trees | `trees/` | MCTS trees of every problem (`MCTSGenerator`; round 4: unsolved problems searched again) |
| sft | `sft/` | top-2 correct solutions per solved problem (`build_sft_dataset`) |
| pairs | `pairs/` | step preference pairs (`build_preference_pairs`) |
| policy | `policy/` | the BASE model fine-tuned on `sft/` with TRL's `SFTTrainer` (completion-only loss) |
| ppm | `ppm/` | a PPM initialised from `policy/`, trained on `pairs/` with `PPMTrainer` |

The trees read the problems and the searching policy (and PPM), sft and pairs read the trees, the policy reads the
base model and sft, the PPM reads the policy and pairs (`STAGE_INPUTS`).

Every folder is ready for the Hub (data as parquet or a checkpoint, plus a `README.md` card) and holds `DONE.json`
once the stage has finished: the stage's stats plus

- `fingerprint`: what the output depends on: the stage's settings (e.g. the search budgets, the SFT learning rate,
  the LoRA options, the number of processes) and its inputs (the problems' hash, the models that search or are
  fine-tuned, and the `output_sha256` of every stage it reads);
- `output_sha256`: a hash of the folder's files (card, markers and checkpoints excepted), which the fingerprints of
  the stages reading it record.

A stage that starts writes its fingerprint to `STARTED.json` (removed when `DONE.json` is written last). A re-run
skips a finished stage and resumes a started one (the search from its shards under `search/`, the trainers from
their last checkpoint with `save_steps`) only if the fingerprint is unchanged; any difference, including a
recomputed input, is refused before any compute, naming the stage and each differing field (old -> new). `redo`
(`--redo trees,sft`, `--redo all`) deletes the named stages and every stage that reads them, which are then
computed again. Model inputs that no stage of the run made (the base model, a bootstrap policy) are identified by
name for Hub ids, and for local folders by the content of their files up to 64 MiB and the name and size of larger
ones (weights overwritten in place with the same size are not noticed).

`round.json` records the round's lineage (base model, the policy and PPM that searched, the full config, and each
finished stage's `output_sha256`).

Every model initialisation (the loaded checkpoints, the PPM's new score head, resized embeddings, LoRA weights) is
preceded by `set_seed(seed)`, so a training stage resumed from a checkpoint ends with the same weights as an
uninterrupted one. With `RoundModelConfig.use_peft` both trainers train LoRA adapters (TRL's `get_peft_config`); each
adapter is saved in `adapter/` and merged into the stage's checkpoint (`merge_and_unload`), so the next round's
search and the scorers load a plain checkpoint.
"""

from __future__ import annotations

import gc
import glob
import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
from dataclasses import asdict, dataclass, field, replace

import torch
from accelerate import PartialState
from datasets import Dataset

from . import __version__
from .data import load_problems
from .hub import HubPushError, load_dataset_folder, push_folder, render_card, save_dataset_folder
from .ppm import (
    PPMConfig,
    PPMTrainer,
    ServerPPMScorer,
    TransformersPPMScorer,
    build_preference_pairs,
    build_sft_dataset,
)
from .ppm.server_scorer import served_ppm_model
from .ppm.trainer import RSTAR_MATH_CITATION
from .search import MCTSConfig, MCTSGenerator
from .search.generator import _TREE_SETTINGS
from .search.server_backend import ServerUnreachableError
from .search.tree import TREE_SCHEMA_VERSION

__all__ = ["ARTIFACTS", "STAGE_INPUTS", "RoundArguments", "RoundModelConfig", "RoundPlan", "RoundSearchConfig",
           "StaleStageError", "downstream", "plan_round", "run_round"]  # fmt: skip

logger = logging.getLogger(__name__)

ARTIFACTS = ("trees", "sft", "pairs", "policy", "ppm")
REPO_TYPES = {"trees": "dataset", "sft": "dataset", "pairs": "dataset", "policy": "model", "ppm": "model"}
# What each stage reads from the round (ARTIFACTS is in stage order: inputs come first).
STAGE_INPUTS = {"trees": (), "sft": ("trees",), "pairs": ("trees",), "policy": ("sft",), "ppm": ("policy", "pairs")}
DONE_FILE = "DONE.json"
STARTED_FILE = "STARTED.json"
ADAPTER_DIR = "adapter"
# Files of a model folder that no stage of the run made are hashed whole up to this size, larger ones by name and size.
_HASH_IN_FULL = 64 * 2**20
DEFAULT_OUTPUT_DIR = "runs/tiny"
TINY_POLICY_DIR = "tiny_policy"
# Lineage sections appended to cards whose template belongs to another component (trees, PPM) start here, so that
# re-rendering (e.g. with Hub repo ids at push time) replaces the section instead of adding another.
_LINEAGE_MARKER = "<!-- rstar_trl self-evolution lineage -->"


@dataclass
class RoundSearchConfig(MCTSConfig):
    """`MCTSConfig` of a round: the same search settings; `output_dir` is the whole run's folder."""

    output_dir: str | None = field(
        default=None,
        metadata={"help": f"The run's folder (default {DEFAULT_OUTPUT_DIR}): round_<k>/{{trees,sft,pairs,policy,"
                  "ppm}} go under it, and the search's resumable shards under round_<k>/search."},
    )  # fmt: skip


@dataclass
class RoundArguments:
    """What a round searches with and on, how it trains, and where its artifacts go.

    > Parameters that choose the models

    Args:
        round: the self-evolution round k (paper §3.4).
        model_name_or_path: the policy that searches (round 1: the bootstrap model; later: round k-1's policy).
        base_model: the model every round fine-tunes (paper §3.4: from the BASE model each round).
        ppm_model_name_or_path: the PPM that initialises Q in PPM-guided rounds (Eq. 3).
        ppm_guided: whether the search uses a PPM (default: from round 3 on).
        ppm_server_url: score with that PPM served by `vllm serve --runner pooling` at this URL (`ServerPPMScorer`).

    > Parameters that choose the problems

    Args:
        dataset, dataset_split, limit, drop_unanswered: see `rstar_trl.load_problems`.

    The extra searches of round 4 (`--unsolved_rollouts`) are a search setting: `MCTSConfig.unsolved_rollouts`.

    > Parameters of the training data and of the two trainers

    Args:
        sft_top_k, pairs_min_q_gap, pairs_per_side: see `build_sft_dataset` and `build_preference_pairs`.
        sft_*, ppm_*: `SFTConfig` / `PPMConfig` settings of the policy and PPM training.

    > Parameters that control the Hub

    Args:
        push_to_hub, hub_org, hub_run_name, hub_repo_pattern, hub_private.

    > Parameters that control re-runs

    Args:
        stop_after: stop after this stage.
        redo: recompute these stages (comma-separated, or `all`) and every stage that reads them.
    """

    round: int = field(default=1, metadata={"help": "Self-evolution round k (1-4 in the paper)."})
    model_name_or_path: str | None = field(
        default=None,
        metadata={"help": "Policy that searches this round. Default: round 1: --base_model (without one, the "
                  "embedded tiny policy, built in output_dir/tiny_policy); later rounds: "
                  "output_dir/round_<k-1>/policy."},
    )  # fmt: skip
    base_model: str | None = field(
        default=None,
        metadata={"help": "Model every round fine-tunes from (the BASE model, paper §3.4). Default: round 1: "
                  "--model_name_or_path or the tiny policy; later rounds: the base model recorded by round k-1."},
    )  # fmt: skip
    ppm_model_name_or_path: str | None = field(
        default=None,
        metadata={"help": "PPM that initialises the Q of new nodes (Eq. 3) in PPM-guided rounds. Default: "
                  "output_dir/round_<k-1>/ppm."},
    )  # fmt: skip
    ppm_guided: bool | None = field(
        default=None,
        metadata={"help": "Search with a PPM (PPM-initialised Q, Eq. 3). Default: from round 3 on (paper §3.4)."},
    )
    ppm_server_url: str | None = field(
        default=None,
        metadata={"help": "The search PPM of PPM-guided rounds (>= 3) is served by `vllm serve <ppm> --runner "
                  "pooling` at this URL (e.g. http://host:8001) instead of loaded from output_dir/round_<k-1>/ppm in "
                  "every search process, so the processes share one PPM. The server must serve that checkpoint "
                  "(compared when both are readable here) or --ppm_model_name_or_path (which may be a local copy of "
                  "the served one: its tokenizer and config are read from there). Ignored in rounds without a PPM."},
    )  # fmt: skip
    dataset: str | None = field(
        default=None,
        metadata={"help": "Problems with gold answers: a JSONL file or Hub dataset (rstar_trl.load_problems). "
                  "Default: the tiny synthetic train split."},
    )  # fmt: skip
    dataset_split: str = field(default="train", metadata={"help": "Split of a Hub dataset."})
    limit: int | None = field(default=None, metadata={"help": "Search only the first N problems (default: all)."})
    drop_unanswered: bool = field(
        default=False,
        metadata={"help": "Drop problems without a findable gold answer (with a warning) instead of stopping."},
    )
    tiny_bootstrap_steps: int = field(
        default=600,
        metadata={"help": "Bootstrap training steps of the tiny policy. With the default (600) the policy shipped "
                  "with rstar_trl is copied (the same weights on every machine); any other value builds one."},
    )  # fmt: skip
    tiny_build_policy: bool = field(
        default=False,
        metadata={"help": "Build the tiny policy from scratch (python -m rstar_trl.tiny; a few minutes on CPU) even "
                  "when the shipped one matches --tiny_bootstrap_steps."},
    )  # fmt: skip
    sft_top_k: int = field(default=2, metadata={"help": "Correct solutions kept per solved problem (paper §3.4: 2)."})
    pairs_min_q_gap: float | None = field(
        default=0.5, metadata={"help": "Smallest Q gap of a kept step pair (official code: 0.5; docs/method.md)."}
    )
    pairs_per_side: int = field(
        default=2, metadata={"help": "Positives and negatives per prefix (paper §3.3: 2, so 2x2 pairs)."}
    )
    sft_learning_rate: float = field(default=7e-6, metadata={"help": "Policy SFT learning rate (paper: 7e-6)."})
    sft_num_train_epochs: float = field(default=2.0, metadata={"help": "Policy SFT epochs (paper: 2)."})
    sft_max_steps: int = field(default=-1, metadata={"help": "Policy SFT steps; overrides the epochs if > 0."})
    sft_per_device_train_batch_size: int = field(default=4, metadata={"help": "Policy SFT batch per device."})
    sft_gradient_accumulation_steps: int = field(
        default=4, metadata={"help": "Policy SFT accumulation (total batch = this x batch x processes; paper: 128)."}
    )
    sft_max_length: int = field(default=4096, metadata={"help": "Policy SFT sequence length (paper: 4096)."})
    ppm_learning_rate: float = field(default=7e-6, metadata={"help": "PPM learning rate (paper: 7e-6)."})
    ppm_num_train_epochs: float = field(default=1.0, metadata={"help": "PPM epochs (paper: 1)."})
    ppm_max_steps: int = field(default=-1, metadata={"help": "PPM steps; overrides the epochs if > 0."})
    ppm_per_device_train_batch_size: int = field(default=8, metadata={"help": "PPM pairs per device and step."})
    ppm_gradient_accumulation_steps: int = field(
        default=8, metadata={"help": "PPM accumulation (total batch = this x batch x processes; paper: 512)."}
    )
    ppm_max_length: int = field(default=2048, metadata={"help": "PPM tokens of prefix + step (paper: 2048)."})
    warmup_steps: float = field(
        default=0.05, metadata={"help": "Warm-up of both trainers: steps, or a fraction of the steps if < 1."}
    )
    lr_scheduler_type: str = field(default="cosine", metadata={"help": "Learning-rate schedule of both trainers."})
    bf16: bool | None = field(
        default=None, metadata={"help": "Train in bf16 (default: when a CUDA GPU supports it; never on CPU)."}
    )
    gradient_checkpointing: bool = field(default=False, metadata={"help": "Gradient checkpointing in both trainers."})
    logging_steps: float = field(default=10, metadata={"help": "Log training metrics every N steps."})
    save_steps: int | None = field(
        default=None,
        metadata={"help": "Save a training checkpoint every N steps; an interrupted training stage then resumes from "
                  "its last checkpoint (default: no checkpoints, the stage restarts)."},
    )  # fmt: skip
    report_to: str = field(default="none", metadata={"help": "Trainer integrations to report to (e.g. wandb)."})
    stop_after: str | None = field(
        default=None,
        metadata={"help": "Stop after this stage (a re-run goes on from there), e.g. `pairs` to search on vLLM "
                  "processes, then train under another launcher (ZeRO-3).", "choices": list(ARTIFACTS)},
    )  # fmt: skip
    redo: str | None = field(
        default=None,
        metadata={"help": "Recompute these stages and every stage that reads them: a comma-separated list of "
                  f"{', '.join(ARTIFACTS)}, or `all`. Their folders are deleted first (trees: with the search's "
                  "shards). A stage made with other settings or inputs than this run's is otherwise refused. Drop "
                  "it when resuming an interrupted run, or the run starts those stages over."},
    )  # fmt: skip
    push_to_hub: bool = field(
        default=False, metadata={"help": "Push the round's datasets and checkpoints (with cards) to the Hub."}
    )
    hub_org: str | None = field(default=None, metadata={"help": "Hub user or organisation ({org} in the pattern)."})
    hub_run_name: str | None = field(
        default=None, metadata={"help": "Run name ({run} in the pattern). Default: the output_dir's name."}
    )
    hub_repo_pattern: str = field(
        default="{org}/{run}-round{round}-{artifact}",
        metadata={"help": "Hub repo of each artifact; {artifact} is trees, sft, pairs, policy or ppm."},
    )
    hub_private: bool = field(default=False, metadata={"help": "Create the Hub repos as private."})


@dataclass
class RoundModelConfig:
    """The LoRA options of `trl.ModelConfig`: same names, defaults and meaning, turned into a `peft.LoraConfig` by
    `trl.get_peft_config`, for both trainers of a round (the policy's `SFTTrainer`, task CAUSAL_LM, and the PPM's
    `PPMTrainer`, task SEQ_CLS, which also trains the new score head in full).

    `trl.ModelConfig` itself cannot be parsed next to `RoundArguments` and `MCTSConfig`: its `model_name_or_path`
    and `dtype` options clash with theirs. Its quantisation options (QLoRA) are not offered.

    A LoRA stage saves its adapter in `adapter/` and merges it into the folder's checkpoint (`merge_and_unload`),
    so the next round searches with, and the scorers load, a plain checkpoint. When the policy's tokenizer gets the
    step markers as new tokens (`add_step_tokens`), their embedding rows (input, and output if untied) are trained
    too (PEFT's `trainable_token_indices`): LoRA alone would leave them untrained.
    """

    use_peft: bool = field(
        default=False,
        metadata={"help": "Train LoRA adapters (merged into the saved checkpoints) instead of every weight, for "
                  "the policy SFT and the PPM."},
    )  # fmt: skip
    lora_r: int = field(default=16, metadata={"help": "LoRA rank r."})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA alpha (the update is scaled by alpha / r)."})
    lora_dropout: float = field(default=0.05, metadata={"help": "LoRA dropout."})
    lora_target_modules: list[str] | None = field(
        default=None,
        metadata={"help": "Modules LoRA adapts, e.g. q_proj v_proj, or all-linear (default: PEFT's choice for the "
                  "architecture)."},
    )  # fmt: skip
    lora_target_parameters: list[str] | None = field(
        default=None,
        metadata={"help": "Parameters LoRA adapts directly (PEFT's target_parameters, e.g. MoE experts)."},
    )
    lora_modules_to_save: list[str] | None = field(
        default=None,
        metadata={"help": "Modules trained in full next to the adapters (the PPM's score head always is)."},
    )
    use_rslora: bool = field(default=False, metadata={"help": "Rank-stabilised LoRA: scale by alpha / sqrt(r)."})
    use_dora: bool = field(default=False, metadata={"help": "Weight-decomposed LoRA (DoRA)."})

    def __post_init__(self):
        if self.lora_r < 1:
            raise ValueError(f"--lora_r must be >= 1, got {self.lora_r}")

    def peft_config(self, task_type: str):
        """The `peft.LoraConfig` of one trainer (None without `use_peft`), made by `trl.get_peft_config`."""
        from trl import ModelConfig, get_peft_config

        return get_peft_config(ModelConfig(**asdict(self), lora_task_type=task_type))

    def settings(self) -> dict:
        """What a trained model depends on (the fingerprint of the training stages)."""
        return asdict(self) if self.use_peft else {"use_peft": False}


@dataclass
class RoundPlan:
    """Everything a round resolved before any compute: folders, models, problems and artifact names."""

    round: int
    run_dir: str
    base_model: str
    search_policy: str
    search_ppm: str | None
    build_tiny: bool
    problems: Dataset
    dataset_name: str
    repo_ids: dict[str, str] = field(default_factory=dict)
    lora: RoundModelConfig = field(default_factory=RoundModelConfig)
    redo: list[str] = field(default_factory=list)  # the stages `redo` deletes: those named and all after them
    problems_sha256: str = ""
    # The PPM server that scores for the search ({"url", "model"}; `RoundArguments.ppm_server_url`), or None.
    search_ppm_server: dict | None = None

    @property
    def round_dir(self) -> str:
        return os.path.join(self.run_dir, f"round_{self.round}")

    def path(self, artifact: str) -> str:
        return os.path.join(self.round_dir, artifact)

    def name(self, artifact: str) -> str:
        """How cards refer to an artifact: its Hub repo id when pushing, else its local folder."""
        return self.repo_ids.get(artifact, self.path(artifact))


def _is_done(folder: str) -> bool:
    return os.path.exists(os.path.join(folder, DONE_FILE))


def _read_json(path: str) -> dict:
    with open(path) as f:
        return json.load(f)


def _write_json(path: str, data: dict) -> None:
    """Write atomically (temporary file + rename): a marker is either whole or absent, even after `kill -9`."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=2, default=str)
    os.replace(tmp, path)


def _check_model(value: str, option: str) -> None:
    """A local path must exist; anything else is left to `from_pretrained` (a Hub id such as org/name)."""
    looks_local = value.startswith((".", "/", "~")) or value.count("/") > 1
    if not os.path.exists(value) and looks_local:
        raise FileNotFoundError(f"{option} {value!r} does not exist")


def plan_round(args: RoundArguments, search: MCTSConfig, lora: RoundModelConfig | None = None) -> RoundPlan:
    """Resolve and check a round's inputs. Everything that can be wrong is reported here, before any compute,
    including finished or started stages made with other settings or inputs (`StaleStageError`)."""
    lora = lora or RoundModelConfig()
    if args.round < 1:
        raise ValueError(f"--round must be >= 1, got {args.round}")
    run_dir = search.output_dir or DEFAULT_OUTPUT_DIR
    previous = os.path.join(run_dir, f"round_{args.round - 1}")
    if args.push_to_hub and "{org}" in args.hub_repo_pattern and not args.hub_org:
        raise ValueError("--push_to_hub needs --hub_org (the Hub user or organisation of the repos)")
    if args.stop_after is not None and args.stop_after not in ARTIFACTS:
        raise ValueError(f"--stop_after must be one of {list(ARTIFACTS)}, got {args.stop_after!r}")
    redo = _parse_redo(args.redo)

    given = {"--model_name_or_path": args.model_name_or_path, "--base_model": args.base_model,
             "--ppm_model_name_or_path": args.ppm_model_name_or_path}  # fmt: skip
    for option, value in given.items():
        if value is not None:
            _check_model(value, option)

    build_tiny = False
    base_model = args.base_model
    if base_model is None and args.round == 1:
        base_model = args.model_name_or_path
    if base_model is None and args.round > 1 and os.path.exists(os.path.join(previous, "round.json")):
        base_model = _read_json(os.path.join(previous, "round.json"))["base_model"]
        _check_model(base_model, f"the base model recorded in {os.path.join(previous, 'round.json')},")
    if base_model is None:
        base_model = os.path.join(run_dir, TINY_POLICY_DIR)
        build_tiny = args.round == 1 and not os.path.exists(os.path.join(base_model, "config.json"))
        if not build_tiny:
            _check_model(base_model, "the tiny base model")

    search_policy = args.model_name_or_path
    if search_policy is None:
        if args.round == 1:
            search_policy = base_model
        elif _is_done(os.path.join(previous, "policy")):
            search_policy = os.path.join(previous, "policy")
        else:
            raise FileNotFoundError(
                f"round {args.round} searches with round {args.round - 1}'s policy, but "
                f"{os.path.join(previous, 'policy')} has not finished: run round {args.round - 1} first or pass "
                "--model_name_or_path"
            )

    search_ppm = search_ppm_server = served = None
    if args.ppm_guided if args.ppm_guided is not None else args.round >= 3:
        search_ppm = args.ppm_model_name_or_path
        if args.ppm_server_url:
            try:
                served = served_ppm_model(args.ppm_server_url, max_retries=search.server_max_retries)
            except ServerUnreachableError as exc:
                raise ValueError(f"--ppm_server_url: {exc}") from exc
            search_ppm_server = {"url": args.ppm_server_url, "model": served["id"]}
        if search_ppm is None:
            if _is_done(os.path.join(previous, "ppm")):
                search_ppm = os.path.join(previous, "ppm")
            elif served is not None:  # the served checkpoint is not here (e.g. another machine): trust the server
                search_ppm = served.get("root") or served["id"]
            else:
                raise FileNotFoundError(
                    f"round {args.round} searches with PPM-initialised Q (Eq. 3) and needs round {args.round - 1}'s "
                    f"PPM, but {os.path.join(previous, 'ppm')} has not finished: run round {args.round - 1} first, "
                    "pass --ppm_model_name_or_path or --ppm_server_url, or search without a PPM (--ppm_guided false)"
                )
        if served is not None:
            _check_served_ppm(search_ppm, served, args.ppm_server_url)
    elif args.ppm_server_url:
        logger.warning("--ppm_server_url is ignored: round %d searches without a PPM (--ppm_guided)", args.round)

    if args.dataset is None:
        from .tiny import tiny_splits, to_dataset

        problems, dataset_name = to_dataset(tiny_splits()["train"]), "the tiny synthetic train split (seed 0)"
    else:
        if args.dataset.endswith((".json", ".jsonl")) and not os.path.exists(args.dataset):
            raise FileNotFoundError(f"--dataset {args.dataset!r} does not exist")
        on_missing = "drop" if args.drop_unanswered else "raise"
        problems = load_problems(args.dataset, split=args.dataset_split, limit=args.limit, on_missing=on_missing)
        dataset_name = args.dataset
    if args.limit is not None:
        problems = problems.select(range(min(args.limit, len(problems))))
    if len(problems) == 0:
        raise ValueError("there are no problems to search (empty dataset or --limit 0)")

    repo_ids = {}
    if args.push_to_hub:
        run = args.hub_run_name or os.path.basename(os.path.normpath(run_dir))
        try:
            repo_ids = {
                artifact: args.hub_repo_pattern.format(org=args.hub_org, run=run, round=args.round, artifact=artifact)
                for artifact in ARTIFACTS
            }
        except (KeyError, IndexError) as exc:
            raise ValueError(
                f"--hub_repo_pattern {args.hub_repo_pattern!r} may only use {{org}}, {{run}}, {{round}}, {{artifact}}"
            ) from exc
    plan = RoundPlan(args.round, run_dir, base_model, search_policy, search_ppm, build_tiny, problems, dataset_name,
                     repo_ids, lora, redo, _problems_sha256(problems), search_ppm_server)  # fmt: skip
    _check_tiny_policy(plan, args)
    check_stages(plan, args, search)
    return plan


def _check_served_ppm(search_ppm: str, served: dict, url: str) -> None:
    """Refuse a PPM server serving another checkpoint than the round's search PPM, when both folders are readable
    here (compared by `_files_sha256`: small files by content, weights by name and size). A served path that is not
    a folder here (the server runs elsewhere) cannot be compared: the server is trusted."""
    root = served.get("root") or served["id"]
    if not (os.path.isdir(root) and os.path.isdir(search_ppm)):
        return
    if os.path.realpath(root) == os.path.realpath(search_ppm):
        return
    if _files_sha256(root, _HASH_IN_FULL) != _files_sha256(search_ppm, _HASH_IN_FULL):
        raise ValueError(
            f"the PPM server at {url} serves {root}, but this round searches with the PPM {search_ppm}, and the two "
            f"differ: serve {search_ppm} (`vllm serve {search_ppm} --runner pooling`) or pass "
            f"--ppm_model_name_or_path {root}"
        )


def _parse_redo(value: str | None) -> list[str]:
    """`--redo trees,sft` / `--redo all`: the named stages and every stage that reads them, in stage order."""
    if not value:
        return []
    names = [name.strip() for name in value.split(",") if name.strip()]
    if "all" in names:
        return list(ARTIFACTS)
    unknown = [name for name in names if name not in ARTIFACTS]
    if unknown:
        raise ValueError(f"--redo takes stages among {', '.join(ARTIFACTS)} or `all`, got {', '.join(unknown)}")
    return downstream(names)


def _check_tiny_policy(plan: RoundPlan, args: RoundArguments) -> None:
    """An embedded tiny policy built earlier in the run folder must have the bootstrap the options ask for."""
    record = os.path.join(plan.base_model, "tiny_policy.json")
    if args.round != 1 or plan.base_model != os.path.join(plan.run_dir, TINY_POLICY_DIR) or not os.path.exists(record):
        return
    built = _read_json(record).get("bootstrap_steps")
    if built is not None and built != args.tiny_bootstrap_steps:
        raise StaleStageError(
            f"the tiny policy in {plan.base_model} was built with {built} bootstrap steps, this run asks for "
            f"--tiny_bootstrap_steps {args.tiny_bootstrap_steps}: pass --tiny_bootstrap_steps {built} to use it, or "
            f"delete {plan.base_model} and every round_<k> folder of {plan.run_dir} to start the run over"
        )


# -- stages ------------------------------------------------------------------------------------------------------


class StaleStageError(ValueError):
    """A finished or started stage was made with other settings or inputs than the run asks for."""


def downstream(stages) -> list[str]:
    """`stages` and every stage that reads them, directly or not, in stage order."""
    chosen = set(stages)
    for name in ARTIFACTS:  # inputs come first
        if any(source in chosen for source in STAGE_INPUTS[name]):
            chosen.add(name)
    return [name for name in ARTIFACTS if name in chosen]


def _problems_sha256(problems: Dataset) -> str:
    answers = problems["answer"] if "answer" in problems.column_names else [None] * len(problems)
    rows = [[str(p), None if a is None else str(a)] for p, a in zip(problems["problem"], answers)]
    return hashlib.sha256(json.dumps(rows).encode()).hexdigest()


def _files_sha256(folder: str, full_limit: int | None = None) -> str:
    """A hash of a folder's files (recursively, by relative path), cards, markers and checkpoints excepted.

    Files up to `full_limit` bytes (all without a limit) count by content, larger ones by name and size."""
    digest = hashlib.sha256()
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith((".", "checkpoint-")))
        for name in sorted(files):
            if name in ("README.md", DONE_FILE, STARTED_FILE) or name.endswith(".tmp"):
                continue
            path = os.path.join(root, name)
            size = os.path.getsize(path)
            digest.update(f"{os.path.relpath(path, folder)}\0{size}\0".encode())
            if full_limit is None or size <= full_limit:
                with open(path, "rb") as f:
                    for block in iter(lambda: f.read(2**24), b""):
                        digest.update(block)
    return digest.hexdigest()


def _model_identity(name: str | None) -> dict | None:
    """How a fingerprint names a model: a stage of a run by its `output_sha256`, another local folder by its
    files, a Hub id by its name."""
    if name is None:
        return None
    if not os.path.isdir(name):
        return {"name": name}
    marker = os.path.join(name, DONE_FILE)
    if os.path.exists(marker):
        recorded = _read_json(marker).get("output_sha256")
        if recorded:
            return {"output_sha256": recorded}
    return {"files_sha256": _files_sha256(name, _HASH_IN_FULL)}


def _output_of(plan: RoundPlan, name: str) -> str:
    """The `output_sha256` of a finished stage of this round (what the stages reading it record)."""
    marker = os.path.join(plan.path(name), DONE_FILE)
    if not os.path.exists(marker):
        return "not finished"
    return _read_json(marker).get("output_sha256", "not recorded")


def _world_size() -> int:
    """The processes of the launch (the total batch is per-device batch x accumulation x processes)."""
    from accelerate.utils.environment import get_cpu_distributed_information

    return get_cpu_distributed_information().world_size


def _training_fingerprint(args: RoundArguments, search: MCTSConfig, plan: RoundPlan, prefix: str) -> dict:
    names = ("learning_rate", "num_train_epochs", "max_steps", "per_device_train_batch_size",
             "gradient_accumulation_steps", "max_length")  # fmt: skip
    return {
        **{f"{prefix}_{name}": getattr(args, f"{prefix}_{name}") for name in names},
        "warmup_steps": args.warmup_steps,
        "lr_scheduler_type": args.lr_scheduler_type,
        "bf16": _bf16(args),
        "seed": search.seed,
        "world_size": _world_size(),
        **{f"peft.{key}": value for key, value in plan.lora.settings().items()},
    }


def stage_fingerprint(plan: RoundPlan, args: RoundArguments, search: MCTSConfig, name: str) -> dict:
    """What stage `name`'s output depends on: its settings and its inputs (JSON values, compared field by field)."""
    if name == "trees":
        fingerprint = {
            **{setting: getattr(search, setting) for setting in _TREE_SETTINGS},  # unsolved_rollouts among them
            "ppm_max_length": args.ppm_max_length if plan.search_ppm else None,  # the search PPM's context
            "problems_sha256": plan.problems_sha256,
            "num_problems": len(plan.problems),
            "search_policy": _model_identity(plan.search_policy),
            "search_ppm": _model_identity(plan.search_ppm),
            # Scores of the served PPM differ from in-process ones by float noise (<= 1e-3), so trees may differ; the
            # URL is not recorded (the same checkpoint served elsewhere resumes the search).
            "search_ppm_served_as": plan.search_ppm_server["model"] if plan.search_ppm_server else None,
        }
    elif name == "sft":
        fingerprint = {"sft_top_k": args.sft_top_k, "trees": _output_of(plan, "trees")}
    elif name == "pairs":
        fingerprint = {"pairs_min_q_gap": args.pairs_min_q_gap, "pairs_per_side": args.pairs_per_side,
                       "trees": _output_of(plan, "trees")}  # fmt: skip
    elif name == "policy":
        fingerprint = {**_training_fingerprint(args, search, plan, "sft"),
                       "base_model": _model_identity(plan.base_model), "sft": _output_of(plan, "sft")}  # fmt: skip
    elif name == "ppm":
        fingerprint = {**_training_fingerprint(args, search, plan, "ppm"), "policy": _output_of(plan, "policy"),
                       "pairs": _output_of(plan, "pairs")}  # fmt: skip
    else:
        raise ValueError(f"unknown stage {name!r}")
    return json.loads(json.dumps(fingerprint, default=str))  # as it reads back from DONE.json


def _work_of(plan: RoundPlan, name: str) -> list[str]:
    """The folders holding a stage's work: its own, and the search's shards for the trees."""
    folders = [plan.path(name)]
    if name == "trees":
        folders.append(os.path.join(plan.round_dir, "search"))
    return folders


def _recorded(plan: RoundPlan, name: str) -> tuple[str, dict | None]:
    """Where a stage stands: ("done" | "started", its recorded fingerprint), ("leftovers", None) for work without
    a marker (an older rstar_trl), or ("fresh", None)."""
    folder = plan.path(name)
    for status, marker in (("done", DONE_FILE), ("started", STARTED_FILE)):
        path = os.path.join(folder, marker)
        if os.path.exists(path):
            return status, _read_json(path).get("fingerprint")
    if any(os.path.isdir(path) and os.listdir(path) for path in _work_of(plan, name)):
        return "leftovers", None
    return "fresh", None


def _differences(recorded: dict | None, current: dict) -> dict[str, tuple]:
    if recorded is None:
        return {"fingerprint": (_Note("none recorded (an older rstar_trl made it)"), _Note("this run's"))}
    return {key: (recorded.get(key), current.get(key)) for key in sorted(set(recorded) | set(current))
            if recorded.get(key) != current.get(key)}  # fmt: skip


class _Note(str):
    """Text of a message that is not a fingerprint value (shown without quotes)."""


def _show(value) -> str:
    """A fingerprint value for a message: hashes shortened."""
    if isinstance(value, _Note):
        return str(value)
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_show(v)}" for k, v in value.items()) + "}"
    if isinstance(value, str) and len(value) == 64 and all(c in "0123456789abcdef" for c in value):
        return value[:12] + "..."
    return repr(value)


def _stale_message(plan: RoundPlan, stale: dict[str, tuple[str, dict]]) -> str:
    lines = [f"round {plan.round} ({plan.round_dir}) holds work made with other settings or inputs than this run's:"]
    for name, (status, changes) in stale.items():
        what = {"done": "finished", "started": "started (interrupted)", "leftovers": "left over"}[status]
        lines.append(f"  {name} ({what}, {plan.path(name)}):")
        lines += [f"    {key}: {_show(old)} -> {_show(new)}" for key, (old, new) in changes.items()]
    first = [name for name in stale if not any(name in downstream([o]) and o != name for o in stale)]
    recomputed = downstream(first)
    lines.append(
        f"Re-run with the settings they were made with to reuse them, or recompute with --redo {','.join(first)} "
        f"(deletes and recomputes {', '.join(recomputed)}; --redo all recomputes the whole round)."
    )
    return "\n".join(lines)


def check_stages(plan: RoundPlan, args: RoundArguments, search: MCTSConfig) -> None:
    """Refuse (`StaleStageError`) finished or started stages whose fingerprint differs from this run's, except
    those `redo` deletes and those after `stop_after` (this run does not reach them: a search launched with more
    processes and `--stop_after trees` must not be refused for training stages made by one process). Reads markers
    and small files only."""
    stale = {}
    last = ARTIFACTS.index(args.stop_after) if args.stop_after else len(ARTIFACTS) - 1
    for name in ARTIFACTS[: last + 1]:
        if name in plan.redo:
            continue
        status, recorded = _recorded(plan, name)
        if status == "fresh":
            continue
        changes = _differences(recorded, stage_fingerprint(plan, args, search, name))
        if changes:
            stale[name] = (status, changes)
    if stale:
        raise StaleStageError(_stale_message(plan, stale))


def _redo(plan: RoundPlan, state: PartialState) -> None:
    """Delete the work of the stages `redo` names and of every stage reading them (main process)."""
    state.wait_for_everyone()
    if plan.redo and state.is_main_process:
        for name in plan.redo:
            for path in _work_of(plan, name):
                if os.path.exists(path):
                    shutil.rmtree(path)
        print(f"[round {plan.round}] --redo: deleted {', '.join(plan.redo)}; they are computed again")
    state.wait_for_everyone()


def _stage(plan: RoundPlan, args: RoundArguments, search: MCTSConfig, name: str, state: PartialState, run) -> dict:
    """Run a stage unless it finished with the same fingerprint; refuse one made with another fingerprint.

    The main process writes `STARTED.json` (the fingerprint) first and `DONE.json` (stats, fingerprint and the
    output's hash) last."""
    folder = plan.path(name)
    fingerprint = stage_fingerprint(plan, args, search, name)
    status, recorded = _recorded(plan, name)
    state.wait_for_everyone()  # every process has looked before anyone can write a marker
    if status != "fresh":
        changes = _differences(recorded, fingerprint)
        if changes:
            raise StaleStageError(_stale_message(plan, {name: (status, changes)}))
    if status == "done":
        if state.is_main_process:
            print(f"[round {plan.round}] {name}: finished earlier, skipped (same settings and inputs; {folder})")
            if os.path.exists(os.path.join(folder, STARTED_FILE)):  # a kill came between the two markers
                os.remove(os.path.join(folder, STARTED_FILE))
        return _read_json(os.path.join(folder, DONE_FILE))
    if state.is_main_process:
        resumed = " (resumed)" if status == "started" else ""
        print(f"[round {plan.round}] {name}: running{resumed} -> {folder}")
        _write_json(os.path.join(folder, STARTED_FILE), {"fingerprint": fingerprint})
    state.wait_for_everyone()
    info = run(folder)
    if state.is_main_process:
        for path in glob.glob(os.path.join(folder, "checkpoint-*")):
            shutil.rmtree(path)  # the finished checkpoint is the folder itself
        info = {**info, "fingerprint": fingerprint, "output_sha256": _files_sha256(folder),
                "rstar_trl_version": __version__}  # fmt: skip
        _write_json(os.path.join(folder, DONE_FILE), info)
        os.remove(os.path.join(folder, STARTED_FILE))
    state.wait_for_everyone()
    return _read_json(os.path.join(folder, DONE_FILE))


# What makes a process part of a torchrun / accelerate process group.
_LAUNCHER_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "GROUP_WORLD_SIZE",
                       "ROLE_RANK", "ROLE_WORLD_SIZE", "ROLE_NAME", "MASTER_ADDR", "MASTER_PORT")  # fmt: skip


def provide_tiny_policy_once(path: str, bootstrap_steps: int, num_processes: int, build: bool = False) -> str:
    """Put the embedded tiny policy at `path` (main process only): a copy of the shipped policy when it matches the
    settings (`rstar_trl.tiny.provide_tiny_policy`), else a build from scratch. Returns "copied" or "built".

    Under a multi-process launch a build runs in a child process outside the process group: its SFTTrainer would
    otherwise see the group, train data-parallel and wait forever for the other processes, which are waiting for
    the build. The child gives the same model as a single-process run."""
    from .tiny.policy import provide_tiny_policy, shipped_policy_matches

    if num_processes == 1 or (not build and shipped_policy_matches(bootstrap_steps=bootstrap_steps)):
        return provide_tiny_policy(path, bootstrap_steps=bootstrap_steps, build=build)
    env = {
        name: value for name, value in os.environ.items()
        if name not in _LAUNCHER_VARIABLES and not name.startswith(("TORCHELASTIC_", "ACCELERATE_"))
    }  # fmt: skip
    code = (
        "import sys; from rstar_trl.tiny import build_tiny_policy; "
        "build_tiny_policy(sys.argv[1], bootstrap_steps=int(sys.argv[2]))"
    )
    subprocess.run([sys.executable, "-c", code, path, str(bootstrap_steps)], env=env, check=True)
    return "built"


def _scorer_device(state: PartialState) -> str:
    return f"cuda:{state.local_process_index}" if torch.cuda.is_available() else "cpu"


def _search_trees(plan: RoundPlan, args: RoundArguments, search: MCTSConfig, state: PartialState, folder: str):
    """MCTS on every problem; in round 4, problems still unsolved after a pass are searched again (a new tree, a larger
    budget, a new seed: `MCTSConfig.unsolved_rollouts`)."""
    ppm = None
    if plan.search_ppm_server is not None:  # one PPM served to every search process
        ppm = ServerPPMScorer(plan.search_ppm_server["url"], model=plan.search_ppm_server["model"],
                              checkpoint=plan.search_ppm, max_length=args.ppm_max_length,
                              max_retries=search.server_max_retries)  # fmt: skip
    elif plan.search_ppm is not None:
        ppm = TransformersPPMScorer(plan.search_ppm, device=_scorer_device(state), max_length=args.ppm_max_length,
                                    prefix_cache_mb=search.prefix_cache_mb)  # fmt: skip
    try:
        return _search_passes(plan, args, search, state, folder, ppm)
    finally:
        if ppm is not None:
            ppm.close()


def _search_passes(plan: RoundPlan, args: RoundArguments, search: MCTSConfig, state: PartialState, folder: str,
                   ppm) -> dict:  # fmt: skip
    """The search of `_search_trees` with the scorer `ppm` (None: Q from terminal rewards only): ONE MCTSGenerator run
    over every problem, in which a problem still unsolved after a pass joins the queue for its next pass at once
    (`MCTSConfig.unsolved_rollouts`), so the trees in flight stay full to the end. A problem's row is that of its
    last pass (`search_pass`).

    `info["passes"]` has per pass: its rollouts and seed, the problems searched in it (those still unsolved after
    the passes before), those it solved, and `stats`, the main process's counts of it (the problems it finished
    and solved there, tokens); `info["stats"]` is the main process's whole search."""
    # Only the main process gets the trees back (it writes them); the others keep which problems are solved.
    config = replace(search, gather_trees="main", output_dir=os.path.join(plan.round_dir, "search", "all"))
    # The engine's memory goes back (close) before the training stages.
    with MCTSGenerator(plan.search_policy, args=config, train_dataset=plan.problems, ppm=ppm) as generator:
        trees = generator.generate()
        stats = generator.stats
    del generator
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    reached, solved = trees["search_pass"], trees["solved"]
    passes = []
    for number, rollouts in enumerate([search.num_rollouts, *search.unsolved_rollouts]):
        problems = sum(last >= number for last in reached)
        if not problems:
            break
        passes.append({
            "pass": number, "rollouts": rollouts, "seed": search.seed + number, "problems": problems,
            "solved": sum(last == number and ok for last, ok in zip(reached, solved)),
            "stats": {name: stats.get(f"{name}_pass{number}", 0)
                      for name in ("problems_searched", "problems_solved", "tokens")},
        })  # fmt: skip
    num_solved = sum(solved)
    info = {
        "num_problems": len(trees),
        "num_solved": num_solved,
        "solved_rate": num_solved / len(trees),
        "passes": passes,
        "stats": stats,
        "config": asdict(search),
        **({"ppm_server": plan.search_ppm_server} if plan.search_ppm_server else {}),  # the URL it was scored at
    }
    if state.is_main_process:
        save_dataset_folder(trees, folder, "")
    return info


def _build_data(plan: RoundPlan, args: RoundArguments, state: PartialState, folder: str, kind: str) -> dict:
    """SFT rows or preference pairs from the trees. The main process reads the trees and builds them (the others
    never hold every tree); a problem such as an empty dataset is sent to every process, which all stop alike."""
    from accelerate.utils import broadcast_object_list

    outcome: list = [None]
    if state.is_main_process:
        trees = load_dataset_folder(plan.path("trees"))
        if kind == "sft":
            data, stats = build_sft_dataset(trees, top_k=args.sft_top_k, return_stats=True)
            advice = "the policy solved no problem"
        else:
            data, stats = build_preference_pairs(
                trees, min_q_gap=args.pairs_min_q_gap, per_side=args.pairs_per_side, return_stats=True
            )
            advice = "no problem has both a correct and a wrong answer"
        if len(data) == 0:
            outcome[0] = RuntimeError(
                f"round {plan.round} gives no {kind} data: {advice} ({plan.path('trees')}). Search more problems "
                "(--limit), with more rollouts (--num_rollouts) or candidates (--num_candidates), or a stronger "
                "policy"
            )
        else:
            save_dataset_folder(data, folder, "")
            outcome[0] = {"rows": len(data), "stats": stats}
    if state.num_processes > 1:
        broadcast_object_list(outcome)
    if isinstance(outcome[0], Exception):
        raise outcome[0]
    return outcome[0]


def _bf16(args: RoundArguments) -> bool:
    if args.bf16 is not None:
        return args.bf16
    return torch.cuda.is_available() and torch.cuda.is_bf16_supported()


def _trainer_settings(args: RoundArguments, prefix: str, folder: str, search: MCTSConfig) -> dict:
    """TrainingArguments shared by the policy and PPM trainers, from the round's `sft_*` / `ppm_*` options."""
    return {
        "output_dir": folder,
        "learning_rate": getattr(args, f"{prefix}_learning_rate"),
        "num_train_epochs": getattr(args, f"{prefix}_num_train_epochs"),
        "max_steps": getattr(args, f"{prefix}_max_steps"),
        "per_device_train_batch_size": getattr(args, f"{prefix}_per_device_train_batch_size"),
        "gradient_accumulation_steps": getattr(args, f"{prefix}_gradient_accumulation_steps"),
        "max_length": getattr(args, f"{prefix}_max_length"),
        "warmup_steps": args.warmup_steps,
        "lr_scheduler_type": args.lr_scheduler_type,
        "bf16": _bf16(args),
        "gradient_checkpointing": args.gradient_checkpointing,
        "logging_steps": args.logging_steps,
        "logging_first_step": True,
        "save_strategy": "steps" if args.save_steps else "no",
        "save_steps": args.save_steps or 500,
        "save_total_limit": 1,
        "report_to": args.report_to,
        "seed": search.seed,
        "dataloader_num_workers": 0,
        # TrainingArguments set up the process state again: on CPU, processes must join it as CPU processes
        "use_cpu": not torch.cuda.is_available(),
    }


def _last_checkpoint(folder: str, state: PartialState) -> str | None:
    """The newest whole checkpoint in `folder` (the Trainer writes trainer_state.json last); checkpoints a kill cut
    short are deleted."""
    from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

    found = glob.glob(os.path.join(folder, f"{PREFIX_CHECKPOINT_DIR}-*"))
    found = sorted((p for p in found if p.rsplit("-", 1)[1].isdigit()), key=lambda p: int(p.rsplit("-", 1)[1]))
    whole = [path for path in found if os.path.exists(os.path.join(path, "trainer_state.json"))]
    state.wait_for_everyone()  # every process has looked before any is deleted
    if state.is_main_process:
        for path in found:
            if path not in whole:
                logger.warning("deleting %s: a checkpoint cut short (no trainer_state.json)", path)
                shutil.rmtree(path)
    state.wait_for_everyone()
    return whole[-1] if whole else None


def _train(trainer, folder: str, state: PartialState) -> dict:
    """Train (from the last whole checkpoint in `folder` if there is one) and save; the run's metrics.

    The checkpoints stay until the stage has finished (`_stage` deletes them): a kill after training resumes at
    the last step instead of training again."""
    checkpoint = _last_checkpoint(folder, state) if os.path.isdir(folder) else None
    output = trainer.train(resume_from_checkpoint=checkpoint)
    trainer.save_model(folder)
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    last = {k: v for k, v in (logs[-1] if logs else {}).items() if isinstance(v, (int, float))}
    return {"global_step": output.global_step, "train_loss": output.training_loss, "metrics": output.metrics,
            "last_log": last, "resumed_from": checkpoint, "world_size": trainer.args.world_size}  # fmt: skip


def _seeded(seed: int) -> None:
    """Seed Python, NumPy and torch before a model initialisation (new heads, resized embeddings, LoRA weights): the
    RNG state at that point otherwise depends on what the process ran before (an uninterrupted round has searched and
    trained, a resumed one has not), and a resumed round would start from other weights."""
    from transformers import set_seed

    set_seed(seed)


def _load_policy(base_model: str, seed: int, tokenizer=None):
    """The BASE model and its tokenizer with the step markers as tokens (resized embeddings, seeded)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .format import add_step_tokens

    tokenizer = tokenizer or AutoTokenizer.from_pretrained(base_model)
    _seeded(seed)
    model = AutoModelForCausalLM.from_pretrained(base_model, dtype="auto")
    added = add_step_tokens(tokenizer, model)  # the markers become single tokens (no-op for the tiny policy)
    return tokenizer, model, added


def _load_ppm(policy: str, seed: int, tokenizer):
    """This round's policy with a new one-output score head (seeded), as `PPMTrainer` trains it."""
    from transformers import AutoModelForSequenceClassification

    _seeded(seed)
    model = AutoModelForSequenceClassification.from_pretrained(policy, num_labels=1, dtype="auto")
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (
            tokenizer.eos_token_id)  # fmt: skip
    return model


def _module_name(model, module) -> str | None:
    return next((name for name, candidate in model.named_modules() if candidate is module), None)


def _policy_peft_config(lora: RoundModelConfig, model, tokenizer, added: int):
    """The policy's LoraConfig. Step markers that are new tokens get their embedding rows trained (input, and output
    if untied; PEFT's `trainable_token_indices`), unless the user trains those modules in full anyway."""
    from .format import STEP_MARKERS

    config = lora.peft_config("CAUSAL_LM")
    if config is None or not added:
        return config
    ids = tokenizer.convert_tokens_to_ids(list(STEP_MARKERS))
    layers = [model.get_input_embeddings()]
    output = model.get_output_embeddings()
    if output is not None and output.weight is not layers[0].weight:
        layers.append(output)
    in_full = set(config.modules_to_save or [])
    names = [_module_name(model, layer) for layer in layers]
    tokens = {name: ids for name in names if name and name.rsplit(".", 1)[-1] not in in_full and name not in in_full}
    if tokens:
        config.trainable_token_indices = tokens
    return config


def _merge_adapter(folder: str, load_base) -> dict:
    """Move the adapter the trainer saved in `folder` to `folder/adapter/` and save base + adapter merged
    (`merge_and_unload`) as the folder's checkpoint (main process). Returns how the model was trained.

    The merge reloads the base from disk rather than merging the trainer's model in memory, so it works the same
    whatever the launcher sharded during training."""
    from peft import PeftModel

    adapter = os.path.join(folder, ADAPTER_DIR)
    os.makedirs(adapter, exist_ok=True)
    for name in os.listdir(folder):
        if name.startswith("adapter_") and os.path.isfile(os.path.join(folder, name)):
            os.replace(os.path.join(folder, name), os.path.join(adapter, name))
    merged = PeftModel.from_pretrained(load_base(), adapter).merge_and_unload()
    merged.save_pretrained(folder)
    config = _read_json(os.path.join(adapter, "adapter_config.json"))
    targets = config.get("target_modules")
    names = [name for name, _ in merged.named_modules()]
    # PEFT lists "classifier" and "score" for any SEQ_CLS model; keep those the model has, once each.
    in_full = [m for m in dict.fromkeys(config.get("modules_to_save") or [])
               if any(name == m or name.endswith(f".{m}") for name in names)]  # fmt: skip
    return {
        "method": "lora",
        "r": config.get("r"),
        "lora_alpha": config.get("lora_alpha"),
        "lora_dropout": config.get("lora_dropout"),
        "target_modules": sorted(targets) if isinstance(targets, list) else targets,
        "target_parameters": config.get("target_parameters"),
        "modules_to_save": in_full or None,
        "trainable_token_indices": config.get("trainable_token_indices"),
        "use_rslora": config.get("use_rslora"),
        "use_dora": config.get("use_dora"),
        "merged": True,
        "adapter": ADAPTER_DIR,
    }


FULL_FINE_TUNE = {"method": "full"}


def _train_policy(plan: RoundPlan, args: RoundArguments, search: MCTSConfig, state: PartialState, folder: str):
    """Fine-tune the BASE model (not the previous policy, paper §3.4) on this round's SFT data."""
    return fine_tune_policy(plan.base_model, load_dataset_folder(plan.path("sft")), args, search, state, folder,
                            plan.lora)  # fmt: skip


def fine_tune_policy(
    base_model: str,
    sft: Dataset,
    args: RoundArguments,
    search: MCTSConfig,
    state: PartialState,
    folder: str,
    lora: RoundModelConfig | None = None,
) -> dict:
    """Fine-tune `base_model` on `sft` (prompt/completion rows) with the round's `sft_*` settings into `folder`:
    the round's policy stage, and the SFT-data baselines (recipes/sft_data_baselines.py) with other data."""
    from transformers import AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    lora = lora if lora is not None else RoundModelConfig()  # full fine-tuning
    tokenizer, model, added = _load_policy(base_model, search.seed)
    config = SFTConfig(completion_only_loss=True, **_trainer_settings(args, "sft", folder, search))
    sft = sft.select_columns(["prompt", "completion"])
    peft_config = _policy_peft_config(lora, model, tokenizer, added)
    _seeded(search.seed)  # the LoRA weights are created in the trainer's __init__, before its own set_seed
    trainer = SFTTrainer(model=model, args=config, train_dataset=sft, processing_class=tokenizer,
                         peft_config=peft_config)  # fmt: skip
    info = _train(trainer, folder, state)
    finetuning = FULL_FINE_TUNE
    if peft_config is not None:
        del trainer, model
        gc.collect()
        state.wait_for_everyone()
        if state.is_main_process:
            tokenizer = AutoTokenizer.from_pretrained(folder)  # with the step markers, as trained
            finetuning = _merge_adapter(folder, lambda: _load_policy(base_model, search.seed, tokenizer)[1])
        state.wait_for_everyone()
    return {**info, "base_model": base_model, "rows": len(sft), "finetuning": finetuning}


def _train_ppm(plan: RoundPlan, args: RoundArguments, search: MCTSConfig, state: PartialState, folder: str):
    """A PPM initialised from this round's policy (paper §3.3): its backbone with a one-output score head."""
    from transformers import AutoTokenizer

    from .ppm.scorer import write_value_transform

    policy = plan.path("policy")
    tokenizer = AutoTokenizer.from_pretrained(policy)
    model = _load_ppm(policy, search.seed, tokenizer)
    config = PPMConfig(self_evolution_round=plan.round, **_trainer_settings(args, "ppm", folder, search))
    pairs = load_dataset_folder(plan.path("pairs"))
    peft_config = plan.lora.peft_config("SEQ_CLS")
    _seeded(search.seed)  # the LoRA weights are created in the trainer's __init__, before its own set_seed
    trainer = PPMTrainer(model=model, args=config, train_dataset=pairs, processing_class=tokenizer,
                         peft_config=peft_config)  # fmt: skip
    info = _train(trainer, folder, state)
    trainer.create_model_card(model_name=plan.name("ppm"), dataset_name=plan.repo_ids.get("pairs"))
    info = {**info, "initialised_from": policy, "rows": len(pairs), "dataset_stats": trainer.dataset_stats,
            "finetuning": FULL_FINE_TUNE}  # fmt: skip
    if peft_config is not None:
        del trainer, model
        gc.collect()
        state.wait_for_everyone()
        if state.is_main_process:

            def load():
                model = _load_ppm(policy, search.seed, tokenizer)
                write_value_transform(model.config, config.value_transform)  # what the scorers value it with
                return model

            info["finetuning"] = _merge_adapter(folder, load)
        state.wait_for_everyone()
    return info


# -- cards -------------------------------------------------------------------------------------------------------


def _solved_history(plan: RoundPlan) -> str:
    """Markdown rows `| round | problems | solved | rate |` of every round of this run searched so far."""
    lines = []
    for k in range(1, plan.round + 1):
        marker = os.path.join(plan.run_dir, f"round_{k}", "trees", DONE_FILE)
        if os.path.exists(marker):
            info = _read_json(marker)
            lines.append(f"| {k} | {info['num_problems']} | {info['num_solved']} | {100 * info['solved_rate']:.1f}% |")
    return "\n".join(lines) or "| - | - | - | - |"


def _metrics_table(info: dict) -> str:
    last = {f"last logged {k}": v for k, v in info.get("last_log", {}).items() if k not in ("epoch", "step")}
    values = {"steps": info.get("global_step"), "final train loss (mean)": info.get("train_loss"), **last}
    return "\n".join(f"| {k} | {v:.4g} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in values.items())


def describe_finetuning(info: dict | None) -> str:
    """How a training stage trained its model, for the cards: full fine-tune, or LoRA with its settings."""
    if not info:
        return "-"
    how = info.get("finetuning", FULL_FINE_TUNE)
    if how.get("method") != "lora":
        return "full fine-tune (every weight trained)"
    targets = how.get("target_modules")
    targets = ", ".join(targets) if isinstance(targets, list) else targets or "PEFT's default for the architecture"
    parts = [f"r = {how.get('r')}", f"alpha = {how.get('lora_alpha')}", f"dropout = {how.get('lora_dropout')}",
             f"target modules: {targets}"]  # fmt: skip
    if how.get("target_parameters"):
        parts.append(f"target parameters: {', '.join(how['target_parameters'])}")
    if how.get("modules_to_save"):
        parts.append(f"trained in full: {', '.join(how['modules_to_save'])}")
    if how.get("trainable_token_indices"):
        layers = how["trainable_token_indices"]
        layers = ", ".join(layers) if isinstance(layers, dict) else "the input embeddings"
        parts.append(f"embedding rows of the new step-marker tokens trained in {layers}")
    variant = "rsLoRA" if how.get("use_rslora") else "DoRA" if how.get("use_dora") else "LoRA"
    return (f"{variant} ({'; '.join(parts)}), merged into this checkpoint (merge_and_unload); the adapter is in "
            f"`{how.get('adapter', ADAPTER_DIR)}/`")  # fmt: skip


def _describe_search_ppm(plan: RoundPlan) -> str:
    if plan.search_ppm is None:
        return "none (Q from terminal rewards only)"
    if plan.search_ppm_server is None:
        return plan.search_ppm
    return f"{plan.search_ppm} (served by vllm serve at {plan.search_ppm_server['url']})"


def _card_fields(plan: RoundPlan, infos: dict[str, dict], config: dict) -> dict:
    trees = infos.get("trees", {})
    return {
        "round": plan.round,
        "run_dir": plan.run_dir,
        "base_model": plan.base_model,
        "search_policy": plan.search_policy,
        "search_ppm": _describe_search_ppm(plan),
        "dataset": plan.dataset_name,
        **{f"{artifact}_name": plan.name(artifact) for artifact in ARTIFACTS},
        **{f"{artifact}_rows": infos.get(artifact, {}).get("rows", "-") for artifact in ("sft", "pairs")},
        "num_problems": trees.get("num_problems", "-"),
        "num_solved": trees.get("num_solved", "-"),
        "solved_rate": f"{100 * trees['solved_rate']:.1f}%" if trees else "-",
        "solved_history": _solved_history(plan),
        "policy_training": describe_finetuning(infos.get("policy")),
        "ppm_training": describe_finetuning(infos.get("ppm")),
        "config": json.dumps(config, indent=2, default=str),
        "citation": RSTAR_MATH_CITATION,
    }


def write_cards(plan: RoundPlan, infos: dict[str, dict], config: dict) -> None:
    """(Re)write the `README.md` card of every finished artifact of the round (main process only)."""
    fields = _card_fields(plan, infos, config)
    lineage = render_card("round_lineage.md", **fields)
    fields["lineage"] = lineage
    if "trees" in infos:
        search = infos["trees"]["config"]
        card = render_card(
            "trees_dataset_card.md", repo_id=plan.name("trees"), schema_version=TREE_SCHEMA_VERSION,
            model=plan.search_policy, num_rollouts=search["num_rollouts"], num_candidates=search["num_candidates"],
            **{**fields, "config": json.dumps(search, indent=2)},
        )  # fmt: skip
        _write_card(plan.path("trees"), card, lineage)
    for artifact in ("sft", "pairs"):
        if artifact in infos:
            stats = json.dumps(infos[artifact]["stats"], indent=2)
            card = render_card(f"{artifact}_dataset_card.md", repo_id=plan.name(artifact), stats=stats, **fields)
            _write_card(plan.path(artifact), card)
    if "policy" in infos:
        card = render_card(
            "policy_model_card.md", repo_id=plan.name("policy"), metrics=_metrics_table(infos["policy"]),
            front_matter=_front_matter(plan.base_model, [plan.name("sft")]), **fields,
        )  # fmt: skip
        _write_card(plan.path("policy"), card)
    if "ppm" in infos:
        path = os.path.join(plan.path("ppm"), "README.md")
        trainer_card = open(path).read().split(_LINEAGE_MARKER)[0].rstrip() if os.path.exists(path) else ""
        _write_card(plan.path("ppm"), _with_training_row(trainer_card, fields["ppm_training"]), lineage)


def _with_training_row(card: str, how: str) -> str:
    """The PPM trainer's card (hub/ppm_model_card.md) with a `fine-tuning` row after its `objective` row."""
    if "| fine-tuning |" in card:
        return card
    lines = card.split("\n")
    for i, line in enumerate(lines):
        if line.startswith("| objective |"):
            return "\n".join([*lines[: i + 1], f"| fine-tuning | {how} |", *lines[i + 1 :]])
    return card


def _front_matter(base_model: str, datasets: list[str]) -> str:
    """YAML metadata lines that only name Hub repos (the Hub rejects local paths there)."""
    lines = []
    if _is_repo_id(base_model):
        lines.append(f"base_model: {base_model}")
    hub_datasets = [d for d in datasets if _is_repo_id(d)]
    if hub_datasets:
        lines.append("datasets:\n" + "\n".join(f"- {d}" for d in hub_datasets))
    return "\n".join(lines)


def _is_repo_id(name: str) -> bool:
    return name.count("/") == 1 and not os.path.exists(name) and not name.startswith((".", "/"))


def _write_card(folder: str, card: str, lineage: str | None = None) -> None:
    if lineage is not None:
        card = f"{card}\n\n{_LINEAGE_MARKER}\n{lineage}"
    with open(os.path.join(folder, "README.md"), "w") as f:
        f.write(card)


# -- the round ---------------------------------------------------------------------------------------------------


@dataclass
class RoundResult:
    plan: RoundPlan
    infos: dict[str, dict]
    pushed: dict[str, str]
    push_errors: dict[str, str]
    is_main_process: bool


def run_round(args: RoundArguments, search: MCTSConfig, plan: RoundPlan | None = None,
              lora: RoundModelConfig | None = None) -> RoundResult:  # fmt: skip
    """Run (or resume) round `args.round`: a stage finished with the same fingerprint is skipped, a started one
    resumed, the stages `redo` names (and those after them) are deleted and computed again. `plan` (from
    `plan_round`) carries the LoRA options; without it, `lora` does."""
    plan = plan or plan_round(args, search, lora)
    # Without CUDA, the processes `accelerate launch --multi_gpu --num_processes N` starts form a gloo group (its
    # `--cpu` flag starts a single process unless MPI is set up). The first PartialState sets up the group.
    state = PartialState(cpu=not torch.cuda.is_available())
    config = {"round": asdict(args), "search": asdict(search), "peft": asdict(plan.lora)}
    _redo(plan, state)
    if plan.build_tiny:
        with state.main_process_first():  # built once, by the main process, and reused on re-runs
            if not os.path.exists(os.path.join(plan.base_model, "config.json")):
                how = provide_tiny_policy_once(
                    plan.base_model, args.tiny_bootstrap_steps, state.num_processes, build=args.tiny_build_policy
                )
                state.print(f"[round {plan.round}] tiny policy {how} -> {plan.base_model}")
    if search.torch_threads:
        torch.set_num_threads(search.torch_threads)
    lineage = {"round": plan.round, "base_model": plan.base_model, "search_policy": plan.search_policy,
               "search_ppm": plan.search_ppm, "dataset": plan.dataset_name, "config": config,
               "outputs": {}}  # fmt: skip
    if plan.search_ppm_server:
        lineage["search_ppm_server"] = plan.search_ppm_server
    if state.is_main_process:
        _write_json(os.path.join(plan.round_dir, "round.json"), lineage)

    infos: dict[str, dict] = {}
    stages = {
        "trees": lambda folder: _search_trees(plan, args, search, state, folder),
        "sft": lambda folder: _build_data(plan, args, state, folder, "sft"),
        "pairs": lambda folder: _build_data(plan, args, state, folder, "pairs"),
        "policy": lambda folder: _train_policy(plan, args, search, state, folder),
        "ppm": lambda folder: _train_ppm(plan, args, search, state, folder),
    }
    for name, stage in stages.items():
        infos[name] = _stage(plan, args, search, name, state, stage)
        if state.is_main_process:
            lineage["outputs"][name] = infos[name].get("output_sha256")
            _write_json(os.path.join(plan.round_dir, "round.json"), lineage)
            write_cards(plan, infos, config)  # also after a skipped stage: a kill may have come before its card
        if name == args.stop_after:
            break
    pushed, errors = {}, {}
    if args.push_to_hub and state.is_main_process and len(infos) == len(ARTIFACTS):
        for artifact in ARTIFACTS:
            try:
                pushed[artifact] = push_folder(
                    plan.path(artifact), plan.repo_ids[artifact], repo_type=REPO_TYPES[artifact],
                    private=args.hub_private, commit_message=f"rstar_trl round {plan.round}: {artifact}",
                )  # fmt: skip
            except HubPushError as exc:
                errors[artifact] = str(exc)
    state.wait_for_everyone()
    return RoundResult(plan, infos, pushed, errors, state.is_main_process)
