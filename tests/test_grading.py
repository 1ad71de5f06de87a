"""Specification of final-answer extraction and grading (rstar_trl.grading)."""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor

import pytest
from bench_module import bench_module
from hypothesis import given, settings
from hypothesis import strategies as st

import rstar_trl.grading as grading
from rstar_trl.grading import (
    extract_answer,
    grade_answer,
    grade_solution,
    grading_stats,
    last_boxed,
    reset_grading_stats,
)

# ---------------------------------------------------------------------------------------------------------------
# extract_answer
# ---------------------------------------------------------------------------------------------------------------


def test_extract_answer_returns_the_content_of_a_boxed_answer():
    assert extract_answer(r"So the total is $\boxed{42}$.") == "42"


def test_extract_answer_matches_nested_braces():
    assert extract_answer(r"Thus $\boxed{\frac{1}{\sqrt{2}}}$ is the value.") == r"\frac{1}{\sqrt{2}}"


def test_extract_answer_takes_the_last_boxed_answer():
    assert extract_answer(r"First $\boxed{1}$, corrected: $\boxed{2}$.") == "2"


def test_extract_answer_treats_escaped_braces_as_literal_braces():
    assert extract_answer(r"The set is $\boxed{\{1, 2\}}$.") == r"\{1, 2\}"


def test_extract_answer_reads_a_one_sided_left_brace_inside_a_box():
    text = r"$\boxed{f(x) = \left\{ \begin{array}{ll} 1 & x>0 \end{array} \right.}$"
    assert extract_answer(text) == r"f(x) = \left\{ \begin{array}{ll} 1 & x>0 \end{array} \right."


def test_extract_answer_reads_fbox():
    assert extract_answer(r"Answer: $\fbox{7}$") == "7"


def test_extract_answer_reads_boxed_without_braces():
    assert extract_answer(r"Therefore $\boxed 5$.") == "5"


def test_extract_answer_skips_a_truncated_box_for_the_last_complete_one():
    assert extract_answer(r"Maybe $\boxed{3}$. No wait, $\boxed{\frac{1}{2") == "3"


def test_extract_answer_skips_an_empty_box():
    assert extract_answer(r"We get $\boxed{4}$, so there are $\boxed{}$ primes.") == "4"


def test_extract_answer_ignores_commands_that_only_start_like_boxed():
    assert extract_answer(r"\boxedfoo{1} and nothing else") is None


def test_extract_answer_prefers_the_box_inside_an_answer_block():
    text = (
        "<code>\nprint(1/2)\n<end_of_code>\n<output>0.5<end_of_output>\n"
        "<answer>So \\boxed{\\frac{1}{2}}<end_of_answer>"
    )
    assert extract_answer(text) == r"\frac{1}{2}"


def test_extract_answer_reads_the_answer_phrase_of_an_answer_block_without_box():
    assert extract_answer("<answer>The answer is 12.<end_of_answer>") == "12"


def test_extract_answer_reads_the_text_of_an_answer_block_without_box_or_phrase():
    assert extract_answer("<answer> 3/4 <end_of_answer>") == "3/4"


def test_extract_answer_needs_the_closing_marker_of_an_answer_block():
    assert extract_answer("<answer>12") is None


def test_extract_answer_reads_gsm8k_hash_marks():
    assert extract_answer("She has 3 + 4 = 7 apples.\n#### 7") == "7"


def test_extract_answer_reads_the_last_gsm8k_hash_marks():
    assert extract_answer("#### 1\nretry\n#### 1,000") == "1,000"


@pytest.mark.parametrize(
    ("text", "answer"),
    [
        ("Adding them up, the answer is 42.", "42"),
        ("The final answer is $\\frac{1}{2}$.", r"\frac{1}{2}"),
        ("Final answer: 3.5", "3.5"),
        ("**Final Answer:** 7", "7"),
        ("Answer: $x = 2$ apples", "x = 2"),
    ],
)
def test_extract_answer_falls_back_to_an_answer_phrase(text, answer):
    assert extract_answer(text) == answer


def test_extract_answer_does_not_take_prose_about_the_answer_for_an_answer():
    assert extract_answer("The answer depends on x.") is None


def test_extract_answer_returns_none_when_no_answer_is_stated():
    assert extract_answer("Let me think about this problem step by step.") is None


def test_extract_answer_returns_none_for_empty_text():
    assert extract_answer("") is None


