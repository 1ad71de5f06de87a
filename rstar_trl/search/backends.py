"""Generation backends: text prefixes in, `n` sampled continuations per prefix out, each stopping at a step marker.

MCTS only needs this one call. Every backend returns the continuation text up to and including the first stop
string, the number of generated tokens, and why generation ended.

Seeds are per prompt: the samples of a prompt depend on its own seed only, never on which other prompts share
the batch. That makes a problem's search tree independent of how problems are batched, sharded over processes,
or resumed after an interruption (`MCTSGenerator` derives each expansion's seed from the problem and the node).
"""

from __future__ import annotations

import contextlib
import inspect
import threading
from abc import ABC, abstractmethod
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from transformers import (
    DynamicCache,
    LogitsProcessor,
    LogitsProcessorList,
    StaticCache,
    TemperatureLogitsWarper,
    TopPLogitsWarper,
)
from transformers.cache_utils import DynamicLayer

from ..closing import Closeable
from .decoding import _MASK64, ContinuousDecoder, DecodeRequest, _gumbel


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def mix_seed(*parts: int) -> int:
    """A well-mixed 62-bit seed from integers (e.g. run seed, problem index, node id): nearby inputs give
    unrelated seeds, so per-problem streams do not overlap."""
    h = 0
    for part in parts:
        h = _splitmix64(h ^ (int(part) & _MASK64))
    return h >> 2


def prompt_seeds(seed: int | Sequence[int], count: int) -> list[int]:
    """One seed per prompt: `seed` itself when it is a sequence (checked for length), else derived from it."""
    if isinstance(seed, int):
        return [mix_seed(seed, i) for i in range(count)]
    seeds = [int(s) for s in seed]
    if len(seeds) != count:
        raise ValueError(f"got {len(seeds)} seeds for {count} prompts: pass one seed per prompt or a single int")
    return seeds


@dataclass(frozen=True)
class Completion:
    """One sampled continuation.

    Args:
        text: the generated text, cut right after the first stop string (kept, as paper §3.2 wants).
        num_tokens: tokens generated for it (up to the stop).
        finish_reason: "stop" (a stop string ended it), "length" (token budget), "eos" (end-of-sequence token),
            or "prompt_too_long" (the prefix left no room in the context: nothing was generated).
    """

    text: str
    num_tokens: int
    finish_reason: str


class GenerationBackend(Closeable, ABC):
    """What `MCTSGenerator` needs from a generation engine."""

    #: Whether `generate` may be called from several threads at once (`MCTSConfig.pipeline_lanes`); otherwise the
    #: search's lanes take turns.
    concurrent_calls: bool = False

    @abstractmethod
    def generate(
        self,
        prompts: Sequence[str],
        n: int,
        stop: Sequence[str],
        max_new_tokens: int,
        temperature: float = 1.0,
        top_p: float = 1.0,
        seed: int | Sequence[int] = 0,
    ) -> list[list[Completion]]:
        """Sample `n` continuations of every prompt; result[i] holds the continuations of prompts[i].

        `seed` is one seed per prompt (a sequence) or a single int from which per-prompt seeds are derived. The
        samples of prompt i depend only on (prompt i, its seed, n, the sampling settings), not on the batch."""

    @abstractmethod
    def count_tokens(self, texts: Sequence[str]) -> list[int]:
        """Number of tokens of each text (used to skip prompts that do not fit the context)."""

    @property
    @abstractmethod
    def max_context(self) -> int | None:
        """The longest sequence (prompt + generation) the model takes, if known."""


def count_tokens(tokenizer, texts: Sequence[str]) -> list[int]:
    """Number of tokens of each text, without special tokens added (what a prompt costs in the context)."""
    return [len(ids) for ids in tokenizer(list(texts), add_special_tokens=False).input_ids]


def split_stop_tokens(tokenizer, stop: Sequence[str]) -> tuple[list[int], list[str]]:
    """The stop strings that are single tokens of `tokenizer` (as token ids, matched cheaply by the engine), and
    the rest (as strings)."""
    ids, strings = [], []
    for s in stop:
        encoded = tokenizer(s, add_special_tokens=False).input_ids
        if len(encoded) == 1 and tokenizer.decode(encoded, skip_special_tokens=False) == s:
            ids.append(encoded[0])
        else:
            strings.append(s)
    return ids, strings


