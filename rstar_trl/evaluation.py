r"""Evaluation: a policy (and a PPM) on problems with gold answers, by several test-time methods at several budgets,
compared at matched compute: accuracy (graded with `grade_answer`) against generated tokens per problem.

The methods themselves live in `rstar_trl.solve` (the inference API, `Solver`): `Evaluator` hands it the problems
WITHOUT their gold answers, then grades the answers, times the methods, and writes the reports and model cards.
Method strings (`MethodSpec.parse`; details in `rstar_trl.solve`):

| method | what |
|---|---|
| `greedy` | one step-wise solution at temperature 0 |
| `maj@K` | K samples, majority vote (answers `grade_answer` calls equal count together) |
| `best_of_n@N[:AGG]` | N samples, the best by PPM trajectory score: AGG = `last` (default), `min`, `mean`, `prod` |
| `weighted_maj@N` | N samples, PPM-weighted vote (weight (v + 1) / 2) |
| `mcts@RxC` | ONE PPM-guided search (`MCTSGenerator`, test-time mode), R rollouts x C candidates |
| `mcts@TxRxC[:SEL]` | T independent searches; SEL = `best` (default), `vote` (PPM-weighted), `topK` (top-K vote) |
| `beam@BxK` | step-level beam search with the PPM: width B, K candidates per beam and step |

Every generated token counts, retried steps included. `maj`, `best_of_n` and `weighted_maj` share one set of samples
drawn at the largest budget (the first K of N samples are the K-sample run), and each method uses (and is charged the
tokens of) its first K or N; selections with the same TxRxC share one set of searches, each charged all of it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

from datasets import Dataset

from .closing import Closeable
from .data import load_problems
from .format import Step, format_prompt
from .grading import grade_answer
from .hub import put_card_section
from .search.generator import StepScorer
from .solve import (
    METHOD_FORMS,
    BeamResult,
    MethodResult,
    MethodSpec,
    Solution,
    Solver,
    TestTimeConfig,
    Trajectory,
    _TokenMeter,  # noqa: F401 (re-exported for code that used it from here)
    beam_search,
    majority_vote,
    propose_steps,
    sample_solutions,
    select_top,
    weighted_vote,
)
from .stats import wilson_interval

__all__ = [
    "EvalConfig",
    "Evaluator",
    "MethodSpec",
    "Trajectory",
    "BeamResult",
    "add_eval_to_cards",
    "beam_search",
    "load_eval_problems",
    "majority_vote",
    "plot_accuracy_vs_tokens",
    "propose_steps",
    "results_table",
    "sample_solutions",
    "select_top",
    "weighted_vote",
    "wilson_interval",
    "write_report",
]

logger = logging.getLogger(__name__)

TINY_DATASETS = {"tiny-test": "test", "tiny-validation": "validation", "tiny-train": "train"}


@dataclass
class EvalConfig(TestTimeConfig):
    """Settings of `Evaluator` and `recipes/eval.py`: what to evaluate, by which methods, the models, and the search
    and generation settings (`TestTimeConfig`, `MCTSConfig`: same names, same meaning; `temperature`/`top_p` apply
    to every sampled method, `num_rollouts`/`num_candidates` are the budget of a bare `mcts`).

    > Parameters that control what is evaluated

    Args:
        methods: method strings, each with its budget (see the module docstring and `rstar_trl.solve`).
        dataset: "tiny-test" / "tiny-validation" / "tiny-train" (the embedded synthetic splits), a JSON/JSONL file
            or a Hub dataset.
        dataset_split: split of a Hub dataset.
        limit: evaluate only the first `limit` problems.
        output_dir: folder of results.json, results.md and accuracy_vs_tokens.png.
        update_cards: add the results table to the policy's and the PPM's model cards.
    """

    methods: list[str] = field(
        default_factory=lambda: ["greedy", "maj@8"],
        metadata={"help": f"Methods with budgets: {METHOD_FORMS}. maj@K: vote over K samples; best_of_n@N:AGG: the "
                  "PPM's best of N samples, the trajectory score aggregating the PPM's step values by last (default), "
                  "min, mean or prod (of (v+1)/2); weighted_maj@N: vote over N samples weighted by (v+1)/2 of the "
                  "PPM's value; mcts@RxC: ONE PPM-guided search, R rollouts x C candidates (bare mcts: "
                  "--num_rollouts x --num_candidates); mcts@TxRxC:SEL: T independent searches, answer by best PPM "
                  "score (best, default), PPM-weighted vote (vote) or majority vote among the K best-scored searches "
                  "(topK, e.g. top4); beam@BxK: step-level beam search with the PPM, width B, K candidates per beam "
                  "and step. Samples and searches are shared between methods that can share them."},
    )  # fmt: skip
    dataset: str = field(
        default="tiny-test",
        metadata={"help": "Problems with gold answers: 'tiny-test' / 'tiny-validation' / 'tiny-train' (embedded "
                  "synthetic splits; choose settings on validation, report on test), a JSON/JSONL file (e.g. "
                  "path/to/problems.jsonl, the offline path) or a Hub dataset id (e.g. "
                  "HuggingFaceH4/MATH-500)."},
    )  # fmt: skip
    dataset_split: str = field(default="test", metadata={"help": "Split of a Hub dataset or data folder."})
    limit: int | None = field(default=None, metadata={"help": "Evaluate only the first N problems (default: all)."})
    output_dir: str | None = field(
        default="runs/eval", metadata={"help": "Folder of results.json, results.md and accuracy_vs_tokens.png."}
    )
    samples_from: str | None = field(
        default=None,
        metadata={"help": "Folder of an earlier run (its samples.jsonl): maj, best_of_n and weighted_maj use its "
                  "samples instead of drawing new ones, e.g. to compare PPMs on the same samples. The policy, the "
                  "problems and every sampling setting must match (checked); its sampling time is charged as if "
                  "drawn here. Every run that draws samples writes them to <output_dir>/samples.jsonl."},
    )  # fmt: skip
    update_cards: bool = field(
        default=False,
        metadata={"help": "Add the results table to the model cards (README.md) of the policy and the PPM, when they "
                  "are local folders (e.g. a round's policy/ and ppm/); one section per dataset, replaced on re-run."},
    )  # fmt: skip

    def __post_init__(self):
        super().__post_init__()
        if isinstance(self.methods, str):
            self.methods = self.methods.split()
        if not self.methods:
            raise ValueError(f"EvalConfig.methods is empty: name at least one of {METHOD_FORMS}")
        self.parse_methods(self.methods)  # unknown methods, bad budgets, repeats, PPM methods without --ppm_path
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"EvalConfig.limit must be >= 1 (or None for all problems), got {self.limit}")

    @property
    def method_specs(self) -> list[MethodSpec]:
        return self.parse_methods(self.methods)


def load_eval_problems(dataset: str, split: str = "test", limit: int | None = None) -> Dataset:
    """Problems with gold answers: an embedded tiny split ("tiny-test", "tiny-validation", "tiny-train") or anything
    `load_problems` reads. A source without an answer column is an error that says so."""
    if dataset in TINY_DATASETS:
        from .tiny import tiny_splits, to_dataset

        rows = tiny_splits()[TINY_DATASETS[dataset]]
        return to_dataset(rows[:limit] if limit is not None else rows)
    try:
        return load_problems(dataset, split=split, limit=limit)
    except ValueError as exc:
        if "cannot find the answer column" in str(exc):
            raise ValueError(
                f"{dataset}: evaluation needs a gold answer per problem, and none was found: {exc}"
            ) from exc
        raise


class Evaluator(Closeable):
    """Evaluate a policy (and a PPM) on problems with gold answers by every method of `args.methods`: the methods run
    through the inference API (`rstar_trl.solve.Solver`, which never sees the gold answers); the evaluator grades,
    times and reports.

    Args:
        model: the policy: a path or Hub id, a loaded causal LM (with `processing_class`), or a `GenerationBackend`.
            Default: `args.model_name_or_path`.
        args: the settings (`EvalConfig`).
        eval_dataset: problems with `problem` and `answer` columns (`load_eval_problems`). Default: `args.dataset`.
        processing_class: the tokenizer of a loaded model.
        ppm: a `StepScorer` (e.g. `TransformersPPMScorer`). Default: built from `args` (`ppm_server_url`, else
            `ppm_path`) when a method needs it.

    Example:
        >>> args = EvalConfig(model_name_or_path="runs/tiny/round_1/policy", methods=["greedy", "maj@8"], limit=50)
        >>> with Evaluator(args=args) as evaluator:
        ...     results = evaluator.evaluate()
        >>> write_report(results, args.output_dir)
    """

    def __init__(self, model=None, args: EvalConfig | None = None, eval_dataset: Dataset | None = None,
                 processing_class=None, ppm: StepScorer | None = None):  # fmt: skip
        self.args = args or EvalConfig()
        self.specs = self.args.method_specs
        if eval_dataset is None:
            eval_dataset = load_eval_problems(self.args.dataset, self.args.dataset_split, self.args.limit)
        elif self.args.limit is not None:
            eval_dataset = eval_dataset.select(range(min(self.args.limit, len(eval_dataset))))
        missing = [c for c in ("problem", "answer") if c not in eval_dataset.column_names]
        if missing:
            raise ValueError(
                f"eval_dataset is missing the column(s) {missing} (it has {eval_dataset.column_names}): evaluation "
                "grades against gold answers; load benchmark files with rstar_trl.load_problems (to solve problems "
                "without answers, use rstar_trl.solve.Solver)"
            )
        if len(eval_dataset) == 0:
            raise ValueError("eval_dataset is empty: there are no problems to evaluate")
        self.dataset = eval_dataset
        self.questions = [str(p) for p in eval_dataset["problem"]]
        self.golds = [None if a is None else str(a) for a in eval_dataset["answer"]]
        model = model if model is not None else self.args.model_name_or_path
        if model is None:
            raise ValueError("no policy to evaluate: pass --model_name_or_path (e.g. runs/tiny/round_1/policy)")
        self.solver = Solver(model, ppm=ppm, args=self.args, processing_class=processing_class)
        self.model_name = self.solver.model_name
        self.backend = self.solver.backend

    @property
    def ppm(self) -> StepScorer:
        """The PPM scorer, built from `args` on first use."""
        return self.solver.ppm

    def _ppm_name(self) -> str | None:
        """How results name the PPM: its checkpoint, or the served model and the server's URL."""
        from .ppm import ServerPPMScorer

        scorer = self.solver._ppm
        if isinstance(scorer, ServerPPMScorer):  # the model the server reported
            return scorer.description
        if self.args.ppm_server_url:
            name = self.args.ppm_server_model or self.args.ppm_path or "the first model served"
            return f"{name} (vllm serve at {self.args.ppm_server_url})"
        return self.args.ppm_path

    def close(self) -> None:
        """Release the engines this evaluator built (policy backend, PPM scorer); ones passed in are left to their
        owner. Also done on leaving a `with Evaluator(...) as evaluator:` block."""
        self.solver.close()

    def samples_fingerprint(self) -> dict:
        """What decides the samples of a run: the policy, the problems and the sampling settings."""
        model = self.model_name
        if isinstance(model, str) and os.path.exists(model):
            model = os.path.realpath(model)
        problems = hashlib.sha256(json.dumps(self.questions).encode()).hexdigest()
        settings = {name: getattr(self.args, name) for name in _SAMPLE_SETTINGS}
        return {"model": model, "num_problems": len(self.questions), "problems_sha256": problems, **settings}

    def _samples(self, num_samples: int) -> tuple[list[list[Trajectory]], float]:
        """The samples of the sampling methods: read from `args.samples_from`, or drawn (and saved to
        `output_dir`, by the main process) with the time they took."""
        if self.args.samples_from:
            prompts = [format_prompt(q, self.args.template) for q in self.questions]
            samples, seconds = read_samples(self.args.samples_from, self.samples_fingerprint(), num_samples, prompts)
            logger.info("using the %d samples per problem of %s", num_samples, self.args.samples_from)
            return samples, seconds
        start = time.perf_counter()
        samples = self.solver.draw_samples(self.questions, num_samples)
        seconds = time.perf_counter() - start
        if self.args.output_dir and self.solver.state.is_main_process:
            write_samples(self.args.output_dir, samples, self.samples_fingerprint(), seconds)
        return samples, seconds

    def evaluate(self) -> dict:
        """Run every method; returns the results (what `write_report` saves): settings, one summary per method and
        one record per problem and method."""
        start = time.perf_counter()
        methods = []
        num_samples = max(spec.num_samples for spec in self.specs)
        samples, samples_time = self._samples(num_samples) if num_samples else (None, 0.0)
        for result in self.solver.iter_solve(self.questions, self.specs, samples, samples_time):
            methods.append(self._summary(result))
            m = methods[-1]
            logger.info(
                "%s: accuracy %.1f%% (%d/%d), %.0f tokens per problem, %.1f s", m["method"], 100 * m["accuracy"],
                m["correct"], m["num_problems"], m["tokens_per_problem"], m["time_s"],
            )  # fmt: skip
        return {
            "model": self.model_name,
            "ppm": self._ppm_name(),
            "dataset": self.args.dataset,
            "num_problems": len(self.questions),
            "time_s": round(time.perf_counter() - start, 2),
            "settings": asdict(self.args),
            "methods": methods,
        }

    def _summary(self, result: MethodResult) -> dict:
        spec = result.spec
        records = [self._record(solution, spec) for solution in result.solutions]
        n = len(records)
        correct = sum(r["correct"] for r in records)
        tokens = sum(r["tokens"] for r in records)
        low, high = wilson_interval(correct, n)
        return {
            "method": spec.label,
            "name": spec.name,
            "family": spec.family,
            "budget": list(spec.budget),
            "rule": spec.rule,
            "num_problems": n,
            "correct": correct,
            "accuracy": correct / n,
            "accuracy_ci95": [low, high],
            "answered": sum(r["answer"] is not None for r in records) / n,
            "tokens_per_problem": tokens / n,
            "total_tokens": tokens,
            "time_s": round(result.time_s, 2),
            "problems": records,
        }

    def _record(self, solution: Solution, spec: MethodSpec) -> dict:
        """One problem's graded record: the answer, whether it is right, the tokens, the chosen solution, and the
        method's details (score, votes, the candidates' answers and scores, ...)."""
        gold = self.golds[solution.index]
        answer = solution.answer
        correct = answer is not None and gold is not None and grade_answer(answer, gold)
        record = {"index": solution.index, "gold": gold, "answer": answer, "correct": bool(correct),
                  "tokens": int(solution.tokens), "solution": solution.trajectory}  # fmt: skip
        if spec.needs_ppm:
            record["score"] = solution.score
        if solution.votes is not None or spec.name in ("maj", "weighted_maj"):
            record["votes"] = solution.votes
        record.update(solution.info)
        if spec.name != "greedy":
            record["candidates"] = [[c.answer, c.score] for c in solution.candidates]
        return record


