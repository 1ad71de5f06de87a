"""Specification of problem loading (rstar_trl.data.load_problems) and its agreement with the grader.

The agreement sweep grades every record of every shared benchmark file twice: its gold answer written in a sentence
(`The answer is \\boxed{gold}.`) must grade equal to the gold, and the same sentence with one digit of the stated
value changed must not. It runs in 2 worker processes (about 2 minutes on 2 cores).
"""

from __future__ import annotations

import json
import multiprocessing
import re
from collections.abc import Iterator
from multiprocessing.pool import Pool
from pathlib import Path

import datasets
import pytest

from rstar_trl.data import load_problems
from rstar_trl.grading import extract_answer, grade_answer

DATA = Path("/work/shared/data")

# Record counts from the data README.
COUNTS = {
    "math/test.jsonl": 5000,
    "math500/test.jsonl": 500,
    "gsm8k/train.jsonl": 7473,
    "gsm8k/test.jsonl": 1319,
    "olympiadbench/test.jsonl": 675,
    "college_math/test.jsonl": 2818,
}
# MATH train has 7,500 records, two of which have an empty \boxed{} and so no gold answer.
MATH_TRAIN = "math/train.jsonl"
MATH_TRAIN_EMPTY_BOX_ROWS = [5529, 5531]

needs_data = pytest.mark.skipif(not DATA.is_dir(), reason="shared benchmark data not available")


def _write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(record) + "\n" for record in records))
    return path


# ---------------------------------------------------------------------------------------------------------------
# The shared benchmark files
# ---------------------------------------------------------------------------------------------------------------


@needs_data
@pytest.mark.parametrize(("name", "count"), COUNTS.items(), ids=list(COUNTS))
def test_shared_file_loads_every_record_with_a_problem_and_an_answer(name, count):
    dataset = load_problems(DATA / name)
    assert len(dataset) == count
    assert all(isinstance(problem, str) and problem.strip() for problem in dataset["problem"])
    assert all(isinstance(answer, str) and answer.strip() for answer in dataset["answer"])


@needs_data
def test_math_train_refuses_its_records_without_an_answer_by_default():
    with pytest.raises(ValueError, match=rf"row {MATH_TRAIN_EMPTY_BOX_ROWS[0]}: no gold answer.*on_missing='drop'"):
        load_problems(DATA / MATH_TRAIN)


@needs_data
def test_math_train_drops_its_records_without_an_answer_on_request():
    dataset = load_problems(DATA / MATH_TRAIN, on_missing="drop")
    assert len(dataset) == 7500 - len(MATH_TRAIN_EMPTY_BOX_ROWS)
    assert all(answer.strip() for answer in dataset["answer"])
    assert "train/number_theory/7115.json" not in set(dataset["unique_id"])


@needs_data
def test_math_answer_is_the_last_box_of_the_solution():
    dataset = load_problems(DATA / "math/test.jsonl", limit=1)
    assert dataset[0]["answer"] == "2"
    assert "solution" in dataset.column_names


@needs_data
def test_math500_answer_is_its_answer_field():
    assert load_problems(DATA / "math500/test.jsonl", limit=1)[0]["answer"] == r"\left( 3, \frac{\pi}{2} \right)"


@needs_data
def test_gsm8k_answer_follows_the_hash_marks_and_the_solution_is_kept():
    row = load_problems(DATA / "gsm8k/train.jsonl", limit=1)[0]
    assert row["answer"] == "72"
    assert row["solution"].endswith("#### 72")
    assert row["problem"] == row["question"]


@needs_data
def test_gsm8k_answers_lose_their_thousands_commas():
    answers = load_problems(DATA / "gsm8k/train.jsonl")["answer"]
    assert all(re.fullmatch(r"-?\d+(\.\d+)?", answer) for answer in answers)


@needs_data
def test_olympiadbench_answer_is_the_final_answer_list_without_dollars():
    dataset = load_problems(DATA / "olympiadbench/test.jsonl")
    assert dataset[0]["answer"] == "2"
    assert isinstance(dataset[0]["final_answer"], list)
    assert r"(-\infty, 0) \cup\{1\}" in dataset["answer"]  # from "$(-\infty, 0) \cup\{1\}$."
    # Only prose with math inside and one malformed answer keep their dollars.
    kept = [answer for answer in dataset["answer"] if "$" in answer]
    assert kept == [
        r"$f(x)=a x+b$, where $b$ is an arbitrary integer, and $a$ is an arbitrary positive integer with $\mho(a)=0$",
        "$221,$8$",
    ]


@needs_data
def test_college_math_answer_loses_its_math_delimiters():
    dataset = load_problems(DATA / "college_math/test.jsonl", limit=2)
    assert dataset["answer"] == ["10-4 n", "(45,2),(-10,-9)"]
    assert "license" in dataset.column_names


# ---------------------------------------------------------------------------------------------------------------
# Layouts, keys and inputs (small files)
# ---------------------------------------------------------------------------------------------------------------


