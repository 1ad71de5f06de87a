"""Continuous batching for `TransformersBackend`: one running batch that prompts join and leave at any step.

Written by hand because transformers' `generate` keeps every row in the batch until the last one stops (a search's
steps differ in length: a third of its decoding slots were finished rows on the tiny policy), and its continuous
batching (`generate_batch`) samples from one global generator, not with a seed per sample, and cannot share one
batch row between the samples of a prompt that still agree. A search needs both: its trees must not depend on their
batch neighbours, and its candidates often start alike.

The decoder keeps one batch of *rows* (distinct token sequences, left-padded to a common width, in a KV cache
with room to grow: `_RoomyLayer`) and, over them, the *samples* being drawn (each with its seed, its token count,
its budget and its stop tokens). Each `step` runs the model once over the rows, draws every sample's next token
(temperature and top-p per row, then Gumbel noise keyed by the sample's seed and its token count: `_gumbel`),
ends the samples that drew a stop token or used their budget, and rebuilds the rows: a row whose samples drew
different tokens is copied once per continuation, rows with no sample left are dropped once they are many, and
so are padding columns no row needs any more. Between steps, waiting prompts are encoded and join the batch
(`admit`) when that adds little padding, so the engine does not idle through the tail of one call while another
call waits: the calls of several pipeline lanes, and the chunks of one large call, share the decoding steps.

A sample's tokens depend only on its prompt, its seed and the model: the noise is per sample and every row is
masked to its own tokens. Only floating-point rounding can differ with the batch around it, as in any batched
engine.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from transformers import DynamicCache, TopPLogitsWarper
from transformers.cache_utils import DynamicLayer

_MASK64 = (1 << 64) - 1


def _signed(c: int) -> int:
    return c - (1 << 64) if c >= 1 << 63 else c


def _shift_right(x: torch.Tensor, k: int) -> torch.Tensor:
    """Logical right shift of int64 tensors (torch's `>>` is arithmetic)."""
    return (x >> k) & ((1 << (64 - k)) - 1)


def _gumbel(keys: torch.Tensor, step: int | torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Gumbel noise (rows, vocab) for new token `step` (one for all rows, or one per row) of the rows keyed by
    `keys` (float64)."""
    vocab = torch.arange(vocab_size, device=keys.device, dtype=torch.int64)
    x = keys[:, None] * _signed(0x9E3779B97F4A7C15) + vocab[None, :] * _signed(0xD1B54A32D192ED03)
    if isinstance(step, torch.Tensor):  # int64 arithmetic wraps modulo 2**64, as the Python integers below do
        x = x + (step.to(torch.int64) * _signed(0xABC98388FB8FAC03))[:, None]
    else:
        x = x + _signed(step * 0xABC98388FB8FAC03 & _MASK64)
    x = (x ^ _shift_right(x, 30)) * _signed(0xBF58476D1CE4E5B9)
    x = (x ^ _shift_right(x, 27)) * _signed(0x94D049BB133111EB)
    x = x ^ _shift_right(x, 31)
    uniform = (_shift_right(x, 11).to(torch.float64) + 0.5) * 2.0**-53  # in (0, 1)
    return -torch.log(-torch.log(uniform))


class _RoomyLayer(DynamicLayer):
    """A dynamic cache layer that writes into preallocated room (`room` more positions whenever it runs out), so a
    new token neither copies the whole cache (`DynamicLayer` concatenates) nor is attended over unwritten positions
    (`StaticLayer` attends over its full length). Rows can be added as copies of others (`append_rows`) or from
    another cache (`append_states`), into room kept for them too. `keys` and `values` are views of the rows in use
    and the positions written so far."""

    def __init__(self, room: int, row_room: int = 0):
        super().__init__()
        self.room = max(1, room)
        self.row_room = row_room  # rows to allocate at first: appended rows then need no new allocation
        self.length = 0
        self.rows = 0
        self._keys = self._values = None

    def _grow(self, rows: int, positions: int) -> None:
        """Room for at least `rows` rows and `positions` positions (with more to spare), keeping what is written."""
        shape = self._keys.shape
        if rows <= shape[0] and positions <= shape[2]:
            return
        rows = rows if rows <= shape[0] else rows + rows // 2
        positions = positions if positions <= shape[2] else positions + self.room
        keys = self._keys.new_empty((rows, shape[1], positions, shape[3]))
        values = self._values.new_empty((rows, shape[1], positions, self._values.shape[3]))
        keys[: self.rows, :, : self.length] = self._keys[: self.rows, :, : self.length]
        values[: self.rows, :, : self.length] = self._values[: self.rows, :, : self.length]
        self._keys, self._values = keys, values

    def _views(self) -> None:
        self.keys = self._keys[: self.rows, :, : self.length]
        self.values = self._values[: self.rows, :, : self.length]

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        end = self.length + key_states.shape[-2]
        if not self.rows:  # the first rows: new buffers, unless those of an earlier batch (`restart`) have room
            rows = max(key_states.shape[0], self.row_room)
            if self._keys is None or self._keys.shape[0] < rows or self._keys.shape[2] < end + self.room:
                shape = (rows, key_states.shape[1], end + self.room)
                self._keys = key_states.new_empty((*shape, key_states.shape[-1]))
                self._values = value_states.new_empty((*shape, value_states.shape[-1]))
            self.rows = key_states.shape[0]
        self._grow(self.rows, end)
        self._keys[: self.rows, :, self.length : end] = key_states
        self._values[: self.rows, :, self.length : end] = value_states
        self.length = end
        self._views()
        return self.keys, self.values

    def restart(self, room: int, row_room: int = 0) -> None:
        """Empty the layer, keeping its buffers for the next rows where they are large enough: fresh memory costs
        page faults on first use, and a search starts a new batch every few waves."""
        self.room, self.row_room = max(1, room), row_room
        self.rows = self.length = 0
        self._views()

    def append_rows(self, sources: torch.Tensor) -> None:
        """Add rows at the end, copies of rows `sources` (only those rows are copied)."""
        start = self.rows
        self._grow(start + len(sources), self.length)
        self._keys[start : start + len(sources), :, : self.length] = self._keys[sources, :, : self.length]
        self._values[start : start + len(sources), :, : self.length] = self._values[sources, :, : self.length]
        self.rows = start + len(sources)
        self._views()

    def append_states(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Add rows at the end holding `keys` and `values` (rows, heads, width, dim), right-aligned to the positions
        written so far (`width` <= `length`); the positions before them are zeros (padding: masked, but attention
        multiplies them, so they must be finite)."""
        start, count, width = self.rows, keys.shape[0], keys.shape[2]
        self._grow(start + count, self.length)
        for buffer, states in ((self._keys, keys), (self._values, values)):
            buffer[start : start + count, :, : self.length - width] = 0
            buffer[start : start + count, :, self.length - width : self.length] = states
        self.rows = start + count
        self._views()

    def pad_left(self, count: int) -> None:
        """Insert `count` zero positions (padding) before every row's positions."""
        self._grow(self.rows, self.length + count)
        for buffer in (self._keys, self._values):
            buffer[: self.rows, :, count : self.length + count] = buffer[: self.rows, :, : self.length].clone()
            buffer[: self.rows, :, :count] = 0
        self.length += count
        self._views()

    def batch_select_indices(self, indices: torch.Tensor, start: int = 0) -> None:
        """Keep rows `indices`, in that order, and the positions from `start` on, in the same buffers (rows can be
        appended again). The rows kept are gathered first, then written back: a fresh buffer per compaction cost
        3x as much (its pages are new)."""
        for buffer in (self._keys, self._values):
            kept = torch.index_select(buffer[:, :, start : self.length], 0, indices)
            buffer[: len(indices), :, : self.length - start] = kept
        self.rows = len(indices)
        self.length -= start
        self._views()


@dataclass(eq=False)
class DecodeRequest:
    """One call's prompts: each gets `n` samples, drawn with the call's settings; sample j of prompt i draws its
    noise with key `keys[i][j]` (`_gumbel`). `tokens[i][j]` are its tokens once it has ended; `left` counts the
    prompts still decoding or waiting."""

    ids: list[list[int]]
    keys: list[list[int]]
    n: int
    eos_ids: list[int]
    max_new_tokens: int
    temperature: float
    top_p: float
    tokens: list[list[list[int]]] = field(init=False)
    going: list[int] = field(init=False)  # per prompt: samples not yet ended
    left: int = field(init=False)
    error: BaseException | None = None

    def __post_init__(self):
        self.tokens = [[[] for _ in range(self.n)] for _ in self.ids]
        self.going = [self.n] * len(self.ids)
        self.left = len(self.ids)

    @property
    def done(self) -> bool:
        return self.left == 0 or self.error is not None


class ContinuousDecoder:
    """The running batch (see the module's docstring). Not thread-safe: one thread at a time calls `submit`,
    `admit` and `step` (`TransformersBackend` hands the role between the threads that wait for their calls).

    Args:
        model: the causal LM (a plain, full-attention KV cache).
        encode: `ids -> parts`, each (indices into `ids`, input ids, attention mask, cache): the KV cache of those
            prompts up to their last token, left padded (`encode_in_passes` with `hold_back=1`).
        max_samples: samples decoded at once; waiting prompts join when there is room (a prompt with more samples
            than this joins an empty batch alone).
        compact_below: rows with no sample left are dropped (a copy of the cache) once fewer than this share of the
            rows hold samples; 0 keeps them until the batch is empty.
        max_join_padding: prompts join a running batch only while the padding that adds (positions, over all rows)
            is at most this share of the positions they bring (`admit`); 0: they join only an empty batch, unless
            as wide as it.
    """

    # The tensors kept per batch row and per sample, indexed alike when rows or samples are dropped or copied.
    _PER_ROW = ("mask", "position", "token", "temperature", "top_p")
    _PER_SAMPLE = ("keys", "row_of", "steps", "budget", "stop_set")

    def __init__(self, model, encode: Callable, max_samples: int, compact_below: float = 0.75,
                 max_join_padding: float = 0.25):  # fmt: skip
        self.model = model
        self.encode = encode
        self.max_samples = max_samples
        self.compact_below = compact_below
        self.max_join_padding = max_join_padding
        self.waiting: list[tuple[DecodeRequest, int]] = []  # (request, prompt index), first come first served
        self.compactions = 0
        self.admissions = self.joined_running = 0  # groups of prompts that joined; of them, into a running batch
        self.decoded_tokens = self.sampled_tokens = 0  # rows x steps, and samples x steps
        self._stop_sets: dict[tuple[int, ...], int] = {}
        self._stop_table: torch.Tensor | None = None  # (stop sets, vocab): whether a token ends a sample
        self._spare: list[_RoomyLayer] = []  # the last batch's cache layers, reused by the next one
        self._reset()

    def _reset(self) -> None:
        if getattr(self, "cache", None) is not None:  # its buffers serve the next batch
            self._spare = self.cache.layers
        self.cache: DynamicCache | None = None
        # Per row: attention mask (rows, positions + 1: the column of the token fed next), position of the token
        # fed next, that token, and the sampling settings of its request.
        self.mask = self.position = self.token = self.temperature = self.top_p = None
        # Per sample: its seed key, its row, tokens drawn, budget, stop set, and (request, prompt, sample).
        self.keys = self.row_of = self.steps = self.budget = self.stop_set = None
        self.owners: list[tuple[DecodeRequest, int, int]] = []
        self.sharing = False  # whether some row holds more than one sample

    @property
    def live(self) -> int:
        return len(self.owners)

    @property
    def busy(self) -> bool:
        return bool(self.owners or self.waiting)

    def submit(self, request: DecodeRequest) -> None:
        self.waiting.extend((request, i) for i in range(len(request.ids)))

    def release(self) -> None:
        """Free the buffers kept for the next batch (the batch itself must be empty)."""
        self._spare = []

    def fail(self, error: BaseException) -> list[DecodeRequest]:
        """End every request in the batch or waiting with `error` (the batch's state is lost); returns them."""
        failed = {id(r): r for r, _, _ in self.owners} | {id(r): r for r, _ in self.waiting}
        for request in failed.values():
            request.error = error
        self.waiting.clear()
        self._reset()
        return list(failed.values())

    # ---------------------------------------------------------------- joining

    def admit(self) -> None:
        """Encode waiting prompts and add them to the batch, first come first served, while there is room and
        joining adds little padding. Each admission is a forward pass, so prompts join in groups: when the batch is
        empty, or when a quarter of it (or every waiting sample, if fewer) is free.

        Every step attends over the batch's full width, so a row shorter than the batch carries the difference as
        padding for as long as it decodes (and a newcomer longer than the batch pads every row). Into a running
        batch, prompts join only while the padding they add stays within `max_join_padding` of their own tokens:
        a prompt that would start far behind the batch (a fresh sample next to one 300 tokens into its answer)
        waits for the batch to empty instead, which costs less than attending over the padding at every step
        (measured: best-of-16 sampling ran 1.45x slower when prompts joined regardless)."""
        if not self.waiting:
            return
        free = self.max_samples - self.live
        waiting_samples = sum(request.n for request, _ in self.waiting)
        if self.live and free < min(waiting_samples, max(1, self.max_samples // 4)):
            return
        rows = len(self.mask) if self.live else 0
        width = self.cache.layers[0].length if self.live else 0
        padding = tokens = 0
        taken = 0
        while taken < len(self.waiting):
            request, i = self.waiting[taken]
            if not (request.n <= free or (taken == 0 and not self.live)):
                break
            own = len(request.ids[i]) - 1  # positions it brings (its last token is fed by `step`)
            wider = max(width, own)
            more_padding = padding + (wider - width) * rows + (wider - own)
            if self.live and more_padding > self.max_join_padding * (tokens + own):
                break
            padding, tokens, width, rows = more_padding, tokens + own, wider, rows + 1
            free -= request.n
            taken += 1
        if taken:
            joining, self.waiting = self.waiting[:taken], self.waiting[taken:]
            self._join(joining)

    def _join(self, joining: list[tuple[DecodeRequest, int]]) -> None:
        self.admissions += 1
        self.joined_running += self.cache is not None
        parts = self.encode([request.ids[i] for request, i in joining])
        room = max(request.max_new_tokens for request, _ in joining)  # positions to keep free, if the batch is new
        # The widest part first: a part wider than the batch pads every row of it on the left.
        for index, input_ids, attention_mask, prefix in sorted(parts, key=lambda part: -part[1].shape[1]):
            self._join_part([joining[i] for i in index], input_ids, attention_mask, prefix, room)

    def _join_part(self, joining, input_ids: torch.Tensor, attention_mask: torch.Tensor, prefix, room: int) -> None:
        device = self.model.device
        width = input_ids.shape[1] - 1  # positions encoded (the last prompt token is fed by `step`)
        if self.cache is None:
            self.cache = DynamicCache()
            self.cache.layers = []
            for k, layer in enumerate(prefix.layers):
                if self._spare:
                    roomy = self._spare[k]
                    roomy.restart(room, row_room=self.max_samples)
                else:
                    roomy = _RoomyLayer(room=room, row_room=self.max_samples)
                roomy.update(layer.keys, layer.values)
                self.cache.layers.append(roomy)
            self.mask = attention_mask
            first_row = 0
        else:
            length = self.cache.layers[0].length
            if width > length:  # the newcomers are longer than the batch: pad the batch on the left
                for layer in self.cache.layers:
                    layer.pad_left(width - length)
                self.mask = torch.cat([self.mask.new_zeros((len(self.mask), width - length)), self.mask], dim=1)
                length = width
            for roomy, layer in zip(self.cache.layers, prefix.layers):
                roomy.append_states(layer.keys, layer.values)
            pad = attention_mask.new_zeros((len(joining), length - width))
            first_row = len(self.mask)
            self.mask = torch.cat([self.mask, torch.cat([pad, attention_mask], dim=1)])
        rows = torch.arange(first_row, first_row + len(joining), device=device)
        requests = [request for request, _ in joining]
        per_row = {
            "position": attention_mask.sum(-1, keepdim=True) - 1,
            "token": input_ids[:, -1:],
            "temperature": torch.tensor([r.temperature for r in requests], dtype=torch.float32, device=device),
            "top_p": torch.tensor([r.top_p for r in requests], dtype=torch.float64, device=device),  # exact values
        }
        for name, value in per_row.items():
            current = getattr(self, name)
            setattr(self, name, value if current is None else torch.cat([current, value]))
        keys, row_of, budget, stop_set = [], [], [], []
        for row, (request, i) in zip(rows.tolist(), joining):
            stops = self._stop_set(request.eos_ids)
            for j in range(request.n):
                keys.append(request.keys[i][j])
                row_of.append(row)
                budget.append(request.max_new_tokens)
                stop_set.append(stops)
                self.owners.append((request, i, j))
            self.sharing |= request.n > 1
        per_sample = {
            "keys": torch.tensor(keys, dtype=torch.int64, device=device),
            "row_of": torch.tensor(row_of, dtype=torch.int64, device=device),
            "steps": torch.zeros(len(keys), dtype=torch.int64, device=device),
            "budget": torch.tensor(budget, dtype=torch.int64, device=device),
            "stop_set": torch.tensor(stop_set, dtype=torch.int64, device=device),
        }
        for name, value in per_sample.items():
            current = getattr(self, name)
            setattr(self, name, value if current is None else torch.cat([current, value]))

    def _stop_set(self, eos_ids: Sequence[int]) -> int:
        key = tuple(sorted(set(eos_ids)))
        if key not in self._stop_sets:
            vocab = self.model.get_output_embeddings().weight.shape[0]
            row = torch.zeros((1, vocab), dtype=torch.bool, device=self.model.device)
            row[0, list(key)] = True
            self._stop_table = row if self._stop_table is None else torch.cat([self._stop_table, row])
            self._stop_sets[key] = len(self._stop_sets)
        return self._stop_sets[key]

    # ---------------------------------------------------------------- decoding

    def _warp(self, scores: torch.Tensor) -> torch.Tensor:
        """Temperature, then top-p, per row, as `generate`'s warpers do (rows of greedy requests are untouched)."""
        temperature = torch.where(self.temperature > 0, self.temperature, torch.ones_like(self.temperature))
        if bool((temperature != 1).any()):
            scores = scores / temperature[:, None]
        filtered = (self.temperature > 0) & (self.top_p < 1)
        for p in self.top_p[filtered].unique().tolist():
            rows = filtered & (self.top_p == p)
            if bool(rows.all()):
                scores = TopPLogitsWarper(p)(None, scores)
            else:
                scores[rows] = TopPLogitsWarper(p)(None, scores[rows])
        return scores

    def step(self) -> list[DecodeRequest]:
        """One token for every sample in the batch; returns the requests this step finished."""
        out = self.model(input_ids=self.token, attention_mask=self.mask, position_ids=self.position,
                         past_key_values=self.cache, use_cache=True)  # fmt: skip
        scores = self._warp(out.logits[:, -1, :].to(dtype=torch.float32))  # float32, as `generate` does
        scores = scores[self.row_of]
        sampled = self.temperature[self.row_of] > 0
        if bool(sampled.any()):
            noise = _gumbel(self.keys, self.steps, scores.shape[-1]).to(scores.dtype)
            scores = scores + (noise if bool(sampled.all()) else noise * sampled[:, None])
        chosen = scores.argmax(-1)
        self.decoded_tokens += len(self.mask)
        self.sampled_tokens += self.live
        self.steps += 1
        ended = self._stop_table[self.stop_set, chosen] | (self.steps >= self.budget)
        finished = []
        for (request, i, j), token, end in zip(self.owners, chosen.tolist(), ended.tolist()):
            request.tokens[i][j].append(token)
            if end:
                request.going[i] -= 1
                if request.going[i] == 0:  # the prompt's last sample ended
                    request.left -= 1
                    if request.left == 0:
                        finished.append(request)
        going = (~ended).nonzero().squeeze(1)
        if len(going) == 0:
            self._reset()
            return finished
        if len(going) < len(ended):
            keep = going.tolist()
            self.owners = [self.owners[k] for k in keep]
            for name in self._PER_SAMPLE:
                setattr(self, name, getattr(self, name)[going])
            chosen = chosen[going]
        self._next_rows(chosen, vocab=out.logits.shape[-1])
        self.mask = torch.cat([self.mask, self.mask.new_ones((len(self.mask), 1))], dim=1)
        self.position = self.position + 1
        return finished

    def _select_rows(self, rows: torch.Tensor) -> None:
        """Keep rows `rows` (a compaction), and drop the padding columns no row kept needs."""
        mask = self.mask[rows]
        start = int(mask.any(0).int().argmax())  # the first position some row attends to
        for layer in self.cache.layers:
            layer.batch_select_indices(rows, start)
        self.mask = mask[:, start:]
        for name in self._PER_ROW[1:]:  # the mask is trimmed above
            setattr(self, name, getattr(self, name)[rows])
        self.compactions += 1

    def _next_rows(self, chosen: torch.Tensor, vocab: int) -> None:
        """Feed every sample's token next: into its row, or into a new row when the samples of a row part."""
        rows_now = len(self.mask)
        if not self.sharing:  # one sample per row: each row takes its sample's token
            rows = self.row_of
            if len(rows) < self.compact_below * rows_now:  # many rows have no sample left: drop them
                self._select_rows(rows)
                self.row_of = torch.arange(len(rows), device=rows.device)
                self.token = chosen[:, None]
            else:
                self.token = self.token.clone()
                self.token[rows, 0] = chosen
            return
        groups, group_of = torch.unique(self.row_of * vocab + chosen, return_inverse=True)
        parents = torch.div(groups, vocab, rounding_mode="floor")  # sorted: a row's continuations adjoin
        group_tokens = groups - parents * vocab
        first = torch.ones_like(parents, dtype=torch.bool)  # a row's first continuation stays in the row
        first[1:] = parents[1:] != parents[:-1]
        extra = (~first).nonzero().squeeze(1)  # the others are new rows, copies of it
        self.sharing = len(groups) < len(chosen)  # some row still holds samples that agree so far
        if len(groups) < self.compact_below * (rows_now + len(extra)):
            # Rows with no sample left are many: new rows, one per continuation (a full copy).
            self._select_rows(parents)
            self.row_of = group_of
            self.token = group_tokens[:, None]
            return
        new_row = parents.clone()
        new_row[extra] = rows_now + torch.arange(len(extra), device=parents.device)
        if len(extra):
            sources = parents[extra]
            for layer in self.cache.layers:
                layer.append_rows(sources)
            for name in self._PER_ROW:
                value = getattr(self, name)
                setattr(self, name, torch.cat([value, value[sources]]))
        self.token = self.token.clone()
        self.token[new_row, 0] = group_tokens
        self.row_of = new_row[group_of]