@settings(max_examples=300, deadline=None)
@given(st.text())
def test_extract_answer_never_raises(text):
    result = extract_answer(text)
    assert result is None or isinstance(result, str)


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet="\\boxed{}fx $#<>answer_end", max_size=60))
def test_extract_answer_never_raises_on_box_fragments(text):
    result = extract_answer(text)
    assert result is None or isinstance(result, str)


def test_last_boxed_returns_none_without_a_box():
    assert last_boxed("no box here") is None


# ---------------------------------------------------------------------------------------------------------------
# extract_answer: real model output without a box (Math-Verify's extraction)
# ---------------------------------------------------------------------------------------------------------------


def test_extract_answer_reads_the_number_of_an_unboxed_last_sentence():
    text = "On the second day she read 64 pages.\nTherefore, Lara read 128 pages on the first day."
    assert extract_answer(text) == "128"


@pytest.mark.parametrize(
    ("text", "answer"),
    [
        ("Final Answer: The final answer is 9. I hope it is correct.", "9"),
        ("Final Answer: The final answer is $\\frac{1}{2}$. I hope it is correct.", r"\frac{1}{2}"),
        ("Final Answer: The final answer is \\$30. I hope it is correct.", "30"),
        ("Final Answer: The final answer is No solution. I hope it is correct.", "No solution"),
    ],
)
def test_extract_answer_reads_the_minerva_answer_format(text, answer):
    assert extract_answer(text) == answer


@pytest.mark.parametrize(
    ("text", "answer"),
    [
        ("So the answer is **15**.", "15"),
        ("The answer is 25%.", r"25\%"),
        ("She spends $1,500 on rent in total.", "1500"),
        ("It costs 3 + 4 = 7 dollars, so the answer is 7 apples.", "7"),
        ("The answer is $\\{x \\mid x \\geq 1\\}$.", r"\{x \mid x \geq 1\}"),
        ("Simplifying, we get $z = 2 + 3 = 5$.", "5"),
    ],
)
def test_extract_answer_reads_unboxed_answers_as_math_verify_finds_them(text, answer):
    assert extract_answer(text) == answer


def test_extract_answer_joins_the_boxes_of_one_answer():
    assert extract_answer(r"The solutions are $\boxed{2}$, $\boxed{5}$ and $\boxed{7}$.") == "2, 5, 7"


def test_extract_answer_does_not_read_a_truncated_box_through_math_verify():
    assert extract_answer(r"So the value is $\boxed{\frac{1}{2") is None


# ---------------------------------------------------------------------------------------------------------------
# grade_solution: whole texts, money
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    [
        r"She pays $3 \times 5 = 15$ dollars, so she pays $\boxed{\$15}$.",
        r"So she pays $\boxed{15 \text{ dollars}}$.",
        r"So she pays $\boxed{\$15.00}$.",
        r"Final Answer: The final answer is \$15. I hope it is correct.",
        r"So it costs **\$15**.",
        r"Thus, the total cost is $\$15$.",
        "She paid $5 and $10, so the answer is $15.",
    ],
)
def test_money_grades_equal_to_its_number(text):
    assert grade_solution(text, "15") is True


@pytest.mark.parametrize(
    "text",
    [
        r"So she pays $\boxed{\$16}$.",
        r"Final Answer: The final answer is \$150. I hope it is correct.",
        "Therefore, Lara read 127 pages on the first day.",
    ],
)
def test_a_wrong_number_does_not_grade_equal(text):
    assert grade_solution(text, "15") is False


def test_grade_solution_reads_the_answer_out_of_the_text():
    assert grade_solution("Therefore, Lara read 128 pages on the first day.", "128") is True
    assert grade_solution("Final Answer: The final answer is 9. I hope it is correct.", "9") is True
    assert grade_solution("Let me think about this.", "9") is False


# ---------------------------------------------------------------------------------------------------------------
# grade_answer: equal and unequal pairs (pred, gold)
# ---------------------------------------------------------------------------------------------------------------

