"""The inference API (`rstar_trl.solve`): T independent PPM-guided searches with each answer-selection rule,
best-of-N with each aggregation of step scores, PPM-weighted votes, token accounting with replicas, problems without
gold answers, and the new methods end to end through the `Evaluator` on the tiny policy."""

import re
from collections import Counter

import pytest
from datasets import Dataset
from replay import ReplayBackend

from rstar_trl import grade_answer
from rstar_trl.evaluation import EvalConfig, Evaluator
from rstar_trl.solve import (
    METHOD_FORMS,
    MethodSpec,
    Solver,
    SolverConfig,
    aggregate_step_scores,
    ppm_weight,
    solutions_to_dataset,
    weighted_vote,
)
from rstar_trl.tiny import tiny_splits, to_dataset

FAST = dict(max_step_tokens=48, max_answer_tokens=32, executor_workers=1, device="cpu", torch_threads=1, seed=0)
Q1, Q2 = "What is 2 + 3?", "What is 2 + 2?"


class CopyAwareReplay(ReplayBackend):
    """A scripted backend whose script also sees which copy of a prompt it answers: `script(question, so_far, k)`,
    where k counts the earlier copies of the same prompt in the same call. The k-th sample (or search) of a problem
    then gets its own first step, as a real policy sampling with its own seed would. It tallies the tokens it
    generates per question."""

    def __init__(self, script, questions):
        super().__init__(lambda so_far: [])
        self.step_script = script
        self.questions = questions
        self.batches: list[tuple[int, int]] = []  # (prompts, n) of every generate call
        self.tokens_of = Counter()

    def generate(self, prompts, n, stop, max_new_tokens, temperature=1.0, top_p=1.0, seed=0):
        self.batches.append((len(prompts), n))
        copies = Counter()
        results = []
        for prompt in prompts:
            question = next(q for q in self.questions if q in prompt)
            k = copies[prompt]
            copies[prompt] += 1
            self.script = lambda so_far, q=question, k=k: self.step_script(q, so_far, k)
            (row,) = super().generate([prompt], n, stop, max_new_tokens, temperature, top_p, seed)
            self.tokens_of[question] += sum(c.num_tokens for c in row)
            results.append(row)
        return results


class StepValueScorer:
    """A scripted PPM: the value of a partial solution is the `v=` its last step states (0 when none)."""

    def __init__(self):
        self.calls: list[list[str]] = []

    def score(self, questions, partial_solutions):
        self.calls.append(list(partial_solutions))
        return [float((re.findall(r"v=(-?[\d.]+)", s) or ["0"])[-1]) for s in partial_solutions]


def step(value: float, code: str, final: bool = False) -> str:
    return f"# v={value}\n{code}\n" + ("<end_of_code>" if final else "<end_of_step>")


def _solver(backend, scorer=None, **settings) -> Solver:
    return Solver(backend, ppm=scorer, args=SolverConfig(**{**FAST, **settings}))


# -- method strings -------------------------------------------------------------------------------------------


def test_new_method_strings_parse_and_the_old_ones_keep_their_meaning():
    assert MethodSpec.parse("mcts@16x8") == MethodSpec("mcts", (16, 8))  # one search, as before
    assert MethodSpec.parse("mcts@16x8").search_budget == (1, 16, 8)
    assert MethodSpec.parse("best_of_n@8") == MethodSpec.parse("best_of_n@8:last")
    assert MethodSpec.parse("best_of_n@8").label == "best_of_n@8"
    spec = MethodSpec.parse("best_of_n@8:prod")
    assert (spec.label, spec.aggregation, spec.family) == ("best_of_n@8:prod", "prod", "best_of_n:prod")
    spec = MethodSpec.parse("mcts@64x8x32")
    assert (spec.label, spec.search_budget, spec.selection) == ("mcts@64x8x32:best", (64, 8, 32), "best")
    assert MethodSpec.parse("mcts@4x2x4:top2").selection == "top2"
    assert MethodSpec.parse("mcts@4x2x4:top2").family == "mcts:topK"
    assert MethodSpec.parse("weighted_maj@16").num_samples == 16


BAD = ["mcts@4x4:vote", "mcts@4x2x4:top0", "mcts@4x2x4:first", "best_of_n@4:max", "weighted_maj", "maj@4:vote",
       "mcts@1x2x3x4", "weighted_maj@0", "vote@4"]  # fmt: skip


