r"""Loading math problems with their gold final answers.

`load_problems` turns a benchmark or training set into a `datasets.Dataset` with a `problem` column and an
`answer` column holding the gold *final* answer as a string, ready for `grading.grade_answer`. Other columns are
kept. Known layouts are detected from the column names:

| layout | problem | gold answer |
|---|---|---|
| GSM8K | `question` | text after the last `####` of `answer`, thousands commas removed |
| MATH | `problem` | last `\boxed{}` of `solution` |
| MATH-500 | `problem` | `answer` |
| OlympiadBench | `question` | `final_answer` (a list: elements joined with ", ") |
| College Math | `question` | `answer` |

Gold answers are resolved the same way whatever the column: a list is joined with ", ", a value with a `####`
line gives the text after it, a value with a `\boxed{}` gives its last box's content, and math delimiters around
the answer are removed (`$x$` -> `x`; `$(1,2)$, $(3,4)$` -> `(1,2), (3,4)`; text with math inside it, such as
`$\min$ at $x=1$`, is kept as it is). When GSM8K's `answer` column is replaced by its final answer, the worked
solution is kept in a `solution` column.

A row without a problem or without a findable answer is an error (`ValueError` naming the row) unless
`on_missing="drop"` asks to skip such rows (with a logged warning naming them): benchmark scores must not
silently lose rows. Two records of the shared MATH train file need it: rows 5529 and 5531
(`train/number_theory/7115.json` and `7117.json`) have an empty `\boxed{}`.

The conversion runs in memory on every call (not through the `datasets` cache, whose key would not change when
the extraction code does).
"""

from __future__ import annotations

import logging
import os
import re
from typing import Any, Literal

import datasets

from rstar_trl.grading import last_boxed

__all__ = ["load_problems"]

logger = logging.getLogger(__name__)

_PROBLEM_COLUMNS = ("problem", "question")
# Preference order: a dedicated final-answer column beats a worked solution.
_ANSWER_COLUMNS = ("final_answer", "answer", "solution")
_JSON_SUFFIXES = (".json", ".jsonl", ".json.gz", ".jsonl.gz")

_MATH_SEGMENT_SPLIT_RE = re.compile(r"(?<!\\)\$\$?")
# What may stand between (and after) math segments of a pure-math answer: `$1$, $2$`, `$1$ and $2$`, `$x$.`
_SEPARATOR_RE = re.compile(r"^[\s,;.]*(?:(?:and|or)[\s,;.]*)?$")
_THOUSANDS_COMMA_RE = re.compile(r"(?<=\d),(?=\d{3}(?!\d))")


def _strip_math_delimiters(answer: str) -> str:
    """Remove `$`/`$$` delimiters when the answer is nothing but math segments and separators between them."""
    pieces = _MATH_SEGMENT_SPLIT_RE.split(answer)
    if len(pieces) < 3 or len(pieces) % 2 == 0:
        return answer  # no delimiters, or unbalanced ones
    prose, math = pieces[0::2], pieces[1::2]
    if not all(_SEPARATOR_RE.match(text) for text in prose):
        return answer
    return ", ".join(segment.strip() for segment in math if segment.strip())


def _gold_answer(value: Any) -> str | None:
    """The gold final answer held by one answer-column value, or None if there is none."""
    if value is None:
        return None
    if isinstance(value, (list, tuple)):
        parts = [part for part in (_gold_answer(item) for item in value) if part]
        return ", ".join(parts) or None
    text = str(value).strip()
    if "####" in text:
        text = text.rsplit("####", 1)[1].strip()
        return _THOUSANDS_COMMA_RE.sub("", text) or None
    if "\\boxed" in text or "\\fbox" in text:
        return last_boxed(text)
    return _strip_math_delimiters(text).strip() or None


def _read(source: str | os.PathLike[str] | datasets.Dataset | datasets.DatasetDict, split: str) -> datasets.Dataset:
    if isinstance(source, datasets.Dataset):
        return source
    if isinstance(source, datasets.DatasetDict):
        return source[split]
    path = os.fspath(source)
    if os.path.isfile(path):
        if not path.endswith(_JSON_SUFFIXES):
            raise ValueError(f"{path}: expected a JSON or JSONL file (one problem per record)")
        return datasets.Dataset.from_json(path)
    # A local folder of data files or a dataset on the Hugging Face Hub.
    return datasets.load_dataset(path, split=split)