EQUAL = [
    pytest.param("1/2", r"\frac{1}{2}", id="fraction-slash"),
    pytest.param("0.5", r"\frac{1}{2}", id="fraction-decimal"),
    pytest.param("0.5", "1/2", id="slash-decimal"),
    pytest.param(r"\dfrac{1}{2}", r"\frac{1}{2}", id="dfrac"),
    pytest.param(r"\tfrac12", "0.5", id="tfrac-without-braces"),
    pytest.param("-0.5", r"-\frac{1}{2}", id="negative-fraction"),
    pytest.param("0.333333", r"\frac{1}{3}", id="rounded-float"),
    pytest.param("3.50", r"\frac{7}{2}", id="trailing-zero-decimal"),
    pytest.param("50", r"50\%", id="percent-number"),
    pytest.param("0.5", r"50\%", id="percent-value"),
    pytest.param("50", "50%", id="bare-percent-sign"),
    pytest.param("12.5", r"12.5\%", id="decimal-percent-number"),
    pytest.param("0.125", r"12.5\%", id="decimal-percent-value"),
    pytest.param("5", r"5\text{ cm}", id="unit-text"),
    pytest.param("5", r"5\mbox{ cm}^2", id="unit-squared"),
    pytest.param(r"18.9", r"\$18.90", id="dollars"),
    pytest.param("A", r"\text{(A)}", id="choice-text"),
    pytest.param("B", "(B)", id="choice-parens"),
    pytest.param(r"\textbf{(C)}", "C", id="choice-textbf"),
    pytest.param("(1,2]", "(1, 2]", id="interval"),
    pytest.param(r"\left( -\infty, 3 \right)", r"(-\infty,3)", id="interval-left-right"),
    pytest.param(r"\{2,1\}", r"\{1,2\}", id="set-unordered"),
    pytest.param(r"\left( 3, \frac{\pi}{2} \right)", r"(3, \frac{\pi}{2})", id="tuple"),
    pytest.param("(3, 1.5707963)", r"(3, \frac{\pi}{2})", id="tuple-numeric"),
    pytest.param("2, 1", "1, 2", id="solutions-unordered"),
    pytest.param(r"-3 \text{ and } 2", "2, -3", id="solutions-and"),
    pytest.param("7", "007", id="leading-zeros"),
    pytest.param("27", "27.0", id="float-integer"),
    pytest.param("1000", "1,000", id="thousands"),
    pytest.param("1000000", "1,000,000", id="thousands-twice"),
    pytest.param("1000", "1{,}000", id="thousands-latex-brace"),
    pytest.param(r"\frac{1}{29322216}", r"\dfrac{1}{29,\!322,\!216}", id="thousands-latex-thin-space"),
    pytest.param("E", r"\text{(E)},", id="trailing-comma"),
    pytest.param("1234.5", "1,234.5", id="thousands-decimal"),
    pytest.param("30", r"30^\circ", id="degrees"),
    pytest.param("30", r"30^{\circ}", id="degrees-braced"),
    pytest.param("30", "30°", id="degree-sign"),
    pytest.param(r"\pi", r"\pi", id="pi"),
    pytest.param("3.14159265", r"\pi", id="pi-decimal"),
    pytest.param(r"\frac{\pi}{2}", r"\frac{1}{2}\pi", id="pi-fraction"),
    pytest.param(r"2^{1/2}", r"\sqrt{2}", id="sqrt-power"),
    pytest.param(r"\sqrt{12}", r"2\sqrt{3}", id="sqrt-simplified"),
    pytest.param(r"\sqrt2/2", r"\frac{\sqrt{2}}{2}", id="sqrt-without-braces"),
    pytest.param("(x+1)^2", "x^2+2x+1", id="polynomial"),
    pytest.param("5", "x=5", id="assignment"),
    pytest.param("y = 1 + 2x", "y=2x+1", id="assignments-same-variable"),
    pytest.param("2x - y + 1 = 0", "y = 2x + 1", id="equation-line"),
    pytest.param("x - 2 = 0", "2x = 4", id="equations-multiple"),
    pytest.param("5", r"\log_{2}(32)=5", id="constant-equation"),
    pytest.param("-0.912", r"\cos(e) \approx -0.912", id="approx-value"),
    pytest.param(r"\begin{pmatrix} 1 \\ 2 \end{pmatrix}", r"\begin{pmatrix}1\\2\end{pmatrix}", id="matrix"),
    pytest.param(r"$\frac{1}{2}$", r"\frac{1}{2}", id="dollar-delimiters"),
    pytest.param(r"\text{all real numbers}", "all real numbers", id="prose-same-text"),
    pytest.param(r"\text{even}", "even", id="word"),
    pytest.param("10^6", "1,000,000", id="power-of-ten"),
    pytest.param(r"\$15", "15", id="dollar-sign"),
    pytest.param(r"15 \text{ dollars}", "15", id="dollars-word"),
    pytest.param(r"{(2,4)}", "(2,4)", id="tex-group"),
    pytest.param(r"25\%", "0.25", id="extracted-percentage"),
]