def cut_at_stop(text: str, stop: Sequence[str]) -> tuple[str, bool]:
    """Cut `text` right after the earliest stop string; returns (text, whether a stop string was found)."""
    ends = [i + len(s) for s in stop if (i := text.find(s)) >= 0]
    return (text[: min(ends)], True) if ends else (text, False)


class DriverRole:
    """One thread at a time runs an engine for every call waiting on it (the pattern of `TransformersBackend` and
    `VLLMBackend` with several calling threads): `with role(done) as driving:` waits, holding `turns` between
    waits, until no other thread drives or `done()`; `driving` says whether this thread took the role (False: done
    meanwhile); the role is given up after the block, waking the threads that wait on `turns`."""

    def __init__(self):
        self.turns = threading.Condition()
        self.driving = False

    @contextlib.contextmanager
    def __call__(self, done: Callable[[], bool] = lambda: False):
        with self.turns:
            while self.driving and not done():
                self.turns.wait()
            took = not done()
            self.driving = self.driving or took
        try:
            yield took
        finally:
            if took:
                with self.turns:
                    self.driving = False
                    self.turns.notify_all()


class TransformersBackend(GenerationBackend):
    """Batched sampling with a per-sample seed, in one running batch (`ContinuousDecoder`).

    When every stop string is a single token of the tokenizer (the step markers are, once added with
    `add_step_tokens`) and the model keeps a plain KV cache, calls are decoded by `ContinuousDecoder`: a running
    batch that the prompts of every call join as room frees up, so calls from several threads (pipeline lanes) share
    its decoding steps. Otherwise transformers' `generate` samples them (with `stop_strings=...` for markers of
    several tokens), one call at a time. Both give the same samples.

    Args:
        model: a causal LM or a path/Hub id to load one from.
        tokenizer: its tokenizer (loaded from `model` when it is a path and this is None).
        device: "cpu", "cuda", ... (default: CUDA when available).
        dtype: "auto", "float32", "bfloat16" or "float16" when loading from a path.
        batch_size: samples decoded at once (the running batch's size; with `generate`, per call).
        torch_threads: if set, `torch.set_num_threads` for CPU generation (process-wide). A tiny model generates
            over 50x faster with 1 thread than with 2 threads on 2 busy cores (OpenMP threads spin on each other).
        prefix_cache_mb: memory for the KV cache of prefixes already encoded (`PrefixCache`), 0 to turn it off.
            MCTS asks for a node's continuations, then for its children's: with the cache, a prefix is encoded once
            and later calls encode only the tokens after the longest cached prefix (a step, or an executed output).
        prefill_pass_tokens: what one more encoding pass costs, in tokens encoded: prompts that join together are
            split into passes by their number of new tokens where that saves more (`encode_with_prefix_cache`).
            Default: 40 on CPU (a pass of the tiny policy costs about as much as 40 tokens there), 0 (one pass)
            elsewhere, where encoding a few more tokens in a pass costs next to nothing.
    """

    def __init__(self, model, tokenizer=None, device: str | None = None, dtype: str = "auto", batch_size: int = 64,
                 torch_threads: int | None = None, prefix_cache_mb: float = 1024,
                 prefill_pass_tokens: int | None = None):  # fmt: skip
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
        if prefill_pass_tokens is None:
            prefill_pass_tokens = 40 if self.device.type == "cpu" else 0
        self.prefill_pass_tokens = prefill_pass_tokens
        self._plain = _plain_cache(self.model)  # a full-attention KV cache, which this backend can manage itself
        self.prefix_cache = None
        if prefix_cache_mb > 0 and self._plain:
            self.prefix_cache = PrefixCache(prefix_cache_mb * 2**20)
        # Our own decoding loop (`ContinuousDecoder`) where it applies; False: always transformers' `generate` (same
        # samples). Calls from several threads (pipeline lanes) then share its running batch: one thread at a time
        # drives it, the others wait for their samples (or take over when the driver's own call is done).
        self.own_decoding = True
        self.decoder = ContinuousDecoder(self.model, self._encode_prompts, max_samples=batch_size)
        self.batch_size = batch_size
        self._role = DriverRole()  # one calling thread at a time runs the model
        self._turns = self._role.turns
        self._tokenizing = threading.Lock()  # a fast tokenizer must not be used by two threads at once

    def _encode_prompts(self, ids):
        return encode_in_passes(self.model, ids, self.tokenizer.pad_token_id, self.device, self.prefix_cache,
                                hold_back=1, pass_tokens=self.prefill_pass_tokens)  # fmt: skip

    @property
    def concurrent_calls(self) -> bool:  # noqa: D102 (see GenerationBackend)
        return self.own_decoding and self._plain

    # The decoder's knobs and counters, read and set on the backend.
    batch_size = property(lambda self: self.decoder.max_samples,
                          lambda self, value: setattr(self.decoder, "max_samples", value))  # fmt: skip
    compact_below = property(lambda self: self.decoder.compact_below,
                             lambda self, value: setattr(self.decoder, "compact_below", value))  # fmt: skip
    compactions = property(lambda self: self.decoder.compactions)
    decoded_tokens = property(lambda self: self.decoder.decoded_tokens,
                              lambda self, value: setattr(self.decoder, "decoded_tokens", value))  # fmt: skip
    sampled_tokens = property(lambda self: self.decoder.sampled_tokens,
                              lambda self, value: setattr(self.decoder, "sampled_tokens", value))  # fmt: skip

    @property
    def max_context(self) -> int | None:
        return getattr(self.model.config, "max_position_embeddings", None)

    def count_tokens(self, texts: Sequence[str]) -> list[int]:
        return count_tokens(self.tokenizer, texts)

    def close(self) -> None:
        """Free the prefix cache (call `prefix_cache.clear()` too after changing the model's weights in place) and
        the decoding buffers kept between calls."""
        if self.prefix_cache is not None:
            self.prefix_cache.clear()
        self.decoder.release()

    @torch.inference_mode()
    def generate(self, prompts, n, stop, max_new_tokens, temperature=1.0, top_p=1.0, seed=0):
        prompts = list(prompts)
        seeds = prompt_seeds(seed, len(prompts))
        with self._tokenizing:
            encoded = self.tokenizer(prompts, add_special_tokens=False).input_ids
        results: list[list[Completion]] = [[] for _ in prompts]
        stop_ids, rest = split_stop_tokens(self.tokenizer, stop)
        stop_ids = None if rest else stop_ids  # single-token markers only: else transformers matches the strings
        eos_ids = list(stop_ids or [])
        if self.tokenizer.eos_token_id is not None:
            eos_ids.append(self.tokenizer.eos_token_id)
        too_long = set()
        if self.max_context:
            too_long = {i for i, ids in enumerate(encoded) if len(ids) + max_new_tokens > self.max_context}
        for i in sorted(too_long):
            results[i] = [Completion("", 0, "prompt_too_long")] * n
        # Whole prompts per batch (their n samples share one prefill), sorted by length for little padding.
        order = sorted((i for i in range(len(prompts)) if i not in too_long), key=lambda i: (len(encoded[i]), i))
        if not order:
            return results
        if self.own_decoding and self._plain and stop_ids is not None and max(len(encoded[i]) for i in order) > 1:
            keys = [[mix_seed(seeds[i], j) >> 1 for j in range(n)] for i in order]
            request = DecodeRequest([encoded[i] for i in order], keys, n, eos_ids, max_new_tokens, temperature, top_p)
            self._decode(request)
            with self._tokenizing:
                for i, tokens in zip(order, request.tokens):
                    results[i] = self._completions(tokens, stop, stop_ids, eos_ids)
            return results
        per_batch = max(1, self.batch_size // n)
        with self._role():  # `generate`'s path: alone with the model
            for start in range(0, len(order), per_batch):
                batch = order[start : start + per_batch]
                completions = self._generate_batch(
                    [encoded[i] for i in batch], [seeds[i] for i in batch], n, stop, stop_ids, eos_ids,
                    max_new_tokens, temperature, top_p,
                )  # fmt: skip
                for k, i in enumerate(batch):
                    results[i] = completions[k * n : (k + 1) * n]
        return results

    def _decode(self, request: DecodeRequest) -> None:
        """Have `request` decoded in the shared running batch: drive the batch while the request is unfinished and
        no other thread drives it; otherwise wait (for the samples, or for the driver to leave)."""
        decoder = self.decoder
        with self._turns:
            decoder.submit(request)
        with self._role(lambda: request.done) as driving:
            try:
                while driving and not request.done:
                    with self._turns:  # other threads submit while this one decodes
                        decoder.admit()
                    if decoder.step():
                        with self._turns:
                            self._turns.notify_all()
            except BaseException as exc:
                with self._turns:
                    decoder.fail(exc)
                raise
        if request.error is not None:
            raise request.error

    def _generate_batch(self, ids, seeds, n, stop, stop_ids, eos_ids, max_new_tokens, temperature, top_p):
        pad = self.tokenizer.pad_token_id
        kwargs = {}
        if stop_ids is None:  # multi-token markers: let transformers match the strings
            kwargs.update(stop_strings=list(stop), tokenizer=self.tokenizer)
        if max(len(x) for x in ids) > 1 and (n > 1 or self._plain):
            # Encode every prompt but its last token here (once, not n times: `generate` alone would encode every
            # prompt n times), from the longest prefix cached, then repeat the KV cache n times; `generate`'s first
            # step then encodes only the last token.
            input_ids, attention_mask, cache = encode_with_prefix_cache(
                self.model, ids, pad, self.device, self.prefix_cache, hold_back=1, pass_tokens=self.prefill_pass_tokens
            )
            if self._plain and max_new_tokens <= input_ids.shape[1]:
                # A preallocated cache: a growing one copies all its keys and values at every new token, which costs
                # more than attending over the masked, not yet written tail when that tail (the token budget) is no
                # longer than the prompts (tiny policy, 64-token steps at depth: 1.23x the tokens/s of MCTS; with a
                # 256-token budget, 0.95x: hence the condition).
                static = StaticCache(config=self.model.config, max_cache_len=input_ids.shape[1] + max_new_tokens)
                for i, layer in enumerate(cache.layers):
                    static.update(layer.keys.repeat_interleave(n, dim=0), layer.values.repeat_interleave(n, dim=0), i)
                cache = static
            else:
                cache.batch_repeat_interleave(n)
            kwargs["past_key_values"] = cache
        else:
            width = max(len(x) for x in ids)
            input_ids = torch.tensor([[pad] * (width - len(x)) + x for x in ids], device=self.device)
            attention_mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in ids], device=self.device)
        width = input_ids.shape[1]
        input_ids = input_ids.repeat_interleave(n, dim=0)  # (prompts * n, width)
        attention_mask = attention_mask.repeat_interleave(n, dim=0)
        processors = LogitsProcessorList()
        if temperature > 0:
            if temperature != 1.0:
                processors.append(TemperatureLogitsWarper(temperature))
            if top_p < 1.0:
                processors.append(TopPLogitsWarper(top_p))
            keys = torch.tensor([mix_seed(s, j) >> 1 for s in seeds for j in range(n)], device=self.device)
            processors.append(RowSeededSampler(keys, prompt_width=width))
        out = self.model.generate(
            input_ids=input_ids,
            attention_mask=attention_mask,
            max_new_tokens=max_new_tokens,
            do_sample=False,  # sampling is RowSeededSampler's Gumbel noise + argmax
            temperature=None,
            top_p=None,
            top_k=None,
            logits_processor=processors,
            eos_token_id=eos_ids or None,
            pad_token_id=pad,
            **kwargs,
        )[:, width:]  # (prompts * n, new tokens)
        return self._completions(out.tolist(), stop, stop_ids, eos_ids)

    def _completions(self, rows: list[list[int]], stop, stop_ids, eos_ids) -> list[Completion]:
        """Completions from generated token rows: cut at the first end-of-sequence id (a single-token stop marker
        is kept, eos is not), decoded, and cut at the first stop string."""
        completions = []
        eos = set(eos_ids)
        for row in rows:
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