def _pick(columns: list[str], explicit: str | None, candidates: tuple[str, ...], what: str) -> str:
    if explicit is not None:
        if explicit not in columns:
            raise ValueError(f"{what} column {explicit!r} not found; columns are {columns}")
        return explicit
    for candidate in candidates:
        if candidate in columns:
            return candidate
    keyword = "problem_key" if what == "problem" else "answer_key"
    raise ValueError(
        f"cannot find the {what} column: none of {list(candidates)} is present; columns are {columns}. "
        f"Pass {keyword}= to name it."
    )


def load_problems(
    path_or_dataset: str | os.PathLike[str] | datasets.Dataset | datasets.DatasetDict,
    split: str = "train",
    problem_key: str | None = None,
    answer_key: str | None = None,
    limit: int | None = None,
    on_missing: Literal["raise", "drop"] = "raise",
) -> datasets.Dataset:
    """Load problems as a Dataset with `problem` and `answer` (gold final answer, str) columns.

    Args:
        path_or_dataset: a JSON/JSONL file, a `datasets.Dataset` or `DatasetDict`, or a name/folder for
            `datasets.load_dataset`.
        split: the split to use for a `DatasetDict`, a folder or a Hub dataset.
        problem_key: column holding the problem text; detected when None.
        answer_key: column holding the gold answer (or a solution ending in `####`/`\\boxed{}`); detected when None.
        limit: keep only the first `limit` rows (counted before any row is dropped).
        on_missing: what to do with a row that has no problem text or no findable answer: "raise" a ValueError
            naming the row, or "drop" it with a logged warning naming the dropped rows.

    Raises:
        ValueError: the problem or answer column cannot be found, or (with on_missing="raise") a row has no problem
            or no answer.
    """
    if on_missing not in ("raise", "drop"):
        raise ValueError(f"on_missing must be 'raise' or 'drop', not {on_missing!r}")
    dataset = _read(path_or_dataset, split)
    columns = list(dataset.column_names)
    problem_column = _pick(columns, problem_key, _PROBLEM_COLUMNS, "problem")
    answer_column = _pick(columns, answer_key, _ANSWER_COLUMNS, "answer")
    if limit is not None:
        dataset = dataset.select(range(min(limit, len(dataset))))
    # Overwriting a worked-solution `answer` column (GSM8K) would lose the solution: keep it under `solution`.
    keep_solution = (
        answer_column == "answer"
        and "solution" not in columns
        and any(isinstance(value, str) and "####" in value for value in dataset[answer_column])
    )

    def convert(row: dict[str, Any], index: int) -> dict[str, Any]:
        problem = row[problem_column]
        answer = _gold_answer(row[answer_column])
        if on_missing == "raise":
            if not isinstance(problem, str) or not problem.strip():
                raise ValueError(
                    f"row {index}: empty or missing problem in column {problem_column!r}; "
                    "pass on_missing='drop' to skip such rows"
                )
            if answer is None:
                raise ValueError(
                    f"row {index}: no gold answer found in column {answer_column!r} "
                    f"(value: {row[answer_column]!r:.200}); pass on_missing='drop' to skip such rows"
                )
        elif not isinstance(problem, str) or not problem.strip():
            problem = None
        converted = {"problem": problem, "answer": answer}
        if keep_solution:
            converted["solution"] = row[answer_column]
        return converted

    # In memory, not through the datasets cache: the cache key would not change when the extraction code does, and
    # a stale cache would serve answers from an older version. Recomputing takes seconds for 10k rows.
    dataset = dataset.map(convert, with_indices=True, keep_in_memory=True, desc="Extracting gold answers")
    if on_missing == "drop":
        missing = [i for i, (p, a) in enumerate(zip(dataset["problem"], dataset["answer"])) if p is None or a is None]
        if missing:
            logger.warning("Dropping %d row(s) without a problem or a gold answer: %s", len(missing), missing)
            dropped = set(missing)
            dataset = dataset.select([i for i in range(len(dataset)) if i not in dropped])
    return dataset
