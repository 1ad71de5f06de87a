"""`PPMTrainer`: the process preference model of rStar-Math (paper §3.3, Eq. 4) on TRL's `RewardTrainer`.

The PPM is the policy with its LM head replaced by a linear score head (`AutoModelForSequenceClassification`,
num_labels=1). The raw score r of prefix + step is read at the step's last token; the value used by MCTS is
tanh(r / scale), with the `ValueTransform` (`PPMConfig.value_scale`, `PPMConfig.train_through_tanh`) that the
trainer records in the checkpoint's config and every scorer reads back (`rstar_trl.ppm.scorer`).

Pairs share their prefix (question + earlier steps) and prefixes are long while steps are short, so by default one
row of a batch holds the prefix once, then the chosen step, then the rejected step; a block attention mask lets each
step see the prefix and itself only, and position ids restart after the prefix, which gives each step exactly the
scores of its own unpacked sequence for about half the tokens of a `RewardTrainer` batch.

TRL's minor version is pinned (`trl>=1.16,<1.17` in pyproject.toml) because this subclass overrides methods of
`RewardTrainer` (and of `transformers.Trainer`) that are not public API: `_prepare_dataset`,
`_set_signature_columns_if_needed`, and the model card written by `_save_checkpoint`.
"""

from __future__ import annotations

import logging
import math
import os
import textwrap
from collections import Counter
from dataclasses import dataclass, field
from importlib.metadata import version
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from datasets import Dataset, IterableDataset
from huggingface_hub import ModelCard, ModelCardData
from transformers import AutoTokenizer, PreTrainedTokenizerBase
from transformers.data.data_collator import DataCollatorMixin
from trl import RewardConfig, RewardTrainer
from trl.data_utils import get_dataset_column_names
from trl.trainer.utils import get_config_model_id, global_then_local_main_first

import rstar_trl
from rstar_trl.ppm.scorer import (
    VALUE_TRANSFORM_KEY,
    ValueTransform,
    _capture_token_scores,
    _encode,
    _score_head,
    ppm_text,
    read_value_transform,
    value_from_score,
    write_value_transform,
)

__all__ = ["DataCollatorForPPM", "PPMConfig", "PPMTrainer"]

logger = logging.getLogger(__name__)

LOSS_TYPES = ("ppm", "orm", "pqm")
# The value transform `PPMConfig` defaults to: Eq. 4 on the raw score, value tanh(r / 5). Chosen on the tiny default
# (docs/method.md, measured by `bench/value_transform.py`): raw-score training had the best cross-validated held-out
# pair accuracy (tanh(r) inside the loss was 3.5 points lower), no variant changed the problems PPM-guided search
# solved, and scale 5 keeps the values off tanh's saturated ends as raw scores grow.
DEFAULT_VALUE_TRANSFORM = ValueTransform(scale=5.0, train_through_tanh=False)
# The template lives with the other Hub card templates of the project (`hub/`).
MODEL_CARD_TEMPLATE = Path(__file__).resolve().parents[1] / "templates" / "ppm_model_card.md"  # = hub/ (a link)
_KEPT = ("ok", "truncated")
# Columns the collator reads; `Trainer` drops the others when `remove_unused_columns` is set.
_SIGNATURE_COLUMNS = ["prompt_ids", "chosen_ids", "rejected_ids", "completion_ids", "label", "weight"]

RSTAR_MATH_CITATION = textwrap.dedent("""\
    @misc{guan2025rstarmath,
        title         = {{rStar-Math: Small LLMs Can Master Math Reasoning with Self-Evolved Deep Thinking}},
        author        = {Xinyu Guan and Li Lyna Zhang and Yifei Liu and Ning Shang and Youran Sun and Yi Zhu and Fan Yang and Mao Yang},
        year          = 2025,
        eprint        = {2501.04519},
        archivePrefix = {arXiv},
        primaryClass  = {cs.CL},
        url           = {https://arxiv.org/abs/2501.04519},
    }""")  # noqa: E501


