r"""Final-answer extraction and equivalence grading.

`extract_answer` pulls the final answer out of a model's text; `grade_answer` decides whether a predicted final
answer and a gold final answer are the same mathematical object; `grade_solution(text, gold)` does both. All are
total: they never raise, and each returns within about `timeout` seconds. Timeouts and exceptions (Math-Verify's
included, which it would otherwise turn into "not equal" silently) are counted in `grading_stats()` and the first of
each kind is logged as a warning.

Extraction order (the paper grades final answers, arXiv 2501.04519 §3.2; docs/method.md, "Terminal valuation"):

1. The last brace-matched ``\boxed{...}`` / ``\fbox{...}`` (or ``\boxed 5``), together with the boxes right before
   it that only a comma, "and" or "or" separates from it (``\boxed{2}, \boxed{3}`` is ``2, 3``). A box whose braces
   never close (truncated generation) or that is empty is skipped.
2. The step-format ``<answer>...<end_of_answer>`` block (it needs its closing marker): an anchored answer in it
   ("The answer is 12.") as Math-Verify finds it, else its whole text.
3. GSM8K's ``#### n``.
4. Math-Verify's own extraction (`math_verify.parse`'s patterns and priorities: "final answer is X. I hope it is
   correct", "answer: X", "answer ... X", else the last formula or number of the text), so that answers written
   without a box are found: "Therefore, Lara read 128 pages on the first day." gives ``128``. The answer is the
   string of the match whose value Math-Verify returns (see `_math_verify_extract`); a percentage keeps its sign.
5. The text after the last "final answer: X" / "the answer is X" phrase (answers in words).

Grading policy (each point is covered by tests):

* Text first: answers equal after normalisation (spacing, ``\left``/``\right``, ``\dfrac``, ``\text{}``, ``$``,
  a final period) are equal without touching SymPy. Then Math-Verify (on SymPy) compares them symbolically. An
  answer Math-Verify cannot parse, prose (three or more words), or an answer over 2,000 characters is compared
  as text only, because Math-Verify would compare a product of one-letter symbols or one formula picked out of
  the text, and two different answers could grade equal.
* Symmetric: the result does not depend on which side an answer is passed on. Math-Verify is asymmetric around
  equations, relations, sets and intervals, so those are compared in both orders.
* Numbers: ``\frac{1}{2}`` = ``1/2`` = ``0.5``; ``27.0`` = ``27``; leading zeros are ignored (``007`` = ``7``, AIME
  style); a single number with comma groups of exactly three digits is one number (``1,000`` = ``1000``) while any
  other comma makes a list (``1, 2`` and ``1,5`` are lists). Floats are compared after rounding to 6 decimals;
  values that differ by less than about 1e-15 are equal (``\frac{1}{2^{98}}`` = ``\frac{2}{2^{98}}``).
* Percentages: the percent sign is ignored (``12.5\%`` = ``12.5``) and a percentage also equals its value
  (``12.5\%`` = ``0.125``); ``12.5`` and ``0.125`` are still different from each other.
* Units, ``\text{...}`` unit words, ``\$`` and degree signs are ignored: ``5\text{ cm}`` = ``5``,
  ``\$15`` = ``15 \text{ dollars}`` = ``15``, ``30^\circ`` = ``30``. A TeX group around the whole answer is
  dropped (``{(2,4)}`` = ``(2,4)``). Degrees are not converted to radians (``30^\circ`` != ``\frac{\pi}{6}``).
* Lists of solutions (``1, 2``) and sets (``\{1, 2\}``) are unordered and ignore repeats; tuples and points
  (``(3, \frac{\pi}{2})``) are ordered; intervals compare endpoints and open/closed ends (``(1, 2]`` != ``[1, 2]``).
* Multiple choice: ``(B)``, ``B`` and ``\text{(B)}`` are the same choice. Single letters are compared
  case-insensitively, as Math-Verify does for all symbols (so ``X`` = ``x``).
* Stated values: an equation without unknowns states its right-hand side (``\log_{2}(32)=5`` is ``5``), and so does
  ``A \approx v`` (it is ``v``). Two assignments to the same variable (``y = ...``) compare their right-hand sides;
  any other two equations are equal when one is a non-zero constant multiple of the other (``2x=4`` = ``x-2=0``).
  Math-Verify would solve them instead, which is slow and calls all equations without real roots equal.
* Answers whose exact value has more than 10**6 bits (``9^{9^{9^9}}``) are not evaluated; they are equal to an
  answer only as text.

Time bound. Math-Verify's own timeouts use ``signal.alarm``: whole seconds, main thread only, re-armed for each of
the up to four parse/compare calls of one grade. Here the whole symbolic part of a grade runs under one deadline
instead, and Math-Verify is called with its timeouts off. In the main thread the deadline is a SIGALRM timer
(``setitimer``, fractional seconds; a timer the caller had running, e.g. pytest-timeout's, is suspended and given
back). In other threads, where signals cannot be used, a watchdog thread raises the exception inside the grading
thread (CPython's ``PyThreadState_SetAsyncExc``). That exception is only seen between Python bytecodes, whereas a
signal also stops C loops that poll for signals (big-integer powers); the 10**6-bit limit above keeps such C work
short, so the bound holds in threads too. A grade that hits the deadline is False. Math-Verify's extraction in
`extract_answer` runs under the same kind of deadline, on the last 6,000 characters of the text (regular expressions
poll for signals but not for the watchdog's exception); one that hits it finds no answer there.
"""