# -- samples --------------------------------------------------------------------------------------------------

SAMPLES_FILE = "samples.jsonl"
# The settings that decide a run's samples (with the policy and the problems): `read_samples` checks them.
_SAMPLE_SETTINGS = (
    "backend", "dtype", "seed", "temperature", "top_p", "prompt_template", "max_step_tokens", "max_answer_tokens",
    "max_depth", "max_consecutive_errors", "allow_unexecuted_answers",
)  # fmt: skip
_TRAJECTORY_FIELDS = ("problem", "sample", "text", "step_ends", "tokens", "failures", "end", "answer")


def write_samples(output_dir: str, samples: Sequence[Sequence[Trajectory]], fingerprint: dict, time_s: float) -> str:
    """Save a run's samples (unscored) as `output_dir/samples.jsonl`: a header line (what decided them, how many
    per problem, the seconds they took), then one line per problem. Written to a temporary file first, so an
    interrupted write never leaves a truncated file. Returns the path."""
    os.makedirs(output_dir, exist_ok=True)
    path = os.path.join(output_dir, SAMPLES_FILE)
    num_samples = min((len(row) for row in samples), default=0)
    with open(path + ".tmp", "w") as f:
        f.write(json.dumps({"fingerprint": fingerprint, "num_samples": num_samples, "time_s": time_s}) + "\n")
        for row in samples:
            f.write(json.dumps([
                {**{name: getattr(t, name) for name in _TRAJECTORY_FIELDS}, "steps": [asdict(s) for s in t.steps]}
                for t in row
            ]) + "\n")  # fmt: skip
    os.replace(path + ".tmp", path)
    return path


