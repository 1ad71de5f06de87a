"""Prompts that join together are encoded in several passes, grouped by how many new tokens they bring, and the
decoder keeps its buffers between batches: neither changes a sample."""

import functools
import itertools
import random

import pytest
import torch

from rstar_trl import MCTSConfig
from rstar_trl.format import STEP_STOP_STRINGS
from rstar_trl.search import TransformersBackend
from rstar_trl.search import backends as backends_module
from rstar_trl.search.backends import PrefixCache, _passes, encode_with_prefix_cache
from rstar_trl.tiny import tiny_splits


def _cost(passes, new, pass_tokens):
    return sum((pass_tokens + len(part) * max(new[i] for i in part)) if max(new[i] for i in part) else 0
               for part in passes)  # fmt: skip


def test_rows_are_cut_into_passes_where_that_saves_more_than_a_pass_costs():
    rng = random.Random(0)
    for _ in range(200):
        new = [rng.choice([0, 1, 3, 8, 20, 21, 60, 110]) for _ in range(rng.randint(1, 12))]
        pass_tokens = rng.choice([1, 10, 40, 500])
        passes = _passes(new, pass_tokens)
        assert sorted(i for part in passes for i in part) == list(range(len(new)))
        assert all(part == sorted(part) for part in passes)
        # The cheapest of all cuts of the rows sorted by new tokens (rows with equal counts stay together).
        values = sorted(set(new))
        best = min(
            _cost(
                [[i for i in range(len(new)) if lo < new[i] <= hi] for lo, hi in zip((-1, *cuts), (*cuts, top))],
                new,
                pass_tokens,
            )
            for top in values[-1:]
            for k in range(len(values))
            for cuts in itertools.combinations(values[:-1], k)
        )
        assert _cost(passes, new, pass_tokens) == best
    assert _passes([5, 100, 3], 0) == [[0, 1, 2]]  # 0: one pass, rows as given
    assert _passes([2, 3, 100, 110], 40) == [[0, 1], [2, 3]]
    assert _passes([2, 3, 100, 110], 10_000) == [[0, 1, 2, 3]]


def _prompts(count: int) -> list[str]:
    template = MCTSConfig().template
    return [template.replace("{question}", p["problem"]) for p in tiny_splits()["train"][:count]]


@pytest.mark.slow
def test_several_passes_encode_what_one_pass_encodes_with_fewer_tokens(tiny_policy, monkeypatch):
    backend = TransformersBackend(tiny_policy, device="cpu", torch_threads=1, prefix_cache_mb=0)
    tokenizer, model = backend.tokenizer, backend.model
    base = [tokenizer(p, add_special_tokens=False).input_ids for p in _prompts(6)]
    # A search's next prompts: each cached prompt plus a step and an output, from a few tokens to over a hundred.
    tails = [tokenizer(f" x = {i}\nprint(x)\n" * (1 + 6 * (i % 3)), add_special_tokens=False).input_ids
             for i in range(6)]  # fmt: skip
    deeper = [ids + tail for ids, tail in zip(base, tails)]
    passed = []
    forward = model.forward

    @functools.wraps(forward)
    def counting(*args, **kwargs):
        passed.append(kwargs["input_ids"].numel())
        return forward(*args, **kwargs)

    monkeypatch.setattr(model, "forward", counting)
    results = {}
    for pass_tokens in (0, 40, 10_000):  # 10_000: one pass is cheaper, with the rows sorted by new tokens
        cache = PrefixCache(2**28)
        with torch.inference_mode():
            encode_with_prefix_cache(model, base, tokenizer.pad_token_id, "cpu", cache, hold_back=1)
            passed.clear()
            results[pass_tokens] = encode_with_prefix_cache(model, deeper, tokenizer.pad_token_id, "cpu", cache,
                                                            hold_back=1, pass_tokens=pass_tokens)  # fmt: skip
        results[pass_tokens] += (list(passed), cache)
    (ids_one, mask_one, kv_one, passes_one, cache_one), (ids, mask, kv, passes, cache) = results[0], results[40]
    assert len(passes_one) == 1 and len(passes) > 1
    ids_big, mask_big, _, passes_big, _ = results[10_000]  # tails of 1, 7 and 13 lines: new tokens not in row order
    assert passes_big == passes_one and torch.equal(ids_big, ids_one) and torch.equal(mask_big, mask_one)
    assert sum(passes) < sum(passes_one)
    assert torch.equal(ids, ids_one) and torch.equal(mask, mask_one)  # rows in the order given
    written = mask_one[:, :-1].bool()
    for layer, layer_one in zip(kv.layers, kv_one.layers):
        for states, states_one in ((layer.keys, layer_one.keys), (layer.values, layer_one.values)):
            assert states.shape == states_one.shape
            for row in range(len(deeper)):
                torch.testing.assert_close(states[row][:, written[row]], states_one[row][:, written[row]],
                                           rtol=1e-4, atol=1e-4)  # fmt: skip
    assert sorted(cache.entries) == sorted(cache_one.entries)  # the same prefixes cached


@pytest.mark.slow
def test_samples_are_the_same_with_one_pass_or_several_and_buffers_kept(tiny_policy, monkeypatch):
    parts_seen = []
    encode_in_passes = backends_module.encode_in_passes

    def recording(*args, **kwargs):
        parts = encode_in_passes(*args, **kwargs)
        parts_seen.append(len(parts))
        return parts

    monkeypatch.setattr(backends_module, "encode_in_passes", recording)
    outs = {}
    for own, pass_tokens in ((False, 0), (False, 40), (True, 0), (True, 40)):
        backend = TransformersBackend(tiny_policy, device="cpu", batch_size=16, torch_threads=1, prefix_cache_mb=64,
                                      prefill_pass_tokens=pass_tokens)  # fmt: skip
        backend.own_decoding = own
        prompts, outs[own, pass_tokens] = _prompts(6), []
        for depth in range(3):  # prompts of growing, unequal lengths, partly cached, as a search asks for them
            out = backend.generate(prompts, 3, STEP_STOP_STRINGS, 40, 0.8, 0.95, seed=depth)
            outs[own, pass_tokens].append(out)
            # Every other prompt also gets a long output: the new tokens per prompt differ by tens.
            prompts = [
                prompt + row[0].text + "\n" + "x = 1\n" * 10 * (i % 2)
                for i, (prompt, row) in enumerate(zip(prompts, out))
            ]
        if own:
            # Every call ended with an empty batch; the next one wrote into the same buffers.
            spare = backend.decoder._spare
            assert spare and backend.decoder.admissions > 1
            pointer = spare[0]._keys.data_ptr()
            backend.generate(_prompts(2), 2, STEP_STOP_STRINGS, 8, 0.8, 0.95, seed=9)
            assert backend.decoder._spare[0]._keys.data_ptr() == pointer
            backend.close()
            assert not backend.decoder._spare
    assert max(parts_seen) > 1  # some prompts were encoded in several passes
    assert outs[False, 40] == outs[False, 0] and outs[True, 0] == outs[False, 0] and outs[True, 40] == outs[False, 0]