@torch.inference_mode()
def encode_with_prefix_cache(model, ids: list[list[int]], pad_id: int, device, prefix_cache: PrefixCache | None,
                             hold_back: int, pass_tokens: int = 0
                             ) -> tuple[torch.Tensor, torch.Tensor, DynamicCache]:  # fmt: skip
    """Encode token sequences into a KV cache with forward passes of `model` over the tokens that no cached prefix
    covers; the new prefixes go into `prefix_cache` (None: no cache, everything is encoded).

    `hold_back` tokens at the end of each row are left out of the passes (1 for generation, which encodes the last
    prompt token itself); with `hold_back=0` every row has at least one token in the one pass, so a caller can read
    the model's output at its last position (`[:, -1]`: a PPM's value).

    Rows are left-padded to the longest: [padding, from the cache, encoded now, held back]. A pass encodes the last
    U tokens of each of its rows, U the most new tokens of any of them (a row with fewer new tokens re-encodes a few
    cached ones), so no row is wider than the longest row and the mask is plain left padding. With `pass_tokens` > 0
    (and `hold_back` > 0: nobody reads the outputs) rows are split into several passes by their number of new
    tokens where that saves more than `pass_tokens` encoded tokens per extra pass (`encode_in_passes`). Returns
    (input ids, attention mask, cache); the mask covers the held back tokens, the cache does not."""
    parts = encode_in_passes(model, ids, pad_id, device, prefix_cache, hold_back, pass_tokens)
    if len(parts) == 1:
        return parts[0][1:]
    width = max(input_ids.shape[1] for _, input_ids, _, _ in parts)  # all rows left-padded to the longest
    input_ids = torch.full((len(ids), width), pad_id, device=device)
    attention_mask = torch.zeros((len(ids), width), dtype=torch.long, device=device)
    cache = DynamicCache(config=model.config)
    for index, part_ids, part_mask, _ in parts:
        input_ids[index, width - part_ids.shape[1] :] = part_ids
        attention_mask[index, width - part_ids.shape[1] :] = part_mask
    for layer in range(len(parts[0][3].layers)):
        merged = []
        for states in ("keys", "values"):
            sample = getattr(parts[0][3].layers[layer], states)
            full = sample.new_zeros((len(ids), sample.shape[1], width - hold_back, sample.shape[3]))  # finite padding
            for index, _, _, part_cache in parts:
                part_states = getattr(part_cache.layers[layer], states)
                full[index, :, width - hold_back - part_states.shape[2] :] = part_states
            merged.append(full)
        cache.update(*merged, layer)
    return input_ids, attention_mask, cache