NOT_EQUAL = [
    pytest.param("70", "7", id="extra-digit"),
    pytest.param("2", "1/2", id="fraction-vs-integer"),
    pytest.param(r"\frac{2}{1}", r"\frac{1}{2}", id="inverted-fraction"),
    pytest.param("0.51", r"\frac{1}{2}", id="near-decimal"),
    pytest.param("50", "0.5", id="percent-is-not-a-plain-number-equivalence"),
    pytest.param("0.125", "12.5", id="decimal-percent-is-not-a-plain-number-equivalence"),
    pytest.param("[1,2]", "(1,2]", id="closed-vs-half-open"),
    pytest.param("(1,2)", "(1,2]", id="open-vs-half-open"),
    pytest.param("(2,1)", "(1,2)", id="tuple-order"),
    pytest.param(r"(\frac{\pi}{2}, 3)", r"(3, \frac{\pi}{2})", id="point-order"),
    pytest.param(r"\{1,3\}", r"\{1,2\}", id="different-set"),
    pytest.param("1, 2, 3", "1, 2", id="extra-solution"),
    pytest.param("1,5", "1.5", id="comma-is-not-a-decimal-point"),
    pytest.param("1, 000", "1000", id="spaced-comma-is-a-list"),
    pytest.param("(C)", "(B)", id="other-choice"),
    pytest.param(r"\text{(A)}", r"\text{(B)}", id="other-choice-text"),
    pytest.param("5", "B", id="number-vs-choice"),
    pytest.param(r"\frac{\pi}{6}", r"30^\circ", id="degrees-are-not-radians"),
    pytest.param(r"\sqrt{3}", r"\sqrt{2}", id="other-root"),
    pytest.param("3.14", r"\pi", id="coarse-pi"),
    pytest.param("x^2-2x+1", "x^2+2x+1", id="other-polynomial"),
    pytest.param("y = 2x + 2", "y = 2x + 1", id="other-assignment"),
    pytest.param("z = 2x + 1", "y = 2x + 1", id="assignment-to-other-variable"),
    pytest.param("x^2 + 2 = 0", "x^2 + 1 = 0", id="equations-without-real-roots"),
    pytest.param(r"\log_{2}(32)=6", r"\log_{2}(32)=5", id="other-constant-equation"),
    pytest.param("-0.913", r"\cos(e) \approx -0.912", id="other-approx-value"),
    pytest.param(r"\begin{pmatrix} 1 \\ 3 \end{pmatrix}", r"\begin{pmatrix}1\\2\end{pmatrix}", id="other-matrix"),
    pytest.param(r"\text{odd}", r"\text{even}", id="other-word"),
    pytest.param("The height is 600 feet after 10 s.", "The height is 500 feet after 10 s.", id="other-sentence"),
    pytest.param("10", "The height is 500 feet after 10 s.", id="number-out-of-a-sentence"),
    pytest.param("rats eat cats", "cats eat rats", id="sentence-with-the-same-letters"),
    pytest.param(
        r"2, \frac{1}{2}, \frac{-1 \pm i \sqrt{3}}{4}",
        r"1, \frac{1}{2}, \frac{-1 \pm i \sqrt{3}}{4}",
        id="unparsable-with-an-equal-fraction-inside",
    ),
    pytest.param("-7", "7", id="sign"),
    pytest.param("", "7", id="empty-prediction"),
    pytest.param("7", "", id="empty-gold"),
]


@pytest.mark.parametrize(("pred", "gold"), EQUAL)
def test_equivalent_answers_grade_equal(pred, gold):
    assert grade_answer(pred, gold) is True


@pytest.mark.parametrize(("pred", "gold"), NOT_EQUAL)
def test_different_answers_grade_unequal(pred, gold):
    assert grade_answer(pred, gold) is False


@pytest.mark.parametrize(("pred", "gold"), EQUAL + NOT_EQUAL)
def test_grading_does_not_depend_on_argument_order(pred, gold):
    assert grade_answer(gold, pred) == grade_answer(pred, gold)


def test_missing_prediction_grades_unequal():
    assert grade_answer(None, "7") is False


def test_missing_gold_grades_unequal():
    assert grade_answer("7", None) is False


