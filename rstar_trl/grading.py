r"""Final-answer extraction and equivalence grading.

`extract_answer` pulls the final answer out of a model's text; `grade_answer` decides whether a predicted final
answer and a gold final answer are the same mathematical object. Both are total: they never raise, and
`grade_answer` returns within about `timeout` seconds.

Extraction order: the last brace-matched ``\boxed{...}`` / ``\fbox{...}`` (or ``\boxed 5``); else the step-format
``<answer>...<end_of_answer>`` block (its "the answer is X" phrase if it has one, else its whole text); else GSM8K's
``#### n``; else the last "final answer: X" / "the answer is X" phrase. A box whose braces never close (truncated
generation) or that is empty is skipped, and an ``<answer>`` block needs its closing marker.

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
  ``30^\circ`` = ``30``. Degrees are not converted to radians (``30^\circ`` != ``\frac{\pi}{6}``).
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
short, so the bound holds in threads too. A grade that hits the deadline is False.
"""

from __future__ import annotations

import ctypes
import logging
import math
import re
import signal
import threading
import time
from collections.abc import Callable
from decimal import Decimal, InvalidOperation
from typing import TypeVar

from latex2sympy2_extended.logic import And as ChainedRelations
from latex2sympy2_extended.sets import FiniteSet as OrderedFiniteSet
from math_verify import LatexExtractionConfig, parse, verify
from math_verify.grader import is_assignment_relation
from sympy import And, Basic, Eq, Float, Pow, Rational, Set, Tuple, factorial, simplify
from sympy.core.relational import Relational

__all__ = ["extract_answer", "grade_answer", "last_boxed"]

_T = TypeVar("_T")


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


def _box_content(text: str, after_command: int) -> str | None:
    """Content of the box whose command name ends at `after_command`, or None if it is not a usable box."""
    if after_command < len(text) and text[after_command].isalpha():
        return None  # a longer command that merely starts with "\boxed", e.g. "\boxedeq"
    start = after_command
    while start < len(text) and text[start].isspace():
        start += 1
    if start < len(text) and text[start] == "{":
        close = _matching_brace(text, start)
        return None if close is None else text[start + 1 : close].strip()
    if start == after_command:
        return None  # "\boxed" followed directly by something that is neither a brace nor a space
    # "\boxed 5": TeX boxes the next token; in model output that is the rest of the formula.
    content = re.split(r"[$\n]", text[start:], maxsplit=1)[0]
    return _clean(content)


def last_boxed(text: str) -> str | None:
    """Content of the last complete `\\boxed{...}` / `\\fbox{...}` / `\\boxed X` in `text`, or None."""
    end = len(text)
    while True:
        start = max(text.rfind(command, 0, end) for command in _BOX_COMMANDS)
        if start < 0:
            return None
        command = next(c for c in _BOX_COMMANDS if text.startswith(c, start))
        content = _box_content(text, start + len(command))
        if content:
            return content
        end = start


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


def _answer_phrase(text: str) -> str | None:
    matches = _PHRASE_RE.findall(text)
    return _clean(matches[-1]) if matches else None


def extract_answer(text: str) -> str | None:
    """The final answer stated in `text`, or None when it states none. See the module docstring for the order."""
    if not isinstance(text, str):
        return None
    boxed = last_boxed(text)
    if boxed is not None:
        return boxed
    blocks = _ANSWER_BLOCK_RE.findall(text)
    if blocks:
        block = blocks[-1]
        answer = _answer_phrase(block) or _clean(block)
        if answer is not None:
            return answer
    gsm8k = _GSM8K_RE.findall(text)
    if gsm8k:
        answer = _clean(gsm8k[-1])
        if answer is not None:
            return answer
    return _answer_phrase(text)


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


def _parse(answer: str) -> list:
    # No fallback to the raw string: text comparison is done (on normalised text) before parsing.
    parsed = parse(
        "\\boxed{" + answer + "}", extraction_config=_EXTRACTION, fallback_mode="no_fallback", parsing_timeout=None
    )
    return [_stated_value(item) for item in parsed]


def _verify_both_ways(gold: list | Basic, pred: list | Basic) -> bool:
    if verify(gold, pred, timeout_seconds=None):
        return True
    # Math-Verify is asymmetric only around equations, relations, sets and tuples; plain expressions need no
    # second (slow) comparison in the other order.
    items = (gold if isinstance(gold, list) else [gold]) + (pred if isinstance(pred, list) else [pred])
    if not any(isinstance(item, (Relational, And, Set, Tuple)) for item in items):
        return False
    return verify(pred, gold, timeout_seconds=None)


def _equations_equal(gold: Basic, pred: Basic) -> bool | None:
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
        return _verify_both_ways(gold.rhs, pred.rhs)
    if not gold.free_symbols or not pred.free_symbols:
        return None
    ratio = simplify((gold.lhs - gold.rhs) / (pred.lhs - pred.rhs))
    return bool(ratio.is_number and ratio.is_finite and ratio.is_zero is False)


def _symbolically_equal(pred: str, gold: str) -> bool:
    parsed_gold = _parse(gold)
    parsed_pred = _parse(pred)
    if not parsed_gold or not parsed_pred or _too_big(parsed_gold) or _too_big(parsed_pred):
        return False
    if isinstance(parsed_gold[0], Basic) and isinstance(parsed_pred[0], Basic):
        decided = _equations_equal(parsed_gold[0], parsed_pred[0])
        if decided is not None:
            return decided
    return _verify_both_ways(parsed_gold, parsed_pred)


def grade_answer(pred: str | None, gold: str | None, timeout: float = 5.0) -> bool:
    """Whether the predicted final answer `pred` is equivalent to the gold final answer `gold`.

    Both are final answers (use `extract_answer` on a full solution first). Never raises; returns False for
    missing or empty answers and for comparisons that do not finish within `timeout` seconds.
    """
    if not isinstance(pred, str) or not isinstance(gold, str):
        return False
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
        return _call_with_deadline(lambda: _symbolically_equal(pred, gold), max(timeout, 1e-3)) is True
    except Exception:  # noqa: BLE001 - grading must never take down a search or training loop
        return False