from __future__ import annotations

import ctypes
import logging
import math
import re
import signal
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from decimal import Decimal, InvalidOperation
from itertools import groupby
from typing import TypeVar

from latex2sympy2_extended.logic import And as ChainedRelations
from latex2sympy2_extended.sets import FiniteSet as OrderedFiniteSet
from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify
from math_verify.grader import is_assignment_relation
from math_verify.parser import extract_match, get_extraction_regexes, get_last_eq
from sympy import And, Basic, Eq, Float, Mul, Pow, Rational, Set, Tuple, UnevaluatedExpr, factorial, simplify
from sympy.core.relational import Relational

__all__ = ["extract_answer", "grade_answer", "grade_solution", "grading_stats", "last_boxed", "reset_grading_stats"]

_T = TypeVar("_T")

logger = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------------------------------
# Statistics: calls, timeouts and errors, each kind of error logged once
# ----------------------------------------------------------------------------------------------------------------

_stats_lock = threading.Lock()
_stats: Counter[str] = Counter()
_error_kinds: Counter[str] = Counter()
_logged_kinds: set[str] = set()


def _count(name: str) -> None:
    with _stats_lock:
        _stats[name] += 1


def _first_of_kind(kind: str) -> bool:
    with _stats_lock:
        _error_kinds[kind] += 1
        if kind in _logged_kinds:
            return False
        _logged_kinds.add(kind)
        return True


def _record_timeout(where: str, *inputs: str) -> None:
    """Count a timeout; the first of each `where` ("extract", "grade") is logged with its inputs."""
    _count("timeouts")
    if _first_of_kind(f"{where}:timeout"):
        logger.warning(
            "%s ran past its deadline and counts as no answer / not equal (inputs: %s); further timeouts of this "
            "kind are only counted (grading_stats())",
            where,
            ", ".join(f"{item[:200]!r}" for item in inputs),
        )


def _record_error(where: str, error: BaseException, *inputs: str) -> None:
    """Count an exception; the first of each (`where`, exception type) is logged with its traceback."""
    _count("errors")
    kind = f"{where}:{type(error).__name__}"
    if _first_of_kind(kind):
        logger.warning(
            "%s raised %s: %s (inputs: %s); it counts as no answer / not equal, and further errors of this kind "
            "are only counted (grading_stats())",
            where,
            type(error).__name__,
            str(error)[:200],
            ", ".join(f"{item[:200]!r}" for item in inputs),
            exc_info=error,
        )


def grading_stats() -> dict:
    """Counts since the last reset: ``calls`` (of `grade_answer`), ``extract_calls``, ``timeouts``, ``errors``, and
    ``by_kind``: timeouts and errors per kind (``"grade:timeout"``, ``"verify:TypeError"``, ...)."""
    with _stats_lock:
        counts = {name: _stats[name] for name in ("calls", "extract_calls", "timeouts", "errors")}
        counts["by_kind"] = dict(_error_kinds)
    return counts


def reset_grading_stats() -> None:
    """Zero the counts of `grading_stats`; each kind of error is logged once again after a reset."""
    with _stats_lock:
        _stats.clear()
        _error_kinds.clear()
        _logged_kinds.clear()


# ----------------------------------------------------------------------------------------------------------------
# Extraction
# ----------------------------------------------------------------------------------------------------------------

_BOX_COMMANDS = ("\\boxed", "\\fbox")
_ANSWER_BLOCK_RE = re.compile(r"<answer>(.*?)<end_of_answer>", re.DOTALL)
_GSM8K_RE = re.compile(r"####[ \t]*([^\n]+)")
# "The answer is X", "Final answer: X", "**Answer:** X"; the phrase must end in "is", ":" or "=" so that prose
# such as "the answer depends on" is not taken for an answer.
_PHRASE_RE = re.compile(r"(?:final\s+answer|\banswer)\s*(?:\*\*)?\s*(?:is\b|:|=)\s*(?:\*\*)?\s*:?\s*([^\n]+)", re.I)