def test_identical_astronomical_answers_grade_equal_as_text():
    assert grade_answer("9^{9^{9^9}}", "9^{9^{9^9}}") is True


@settings(max_examples=150, deadline=None)
@given(st.text(max_size=80), st.text(max_size=80))
def test_grade_answer_never_raises_on_arbitrary_text(pred, gold):
    assert isinstance(grade_answer(pred, gold, timeout=2.0), bool)


@settings(max_examples=100, deadline=None)
@given(st.text(alphabet="0123456789+-*/^(){}[],.=x\\fracsqrtpi ", max_size=40), st.sampled_from(["7", "x+1", "(1,2]"]))
def test_grade_answer_never_raises_on_formula_fragments(pred, gold):
    assert isinstance(grade_answer(pred, gold, timeout=2.0), bool)


# ---------------------------------------------------------------------------------------------------------------
# grade_answer: bounded time, threads, signals
# ---------------------------------------------------------------------------------------------------------------


def _slow_pair(variable: str) -> tuple[str, str]:
    """A pair SymPy needs several seconds to tell apart, small enough to pass the size guard.

    The deadline, not the guard, must stop it. Each test uses its own variable so that no cached parse makes it fast.
    """
    return rf"(\sin {variable} + \cos {variable})^{{30}}", "1"


# Hypothesis leaves garbage-collector callbacks installed; an alarm that lands in one is swallowed ("Exception
# ignored") and the repeated alarm stops the grade instead. pytest reports the swallowed one as a warning.
swallowed_alarm_ok = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")


def test_grade_answer_returns_quickly_on_a_huge_power_tower():
    started = time.monotonic()
    assert grade_answer("9^{9^{9^9}}", "1") is False
    assert time.monotonic() - started < 3


@swallowed_alarm_ok
def test_grade_answer_stops_at_its_deadline_in_the_main_thread():
    pred, gold = _slow_pair("x")
    started = time.monotonic()
    assert grade_answer(pred, gold, timeout=0.5) is False
    assert time.monotonic() - started < 2.5


def test_grade_answer_works_in_a_thread_pool():
    pairs = [("0.5", r"\frac{1}{2}"), ("70", "7"), ("(1,2]", "(1, 2]"), (r"\{2,1\}", r"\{1,2\}")]
    with ThreadPoolExecutor(max_workers=4) as pool:
        results = list(pool.map(lambda pair: grade_answer(*pair), pairs))
    assert results == [True, False, True, True]


def test_grade_answer_stops_at_its_deadline_in_a_worker_thread():
    pred, gold = _slow_pair("y")
    results: list[bool] = []
    worker = threading.Thread(target=lambda: results.append(grade_answer(pred, gold, timeout=0.5)))
    started = time.monotonic()
    worker.start()
    worker.join(timeout=30)
    assert results == [False]
    assert time.monotonic() - started < 2.5


def test_grade_answer_returns_quickly_on_a_huge_power_tower_in_a_worker_thread():
    results: list[bool] = []
    worker = threading.Thread(target=lambda: results.append(grade_answer("10^{10^{10}}", "7")))
    started = time.monotonic()
    worker.start()
    worker.join(timeout=30)
    assert results == [False]
    assert time.monotonic() - started < 3


def test_grade_answer_gives_back_a_running_alarm_and_its_handler():
    fired: list[int] = []

    def handler(signum, frame):
        fired.append(signum)

    previous_handler = signal.signal(signal.SIGALRM, handler)
    previous_timer = signal.setitimer(signal.ITIMER_REAL, 20)
    try:
        assert grade_answer("x^2+2x+1", "(x+1)^2") is True
        remaining, _ = signal.getitimer(signal.ITIMER_REAL)
        assert signal.getsignal(signal.SIGALRM) is handler
        assert 0 < remaining <= 20
        assert fired == []
    finally:
        signal.setitimer(signal.ITIMER_REAL, *previous_timer)
        signal.signal(signal.SIGALRM, previous_handler)


@swallowed_alarm_ok
def test_a_timed_out_grade_leaves_later_grades_working():
    pred, gold = _slow_pair("t")
    assert grade_answer(pred, gold, timeout=0.3) is False
    assert grade_answer("x^2+2x+1", "(x+1)^2") is True


# ---------------------------------------------------------------------------------------------------------------
# Statistics: timeouts and exceptions are counted, each kind logged once
# ---------------------------------------------------------------------------------------------------------------