@pytest.mark.parametrize("method", BAD)
def test_bad_method_strings_name_the_string_and_the_accepted_forms(method):
    with pytest.raises(ValueError) as error:
        MethodSpec.parse(method)
    assert repr(method) in str(error.value) and METHOD_FORMS in str(error.value)


def test_the_same_method_twice_is_refused():
    with pytest.raises(ValueError, match="given twice"):
        EvalConfig(methods=["mcts@4x2x4", "mcts@4x2x4:best"], ppm_path="unused")


# -- selection rules ------------------------------------------------------------------------------------------


def test_weighted_vote_sums_ppm_weights_per_equivalent_answer():
    assert ppm_weight(-1) == 0 and ppm_weight(1) == 1 and ppm_weight(0.5) == 0.75
    # 2 and 2.0 are one answer: weights 0.5 + 0.5 = 1.0 beat 0.9 for 7, and the heavier member of the group wins
    assert weighted_vote(["7", "2", None, "2.0"], [0.9, 0.4, 1.0, 0.6]) == 3
    assert weighted_vote(["7", "2"], [0.5, 0.5]) == 0  # a tie goes to the answer that came first
    assert weighted_vote([None], [1.0]) is None
    with pytest.raises(ValueError, match="non-negative"):
        weighted_vote(["1"], [-0.5])


def test_step_score_aggregations():
    scores = [0.5, -0.5, 1.0]
    assert aggregate_step_scores(scores, "last") == 1.0
    assert aggregate_step_scores(scores, "min") == -0.5
    assert aggregate_step_scores(scores, "mean") == pytest.approx(1 / 3)
    assert aggregate_step_scores(scores, "prod") == pytest.approx(0.75 * 0.25 * 1.0)  # of (v + 1) / 2
    with pytest.raises(ValueError, match="aggregation"):
        aggregate_step_scores(scores, "max")


# Four samples whose step values make each aggregation prefer a different one:
#   A: -0.9, 1.0             last 1.0 (best)   min -0.9   mean 0.05            prod 0.05
#   B: 0.5 x 4               last 0.5          min 0.5    mean 0.5             prod 0.32
#   C: 0.9 x 5, 0.4          last 0.4          min 0.4    mean 0.82 (best)     prod 0.54
#   D: 0.45                  last 0.45         min 0.45   mean 0.45            prod 0.725 (best)
SAMPLES = {
    "A": [step(-0.9, "a = 1"), step(1.0, "print(11)", final=True)],
    "B": [step(0.5, f"b{i} = {i}") for i in range(3)] + [step(0.5, "print(22)", final=True)],
    "C": [step(0.9, f"c{i} = {i}") for i in range(5)] + [step(0.4, "print(33)", final=True)],
    "D": [step(0.45, "print(44)", final=True)],
}


def sample_script(question, so_far, k):
    if so_far == "":  # the k-th sample of the problem starts its own solution
        return [list(SAMPLES.values())[k % len(SAMPLES)][0]]
    steps = next(s for s in SAMPLES.values() if so_far.startswith(s[0]))
    return [steps[so_far.count("<end_of_step>")]]


def test_each_best_of_n_aggregation_picks_a_different_sample():
    backend, scorer = CopyAwareReplay(sample_script, [Q1]), StepValueScorer()
    methods = ["best_of_n@4", "best_of_n@4:min", "best_of_n@4:mean", "best_of_n@4:prod"]
    with _solver(backend, scorer) as solver:
        runs = solver.solve_methods([Q1], methods)
    picks = {label: run.solutions[0].answer for label, run in runs.items()}
    assert picks == {"best_of_n@4": "11", "best_of_n@4:min": "22", "best_of_n@4:mean": "33", "best_of_n@4:prod": "44"}
    prod = runs["best_of_n@4:prod"].solutions[0]
    assert prod.score == pytest.approx(0.725) and prod.chosen == 3
    assert prod.candidates[2].step_scores == [0.9] * 5 + [0.4]
    assert prod.candidates[2].score == pytest.approx(0.95**5 * 0.7)
    # ONE scoring call for every prefix of every sample (2 + 4 + 6 + 1), shared by the four methods
    assert len(scorer.calls) == 1 and len(scorer.calls[0]) == 13
    # the four methods share one set of samples, each charged all its tokens
    assert {run.solutions[0].tokens for run in runs.values()} == {backend.tokens_of[Q1]}


