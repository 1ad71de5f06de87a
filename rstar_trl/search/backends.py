"""Generation backends: text prefixes in, `n` sampled continuations per prefix out, each stopping at a step marker.

MCTS only needs this one call. Every backend returns the continuation text up to and including the first stop
string, the number of generated tokens, and why generation ended.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Completion:
    """One sampled continuation.

    Args:
        text: the generated text, cut right after the first stop string (kept, as SPEC §2 wants).
        num_tokens: tokens generated for it (up to the stop).
        finish_reason: "stop" (a stop string ended it), "length" (token budget), "eos" (end-of-sequence token),
            or "prompt_too_long" (the prefix left no room in the context: nothing was generated).
    """

    text: str
    num_tokens: int
    finish_reason: str


class GenerationBackend(ABC):
    """What `MCTSGenerator` needs from a generation engine."""

    @abstractmethod
    def generate(
        self,
        prompts: Sequence[str],
        n: int,
        stop: Sequence[str],
        max_new_tokens: int,
        temperature: float = 1.0,
        top_p: float = 1.0,
        seed: int = 0,
    ) -> list[list[Completion]]:
        """Sample `n` continuations of every prompt; result[i] holds the continuations of prompts[i]."""

    @abstractmethod
    def count_tokens(self, texts: Sequence[str]) -> list[int]:
        """Number of tokens of each text (used to skip prompts that do not fit the context)."""

    @property
    @abstractmethod
    def max_context(self) -> int | None:
        """The longest sequence (prompt + generation) the model takes, if known."""


def cut_at_stop(text: str, stop: Sequence[str]) -> tuple[str, bool]:
    """Cut `text` right after the earliest stop string; returns (text, whether a stop string was found)."""
    ends = [i + len(s) for s in stop if (i := text.find(s)) >= 0]
    return (text[: min(ends)], True) if ends else (text, False)


class TransformersBackend(GenerationBackend):
    """Batched sampling with `transformers`' `generate` (left padding, stop strings).

    When every stop string is a single token of the tokenizer (the step markers are, once added with
    `add_step_tokens`), they are passed as end-of-sequence ids, which is much cheaper than string matching;
    otherwise `generate(stop_strings=...)` is used.

    Args:
        model: a causal LM or a path/Hub id to load one from.
        tokenizer: its tokenizer (loaded from `model` when it is a path and this is None).
        device: "cpu", "cuda", ... (default: CUDA when available).
        dtype: "auto", "float32", "bfloat16" or "float16" when loading from a path.
        batch_size: sequences (prompts x samples) per `generate` call.
        torch_threads: if set, `torch.set_num_threads` for CPU generation (process-wide). A tiny model generates
            over 50x faster with 1 thread than with 2 threads on 2 busy cores (OpenMP threads spin on each other).
    """

    def __init__(self, model, tokenizer=None, device: str | None = None, dtype: str = "auto", batch_size: int = 64,
                 torch_threads: int | None = None):  # fmt: skip
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if torch_threads is not None:
            torch.set_num_threads(torch_threads)

        if isinstance(model, str):
            if tokenizer is None:
                try:
                    tokenizer = AutoTokenizer.from_pretrained(model)
                except (OSError, ValueError) as exc:
                    raise ValueError(
                        f"no tokenizer could be loaded from {model!r}; pass processing_class=... explicitly"
                    ) from exc
            model = AutoModelForCausalLM.from_pretrained(model, dtype=dtype)
        if tokenizer is None:
            raise ValueError("a loaded model needs its tokenizer: pass processing_class=... (or tokenizer=...)")
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model = model.to(self.device).eval()
        self.tokenizer = tokenizer
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token_id is None:
            if self.tokenizer.eos_token_id is None:
                raise ValueError("the tokenizer has neither a pad nor an eos token; set tokenizer.pad_token first")
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.batch_size = batch_size

    @property
    def max_context(self) -> int | None:
        return getattr(self.model.config, "max_position_embeddings", None)

    def count_tokens(self, texts: Sequence[str]) -> list[int]:
        return [len(ids) for ids in self.tokenizer(list(texts), add_special_tokens=False).input_ids]

    def _stop_token_ids(self, stop: Sequence[str]) -> list[int] | None:
        ids = []
        for s in stop:
            encoded = self.tokenizer(s, add_special_tokens=False).input_ids
            if len(encoded) != 1 or self.tokenizer.decode(encoded, skip_special_tokens=False) != s:
                return None
            ids.append(encoded[0])
        return ids

    @torch.inference_mode()
    def generate(self, prompts, n, stop, max_new_tokens, temperature=1.0, top_p=1.0, seed=0):
        prompts = list(prompts)
        encoded = self.tokenizer(prompts, add_special_tokens=False).input_ids
        results: list[list[Completion]] = [[] for _ in prompts]
        stop_ids = self._stop_token_ids(stop)
        eos_ids = list(stop_ids or [])
        if self.tokenizer.eos_token_id is not None:
            eos_ids.append(self.tokenizer.eos_token_id)
        # One row per sample; rows sorted by prompt length so each batch carries little padding.
        rows = [(i, s) for i in range(len(prompts)) for s in range(n)]
        too_long = set()
        if self.max_context:
            too_long = {i for i, ids in enumerate(encoded) if len(ids) + max_new_tokens > self.max_context}
        rows = sorted((r for r in rows if r[0] not in too_long), key=lambda r: (len(encoded[r[0]]), r))
        for i in sorted(too_long):
            results[i] = [Completion("", 0, "prompt_too_long")] * n
        generator_seed = torch.Generator().manual_seed(seed)
        for start in range(0, len(rows), self.batch_size):
            batch = rows[start : start + self.batch_size]
            texts = self._generate_batch(
                [encoded[i] for i, _ in batch], stop, stop_ids, eos_ids, max_new_tokens, temperature, top_p,
                int(torch.randint(2**31, (1,), generator=generator_seed)),
            )  # fmt: skip
            for (i, _), completion in zip(batch, texts):
                results[i].append(completion)
        return results

    def _generate_batch(self, ids, stop, stop_ids, eos_ids, max_new_tokens, temperature, top_p, seed):
        pad = self.tokenizer.pad_token_id
        width = max(len(x) for x in ids)
        input_ids = torch.tensor([[pad] * (width - len(x)) + x for x in ids], device=self.device)  # (batch, width)
        attention_mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in ids], device=self.device)
        kwargs = {}
        if stop_ids is None:  # multi-token markers: let transformers match the strings
            kwargs.update(stop_strings=list(stop), tokenizer=self.tokenizer)
        torch.manual_seed(seed)
        sampling = temperature > 0
        out = self.model.generate(
            input_ids=input_ids,
            attention_mask=attention_mask,
            max_new_tokens=max_new_tokens,
            do_sample=sampling,
            temperature=temperature if sampling else None,
            top_p=top_p if sampling else None,
            top_k=None,
            eos_token_id=eos_ids or None,
            pad_token_id=pad,
            **kwargs,
        )[:, width:]  # (batch, new tokens)
        completions = []
        eos = set(eos_ids)
        for row in out.tolist():
            tokens = []
            ended_by_eos = False
            for token in row:
                if token in eos:
                    if stop_ids and token in stop_ids:
                        tokens.append(token)
                    else:
                        ended_by_eos = True
                    break
                tokens.append(token)
            text, stopped = cut_at_stop(self.tokenizer.decode(tokens, skip_special_tokens=False), stop)
            reason = "stop" if stopped else ("eos" if ended_by_eos else "length")
            completions.append(Completion(text, len(tokens), reason))
        return completions