def _matching_brace(text: str, open_pos: int) -> int | None:
    """Index of the `}` closing the group opened at `open_pos`, or None if it never closes.

    TeX-aware: a backslash escapes the next character, so `\\{` and `\\}` (literal braces) do not count, and
    `\\\\{` (line break, then a group) does.
    """
    depth = 0
    i = open_pos
    while i < len(text):
        char = text[i]
        if char == "\\":
            i += 2
            continue
        if char == "{":
            depth += 1
        elif char == "}":
            depth -= 1
            if depth == 0:
                return i
        i += 1
    return None


def _box_content(text: str, after_command: int) -> tuple[str | None, int]:
    """Content of the box whose command name ends at `after_command` (None if it is not a usable box) and where the
    box ends."""
    if after_command < len(text) and text[after_command].isalpha():
        return None, after_command  # a longer command that merely starts with "\boxed", e.g. "\boxedeq"
    start = after_command
    while start < len(text) and text[start].isspace():
        start += 1
    if start < len(text) and text[start] == "{":
        close = _matching_brace(text, start)
        return (None, after_command) if close is None else (text[start + 1 : close].strip(), close + 1)
    if start == after_command:
        return None, after_command  # "\boxed" followed directly by something that is neither a brace nor a space
    # "\boxed 5": TeX boxes the next token; in model output that is the rest of the formula.
    content = re.split(r"[$\n]", text[start:], maxsplit=1)[0]
    return _clean(content), start + len(content)


def _boxes(text: str) -> Iterator[tuple[int, int, str]]:
    """(start, end, content) of every usable box in `text`, from the last to the first."""
    end = len(text)
    while True:
        start = max(text.rfind(command, 0, end) for command in _BOX_COMMANDS)
        if start < 0:
            return
        command = next(c for c in _BOX_COMMANDS if text.startswith(c, start))
        content, box_end = _box_content(text, start + len(command))
        if content:
            yield start, box_end, content
        end = start


def last_boxed(text: str) -> str | None:
    """Content of the last complete `\\boxed{...}` / `\\fbox{...}` / `\\boxed X` in `text`, or None."""
    return next((content for _, _, content in _boxes(text)), None)


# What may stand between the boxes of one answer given as several boxes: `\boxed{2}, \boxed{3}`,
# `$\boxed{2}$ and $\boxed{3}$` (the separators Math-Verify's own box extraction joins boxes across).
_BOX_SEPARATOR_RE = re.compile(r"^[\s$]*(?:,|,?\s*(?:and|or))[\s$]*$")


def _final_boxes(text: str) -> str | None:
    """The last box, together with the boxes right before it that only a comma, "and" or "or" separates from it
    (one answer written as several boxes, `x = \\boxed{2}, \\boxed{3}`), joined by ", "; None without a box."""
    contents: list[str] = []
    previous_start = None
    for start, end, content in _boxes(text):
        if previous_start is not None and not _BOX_SEPARATOR_RE.match(text[end:previous_start]):
            break
        contents.append(content)
        previous_start = start
    return ", ".join(reversed(contents)) if contents else None


def _clean(answer: str) -> str | None:
    """Strip what surrounds an answer written in prose: spaces, markdown bold, `$`/`\\(` delimiters, a final period."""
    answer = answer.strip().strip("*").strip()
    for opening, closing in (("$$", "$$"), ("$", "$"), ("\\(", "\\)"), ("\\[", "\\]")):
        if len(answer) > len(opening) + len(closing) and answer.startswith(opening):
            inner_end = answer.find(closing, len(opening))
            # "$5$." keeps its math; "$5$ apples" loses the trailing prose.
            if inner_end > 0:
                answer = answer[len(opening) : inner_end]
            break
    answer = answer.strip().rstrip(".").strip()
    return answer or None


# Minerva's answer format ("Final Answer: The final answer is X. I hope it is correct.", Lewkowycz et al. 2022),
# which Math-Verify's extraction also anchors on.
_MINERVA_TAIL = ". I hope it is correct"


def _answer_phrase(text: str) -> str | None:
    """The text after the last "final answer: X" / "the answer is X" phrase (the innermost one when a phrase holds
    another, as in Minerva's format), for answers Math-Verify's extraction finds nothing in (words)."""
    matches = _PHRASE_RE.findall(text)
    if not matches:
        return None
    phrase = matches[-1]
    inner = _PHRASE_RE.findall(phrase)
    if inner:
        phrase = inner[-1]
    return _clean(phrase.partition(_MINERVA_TAIL)[0])