def _warnings(caplog) -> list[str]:
    return [record.getMessage() for record in caplog.records if record.name == "rstar_trl.grading"]


def test_grading_stats_count_calls_and_reset():
    reset_grading_stats()
    grade_answer("1/2", "0.5")
    grade_answer(None, "1")  # no answer: not a comparison
    extract_answer("The answer is 3.")
    stats = grading_stats()
    assert (stats["calls"], stats["extract_calls"], stats["timeouts"], stats["errors"]) == (1, 1, 0, 0)
    reset_grading_stats()
    assert grading_stats()["calls"] == 0


@swallowed_alarm_ok
def test_timeouts_are_counted_and_logged_once(caplog):
    reset_grading_stats()
    with caplog.at_level(logging.WARNING, logger="rstar_trl.grading"):
        for variable in ("u", "v"):
            pred, gold = _slow_pair(variable)
            assert grade_answer(pred, gold, timeout=0.2) is False
    stats = grading_stats()
    assert stats["timeouts"] == 2
    assert stats["by_kind"] == {"grade:timeout": 2}
    assert len(_warnings(caplog)) == 1
    assert "deadline" in _warnings(caplog)[0]


def test_math_verify_exceptions_are_counted_and_logged_once(monkeypatch, caplog):
    def broken_verify(*args, **kwargs):
        raise TypeError("broken comparison")

    monkeypatch.setattr(grading, "verify", broken_verify)
    reset_grading_stats()
    with caplog.at_level(logging.WARNING, logger="rstar_trl.grading"):
        assert grade_answer("2/4", "0.5") is False
        assert grade_answer("3/6", "0.5") is False
    stats = grading_stats()
    assert stats["errors"] == 2
    assert stats["by_kind"] == {"verify:TypeError": 2}
    messages = _warnings(caplog)
    assert len(messages) == 1
    assert "TypeError" in messages[0] and "broken comparison" in messages[0]


def test_extraction_exceptions_are_counted_and_fall_back_to_the_answer_phrase(monkeypatch, caplog):
    def broken_extract_match(*args, **kwargs):
        raise RuntimeError("broken extraction")

    monkeypatch.setattr(grading, "extract_match", broken_extract_match)
    reset_grading_stats()
    with caplog.at_level(logging.WARNING, logger="rstar_trl.grading"):
        assert extract_answer("The answer is 12.") == "12"
        assert extract_answer("The answer is 13.") == "13"
    assert grading_stats()["by_kind"] == {"extract:RuntimeError": 2}
    assert len(_warnings(caplog)) == 1


# ---------------------------------------------------------------------------------------------------------------
# Agreement with labelled real-style solutions (bench/grader_agreement.py), against plain Math-Verify
# ---------------------------------------------------------------------------------------------------------------


def _agreement_bench():
    return bench_module("grader_agreement")


def test_the_benchmark_data_folder_is_read_from_rstar_trl_data(monkeypatch, tmp_path):
    bench = _agreement_bench()
    monkeypatch.setenv("RSTAR_TRL_DATA", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="RSTAR_TRL_DATA"):
        bench.data_dir()


def test_grader_agrees_with_labelled_solutions_at_least_as_well_as_plain_math_verify():
    """A seeded sample of the real-style labelled set (3 problems per source, every style, once right and once
    wrong): `grade_solution` must agree with the labels at least as often as Math-Verify alone on the whole text,
    on every source. The shared benchmark files are required: without them this test fails, it does not skip."""
    bench = _agreement_bench()
    try:
        data = bench.data_dir()
    except FileNotFoundError as error:
        pytest.fail(str(error))
    items = bench.build_items(problems_per_source=3, seed=1, data=data)
    graders = {
        "ours": grade_solution,
        "math_verify": bench.plain_math_verify,
        "math_verify_raw": bench.plain_math_verify_raw,
    }
    agree: dict[str, dict[str, list[bool]]] = {name: defaultdict(list) for name in graders}
    for item in items:
        for name, grade in graders.items():
            agree[name][item["source"]].append(grade(item["text"], item["gold"]) == item["label"])
    rates = {name: {source: sum(v) / len(v) for source, v in per.items()} for name, per in agree.items()}
    assert set(rates["ours"]) == set(bench.SOURCES)
    for source in bench.SOURCES:
        baseline = max(rates["math_verify"][source], rates["math_verify_raw"][source])
        assert rates["ours"][source] >= baseline, f"{source}: {rates}"
