r"""Evaluation: a policy (and a PPM) on problems with gold answers, by several test-time methods at several budgets,
compared at matched compute: accuracy (graded with `grade_answer`) against generated tokens per problem (SPEC §7).

A method string names a method and its budget:

| method | budget | what |
|---|---|---|
| `greedy` | one solution | step-wise decoding at temperature 0 |
| `maj@K` | K samples | majority vote over the extracted answers (answers `grade_answer` calls equal count together) |
| `best_of_n@N` | N samples | the sample whose whole trajectory the PPM values highest |
| `mcts@RxC` | R rollouts, C candidates per expansion | PPM-guided MCTS (`MCTSGenerator`, test-time mode) |
| `beam@BxK` | beam width B, K candidates per beam and step | step-level beam search with the PPM |

Every solution is written step by step in the code-augmented format, exactly as the search writes it: a wave makes
ONE generation call for the next step of every unfinished solution, ONE `run_batch` for their cumulative programs,
and ONE generation call for the answers of the solutions that closed their program (after the executor's output).
A step that does not end with a marker or whose program fails is retried (at most `max_consecutive_errors` times in
a row; greedy decoding would repeat itself, so it stops at the first failure); a solution also ends at `max_depth`
steps or when the context is full. Every generated token counts, retried steps included.

Samples are seeded per (seed, problem, sample index, step, attempt): the first K of N samples are the K samples a
run with budget K draws. `maj@K` and `best_of_n@N` therefore share one set of samples drawn at the largest budget,
and each method uses (and is charged the tokens of) its first K or N.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import time
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field, fields

from datasets import Dataset
from tqdm.auto import tqdm

from .closing import Closeable
from .data import load_problems
from .executor import PythonExecutor
from .format import (
    ANSWER_STOP_STRINGS,
    OUTPUT_END,
    OUTPUT_START,
    STEP_STOP_STRINGS,
    Step,
    build_program,
    format_prompt,
    parse_step,
)
from .grading import extract_answer, grade_answer
from .search.backends import GenerationBackend, mix_seed
from .search.generator import MCTSConfig, MCTSGenerator, StepScorer, build_backend
from .search.steps import check_completion, check_execution, closes_program, needs_execution

__all__ = [
    "EvalConfig",
    "Evaluator",
    "MethodSpec",
    "Trajectory",
    "BeamResult",
    "beam_search",
    "load_eval_problems",
    "majority_vote",
    "plot_accuracy_vs_tokens",
    "propose_steps",
    "results_table",
    "sample_solutions",
    "select_top",
    "write_report",
]

logger = logging.getLogger(__name__)

METHODS = ("greedy", "maj", "best_of_n", "mcts", "beam")
PPM_METHODS = ("best_of_n", "mcts", "beam")
TINY_DATASETS = {"tiny-test": "test", "tiny-train": "train"}
_METHOD_RE = re.compile(r"^(?P<name>[a-z_]+)(?:@(?P<first>\d+)(?:x(?P<second>\d+))?)?$")
_METHOD_FORMS = "greedy, maj@K, best_of_n@N, mcts@R or mcts@RxC, beam@BxK"
# Seed streams: sampled solutions and beam candidates never share random numbers.
_SAMPLE_STREAM, _BEAM_STREAM = 1, 2


@dataclass(frozen=True)
class MethodSpec:
    """One method and its budget, parsed from a method string (`maj@8`, `mcts@16x8`, `beam@4x4`, ...).

    Args:
        name: "greedy", "maj", "best_of_n", "mcts" or "beam".
        budget: () for greedy; (K,) for maj; (N,) for best_of_n; (rollouts, candidates) for mcts;
            (beam width, candidates per beam) for beam.
    """

    name: str
    budget: tuple[int, ...] = ()

    @classmethod
    def parse(cls, text: str, default_rollouts: int = 8, default_candidates: int = 5) -> MethodSpec:
        """Parse a method string; `mcts` alone takes (default_rollouts, default_candidates), `mcts@R` takes
        default_candidates."""
        match = _METHOD_RE.match(text.strip())
        name = match["name"] if match else None
        if name not in METHODS:
            raise ValueError(f"unknown method {text!r}: use one of {_METHOD_FORMS}")
        first, second = (int(match[g]) if match[g] else None for g in ("first", "second"))
        if name == "greedy":
            budget = () if first is None else None
        elif name in ("maj", "best_of_n"):
            budget = (first,) if first is not None and second is None else None
        elif name == "mcts":
            budget = (first or default_rollouts, second or default_candidates)
        else:
            budget = (first, second) if first is not None and second is not None else None
        if budget is None or any(b < 1 for b in budget):
            raise ValueError(f"bad budget in method {text!r}: use one of {_METHOD_FORMS} (budgets >= 1)")
        return cls(name, budget)

    @property
    def label(self) -> str:
        if not self.budget:
            return self.name
        return f"{self.name}@{'x'.join(str(b) for b in self.budget)}"

    @property
    def needs_ppm(self) -> bool:
        return self.name in PPM_METHODS


@dataclass
class EvalConfig(MCTSConfig):
    """Settings of `Evaluator` and `recipes/eval.py`: what to evaluate, by which methods, and the search and
    generation settings of `MCTSConfig` (same names, same meaning; `temperature`/`top_p` apply to every sampled
    method, `num_rollouts`/`num_candidates` are the budget of a bare `mcts`).

    > Parameters that control what is evaluated

    Args:
        model_name_or_path: the policy checkpoint (path or Hub id).
        ppm_path: the PPM checkpoint (needed by best_of_n, mcts and beam).
        methods: method strings, each with its budget (see the module docstring).
        dataset: "tiny-test" / "tiny-train" (the embedded synthetic splits), a JSON/JSONL file or a Hub dataset.
        dataset_split: split of a Hub dataset.
        limit: evaluate only the first `limit` problems.
        output_dir: folder of results.json, results.md and accuracy_vs_tokens.png.

    > Parameters that control the PPM

    Args:
        ppm_backend: "transformers" or "vllm" (vLLM's pooling runner).
        ppm_batch_size: texts per PPM forward pass (transformers).
        ppm_gpu_memory_utilization: share of GPU memory the vLLM PPM engine reserves.
        ppm_max_length: tokens of a PPM input kept (the last ones).
    """

    model_name_or_path: str | None = field(
        default=None, metadata={"help": "Policy checkpoint (path or Hub id), e.g. runs/tiny/round_1/policy."}
    )
    ppm_path: str | None = field(
        default=None,
        metadata={"help": "PPM checkpoint (path or Hub id), needed by best_of_n, mcts and beam, e.g. "
                  "runs/tiny/round_2/ppm."},
    )  # fmt: skip
    methods: list[str] = field(
        default_factory=lambda: ["greedy", "maj@8"],
        metadata={"help": f"Methods with budgets: {_METHOD_FORMS}. maj@K: vote over K samples; best_of_n@N: the "
                  "PPM's best of N samples; mcts@RxC: PPM-guided MCTS with R rollouts x C candidates (bare mcts: "
                  "--num_rollouts x --num_candidates); beam@BxK: step-level beam search with the PPM, width B, K "
                  "candidates per beam and step."},
    )  # fmt: skip
    dataset: str = field(
        default="tiny-test",
        metadata={"help": "Problems with gold answers: 'tiny-test' / 'tiny-train' (embedded synthetic splits), a "
                  "JSON/JSONL file (e.g. ../shared/data/math500/test.jsonl) or a Hub dataset."},
    )  # fmt: skip
    dataset_split: str = field(default="test", metadata={"help": "Split of a Hub dataset or data folder."})
    limit: int | None = field(default=None, metadata={"help": "Evaluate only the first N problems (default: all)."})
    output_dir: str | None = field(
        default="runs/eval", metadata={"help": "Folder of results.json, results.md and accuracy_vs_tokens.png."}
    )
    ppm_backend: str = field(
        default="transformers",
        metadata={
            "help": "PPM engine: 'transformers' or 'vllm' (pooling runner).",
            "choices": ["transformers", "vllm"],
        },
    )
    ppm_batch_size: int = field(default=32, metadata={"help": "Texts per PPM forward pass (transformers)."})
    ppm_gpu_memory_utilization: float = field(
        default=0.2,
        metadata={"help": "ppm_backend='vllm': share of GPU memory the PPM engine reserves (it shares the GPU with "
                  "the policy's engine: keep the two --*gpu_memory_utilization under 1 together)."},
    )  # fmt: skip
    ppm_max_length: int = field(default=2048, metadata={"help": "Tokens of a PPM input kept (the last ones)."})
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
            raise ValueError(f"EvalConfig.methods is empty: name at least one of {_METHOD_FORMS}")
        specs = self.method_specs  # raises on unknown methods or bad budgets
        labels = [spec.label for spec in specs]
        repeated = sorted({label for label in labels if labels.count(label) > 1})
        if repeated:
            raise ValueError(f"method(s) {repeated} given twice")
        needing = [spec.label for spec in specs if spec.needs_ppm]
        if needing and not self.ppm_path:
            raise ValueError(
                f"method(s) {needing} need a process preference model: pass --ppm_path (a PPMTrainer checkpoint, "
                "e.g. runs/tiny/round_2/ppm), or drop them (greedy and maj@K need no PPM)"
            )
        if self.ppm_backend not in ("transformers", "vllm"):
            raise ValueError(f"EvalConfig.ppm_backend must be 'transformers' or 'vllm', got {self.ppm_backend!r}")
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"EvalConfig.limit must be >= 1 (or None for all problems), got {self.limit}")

    @property
    def method_specs(self) -> list[MethodSpec]:
        return [MethodSpec.parse(m, self.num_rollouts, self.num_candidates) for m in self.methods]

    def mcts_config(self, num_rollouts: int, num_candidates: int) -> MCTSConfig:
        """The `MCTSConfig` of an mcts method: these settings with its budget (no shards: nothing to resume)."""
        settings = {f.name: getattr(self, f.name) for f in fields(MCTSConfig)}
        return MCTSConfig(**{**settings, "num_rollouts": num_rollouts, "num_candidates": num_candidates,
                             "output_dir": None})  # fmt: skip


def load_eval_problems(dataset: str, split: str = "test", limit: int | None = None) -> Dataset:
    """Problems with gold answers: an embedded tiny split ("tiny-test", "tiny-train") or anything `load_problems`
    reads. A source without an answer column is an error that says so."""
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


# -- step-wise solutions --------------------------------------------------------------------------------------


@dataclass
class Trajectory:
    """One solution being written (or written) step by step.

    Args:
        problem: index of its problem.
        sample: index of the sample (or beam slot) within its problem.
        prompt: the policy prompt (question included).
        text: the solution so far, as the search writes it (a final step also holds the output block and answer).
        steps: its parsed steps.
        tokens: tokens generated for it, failed attempts included.
        failures: failed attempts at the next step in a row.
        end: why it ended: "answer", "max_depth", "errors", "context_full" (None while unfinished).
        answer: the extracted final answer.
        score: the PPM's value of the whole text, when scored.
    """

    problem: int
    sample: int
    prompt: str
    text: str = ""
    steps: list[Step] = field(default_factory=list)
    tokens: int = 0
    failures: int = 0
    end: str | None = None
    answer: str | None = None
    score: float | None = None

    @property
    def depth(self) -> int:
        return len(self.steps)


@dataclass
class _Proposal:
    """A candidate next step of a trajectory: valid (`error` is None) or why not."""

    text: str
    tokens: int
    step: Step | None = None
    error: str | None = None
    output: str = ""

    @property
    def final(self) -> bool:
        return self.step is not None and self.step.is_final


def propose_steps(
    backend: GenerationBackend,
    executor: PythonExecutor,
    args: MCTSConfig,
    trajectories: Sequence[Trajectory],
    n: int,
    temperature: float,
    seeds: Sequence[int],
) -> list[list[_Proposal]]:
    """`n` candidate next steps of every trajectory: ONE step generation call, ONE `run_batch`, ONE answer generation
    call for the candidates that closed their program. A candidate is invalid (`error` set to the reason) by the rule
    the search uses too (`rstar_trl.search.steps`): no step marker, an empty step, an answer without a closed and
    executed program (unless `args.allow_unexecuted_answers`), a failing program, a closed program printing nothing."""
    samples = backend.generate(
        [t.prompt + t.text for t in trajectories], n, STEP_STOP_STRINGS, args.max_step_tokens, temperature,
        args.top_p, seeds,
    )  # fmt: skip
    proposals: list[list[_Proposal]] = []
    to_run: list[tuple[_Proposal, str]] = []
    for trajectory, completions in zip(trajectories, samples):
        row = []
        for completion in completions:
            step, error = check_completion(completion, args.allow_unexecuted_answers)
            text = "" if error == "context_full" else completion.text
            proposal = _Proposal(text, completion.num_tokens, step, error)
            if error is None and needs_execution(completion.text):
                to_run.append((proposal, build_program([*trajectory.steps, step])))
            row.append(proposal)
        proposals.append(row)
    for (proposal, _), result in zip(to_run, executor.run_batch([program for _, program in to_run])):
        proposal.output = result.output
        proposal.error = check_execution(proposal.step, result)
    closed = [
        (i, j)
        for i, row in enumerate(proposals)
        for j, p in enumerate(row)
        if p.error is None and closes_program(p.text)
    ]
    for i, j in closed:
        p = proposals[i][j]
        p.text = f"{p.text}\n{OUTPUT_START}{p.output.strip()}{OUTPUT_END}\n"
    if closed:
        answers = backend.generate(
            [trajectories[i].prompt + trajectories[i].text + proposals[i][j].text for i, j in closed], 1,
            ANSWER_STOP_STRINGS, args.max_answer_tokens, temperature, args.top_p,
            [mix_seed(seeds[i], j, 1) for i, j in closed],
        )  # fmt: skip
        for (i, j), (answer,) in zip(closed, answers):
            proposals[i][j].text += answer.text
            proposals[i][j].tokens += answer.num_tokens
    for row in proposals:
        for p in row:
            if p.error is None:
                p.step = parse_step(p.text)
                if not p.final:
                    p.text += "\n"  # as MCTS stores a step: the next one starts on a new line
    return proposals


def _accept(trajectory: Trajectory, proposal: _Proposal, max_depth: int) -> None:
    """Append a valid step; the trajectory ends at an answer or at max_depth."""
    trajectory.text += proposal.text
    trajectory.steps.append(proposal.step)
    trajectory.failures = 0
    if proposal.final:
        trajectory.end = "answer"
        trajectory.answer = extract_answer(proposal.step.answer or "")
    elif trajectory.depth >= max_depth:
        trajectory.end = "max_depth"


def _waves(num_problems: int, limit: int, desc: str) -> Iterator[list[int]]:
    """The problems in flight, wave by wave: at most `limit` at once, started in index order, refilled as others
    finish. Each wave yields the list of problems in flight; the caller removes the finished ones from it in place,
    and the progress bar counts them."""
    queue = deque(range(num_problems))
    active: list[int] = []
    with tqdm(total=num_problems, desc=desc, unit="problem") as progress:
        while queue or active:
            while queue and len(active) < limit:
                active.append(queue.popleft())
            in_flight = len(active)
            yield active
            progress.update(in_flight - len(active))


def sample_solutions(
    backend: GenerationBackend,
    executor: PythonExecutor,
    args: MCTSConfig,
    prompts: Sequence[str],
    num_samples: int,
    temperature: float,
    desc: str = "sampling",
) -> list[list[Trajectory]]:
    """`num_samples` step-wise solutions of every prompt (result[i][j]: sample j of prompt i). Up to
    `args.problems_in_flight` problems are in flight; each wave advances all their unfinished solutions by one step
    with one generation call, one `run_batch` and one answer call."""
    results = [[Trajectory(i, j, prompts[i]) for j in range(num_samples)] for i in range(len(prompts))]
    for active in _waves(len(prompts), args.problems_in_flight, desc):
        live = [t for i in active for t in results[i] if t.end is None]
        seeds = [mix_seed(args.seed, _SAMPLE_STREAM, t.problem, t.sample, t.depth, t.failures) for t in live]
        for trajectory, (proposal,) in zip(live, propose_steps(backend, executor, args, live, 1, temperature, seeds)):
            trajectory.tokens += proposal.tokens
            if proposal.error is None:
                _accept(trajectory, proposal, args.max_depth)
            elif proposal.error == "context_full":
                trajectory.end = "context_full"
            else:
                trajectory.failures += 1
                # Greedy decoding would write the same failing step again.
                if trajectory.failures >= args.max_consecutive_errors or temperature == 0:
                    trajectory.end = "errors"
        active[:] = [i for i in active if any(t.end is None for t in results[i])]
    return results


def select_top(scores: Sequence[float], k: int) -> list[int]:
    """Indices of the `k` highest scores, best first (ties: the earlier index)."""
    return sorted(range(len(scores)), key=lambda i: (-scores[i], i))[: max(k, 0)]


@dataclass
class BeamResult:
    """The outcome of one problem's beam search: the finished beams (with PPM scores), the best one, tokens."""

    finished: list[Trajectory]
    tokens: int
    best: Trajectory | None


def beam_search(
    backend: GenerationBackend,
    executor: PythonExecutor,
    scorer: StepScorer,
    args: MCTSConfig,
    questions: Sequence[str],
    width: int,
    num_candidates: int,
    desc: str = "beam search",
) -> list[BeamResult]:
    """Step-level beam search with the PPM. Every wave, each live beam of every problem proposes `num_candidates`
    next steps (one generation call, one `run_batch`, one answer call for all problems); ONE PPM call scores every
    valid candidate (prefix + step); per problem the top candidates by score fill the free slots, and those that
    end (an answer, or max_depth) leave the beam. A problem starts with `width` slots and ends when every slot has
    ended, or after `max_consecutive_errors` waves in a row without a valid candidate. The answer is that of the
    finished beam with the highest PPM score."""
    prompts = [format_prompt(q, args.template) for q in questions]
    beams = [[Trajectory(i, 0, prompts[i])] for i in range(len(prompts))]
    ended: list[list[Trajectory]] = [[] for _ in prompts]
    tokens = [0] * len(prompts)
    failures = [0] * len(prompts)
    for active in _waves(len(prompts), args.problems_in_flight, desc):
        live = [beam for i in active for beam in beams[i]]
        seeds = [mix_seed(args.seed, _BEAM_STREAM, b.problem, b.depth, b.sample, failures[b.problem]) for b in live]
        proposals = propose_steps(backend, executor, args, live, num_candidates, args.temperature, seeds)
        pools: dict[int, list[Trajectory]] = {i: [] for i in active}
        for beam, row in zip(live, proposals):
            seen = {t.text for t in pools[beam.problem]}
            for proposal in row:
                tokens[beam.problem] += proposal.tokens
                if proposal.error is not None or beam.text + proposal.text in seen:
                    continue
                child = Trajectory(beam.problem, 0, beam.prompt, beam.text, list(beam.steps))
                _accept(child, proposal, args.max_depth)
                seen.add(child.text)
                pools[beam.problem].append(child)
        candidates = [t for i in active for t in pools[i]]
        if candidates:  # ONE scoring call for all problems
            scores = scorer.score([questions[t.problem] for t in candidates], [t.text for t in candidates])
            for trajectory, score in zip(candidates, scores):
                trajectory.score = float(score)
        still_active = []
        for i in active:
            pool = pools[i]
            if not pool:
                failures[i] += 1
                if failures[i] < args.max_consecutive_errors:
                    still_active.append(i)
                continue
            failures[i] = 0
            kept = [pool[k] for k in select_top([t.score for t in pool], width - len(ended[i]))]
            beams[i] = [t for t in kept if t.end is None]
            for slot, beam in enumerate(beams[i]):
                beam.sample = slot
            ended[i] += [t for t in kept if t.end is not None]
            if beams[i]:
                still_active.append(i)
        active[:] = still_active
    results = []
    for i in range(len(prompts)):
        finished = [t for t in ended[i] if t.end == "answer"]
        best = max(finished, key=lambda t: t.score, default=None)
        results.append(BeamResult(finished, tokens[i], best))
    return results


# -- voting ---------------------------------------------------------------------------------------------------


def majority_vote(answers: Sequence[str | None]) -> int | None:
    """The index of the first answer of the largest group of equal answers, or None when no sample has one.

    Answers are grouped by their whitespace-free text first, then a new text joins the first group whose
    representative it grades equal to (`grade_answer`), so `2`, `2.0` and `\\frac{4}{2}` are one vote. Ties go to the
    group whose first answer came first."""
    representatives: list[int] = []
    counts: list[int] = []
    group_of_text: dict[str, int] = {}
    for index, answer in enumerate(answers):
        if answer is None:
            continue
        key = re.sub(r"\s+", "", answer)
        group = group_of_text.get(key)
        if group is None:
            group = next((g for g, rep in enumerate(representatives) if grade_answer(answer, answers[rep])), None)
            if group is None:
                group = len(representatives)
                representatives.append(index)
                counts.append(0)
            group_of_text[key] = group
        counts[group] += 1
    if not representatives:
        return None
    return representatives[max(range(len(counts)), key=lambda g: (counts[g], -g))]


# -- the evaluator --------------------------------------------------------------------------------------------


class _TokenMeter(GenerationBackend):
    """A backend that passes every call through and adds each completion's tokens to the problem whose prompt the
    request extends (MCTS reports only a total)."""

    def __init__(self, backend: GenerationBackend, prompts: Sequence[str]):
        self.backend = backend
        self.tokens = [0] * len(prompts)
        self._problem_of_prompt: dict[str, int] = {}
        for i, prompt in enumerate(prompts):
            self._problem_of_prompt.setdefault(prompt, i)
        self._lengths = sorted({len(p) for p in prompts}, reverse=True)

    @property
    def max_context(self) -> int | None:
        return self.backend.max_context

    def count_tokens(self, texts):
        return self.backend.count_tokens(texts)

    def generate(self, prompts, n, stop, max_new_tokens, temperature=1.0, top_p=1.0, seed=0):
        results = self.backend.generate(prompts, n, stop, max_new_tokens, temperature, top_p, seed)
        for prompt, completions in zip(prompts, results):
            problem = next(
                (i for length in self._lengths if (i := self._problem_of_prompt.get(prompt[:length])) is not None),
                None,
            )
            if problem is not None:
                self.tokens[problem] += sum(c.num_tokens for c in completions)
        return results


class Evaluator(Closeable):
    """Evaluate a policy (and a PPM) on problems with gold answers by every method of `args.methods`.

    Args:
        model: the policy: a path or Hub id, a loaded causal LM (with `processing_class`), or a `GenerationBackend`.
            Default: `args.model_name_or_path`.
        args: the settings (`EvalConfig`).
        eval_dataset: problems with `problem` and `answer` columns (`load_eval_problems`). Default: `args.dataset`.
        processing_class: the tokenizer of a loaded model.
        ppm: a `StepScorer` (e.g. `TransformersPPMScorer`). Default: built from `args.ppm_path` when a method needs it.

    Example:
        >>> args = EvalConfig(model_name_or_path="runs/tiny/round_1/policy", methods=["greedy", "maj@8"], limit=50)
        >>> results = Evaluator(args=args).evaluate()
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
                "grades against gold answers; load benchmark files with rstar_trl.load_problems"
            )
        if len(eval_dataset) == 0:
            raise ValueError("eval_dataset is empty: there are no problems to evaluate")
        self.dataset = eval_dataset
        self.questions = [str(p) for p in eval_dataset["problem"]]
        self.golds = [None if a is None else str(a) for a in eval_dataset["answer"]]
        model = model if model is not None else self.args.model_name_or_path
        if model is None:
            raise ValueError("no policy to evaluate: pass --model_name_or_path (e.g. runs/tiny/round_1/policy)")
        self.model_name = model if isinstance(model, str) else type(model).__name__
        self.backend = build_backend(model, self.args, processing_class)
        self._owns_backend = self.backend is not model
        self._ppm = ppm
        self._owns_ppm = False
        self._samples: list[list[Trajectory]] | None = None
        self._samples_time = 0.0
        self._sample_scores_time: float | None = None
        self._shared_time = 0.0  # seconds spent on work several methods share

    @property
    def ppm(self) -> StepScorer:
        """The PPM scorer, built from `args.ppm_path` on first use."""
        if self._ppm is None:
            args = self.args
            if not args.ppm_path:
                raise ValueError("this method needs a process preference model: pass --ppm_path")
            if args.ppm_backend == "vllm":
                from .ppm import VLLMPPMScorer

                self._ppm = VLLMPPMScorer(
                    args.ppm_path, max_length=args.ppm_max_length, prompt_template=args.template,
                    gpu_memory_utilization=args.ppm_gpu_memory_utilization, dtype=args.dtype,
                )  # fmt: skip
            else:
                from .ppm import TransformersPPMScorer

                self._ppm = TransformersPPMScorer(
                    args.ppm_path, device=args.device, batch_size=args.ppm_batch_size, max_length=args.ppm_max_length,
                    prompt_template=args.template,
                )  # fmt: skip
            self._owns_ppm = True
        return self._ppm

    def close(self) -> None:
        """Release the engines this evaluator built (policy backend, PPM scorer); ones passed in are left to their
        owner. Also done on leaving a `with Evaluator(...) as evaluator:` block."""
        if self._owns_backend:
            self.backend.close()
            self._owns_backend = False
        if self._owns_ppm:
            self._ppm.close()
            self._owns_ppm = False

    def evaluate(self) -> dict:
        """Run every method; returns the results (what `write_report` saves): settings, one summary per method and
        one record per problem and method."""
        args = self.args
        start = time.perf_counter()
        executor = PythonExecutor(
            timeout=args.executor_timeout, memory_mb=args.executor_memory_mb, max_workers=args.executor_workers
        )
        methods = []
        try:
            for spec in self.specs:
                t0, shared_before = time.perf_counter(), self._shared_time
                records, charged = self._run(spec, executor)
                # Shared work (samples, their scores) done during this call is replaced by the share charged to it.
                elapsed = time.perf_counter() - t0 - (self._shared_time - shared_before) + charged
                methods.append(self._summary(spec, records, elapsed))
                logger.info(
                    "%s: accuracy %.1f%% (%d/%d), %.0f tokens per problem, %.1f s", spec.label,
                    100 * methods[-1]["accuracy"], methods[-1]["correct"], len(records),
                    methods[-1]["tokens_per_problem"], elapsed,
                )  # fmt: skip
        finally:
            executor.close()
        return {
            "model": self.model_name,
            "ppm": args.ppm_path,
            "dataset": args.dataset,
            "num_problems": len(self.questions),
            "time_s": round(time.perf_counter() - start, 2),
            "settings": asdict(args),
            "methods": methods,
        }

    def _summary(self, spec: MethodSpec, records: list[dict], elapsed: float) -> dict:
        n = len(records)
        correct = sum(r["correct"] for r in records)
        tokens = sum(r["tokens"] for r in records)
        return {
            "method": spec.label,
            "name": spec.name,
            "budget": list(spec.budget),
            "num_problems": n,
            "correct": correct,
            "accuracy": correct / n,
            "answered": sum(r["answer"] is not None for r in records) / n,
            "tokens_per_problem": tokens / n,
            "total_tokens": tokens,
            "time_s": round(elapsed, 2),
            "problems": records,
        }

    def _record(self, index: int, answer: str | None, tokens: int, solution: str | None, **extra) -> dict:
        gold = self.golds[index]
        correct = answer is not None and gold is not None and grade_answer(answer, gold)
        return {"index": index, "gold": gold, "answer": answer, "correct": bool(correct), "tokens": int(tokens),
                "solution": solution, **extra}  # fmt: skip

    def _run(self, spec: MethodSpec, executor: PythonExecutor) -> tuple[list[dict], float]:
        """The per-problem records of one method, and the time of shared work charged to it."""
        if spec.name == "greedy":
            prompts = [format_prompt(q, self.args.template) for q in self.questions]
            solutions = sample_solutions(self.backend, executor, self.args, prompts, 1, 0.0, desc="greedy")
            return [self._record(i, t.answer, t.tokens, t.text, end=t.end) for i, (t,) in enumerate(solutions)], 0.0
        if spec.name in ("maj", "best_of_n"):
            return self._run_samples(spec, executor)
        if spec.name == "mcts":
            return self._run_mcts(*spec.budget), 0.0
        results = beam_search(
            self.backend, executor, self.ppm, self.args, self.questions, *spec.budget, desc=spec.label
        )  # fmt: skip
        return [
            self._record(i, r.best.answer if r.best else None, r.tokens, r.best.text if r.best else None,
                         score=r.best.score if r.best else None, finished_beams=len(r.finished))
            for i, r in enumerate(results)
        ], 0.0  # fmt: skip

    def _shared_samples(self, executor: PythonExecutor) -> list[list[Trajectory]]:
        """The samples all maj@K / best_of_n@N methods share, drawn once at the largest budget."""
        if self._samples is None:
            largest = max(s.budget[0] for s in self.specs if s.name in ("maj", "best_of_n"))
            prompts = [format_prompt(q, self.args.template) for q in self.questions]
            t0 = time.perf_counter()
            self._samples = sample_solutions(
                self.backend, executor, self.args, prompts, largest, self.args.temperature, desc=f"sampling {largest}"
            )  # fmt: skip
            self._samples_time = time.perf_counter() - t0
            self._shared_time += self._samples_time
        return self._samples

    def _run_samples(self, spec: MethodSpec, executor: PythonExecutor) -> tuple[list[dict], float]:
        samples = self._shared_samples(executor)
        (budget,) = spec.budget
        shared_time = self._samples_time
        if spec.name == "best_of_n" and self._sample_scores_time is None:
            t0 = time.perf_counter()
            answered = [t for row in samples for t in row if t.answer is not None]
            if answered:  # ONE scoring call: every answered sample, whole trajectory
                scores = self.ppm.score([self.questions[t.problem] for t in answered], [t.text for t in answered])
                for trajectory, score in zip(answered, scores):
                    trajectory.score = float(score)
            self._sample_scores_time = time.perf_counter() - t0
            self._shared_time += self._sample_scores_time
        if spec.name == "best_of_n":
            shared_time += self._sample_scores_time
        records = []
        used_tokens = sampled_tokens = 0
        for i, row in enumerate(samples):
            used = row[:budget]
            if spec.name == "maj":
                pick = majority_vote([t.answer for t in used])
                votes = None if pick is None else sum(
                    t.answer is not None and grade_answer(t.answer, used[pick].answer) for t in used
                )  # fmt: skip
                extra = {"votes": votes}
            else:
                scored = [k for k, t in enumerate(used) if t.score is not None]
                pick = max(scored, key=lambda k: (used[k].score, -k), default=None)
                extra = {"score": None if pick is None else used[pick].score}
            tokens = sum(t.tokens for t in used)
            used_tokens += tokens
            sampled_tokens += sum(t.tokens for t in row)
            chosen = used[pick] if pick is not None else None
            records.append(self._record(i, chosen.answer if chosen else None, tokens,
                                        chosen.text if chosen else None, **extra))  # fmt: skip
        # Shared work is charged in proportion to the tokens a method uses of it.
        return records, shared_time * (used_tokens / sampled_tokens if sampled_tokens else 0.0)

    def _run_mcts(self, num_rollouts: int, num_candidates: int) -> list[dict]:
        config = self.args.mcts_config(num_rollouts, num_candidates)
        meter = _TokenMeter(self.backend, [format_prompt(q, config.template) for q in self.questions])
        # Test-time mode: no answer column, so terminal nodes are valued by the PPM and backed up (SPEC §3).
        problems = Dataset.from_dict({"problem": self.questions})
        trees = MCTSGenerator(meter, config, problems, ppm=self.ppm).generate()
        return [
            self._record(i, row["best_answer"], meter.tokens[i], row["best_trajectory"], status=row["status"])
            for i, row in enumerate(trees)
        ]


# -- reports --------------------------------------------------------------------------------------------------


def results_table(results: dict) -> str:
    """The results as a markdown table, one row per method (in the order they ran)."""
    lines = [
        f"Policy `{results['model']}`" + (f", PPM `{results['ppm']}`" if results.get("ppm") else "")
        + f" on `{results['dataset']}` ({results['num_problems']} problems, {results['time_s']:.0f} s).",
        "",
        "| method | accuracy | correct | answered | tokens / problem | time (s) |",
        "|---|---:|---:|---:|---:|---:|",
    ]  # fmt: skip
    for m in results["methods"]:
        lines.append(
            f"| {m['method']} | {100 * m['accuracy']:.1f}% | {m['correct']}/{m['num_problems']} | "
            f"{100 * m['answered']:.0f}% | {m['tokens_per_problem']:.0f} | {m['time_s']:.1f} |"
        )
    lines += [
        "",
        "Tokens: every generated token (steps, answers, failed attempts) per problem. maj@K and best_of_n@N share one "
        "set of samples; each is charged its own tokens and the sampling time in proportion to them (the time it would"
        " take alone), so the times add up to more than the run's.",
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
        by_name.setdefault(m["name"], []).append(m)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, runs in by_name.items():
        runs = sorted(runs, key=lambda m: m["tokens_per_problem"])
        xs = [m["tokens_per_problem"] for m in runs]
        ys = [100 * m["accuracy"] for m in runs]
        ax.plot(xs, ys, marker="o", label=name)
        for m, x, y in zip(runs, xs, ys):
            budget = "x".join(str(b) for b in m["budget"])
            if budget:  # the legend names the method; points show their budgets
                ax.annotate(budget, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set_xscale("log")
    ax.set_ylim(0, min(100, 5 + max(100 * m["accuracy"] for m in results["methods"])))
    ax.set_xlabel("generated tokens per problem")
    ax.set_ylabel("accuracy (%)")
    ax.set_title(f"{os.path.basename(str(results['model']).rstrip('/'))} on {results['dataset']} "
                 f"({results['num_problems']} problems)")  # fmt: skip
    ax.grid(True, alpha=0.3)
    ax.legend()
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


_CARD_SECTION = "<!-- rstar_trl:eval {dataset} -->"


def add_eval_to_cards(results: dict, folders: Sequence[str | None]) -> list[str]:
    """Put the results table in the `README.md` model card of each local checkpoint folder (policy, PPM) as an
    "Evaluation" section for the dataset; a section for the same dataset is replaced, others are kept. Returns the
    cards written; folders without a card (or not local) are skipped."""
    written = []
    start = _CARD_SECTION.format(dataset=results["dataset"])
    end = start.replace("<!-- ", "<!-- end ")
    section = f"{start}\n## Evaluation on {results['dataset']}\n\n{results_table(results)}{end}\n"
    for folder in folders:
        card = os.path.join(folder, "README.md") if folder else None
        if not card or not os.path.isfile(card):
            continue
        with open(card) as f:
            text = f.read()
        if start in text and end in text:
            text = text[: text.index(start)] + section + text[text.index(end) + len(end) + 1 :]
        else:
            text = text.rstrip("\n") + "\n\n" + section
        with open(card, "w") as f:
            f.write(text)
        written.append(card)
    return written


def _jsonable(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return str(value)
