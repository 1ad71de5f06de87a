"""Evaluation shared out over processes (`accelerate launch recipes/eval.py`) and samples reused across runs
(`--samples_from`): both must give exactly what one process drawing its own samples gives."""

import json
import os
import subprocess
import sys

import pytest
import torch

from rstar_trl import PythonExecutor, format_prompt
from rstar_trl.evaluation import EvalConfig, Evaluator, beam_search, load_eval_problems, sample_solutions
from rstar_trl.search import build_backend
from rstar_trl.tiny import tiny_splits

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAST = dict(max_step_tokens=48, max_answer_tokens=32, executor_workers=1, device="cpu", torch_threads=1, seed=0)
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


@pytest.fixture(scope="module")
def other_ppm(ppm_path, tmp_path_factory) -> str:
    """A second PPM: the fixture's with another score head, so that it ranks samples differently."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = AutoModelForSequenceClassification.from_pretrained(ppm_path)
    with torch.no_grad():
        model.score.weight.copy_(torch.randn(model.score.weight.shape, generator=torch.Generator().manual_seed(7)))
    path = str(tmp_path_factory.mktemp("other_ppm"))
    model.save_pretrained(path)
    AutoTokenizer.from_pretrained(ppm_path).save_pretrained(path)
    return path


def _answers(results: dict) -> dict:
    """Per method, per problem: what a run decides (answer, correctness, tokens, chosen text, candidates)."""
    keep = ("index", "answer", "correct", "tokens", "solution", "votes", "candidates")
    return {m["method"]: [{k: r.get(k) for k in keep} for r in m["problems"]] for m in results["methods"]}


def _close(a: dict, b: dict) -> None:
    """Same decisions; PPM scores equal up to float noise."""
    assert a.keys() == b.keys()
    for method in a:
        for ra, rb in zip(a[method], b[method], strict=True):
            ca, cb = ra.pop("candidates") or [], rb.pop("candidates") or []
            va, vb = ra.pop("votes"), rb.pop("votes")  # PPM-weighted votes are sums of scores
            assert ra == rb, method
            assert va == pytest.approx(vb, abs=1e-5), method
            assert [c[0] for c in ca] == [c[0] for c in cb], method
            assert [c[1] for c in ca] == pytest.approx([c[1] for c in cb], abs=1e-5), method


def test_a_subset_of_problems_gets_the_samples_and_beams_it_gets_in_the_whole(tiny_policy, ppm_path):
    from rstar_trl import TransformersPPMScorer

    args = EvalConfig(temperature=1.0, **FAST)
    backend = build_backend(tiny_policy, args)
    questions = [p["problem"] for p in tiny_splits()["test"] if p["level"] >= 3][:4]
    prompts = [format_prompt(q) for q in questions]
    scorer = TransformersPPMScorer(ppm_path, device="cpu")
    with PythonExecutor(max_workers=1) as executor:
        whole = sample_solutions(backend, executor, args, prompts, 2, args.temperature)
        odd = sample_solutions(backend, executor, args, prompts, 2, args.temperature, problems=[1, 3])
        beams = beam_search(backend, executor, scorer, args, questions, 2, 2)
        odd_beams = beam_search(backend, executor, scorer, args, questions, 2, 2, problems=[3, 1])
    assert [[(t.problem, t.text, t.tokens) for t in row] for row in odd] == [
        [(t.problem, t.text, t.tokens) for t in row] for row in (whole[1], whole[3])
    ]
    assert any(len({t.text for t in row}) > 1 for row in whole)  # sampled: seeds matter
    for subset, full in zip(odd_beams, (beams[3], beams[1])):
        assert [(t.problem, t.text) for t in subset.finished] == [(t.problem, t.text) for t in full.finished]
        assert subset.tokens == full.tokens


@pytest.mark.slow
def test_two_processes_give_the_one_process_results(tiny_policy, ppm_path, tmp_path):
    methods = ["greedy", "maj@3", "best_of_n@3:min", "mcts@2x2x2:vote", "beam@2x2"]
    options = ["--model_name_or_path", tiny_policy, "--ppm_path", ppm_path, "--dataset", "tiny-test", "--limit", "5",
               "--temperature", "1.0", "--methods", *methods, *[f"--{k}={v}" for k, v in FAST.items()]]  # fmt: skip
    recipe = os.path.join(REPO, "recipes", "eval.py")
    one, two = tmp_path / "one", tmp_path / "two"
    run = subprocess.run([sys.executable, recipe, *options, "--output_dir", str(one)], capture_output=True,
                         text=True, env=ENV, timeout=600, cwd=REPO)  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    # `--multi_gpu` makes accelerate start the processes with torchrun; without CUDA they form a gloo (CPU) group.
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "2", "--multi_gpu",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]  # fmt: skip
    run = subprocess.run([*launch, recipe, *options, "--output_dir", str(two)], capture_output=True, text=True,
                         env=ENV, timeout=600, cwd=REPO)  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.count("Wrote ") == 3  # the main process reports; the other one writes nothing
    for label in ("greedy", "sampling 3", "beam@2x2"):  # both processes solved a share
        assert f"{label} [rank 0]" in run.stderr and f"{label} [rank 1]" in run.stderr, label
    a, b = (json.loads((d / "results.json").read_text()) for d in (one, two))
    _close(_answers(a), _answers(b))
    assert any(r["correct"] for m in a["methods"] for r in m["problems"])  # not vacuous
    samples = [(d / "samples.jsonl").read_text().splitlines()[1:] for d in (one, two)]
    assert samples[0] == samples[1] and len(samples[0]) == 5


@pytest.mark.slow
def test_samples_from_another_run_give_the_results_of_drawing_them(tiny_policy, ppm_path, other_ppm, tmp_path):
    problems = load_eval_problems("tiny-test", limit=4)
    methods = ["maj@3", "best_of_n@3", "weighted_maj@2"]
    first = EvalConfig(methods=methods, ppm_path=ppm_path, temperature=1.0, output_dir=str(tmp_path / "a"), **FAST)
    with Evaluator(tiny_policy, first, eval_dataset=problems) as evaluator:
        evaluator.evaluate()
    assert (tmp_path / "a" / "samples.jsonl").exists()

    fresh = EvalConfig(**{**vars(first), "ppm_path": other_ppm, "output_dir": str(tmp_path / "b")})
    reused = EvalConfig(**{**vars(fresh), "output_dir": str(tmp_path / "c"), "samples_from": str(tmp_path / "a")})
    with Evaluator(tiny_policy, fresh, eval_dataset=problems) as evaluator:
        expected = evaluator.evaluate()
    with Evaluator(tiny_policy, reused, eval_dataset=problems) as evaluator:
        calls = []
        generate = evaluator.backend.generate
        evaluator.backend.generate = lambda *a, **k: calls.append(a) or generate(*a, **k)
        got = evaluator.evaluate()
    assert calls == []  # nothing sampled again
    assert not (tmp_path / "c" / "samples.jsonl").exists()
    _close(_answers(expected), _answers(got))
    # The other PPM scores the samples differently: the reused samples were re-scored, not copied with their scores.
    with Evaluator(tiny_policy, first, eval_dataset=problems) as evaluator:
        original = {m["method"]: m for m in evaluator.evaluate()["methods"]}["best_of_n@3"]["problems"]
    reused_scores = {m["method"]: m for m in got["methods"]}["best_of_n@3"]["problems"]
    assert [r["score"] for r in original] != pytest.approx([r["score"] for r in reused_scores], abs=1e-5)


def test_samples_from_refuses_samples_drawn_differently(tiny_policy, ppm_path, tmp_path):
    problems = load_eval_problems("tiny-test", limit=2)
    base = dict(methods=["maj@2"], output_dir=str(tmp_path / "a"), **FAST)
    with Evaluator(tiny_policy, EvalConfig(**base), eval_dataset=problems) as evaluator:
        evaluator.evaluate()
    cases = [
        ({"temperature": 0.5}, problems, ValueError, "temperature: 0.8 there, 0.5 here"),
        ({"methods": ["maj@4"]}, problems, ValueError, "it has 2 samples per problem, the methods need 4"),
        ({}, load_eval_problems("tiny-test", limit=3), ValueError, "num_problems: 2 there, 3 here"),
        ({"samples_from": str(tmp_path / "nothing")}, problems, FileNotFoundError, "there is no samples.jsonl"),
    ]
    for change, dataset, error, message in cases:
        args = EvalConfig(**{**base, "samples_from": str(tmp_path / "a"), "output_dir": str(tmp_path / "b"), **change})
        with Evaluator(tiny_policy, args, eval_dataset=dataset) as evaluator:
            with pytest.raises(error, match=message.replace("(", r"\(")):
                evaluator.evaluate()