@torch.inference_mode()
def encode_in_passes(model, ids: list[list[int]], pad_id: int, device, prefix_cache: PrefixCache | None,
                     hold_back: int, pass_tokens: int = 0
                     ) -> list[tuple[list[int], torch.Tensor, torch.Tensor, DynamicCache]]:  # fmt: skip
    """`encode_with_prefix_cache` pass by pass: (the rows' indices in `ids`, input ids, attention mask, cache) for
    each pass, its rows left-padded to its longest, so the caller can take them as they are (the running batch of
    `ContinuousDecoder` appends each) instead of merging them. A search's prompts bring from a few to over a
    hundred new tokens each (a step, then its program's output): in one pass the tiny policy's search encoded 1.9x
    its new tokens."""
    encoded = [x[: len(x) - hold_back] for x in ids]
    # Look up all but the last encoded token when nothing is held back: the pass must output something per row.
    hits = [prefix_cache.longest_prefix(e[: len(e) - (hold_back == 0)]) if prefix_cache else None for e in encoded]
    new = [len(e) - (len(hit[0]) if hit else 0) for e, hit in zip(encoded, hits)]
    parts = []
    # One pass where a row is all held back: a pass of such rows alone would have nothing to encode.
    split = hold_back > 0 and min(len(e) for e in encoded) > 0
    # With rows held back nobody reads the outputs: the logits of the last position only (where supported).
    keep = (
        {"logits_to_keep": 1} if hold_back and "logits_to_keep" in inspect.signature(model.forward).parameters else {}
    )
    for part in _passes(new, pass_tokens if split else 0):
        width = max(len(encoded[i]) for i in part)
        rows = [[pad_id] * (width - len(encoded[i])) + ids[i] for i in part]
        masks = [[0] * (width - len(encoded[i])) + [1] * len(ids[i]) for i in part]
        input_ids = torch.tensor(rows, device=device)  # (rows, width + hold_back)
        attention_mask = torch.tensor(masks, device=device)
        cache = _encode_pass(model, input_ids, attention_mask, [encoded[i] for i in part], [hits[i] for i in part],
                             [new[i] for i in part], width, keep)  # fmt: skip
        if prefix_cache is not None:
            for row, i in enumerate(part):
                if new[i] > 0:  # a prefix seen before is already cached
                    start = width - len(encoded[i])
                    kv = [(layer.keys[row, :, start:].clone(), layer.values[row, :, start:].clone())
                          for layer in cache.layers]  # fmt: skip
                    prefix_cache.add(encoded[i], kv)
        parts.append((part, input_ids, attention_mask, cache))
    return parts


