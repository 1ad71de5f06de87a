r"""Loading math problems with their gold final answers.

`load_problems` turns a benchmark or training set into a `datasets.Dataset` with a `problem` column and an
`answer` column holding the gold *final* answer as a string, ready for `grading.grade_answer`. Other columns are
kept. It reads a local JSON/JSONL file (the offline path), a `datasets.Dataset`/`DatasetDict`, a local data folder,
or a dataset on the Hugging Face Hub.

The benchmarks of the paper (arXiv 2501.04519, §4.1) are presets (`BENCHMARKS`), named by their Hub dataset id
or a short alias, each with its config, splits and fields:

| benchmark | Hub dataset id | config | splits | problem | gold answer |
|---|---|---|---|---|---|
| MATH-500 | `HuggingFaceH4/MATH-500` |  | test | `problem` | `answer` |
| GSM8K | `openai/gsm8k` | `main` | test, train | `question` | `answer` after `####` |
| MATH | `DigitalLearningGmbH/MATH-lighteval` | `default` | test, train | `problem` | `\boxed{}` of `solution` |
| OlympiadBench | `Hothan/OlympiadBench` | `OE_TO_maths_en_COMP` | train | `question` | `final_answer` |
| College Math | `di-zhang-fdu/College_Math_Test` |  | test | `question` | `answer` |
| AIME 2024 | `HuggingFaceH4/aime_2024` |  | train | `problem` | `answer` |
| AIME 2022-2024 | `AI-MO/aimo-validation-aime` |  | train | `problem` | `answer` |
| AMC | `AI-MO/aimo-validation-amc` |  | train | `problem` | `answer` (a number) |

Aliases: `math500`, `gsm8k`, `math`, `olympiadbench`, `college_math`, `aime2024`, `aime`, `amc` (the rows in order).

The first split listed is the default (`split=None`). A benchmark published as a single split is read whatever
split is asked for (AIME's only Hub split is called "train"; a warning says so). A preset is also recognised in a
local folder whose path ends with its Hub id, such as a copy of the Hub repository made with
`hf download openai/gsm8k --repo-type dataset --local-dir data/openai/gsm8k` (then `load_problems("data/openai/gsm8k")`
reads config `main`, offline). An alias stands for its preset only when no file or folder of that name exists.

Other sources are read by column names:

| layout | problem | gold answer |
|---|---|---|
| GSM8K | `question` | text after the last `####` of `answer`, thousands commas removed |
| MATH | `problem` | last `\boxed{}` of `solution` |
| MATH-500 | `problem` | `answer` |
| OlympiadBench | `question` | `final_answer` (a list: elements joined with ", ") |
| College Math | `question` | `answer` |

Gold answers are resolved the same way whatever the column: a list is joined with ", ", a value with a `####`
line gives the text after it, a value with a `\boxed{}` gives its last box's content, a whole number stored as a
float is written as an integer (`27.0` -> `27`), and math delimiters around the answer are removed (`$x$` -> `x`;
`$(1,2)$, $(3,4)$` -> `(1,2), (3,4)`; text with math inside it, such as `$\min$ at $x=1$`, is kept as it is). When
GSM8K's `answer` column is replaced by its final answer, the worked solution is kept in a `solution` column.

A row without a problem or without a findable answer is an error (`ValueError` naming the row) unless
`on_missing="drop"` asks to skip such rows (with a logged warning naming them): benchmark scores must not
silently lose rows. Two records of the MATH train split need it: rows 5529 and 5531
(`train/number_theory/7115.json` and `7117.json`) have an empty `\boxed{}`.

The conversion runs in memory on every call (not through the `datasets` cache, whose key would not change when
the extraction code does).
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from typing import Any, Literal

import datasets

from rstar_trl.grading import last_boxed

__all__ = ["BENCHMARKS", "Benchmark", "find_benchmark", "load_problems"]

logger = logging.getLogger(__name__)

_PROBLEM_COLUMNS = ("problem", "question")
# Preference order: a dedicated final-answer column beats a worked solution.
_ANSWER_COLUMNS = ("final_answer", "answer", "solution")
_JSON_SUFFIXES = (".json", ".jsonl", ".json.gz", ".jsonl.gz")

_MATH_SEGMENT_SPLIT_RE = re.compile(r"(?<!\\)\$\$?")
# What may stand between (and after) math segments of a pure-math answer: `$1$, $2$`, `$1$ and $2$`, `$x$.`
_SEPARATOR_RE = re.compile(r"^[\s,;.]*(?:(?:and|or)[\s,;.]*)?$")
_THOUSANDS_COMMA_RE = re.compile(r"(?<=\d),(?=\d{3}(?!\d))")


@dataclass(frozen=True)
class Benchmark:
    """A benchmark on the Hugging Face Hub and how `load_problems` reads it.

    Args:
        name: the benchmark's usual name.
        hub_id: the Hub dataset id.
        config: the dataset config (subset) to load; None for a dataset with only the default one.
        splits: the splits it is published with; the first is read when no split is asked for.
        problem_key: column of the problem text.
        answer_key: column of the gold answer (or of a solution that ends with it).
        alias: a short name that stands for the preset.
    """

    name: str
    hub_id: str
    config: str | None
    splits: tuple[str, ...]
    problem_key: str
    answer_key: str
    alias: str


# Ids, configs, splits and fields as the datasets' cards on the Hub give them.
# fmt: off
BENCHMARKS: dict[str, Benchmark] = {
    benchmark.hub_id: benchmark
    for benchmark in (
        Benchmark("MATH-500", "HuggingFaceH4/MATH-500", None, ("test",), "problem", "answer", "math500"),
        Benchmark("GSM8K", "openai/gsm8k", "main", ("test", "train"), "question", "answer", "gsm8k"),
        Benchmark("MATH", "DigitalLearningGmbH/MATH-lighteval", "default", ("test", "train"), "problem", "solution",
                  "math"),
        Benchmark("OlympiadBench", "Hothan/OlympiadBench", "OE_TO_maths_en_COMP", ("train",), "question",
                  "final_answer", "olympiadbench"),
        Benchmark("College Math", "di-zhang-fdu/College_Math_Test", None, ("test",), "question", "answer",
                  "college_math"),
        Benchmark("AIME 2024", "HuggingFaceH4/aime_2024", None, ("train",), "problem", "answer", "aime2024"),
        Benchmark("AIME 2022-2024", "AI-MO/aimo-validation-aime", None, ("train",), "problem", "answer", "aime"),
        Benchmark("AMC", "AI-MO/aimo-validation-amc", None, ("train",), "problem", "answer", "amc"),
    )
}
# fmt: on


def find_benchmark(name: str | os.PathLike[str]) -> Benchmark | None:
    """The preset `name` stands for: a Hub id (any case), an alias when no file or folder of that name exists, or
    a local folder whose path ends with a Hub id (a downloaded copy of the repository). None otherwise."""
    text = os.fspath(name).rstrip("/").replace(os.sep, "/")
    for benchmark in BENCHMARKS.values():
        hub_id = benchmark.hub_id.lower()
        if text.lower() == hub_id:
            return benchmark
        if text.lower().endswith("/" + hub_id) and os.path.isdir(name):
            return benchmark
        if text.lower() == benchmark.alias and not os.path.exists(name):
            return benchmark
    return None


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
    if isinstance(value, float) and value.is_integer():
        return str(int(value))  # AMC's answers are stored as floats (27.0)
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


def _read(
    source: str | os.PathLike[str] | datasets.Dataset | datasets.DatasetDict, split: str | None
) -> tuple[datasets.Dataset, Benchmark | None]:
    if isinstance(source, datasets.Dataset):
        return source, None
    if isinstance(source, datasets.DatasetDict):
        return source[split or "train"], None
    path = os.fspath(source)
    if os.path.isfile(path):
        if not path.endswith(_JSON_SUFFIXES):
            raise ValueError(f"{path}: expected a JSON or JSONL file (one problem per record)")
        return datasets.Dataset.from_json(path), None
    benchmark = find_benchmark(path)
    if benchmark is None:
        # A local folder of data files or a dataset on the Hugging Face Hub.
        return datasets.load_dataset(path, split=split or "train"), None
    if split is None:
        split = benchmark.splits[0]
    elif split not in benchmark.splits:
        if len(benchmark.splits) > 1:
            raise ValueError(f"{benchmark.hub_id} has no split {split!r}; its splits are {list(benchmark.splits)}")
        logger.warning(
            "%s (%s) is published as one split, %r: reading it for split=%r",
            benchmark.hub_id, benchmark.name, benchmark.splits[0], split,
        )  # fmt: skip
        split = benchmark.splits[0]
    local = os.path.isdir(path)
    try:
        return datasets.load_dataset(path if local else benchmark.hub_id, benchmark.config, split=split), benchmark
    except Exception as exc:
        if not local:
            exc.add_note(
                f"{benchmark.hub_id} ({benchmark.name}) could not be read from the Hub or the local datasets cache. "
                "Offline, pass a local JSON/JSONL file or a local copy of the dataset repository (docs/install.md)."
            )
        raise


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
    split: str | None = None,
    problem_key: str | None = None,
    answer_key: str | None = None,
    limit: int | None = None,
    on_missing: Literal["raise", "drop"] = "raise",
) -> datasets.Dataset:
    """Load problems as a Dataset with `problem` and `answer` (gold final answer, str) columns.

    Args:
        path_or_dataset: a JSON/JSONL file, a `datasets.Dataset` or `DatasetDict`, a benchmark preset (a Hub id
            or alias of `BENCHMARKS`, or a local copy of its repository), or any other name/folder for
            `datasets.load_dataset`.
        split: the split to use for a `DatasetDict`, a folder or a Hub dataset. Default (None): a preset's
            evaluation split (its first), "train" otherwise.
        problem_key: column holding the problem text; default: the preset's, else detected.
        answer_key: column holding the gold answer (or a solution ending in `####`/`\\boxed{}`); default: the
            preset's, else detected.
        limit: keep only the first `limit` rows (counted before any row is dropped).
        on_missing: what to do with a row that has no problem text or no findable answer: "raise" a ValueError
            naming the row, or "drop" it with a logged warning naming the dropped rows.

    Raises:
        ValueError: the problem or answer column cannot be found, or (with on_missing="raise") a row has no problem
            or no answer.
    """
    if on_missing not in ("raise", "drop"):
        raise ValueError(f"on_missing must be 'raise' or 'drop', not {on_missing!r}")
    dataset, benchmark = _read(path_or_dataset, split)
    if benchmark is not None:
        problem_key = problem_key or benchmark.problem_key
        answer_key = answer_key or benchmark.answer_key
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
    # The new columns are strings even where they replace a column of another type (AMC's float answers).
    features = dataset.features.copy()
    for column in ("problem", "answer", *(("solution",) if keep_solution else ())):
        features[column] = datasets.Value("string")
    dataset = dataset.map(
        convert, with_indices=True, keep_in_memory=True, features=features, desc="Extracting gold answers"
    )
    if on_missing == "drop":
        missing = [i for i, (p, a) in enumerate(zip(dataset["problem"], dataset["answer"])) if p is None or a is None]
        if missing:
            logger.warning("Dropping %d row(s) without a problem or a gold answer: %s", len(missing), missing)
            dropped = set(missing)
            dataset = dataset.select([i for i in range(len(dataset)) if i not in dropped])
    return dataset