# Math-Verify's own extraction of an answer written without a box (arXiv 2501.04519 grades final answers; the
# policy boxes them, other models often do not): LaTeX in math delimiters and plain numbers or expressions, found
# by its priorities ("final answer is X. I hope", "answer: X", "answer ... X", else the last one in the text).
# Boxes are left to `_final_boxes` (boxed_match_priority=-1): by then the text has no usable box, and Math-Verify
# would read a truncated one.
_FALLBACK_EXTRACTION = (LatexExtractionConfig(boxed_match_priority=-1), ExprExtractionConfig())
# Inside an `<answer>` block the block itself is the answer; only an anchored phrase in it ("The answer is 12.")
# is read out of it.
_BLOCK_EXTRACTION = (
    LatexExtractionConfig(boxed_match_priority=-1, try_extract_without_anchor=False),
    ExprExtractionConfig(try_extract_without_anchor=False),
)
# Math-Verify reads the end of longer texts only: its regular expressions are not all linear, a regular expression
# cannot be interrupted outside the main thread, and the final answer is stated at the end.
_MAX_EXTRACTION_CHARS = 6000


def _tail(text: str) -> str:
    if len(text) <= _MAX_EXTRACTION_CHARS:
        return text
    cut = len(text) - _MAX_EXTRACTION_CHARS
    line = text.find("\n", cut)  # start at a line, so that no inline `$...$` is cut in half
    return text[line + 1 :] if line >= 0 else text[cut:]


def _is_percentage(value: object) -> bool:
    """Whether Math-Verify read `value` from a percentage (`25%`), which it keeps as `25 * (1/100)`."""
    return (
        isinstance(value, Mul)
        and len(value.args) == 2
        and isinstance(value.args[1], UnevaluatedExpr)
        and value.args[1].args[0] == Rational(1, 100)
    )


def _math_verify_extract(text: str, extraction: tuple) -> tuple[object, str] | None:
    """Math-Verify's extraction (`math_verify.parse`'s loop, "any_match"), returning the value it finds with the
    string of the match it came from: patterns by priority; within a priority, matches from the rightmost; the
    first match SymPy parses wins. None without a match.

    Where the first match does not parse, `parse` moves on to other matches, often an earlier formula, and pairs
    their value with the first match's string. Here the first match's string is the answer when it is LaTeX (the
    writer delimited it as math) and not prose: `\\{x \\mid x \\geq 1\\}` is the stated answer although SymPy cannot
    parse it, and grading compares it as text. A plain-text match that does not parse (`15**.` in `**15**.`) or
    prose between two currency signs (`$35 and she saved $`) is a misreading, and the search goes on as in `parse`.
    When nothing parses, the first match's string, as `parse(..., fallback_mode="first_match")` keeps it.
    """
    patterns = [
        (pattern, target, priority)
        for regexes, target in get_extraction_regexes(extraction)
        for pattern, priority in regexes
    ]
    patterns.sort(key=lambda entry: entry[2])
    first_string = None
    for _, group in groupby(patterns, key=lambda entry: entry[2]):
        matches = [(match, target) for pattern, target, _ in group for match in pattern.finditer(text)]
        matches.sort(key=lambda entry: (entry[0].end(), -entry[0].start()), reverse=True)
        for match, target in matches:
            value, string = extract_match(match, target)
            if value is not None:
                return value, string
            if first_string is None and string:
                if isinstance(target, LatexExtractionConfig) and not _is_prose(string):
                    return None, string
                first_string = string
    return None if first_string is None else (None, first_string)


def _math_verify_answer(text: str, extraction: tuple, timeout: float) -> str | None:
    """The answer Math-Verify's extraction finds in `text`, as a string, or None (errors and timeouts counted)."""
    # `\$` is LaTeX's dollar sign, a currency sign, never a math delimiter. Math-Verify's number patterns take a
    # currency sign only after a space or "=", so in "The final answer is \$30." they find no number and fall to an
    # earlier formula; no extraction option changes that, and the sign carries no value, so it is dropped.
    unescaped = _tail(text).replace("\\$", " ")
    try:
        found = _call_with_deadline(lambda: [_math_verify_extract(unescaped, extraction)], timeout)
    except Exception as error:  # noqa: BLE001 - extraction must never take down a search or training loop
        _record_error("extract", error, text)
        return None
    if found is None:
        _record_timeout("extract", text)
        return None
    if found[0] is None:
        return None
    value, answer = found[0]
    # A chain `a = b = 5` states its last part (Math-Verify parses the last part too).
    answer = get_last_eq(answer.strip()).strip()
    if _is_percentage(value) and "%" not in answer:
        answer += "\\%"  # Math-Verify's string of "25%" is "25"; the grader reads "25\%" as 25 and as 0.25
    return answer or None