def test_gsm8k_layout_strips_thousands_commas(tmp_path):
    path = _write_jsonl(tmp_path / "g.jsonl", [{"question": "How many?", "answer": "Lots.\n#### 1,234,000"}])
    assert load_problems(path)[0]["answer"] == "1234000"


def test_list_answers_are_joined_and_lose_their_dollars(tmp_path):
    record = {"question": "Find all pairs.", "final_answer": ["$(-6,6)$, $(2,6)$"]}
    assert load_problems(_write_jsonl(tmp_path / "o.jsonl", [record]))[0]["answer"] == "(-6,6), (2,6)"


def test_several_list_elements_are_joined_with_commas(tmp_path):
    record = {"question": "Find all x.", "final_answer": ["$1$", "$2$"]}
    assert load_problems(_write_jsonl(tmp_path / "o.jsonl", [record]))[0]["answer"] == "1, 2"


def test_text_with_math_inside_keeps_its_dollars(tmp_path):
    record = {"question": "Where?", "answer": r"$\min$ at $x=-1$"}
    assert load_problems(_write_jsonl(tmp_path / "c.jsonl", [record]))[0]["answer"] == r"$\min$ at $x=-1$"


def test_unknown_layout_error_names_the_missing_field_and_the_columns(tmp_path):
    path = _write_jsonl(tmp_path / "u.jsonl", [{"prompt": "What is 1+1?", "target": "2"}])
    expected = r"problem column.*'problem'.*'question'.*\['prompt', 'target'\].*problem_key="
    with pytest.raises(ValueError, match=expected):
        load_problems(path)


def test_missing_answer_column_error_suggests_answer_key(tmp_path):
    path = _write_jsonl(tmp_path / "u.jsonl", [{"problem": "What is 1+1?", "target": "2"}])
    with pytest.raises(ValueError, match=r"answer column.*'final_answer'.*'answer'.*'solution'.*answer_key="):
        load_problems(path)


def test_explicit_keys_name_the_columns(tmp_path):
    path = _write_jsonl(tmp_path / "u.jsonl", [{"prompt": "What is 1+1?", "target": 2, "id": 9}])
    row = load_problems(path, problem_key="prompt", answer_key="target")[0]
    assert (row["problem"], row["answer"], row["id"]) == ("What is 1+1?", "2", 9)


def test_explicit_key_that_does_not_exist_is_an_error(tmp_path):
    path = _write_jsonl(tmp_path / "u.jsonl", [{"problem": "What is 1+1?", "answer": "2"}])
    with pytest.raises(ValueError, match=r"answer column 'target' not found; columns are \['problem', 'answer'\]"):
        load_problems(path, answer_key="target")


def test_explicit_answer_key_on_a_solution_takes_its_last_box(tmp_path):
    record = {"problem": "What is 1+1?", "answer": "unused", "worked": r"First $\boxed{3}$, no: $\boxed{2}$."}
    assert load_problems(_write_jsonl(tmp_path / "u.jsonl", [record]), answer_key="worked")[0]["answer"] == "2"


def test_limit_keeps_the_first_rows(tmp_path):
    records = [{"problem": f"Problem {i}", "answer": str(i)} for i in range(10)]
    dataset = load_problems(_write_jsonl(tmp_path / "p.jsonl", records), limit=3)
    assert dataset["answer"] == ["0", "1", "2"]


def test_a_dataset_is_accepted_and_its_other_columns_kept():
    dataset = datasets.Dataset.from_dict({"problem": ["1+1?"], "solution": [r"It is $\boxed{2}$."], "level": [3]})
    row = load_problems(dataset)[0]
    assert (row["answer"], row["level"]) == ("2", 3)


def test_a_dataset_dict_is_read_at_the_requested_split():
    splits = datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_dict({"problem": ["a"], "answer": ["1"]}),
            "test": datasets.Dataset.from_dict({"problem": ["b"], "answer": ["2"]}),
        }
    )
    assert load_problems(splits, split="test")["answer"] == ["2"]


def test_a_json_array_file_is_accepted(tmp_path):
    path = tmp_path / "p.json"
    path.write_text(json.dumps([{"problem": "1+1?", "answer": "$2$"}]))
    assert load_problems(path)["answer"] == ["2"]


def test_a_file_that_is_not_json_is_an_error(tmp_path):
    path = tmp_path / "p.csv"
    path.write_text("problem,answer\n1+1?,2\n")
    with pytest.raises(ValueError, match="expected a JSON or JSONL file"):
        load_problems(path)


def test_a_row_without_answer_is_an_error_naming_the_row(tmp_path):
    records = [{"problem": "a", "answer": "1"}, {"problem": "b", "answer": "$ $"}]
    with pytest.raises(ValueError, match=r"row 1: no gold answer found in column 'answer'"):
        load_problems(_write_jsonl(tmp_path / "p.jsonl", records))