def test_ppm_weighted_majority_over_samples():
    # X: answer 1 valued 0.95; Y, Y: answer 2 valued 0.6; Z, Z, Z: answer 3 valued -0.6.
    # maj@6 -> 3 (three votes); best_of_n@6 -> 1 (highest value); weighted_maj@6 -> 2 (0.8 + 0.8 > 0.975 > 0.6).
    firsts = [step(0.95, "print(1)", True)] + [step(0.6, "print(2)", True)] * 2 + [step(-0.6, "print(3)", True)] * 3
    backend = CopyAwareReplay(lambda q, so_far, k: [firsts[k]], [Q1])
    with _solver(backend, StepValueScorer()) as solver:
        runs = solver.solve_methods([Q1], ["maj@6", "best_of_n@6", "weighted_maj@6"])
    assert [run.solutions[0].answer for run in runs.values()] == ["3", "1", "2"]
    weighted = runs["weighted_maj@6"].solutions[0]
    assert weighted.votes == pytest.approx(1.6) and weighted.score == pytest.approx(0.6)
    assert runs["maj@6"].solutions[0].votes == 3


# Seven searches of Q1, one per copy of its prompt in the first wave (R = 1, C = 1: each search is one final step):
#   search:  0      1      2      3..6
#   answer:  1      3      3      2 (x4)
#   value:   0.9    0.8    0.7    0.5
# best -> 1; vote -> 2 (weights 4 x 0.75 = 3.0 > 0.9 + 0.85 > 0.95); top3 (searches 0, 1, 2) -> 3.
SEARCHES = [(0.9, 1), (0.8, 3), (0.7, 3), (0.5, 2), (0.5, 2), (0.5, 2), (0.5, 2)]


def search_script(question, so_far, k):
    if question == Q2:
        return [step(0.3, "print(4)", final=True)]
    value, answer = SEARCHES[k]
    return [f"# v={value} search {k}\nprint({answer})\n<end_of_code>"]


def test_t_searches_pick_the_answer_by_each_selection_rule():
    backend, scorer = CopyAwareReplay(search_script, [Q1, Q2]), StepValueScorer()
    with _solver(backend, scorer) as solver:
        runs = solver.solve_methods([Q1, Q2], ["mcts@7x1x1:best", "mcts@7x1x1:vote", "mcts@7x1x1:top3"])
    best, vote, top = (run.solutions[0] for run in runs.values())
    assert (best.answer, vote.answer, top.answer) == ("1", "2", "3")
    assert best.score == pytest.approx(0.9) and best.chosen == 0 and "search 0" in best.trajectory
    assert vote.votes == pytest.approx(3.0) and vote.chosen == 3
    assert top.votes == 2 and top.chosen == 1  # the better of the two searches answering 3
    assert [c.answer for c in best.candidates] == [str(a) for _, a in SEARCHES]
    assert [c.score for c in best.candidates] == pytest.approx([v for v, _ in SEARCHES])
    assert all(run.solutions[1].answer == "4" and len(run.solutions[1].candidates) == 7 for run in runs.values())
    # the three selections share ONE run of 14 searches: one step call and one answer call
    assert backend.batches == [(14, 1), (14, 1)]
    assert len(scorer.calls) == 1 and len(scorer.calls[0]) == 14


def test_one_search_is_the_single_search_case_of_t_searches():
    backend = CopyAwareReplay(search_script, [Q1])
    with _solver(backend, StepValueScorer()) as solver:
        runs = solver.solve_methods([Q1], ["mcts@1x1", "mcts@1x1x1:best"])
    one, single = (run.solutions[0] for run in runs.values())
    assert one.answer == single.answer == "1" and one.tokens == single.tokens
    assert backend.batches == [(1, 1), (1, 1)]  # one run serves both


GOOD = "# add the numbers\nx = 2 + 3\n<end_of_step>"
WRONG = "# multiply instead\nx = 2 * 3\n<end_of_step>"
FINISH = "# show it\nprint(x)\n<end_of_code>"


def test_tokens_of_replicated_searches_sum_to_what_the_backend_generated_per_problem():
    def script(question, so_far, k):
        return [GOOD, WRONG] if so_far == "" else [FINISH] if so_far.count("<end_of_step>") == 1 else []

    class LengthScorer:
        def score(self, questions, partial_solutions):
            return [min(1.0, len(s) / 100) for s in partial_solutions]

    backend = CopyAwareReplay(script, [Q1, Q2])
    with _solver(backend, LengthScorer()) as solver:
        (q1, q2, q1_again) = solver.solve([Q1, Q2, Q1], method="mcts@3x2x2:vote")
    assert q2.tokens == backend.tokens_of[Q2] > 0
    # The same problem given twice: its 6 searches' tokens are split evenly between the two copies.
    assert q1.tokens + q1_again.tokens == backend.tokens_of[Q1] and abs(q1.tokens - q1_again.tokens) <= 1
    assert all(len(s.candidates) == 3 and s.answer in ("5", "6") for s in (q1, q2, q1_again))


