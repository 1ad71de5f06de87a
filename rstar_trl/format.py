"""The code-augmented chain-of-thought step format (paper §3.2).

A solution is one Python program written step by step. A trajectory, as the policy writes it after
the prompt (which already ends with ``<code>``), looks like::

    # Step 1: Tom starts with 23 apples.
    apples = 23
    <end_of_step>
    # Step 2: He buys 4 more.
    apples += 4
    print(apples)
    <end_of_code>
    <output>27<end_of_output>
    <answer>Tom has \\boxed{27} apples.<end_of_answer>

Intermediate steps end with ``<end_of_step>``; the final step closes the program with
``<end_of_code>``. The ``<output>`` block is written by the *executor*, not by the policy: after the
program is closed it is run and what it printed is spliced in before the policy writes the answer.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

CODE_START = "<code>"
STEP_END = "<end_of_step>"
CODE_END = "<end_of_code>"
OUTPUT_START = "<output>"
OUTPUT_END = "<end_of_output>"
ANSWER_START = "<answer>"
ANSWER_END = "<end_of_answer>"

STEP_MARKERS: tuple[str, ...] = (CODE_START, STEP_END, CODE_END, OUTPUT_START, OUTPUT_END, ANSWER_START, ANSWER_END)
# Generation of one step samples until one of these; the marker is kept in the step text.
STEP_STOP_STRINGS: tuple[str, ...] = (STEP_END, CODE_END, ANSWER_END)
# After the executor has written the output block, the policy only has the answer left to write.
ANSWER_STOP_STRINGS: tuple[str, ...] = (ANSWER_END,)

# The plain prompt of fine-tuned policies (rounds >= 2). `{question}` is replaced by the problem.
POLICY_PROMPT = (
    "<|user|>:\n{question}\n<|assistant|>: Let's think step by step and solve the problem with code.\n"
    + CODE_START
    + "\n"
)

_FEW_SHOT_INSTRUCTION = f"""You are a powerful agent with broad math knowledge and great Python programming skills. \
Solve the math problem step by step with Python code. Write each step as a `#` comment that reasons in words, \
followed by the code of that step, and end each step with {STEP_END}. Steps build one program: later steps may use \
the variables of earlier ones. In the last step, print the result and close the program with {CODE_END}. The \
program's output will be shown between {OUTPUT_START} and {OUTPUT_END}; then state the final answer in \\boxed{{}} \
between {ANSWER_START} and {ANSWER_END}.
"""

_FEW_SHOT_EXAMPLES = (
    (
        "A bakery sells muffins for $3 each and cookies for $2 each. Ana buys 4 muffins and 5 cookies. "
        "How many dollars does she spend?",
        [
            ("Cost of the muffins: 4 muffins at $3 each.", "muffins = 4 * 3"),
            ("Cost of the cookies: 5 cookies at $2 each.", "cookies = 5 * 2"),
            ("The total is the sum of both costs.", "total = muffins + cookies\nprint(total)"),
        ],
        "22",
        "Ana spends \\boxed{22} dollars.",
    ),
    (
        "Find the sum of all real solutions of $x^2 - 5x + 6 = 0$.",
        [
            (
                "Solve the quadratic equation symbolically.",
                "from sympy import symbols, solve\nx = symbols('x')\nroots = solve(x**2 - 5*x + 6, x)",
            ),
            ("Add the real roots and print the sum.", "print(sum(roots))"),
        ],
        "5",
        "The sum of the solutions is \\boxed{5}.",
    ),
)


@dataclass(frozen=True)
class Step:
    """One step of a code-augmented solution.

    Args:
        comment: the natural-language reasoning (the `#` lines, without `# `), lines joined by newlines.
        code: the Python code of the step (without the comment lines).
        is_final: whether the step closes the program (`<end_of_code>`) or states the answer.
        output: the program output spliced in by the executor after a final step, if any.
        answer: the text of the answer block (e.g. ``The answer is \\boxed{27}.``), if any.
    """

    comment: str = ""
    code: str = ""
    is_final: bool = False
    output: str | None = None
    answer: str | None = None

    @property
    def source(self) -> str:
        """The step as Python source: the comment lines, then the code."""
        lines = [f"# {line}" if line else "#" for line in self.comment.split("\n")] if self.comment else []
        if self.code:
            lines.append(self.code)
        return "\n".join(lines)


def format_prompt(question: str, template: str = POLICY_PROMPT) -> str:
    """Fill a prompt template (anything with a `{question}` field) with a problem."""
    if "{question}" not in template:
        raise ValueError("prompt template must contain a '{question}' placeholder")
    return template.replace("{question}", question)


def few_shot_prompt(num_shots: int = 2, instruction: str = _FEW_SHOT_INSTRUCTION) -> str:
    """The round-1 prompt template for a strong bootstrap model: an instruction and worked examples.

    Returns a template with a `{question}` field, usable wherever `POLICY_PROMPT` is.
    """
    if not 0 <= num_shots <= len(_FEW_SHOT_EXAMPLES):
        raise ValueError(f"num_shots must be in [0, {len(_FEW_SHOT_EXAMPLES)}], got {num_shots}")
    parts = [instruction]
    for question, steps, output, answer in _FEW_SHOT_EXAMPLES[:num_shots]:
        worked = [Step(comment, code) for comment, code in steps]
        worked[-1] = Step(worked[-1].comment, worked[-1].code, is_final=True, output=output, answer=answer)
        parts.append(format_prompt(question) + render_steps(worked))
    parts.append(POLICY_PROMPT)
    return "\n".join(parts)


def render_step(step: Step) -> str:
    """Render one step as the policy writes it (plus the executor's output block for a final step)."""
    if not step.is_final:
        return f"{step.source}\n{STEP_END}\n"
    closes_program = step.comment or step.code or step.output is not None
    text = f"{step.source}\n{CODE_END}\n" if closes_program else ""
    if step.output is not None:
        text += f"{OUTPUT_START}{step.output}{OUTPUT_END}\n"
    if step.answer is not None:
        text += f"{ANSWER_START}{step.answer}{ANSWER_END}"
    return text


def render_steps(steps: list[Step]) -> str:
    """Render a whole trajectory (the completion that follows the prompt)."""
    return "".join(render_step(step) for step in steps)


def render_trajectory(question: str, steps: list[Step], template: str = POLICY_PROMPT) -> dict[str, str]:
    """Render a solution as training text: ``{"prompt": ..., "completion": ...}`` (TRL's prompt-completion format)."""
    return {"prompt": format_prompt(question, template), "completion": render_steps(steps)}


_BLOCK = re.compile(re.escape(OUTPUT_START) + r"(.*?)" + re.escape(OUTPUT_END), re.S)
_ANSWER = re.compile(re.escape(ANSWER_START) + r"(.*?)(?:" + re.escape(ANSWER_END) + r"|\Z)", re.S)


def _split_source(source: str) -> tuple[str, str]:
    """Split step source into (comment, code): the leading `#` lines are the comment."""
    lines = source.split("\n")
    comment_lines = []
    while lines and lines[0].lstrip().startswith("#"):
        line = lines.pop(0).lstrip()[1:]
        comment_lines.append(line[1:] if line.startswith(" ") else line)
    return "\n".join(comment_lines), "\n".join(lines)


def parse_step(text: str) -> Step:
    """Parse one generated step (as produced by `render_step` or sampled until a stop string).

    A step is final when it closes the program (`<end_of_code>`) or contains an answer block. Text after
    the first step marker that is not an output or answer block is ignored (it belongs to no step).
    """
    text = text.removeprefix(CODE_START).lstrip("\n") if text.lstrip().startswith(CODE_START) else text
    ends = [(text.find(marker), marker) for marker in (STEP_END, CODE_END, ANSWER_START) if marker in text]
    cut, marker = min(ends) if ends else (len(text), None)
    source = text[:cut].strip("\n")
    comment, code = _split_source(source)
    if marker == STEP_END:
        return Step(comment, code)
    rest = text[cut:]
    output = _BLOCK.search(rest)
    answer = _ANSWER.search(rest)
    return Step(
        comment,
        code,
        is_final=marker is not None,
        output=output.group(1) if output else None,
        answer=answer.group(1) if answer else None,
    )


def split_steps(completion: str) -> list[Step]:
    """Split a whole rendered trajectory back into its steps (inverse of `render_steps`)."""
    steps = []
    rest = completion
    while rest.strip():
        end = rest.find(STEP_END)
        final = min((i for i in (rest.find(CODE_END), rest.find(ANSWER_START)) if i >= 0), default=-1)
        if end >= 0 and (final < 0 or end < final):
            steps.append(parse_step(rest[: end + len(STEP_END)]))
            rest = rest[end + len(STEP_END) :].removeprefix("\n")
        else:
            steps.append(parse_step(rest))
            break
    return steps


def build_program(steps: list[Step]) -> str:
    """The cumulative program of steps 1..i (paper §3.2: step i is checked by running steps 1..i together)."""
    return "\n".join(step.source for step in steps if step.source) + "\n"


def add_step_tokens(tokenizer, model=None) -> int:
    """Add the step markers to a tokenizer as special tokens and resize the model's embeddings to match.

    Returns the number of tokens added (0 when the tokenizer already had them). Decode with
    ``skip_special_tokens=False`` afterwards, or the markers vanish from generated text.
    """
    added = tokenizer.add_tokens(list(STEP_MARKERS), special_tokens=True)
    if model is not None and model.get_input_embeddings().weight.shape[0] < len(tokenizer):
        model.resize_token_embeddings(len(tokenizer))
    return added


# The round-1 prompt with both worked examples.
FEW_SHOT_PROMPT = few_shot_prompt()
