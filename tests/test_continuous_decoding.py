"""The transformers backend's continuous batching: calls that share one running batch sample what they sample alone."""

import threading

import pytest
import torch
from transformers.cache_utils import DynamicLayer

from rstar_trl import MCTSConfig
from rstar_trl.format import ANSWER_STOP_STRINGS, STEP_STOP_STRINGS
from rstar_trl.search import TransformersBackend
from rstar_trl.search.decoding import _RoomyLayer
from rstar_trl.tiny import tiny_splits

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def prompts() -> list[str]:
    problems = [p["problem"] for p in tiny_splits()["train"]][:40]
    template = MCTSConfig().template
    short = [template.replace("{question}", p) for p in problems[:20]]
    # Longer prompts, as deeper nodes of a search ask for: joining a batch of shorter rows pads the batch on the left.
    long = [template.replace("{question}", " ".join(problems[i : i + 4])) for i in range(20, 40, 2)]
    return short + long


def _backend(policy, **kwargs) -> TransformersBackend:
    return TransformersBackend(policy, device="cpu", torch_threads=1, prefix_cache_mb=0, **kwargs)


def _calls(prompts):
    """Calls a search's lanes make: step candidates and answers, several settings, growing prompts."""
    return [
        (prompts[:12], 4, STEP_STOP_STRINGS, 40, 0.8, 0.95, 1),
        (prompts[20:], 3, STEP_STOP_STRINGS, 24, 1.0, 1.0, 2),
        (prompts[8:16], 1, ANSWER_STOP_STRINGS, 16, 0.0, 1.0, 3),
        (prompts[12:26], 2, STEP_STOP_STRINGS, 40, 0.7, 0.9, 4),
    ]