def extract_answer(text: str, timeout: float = 5.0) -> str | None:
    """The final answer stated in `text`, or None when it states none. See the module docstring for the order.

    Never raises; Math-Verify's extraction (for text without a box) gets `timeout` seconds.
    """
    if not isinstance(text, str):
        return None
    _count("extract_calls")
    boxed = _final_boxes(text)
    if boxed is not None:
        return boxed
    blocks = _ANSWER_BLOCK_RE.findall(text)
    if blocks:
        block = blocks[-1]
        answer = _math_verify_answer(block, _BLOCK_EXTRACTION, timeout) or _answer_phrase(block) or _clean(block)
        if answer is not None:
            return answer
    gsm8k = _GSM8K_RE.findall(text)
    if gsm8k:
        answer = _clean(gsm8k[-1])
        if answer is not None:
            return answer
    return _math_verify_answer(text, _FALLBACK_EXTRACTION, timeout) or _answer_phrase(text)


def grade_solution(text: str, gold: str | None, timeout: float = 5.0) -> bool:
    """Whether the free-form solution `text` reaches the gold final answer: `grade_answer(extract_answer(text),
    gold)`. Never raises."""
    answer = extract_answer(text, timeout=timeout)
    return answer is not None and grade_answer(answer, gold, timeout=timeout)


# ----------------------------------------------------------------------------------------------------------------
# Normalisation shared by the fast path and the symbolic path
# ----------------------------------------------------------------------------------------------------------------

# LaTeX-only thousands separators (`1{,}000`, `29,\!322`) are unambiguous wherever they stand.
_LATEX_THOUSANDS_RE = re.compile(r"(?<=\d)(?:\{,\}|,\\!)(?=\d{3}(?!\d))")
# A whole answer that is one number with plain thousands commas: groups of exactly three digits after the first.
_THOUSANDS_RE = re.compile(r"^([-+]?\d{1,3}(?:,\d{3})+)(\.\d+)?$")
_PLAIN_NUMBER_RE = re.compile(r"^[-+]?(?:\d+(?:\.\d*)?|\.\d+)$")
_CHOICE_RE = re.compile(r"^\(([A-Ea-e])\)$|^([A-E])$")
_TEXT_WRAPPER_RE = re.compile(r"\\(?:text|textbf|textit|textrm|mathrm|mathbf|mathit|mbox|operatorname)\s*\{([^{}]*)\}")
_SPACING_RE = re.compile(r"\\[,;:! ]|\\q?quad\b|~")
_DEGREE_RE = re.compile(r"\^\s*\{\s*\\circ\s*\}|\^\s*\\circ|°|\\degree\b")
_LEFT_RIGHT_RE = re.compile(r"\\(?:left|right|big|Big|bigg|Bigg)(?![a-zA-Z])\.?")


_OUTER_DELIMITERS = (("$$", "$$"), ("$", "$"), ("\\(", "\\)"), ("\\[", "\\]"))


def _strip_outer_delimiters(answer: str) -> str:
    """`x` for `$x$`, `$$x$$`, `\\(x\\)` or `\\[x\\]`; text with several math segments is left alone."""
    for opening, closing in _OUTER_DELIMITERS:
        inner = answer[len(opening) : len(answer) - len(closing)]
        if (
            len(answer) > len(opening) + len(closing)
            and answer.startswith(opening)
            and answer.endswith(closing)
            and opening not in inner
            and closing not in inner
        ):
            return inner.strip()
    return answer


def _prepare(answer: str) -> str:
    """Rewrite forms that Math-Verify misreads, keeping the answer's meaning."""
    answer = answer.replace("\\$", "").strip().rstrip(".,").strip()
    answer = _strip_outer_delimiters(answer)
    if answer.startswith("{") and _matching_brace(answer, 0) == len(answer) - 1:
        answer = answer[1:-1].strip()  # `{(2,4)}`: a TeX group around the whole answer groups nothing
    if "\\approx" in answer and "," not in answer:
        # "\\cos(e) \\approx -0.912" states the value -0.912; Math-Verify would keep the left-hand side.
        answer = answer.rsplit("\\approx", 1)[1].strip()
    answer = _DEGREE_RE.sub("", answer).strip()
    answer = _LATEX_THOUSANDS_RE.sub("", answer)
    thousands = _THOUSANDS_RE.match(answer)
    if thousands:
        answer = thousands.group(1).replace(",", "") + (thousands.group(2) or "")
    return answer


