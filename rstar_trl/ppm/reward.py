"""The PPM as a reward for TRL's online trainers (`GRPOTrainer(reward_funcs=[...])` and the others that take reward
functions): step-level values of a process preference model (paper §3.3, Eq. 4), aggregated over a completion.

    >>> from trl import GRPOConfig, GRPOTrainer
    >>> from rstar_trl.ppm import CompletionJudge, CorrectnessReward, PPMReward
    >>> judge = CompletionJudge("runs/tiny/round_2/policy")            # splits and executes completions, shared
    >>> rewards = [PPMReward("runs/tiny/round_2/ppm", judge=judge), CorrectnessReward(judge=judge)]
    >>> trainer = GRPOTrainer(model="runs/tiny/round_2/policy", reward_funcs=rewards, train_dataset=dataset,
    ...                       args=GRPOConfig(reward_weights=[1.0, 1.0], ...))

A completion is judged the way the search would have written it. A sampled completion is one piece of text: in
our step format (`rstar_trl.format`) the policy also writes an `<output>` block after closing its program, a guess,
where during search and at test time the executor writes that block before the policy writes its answer. So the
judge splits the completion into steps, runs every step's cumulative program in the sandbox (§3.2: step i is
checked by running steps 1..i), replaces the policy's output block by what the program really printed, and gives
the PPM the prefixes the search would have scored: `ppm_text(prompt, steps 1..i)`, one per step. A completion the
search would have rejected (a failing program, a closed program printing nothing, no answer, cut off at the length
limit) gets `invalid_reward`.

`PPMReward` aggregates the step values (`min`, `last`, `mean` or `prod`, as `best_of_n` does at test time);
`CorrectnessReward` is 1 when the executed program prints the gold answer, else 0. Give TRL both, with
`reward_weights`, to combine them; pass one `CompletionJudge` to both so every program runs once.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from transformers import AutoTokenizer, PreTrainedTokenizerBase

from ..closing import Closeable
from ..executor import PythonExecutor
from ..format import CODE_END, STEP_END, STEP_MARKERS, Step, build_program, render_steps, split_steps
from ..grading import extract_answer, grade_answer
from .scorer import PPMScorer, load_ppm_scorer

logger = logging.getLogger(__name__)

__all__ = ["AGGREGATIONS", "CompletionJudge", "CorrectnessReward", "JudgedCompletion", "PPMReward"]

# How the step values of a completion become one reward (`rstar_trl.solve.aggregate_step_scores`); "product" is
# accepted for "prod".
AGGREGATIONS = ("min", "last", "mean", "prod")


@dataclass
class JudgedCompletion:
    """A completion as the search would have written it.

    Args:
        steps: its steps, the final one with the executed program's output (empty when it has none).
        prefixes: the solution after each step, as the PPM reads it (`render_steps` of steps 1..i).
        output: what the final program printed (None without a final step).
        answer: the answer the policy stated (None without one).
        error: why the search would have rejected it (None when valid): "no_steps", "no_step_marker" (cut off),
            "code_error", "timeout", "no_output", "no_answer".
    """

    steps: list[Step] = field(default_factory=list)
    prefixes: list[str] = field(default_factory=list)
    output: str | None = None
    answer: str | None = None
    error: str | None = None

    @property
    def valid(self) -> bool:
        return self.error is None


class CompletionJudge(Closeable):
    """Splits completions into steps, executes their programs, and remembers the result (shared by the rewards).

    Args:
        tokenizer: the policy's tokenizer (object or path), used to decode `completion_ids` with the step markers
            kept (TRL decodes completions with `skip_special_tokens=True`, which drops the markers when they are
            special tokens, as `add_step_tokens` makes them). Without one, completions are read as the text TRL
            passes, which then must contain the markers.
        executor: a `PythonExecutor` (default: one is started on first use, `executor_timeout` seconds per program,
            and closed by `close()`).
        executor_timeout: seconds per program of the default executor.
        cache_size: judged completions remembered (so that several rewards of one batch execute once).
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase | str | None = None, executor: PythonExecutor | None = None,
                 executor_timeout: float = 10.0, cache_size: int = 4096):  # fmt: skip
        self.tokenizer = AutoTokenizer.from_pretrained(tokenizer) if isinstance(tokenizer, str) else tokenizer
        self._executor = executor
        self._owns_executor = executor is None
        self.executor_timeout = executor_timeout
        self.cache_size = cache_size
        self._cache: OrderedDict[str, JudgedCompletion] = OrderedDict()

    @property
    def executor(self) -> PythonExecutor:
        if self._executor is None:
            self._executor = PythonExecutor(timeout=self.executor_timeout)
        return self._executor

    def texts(self, completions: Sequence[Any], completion_ids: Sequence[Sequence[int]] | None = None) -> list[str]:
        """The completion texts with their step markers: decoded from `completion_ids` when a tokenizer is set,
        else the completions themselves (a conversational completion's last message content)."""
        if completion_ids is not None and self.tokenizer is not None:
            if len(completion_ids) != len(completions):
                raise ValueError(f"got {len(completions)} completions but {len(completion_ids)} completion_ids")
            stops = {self.tokenizer.pad_token_id, self.tokenizer.eos_token_id} - {None}
            texts = []
            for ids in completion_ids:
                ids = [int(i) for i in ids]
                while ids and ids[-1] in stops and ids[-1] not in self._marker_ids:
                    ids.pop()  # TRL keeps the EOS (and pads) in completion_ids
                texts.append(self.tokenizer.decode(ids, skip_special_tokens=False))
            return texts
        texts = []
        for completion in completions:
            if isinstance(completion, list):  # conversational: [{"role": "assistant", "content": ...}]
                completion = completion[-1]["content"] if completion else ""
            if not isinstance(completion, str):
                raise ValueError(f"a completion must be a string or a list of messages, got {type(completion)}")
            texts.append(completion)
        return texts

    @property
    def _marker_ids(self) -> set[int]:
        ids = self.tokenizer.convert_tokens_to_ids(list(STEP_MARKERS)) if self.tokenizer is not None else []
        return {i for i in ids if i is not None and i != self.tokenizer.unk_token_id}

    def judge(self, texts: Sequence[str]) -> list[JudgedCompletion]:
        """Judge completion texts: one `run_batch` for the programs of all completions not judged before."""
        todo = {text: _split(text) for text in dict.fromkeys(texts) if text not in self._cache}
        programs = [
            build_program(steps[: i + 1]) for steps, error in todo.values() if error is None for i in range(len(steps))
        ]
        results = iter(self.executor.run_batch(programs) if programs else [])
        for text, (steps, error) in todo.items():
            if error is not None:
                self._remember(text, JudgedCompletion(steps=steps, error=error))
            else:
                self._remember(text, _check(steps, [next(results) for _ in steps]))
        for text in texts:
            self._cache.move_to_end(text)
        return [self._cache[text] for text in texts]

    def _remember(self, text: str, judged: JudgedCompletion) -> None:
        self._cache[text] = judged
        while len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)

    def close(self) -> None:
        """Stop the executor this judge started."""
        if self._owns_executor and self._executor is not None:
            self._executor.close()
            self._executor = None