def _passes(new: list[int], pass_tokens: int) -> list[list[int]]:
    """The rows of each encoding pass (`encode_with_prefix_cache`), given each row's new tokens: one pass, or, with
    `pass_tokens` > 0, rows sorted by new tokens and cut where that minimises the tokens encoded (rows x the pass's
    most new tokens) plus `pass_tokens` per pass (a pass's fixed cost; dynamic programming over the distinct counts).
    Rows with nothing new need no pass but go with the others (their cache is copied either way)."""
    if pass_tokens <= 0 or len(new) < 2:
        return [list(range(len(new)))]
    order = sorted(range(len(new)), key=new.__getitem__)
    ends = [j + 1 for j in range(len(order)) if j + 1 == len(order) or new[order[j + 1]] != new[order[j]]]
    best, cut = [0] + [None] * len(ends), [0] * (len(ends) + 1)  # best[k]: cost of the rows before ends[k - 1]
    for k in range(1, len(ends) + 1):
        most = new[order[ends[k - 1] - 1]]
        for i in range(k):  # one pass over the rows from ends[i - 1] to ends[k - 1]
            cost = best[i] + (pass_tokens + (ends[k - 1] - (ends[i - 1] if i else 0)) * most if most else 0)
            if best[k] is None or cost < best[k]:
                best[k], cut[k] = cost, i
    passes, k = [], len(ends)
    while k:
        passes.append(sorted(order[(ends[cut[k] - 1] if cut[k] else 0) : ends[k - 1]]))  # one pass: rows as given
        k = cut[k]
    return passes[::-1]