def read_samples(folder: str, fingerprint: dict, num_samples: int,
                 prompts: Sequence[str]) -> tuple[list[list[Trajectory]], float]:  # fmt: skip
    """The samples `write_samples` saved in `folder` (or the file itself), checked against `fingerprint` (the
    policy, problems and sampling settings of the run that uses them) and `num_samples` (at least that many per
    problem); returns them (with their `prompts`, one per problem) and the seconds they took to draw."""
    path = os.path.join(folder, SAMPLES_FILE) if os.path.isdir(folder) else folder
    if not os.path.exists(path):
        raise FileNotFoundError(
            f"--samples_from {folder}: there is no {SAMPLES_FILE} (a recipes/eval.py run with a maj, best_of_n or "
            "weighted_maj method writes one to its --output_dir)"
        )
    with open(path) as f:
        header = json.loads(f.readline())
        saved = header["fingerprint"]
        differ = [f"{k}: {saved.get(k)!r} there, {v!r} here" for k, v in fingerprint.items() if saved.get(k) != v]
        if differ:
            raise ValueError(f"--samples_from {folder}: its samples were drawn differently ({'; '.join(differ)})")
        if header["num_samples"] < num_samples:
            raise ValueError(
                f"--samples_from {folder}: it has {header['num_samples']} samples per problem, the methods need "
                f"{num_samples}"
            )
        rows = []
        for line in f:
            row = []
            for d in json.loads(line):
                steps = [Step(**step) for step in d.pop("steps")]
                row.append(Trajectory(prompt=prompts[d["problem"]], steps=steps, **d))
            rows.append(row)
    if len(rows) != saved["num_problems"]:
        raise ValueError(f"--samples_from {folder}: {path} is incomplete ({len(rows)} of {saved['num_problems']} "
                         "problems)")  # fmt: skip
    return rows, float(header["time_s"])