def _split(text: str) -> tuple[list[Step], str | None]:
    """The steps of a completion, and why the search would reject it before running anything (None: not yet)."""
    steps = split_steps(text)
    if not steps:
        return [], "no_steps"
    if not steps[-1].is_final:  # stopped (length limit, EOS) without closing the program
        return steps, "no_answer" if text.rstrip().endswith(STEP_END) else "no_step_marker"
    if CODE_END not in text:
        return steps, "no_output"  # an answer without a closed, executed program
    return steps, None


def _check(steps: list[Step], results: list) -> JudgedCompletion:
    """A completion's verdict from the execution of its cumulative programs (the search's step checks)."""
    for step, result in zip(steps, results):
        if not result.ok:
            return JudgedCompletion(steps=steps, error="timeout" if result.timed_out else "code_error")
        if step.is_final and not result.output.strip():
            return JudgedCompletion(steps=steps, error="no_output")
    final = steps[-1]
    output = results[-1].output.strip()
    answer = final.answer
    if answer is None or not answer.strip():
        return JudgedCompletion(steps=steps, output=output, error="no_answer")
    steps = [*steps[:-1], Step(final.comment, final.code, is_final=True, output=output, answer=answer)]
    prefixes = [render_steps(steps[: i + 1]) for i in range(len(steps))]
    return JudgedCompletion(steps=steps, prefixes=prefixes, output=output, answer=answer)


