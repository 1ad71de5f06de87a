"""The one rule for which sampled steps become part of a solution, shared by the search and the evaluation.

A candidate next step is checked in two stages (see docs/method.md, "Step format and execution rule"):

1. `check_completion`, on the sampled text alone: the sample must end with a step marker (a step cut off by the
   token budget is dropped), must hold something (a bare marker is no step), and, when it states an answer, must
   have closed a program first. The policy writes `<answer>` only after `<end_of_code>` and the executor's
   `<output>` block; a candidate that writes `<answer>` without that would be graded on an answer whose code never
   ran. Such candidates are dropped (`unexecuted_answer`) unless `allow_unexecuted_answers` is set, for policies
   that do not write code.
2. `check_execution`, after the cumulative program of steps 1..i has run (paper §3.2: a step is valid only if the
   code of the solution so far executes): it must not fail or time out, and a closed program must print the result
   the answer is read from.

Drop reasons are the strings in `DROP_REASONS`; the search counts them as `dropped_<reason>`.
"""

from __future__ import annotations

from ..executor import ExecutionResult
from ..format import CODE_END, STEP_END, Step, parse_step
from .backends import Completion

__all__ = ["DROP_REASONS", "check_completion", "check_execution", "closes_program", "needs_execution"]

DROP_REASONS = (
    "context_full",  # the prefix left no room to generate
    "no_step_marker",  # cut off by the token budget before a step marker
    "empty_step",  # a bare marker: no reasoning, no code, no answer
    "unexecuted_answer",  # an answer without a closed, executed program
    "code_error",  # the cumulative program raised
    "timeout",  # the cumulative program ran out of time
    "no_output",  # a closed program printed nothing
)


def closes_program(text: str) -> bool:
    """Whether a sampled step closes the program (`<end_of_code>`): the executor then writes the output block and
    the policy writes the answer."""
    return text.rstrip().endswith(CODE_END)


def needs_execution(text: str) -> bool:
    """Whether a sampled step's cumulative program must run: it ends a step or closes the program."""
    return text.rstrip().endswith((STEP_END, CODE_END))


def check_completion(completion: Completion, allow_unexecuted_answers: bool = False) -> tuple[Step | None, str | None]:
    """Stage 1: the parsed step of a sampled completion, or None and the reason it is dropped."""
    if completion.finish_reason == "prompt_too_long":
        return None, "context_full"
    if completion.finish_reason != "stop":
        return None, "no_step_marker"
    step = parse_step(completion.text)
    if not (step.comment.strip() or step.code.strip() or step.answer or step.is_final):
        return None, "empty_step"
    if step.is_final and not closes_program(completion.text) and not allow_unexecuted_answers:
        return None, "unexecuted_answer"
    return step, None


def check_execution(step: Step, result: ExecutionResult) -> str | None:
    """Stage 2: None when the cumulative program ending with `step` ran as a step must, else the drop reason."""
    if not result.ok:
        return "timeout" if result.timed_out else "code_error"
    if step.is_final and not result.output.strip():
        return "no_output"  # a closed program must print its result
    return None
