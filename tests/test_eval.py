"""The evaluation harness: step-wise sampling with code execution, the methods (greedy, maj@K, best-of-N, MCTS, beam)
and their budgets, graded results with token counts, the recipe's reports and its errors."""

import json
import os
import subprocess
import sys

import pytest
from datasets import Dataset
from replay import ReplayBackend

from rstar_trl import PythonExecutor, TransformersPPMScorer, format_prompt, grade_answer
from rstar_trl.evaluation import (
    EvalConfig,
    Evaluator,
    MethodSpec,
    beam_search,
    load_eval_problems,
    majority_vote,
    sample_solutions,
    select_top,
)
from rstar_trl.search import build_backend
from rstar_trl.tiny import tiny_splits, to_dataset

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAST = dict(max_step_tokens=48, max_answer_tokens=32, executor_workers=1, device="cpu", torch_threads=1, seed=0)


@pytest.fixture(scope="module")
def problems() -> Dataset:
    # The briefly bootstrapped test policy solves some of the shortest problems: results are neither all right
    # nor all wrong.
    return to_dataset([p for p in tiny_splits()["test"] if p["level"] <= 2][:6])


# -- settings and inputs ----------------------------------------------------------------------------------------


def test_method_strings_parse_with_their_budgets():
    assert MethodSpec.parse("greedy") == MethodSpec("greedy", ())
    assert MethodSpec.parse("maj@8") == MethodSpec("maj", (8,))
    assert MethodSpec.parse("best_of_n@16").label == "best_of_n@16"
    assert MethodSpec.parse("mcts@16x8") == MethodSpec("mcts", (16, 8))
    assert MethodSpec.parse("mcts@4", default_candidates=5).label == "mcts@4x5"
    assert MethodSpec.parse("mcts", default_rollouts=8, default_candidates=5).label == "mcts@8x5"
    assert MethodSpec.parse("beam@4x2") == MethodSpec("beam", (4, 2))


@pytest.mark.parametrize("method", ["sampling@4", "majority@3", "maj", "maj@0", "beam@4", "greedy@2", "maj@2x2"])
def test_unknown_methods_and_bad_budgets_are_clear_errors(method):
    with pytest.raises(ValueError, match="method"):
        EvalConfig(methods=[method])


@pytest.mark.parametrize("method", ["best_of_n@4", "mcts@2x2", "beam@2x2"])
def test_ppm_methods_without_a_ppm_path_are_refused(method):
    with pytest.raises(ValueError, match="--ppm_path"):
        EvalConfig(methods=["greedy", method])


def test_a_dataset_without_answers_is_a_clear_error(tmp_path):
    path = tmp_path / "questions.jsonl"
    path.write_text(json.dumps({"question": "What is 2 + 3?"}) + "\n")
    with pytest.raises(ValueError, match="gold answer"):
        load_eval_problems(str(path))
    with pytest.raises(ValueError, match="answer"):
        Evaluator("unused", EvalConfig(methods=["greedy"]), eval_dataset=Dataset.from_dict({"problem": ["2 + 3?"]}))


def test_the_tiny_test_split_is_the_default_dataset():
    problems = load_eval_problems("tiny-test", limit=5)
    assert len(problems) == 5 and problems[0]["problem"] == tiny_splits()["test"][0]["problem"]


# -- voting and selection ---------------------------------------------------------------------------------------


def test_majority_vote_counts_equivalent_answers_together():
    # 2, 2.0 and 4/2 are one answer (3 votes) against 3 (2 votes); the vote points at the group's first sample.
    assert majority_vote(["3", "2", None, "2.0", "3", "\\frac{4}{2}"]) == 1
    assert majority_vote(["7", " 5", "5 "]) == 1  # spacing does not split a group


def test_majority_vote_breaks_ties_by_first_answer_and_ignores_missing_answers():
    assert majority_vote(["5", "7", "7", "5"]) == 0
    assert majority_vote([None, "9"]) == 1
    assert majority_vote([None, None]) is None
    assert majority_vote([]) is None


def test_select_top_keeps_the_highest_scores_best_first():
    assert select_top([0.1, 0.9, -0.5, 0.9, 0.3], 3) == [1, 3, 4]
    assert select_top([0.2], 4) == [0]
    assert select_top([0.2, 0.4], 0) == []