@dataclass
class PPMConfig(RewardConfig):
    r"""Configuration of [`PPMTrainer`]; every other field is [`trl.RewardConfig`]'s / `TrainingArguments`'.

    Parameters:
        > Parameters that control the objective

        loss_type (`str`, *optional*, defaults to `"ppm"`):
            `"ppm"`: step pairs (columns `prompt`, `chosen`, `rejected`, optional `weight`), weighted Bradley-Terry
            loss (Eq. 4) on the raw scores, or on the values with `train_through_tanh`. `"orm"`: the same loss on
            pairs of whole trajectories (the outcome reward model baseline). `"pqm"`: regression of step Q-values
            (columns `prompt`, `completion`, `label` in [-1, 1], optional `weight`), squared error between the value
            tanh(score / value_scale) and the label (the PQM baseline).
        value_scale (`float`, *optional*, defaults to `5.0`):
            The PPM's value of a raw score r is tanh(r / value_scale), in [-1, 1]: what MCTS initialises Q with
            (Eq. 3) and what the `"pqm"` loss regresses. 1 is the paper's linear + tanh head (arXiv 2501.04519
            §3.3); the authors' public code uses 5 with raw-score training, which keeps large raw scores from
            saturating at +-1; the default, chosen on the tiny default (docs/method.md). Stored in the checkpoint's
            config (`rstar_value_transform`) with `train_through_tanh`; every scorer reads it from there (a
            checkpoint without it is valued tanh(r)).
        train_through_tanh (`bool`, *optional*, defaults to `False`):
            Whether the Bradley-Terry loss of `"ppm"` / `"orm"` compares the values tanh(r / value_scale) (the tanh
            head trained end to end) instead of the raw scores r. Training only: the value is tanh(r /
            value_scale) either way. `"pqm"` always regresses the value.
        self_evolution_round (`int`, *optional*):
            The self-evolution round the PPM belongs to (paper §3.4); shown on the model card.

        > Parameters that control the data preprocessing and batching

        max_length (`int` or `None`, *optional*, defaults to `2048`):
            Tokens of prefix + step. Longer examples lose the start of their prefix, never the step; an example
            whose step alone is longer is dropped. `None`: no limit.
        share_prefix (`bool`, *optional*, defaults to `True`):
            Run the shared prefix of a pair once: one row holds prefix, chosen step and rejected step, with a block
            attention mask. Needs `attn_implementation` `"sdpa"` or `"eager"` (others fall back to two rows per
            pair, like `RewardTrainer`).

    > [!NOTE]
    > Defaults that differ from [`trl.RewardConfig`], after the paper (§3.3-3.4): `learning_rate` 7e-6 instead of
    > 1e-4, `num_train_epochs` 1 instead of 3, `max_length` 2048 instead of 1024.
    """

    learning_rate: float = field(default=7e-6, metadata={"help": "The initial learning rate for AdamW."})
    num_train_epochs: float = field(default=1.0, metadata={"help": "Total number of training epochs to perform."})
    max_length: int | None = field(
        default=2048,
        metadata={
            "help": "Tokens of prefix + step. Longer examples lose the start of their prefix, never the step; an "
            "example whose step alone is longer is dropped. `None`: no limit."
        },
    )
    loss_type: str = field(
        default="ppm",
        metadata={
            "help": "`ppm`: step pairs (prompt/chosen/rejected/weight), weighted Bradley-Terry (Eq. 4) on the raw "
            "scores (on the values with --train_through_tanh). `orm`: the same loss on pairs of whole trajectories. "
            "`pqm`: regression of step Q-values (prompt/completion/label/weight), squared error between the value "
            "tanh(score / value_scale) and the label."
        },
    )
    value_scale: float = field(
        default=DEFAULT_VALUE_TRANSFORM.scale,
        metadata={
            "help": "The value of a raw PPM score r is tanh(r / value_scale), in [-1, 1]: what MCTS initialises Q "
            "with (Eq. 3) and what the pqm loss regresses. 1: the paper's linear + tanh head (arXiv 2501.04519 "
            "§3.3); 5: the authors' public code (raw-score training, tanh(r / 5) at inference), which keeps large "
            "raw scores from saturating at +-1 (the default, chosen on the tiny default: docs/method.md). Saved in "
            "the checkpoint's config (rstar_value_transform) together with train_through_tanh; every scorer reads it "
            "from there (a checkpoint without it is valued tanh(r))."
        },
    )
    train_through_tanh: bool = field(
        default=DEFAULT_VALUE_TRANSFORM.train_through_tanh,
        metadata={
            "help": "Whether the Bradley-Terry loss (ppm, orm) compares the values tanh(r / value_scale) (a tanh head "
            "trained end to end) instead of the raw scores r. Training only: the value is tanh(r / value_scale) "
            "either way; the pqm loss always regresses the value."
        },
    )
    share_prefix: bool = field(
        default=True,
        metadata={
            "help": "Run the shared prefix of a pair once (prefix, chosen step, rejected step in one row with a block "
            "attention mask). Needs attn_implementation sdpa or eager; others fall back to two rows per pair."
        },
    )
    self_evolution_round: int | None = field(
        default=None,
        metadata={"help": "The self-evolution round the PPM belongs to (paper §3.4); shown on the model card."},
    )

    def __post_init__(self):
        super().__post_init__()
        if self.loss_type not in LOSS_TYPES:
            raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {self.loss_type!r}")
        if self.max_length is not None and self.max_length < 2:
            raise ValueError(f"max_length must be >= 2 or None, got {self.max_length}")
        self.value_transform  # noqa: B018 - raises on a bad value_scale

    @property
    def value_transform(self) -> ValueTransform:
        """The `ValueTransform` of `value_scale` and `train_through_tanh` (what the checkpoint records)."""
        return ValueTransform(scale=self.value_scale, train_through_tanh=self.train_through_tanh)