def _column(kwargs: Mapping[str, Any], name: str, count: int, what: str) -> list:
    if name not in kwargs:
        columns = sorted(k for k in kwargs if k not in ("trainer_state", "log_extra", "log_metric", "environments"))
        raise ValueError(
            f"{what} needs the dataset column {name!r} (TRL passes the dataset's columns to reward functions); the "
            f"batch has {columns}. Add it to the dataset or set the reward's column name."
        )
    values = list(kwargs[name])
    if len(values) != count:
        raise ValueError(f"column {name!r} has {len(values)} values for {count} completions")
    return values


class _Reward(Closeable):
    """What the rewards share: a `__name__` (TRL logs rewards under it) and a judge."""

    __name__ = "reward"

    def __init__(self, judge: CompletionJudge | None, tokenizer):
        self._owns_judge = judge is None
        self.judge = judge if judge is not None else CompletionJudge(tokenizer)

    def _judged(self, completions, completion_ids) -> list[JudgedCompletion]:
        return self.judge.judge(self.judge.texts(completions, completion_ids))

    def close(self) -> None:
        if self._owns_judge:
            self.judge.close()


class PPMReward(_Reward):
    """The PPM's aggregated step values of each completion, a reward function for TRL's online trainers.

    Called by TRL as `reward(prompts=..., completions=..., completion_ids=..., **dataset_columns)`; returns one float
    per completion. All steps of all valid completions of a batch are scored in one scorer call.

    Args:
        ppm: a PPM checkpoint (path or Hub id) or any `PPMScorer` (`TransformersPPMScorer`, `VLLMPPMScorer`, a server
            scorer): the values it returns are used as they are.
        aggregation: "min" (the weakest step), "last" (the value of the whole solution), "mean", or "prod" (the
            product of (v + 1) / 2) of the step values; "product" is the same as "prod".
        backend: with a checkpoint path: "transformers" or "vllm" (vLLM's pooling runner).
        judge: a `CompletionJudge` to share with other rewards; default: a new one with `tokenizer`.
        tokenizer: the policy's tokenizer (object or path) for the default judge; default: the PPM's (a PPM
            initialised from the policy shares its vocabulary).
        problem_column: the dataset column with the question the PPM reads (formatted with the scorer's prompt
            template, like the search does).
        invalid_reward: the reward of a completion the search would have rejected (default -1, the lowest value).
        scorer_kwargs: passed to the scorer built from a path (e.g. `device`, `batch_size`, `max_length`,
            `prompt_template`, `gpu_memory_utilization`).
    """

    def __init__(self, ppm: str | PPMScorer, aggregation: str = "min", backend: str = "transformers",
                 judge: CompletionJudge | None = None, tokenizer: PreTrainedTokenizerBase | str | None = None,
                 problem_column: str = "problem", invalid_reward: float = -1.0, **scorer_kwargs):  # fmt: skip
        aggregation = "prod" if aggregation == "product" else aggregation
        if aggregation not in AGGREGATIONS:
            raise ValueError(f"unknown aggregation {aggregation!r}: use one of {list(AGGREGATIONS)} (or 'product')")
        if isinstance(ppm, str):
            if backend == "transformers" and "device" not in scorer_kwargs:
                from accelerate import PartialState

                scorer_kwargs["device"] = PartialState().device  # this process's device under accelerate
            self.scorer: PPMScorer = load_ppm_scorer(ppm, backend, **scorer_kwargs)
            self._owns_scorer = True
        elif isinstance(ppm, PPMScorer) or callable(getattr(ppm, "score", None)):
            if scorer_kwargs:
                raise ValueError(f"scorer options {sorted(scorer_kwargs)} only apply when ppm is a checkpoint path")
            self.scorer, self._owns_scorer = ppm, False
        else:
            raise ValueError(f"ppm must be a checkpoint path or a PPMScorer, got {type(ppm).__name__}")
        if tokenizer is None and judge is None:
            tokenizer = getattr(self.scorer, "tokenizer", None)
        super().__init__(judge, tokenizer)
        self.aggregation = aggregation
        self.problem_column = problem_column
        self.invalid_reward = float(invalid_reward)
        self.__name__ = f"ppm_{aggregation}"

    def step_values(self, questions: Sequence[str], judged: Sequence[JudgedCompletion]) -> list[list[float] | None]:
        """The PPM value of every step prefix of each valid completion (None for an invalid one), in one call."""
        flat_questions, flat_prefixes = [], []
        for question, item in zip(questions, judged):
            if item.valid:
                flat_questions += [question] * len(item.prefixes)
                flat_prefixes += item.prefixes
        values = iter(self.scorer.score(flat_questions, flat_prefixes) if flat_prefixes else [])
        return [[next(values) for _ in item.prefixes] if item.valid else None for item in judged]

    def __call__(self, prompts=None, completions=None, completion_ids=None, **kwargs) -> list[float]:
        from ..solve import aggregate_step_scores

        judged = self._judged(completions, completion_ids)
        questions = _column(kwargs, self.problem_column, len(judged), "PPMReward")
        rewards = []
        for values in self.step_values(questions, judged):
            rewards.append(self.invalid_reward if values is None else aggregate_step_scores(values, self.aggregation))
        return rewards

    def close(self) -> None:
        """Release the scorer this reward built (its engine) and the judge's executor if it started it."""
        if self._owns_scorer and hasattr(self.scorer, "close"):
            self.scorer.close()
        super().close()