# -- the inference API --------------------------------------------------------------------------------------


def test_the_solver_takes_problems_without_gold_answers():
    backend = CopyAwareReplay(lambda q, so_far, k: [FINISH.replace("print(x)", "print(2 + 3)")], [Q1, Q2])
    with _solver(backend, StepValueScorer(), method="mcts@2x1x1:top2") as solver:
        from_list = solver.solve([Q1, Q2])
        from_dataset = solver.solve(Dataset.from_dict({"problem": [Q1, Q2], "source": ["a", "b"]}))
        greedy = solver.solve([Q1], method="greedy")
    assert [s.answer for s in from_list] == ["5", "5"] and [s.index for s in from_list] == [0, 1]
    assert [s.to_dict() for s in from_list] == [s.to_dict() for s in from_dataset]
    assert from_list[0].method == "mcts@2x1x1:top2" and from_list[0].votes == 2
    assert greedy[0].answer == "5" and greedy[0].tokens > 0 and greedy[0].candidates[0].tokens == greedy[0].tokens
    table = solutions_to_dataset(from_list)
    assert table["answer"] == ["5", "5"] and len(table[0]["candidates"]) == 2


def test_the_solver_names_bad_input():
    backend = CopyAwareReplay(lambda q, so_far, k: [], [Q1])
    solver = _solver(backend)
    with pytest.raises(TypeError, match=r"\[problem\]"):
        solver.solve(Q1, method="greedy")
    with pytest.raises(ValueError, match="'problem' column"):
        solver.solve(Dataset.from_dict({"question": [Q1]}), method="greedy")
    with pytest.raises(ValueError, match="no problems"):
        solver.solve([], method="greedy")
    with pytest.raises(ValueError, match=r"position\(s\) \[1\]"):
        solver.solve([Q1, ""], method="greedy")
    with pytest.raises(ValueError, match="--ppm_path"):  # no scorer passed and no ppm_path
        solver.solve([Q1], method="weighted_maj@4")
    with pytest.raises(ValueError, match="unknown method"):
        SolverConfig(method="vote@4")
    with pytest.raises(ValueError, match=r"unsolved_rollouts=\[4\]: .*needs gold answers"):  # none at test time
        SolverConfig(unsolved_rollouts=[4])


# -- end to end on the tiny policy ------------------------------------------------------------------------------


@pytest.mark.slow
def test_the_new_methods_through_the_evaluator_on_the_tiny_policy(tiny_policy, ppm_path):
    problems = to_dataset([p for p in tiny_splits()["test"] if p["level"] <= 2][:3])
    methods = ["best_of_n@2:min", "best_of_n@2:prod", "weighted_maj@2", "mcts@2x1x2:best", "mcts@2x1x2:vote",
               "mcts@2x1x2:top1"]  # fmt: skip
    with Evaluator(tiny_policy, EvalConfig(methods=methods, ppm_path=ppm_path, **FAST), eval_dataset=problems) as ev:
        results = ev.evaluate()
    by_method = {m["method"]: m for m in results["methods"]}
    assert list(by_method) == methods
    for method in by_method.values():
        assert method["accuracy_ci95"][0] <= method["accuracy"] <= method["accuracy_ci95"][1]
        for record, gold in zip(method["problems"], problems["answer"]):
            assert record["correct"] == (record["answer"] is not None and grade_answer(record["answer"], gold))
            assert record["tokens"] > 0
    searches = [by_method[f"mcts@2x1x2:{rule}"]["problems"] for rule in ("best", "vote", "top1")]
    for best, vote, top1 in zip(*searches):
        assert best["tokens"] == vote["tokens"] == top1["tokens"]  # one set of searches, each charged all of it
        assert len(best["candidates"]) == 2 and best["candidates"] == vote["candidates"]
        assert best["answer"] == top1["answer"]  # the top-1 vote is the best score
        scored = [s for a, s in best["candidates"] if a is not None and s is not None]
        assert best["score"] == (max(scored) if scored else None)
    for sampled in ("best_of_n@2:min", "best_of_n@2:prod", "weighted_maj@2"):  # one set of samples
        assert [r["tokens"] for r in by_method[sampled]["problems"]] == [
            r["tokens"] for r in by_method["best_of_n@2:min"]["problems"]
        ]