@pytest.mark.slow
def test_beam_search_keeps_the_top_b_steps_by_ppm_score(tiny_policy, ppm_path):
    # Four different first steps; from any of them one final step. Width 2 must continue exactly the two first
    # steps the PPM values highest, and answer with the better of the two finished beams.
    first_steps = [f"# Take {n}.\nx = {n}\n<end_of_step>" for n in (3, 14, 15, 92)]
    backend = ReplayBackend(lambda so_far: first_steps if not so_far else ["# Print it.\nprint(x)\n<end_of_code>"])
    scorer = TransformersPPMScorer(ppm_path, device="cpu")
    question = "Ava has some apples. How many?"
    first_scores = scorer.score([question] * 4, [step + "\n" for step in first_steps])
    args = EvalConfig(**FAST)
    with PythonExecutor(max_workers=1) as executor:
        (result,) = beam_search(backend, executor, scorer, args, [question], width=2, num_candidates=4)
    kept = {first_steps[i] for i in select_top(first_scores, 2)}
    assert {beam.text.split("\n<end_of_step>")[0] + "\n<end_of_step>" for beam in result.finished} == kept
    assert len(result.finished) == 2 and all(beam.end == "answer" for beam in result.finished)
    assert result.best.score == max(beam.score for beam in result.finished)
    assert result.best.score == pytest.approx(scorer.score([question], [result.best.text])[0], abs=1e-5)
    assert result.best.answer == result.best.steps[0].code.split("= ")[1]  # the replay answers with the output
    # one generation call per wave for both beams, one answer call
    assert backend.calls == [(1, 4), (2, 4), (8, 1)]


# -- real generation on the tiny policy ---------------------------------------------------------------------------


@pytest.mark.slow
def test_greedy_on_the_tiny_policy_gives_graded_results_and_token_counts(tiny_policy, problems):
    results = Evaluator(tiny_policy, EvalConfig(methods=["greedy"], **FAST), eval_dataset=problems).evaluate()
    (greedy,) = results["methods"]
    records = greedy["problems"]
    assert [r["index"] for r in records] == list(range(len(problems)))
    for record, gold in zip(records, problems["answer"]):
        assert record["gold"] == gold
        assert record["correct"] == (record["answer"] is not None and grade_answer(record["answer"], gold))
        assert record["tokens"] > 0
        if record["answer"] is not None:
            assert "<end_of_code>" in record["solution"] and "<output>" in record["solution"]
    assert greedy["correct"] == sum(r["correct"] for r in records)
    assert greedy["accuracy"] == greedy["correct"] / len(problems)
    assert greedy["tokens_per_problem"] == sum(r["tokens"] for r in records) / len(problems)
    assert greedy["correct"] >= 1  # the policy solves some of these: grading is not vacuous


@pytest.mark.slow
def test_the_first_k_of_n_samples_are_the_k_samples(tiny_policy):
    args = EvalConfig(temperature=1.0, **FAST)
    backend = build_backend(tiny_policy, args)
    hard = [p["problem"] for p in tiny_splits()["test"] if p["level"] >= 4][:3]  # where samples differ
    prompts = [format_prompt(q) for q in hard]
    with PythonExecutor(max_workers=1) as executor:
        four = sample_solutions(backend, executor, args, prompts, 4, args.temperature)
        two = sample_solutions(backend, executor, args, prompts, 2, args.temperature)
    for row4, row2 in zip(four, two):
        assert [(t.text, t.tokens) for t in row4[:2]] == [(t.text, t.tokens) for t in row2]
    assert any(len({t.text for t in row}) > 1 for row in four)  # sampled, not greedy


@pytest.mark.slow
def test_sampled_and_ppm_methods_on_the_tiny_policy(tiny_policy, problems, ppm_path):
    args = EvalConfig(methods=["maj@2", "maj@4", "best_of_n@4", "mcts@2x2", "beam@2x2"], ppm_path=ppm_path, **FAST)
    evaluator = Evaluator(tiny_policy, args, eval_dataset=problems.select(range(4)))
    results = evaluator.evaluate()
    by_method = {m["method"]: m for m in results["methods"]}
    assert list(by_method) == args.methods
    for method in by_method.values():
        for record, gold in zip(method["problems"], problems["answer"]):
            assert record["correct"] == (record["answer"] is not None and grade_answer(record["answer"], gold))
            assert record["tokens"] > 0
    # maj@2 uses the first two of the samples maj@4 uses: never more tokens
    for small, large in zip(by_method["maj@2"]["problems"], by_method["maj@4"]["problems"]):
        assert small["tokens"] <= large["tokens"]
    # best-of-N answers with the sample the PPM values highest among the answered ones
    scorer = evaluator.ppm
    prompts = [format_prompt(q) for q in problems["problem"][:4]]
    with PythonExecutor(max_workers=1) as executor:
        samples = sample_solutions(evaluator.backend, executor, args, prompts, 4, args.temperature)
    for record, row in zip(by_method["best_of_n@4"]["problems"], samples):
        answered = [t for t in row if t.answer is not None]
        if not answered:
            assert record["answer"] is None
            continue
        scores = scorer.score([problems[record["index"]]["problem"]] * len(answered), [t.text for t in answered])
        assert record["solution"] == answered[max(range(len(answered)), key=lambda k: (scores[k], -k))].text
        assert record["score"] == pytest.approx(max(scores), abs=1e-5)
    for record in by_method["beam@2x2"]["problems"]:
        assert record["finished_beams"] <= 2
    assert all(r["status"] == "searched" for r in by_method["mcts@2x2"]["problems"])