def _canonical(answer: str) -> str:
    """A spelling-insensitive key for the string fast path: equal keys mean equal answers."""
    answer = _LEFT_RIGHT_RE.sub("", answer)
    answer = _SPACING_RE.sub("", answer)
    answer = re.sub(r"\\[dtc]frac", r"\\frac", answer)
    answer = _TEXT_WRAPPER_RE.sub(r"\1", answer)
    answer = answer.replace("\\%", "").replace("%", "").replace("$", "")
    return "".join(answer.split()).rstrip(".")


def _plain_numbers_equal(pred: str, gold: str) -> bool:
    if not (_PLAIN_NUMBER_RE.match(pred) and _PLAIN_NUMBER_RE.match(gold)):
        return False
    try:
        return Decimal(pred) == Decimal(gold)
    except InvalidOperation:
        return False


_LATEX_COMMAND_RE = re.compile(r"\\[A-Za-z]+")
_WORD_RE = re.compile(r"[A-Za-z]{3,}")
# Function names written without a backslash are math, not prose.
_MATH_WORDS = frozenset(
    "sin cos tan cot sec csc arcsin arccos arctan sinh cosh tanh log exp max min lim det gcd lcm mod".split()
)


def _is_prose(answer: str) -> bool:
    """Whether the answer is a sentence rather than math: at least three words of three or more letters.

    Math-Verify reads prose as a product of one-letter symbols, or picks one formula out of it, so two different
    sentences could grade equal; prose is compared as text only.
    """
    words = _WORD_RE.findall(_LATEX_COMMAND_RE.sub(" ", _TEXT_WRAPPER_RE.sub(r" \1 ", answer)))
    return sum(word.lower() not in _MATH_WORDS for word in words) >= 3


def _choice(answer: str) -> str | None:
    """The letter of a multiple-choice answer such as `(B)`, `B` or `\\text{(B)}`, else None."""
    match = _CHOICE_RE.match(answer)
    return None if match is None else (match.group(1) or match.group(2)).upper()


# ----------------------------------------------------------------------------------------------------------------
# Deadline for the symbolic path (see the module docstring)
# ----------------------------------------------------------------------------------------------------------------


class _DeadlineExceeded(BaseException):
    """Raised inside the grading thread when its deadline passes.

    A BaseException so that the `except Exception` handlers in Math-Verify and SymPy let it through.
    """


# After the first exception, raise again at this interval: the first one can land where it is swallowed (a bare
# `except:`, a garbage-collector callback, a `__del__`).
_REPEAT_S = 0.1


def _raise_deadline(signum: int, frame: object) -> None:
    raise _DeadlineExceeded


def _call_with_alarm(function: Callable[[], _T], seconds: float) -> _T | None:
    """Main thread: SIGALRM, which also interrupts C loops that poll for signals (e.g. big-integer powers)."""
    previous_handler = signal.signal(signal.SIGALRM, _raise_deadline)
    # A timer already running (pytest-timeout, a caller's own alarm) is suspended and given back afterwards.
    previous_delay, previous_interval = signal.setitimer(signal.ITIMER_REAL, seconds, _REPEAT_S)
    started = time.monotonic()
    try:
        try:
            return function()
        finally:
            while True:
                # The alarm can go off in here too, or be pending (signal.signal runs pending handlers first); retry
                # until the timer is off and the caller's handler is back, so that it never sees our alarm.
                try:
                    signal.setitimer(signal.ITIMER_REAL, 0)
                    signal.signal(signal.SIGALRM, signal.SIG_DFL if previous_handler is None else previous_handler)
                    break
                except _DeadlineExceeded:
                    continue
            if previous_delay > 0:
                remaining = max(previous_delay - (time.monotonic() - started), 1e-3)
                signal.setitimer(signal.ITIMER_REAL, remaining, previous_interval)
    except _DeadlineExceeded:
        return None


# Own prototypes, so that no other user of ctypes.pythonapi sees changed argtypes.
_raise_in_thread = ctypes.PYFUNCTYPE(ctypes.c_int, ctypes.c_ulong, ctypes.py_object)(
    ("PyThreadState_SetAsyncExc", ctypes.pythonapi)
)
_clear_in_thread = ctypes.PYFUNCTYPE(ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p)(
    ("PyThreadState_SetAsyncExc", ctypes.pythonapi)
)


def _watch(thread_id: int, stop: threading.Event, seconds: float) -> None:
    if stop.wait(seconds):
        return
    while True:
        _raise_in_thread(thread_id, _DeadlineExceeded)
        if stop.wait(_REPEAT_S):
            return


