"""rstar_trl: rStar-Math (code-augmented MCTS, process preference model, self-evolution) on the TRL stack."""

__version__ = "0.1.0.dev0"

from .data import load_problems
from .executor import ExecutionResult, PythonExecutor
from .format import (
    ANSWER_END,
    ANSWER_START,
    CODE_END,
    CODE_START,
    FEW_SHOT_PROMPT,
    OUTPUT_END,
    OUTPUT_START,
    POLICY_PROMPT,
    STEP_END,
    STEP_MARKERS,
    STEP_STOP_STRINGS,
    Step,
    add_step_tokens,
    build_program,
    few_shot_prompt,
    format_prompt,
    parse_step,
    render_step,
    render_steps,
    render_trajectory,
    split_steps,
)
from .grading import extract_answer, grade_answer

__all__ = [
    "ANSWER_END",
    "ANSWER_START",
    "CODE_END",
    "CODE_START",
    "FEW_SHOT_PROMPT",
    "OUTPUT_END",
    "OUTPUT_START",
    "POLICY_PROMPT",
    "STEP_END",
    "STEP_MARKERS",
    "STEP_STOP_STRINGS",
    "ExecutionResult",
    "PythonExecutor",
    "Step",
    "add_step_tokens",
    "build_program",
    "extract_answer",
    "few_shot_prompt",
    "format_prompt",
    "grade_answer",
    "load_problems",
    "parse_step",
    "render_step",
    "render_steps",
    "render_trajectory",
    "split_steps",
]