# -- reports --------------------------------------------------------------------------------------------------


def results_table(results: dict) -> str:
    """The results as a markdown table, one row per method (in the order they ran)."""
    lines = [
        f"Policy `{results['model']}`" + (f", PPM `{results['ppm']}`" if results.get("ppm") else "")
        + f" on `{results['dataset']}` ({results['num_problems']} problems, {results['time_s']:.0f} s).",
        "",
        "| method | accuracy | 95% CI | correct | answered | tokens / problem | time (s) |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]  # fmt: skip
    for m in results["methods"]:
        low, high = m.get("accuracy_ci95") or wilson_interval(m["correct"], m["num_problems"])
        lines.append(
            f"| {m['method']} | {100 * m['accuracy']:.1f}% | {100 * low:.1f}-{100 * high:.1f} | "
            f"{m['correct']}/{m['num_problems']} | {100 * m['answered']:.0f}% | {m['tokens_per_problem']:.0f} | "
            f"{m['time_s']:.1f} |"
        )
    lines += [
        "",
        "95% CI: Wilson score interval. Tokens: every generated token (steps, answers, failed attempts) per problem. "
        "maj@K, best_of_n@N and weighted_maj@N share one set of samples, and mcts selections with the same TxRxC one "
        "set of searches; each is charged its own tokens and its share of the shared time (the time it would take "
        "alone), so the times add up to more than the run's.",
    ]
    return "\n".join(lines) + "\n"


def plot_accuracy_vs_tokens(results: dict, path: str) -> str:
    """Save a PNG of accuracy against generated tokens per problem: one line per method (its budgets as points)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise ImportError(
            "the accuracy-vs-tokens plot needs matplotlib: pip install 'rstar_trl[eval]' (or pip install matplotlib)"
        ) from exc
    by_name: dict[str, list[dict]] = {}
    for m in results["methods"]:
        by_name.setdefault(m.get("family", m["name"]), []).append(m)
    fig, ax = plt.subplots(figsize=(8, 5))
    markers = "osD^v<>phX*"
    for k, (name, runs) in enumerate(by_name.items()):
        runs = sorted(runs, key=lambda m: m["tokens_per_problem"])
        xs = [m["tokens_per_problem"] for m in runs]
        ys = [100 * m["accuracy"] for m in runs]
        ax.plot(xs, ys, marker=markers[k % len(markers)], linestyle="-" if k < 10 else "--", label=name)
        for m, x, y in zip(runs, xs, ys):
            budget = "x".join(str(b) for b in m["budget"])
            if m.get("family", "").endswith(":topK"):
                budget += f":{m['rule']}"
            if budget:  # the legend names the method; points show their budgets
                ax.annotate(budget, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set_xscale("log")
    ax.set_ylim(0, min(100, 5 + max(100 * m["accuracy"] for m in results["methods"])))
    ax.set_xlabel("generated tokens per problem")
    ax.set_ylabel("accuracy (%)")
    ax.set_title(f"{os.path.basename(str(results['model']).rstrip('/'))} on {results['dataset']} "
                 f"({results['num_problems']} problems)")  # fmt: skip
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7, ncol=2 if len(by_name) > 6 else 1)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_report(results: dict, output_dir: str) -> dict[str, str]:
    """Write results.json, results.md and accuracy_vs_tokens.png to `output_dir`; returns their paths."""
    os.makedirs(output_dir, exist_ok=True)
    paths = {name: os.path.join(output_dir, name) for name in ("results.json", "results.md", "accuracy_vs_tokens.png")}
    with open(paths["results.json"], "w") as f:
        json.dump(results, f, indent=2, default=_jsonable)
    with open(paths["results.md"], "w") as f:
        f.write(results_table(results))
    plot_accuracy_vs_tokens(results, paths["accuracy_vs_tokens.png"])
    return paths


_CARD_MARKER = "rstar_trl:eval {dataset}"


def add_eval_to_cards(results: dict, folders: Sequence[str | None]) -> list[str]:
    """Put the results table in the `README.md` model card of each local checkpoint folder (policy, PPM) as an
    "Evaluation" section for the dataset; a section for the same dataset is replaced, others are kept. Returns the
    cards written; folders without a card (or not local) are skipped."""
    section = f"## Evaluation on {results['dataset']}\n\n{results_table(results)}"
    cards = [os.path.join(folder, "README.md") for folder in folders if folder]
    return [card for card in cards if put_card_section(card, _CARD_MARKER.format(dataset=results["dataset"]), section)]


def _jsonable(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return str(value)