def _call_with_watchdog(function: Callable[[], _T], seconds: float) -> _T | None:
    """Other threads: a watchdog thread raises the exception asynchronously (seen between bytecodes only)."""
    thread_id = threading.get_ident()
    stop = threading.Event()
    watchdog = threading.Thread(target=_watch, args=(thread_id, stop, seconds), name="grade-deadline", daemon=True)
    try:
        try:
            watchdog.start()
            return function()
        finally:
            while True:
                # The watchdog can strike in here too; retry until it has stopped and nothing is left pending.
                try:
                    stop.set()
                    watchdog.join()
                    _clear_in_thread(thread_id, None)
                    break
                except _DeadlineExceeded:
                    continue
    except _DeadlineExceeded:
        return None


def _call_with_deadline(function: Callable[[], _T], seconds: float) -> _T | None:
    """`function()`, or None if it has not returned after `seconds`."""
    if hasattr(signal, "setitimer") and threading.current_thread() is threading.main_thread():
        return _call_with_alarm(function, seconds)
    return _call_with_watchdog(function, seconds)


class _DropTimeoutDisabledWarning(logging.Filter):
    """Math-Verify warns once that its timeout is off; the deadline above replaces it."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Timeout is disabled")


for _name in ("math_verify.parser", "math_verify.grader"):
    logging.getLogger(_name).addFilter(_DropTimeoutDisabledWarning())


# ----------------------------------------------------------------------------------------------------------------
# Grading
# ----------------------------------------------------------------------------------------------------------------

# The answer is wrapped in \boxed{} below. No search for formulas elsewhere in the string (anchorless extraction,
# ExprExtractionConfig): when the LaTeX does not parse, those pick some number out of it and two answers that
# differ elsewhere would grade equal; an unparsable answer is compared as text instead.
_EXTRACTION = (LatexExtractionConfig(boxed_match_priority=0, try_extract_without_anchor=False),)
# Answers whose exact value has more bits than this are not evaluated: SymPy would build the integer, which takes
# seconds to forever inside one C call that no deadline can stop outside the main thread. 10**6 bits take ~0.2 s.
_MAX_BITS = 10**6
# Longer answers (degenerate generations; the longest gold in the shared benchmarks has 993 characters) are compared
# as text only: parsing them alone can use up the whole deadline.
_MAX_SYMBOLIC_CHARS = 2000


def _bits(expr: Basic) -> float:
    """Rough upper bound on log2 |value| of the numbers `expr` makes SymPy compute; inf when astronomically big."""
    if isinstance(expr, Rational):
        return float(max(abs(expr.p).bit_length(), expr.q.bit_length()))
    if isinstance(expr, Float):
        return float(abs(expr._mpf_[2]) + expr._mpf_[3]) if expr._mpf_[1] else 0.0
    if isinstance(expr, Pow):
        base_bits = _bits(expr.base)
        exponent_bits = _bits(expr.exp)
        if base_bits == 0:
            return exponent_bits
        return math.inf if exponent_bits > 64 else base_bits * 2.0**exponent_bits
    if isinstance(expr, factorial):
        argument_bits = _bits(expr.args[0])
        return math.inf if argument_bits > 64 else argument_bits * 2.0**argument_bits
    return float(sum(_bits(arg) for arg in expr.args))


def _too_big(parsed: list) -> bool:
    return any(isinstance(item, Basic) and _bits(item) > _MAX_BITS for item in parsed)


def _stated_value(item: object) -> object:
    """`A = B` without unknowns (College Math golds such as `\\log_{2}(32)=5`) states the value `B`.

    Math-Verify compares such constant equations by solving them, and both sides of a true and of a false one
    solve to the same empty solution set, so `\\log_{2}(32)=6` would grade equal to `\\log_{2}(32)=5`.
    """
    if not isinstance(item, Basic) or item.free_symbols:
        return item
    if isinstance(item, Eq):
        return item.rhs
    if isinstance(item, ChainedRelations) and all(isinstance(arg, Eq) for arg in item._unsorted_args):
        return item._unsorted_args[-1].rhs
    if isinstance(item, OrderedFiniteSet):
        return OrderedFiniteSet(*(_stated_value(arg) for arg in item._unsorted_args))
    return item


def _parse(answer: str, errors: list[tuple[str, Exception]]) -> list:
    # No fallback to the raw string: text comparison is done (on normalised text) before parsing.
    try:
        parsed = parse(
            "\\boxed{" + answer + "}",
            extraction_config=_EXTRACTION,
            fallback_mode="no_fallback",
            parsing_timeout=None,
            raise_on_error=True,
        )
    except Exception as error:  # noqa: BLE001 - counted and logged by grade_answer
        errors.append(("parse", error))
        return []
    return [_stated_value(item) for item in parsed]


def _verify(gold: list | Basic, pred: list | Basic, errors: list[tuple[str, Exception]]) -> bool:
    """Math-Verify's `verify`, its exceptions (which it would turn into False silently) collected in `errors`."""
    try:
        return verify(gold, pred, timeout_seconds=None, raise_on_error=True)
    except Exception as error:  # noqa: BLE001 - counted and logged by grade_answer
        errors.append(("verify", error))
        return False