@dataclass
class DataCollatorForPPM(DataCollatorMixin):
    """Batches of tokenised PPM examples: a prefix (`prompt_ids`) and one or two steps after it.

    Pairs (`chosen_ids`, `rejected_ids`) with `share_prefix`: one row per pair, `prefix | chosen | rejected`, with
    `segment_ids` (0 prefix, 1 chosen, 2 rejected, -1 padding) from which the trainer builds the block attention
    mask, and `position_ids` that restart after the prefix for each step. Otherwise (or for `completion_ids`): one
    row per sequence `prefix + step`, right-padded, with a 2D `attention_mask`; pair rows are all chosen rows then
    all rejected rows.

    `score_index` (batch, steps per example) holds the flat index into the (rows, seq) token scores of the last
    token of each step; `weight` (batch,) the example weights; `label` (batch,) the regression targets if any.
    """

    pad_token_id: int
    share_prefix: bool = True
    pad_to_multiple_of: int | None = None
    return_tensors: str = "pt"

    def torch_call(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        step_keys = ("chosen_ids", "rejected_ids") if "chosen_ids" in examples[0] else ("completion_ids",)
        if self.share_prefix and len(step_keys) > 1:
            rows = [[ex["prompt_ids"], *(ex[key] for key in step_keys)] for ex in examples]
        else:
            rows = [[ex["prompt_ids"], ex[key]] for key in step_keys for ex in examples]
        width = max(sum(len(part) for part in row) for row in rows)
        if self.pad_to_multiple_of:
            width = -(-width // self.pad_to_multiple_of) * self.pad_to_multiple_of
        input_ids = torch.full((len(rows), width), self.pad_token_id, dtype=torch.long)
        segment_ids = torch.full((len(rows), width), -1, dtype=torch.long)
        position_ids = torch.zeros((len(rows), width), dtype=torch.long)
        ends = []  # flat index of the last token of every step, in row order
        for r, (prefix, *steps) in enumerate(rows):
            input_ids[r, : len(prefix)] = torch.tensor(prefix, dtype=torch.long)
            segment_ids[r, : len(prefix)] = 0
            position_ids[r, : len(prefix)] = torch.arange(len(prefix))
            start = len(prefix)
            for s, step in enumerate(steps, start=1):
                stop = start + len(step)
                input_ids[r, start:stop] = torch.tensor(step, dtype=torch.long)
                segment_ids[r, start:stop] = s
                position_ids[r, start:stop] = torch.arange(len(prefix), len(prefix) + len(step))
                ends.append(r * width + stop - 1)
                start = stop
        batch = {"input_ids": input_ids, "weight": torch.tensor([float(ex["weight"]) for ex in examples])}
        if len(rows) == len(examples):  # one row per example: its steps' ends in order
            batch["score_index"] = torch.tensor(ends).view(len(examples), -1)
        else:  # one row per sequence, grouped by step key
            batch["score_index"] = torch.tensor(ends).view(len(step_keys), len(examples)).T.contiguous()
        if self.share_prefix and len(step_keys) > 1:
            batch["segment_ids"] = segment_ids
            batch["position_ids"] = position_ids
        else:
            batch["attention_mask"] = (segment_ids >= 0).long()
        if "label" in examples[0]:
            batch["label"] = torch.tensor([float(ex["label"]) for ex in examples])
        return batch


def _shared_prefix_mask(segment_ids: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    """(batch, 1, seq, seq) attention mask of packed `prefix | chosen | rejected` rows.

    A token sees the earlier tokens of the prefix and of its own segment. Padding tokens see themselves only, so
    that no softmax row is empty (an empty row gives NaN, which would leak into the gradients). `dtype` None gives
    a boolean mask (True = attend, for SDPA); a float dtype an additive one (for eager attention).
    """
    seq = segment_ids.shape[1]
    query, key = segment_ids[:, :, None], segment_ids[:, None, :]  # (batch, seq, 1), (batch, 1, seq)
    causal = torch.ones(seq, seq, dtype=torch.bool, device=segment_ids.device).tril()
    visible = causal & (key >= 0) & ((key == 0) | (key == query))  # (batch, seq, seq)
    visible |= torch.eye(seq, dtype=torch.bool, device=segment_ids.device)
    visible = visible[:, None]
    if dtype is None:
        return visible
    return torch.zeros(visible.shape, dtype=dtype, device=visible.device).masked_fill(~visible, torch.finfo(dtype).min)


def _common_prefix_length(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def _fit(prefix: list[int], longest_step: int, max_length: int | None) -> tuple[list[int] | None, str]:
    """Cut the prefix from the left so that prefix + the longest step fit in `max_length` (None: the step can't)."""
    if max_length is None or len(prefix) + longest_step <= max_length:
        return prefix, "ok"
    if longest_step > max_length:
        return None, "too_long"
    return prefix[len(prefix) - (max_length - longest_step) :], "truncated"


def _tokenize_pairs(batch: dict[str, list], tokenizer: PreTrainedTokenizerBase, max_length: int | None) -> dict:
    """Tokenise `prompt + chosen` and `prompt + rejected` whole, then split them at their longest common prefix.

    Each side is tokenised exactly as the scorer tokenises it; the split keeps at least one token per step, so that
    a step that is a prefix of the other still has its own last token.
    """
    out: dict[str, list] = {"prompt_ids": [], "chosen_ids": [], "rejected_ids": [], "_ppm_status": []}
    chosen_all = _encode(tokenizer, [ppm_text(p, c) for p, c in zip(batch["prompt"], batch["chosen"])])
    rejected_all = _encode(tokenizer, [ppm_text(p, r) for p, r in zip(batch["prompt"], batch["rejected"])])
    for i, (chosen, rejected) in enumerate(zip(chosen_all, rejected_all)):
        if not batch["chosen"][i].strip() or not batch["rejected"][i].strip():
            status, prefix, chosen, rejected = "empty", [], [], []
        elif chosen == rejected:
            status, prefix, chosen, rejected = "identical", [], [], []
        else:
            shared = min(_common_prefix_length(chosen, rejected), len(chosen) - 1, len(rejected) - 1)
            prefix, chosen, rejected = chosen[:shared], chosen[shared:], rejected[shared:]
            prefix, status = _fit(prefix, max(len(chosen), len(rejected)), max_length)
            if prefix is None:
                prefix, chosen, rejected = [], [], []
        out["prompt_ids"].append(prefix)
        out["chosen_ids"].append(chosen)
        out["rejected_ids"].append(rejected)
        out["_ppm_status"].append(status)
    return out


def _tokenize_values(batch: dict[str, list], tokenizer: PreTrainedTokenizerBase, max_length: int | None) -> dict:
    """Tokenise `prompt + completion` whole; the prefix is what it shares with the tokenised prompt."""
    out: dict[str, list] = {"prompt_ids": [], "completion_ids": [], "_ppm_status": []}
    full_all = _encode(tokenizer, [ppm_text(p, c) for p, c in zip(batch["prompt"], batch["completion"])])
    prompt_all = _encode(tokenizer, batch["prompt"])
    for completion, full, prompt in zip(batch["completion"], full_all, prompt_all):
        if not completion.strip():
            status, prefix, step = "empty", [], []
        else:
            shared = min(_common_prefix_length(full, prompt), len(full) - 1)
            prefix, step = full[:shared], full[shared:]
            prefix, status = _fit(prefix, len(step), max_length)
            if prefix is None:
                prefix, step = [], []
        out["prompt_ids"].append(prefix)
        out["completion_ids"].append(step)
        out["_ppm_status"].append(status)
    return out


def _tokenize(batch: dict[str, list], tokenizer: PreTrainedTokenizerBase, loss_type: str, max_length: int | None):
    n = len(batch["prompt"])
    weights = [1.0 if w is None else float(w) for w in batch.get("weight", [1.0] * n)]
    invalid = [w for w in weights if not (math.isfinite(w) and w >= 0)]
    if invalid:
        raise ValueError(f"weights must be finite and >= 0, got {invalid[:5]}")
    if loss_type == "pqm":
        labels = [float(label) for label in batch["label"]]
        if any(not -1.0 <= label <= 1.0 for label in labels):
            raise ValueError(f"labels must lie in [-1, 1], got {[x for x in labels if not -1 <= x <= 1][:5]}")
        return {**_tokenize_values(batch, tokenizer, max_length), "label": labels, "weight": weights}
    return {**_tokenize_pairs(batch, tokenizer, max_length), "weight": weights}


class PPMTrainer(RewardTrainer):
    """Trainer of the process preference model (paper §3.3, Eq. 4), with the ORM and PQM baselines.

    Use it like [`trl.RewardTrainer`]:

    ```python
    trainer = PPMTrainer("path/to/policy", args=PPMConfig(output_dir="ppm"), train_dataset=pairs,
                         processing_class=tokenizer)
    trainer.train()
    trainer.save_model()
    ```

    The model is an `AutoModelForSequenceClassification` with num_labels=1 (a causal LM checkpoint gets a new score
    head, as in `RewardTrainer`). Its raw score `r` of a text is the score head at the text's last token, the
    text being `ppm_text(prompt, step)` tokenised whole; the value of a partial solution is `tanh(r / s)` in
    [-1, 1] with `s = args.value_scale` (what `TransformersPPMScorer` returns). The trainer records the value
    transform (`args.value_transform`) in the model's config, so every checkpoint it saves carries it in
    config.json (`rstar_value_transform`) and the scorers value it as it was trained. A full fine-tune saves a
    standard checkpoint that
    `AutoModelForSequenceClassification.from_pretrained` (and vLLM's pooling runner, which also reads the last
    token) load with no extra file. With `peft_config`, checkpoints hold the PEFT adapter: the LoRA weights plus a
    full copy of the score head (`"score"` is added to `modules_to_save`); `trainer.model.merge_and_unload()` then
    `save_pretrained` gives the standard checkpoint.

    Losses, with per-example weights `w` (column `weight`, default 1; Eq. 4 uses 1 / (n_pos * n_neg)):

    - `"ppm"` / `"orm"`: `sum(w * -log sigmoid(x(chosen) - x(rejected))) / sum(w)` (Eq. 4), where `x` is the raw
      score `r`, as the public code and `RewardTrainer` do, or with `args.train_through_tanh` the value
      `tanh(r / s)` (the tanh head trained end to end); `center_rewards_coefficient` adds
      `c * (x_chosen + x_rejected)^2` per pair.
    - `"pqm"`: `sum(w * (tanh(r / s) - label)^2) / sum(w)`.

    `sum(w)` runs over the whole optimizer step: all micro-batches of gradient accumulation on all processes, so
    the gradient does not depend on how a batch is split (evaluation normalises each batch by its own weights).

    Dataset preparation (in `__init__`, also for datasets passed to `evaluate`): missing columns raise a
    ValueError; examples with an empty step and pairs whose two sides tokenise identically are dropped; long
    examples lose the start of their prefix (`max_length`; both steps of a pair keep the same prefix tokens, as
    many as the longer step leaves room for). The counts are logged and kept in
    `trainer.dataset_stats[name]` (not for `IterableDataset`s). A tokenizer without pad token gets its eos token.

    Where it differs from `RewardTrainer`: the prompt must be explicit (a `prompt` column, the prefix both sides
    share; implicit-prompt pairs are refused), data must be plain text (conversational data is refused: render it
    with the chat template first), a `margin` column is refused (Eq. 4 has none; use `weight` for per-pair weights),
    and an empty dataset, or one the filters above empty, is an error naming the counts. A pair is one packed row
    (prefix once, both steps), and the loss is normalised by the weights of the whole optimizer step.

    Logged metrics (train and eval, unweighted means over examples): `accuracy` (pair accuracy), `margin`,
    `chosen_score`, `rejected_score` (raw scores); for `"pqm"`: `mse` (of the value against the label) and
    `value`.

    Args: as [`trl.RewardTrainer`], with `args` a [`PPMConfig`].
    """

    _tag_names = ["trl", "rstar-math", "process-reward-model"]
    _name = "PPM"
    _paper = {
        "title": "rStar-Math: Small LLMs Can Master Math Reasoning with Self-Evolved Deep Thinking",
        "id": "2501.04519",
        "citation": RSTAR_MATH_CITATION,
    }
    # `compute_loss` divides by the weight sum of the whole accumulated batch: `Trainer` must not divide again.
    loss_is_scaled_for_ga = True

    def __init__(
        self,
        model,
        args: PPMConfig | None = None,
        data_collator=None,
        train_dataset: Dataset | IterableDataset | None = None,
        eval_dataset=None,
        processing_class: PreTrainedTokenizerBase | None = None,
        compute_metrics=None,
        callbacks=None,
        optimizers=(None, None),
        optimizer_cls_and_kwargs=None,
        preprocess_logits_for_metrics=None,
        quantization_config=None,
        peft_config=None,
    ):
        model_id = model if isinstance(model, str) else get_config_model_id(model.config)
        if args is None:
            args = PPMConfig(f"{model_id.split('/')[-1]}-PPM")
        elif not isinstance(args, PPMConfig):
            raise TypeError(f"args must be a PPMConfig, got {type(args).__name__}")
        if processing_class is None:
            processing_class = AutoTokenizer.from_pretrained(model_id, trust_remote_code=args.trust_remote_code)
        # The collator needs the pad id before `RewardTrainer` (which would pick the same token) runs.
        pad_token = args.pad_token or processing_class.pad_token or processing_class.eos_token
        if pad_token is None:
            raise ValueError("the tokenizer has neither a pad token nor an eos token; set `tokenizer.pad_token`")
        processing_class.pad_token = pad_token
        if peft_config is not None and "score" not in (peft_config.modules_to_save or []):
            peft_config.modules_to_save = [*(peft_config.modules_to_save or []), "score"]  # train the new head fully
        if data_collator is None:
            data_collator = DataCollatorForPPM(
                pad_token_id=processing_class.pad_token_id,
                share_prefix=args.share_prefix,
                pad_to_multiple_of=args.pad_to_multiple_of,
            )
        self.dataset_stats: dict[str, dict[str, int]] = {}
        super().__init__(
            model=model,
            args=args,
            data_collator=data_collator,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=processing_class,
            compute_metrics=compute_metrics,
            callbacks=callbacks,
            optimizers=optimizers,
            optimizer_cls_and_kwargs=optimizer_cls_and_kwargs,
            preprocess_logits_for_metrics=preprocess_logits_for_metrics,
            quantization_config=quantization_config,
            peft_config=peft_config,
        )
        attn_implementation = self.model.config._attn_implementation
        if args.share_prefix and attn_implementation not in ("sdpa", "eager"):
            logger.warning(
                "share_prefix needs attn_implementation 'sdpa' or 'eager' (custom 4D attention masks), the model "
                "uses %r: pairs are batched as two rows each instead",
                attn_implementation,
            )
            if isinstance(self.data_collator, DataCollatorForPPM):
                self.data_collator.share_prefix = False
        # Eager attention adds the mask to the logits; SDPA takes a boolean one.
        self._additive_mask = attn_implementation == "eager"
        self._record_value_transform()

    def _record_value_transform(self) -> None:
        """Write `args.value_transform` into the model's config, so that every saved checkpoint carries it."""
        config = self.accelerator.unwrap_model(self.model).config  # a PEFT model: its base model's config
        previous = read_value_transform(config)
        if hasattr(config, VALUE_TRANSFORM_KEY) and previous != self.args.value_transform:
            logger.warning(
                "the model's config records the value transform %s; this training uses %s, which replaces it",
                previous.to_dict(), self.args.value_transform.to_dict(),
            )  # fmt: skip
        write_value_transform(config, self.args.value_transform)

    # -- data ------------------------------------------------------------------------------------------------

    def _prepare_dataset(
        self,
        dataset: Dataset | IterableDataset,
        processing_class: PreTrainedTokenizerBase,
        args: PPMConfig,
        dataset_name: str,
    ) -> Dataset | IterableDataset:
        columns = get_dataset_column_names(dataset)
        step_columns = ["completion"] if args.loss_type == "pqm" else ["chosen", "rejected"]
        if {"prompt_ids", *(f"{c}_ids" for c in step_columns)} <= set(columns):
            return dataset  # already prepared (e.g. by `__init__`, then passed to `evaluate`)
        required = ["prompt", *step_columns, *(["label"] if args.loss_type == "pqm" else [])]
        missing = [c for c in required if c not in columns]
        if missing:
            hint = (
                " PPMTrainer needs an explicit prompt (the question and the steps before the pair, which both sides"
                " share); RewardTrainer's implicit-prompt data (the prefix repeated inside chosen and rejected) is"
                " not supported: split it off, or build pairs with rstar_trl.build_preference_pairs."
                if "prompt" in missing else ""
            )  # fmt: skip
            raise ValueError(
                f"the {dataset_name} dataset lacks column(s) {missing}: loss_type={args.loss_type!r} needs "
                f"{required} (and optionally 'weight'); it has {columns}.{hint}"
            )
        if "margin" in columns:
            raise ValueError(
                f"the {dataset_name} dataset has a 'margin' column, which PPMTrainer does not support (Eq. 4 has no "
                "margin; RewardTrainer's margin loss is not implemented here): remove the column, or use 'weight' "
                "for per-pair weights"
            )
        if isinstance(dataset, Dataset):
            if len(dataset) == 0:
                raise ValueError(f"the {dataset_name} dataset is empty: there are no pairs to train on")
            first = dataset[0]
            if any(isinstance(first[c], (list, dict)) for c in ["prompt", *step_columns]):
                raise ValueError(
                    f"the {dataset_name} dataset is conversational (its 'prompt' or step columns hold messages), "
                    "which PPMTrainer does not support: the PPM reads the policy's own text format. Render the "
                    "messages to text first (e.g. tokenizer.apply_chat_template(..., tokenize=False))"
                )
        map_kwargs: dict[str, Any] = {}
        if isinstance(dataset, Dataset):  # `IterableDataset.map` takes neither
            map_kwargs = {"num_proc": args.dataset_num_proc, "desc": f"Tokenizing {dataset_name} dataset"}
        with global_then_local_main_first():
            dataset = dataset.map(
                _tokenize,
                batched=True,
                fn_kwargs={"tokenizer": processing_class, "loss_type": args.loss_type, "max_length": args.max_length},
                **map_kwargs,
            )
            if isinstance(dataset, Dataset):
                self._record_dataset_stats(dataset_name, Counter(dataset["_ppm_status"]))
                map_kwargs["desc"] = f"Dropping unusable {dataset_name} examples"
            dataset = dataset.filter(
                lambda statuses: [s in _KEPT for s in statuses],
                input_columns="_ppm_status",
                batched=True,
                **map_kwargs,
            )
        if isinstance(dataset, Dataset) and len(dataset) == 0:
            stats = getattr(self, "dataset_stats", {}).get(dataset_name)
            raise ValueError(
                f"every example of the {dataset_name} dataset was dropped as unusable (empty or identical sides, or a "
                f"step longer than max_length={args.max_length}): {stats}"
            )
        return dataset.remove_columns("_ppm_status")

    def _record_dataset_stats(self, dataset_name: str, statuses: Counter) -> None:
        stats = {
            "examples": sum(statuses.values()),
            "kept": statuses["ok"] + statuses["truncated"],
            "truncated": statuses["truncated"],
            "dropped_empty_step": statuses["empty"],
            "dropped_identical": statuses["identical"],
            "dropped_step_too_long": statuses["too_long"],
        }
        self.dataset_stats[dataset_name] = stats
        summary = ", ".join(f"{key} {value}" for key, value in stats.items())
        if stats["kept"] < stats["examples"] or stats["truncated"]:
            logger.warning("PPM %s dataset: %s", dataset_name, summary)
        else:
            logger.info("PPM %s dataset: %s", dataset_name, summary)

    def _set_signature_columns_if_needed(self):
        if self._signature_columns is None:
            self._signature_columns = _SIGNATURE_COLUMNS

    # -- loss --------------------------------------------------------------------------------------------------

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        # Eq. 4 normalisation over the whole optimizer step: the weight sum of all its micro-batches, all processes.
        batch_samples, _ = super().get_batch_samples(epoch_iterator, num_batches, device)
        weight_sum = sum((batch["weight"].to(device).sum() for batch in batch_samples), torch.zeros((), device=device))
        if self.args.world_size > 1:
            weight_sum = self.accelerator.gather(weight_sum).sum()
        return batch_samples, weight_sum

    def _scores(self, model, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """Raw scores (batch, steps per example) at the last token of every prefix + step of the batch."""
        if "segment_ids" in inputs:
            dtype = self.accelerator.unwrap_model(model).dtype if self._additive_mask else None
            attention_mask = _shared_prefix_mask(inputs["segment_ids"], dtype)
        else:
            attention_mask = inputs["attention_mask"]
        head = _score_head(self.accelerator.unwrap_model(model))
        with _capture_token_scores(head) as captured:
            model(
                input_ids=inputs["input_ids"],
                attention_mask=attention_mask,
                position_ids=inputs.get("position_ids"),
                use_cache=False,
            )
        token_scores = captured[-1].squeeze(-1).float()  # (rows, seq)
        return token_scores.flatten()[inputs["score_index"]]

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        mode = "train" if self.model.training else "eval"
        scores = self._scores(model, inputs)  # (batch, 2) for pairs, (batch, 1) for pqm
        weight = inputs["weight"]
        transform = self.args.value_transform
        if self.args.loss_type == "pqm":
            per_example = (value_from_score(scores[:, 0], transform) - inputs["label"]) ** 2
        else:
            # Eq. 4 on the raw scores, or on the values (a tanh head trained end to end).
            compared = value_from_score(scores, transform) if transform.train_through_tanh else scores
            per_example = -F.logsigmoid(compared[:, 0] - compared[:, 1])
            if self.args.center_rewards_coefficient is not None:
                per_example = per_example + self.args.center_rewards_coefficient * compared.sum(-1) ** 2
        if num_items_in_batch is None:  # evaluation, or a direct call: this batch alone
            normaliser = weight.sum()
        else:  # training: `DistributedDataParallel` averages the processes' gradients, hence the factor
            normaliser = torch.as_tensor(num_items_in_batch, device=weight.device) / self.accelerator.num_processes
        loss = (weight * per_example).sum() / normaliser.clamp(min=torch.finfo(weight.dtype).tiny)
        self._record_metrics(mode, scores.detach(), inputs)
        return (loss, {"scores": scores}) if return_outputs else loss

    def _record_metrics(self, mode: str, scores: torch.Tensor, inputs: dict[str, torch.Tensor]) -> None:
        metrics = self._metrics[mode]
        scores = self.accelerator.gather_for_metrics(scores)
        if self.args.loss_type == "pqm":
            values = value_from_score(scores[:, 0], self.args.value_transform)
            labels = self.accelerator.gather_for_metrics(inputs["label"])
            metrics["mse"].extend(((values - labels) ** 2).tolist())
            metrics["value"].extend(values.tolist())
            return
        chosen, rejected = scores[:, 0], scores[:, 1]
        metrics["accuracy"].extend((chosen > rejected).float().tolist())
        metrics["margin"].extend((chosen - rejected).tolist())
        metrics["chosen_score"].extend(chosen.tolist())
        metrics["rejected_score"].extend(rejected.tolist())

    # -- model card --------------------------------------------------------------------------------------------

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False):
        self._record_value_transform()  # again: `args` may have changed since `__init__`
        super().save_model(output_dir, _internal_call)
        if not _internal_call and self.is_world_process_zero():  # checkpoints and pushes write theirs already
            output_dir = output_dir or self.args.output_dir
            self._model_card(Path(output_dir).name).save(os.path.join(output_dir, "README.md"))

    def create_model_card(
        self,
        model_name: str | None = None,
        dataset_name: str | None = None,
        tags: str | list[str] | None = None,
    ):
        """Write the PPM model card (`hub/ppm_model_card.md`) to `args.output_dir/README.md`.

        Called on every checkpoint and by `push_to_hub`, like TRL's trainers; `save_model` writes one too.
        """
        if self.is_world_process_zero():
            card = self._model_card(model_name, dataset_name, tags)
            card.save(os.path.join(self.args.output_dir, "README.md"))

    def _model_card(
        self, model_name: str | None, dataset_name: str | None = None, tags: str | list[str] | None = None
    ) -> ModelCard:
        base_model = get_config_model_id(self.model.config) or None
        tags = {tags} if isinstance(tags, str) else set(tags or [])
        tags.update(self._tag_names)
        eval_metrics = {
            key.removeprefix("eval_"): value
            for entry in self.state.log_history
            for key, value in entry.items()
            if key.startswith("eval_")
        }
        train_metrics = {
            key: value
            for entry in self.state.log_history
            for key, value in entry.items()
            if key in ("loss", "accuracy", "margin", "mse")
        }
        card_data = ModelCardData(
            base_model=base_model if base_model and not os.path.isdir(base_model) else None,
            datasets=dataset_name,
            library_name="transformers",
            model_name=model_name,
            tags=["generated_from_trainer", *sorted(tags)],
        )
        return ModelCard.from_template(
            card_data,
            template_path=str(MODEL_CARD_TEMPLATE),
            model_name=model_name or Path(self.args.output_dir).name,
            base_model=base_model,
            base_model_on_hub=card_data.base_model is not None,
            hub_model_id=self.hub_model_id or model_name,
            dataset_name=dataset_name,
            loss_type=self.args.loss_type,
            round=self.args.self_evolution_round,
            dataset_stats=self.dataset_stats,
            train_metrics=train_metrics,
            eval_metrics=eval_metrics,
            max_length=self.args.max_length,
            learning_rate=self.args.learning_rate,
            num_train_epochs=self.args.num_train_epochs,
            total_batch_size=self.args.per_device_train_batch_size
            * self.args.gradient_accumulation_steps
            * self.args.world_size,
            citation=RSTAR_MATH_CITATION,
            rstar_trl_version=rstar_trl.__version__,
            trl_version=version("trl"),
            transformers_version=version("transformers"),
            pytorch_version=version("torch"),
            datasets_version=version("datasets"),
            tokenizers_version=version("tokenizers"),
        )