def test_calls_from_several_threads_share_the_batch_and_sample_what_they_sample_alone(tiny_policy, prompts):
    alone = _backend(tiny_policy, batch_size=256)
    alone.own_decoding = False  # transformers' `generate`, one call at a time
    want = [alone.generate(*call[:6], seed=call[6]) for call in _calls(prompts)]

    shared = _backend(tiny_policy, batch_size=256)
    shared.decoder.max_join_padding = float("inf")  # join whenever there is room: the joining paths get exercised
    assert shared.concurrent_calls
    got: list = [None] * len(want)
    start = threading.Barrier(len(want))

    def lane(k, call):
        start.wait()
        got[k] = shared.generate(*call[:6], seed=call[6])

    threads = [threading.Thread(target=lane, args=(k, call)) for k, call in enumerate(_calls(prompts))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for k, (a, b) in enumerate(zip(got, want)):
        assert a == b, f"call {k}"
    # The calls did share decoding steps: fewer rows were decoded than the samples drawn, and joiners came in while
    # others were decoding.
    assert shared.decoder.admissions > 1 and shared.decoder.joined_running > 0
    assert not shared.decoder.busy and shared.decoder.cache is None  # nothing left over for the next call


def test_a_call_larger_than_the_batch_fills_its_tail_with_its_next_prompts(tiny_policy, prompts):
    small = _backend(tiny_policy, batch_size=16)  # 30 prompts x 2 samples: prompts join as others end
    small.decoder.max_join_padding = float("inf")
    got = small.generate(prompts, 2, STEP_STOP_STRINGS, 40, 0.8, 0.95, seed=7)
    assert small.decoder.joined_running > 0
    alone = _backend(tiny_policy, batch_size=16)
    alone.own_decoding = False
    assert got == alone.generate(prompts, 2, STEP_STOP_STRINGS, 40, 0.8, 0.95, seed=7)


def test_prompts_join_a_running_batch_only_when_that_adds_little_padding(tiny_policy, prompts):
    from rstar_trl.search.backends import mix_seed
    from rstar_trl.search.decoding import DecodeRequest

    backend = _backend(tiny_policy, batch_size=64)
    tokenizer, decoder = backend.tokenizer, backend.decoder
    eos = [tokenizer.convert_tokens_to_ids(marker) for marker in STEP_STOP_STRINGS] + [tokenizer.eos_token_id]

    def request(prompt, seed):  # keys as `generate` derives them from a prompt's seed
        ids = tokenizer(prompt, add_special_tokens=False).input_ids
        return DecodeRequest([ids], [[mix_seed(seed, j) >> 1 for j in range(2)]], 2, eos, 40, 0.8, 0.95)

    questions = [p["problem"] for p in tiny_splits()["train"]][:6]
    long = MCTSConfig().template.replace("{question}", " ".join(questions))  # several questions long
    short = prompts[0]  # one question
    near = long[: len(long) - 20]  # a little shorter than the batch: within max_join_padding of its own tokens
    assert len(tokenizer(short).input_ids) * 2 < len(tokenizer(long).input_ids)
    alone = _backend(tiny_policy, batch_size=64)
    alone.own_decoding = False
    for newcomer, joins in ((short, False), (near, True)):
        with torch.inference_mode():  # as `generate` runs the decoder
            first = request(long, 1)
            decoder.submit(first)
            decoder.admit()
            for _ in range(3):
                decoder.step()
            second = request(newcomer, 3)
            decoder.submit(second)
            decoder.admit()
            assert (not decoder.waiting) == joins and decoder.joined_running == joins
            while decoder.busy:
                decoder.admit()
                decoder.step()
            decoder.joined_running = 0
        assert first.done and second.done
        # Either way each sample is what `generate` samples alone with the same seed.
        for made, prompt, seed in ((first, long, 1), (second, newcomer, 3)):
            got = backend._completions(made.tokens[0], STEP_STOP_STRINGS, eos[:-1], eos)
            assert got == alone.generate([prompt], 2, STEP_STOP_STRINGS, 40, 0.8, 0.95, seed=[seed])[0]


def test_an_error_reaches_every_waiting_call_and_the_next_call_starts_afresh(tiny_policy, prompts):
    backend = _backend(tiny_policy, batch_size=64)
    want = backend.generate(prompts[:4], 2, STEP_STOP_STRINGS, 16, 0.8, 0.95, seed=1)
    forward = backend.model.forward
    calls = {"n": 0}

    def failing(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 6:
            raise RuntimeError("out of memory (injected)")
        return forward(*args, **kwargs)

    backend.model.forward = failing
    errors = []
    start = threading.Barrier(3)

    def lane(k):
        start.wait()
        try:
            backend.generate(prompts[k * 8 : k * 8 + 8], 4, STEP_STOP_STRINGS, 40, 0.8, 0.95, seed=k)
        except RuntimeError as exc:
            errors.append(str(exc))

    threads = [threading.Thread(target=lane, args=(k,)) for k in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    assert not any(thread.is_alive() for thread in threads)
    assert errors and all("injected" in e for e in errors)  # no call hangs or returns samples it did not draw
    backend.model.forward = forward
    assert backend.generate(prompts[:4], 2, STEP_STOP_STRINGS, 16, 0.8, 0.95, seed=1) == want


def test_the_roomy_cache_layer_pads_on_the_left_and_takes_rows_from_another_cache():
    roomy, plain = _RoomyLayer(room=2), DynamicLayer()
    keys, values = torch.randn(3, 2, 4, 8), torch.randn(3, 2, 4, 8)
    roomy.update(keys, values)
    plain.update(keys, values)
    roomy.pad_left(3)  # newcomers 7 positions long
    padded = [torch.cat([torch.zeros(3, 2, 3, 8), t], dim=2) for t in (keys, values)]
    assert all(torch.equal(a, b) for a, b in zip((roomy.keys, roomy.values), padded))
    new_keys, new_values = torch.randn(2, 2, 5, 8), torch.randn(2, 2, 5, 8)
    roomy.append_states(new_keys, new_values)  # right-aligned, zeros before
    assert roomy.keys.shape == (5, 2, 7, 8)
    assert torch.equal(roomy.keys[3:, :, 2:], new_keys) and not roomy.keys[3:, :, :2].any()
    assert torch.equal(roomy.values[3:, :, 2:], new_values) and torch.equal(roomy.values[:3], padded[1])
    # A compaction that also drops the leading positions no row kept needs.
    roomy.batch_select_indices(torch.tensor([4, 3]), start=2)
    assert torch.equal(roomy.keys, new_keys[[1, 0]]) and torch.equal(roomy.values, new_values[[1, 0]])
    more = torch.randn(2, 2, 1, 8)
    got = roomy.update(more, more)
    assert torch.equal(got[0], torch.cat([new_keys[[1, 0]], more], dim=2))


def test_two_lanes_sharing_the_running_batch_grow_the_trees_one_wave_grows(tiny_policy):
    from rstar_trl import MCTSGenerator
    from rstar_trl.tiny import to_dataset

    problems = to_dataset([p for p in tiny_splits()["train"] if p["level"] == 1][:8])
    config = dict(num_rollouts=3, num_candidates=4, max_step_tokens=48, executor_workers=1, seed=0, device="cpu",
                  torch_threads=1, problems_in_flight=8, generation_batch_size=64)  # fmt: skip
    one = MCTSGenerator(tiny_policy, MCTSConfig(**config), problems)
    want = one.generate()
    two = MCTSGenerator(tiny_policy, MCTSConfig(**config, pipeline_lanes=2), problems)
    two.backend.decoder.max_join_padding = float("inf")
    got = two.generate()
    assert got["tree"] == want["tree"] and got["solved"] == want["solved"]
    # The lanes' calls overlapped in the engine: prompts of one lane joined a batch another lane's call was in (one
    # lane's calls, each smaller than the batch, come one after the other).
    assert one.backend.decoder.joined_running == 0 and two.backend.decoder.joined_running > 0
    assert two.stats["generation_fraction"] > 0
