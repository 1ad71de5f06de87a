"""A PPMTrainer checkpoint in use: it loads in vLLM's pooling runner, the transformers and vLLM scorers agree, and
MCTS with the PPM follows Eq. 3."""

import math
import time

import psutil
import pytest
from datasets import Dataset
from tiny_ppm import train_tiny_ppm
from transformers import AutoModelForSequenceClassification
from vllm_serve import memory_share

from rstar_trl import MCTSConfig, MCTSGenerator, SearchTree, format_prompt
from rstar_trl.ppm import TransformersPPMScorer, VLLMPPMScorer
from rstar_trl.tiny import tiny_splits, to_dataset

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def ppm_path(tiny_policy, tmp_path_factory) -> str:
    """A PPM checkpoint as `PPMTrainer` saves it: initialised from the policy, trained briefly on pairs from the
    tiny problems (correct vs wrong first step), saved with `save_model`. Quality is not the point here; the
    checkpoint format, the scorers and Eq. 3 are."""
    rows = tiny_splits()["train"][:32]
    pairs = Dataset.from_dict({
        "prompt": [format_prompt(p["problem"]) for p in rows],
        "chosen": [f"# The answer.\nprint({p['answer']})\n<end_of_code>" for p in rows],
        "rejected": [f"# The answer.\nprint({int(p['answer']) + 7})\n<end_of_code>" for p in rows],
    })  # fmt: skip
    path = train_tiny_ppm(tiny_policy, pairs, str(tmp_path_factory.mktemp("ppm")), max_steps=8)
    _, info = AutoModelForSequenceClassification.from_pretrained(path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    return path


@pytest.fixture(scope="module")
def problems():
    return to_dataset([p for p in tiny_splits()["train"] if p["level"] == 1][:6])


def _engine_processes() -> set[int]:
    """The live vLLM processes (engine core, workers; they name themselves "VLLM::...") under this one."""
    found = set()
    for process in psutil.Process().children(recursive=True):
        try:
            if process.status() != psutil.STATUS_ZOMBIE and process.name().startswith("VLLM"):
                found.add(process.pid)
        except psutil.Error:  # exited meanwhile
            pass
    return found


def _wait_for(condition, timeout: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.2)
    return True


def test_transformers_and_vllm_scorers_agree(ppm_path, problems):
    questions = list(problems["problem"]) * 2
    partials = [""] * 6 + ["# Count them.\nx = 3 + 4\nprint(x)\n<end_of_code>\n"] * 6
    reference = TransformersPPMScorer(ppm_path, device="cpu", batch_size=4).score(questions, partials)
    engines_before = _engine_processes()
    with VLLMPPMScorer(ppm_path, gpu_memory_utilization=memory_share(), dtype="float32", max_model_len=1024,
                       enable_prefix_caching=False) as scorer:  # fmt: skip
        assert len(_engine_processes()) > len(engines_before)
        values = scorer.score(questions, partials)
    # close() (on leaving the block) stopped the engine-core process this scorer started.
    assert _wait_for(lambda: _engine_processes() == engines_before)
    assert all(-1 <= v <= 1 for v in values)
    assert max(abs(a - b) for a, b in zip(values, reference)) < 1e-3, (values, reference)
    assert len({round(v, 4) for v in reference}) > 2  # not a constant head: the comparison can fail


def test_mcts_with_a_ppm_initialises_q_by_eq_3(tiny_policy, ppm_path, problems):
    scorer = TransformersPPMScorer(ppm_path, device="cpu")
    config = MCTSConfig(num_rollouts=3, num_candidates=3, max_step_tokens=48, max_answer_tokens=32,
                        executor_workers=1, seed=0, device="cpu", torch_threads=1)  # fmt: skip
    trees = MCTSGenerator(tiny_policy, config, problems, ppm=scorer).generate()
    checked = terminals = 0
    for row in trees:
        tree = SearchTree.from_json(row["tree"])
        for node in tree.nodes[1:]:
            if node.terminal:
                # A terminal node is valued by its reward alone: correctness for an answer (the gold answer is
                # known), -1 for a dead end; an answer is not scored (its value is known).
                assert (node.visits, node.value_sum) == (1, node.reward)
                assert node.terminal_reason != "answer" or node.ppm_score is None
                terminals += 1
                continue
            # Eq. 3: an inner node starts at N = 1, q = PPM(x + s_1..s_i); then Eq. 2 adds each backed-up answer.
            below = [d for d in tree.nodes if node in d.path() and d.terminal_reason == "answer"]
            assert node.ppm_score is not None
            assert node.visits == 1 + len(below)
            assert math.isclose(node.value_sum, node.ppm_score + sum(d.reward for d in below), abs_tol=1e-9)
            checked += 1
        sample = [n for n in tree.nodes[1:] if n.ppm_score is not None][:3]
        fresh = scorer.score([tree.question] * len(sample), [tree.trajectory_text(n) for n in sample])
        assert fresh == pytest.approx([n.ppm_score for n in sample], abs=1e-5)
    assert checked > 0 and terminals > 0  # both kinds of node were checked


def test_test_time_search_values_answers_with_the_ppm(tiny_policy, ppm_path, problems):
    scorer = TransformersPPMScorer(ppm_path, device="cpu")
    config = MCTSConfig(num_rollouts=2, num_candidates=3, max_step_tokens=48, max_answer_tokens=32,
                        executor_workers=1, seed=0, device="cpu", torch_threads=1)  # fmt: skip
    trees = MCTSGenerator(tiny_policy, config, problems.remove_columns("answer"), ppm=scorer).generate()
    answers = [n for row in trees for n in SearchTree.from_json(row["tree"]).nodes if n.terminal_reason == "answer"]
    assert answers, "no answer reached: the test cannot check terminal values"
    for node in answers:
        assert node.correct is None and node.reward == node.ppm_score  # no gold answer: the PPM is the reward
        assert (node.visits, node.value_sum) == (1, node.reward)  # counted once, not Eq. 3 and then again


def test_the_ppm_prefix_cache_changes_no_value_and_scores_children_from_their_parent(tiny_policy, ppm_path, problems):
    plain = TransformersPPMScorer(ppm_path, device="cpu", batch_size=4, prefix_cache_mb=0)
    cached = TransformersPPMScorer(ppm_path, device="cpu", batch_size=4, prefix_cache_mb=64)
    assert plain.prefix_cache is None
    questions = list(problems["problem"])
    steps = ["# Count them.\nx = 3 + 4\n<end_of_step>\n", "print(x)\n<end_of_code>\n", "<output>7</output>\n"]
    partials = [""] * len(questions)
    for step in steps:  # a node, then its child, as MCTS scores them (wave after wave)
        partials = [p + step for p in partials]
        for depth_questions, depth_partials in ((questions, partials), (questions[:2], partials[:2])):
            assert cached.score(depth_questions, depth_partials) == pytest.approx(
                plain.score(depth_questions, depth_partials), abs=1e-5
            )
    assert cached.prefix_cache.hits > 0 and cached.prefix_cache.reused_tokens > 0
    config = MCTSConfig(num_rollouts=2, num_candidates=3, max_step_tokens=48, max_answer_tokens=32,
                        executor_workers=1, seed=0, device="cpu", torch_threads=1)  # fmt: skip
    subset = problems.select(range(3))
    with_cache = MCTSGenerator(tiny_policy, config, subset, ppm=cached).generate()
    without = MCTSGenerator(tiny_policy, config, subset, ppm=plain).generate()
    for a, b in zip(with_cache["tree"], without["tree"]):  # the same trees; values equal up to float rounding
        nodes_a, nodes_b = SearchTree.from_json(a).nodes, SearchTree.from_json(b).nodes
        assert [(n.text, n.visits, n.terminal_reason) for n in nodes_a] == [
            (n.text, n.visits, n.terminal_reason) for n in nodes_b
        ]
        assert [n.ppm_score or 0.0 for n in nodes_a] == pytest.approx([n.ppm_score or 0.0 for n in nodes_b], abs=1e-5)
        assert sum(n.ppm_score is not None for n in nodes_a) > 0