@pytest.mark.slow
def test_the_recipe_writes_json_markdown_and_png(tiny_policy, ppm_path, tmp_path):
    out = tmp_path / "eval"
    command = [sys.executable, os.path.join(REPO, "recipes", "eval.py"), "--model_name_or_path", tiny_policy,
               "--ppm_path", ppm_path, "--methods", "greedy", "maj@2", "best_of_n@2", "--limit", "3",
               "--output_dir", str(out), *[f"--{k}={v}" for k, v in FAST.items()]]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    run = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300, cwd=REPO)
    assert run.returncode == 0, run.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert results["num_problems"] == 3
    assert [m["method"] for m in results["methods"]] == ["greedy", "maj@2", "best_of_n@2"]
    table = (out / "results.md").read_text()
    assert all(f"| {name} |" in table for name in ("greedy", "maj@2", "best_of_n@2"))
    assert "| greedy |" in run.stdout
    png = (out / "accuracy_vs_tokens.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 5000


def test_the_recipe_refuses_a_ppm_method_without_a_ppm_path(tmp_path):
    command = [sys.executable, os.path.join(REPO, "recipes", "eval.py"), "--model_name_or_path", "unused",
               "--methods", "greedy", "mcts@4x4", "--output_dir", str(tmp_path)]  # fmt: skip
    run = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=REPO)
    assert run.returncode != 0
    assert "--ppm_path" in run.stderr and "Traceback" not in run.stderr


def test_eval_results_go_into_the_round_cards_once_per_dataset(tmp_path):
    from rstar_trl.evaluation import add_eval_to_cards

    policy, ppm = tmp_path / "policy", tmp_path / "ppm"
    policy.mkdir()
    ppm.mkdir()
    (policy / "README.md").write_text("# policy card\n\nbody\n")
    (ppm / "README.md").write_text("# ppm card\n")

    def results(accuracy: float, dataset: str = "tiny-test") -> dict:
        method = {"method": "greedy", "name": "greedy", "budget": [], "accuracy": accuracy, "correct": 1,
                  "num_problems": 4, "answered": 1.0, "tokens_per_problem": 50.0, "time_s": 1.0}  # fmt: skip
        return {"model": str(policy), "ppm": str(ppm), "dataset": dataset, "num_problems": 4, "time_s": 1.0,
                "methods": [method]}  # fmt: skip

    assert len(add_eval_to_cards(results(0.25), [str(policy), str(ppm), str(tmp_path / "missing"), None])) == 2
    add_eval_to_cards(results(0.75), [str(policy)])  # a re-run replaces its section
    add_eval_to_cards(results(0.5, "math500"), [str(policy)])  # another dataset adds one
    text = (policy / "README.md").read_text()
    assert text.startswith("# policy card\n\nbody\n")
    assert text.count("## Evaluation on tiny-test") == 1 and "| greedy | 75.0% |" in text and "25.0%" not in text
    assert "## Evaluation on math500" in text and "| greedy | 50.0% |" in text
    assert "| greedy | 25.0% |" in (ppm / "README.md").read_text()


def test_evaluation_drops_answers_without_an_executed_program_like_the_search():
    from rstar_trl.evaluation import Trajectory, propose_steps
    from rstar_trl.search import MCTSConfig

    unexecuted = "# the sum is five\n<answer>The answer is \\boxed{5}.<end_of_answer>"
    executed = "# add and show\nprint(2 + 3)\n<end_of_code>"
    backend = ReplayBackend(lambda so_far: [unexecuted, executed])
    trajectory = Trajectory(0, 0, format_prompt("What is 2 + 3?"))
    with PythonExecutor(max_workers=1) as executor:
        for allow, expected in ((False, ["unexecuted_answer", None]), (True, [None, None])):
            config = MCTSConfig(executor_workers=1, allow_unexecuted_answers=allow)
            (row,) = propose_steps(backend, executor, config, [trajectory], 2, 0.8, [0])
            assert [p.error for p in row] == expected
    assert "<output>5<end_of_output>" in row[1].text  # the executed one carries its program's output