def _encode_pass(model, input_ids, attention_mask, encoded, hits, new, width: int, keep: dict) -> DynamicCache:
    """One pass of `encode_with_prefix_cache` over rows left-padded to `width` encoded tokens: the last U = max(new)
    of every row are encoded, the ones before come from the row's cached prefix (`hits`); `keep`: extra arguments of
    the forward pass."""
    width_new = max(new)  # U
    width_cached = width - width_new
    from_cache = [max(0, len(e) - width_new) for e in encoded]  # <= the row's cached tokens, as its new ones <= U
    cache = DynamicCache(config=model.config)
    if width_cached:
        first = next(hit for hit, n in zip(hits, from_cache) if n)[1]
        for layer, (k0, v0) in enumerate(first):
            keys = k0.new_zeros((len(encoded), k0.shape[0], width_cached, k0.shape[-1]))
            values = v0.new_zeros((len(encoded), v0.shape[0], width_cached, v0.shape[-1]))
            for i, (hit, n) in enumerate(zip(hits, from_cache)):
                if n:
                    k, v = hit[1][layer]
                    keys[i, :, width_cached - n :], values[i, :, width_cached - n :] = k[:, :n], v[:, :n]
            cache.update(keys, values, layer)
    if width_new:
        mask = attention_mask[:, :width]
        model(
            input_ids=input_ids[:, width_cached:width],
            attention_mask=mask,
            position_ids=(mask.cumsum(-1) - 1).clamp(min=0)[:, width_cached:],
            past_key_values=cache,
            use_cache=True,
            **keep,
        )
    return cache