def test_a_row_without_problem_is_an_error_naming_the_row(tmp_path):
    records = [{"problem": "a", "answer": "1"}, {"problem": " ", "answer": "2"}]
    with pytest.raises(ValueError, match=r"row 1: empty or missing problem in column 'problem'"):
        load_problems(_write_jsonl(tmp_path / "p.jsonl", records))


def test_rows_without_answer_or_problem_are_dropped_on_request(tmp_path):
    records = [{"problem": "a", "answer": "1"}, {"problem": "b", "answer": None}, {"problem": "", "answer": "3"}]
    dataset = load_problems(_write_jsonl(tmp_path / "p.jsonl", records), on_missing="drop")
    assert dataset["problem"] == ["a"]


def test_an_unknown_missing_policy_is_an_error():
    with pytest.raises(ValueError, match="on_missing"):
        load_problems(datasets.Dataset.from_dict({"problem": ["a"], "answer": ["1"]}), on_missing="skip")


# ---------------------------------------------------------------------------------------------------------------
# Agreement of the loaded gold answers with extract_answer and grade_answer
# ---------------------------------------------------------------------------------------------------------------

# Measured with this sweep (all records): self-agreement 100% everywhere; perturbed answers rejected: MATH train
# 99.99%, MATH test 99.98%, College Math 99.4-99.5%, all others 100%. Thresholds leave a little room.
MIN_SELF_AGREEMENT = 0.995
MIN_REJECTION = {
    MATH_TRAIN: 0.999,
    "math/test.jsonl": 0.999,
    "math500/test.jsonl": 0.995,
    "gsm8k/train.jsonl": 0.999,
    "gsm8k/test.jsonl": 0.999,
    "olympiadbench/test.jsonl": 0.995,
    "college_math/test.jsonl": 0.99,
}

_DIGIT = re.compile(r"\d")
_CHOICE = re.compile(r"^(?:\\text\{)?\(([A-E])\)\}?$")


def _perturb(gold: str) -> str | None:
    """The gold with its stated value changed, or None when it has no digit and is no choice letter.

    A digit of the stated value is bumped (9 -> 0): the first digit after the last `=` or `\\approx` when there is
    one (`\\log_2(32)=5` states 5), else the first digit. A choice letter moves to the next letter.
    """
    start = max(gold.rfind("="), gold.rfind("\\approx")) + 1
    digit = _DIGIT.search(gold, start) or _DIGIT.search(gold)
    if digit:
        i = digit.start()
        return gold[:i] + str((int(gold[i]) + 1) % 10) + gold[i + 1 :]
    choice = _CHOICE.match(gold)
    if choice:
        letter = choice.group(1)
        return gold.replace(f"({letter})", f"({'ABCDEA'['ABCDE'.index(letter) + 1]})")
    return None


def _sentence(answer: str) -> str:
    return f"The answer is \\boxed{{{answer}}}."


@pytest.fixture(scope="module")
def grading_pool() -> Iterator[Pool]:
    # spawn, not fork: the parent has pyarrow/datasets threads running.
    with multiprocessing.get_context("spawn").Pool(2) as pool:
        yield pool


@needs_data
@pytest.mark.parametrize("name", list(MIN_REJECTION))
def test_gold_answers_agree_with_extraction_and_grading(name, grading_pool, capsys):
    golds = load_problems(DATA / name, on_missing="drop")["answer"]
    stated = [(extract_answer(_sentence(gold)), gold) for gold in golds]
    perturbed = [(extract_answer(_sentence(changed)), gold) for gold in golds if (changed := _perturb(gold))]
    self_agreed = grading_pool.starmap(grade_answer, stated, chunksize=64)
    perturbed_accepted = grading_pool.starmap(grade_answer, perturbed, chunksize=16)

    self_agreement = sum(self_agreed) / len(stated)
    rejection = 1 - sum(perturbed_accepted) / len(perturbed)
    with capsys.disabled():
        print(
            f"\n{name}: {len(golds)} records, self-agreement {self_agreement:.4%}, "
            f"perturbation rejection {rejection:.4%} ({len(golds) - len(perturbed)} without a perturbation)"
        )
    misses = [gold for (_, gold), agreed in zip(stated, self_agreed) if not agreed]
    accepted = [pred for (pred, _), wrong in zip(perturbed, perturbed_accepted) if wrong]
    assert self_agreement >= MIN_SELF_AGREEMENT, misses[:20]
    assert rejection >= MIN_REJECTION[name], accepted[:20]


def test_perturbation_changes_the_stated_value():
    assert _perturb(r"\log_{2}(32)=5") == r"\log_{2}(32)=6"
    assert _perturb(r"\cos(e) \approx -0.912") == r"\cos(e) \approx -1.912"
    assert _perturb("19") == "29"
    assert _perturb(r"\text{(E)}") == r"\text{(A)}"
    assert _perturb(r"\pi") is None
