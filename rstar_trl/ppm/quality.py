"""How good is a process preference model, before search spends GPU days on it: its accuracy on held-out preference
pairs, and its first-error localisation on data in ProcessBench's layout (arXiv 2412.06559).

Pair accuracy. The PPM is trained on step pairs that share a prefix (`build_preference_pairs`: columns `prompt`,
`chosen`, `rejected`) with the pairwise Bradley-Terry loss of rStar-Math (arXiv 2501.04519 §3.3, Eq. 4), which
rewards a chosen step scored above its rejected one. `pair_accuracy` scores both sides of every pair exactly as
`PPMTrainer` read them, `ppm_text(prompt, step)` through the checkpoint's tokenizer, and counts the pairs whose chosen
side scores higher, with a 95% Wilson interval. It measures something only on pairs the PPM was NOT trained on: the
pairs of another round (searched by another policy), another split, or a slice (`load_examples(..., split=
"train[80%:]")`) of pairs held out of training; `exclude` drops pairs that also appear in the training pairs.

First-error localisation (ProcessBench, arXiv 2412.06559 §4). A row holds a `problem`, its solution as a list of
`steps`, and `label`, the 0-based index of the first wrong step, or -1 when every step is right. As the ProcessBench
paper does for PRMs, every prefix `steps[:i+1]` is scored, and the predicted first error is the first step whose
value falls strictly below a threshold (-1 when none does). Accuracy on the erroneous rows (label != -1) is the share
predicted exactly; accuracy on the correct rows (label == -1) the share predicted -1; F1 is their harmonic mean. Our
PPM's value is tanh of a score trained with Eq. 4, so its sign (threshold 0) is the natural cut; an F1 sweep over
thresholds is also reported, but a threshold chosen on the evaluated data itself is an optimistic oracle, not a
result: choose it on one dataset and apply it to another.

`make_tiny_processbench` writes such rows from the tiny task's problems (`rstar_trl.tiny`), their template solutions
in the policy's step format, with a wrong step injected into some of them; `python -m rstar_trl.ppm
tiny-processbench --output FILE` writes them to a JSONL file. `recipes/eval_ppm.py` runs both evaluations and writes
the report (results.json, results.md and optionally a section of the PPM's model card).
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import replace
from typing import Any

import datasets
from tqdm.auto import tqdm

from ..format import ANSWER_END, CODE_END, OUTPUT_END, STEP_END, Step, build_program, format_prompt, render_step
from ..hub import put_card_section
from ..stats import wilson_interval
from .scorer import PPMScorer

__all__ = [
    "RAW_PROMPT",
    "TIE_RULES",
    "detect_step_separator",
    "first_error_prediction",
    "join_steps",
    "load_examples",
    "make_tiny_processbench",
    "oracle_threshold",
    "pair_accuracy",
    "processbench_metrics",
    "processbench_report",
    "quality_markdown",
    "score_processbench",
    "threshold_sweep",
    "update_card_section",
    "validate_pairs",
    "validate_processbench",
    "write_quality_report",
]

logger = logging.getLogger(__name__)

# A prompt template that leaves the question as it is: with it, a scorer's text is `ppm_text(question, solution)`,
# so a `PPMScorer` can be handed prompts that are already formatted (a pair's `prompt`, which holds the earlier steps).
RAW_PROMPT = "{question}"
TIE_RULES = ("half", "wrong")
EXCLUDE_RULES = ("pair", "question")
PAIR_COLUMNS = ("prompt", "chosen", "rejected")
PROCESSBENCH_COLUMNS = ("problem", "steps", "label")
# A step of our own format ends with one of these (an intermediate step with <end_of_step>, the final one with
# <end_of_code>, its output block, or its answer block): such steps are concatenated as written.
_STEP_ENDINGS = (STEP_END, CODE_END, OUTPUT_END, ANSWER_END)
PLAIN_STEP_SEPARATOR = "\n\n"
# The default threshold grid of the F1 sweep: -0.95, -0.90, ..., 0.95 (values lie in [-1, 1]).
DEFAULT_THRESHOLD_GRID = tuple(round(-0.95 + 0.05 * i, 2) for i in range(39))
ORACLE_NOTE = (
    "chosen on the evaluated data itself: an optimistic oracle, not a result (choose a threshold on other data, "
    "e.g. with --threshold_from)"
)


# -- reading the data ---------------------------------------------------------------------------------------------


def _looks_local(source: str) -> bool:
    """Whether a name that does not exist is meant as a local path (a Hub id is "org/name", without a suffix)."""
    return source.startswith((".", "/", "~")) or source.count("/") > 1 or source.endswith((".json", ".jsonl"))


def _select_split(splits: Mapping[str, datasets.Dataset], split: str | None, source: str) -> datasets.Dataset:
    """One split of `splits`, with the `datasets` slice syntax ("train", "train[:100]", "test[80%:]")."""
    if split is None:
        if len(splits) == 1:
            return next(iter(splits.values()))
        raise ValueError(f"{source} has the splits {sorted(splits)}: choose one with the split setting")
    try:
        instructions = datasets.ReadInstruction.from_spec(split).to_absolute({k: len(v) for k, v in splits.items()})
    except (ValueError, AssertionError) as exc:
        raise ValueError(f"{source}: bad split {split!r}: {exc}") from exc
    parts = [splits[i.splitname].select(range(i.from_, i.to)) for i in instructions]
    return parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)


def load_examples(
    source: str | datasets.Dataset, split: str | None = None, limit: int | None = None
) -> datasets.Dataset:
    """Rows to evaluate on, from wherever they are.

    Args:
        source: a `datasets.Dataset`; a dataset folder a round saved (`rstar_trl.hub.save_dataset_folder`, e.g.
            `runs/tiny/round_2/pairs`); a folder saved with `Dataset.save_to_disk`; a JSON, JSONL or parquet file;
            or a Hub dataset id (e.g. "Qwen/ProcessBench").
        split: which split, in the `datasets` syntax, slices included ("train[80%:]"). A local file or round folder
            has one split, "train". Default: the only split; a source with several needs one.
        limit: keep the first `limit` rows (after the split).

    Raises:
        FileNotFoundError: a local path that does not exist.
        ValueError: an unknown split, or a file of another kind.
    """
    if isinstance(source, datasets.Dataset):
        dataset = _select_split({"train": source}, split, "the dataset") if split else source
    elif os.path.isfile(source):
        if source.endswith((".json", ".jsonl")):
            dataset = datasets.Dataset.from_json(source)
        elif source.endswith(".parquet"):
            dataset = datasets.Dataset.from_parquet(source)
        else:
            raise ValueError(f"{source}: expected a JSON, JSONL or parquet file, a dataset folder or a Hub id")
        dataset = _select_split({"train": dataset}, split, source) if split else dataset
    elif os.path.isdir(source):
        from ..hub import load_dataset_folder

        if os.path.isfile(os.path.join(source, "data", "train-00000-of-00001.parquet")):
            splits = {"train": load_dataset_folder(source)}
        elif os.path.isfile(os.path.join(source, "dataset_dict.json")) or os.path.isfile(
            os.path.join(source, "state.json")
        ):
            loaded = datasets.load_from_disk(source)
            splits = dict(loaded) if isinstance(loaded, datasets.DatasetDict) else {"train": loaded}
        else:
            splits = dict(datasets.load_dataset(source))
        dataset = _select_split(splits, split, source)
    elif _looks_local(source):
        raise FileNotFoundError(f"{source} does not exist")
    else:  # a Hub dataset id
        try:
            loaded = datasets.load_dataset(source, split=split)
        except ValueError as exc:  # e.g. an unknown split; the message lists the known ones
            raise ValueError(f"{source}: {exc}") from exc
        dataset = _select_split(dict(loaded), None, source) if isinstance(loaded, datasets.DatasetDict) else loaded
    if limit is not None:
        if limit < 1:
            raise ValueError(f"limit must be >= 1 (or None for all rows), got {limit}")
        dataset = dataset.select(range(min(limit, len(dataset))))
    return dataset


def _missing_columns(dataset: datasets.Dataset, needed: Sequence[str], what: str, source: str) -> None:
    missing = [c for c in needed if c not in dataset.column_names]
    if missing:
        raise ValueError(
            f"{source}: {what} need the columns {list(needed)}; missing {missing} (columns: {dataset.column_names})"
        )


def _row_name(row: Mapping, index: int) -> str:
    return f"row {index}" + (f" (id {row['id']!r})" if row.get("id") not in (None, "") else "")


def validate_pairs(pairs: datasets.Dataset, source: str = "the pairs") -> None:
    """Check preference pairs: columns `prompt`, `chosen`, `rejected`, plain text, no empty step. The first bad row
    raises a ValueError naming it, its column and the problem."""
    _missing_columns(pairs, PAIR_COLUMNS, "preference pairs", source)
    for index, row in enumerate(pairs.select_columns(list(PAIR_COLUMNS))):
        for column in PAIR_COLUMNS:
            if not isinstance(row[column], str):
                raise ValueError(
                    f"{source}: {_row_name(row, index)}: {column!r} must be plain text, got "
                    f"{type(row[column]).__name__} (render conversational data with the chat template first)"
                )
        for column in ("chosen", "rejected"):
            if not row[column].strip():
                raise ValueError(f"{source}: {_row_name(row, index)}: the {column!r} step is empty")


def validate_processbench(rows: datasets.Dataset, source: str = "the ProcessBench-layout data") -> None:
    """Check rows in ProcessBench's layout: a non-empty `problem`, a non-empty list of non-empty `steps`, and an
    integer `label` in [-1, len(steps) - 1] (-1: every step is right; else the 0-based index of the first wrong
    step). The first bad row raises a ValueError naming it, its column and the problem."""
    _missing_columns(rows, PROCESSBENCH_COLUMNS, "ProcessBench-layout rows", source)
    if len(rows) == 0:
        raise ValueError(f"{source}: no rows")
    for index, row in enumerate(rows):
        name = f"{source}: {_row_name(row, index)}"
        if not isinstance(row["problem"], str) or not row["problem"].strip():
            raise ValueError(f"{name}: empty or missing 'problem'")
        steps = row["steps"]
        if not isinstance(steps, list) or not steps:
            raise ValueError(f"{name}: 'steps' must be a non-empty list of strings, got {steps!r:.100}")
        for i, step in enumerate(steps):
            if not isinstance(step, str) or not step.strip():
                raise ValueError(f"{name}: step {i} of 'steps' is empty or not a string ({step!r:.100})")
        label = row["label"]
        if isinstance(label, bool) or not isinstance(label, int):
            raise ValueError(f"{name}: 'label' must be an integer, got {label!r}")
        if not -1 <= label < len(steps):
            raise ValueError(
                f"{name}: 'label' {label} is out of range: -1 (all steps right) or the 0-based index of the first "
                f"wrong step, 0..{len(steps) - 1} for its {len(steps)} steps"
            )


# -- scoring ------------------------------------------------------------------------------------------------------


def _template(prompt_template: str) -> str:
    from ..search.generator import PROMPT_TEMPLATES

    template = PROMPT_TEMPLATES.get(prompt_template, prompt_template)
    if "{question}" not in template:
        raise ValueError(
            f"prompt_template must be one of {sorted(PROMPT_TEMPLATES)} or contain '{{question}}', got "
            f"{prompt_template!r}"
        )
    return template


def _question(prompt: str, template: str, where: str) -> str:
    """The question in a prompt built as `format_prompt(question, template)` + earlier steps."""
    head, tail = template.split("{question}", 1)
    end = prompt.find(tail, len(head)) if tail else len(prompt)
    if not prompt.startswith(head) or end < 0:
        raise ValueError(f"{where}: the prompt was not built with the prompt template {template!r:.80}")
    return prompt[len(head) : end]


class _RawPrompts:
    """Make a `PPMScorer` read the questions it is given as whole prompts for the duration of a `with` block (its
    `prompt_template` is restored afterwards); any other scorer is left as it is."""

    def __init__(self, scorer):
        self.scorer = scorer
        self.saved = scorer.prompt_template if isinstance(scorer, PPMScorer) else None

    def __enter__(self):
        if self.saved is not None:
            self.scorer.prompt_template = RAW_PROMPT
        return self.scorer

    def __exit__(self, *exc) -> None:
        if self.saved is not None:
            self.scorer.prompt_template = self.saved


def _chunks(n: int, size: int) -> Iterator[range]:
    if size < 1:
        raise ValueError(f"rows per call must be >= 1, got {size}")
    for start in range(0, n, size):
        yield range(start, min(n, start + size))


def _rate(correct: float, n: int) -> dict[str, Any]:
    """An accuracy with its 95% Wilson interval (None when there is nothing to count)."""
    if n == 0:
        return {"accuracy": None, "ci95": None}
    return {"accuracy": correct / n, "ci95": list(wilson_interval(correct, n))}


def pair_accuracy(
    scorer,
    pairs: datasets.Dataset,
    ties: str = "half",
    exclude: datasets.Dataset | None = None,
    exclude_by: str = "pair",
    prompt_template: str = "policy",
    rows_per_call: int = 64,
    compare: str = "raw",
    progress: bool = True,
    source: str = "the pairs",
) -> dict[str, Any]:
    """The share of preference pairs whose chosen step the PPM scores above the rejected one, with its 95% Wilson
    interval.

    Each side is scored as `PPMTrainer` trained on it: the text `ppm_text(prompt, step)`, the pair's `prompt` (the
    question prompt and the earlier steps) followed by the step, valued at its last token. The chosen and rejected
    texts of `rows_per_call` pairs go to the scorer in one batched call. Pairs whose two steps are the same text are
    dropped (training drops them too) and counted. A `kind` column (`build_preference_pairs`: "step" or "final")
    gives a breakdown.

    Args:
        scorer: a `PPMScorer` (`TransformersPPMScorer`, `VLLMPPMScorer`): it reads each pair's prompt as it is
            (its `prompt_template` is set to `RAW_PROMPT` for the call). Any other object with `score(questions,
            partial_solutions)` is handed the prompts as questions.
        pairs: rows with `prompt`, `chosen`, `rejected` (plain text). They measure something only if the PPM was
            not trained on them (another round's pairs, a held-out split).
        ties: "half" (a tie counts as half a correct pair) or "wrong" (as a wrong one). Ties are also counted.
        exclude: pairs the PPM was trained on; what matches them is dropped and counted (see `exclude_by`).
        exclude_by: "pair": drop a pair with the same prompt and the same two steps as a pair of `exclude` (either
            way round); "question": drop every pair whose question is one of `exclude`'s questions (the strict
            reading of held-out when rounds search the same problems), the question being read out of the prompt
            with `prompt_template`.
        prompt_template: "policy", "few_shot" or a template with a `{question}` field: the one the pairs' prompts
            were built with (read only with `exclude_by="question"`).
        rows_per_call: pairs per scorer call.
        compare: "raw": compare the raw scores r when the scorer gives them (`raw_scores`), else the values;
            "value": compare the values tanh(r / scale). Values are a monotone function of r, but saturate at +-1
            in float precision, which turns large wins into ties.
        progress: show a progress bar.
        source: the data's name, for error messages.

    Returns:
        A dict: `num_pairs` (evaluated), `num_prompts` (distinct prompts among them), `read`, `excluded`,
        `excluded_by`, `dropped_identical`, `wins`, `tied`, `losses`, `ties`, `compared` ("raw score" or "value"),
        `accuracy`, `ci95` ([low, high]; it treats pairs as independent, which pairs sharing a question are not),
        `accuracy_if_ties_wrong`, `mean_margin` (mean chosen minus rejected score), `by_kind` (the same counts per
        `kind`, if any) and `scores` ([chosen, rejected] per evaluated pair, in order).

    Raises:
        ValueError: missing columns, a non-text or empty step, an unknown `ties` or `compare`, or no pairs left.
    """
    if ties not in TIE_RULES:
        raise ValueError(f"ties must be one of {TIE_RULES}, got {ties!r}")
    if exclude_by not in EXCLUDE_RULES:
        raise ValueError(f"exclude_by must be one of {EXCLUDE_RULES}, got {exclude_by!r}")
    if compare not in ("raw", "value"):
        raise ValueError(f"compare must be 'raw' or 'value', got {compare!r}")
    validate_pairs(pairs, source)
    prompts, chosen, rejected = pairs["prompt"], pairs["chosen"], pairs["rejected"]
    excluded_keys: set[tuple[str, ...]] = set()
    template = _template(prompt_template)

    def key(i: int) -> tuple[str, ...]:
        if exclude_by == "question":
            return (_question(prompts[i], template, f"{source}: row {i}"),)
        return prompts[i], chosen[i], rejected[i]

    if exclude is not None:
        _missing_columns(exclude, PAIR_COLUMNS, "the pairs to exclude", "exclude")
        for i, (p, c, r) in enumerate(zip(exclude["prompt"], exclude["chosen"], exclude["rejected"])):
            if exclude_by == "question":
                excluded_keys.add((_question(p, template, f"exclude: row {i}"),))
            else:
                excluded_keys |= {(p, c, r), (p, r, c)}
    kinds = pairs["kind"] if "kind" in pairs.column_names else None
    keep, excluded, identical = [], 0, 0
    for i in range(len(pairs)):
        if excluded_keys and key(i) in excluded_keys:
            excluded += 1
        elif chosen[i] == rejected[i]:
            identical += 1
        else:
            keep.append(i)
    if not keep:
        raise ValueError(
            f"{source}: no pairs left to evaluate ({len(pairs)} read, {excluded} excluded as training pairs, "
            f"{identical} with identical steps)"
        )
    use_raw = compare == "raw" and callable(getattr(scorer, "raw_scores", None))
    score_fn = scorer.raw_scores if use_raw else scorer.score
    scores: list[list[float]] = []
    with _RawPrompts(scorer), tqdm(total=len(keep), desc="Scoring pairs", unit="pair", disable=not progress) as bar:
        for chunk in _chunks(len(keep), rows_per_call):
            rows = [keep[j] for j in chunk]
            questions = [prompts[i] for i in rows] * 2
            steps = [chosen[i] for i in rows] + [rejected[i] for i in rows]
            out = list(score_fn(questions, steps))
            if len(out) != len(steps):
                raise ValueError(f"the scorer returned {len(out)} scores for {len(steps)} texts")
            scores += [[float(out[j]), float(out[j + len(rows)])] for j in range(len(rows))]
            bar.update(len(rows))
    result = {
        "num_pairs": len(keep),
        "num_prompts": len({prompts[i] for i in keep}),
        "read": len(pairs),
        "excluded": excluded,
        "excluded_by": exclude_by if exclude is not None else None,
        "dropped_identical": identical,
        "ties": ties,
        "compared": "raw score" if use_raw else "value",
        **_pair_counts(scores, ties),
    }
    if kinds is not None:
        groups: dict[str, list[list[float]]] = {}
        for i, pair_scores in zip(keep, scores):
            groups.setdefault(str(kinds[i]), []).append(pair_scores)
        result["by_kind"] = {kind: _pair_counts(group, ties) for kind, group in sorted(groups.items())}
    result["scores"] = scores
    return result


def _pair_counts(scores: Sequence[Sequence[float]], ties: str) -> dict[str, Any]:
    wins = sum(c > r for c, r in scores)
    tied = sum(c == r for c, r in scores)
    losses = len(scores) - wins - tied
    correct = wins + (0.5 * tied if ties == "half" else 0)
    rate = _rate(correct, len(scores))
    return {
        "n": len(scores),
        "wins": wins,
        "tied": tied,
        "losses": losses,
        "accuracy": rate["accuracy"],
        "ci95": rate["ci95"],
        "accuracy_if_ties_wrong": wins / len(scores) if scores else None,
        "mean_margin": sum(c - r for c, r in scores) / len(scores) if scores else None,
    }


def detect_step_separator(steps_of_rows: Sequence[Sequence[str]]) -> str:
    """How steps are joined into a partial solution: "" (concatenated as written) when every step is in our own
    format (it ends with a step marker: `<end_of_step>`, `<end_of_code>`, an output or an answer block, so it already
    carries its line breaks), else "\\n\\n" (plain-text steps such as ProcessBench's paragraphs)."""
    ours = all(step.rstrip().endswith(_STEP_ENDINGS) for steps in steps_of_rows for step in steps)
    return "" if ours else PLAIN_STEP_SEPARATOR


def join_steps(steps: Sequence[str], separator: str) -> str:
    """The partial solution made of `steps` (all of them): joined with `separator`, nothing after the last one."""
    return separator.join(steps)


def score_processbench(
    scorer,
    rows: datasets.Dataset,
    prompt_template: str = "policy",
    step_separator: str | None = None,
    rows_per_call: int = 16,
    progress: bool = True,
) -> tuple[list[list[float]], str]:
    """The PPM's value of every prefix `steps[:i+1]` of every row (ProcessBench's protocol for PRMs).

    A prefix is read as the search reads a partial solution: the question formatted with `prompt_template`, then
    the steps so far joined with `step_separator`. All prefixes of `rows_per_call` rows go to the scorer in one
    batched call.

    Args:
        scorer: a `PPMScorer` (its `prompt_template` is set to `RAW_PROMPT` for the call: the prompt is formatted
            here) or any object with `score(questions, partial_solutions)`, handed the formatted prompts.
        rows: rows in ProcessBench's layout (checked with `validate_processbench`).
        prompt_template: "policy", "few_shot" or a template with a `{question}` field: the prompt the PPM was
            trained with.
        step_separator: None: `detect_step_separator` ("" for steps in our format, "\\n\\n" for plain text).
        rows_per_call: rows per scorer call.
        progress: show a progress bar.

    Returns:
        (values, separator): one list of step values per row, and the separator used.
    """
    template = _template(prompt_template)
    validate_processbench(rows)
    problems, steps_of_rows = rows["problem"], rows["steps"]
    separator = detect_step_separator(steps_of_rows) if step_separator is None else step_separator
    values: list[list[float]] = []
    with _RawPrompts(scorer), tqdm(total=len(rows), desc="Scoring prefixes", unit="row", disable=not progress) as bar:
        for chunk in _chunks(len(rows), rows_per_call):
            questions, partials = [], []
            for i in chunk:
                prompt = format_prompt(problems[i], template)
                for k in range(len(steps_of_rows[i])):
                    questions.append(prompt)
                    partials.append(join_steps(steps_of_rows[i][: k + 1], separator))
            out = list(scorer.score(questions, partials))
            if len(out) != len(partials):
                raise ValueError(f"the scorer returned {len(out)} values for {len(partials)} texts")
            start = 0
            for i in chunk:
                values.append([float(v) for v in out[start : start + len(steps_of_rows[i])]])
                start += len(steps_of_rows[i])
            bar.update(len(chunk))
    return values, separator


# -- the ProcessBench protocol --------------------------------------------------------------------------------------


def first_error_prediction(values: Sequence[float], threshold: float) -> int:
    """The predicted first wrong step: the 0-based index of the first step whose value is strictly below
    `threshold`; -1 (no error) when none is. A value equal to the threshold counts as right."""
    for index, value in enumerate(values):
        if value < threshold:
            return index
    return -1


def processbench_metrics(labels: Sequence[int], predictions: Sequence[int]) -> dict[str, Any]:
    """ProcessBench's scores (arXiv 2412.06559 §4) of first-error predictions against labels (-1: no error).

    Returns:
        A dict: `num_erroneous`, `error_correct` (erroneous rows whose first error is predicted exactly),
        `error_acc`, `error_ci95`, `num_correct`, `correct_correct` (correct rows predicted -1), `correct_acc`,
        `correct_ci95`, `f1` (the harmonic mean of the two accuracies: 0 when either is 0, None when a side has no
        rows), and the misses on erroneous rows: `early` (an error predicted before the real one), `late` (after it)
        and `missed` (none predicted).
    """
    if len(labels) != len(predictions):
        raise ValueError(f"got {len(labels)} labels but {len(predictions)} predictions")
    erroneous = [(label, pred) for label, pred in zip(labels, predictions) if label != -1]
    correct = [pred for label, pred in zip(labels, predictions) if label == -1]
    error_correct = sum(pred == label for label, pred in erroneous)
    correct_correct = sum(pred == -1 for pred in correct)
    error = _rate(error_correct, len(erroneous))
    right = _rate(correct_correct, len(correct))
    return {
        "num_erroneous": len(erroneous),
        "error_correct": error_correct,
        "error_acc": error["accuracy"],
        "error_ci95": error["ci95"],
        "num_correct": len(correct),
        "correct_correct": correct_correct,
        "correct_acc": right["accuracy"],
        "correct_ci95": right["ci95"],
        "f1": _harmonic_mean(error["accuracy"], right["accuracy"]),
        "early": sum(0 <= pred < label for label, pred in erroneous),
        "late": sum(pred > label for label, pred in erroneous),
        "missed": sum(pred == -1 for _, pred in erroneous),
    }


def _harmonic_mean(a: float | None, b: float | None) -> float | None:
    if a is None or b is None:
        return None
    return 0.0 if a + b == 0 else 2 * a * b / (a + b)


def threshold_sweep(
    labels: Sequence[int], values: Sequence[Sequence[float]], thresholds: Sequence[float] = DEFAULT_THRESHOLD_GRID
) -> list[dict[str, Any]]:
    """`processbench_metrics` at every threshold of `thresholds` (in the order given): dicts with `threshold`,
    `error_acc`, `correct_acc` and `f1`."""
    sweep = []
    for threshold in thresholds:
        metrics = processbench_metrics(labels, [first_error_prediction(v, threshold) for v in values])
        sweep.append({"threshold": float(threshold), **{k: metrics[k] for k in ("error_acc", "correct_acc", "f1")}})
    return sweep


def oracle_threshold(sweep: Sequence[Mapping[str, Any]]) -> dict[str, Any] | None:
    """The entry of a `threshold_sweep` with the highest F1 (among equals, the lowest threshold); None when no F1
    is defined. Chosen on the data that was swept: an optimistic oracle, not a result."""
    defined = [entry for entry in sweep if entry["f1"] is not None]
    if not defined:
        return None
    best = max(defined, key=lambda entry: (entry["f1"], -entry["threshold"]))
    return {**best, "note": ORACLE_NOTE}


def processbench_report(
    labels: Sequence[int],
    values: Sequence[Sequence[float]],
    threshold: float = 0.0,
    thresholds: Sequence[float] = DEFAULT_THRESHOLD_GRID,
) -> dict[str, Any]:
    """The first-error report of step values: the scores at `threshold` (`processbench_metrics` plus `threshold`),
    the F1 `sweep` over `thresholds` and its `oracle` (see `oracle_threshold`), and the per-row `predictions`."""
    if len(labels) != len(values):
        raise ValueError(f"got {len(labels)} labels but {len(values)} rows of step values")
    for index, (label, row) in enumerate(zip(labels, values)):
        if not row:
            raise ValueError(f"row {index} has no step values")
        if not -1 <= label < len(row):
            raise ValueError(f"row {index}: label {label} is out of range for {len(row)} steps")
    predictions = [first_error_prediction(v, threshold) for v in values]
    sweep = threshold_sweep(labels, values, thresholds)
    return {
        "at_threshold": {"threshold": float(threshold), **processbench_metrics(labels, predictions)},
        "sweep": sweep,
        "oracle": oracle_threshold(sweep),
        "predictions": predictions,
    }


# -- the report ---------------------------------------------------------------------------------------------------


def _pct(x: float | None, digits: int = 1) -> str:
    return "n/a" if x is None else f"{100 * x:.{digits}f}%"


def _ci(ci: Sequence[float] | None) -> str:
    return "n/a" if ci is None else f"{100 * ci[0]:.1f}-{100 * ci[1]:.1f}"


def _num(x: float | None, digits: int = 3) -> str:
    return "n/a" if x is None or (isinstance(x, float) and not math.isfinite(x)) else f"{x:.{digits}f}"


def _pairs_markdown(section: Mapping[str, Any]) -> list[str]:
    what = "on a training question" if section.get("excluded_by") == "question" else "training pairs"
    dropped = [f"{section['excluded']} excluded as {what}"] if section.get("excluded") else []
    dropped += (
        [f"{section['dropped_identical']} with identical steps dropped"] if section.get("dropped_identical") else []
    )
    tie = "half a correct pair" if section["ties"] == "half" else "wrong"
    lines = [
        f"Held-out preference pairs `{section['dataset']}`: {section['num_pairs']} pairs evaluated"
        + (f" on {section['num_prompts']} distinct prompts" if section.get("num_prompts") else "")
        + (f" ({'; '.join(dropped)})" if dropped else "")
        + ".",
        "",
        "| pairs | n | accuracy | 95% CI | chosen > rejected | ties | chosen < rejected | mean margin |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    rows = [("all", section)] + list(section.get("by_kind", {}).items())
    for name, counts in rows:
        lines.append(
            f"| {name} | {counts['n']} | {_pct(counts['accuracy'])} | {_ci(counts['ci95'])} | {counts['wins']} | "
            f"{counts['tied']} | {counts['losses']} | {_num(counts['mean_margin'])} |"
        )
    lines += [
        "",
        "Accuracy: the share of pairs whose chosen step the PPM scores above the rejected one "
        f"({section['compared']}s compared; a tie counts as {tie}); 95% CI: "
        "Wilson score interval, which treats pairs as independent (pairs sharing a question are not: the real "
        "interval is wider). Margin: chosen minus rejected score. Meaningful only on pairs the PPM was not trained "
        "on.",
    ]
    return lines


def _processbench_markdown(section: Mapping[str, Any], sweep: bool) -> list[str]:
    at = section["at_threshold"]
    lines = [
        f"First-error localisation on `{section['dataset']}` (ProcessBench protocol, arXiv 2412.06559): "
        f"{section['num_rows']} solutions, {at['num_erroneous']} with an error and {at['num_correct']} all right; "
        f"steps joined with {json.dumps(section['step_separator'])}.",
        "",
        "| threshold | error acc | 95% CI | correct acc | 95% CI | F1 | early | late | missed |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
        f"| {at['threshold']:.2f} ({section['threshold_source']}) | {_pct(at['error_acc'])} "
        f"({at['error_correct']}/{at['num_erroneous']}) | {_ci(at['error_ci95'])} | {_pct(at['correct_acc'])} "
        f"({at['correct_correct']}/{at['num_correct']}) | {_ci(at['correct_ci95'])} | {_pct(at['f1'])} | "
        f"{at['early']} | {at['late']} | {at['missed']} |",
        "",
        "Predicted first error: the first step whose PPM value (of the prefix ending there) is below the threshold "
        "(-1 if none). Error acc: erroneous solutions whose first wrong step is found exactly; correct acc: "
        "solutions without error predicted -1; F1: their harmonic mean. Early / late / missed: erroneous solutions "
        "flagged before the real error, after it, or not at all. 95% CI: Wilson score interval.",
    ]
    oracle = section.get("oracle")
    if oracle is not None:
        lines += [
            "",
            f"Oracle threshold {oracle['threshold']:.2f}: F1 {_pct(oracle['f1'])} (error acc "
            f"{_pct(oracle['error_acc'])}, correct acc {_pct(oracle['correct_acc'])}), {ORACLE_NOTE}.",
        ]
    if sweep and section.get("sweep"):
        lines += [
            "",
            "F1 sweep over thresholds (chosen on this data itself: optimistic, not a result):",
            "",
            "| threshold | error acc | correct acc | F1 |",
            "|---:|---:|---:|---:|",
        ]
        best = oracle["threshold"] if oracle else None
        for entry in section["sweep"]:
            mark = " (oracle)" if entry["threshold"] == best else ""
            lines.append(
                f"| {entry['threshold']:.2f}{mark} | {_pct(entry['error_acc'])} | {_pct(entry['correct_acc'])} | "
                f"{_pct(entry['f1'])} |"
            )
    return lines


def quality_markdown(results: Mapping[str, Any], sweep: bool = True, header: bool = True) -> str:
    """The report of `recipes/eval_ppm.py` results as markdown: the pair accuracy table and the first-error table
    (with the threshold sweep when `sweep`)."""
    lines = []
    if header:
        transform = results.get("value_transform") or {}
        lines += [
            f"PPM `{results['ppm']}` (value tanh(r / {transform.get('scale', 1.0):g}), {results['ppm_backend']} "
            f"backend, {results.get('time_s', 0):.0f} s).",
            "",
        ]
    if results.get("pairs"):
        lines += _pairs_markdown(results["pairs"]) + [""]
    if results.get("processbench"):
        lines += _processbench_markdown(results["processbench"], sweep) + [""]
    return "\n".join(lines).rstrip("\n") + "\n"


def write_quality_report(results: Mapping[str, Any], output_dir: str) -> dict[str, str]:
    """Write results.json and results.md to `output_dir`; returns their paths."""
    os.makedirs(output_dir, exist_ok=True)
    paths = {name: os.path.join(output_dir, name) for name in ("results.json", "results.md")}
    with open(paths["results.json"], "w") as f:
        json.dump(results, f, indent=2)
    with open(paths["results.md"], "w") as f:
        f.write(quality_markdown(results))
    return paths


def update_card_section(card: str, key: str, title: str, body: str) -> bool:
    """Put a "## {title}" section in a model card (`README.md`), one per `key` (`rstar_trl.hub.put_card_section`):
    a section with the same key is replaced, the rest of the card kept. Returns False when the card does not exist."""
    return put_card_section(card, f"rstar_trl:ppm_quality {key}", f"## {title}\n\n{body}")


def add_quality_to_card(results: Mapping[str, Any], folder: str) -> str | None:
    """Put the report in the `README.md` model card of a local PPM checkpoint folder: one section per evaluated
    dataset (pairs, ProcessBench-layout data), replacing an earlier section for the same dataset. Returns the card's
    path, or None when the folder has no card."""
    card = os.path.join(folder, "README.md")
    done = False
    if results.get("pairs"):
        body = "\n".join(_pairs_markdown(results["pairs"]))
        done |= update_card_section(card, f"pairs {results['pairs']['dataset']}",
                                    f"PPM quality: pairs {results['pairs']['dataset']}", body)  # fmt: skip
    if results.get("processbench"):
        section = results["processbench"]
        body = "\n".join(_processbench_markdown(section, sweep=False))
        done |= update_card_section(card, f"processbench {section['dataset']}",
                                    f"PPM quality: first errors in {section['dataset']}", body)  # fmt: skip
    return card if done else None


# -- a ProcessBench-layout file from the tiny task ----------------------------------------------------------------

_NUMBER = re.compile(r"(?<!\w)\d+(?!\w)")
# The first operator of a step's code line is flipped: a computation error that contradicts the step's comment.
_OPERATOR = re.compile(r"\+=|-=| \* | \+ | - | // ")
_FLIPPED = {"+=": "-=", "-=": "+=", " * ": " + ", " + ": " - ", " - ": " + ", " // ": " * "}


def _split_print(code: str) -> tuple[str, str]:
    """A tiny step's code without its trailing `print(...)` line (the final step prints the answer), and that line."""
    lines = code.split("\n")
    if lines[-1].startswith("print("):
        return "\n".join(lines[:-1]), "\n" + lines[-1]
    return code, ""


def _wrong_step(step: Step, kind: str, rng: random.Random) -> Step | None:
    """`step` with one mistake of `kind`, or None when the step has no place for it.

    "number": a number of the sentence is misread, the same wrong number in the comment and the code (a step
    that misstates the problem). "operation": the first operator of the code is flipped (+= / -=, * / +, + / -,
    // / *) while the comment still says what the problem says (a computation error).
    """
    body, printing = _split_print(step.code)
    if kind == "number":
        in_code, in_comment = list(_NUMBER.finditer(body)), list(_NUMBER.finditer(step.comment))
        if not in_code or [m.group() for m in in_code] != [m.group() for m in in_comment]:
            return None  # no number, or the comment's numbers do not map one to one onto the code's
        j = rng.randrange(len(in_code))
        old = int(in_code[j].group())
        new = old + rng.choice((-3, -2, -1, 1, 2, 3))
        new = new if new >= 2 else old + abs(new - old)  # no "1 apples", as in the tiny problems

        def swap(text: str, match: re.Match) -> str:
            return text[: match.start()] + str(new) + text[match.end() :]

        return replace(step, comment=swap(step.comment, in_comment[j]), code=swap(body, in_code[j]) + printing)
    match = _OPERATOR.search(body)
    if match is None:
        return None
    body = body[: match.start()] + _FLIPPED[match.group()] + body[match.end() :]
    return replace(step, code=body + printing)


def _program_output(steps: Sequence[Step]) -> str | None:
    """What the program of a tiny solution prints (its own template code, run in-process), or None if it fails."""
    printed: list[str] = []
    namespace = {"__builtins__": {}, "print": lambda *args: printed.append(" ".join(str(a) for a in args))}
    try:
        exec(build_program(list(steps)), namespace)  # noqa: S102 - our own generated arithmetic, not user input
    except Exception:  # e.g. a flipped operator that divides by zero
        return None
    return "\n".join(printed).strip() if printed else None


def _inject_error(steps: Sequence[Step], gold: str, rng: random.Random) -> tuple[list[Step], int, str] | None:
    """A wrong version of a template solution: one step (chosen at random) gets a mistake (`_wrong_step`), the
    later steps are kept as written, and the final step's output block and answer are those of the wrong program,
    so the error carries through to a wrong final answer. Mistakes that leave the answer right (a number in a
    distractor sentence) are not used. None when no step can be made wrong."""
    candidates = [(k, kind) for k in range(len(steps)) for kind in ("number", "operation")]
    rng.shuffle(candidates)
    for k, kind in candidates:
        wrong = _wrong_step(steps[k], kind, rng)
        if wrong is None:
            continue
        new_steps = list(steps[:k]) + [wrong] + list(steps[k + 1 :])
        output = _program_output(new_steps)
        if output is None or output == gold:
            continue
        new_steps[-1] = replace(new_steps[-1], output=output, answer=f"The answer is \\boxed{{{output}}}.")
        return new_steps, k, kind
    return None


def make_tiny_processbench(
    num: int = 400,
    split: str = "validation",
    error_fraction: float = 0.5,
    seed: int = 0,
    problems: Sequence[Mapping] | None = None,
) -> list[dict[str, Any]]:
    """Rows in ProcessBench's layout from the tiny task: the first `num` problems of a tiny split with their
    template solutions in the policy's step format (`rstar_trl.tiny`), a wrong step injected into a share of them.

    In an erroneous row, step k (uniform over the steps that can be made wrong) gets one mistake: either a number of
    its sentence misread, the same wrong number in the comment and the code, or the code's first operator flipped
    while the comment stays right. Steps before k are the template's; the steps after it are the template's too
    (right given the problem, but they build on the wrong value), and the final step's output block and answer are
    recomputed from the wrong program, so the error carries through to a wrong answer, as in the policy's own wrong
    solutions. Mistakes that leave the answer right are not used. The label is k (0-based), -1 for a row left as
    the template wrote it.

    Args:
        num: rows (the first `num` problems of the split).
        split: "train", "validation" or "test" (`tiny_splits()`); "validation" is meant for evaluation.
        error_fraction: the share of rows with an injected error (exactly round(num * error_fraction) of them).
        seed: which rows get an error, where and which; the same seed gives the same rows.
        problems: problems as `generate_problems` returns them (dicts with `problem`, `answer`, `steps`), instead
            of a tiny split.

    Returns:
        dicts with `id`, `generator`, `problem`, `steps` (rendered steps: concatenated they are the solution as the
        policy writes it), `label`, `final_answer_correct`, and (ours) `level` and `error_kind` ("number",
        "operation", or "" for a correct row).
    """
    if not 0 <= error_fraction <= 1:
        raise ValueError(f"error_fraction must be in [0, 1], got {error_fraction}")
    if problems is None:
        from ..tiny import tiny_splits

        splits = tiny_splits()
        if split not in splits:
            raise ValueError(f"unknown tiny split {split!r}; choose one of {sorted(splits)}")
        problems = splits[split]
    if not 1 <= num <= len(problems):
        raise ValueError(f"num must be in [1, {len(problems)}] (the problems available), got {num}")
    rng = random.Random(f"rstar_trl.ppm.quality:{seed}")
    erroneous = set(rng.sample(range(num), round(num * error_fraction)))
    rows = []
    for index, problem in enumerate(problems[:num]):
        steps, label, kind = list(problem["steps"]), -1, ""
        if index in erroneous:
            injected = _inject_error(steps, str(problem["answer"]), rng)
            if injected is None:
                logger.warning("no wrong step fits problem %d of %s; it stays correct", index, split)
            else:
                steps, label, kind = injected
        rows.append(
            {
                "id": f"tiny-{split}-{index}",
                "generator": "rstar_trl.tiny templates",
                "problem": problem["problem"],
                "steps": [render_step(step) for step in steps],
                "label": label,
                "final_answer_correct": label == -1,
                "level": problem.get("level"),
                "error_kind": kind,
            }
        )
    return rows


def write_jsonl(rows: Sequence[Mapping[str, Any]], path: str) -> str:
    """Write rows as JSON lines; returns the path."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    return path