def _plain_cache(model) -> bool:
    """Whether `model` keeps a plain (full-attention) KV cache: the prefix cache stitches those together; sliding
    windows, recurrent states and the like are left to `generate`."""
    try:
        layers = DynamicCache(config=model.config).layers
    except Exception:  # any model whose cache cannot be built from its config alone
        return False
    return bool(layers) and all(type(layer) is DynamicLayer for layer in layers)


class PrefixCache:
    """Key/value tensors of token prefixes already encoded, least recently used first out, within `max_bytes`.

    `longest_prefix(ids)` finds the longest cached prefix of `ids` in O(len(ids)): every entry is indexed by
    (length, rolling hash of its tokens), and the candidate prefixes of `ids` are hashed as they grow. Written by
    hand because transformers has no prefix cache (vLLM's automatic prefix caching plays this part there).
    """

    _MOD = (1 << 61) - 1

    def __init__(self, max_bytes: float):
        self.max_bytes = max_bytes
        self.bytes = 0
        self.entries: OrderedDict[tuple[int, int], tuple[tuple[int, ...], list, int]] = OrderedDict()
        self.lengths: dict[int, int] = {}  # length -> entries of that length
        self.hits = self.misses = self.reused_tokens = 0

    def _hashes(self, ids: Sequence[int]) -> list[int]:
        h, out = 0, []
        for token in ids:
            h = (h * 1_000_003 + int(token) + 1) % self._MOD
            out.append(h)
        return out

    def longest_prefix(self, ids: Sequence[int]) -> tuple[tuple[int, ...], list] | None:
        """(prefix, per-layer (keys, values) of shape (heads, len, dim)) of the longest cached prefix of `ids`."""
        hashes = self._hashes(ids)
        for length in range(len(ids), 0, -1):
            if length not in self.lengths:
                continue
            key = (length, hashes[length - 1])
            entry = self.entries.get(key)
            if entry is not None and entry[0] == tuple(ids[:length]):
                self.entries.move_to_end(key)
                self.hits += 1
                self.reused_tokens += length
                return entry[0], entry[1]
        self.misses += 1
        return None

    def add(self, ids: Sequence[int], kv: list) -> None:
        if not ids:
            return
        key = (len(ids), self._hashes(ids)[-1])
        size = sum(k.numel() * k.element_size() + v.numel() * v.element_size() for k, v in kv)
        if key in self.entries or size > self.max_bytes:
            return
        self.entries[key] = (tuple(ids), kv, size)
        self.lengths[len(ids)] = self.lengths.get(len(ids), 0) + 1
        self.bytes += size
        while self.bytes > self.max_bytes:
            (length, _), (_, _, freed) = self.entries.popitem(last=False)
            self.bytes -= freed
            self.lengths[length] -= 1
            if not self.lengths[length]:
                del self.lengths[length]

    def clear(self) -> None:
        self.entries.clear()
        self.lengths.clear()
        self.bytes = 0


class RowSeededSampler(LogitsProcessor):
    """Sampling with a seed per batch row, by the Gumbel-max trick: argmax(logits + Gumbel noise) is a sample of
    softmax(logits). The noise of row r, step t, token v is a hash of (seed_r, t, v) (splitmix64), so a row's
    samples never depend on the other rows of its batch. Use it with greedy decoding, after the temperature and
    top-p warpers (filtered tokens stay at -inf).

    Written by hand because transformers' sampling draws from one global generator for the whole batch: a
    prompt's samples would then change with its batch neighbours, and resumed or sharded runs would not
    reproduce an uninterrupted one.
    """

    def __init__(self, keys: torch.Tensor, prompt_width: int):
        self.keys = keys.to(torch.int64)  # (batch,)
        self.prompt_width = prompt_width

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        step = input_ids.shape[1] - self.prompt_width
        return scores + _gumbel(self.keys.to(scores.device), step, scores.shape[-1]).to(scores.dtype)