class CorrectnessReward(_Reward):
    """1.0 when a completion's executed program prints the gold answer, else 0.0 (also for a rejected completion).

    The printed output is graded, not the answer the policy wrote after its own guess of the output: at test time
    the executor writes the output before the policy answers (see the module docstring). `graded="answer"` grades
    the written answer instead.

    Args:
        judge: a `CompletionJudge` to share with other rewards (so programs run once); default: a new one.
        tokenizer: the policy's tokenizer (object or path) for the default judge.
        answer_column: the dataset column with the gold answer.
        graded: "output" (what the program printed) or "answer" (the answer block the policy wrote).
    """

    __name__ = "correct"

    def __init__(self, judge: CompletionJudge | None = None, tokenizer: PreTrainedTokenizerBase | str | None = None,
                 answer_column: str = "answer", graded: str = "output"):  # fmt: skip
        if graded not in ("output", "answer"):
            raise ValueError(f"graded must be 'output' or 'answer', got {graded!r}")
        super().__init__(judge, tokenizer)
        self.answer_column = answer_column
        self.graded = graded

    def __call__(self, prompts=None, completions=None, completion_ids=None, **kwargs) -> list[float]:
        judged = self._judged(completions, completion_ids)
        golds = _column(kwargs, self.answer_column, len(judged), "CorrectnessReward")
        rewards = []
        for item, gold in zip(judged, golds):
            stated = item.output if self.graded == "output" else extract_answer(item.answer or "")
            rewards.append(float(item.valid and stated is not None and grade_answer(stated, str(gold))))
        return rewards