def _verify_both_ways(gold: list | Basic, pred: list | Basic, errors: list[tuple[str, Exception]]) -> bool:
    if _verify(gold, pred, errors):
        return True
    # Math-Verify is asymmetric only around equations, relations, sets and tuples; plain expressions need no
    # second (slow) comparison in the other order.
    items = (gold if isinstance(gold, list) else [gold]) + (pred if isinstance(pred, list) else [pred])
    if not any(isinstance(item, (Relational, And, Set, Tuple)) for item in items):
        return False
    return _verify(pred, gold, errors)


def _equations_equal(gold: Basic, pred: Basic, errors: list[tuple[str, Exception]]) -> bool | None:
    """Decide a pair of equations that Math-Verify would get slow or wrong; None for any other pair.

    Math-Verify compares two equations by simplifying, then flipping, then solving both for all their symbols.
    Solving is slow (seconds for `y = c_1 e^x + c_2 \\cos x`) and wrong when neither equation has a real solution
    (`x^2+1=0` and `x^2+2=0` both give the empty set). Instead:
    * two assignments to the same left-hand side (`y = ...`) are equal when their right-hand sides are;
    * any other two equations are equal when one is a non-zero constant multiple of the other (`2x = 4` and
      `x - 2 = 0`; `y = 2x + 1` and `2x - y + 1 = 0`), which is exact and never solves anything.
    """
    if not (isinstance(gold, Eq) and isinstance(pred, Eq)):
        return None
    if is_assignment_relation(gold) and is_assignment_relation(pred) and gold.lhs == pred.lhs:
        return _verify_both_ways(gold.rhs, pred.rhs, errors)
    if not gold.free_symbols or not pred.free_symbols:
        return None
    ratio = simplify((gold.lhs - gold.rhs) / (pred.lhs - pred.rhs))
    return bool(ratio.is_number and ratio.is_finite and ratio.is_zero is False)


def _symbolically_equal(pred: str, gold: str, errors: list[tuple[str, Exception]]) -> bool:
    parsed_gold = _parse(gold, errors)
    parsed_pred = _parse(pred, errors)
    if not parsed_gold or not parsed_pred or _too_big(parsed_gold) or _too_big(parsed_pred):
        return False
    if isinstance(parsed_gold[0], Basic) and isinstance(parsed_pred[0], Basic):
        decided = _equations_equal(parsed_gold[0], parsed_pred[0], errors)
        if decided is not None:
            return decided
    return _verify_both_ways(parsed_gold, parsed_pred, errors)


def grade_answer(pred: str | None, gold: str | None, timeout: float = 5.0) -> bool:
    """Whether the predicted final answer `pred` is equivalent to the gold final answer `gold`.

    Both are final answers (use `extract_answer` on a full solution first, or `grade_solution`). Never raises;
    returns False for missing or empty answers and for comparisons that do not finish within `timeout` seconds.
    Timeouts and exceptions (Math-Verify's included) are counted in `grading_stats()` and each kind is logged once.
    """
    if not isinstance(pred, str) or not isinstance(gold, str):
        return False
    _count("calls")
    errors: list[tuple[str, Exception]] = []
    try:
        pred, gold = _prepare(pred), _prepare(gold)
        if not pred or not gold:
            return False
        canonical_pred, canonical_gold = _canonical(pred), _canonical(gold)
        if canonical_pred == canonical_gold or _plain_numbers_equal(canonical_pred, canonical_gold):
            return True
        pred_choice, gold_choice = _choice(canonical_pred), _choice(canonical_gold)
        if pred_choice is not None and gold_choice is not None:
            return pred_choice == gold_choice
        if _is_prose(pred) or _is_prose(gold) or max(len(pred), len(gold)) > _MAX_SYMBOLIC_CHARS:
            return False
        # A zero timer would mean "no deadline" to setitimer; keep a non-positive timeout a (very short) deadline.
        equal = _call_with_deadline(lambda: _symbolically_equal(pred, gold, errors), max(timeout, 1e-3))
        if equal is None:
            _record_timeout("grade", pred, gold)
        return equal is True
    except Exception as error:  # noqa: BLE001 - grading must never take down a search or training loop
        errors.append(("grade", error))
        return False
    finally:
        for where, error in errors:
            _record_error(where, error, pred, gold)
