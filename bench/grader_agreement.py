r"""Benchmark: agreement of the grader with labelled real-style solutions, against plain Math-Verify.

    HF_HUB_OFFLINE=1 .venv/bin/python bench/grader_agreement.py                 # full set (~2,300 items)
    HF_HUB_OFFLINE=1 .venv/bin/python bench/grader_agreement.py --problems 8    # a quick look
    HF_HUB_OFFLINE=1 .venv/bin/python bench/grader_agreement.py --before-rev a1bc291 --out runs/grader.json

The labelled set is rebuilt from the shared benchmark files (folder: environment variable RSTAR_TRL_DATA, default
``../shared/data`` next to the repository; a relative value is read from the repository root) with a fixed seed, so
nothing is committed and every run grades the same items. For `--problems` problems drawn from each source (GSM8K
test, MATH-500, OlympiadBench, College Math) it writes solution texts in the styles of real model output, once with
the gold answer (label: correct) and once with a wrong answer (label: wrong), and asks every grader whether the text
reaches the gold answer:

* ``boxed``: the worked solution, then ``the final answer is $\boxed{X}$``;
* ``answer_is``: ``The answer is X.`` (no box);
* ``minerva``: ``Final Answer: The final answer is X. I hope it is correct.`` (bare or in ``$...$``);
* ``hash``: GSM8K's ``#### X`` (GSM8K only);
* ``prose``: the answer in the last sentence of the solution, no answer phrase (the reference solution itself where
  it states the answer, e.g. GSM8K's ``Natalia sold 48+24 = 72 clips altogether in April and May.``);
* ``money``, ``percent``, ``units``, ``thousands``: numeric answers written as ``\$15``, ``15 dollars``, ``25\%``,
  ``15 \text{ cm}``, ``1,000``, inside and outside a box;
* ``equivalent``: another spelling of the same value (``a/b`` for ``\frac{a}{b}``, ``\dfrac``, a decimal, ``27.0``);
* ``multi_box``: a first boxed attempt, then a corrected final box (the last one counts);
* ``list_boxes``: one box per solution for multiple-answer problems (``\boxed{2}`` and ``\boxed{3}``).

The worked solution is the source's own: GSM8K's rationale (calculator annotations removed), the MATH-500 reference
solution (boxes unwrapped, Asymptote figures removed), the opening paragraphs of the OlympiadBench reference solution,
or (College Math has no solutions) the question restated. A wrong answer changes one digit of the gold (integers: a
nearby or scaled value; a gold without digits is replaced by another problem's gold), and where the worked solution
states the gold it is made to state the wrong answer too. Labels are by construction: the text states the gold
(correct) or the wrong value. Golds over 120 characters (College Math proofs) are left out.

Graders: ``after`` is ``grade_answer(extract_answer(text), gold)`` of the working tree; ``before`` the same functions
of rstar_trl/grading.py at git revision `--before-rev` (read with ``git show``); ``mv`` is plain Math-Verify on the
whole text, ``verify(parse("$" + gold + "$"), parse(text))`` (the gold in math delimiters, as a gold answer written in
LaTeX needs them to be found), and ``mv_raw`` the literal ``verify(parse(gold), parse(text))``. Agreement is the share
of items whose verdict equals the label, per source, per style, per kind of gold answer and per label. The full set
takes about 3 minutes on 2 cores. Last line: one JSON object (with the grader's `grading_stats()`).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import os
import random
import re
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SOURCES = {
    "gsm8k": "gsm8k/test.jsonl",
    "math": "math500/test.jsonl",
    "olympiadbench": "olympiadbench/test.jsonl",
    "college_math": "college_math/test.jsonl",
}
# rstar_trl/grading.py as it was before extraction fell back to Math-Verify (the numbers in the commit message).
DEFAULT_BEFORE_REV = "a1bc291"


def data_dir() -> Path:
    """The shared benchmark folder: $RSTAR_TRL_DATA, default ../shared/data next to the repository.

    Raises FileNotFoundError naming the variable when a source file is missing.
    """
    path = (REPO / (os.environ.get("RSTAR_TRL_DATA") or "../shared/data")).resolve()  # absolute values stay
    missing = [name for name in SOURCES.values() if not (path / name).is_file()]
    if missing:
        raise FileNotFoundError(
            f"benchmark data not found: {', '.join(str(path / name) for name in missing)}. Set RSTAR_TRL_DATA to the "
            "folder of the shared benchmark files (default ../shared/data relative to the repository root)."
        )
    return path


# ----------------------------------------------------------------------------------------------------------------
# Problems: gold answer and a worked solution (or reasoning text) per source
# ----------------------------------------------------------------------------------------------------------------

_CALCULATOR_RE = re.compile(r"<<[^<>]*>>")
_ASY_RE = re.compile(r"\[asy\].*?\[/asy\]", re.DOTALL)


def _gold(value: object) -> str | None:
    from rstar_trl.data import _gold_answer  # the gold answers the evaluation grades against

    return _gold_answer(value)


def _paragraphs(text: str, limit: int = 700) -> str:
    """The first paragraphs of `text` up to about `limit` characters, cut where the math delimiters are balanced."""
    kept: list[str] = []
    size = 0
    for paragraph in (p.strip() for p in text.split("\n\n")):
        if not paragraph:
            continue
        if kept and size + len(paragraph) > limit:
            break
        candidate = kept + [paragraph]
        if "\n\n".join(candidate).replace("\\$", "").count("$") % 2 == 0:
            kept, size = candidate, size + len(paragraph)
        elif not kept:
            return ""
    return "\n\n".join(kept)


def load_problems(data: Path) -> dict[str, list[dict]]:
    """Problems per source: `question`, `gold` and `body` (reasoning text without a final statement)."""
    problems: dict[str, list[dict]] = {}
    for source, name in SOURCES.items():
        rows = [json.loads(line) for line in (data / name).read_text().splitlines() if line.strip()]
        items = []
        for row in rows:
            if source == "gsm8k":
                rationale, _ = row["answer"].rsplit("####", 1)
                item = {"question": row["question"], "gold": _gold(row["answer"]), "body": rationale.strip()}
                item["body"] = _CALCULATOR_RE.sub("", item["body"])
            elif source == "math":
                # Without the Asymptote figures, which models do not write.
                body = _ASY_RE.sub("", row["solution"]).strip()
                item = {"question": row["problem"], "gold": row["answer"], "body": body}
            elif source == "olympiadbench":
                item = {
                    "question": row["question"],
                    "gold": _gold(row["final_answer"]),
                    "body": _paragraphs(row["solution"][0]),
                    "multiple": bool(row["is_multiple_answer"]),
                }
            else:
                question = row["question"].strip()
                item = {
                    "question": question,
                    "gold": _gold(row["answer"]),
                    "body": f"We are asked the following. {question}\n\nLet us work through it step by step.",
                }
            # Golds that are whole paragraphs (College Math proofs) are not answers a grader compares.
            if item["gold"] and len(item["gold"]) <= 120 and "\n" not in item["gold"]:
                items.append(item)
        problems[source] = items
    return problems


# ----------------------------------------------------------------------------------------------------------------
# Answers: kinds, wrong answers, other spellings
# ----------------------------------------------------------------------------------------------------------------

_INTEGER_RE = re.compile(r"^-?\d+$")
_NUMBER_RE = re.compile(r"^-?\d+(?:\.\d+)?$")
_FRACTION_RE = re.compile(r"^(-?)\\[dt]?frac\{(\d+)\}\{(\d+)\}$")
_THOUSANDS_RE = re.compile(r"^-?\d{1,3}(?:,\d{3})+$")


def _plain(answer: str) -> str:
    """`answer` without thousands commas when it is one number written with them (`1,000`; not `5,15`)."""
    return answer.replace(",", "") if _THOUSANDS_RE.match(answer) else answer


def _top_level_parts(answer: str) -> list[str]:
    """`answer` split at commas outside brackets and braces."""
    parts, depth, start = [], 0, 0
    for i, char in enumerate(answer):
        if char in "([{":
            depth += 1
        elif char in ")]}":
            depth -= 1
        elif char == "," and depth == 0:
            parts.append(answer[start:i].strip())
            start = i + 1
    parts.append(answer[start:].strip())
    return [part for part in parts if part]


def kind(gold: str) -> str:
    """A coarse kind of answer, for the per-kind breakdown."""
    if _INTEGER_RE.match(_plain(gold)):
        return "integer"
    if _NUMBER_RE.match(gold):
        return "decimal"
    if _FRACTION_RE.match(gold):
        return "fraction"
    if not re.search(r"[\d\\^=]", gold) and re.search(r"[A-Za-z]{3,}", gold):
        return "text"
    if re.match(r"^[(\[].*[)\]]$", gold) and ("\\infty" in gold or gold[0] != gold[-1]):
        return "interval_or_tuple"
    if len(_top_level_parts(gold)) > 1:
        return "list"
    return "expression"


def _change_one_digit(answer: str, rng: random.Random) -> str | None:
    positions = [i for i, char in enumerate(answer) if char.isdigit()]
    if not positions:
        return None
    i = rng.choice(positions)
    digit = int(answer[i])
    new = digit + 1 if digit < 9 else 8
    return answer[:i] + str(new) + answer[i + 1 :]


def wrong_answer(gold: str, others: list[str], rng: random.Random) -> str:
    """A different answer of the same shape: a nearby integer, one digit changed, or another problem's gold."""
    plain = _plain(gold)
    if _INTEGER_RE.match(plain):
        value = int(plain)
        choices = {value + 1, value - 1, value + 10, 2 * value, 10 * value} - {value}
        return str(rng.choice(sorted(choices)))
    changed = _change_one_digit(gold, rng)
    if changed is not None:
        return changed
    squeeze = "".join(gold.split()).lower()
    candidates = [o for o in others if "".join(o.split()).lower() != squeeze and not re.search(r"\d", o)]
    return rng.choice(candidates or [o for o in others if o != gold])


def equivalent(gold: str, rng: random.Random) -> str | None:
    """Another spelling of the same value, as models write it, or None when there is no safe one."""
    fraction = _FRACTION_RE.match(gold)
    if fraction:
        sign, numerator, denominator = fraction.groups()
        options = [f"{sign}{numerator}/{denominator}", f"{sign}\\dfrac{{{numerator}}}{{{denominator}}}"]
        den = int(denominator)
        while den % 2 == 0:
            den //= 2
        while den % 5 == 0:
            den //= 5
        if den == 1:  # a terminating decimal
            options.append(sign + format(int(numerator) / int(denominator), ".10g"))
        return rng.choice(options)
    if _INTEGER_RE.match(gold):
        return rng.choice([f"{gold}.0", f"{gold}.00"])
    if gold.startswith("(") and gold.endswith(")") and "\\left" not in gold:
        return f"\\left({gold[1:-1]}\\right)"
    if "\\frac" in gold:
        return gold.replace("\\frac", "\\dfrac")
    return None


# ----------------------------------------------------------------------------------------------------------------
# Styles: each turns (problem, answer) into a solution text stating that answer
# ----------------------------------------------------------------------------------------------------------------

_UNITS = ["cm", "meters", "hours", "apples", "pages", "miles", "minutes", "inches", "square units", "students"]
_CONCLUSIONS = [
    "Therefore, the result is {x}.",
    "Hence the required value is {x}.",
    "So we obtain {x}.",
    "Thus, the value we are looking for is {x}.",
]


def _math(answer: str) -> str:
    """`answer` in math delimiters, unless it already holds some (College Math's `local min. $(1,-1)$`) or is a
    sentence (`Eight pieces of each kind of pie.`), which models write as text."""
    sentence = len(re.findall(r"\b[A-Za-z]{3,}\b", re.sub(r"\\[A-Za-z]+", " ", answer))) >= 3
    return answer if "$" in answer or sentence else f"${answer}$"


def _number_like(answer: str) -> bool:
    return bool(_NUMBER_RE.match(_plain(answer)))


def _body(problem: dict, answer: str, source: str) -> str:
    """The reasoning text, made to state `answer` where the reference solution states the gold."""
    body = problem["body"]
    if source == "math":
        from rstar_trl.grading import last_boxed

        # Unwrap every box; the reference solution's final box then states `answer` in plain math.
        gold_box = last_boxed(body)
        if gold_box is not None:
            position = body.rfind(gold_box)
            body = body[:position] + answer + body[position + len(gold_box) :]
        body = re.sub(r"\\boxed\s*\{", "{", body).replace("\\fbox{", "{")
    elif source == "olympiadbench":
        # Where the reference solution's opening states the gold, make it state `answer`.
        gold = problem["gold"]
        body = re.sub(rf"(?<![\w.,]){re.escape(gold)}(?![\w]|[.,]\d)", lambda _: answer, body)
    elif source == "gsm8k":
        lines = body.split("\n")
        gold = problem["gold"]
        last = lines[-1]
        matches = list(re.finditer(rf"(?<![\d.,]){re.escape(gold)}(?![\d]|[.,]\d)", last))
        if matches:
            match = matches[-1]
            lines[-1] = last[: match.start()] + answer + last[match.end() :]
        body = "\n".join(lines)
    return body


def _states_answer_last(problem: dict, source: str) -> bool:
    """Whether the reference solution's last line states the gold (GSM8K) or boxes it (MATH)."""
    if source == "gsm8k":
        last = problem["body"].split("\n")[-1]
        numbers = re.findall(r"\d[\d,]*(?:\.\d+)?", last)
        return bool(numbers) and numbers[-1].replace(",", "") == problem["gold"]
    if source == "math":
        return "\\boxed" in problem["body"]
    return False


def render(style: str, problem: dict, answer: str, other: str, source: str, rng: random.Random) -> str | None:
    """The solution text of `style` stating `answer` (`other`: a different answer, for multi_box), or None when
    the style does not apply to this problem."""
    body = _body(problem, answer, source)
    question = problem["question"]
    numeric = _number_like(answer)
    if style == "boxed":
        return f"{body}\n\nTherefore, the final answer is $\\boxed{{{answer}}}$."
    if style == "answer_is":
        return f"{body}\n\nThe answer is {answer if numeric else _math(answer)}."
    if style == "minerva":
        stated = answer if numeric and rng.random() < 0.5 else _math(answer)
        return f"{body}\n\nFinal Answer: The final answer is {stated}. I hope it is correct."
    if style == "hash":
        return f"{body}\n#### {answer}" if source == "gsm8k" else None
    if style == "prose":
        if _states_answer_last(problem, source):
            return body
        conclusion = rng.choice(_CONCLUSIONS)
        return f"{body}\n\n{conclusion.format(x=answer if numeric else _math(answer))}"
    if style == "money":
        if not numeric or not re.search(r"\$|dollar|cost|price|pay|earn|spend|sell", question, re.I):
            return None
        cents = f"{answer}.00" if _INTEGER_RE.match(answer) else answer
        return rng.choice(
            [
                f"{body}\n\nSo the total is $\\boxed{{\\${answer}}}$.",
                f"{body}\n\nSo the total is $\\boxed{{\\${cents}}}$.",
                f"{body}\n\nSo the total is $\\boxed{{{answer} \\text{{ dollars}}}}$.",
                f"{body}\n\nThe answer is ${answer}.",
                f"{body}\n\nFinal Answer: The final answer is \\${answer}. I hope it is correct.",
            ]
        )
    if style == "percent":
        if not numeric or not re.search(r"percent|%", question, re.I):
            return None
        return rng.choice(
            [f"{body}\n\nThe answer is $\\boxed{{{answer}\\%}}$.", f"{body}\n\nThe answer is {answer}%."]
        )
    if style == "units":
        if not numeric:
            return None
        unit = rng.choice(_UNITS)
        return rng.choice(
            [
                f"{body}\n\nThe answer is $\\boxed{{{answer} \\text{{ {unit}}}}}$.",
                f"{body}\n\nThe answer is {answer} {unit}.",
            ]
        )
    if style == "thousands":
        if not _INTEGER_RE.match(answer) or abs(int(answer)) < 1000:
            return None
        grouped = f"{int(answer):,}"
        return rng.choice([f"{body}\n\nThe answer is $\\boxed{{{grouped}}}$.", f"{body}\n\nThe answer is {grouped}."])
    if style == "equivalent":
        spelled = equivalent(answer, rng)
        return None if spelled is None else f"{body}\n\nTherefore, the final answer is $\\boxed{{{spelled}}}$."
    if style == "multi_box":
        return (
            f"{body}\n\nA first attempt gives $\\boxed{{{other}}}$. Wait, let me recheck the computation.\n"
            f"After correcting it, the final answer is $\\boxed{{{answer}}}$."
        )
    if style == "list_boxes":
        parts = _top_level_parts(answer)
        if len(parts) < 2 or len(parts) > 4:
            return None
        boxes = [f"$\\boxed{{{part}}}$" for part in parts]
        return f"{body}\n\nThe solutions are {', '.join(boxes[:-1])} and {boxes[-1]}."
    raise ValueError(f"unknown style {style!r}")


STYLES = (
    "boxed",
    "answer_is",
    "minerva",
    "hash",
    "prose",
    "money",
    "percent",
    "units",
    "thousands",
    "equivalent",
    "multi_box",
    "list_boxes",
)


def build_items(problems_per_source: int, seed: int = 0, data: Path | None = None) -> list[dict]:
    """The labelled set: for `problems_per_source` problems of each source, every style that applies, once with the
    gold answer (label True) and once with a wrong answer (label False). Deterministic for a given seed."""
    problems = load_problems(data or data_dir())
    items = []
    for source, pool in problems.items():
        rng = random.Random(f"{seed}:{source}")
        golds = [problem["gold"] for problem in pool]
        for index in rng.sample(range(len(pool)), min(problems_per_source, len(pool))):
            problem = pool[index]
            gold = problem["gold"]
            wrong = wrong_answer(gold, golds, rng)
            for style in STYLES:
                texts = {
                    label: render(style, problem, answer, other, source, random.Random(f"{seed}:{index}:{style}"))
                    for label, answer, other in ((True, gold, wrong), (False, wrong, gold))
                }
                if None in texts.values():
                    continue  # the style does not apply to this problem
                for label, text in texts.items():
                    item = {"source": source, "style": style, "kind": kind(gold), "gold": gold, "label": label}
                    items.append(dict(item, text=text))
    return items


# ----------------------------------------------------------------------------------------------------------------
# Graders
# ----------------------------------------------------------------------------------------------------------------


def ours(module) -> Callable[[str, str], bool]:
    return lambda text, gold: bool(module.grade_answer(module.extract_answer(text), gold))


def plain_math_verify(text: str, gold: str) -> bool:
    """Math-Verify alone on the whole text; the gold in math delimiters (a bare LaTeX gold is not found)."""
    from math_verify import parse, verify

    return bool(verify(parse(f"${gold}$"), parse(text)))


def plain_math_verify_raw(text: str, gold: str) -> bool:
    """Math-Verify alone, literally `verify(parse(gold), parse(text))`."""
    from math_verify import parse, verify

    return bool(verify(parse(gold), parse(text)))


def grading_module_at(rev: str):
    """rstar_trl/grading.py at git revision `rev`, imported as a separate module (it imports no project code)."""
    source = subprocess.run(
        ["git", "-C", str(REPO), "show", f"{rev}:rstar_trl/grading.py"], check=True, capture_output=True, text=True
    ).stdout
    path = Path(tempfile.mkdtemp()) / f"grading_{rev}.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location(f"grading_{rev}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def agreement(items: list[dict], verdicts: dict[str, list[bool]], by: str) -> dict[str, dict[str, float]]:
    """{group: {grader: agreement %, "n": count}} for items grouped by the field `by`."""
    groups: dict[str, list[int]] = defaultdict(list)
    for i, item in enumerate(items):
        groups[str(item[by])].append(i)
        groups["all"].append(i)
    table = {}
    for group, indices in groups.items():
        row = {"n": len(indices)}
        for grader, verdict in verdicts.items():
            row[grader] = round(100.0 * sum(verdict[i] == items[i]["label"] for i in indices) / len(indices), 1)
        table[group] = row
    return table


def _markdown(title: str, table: dict[str, dict[str, float]], graders: list[str]) -> str:
    lines = [f"| {title} | n | " + " | ".join(graders) + " |", "|---|---:|" + "---:|" * len(graders)]
    for group in sorted(table, key=lambda g: (g == "all", g)):
        row = table[group]
        lines.append(f"| {group} | {row['n']} | " + " | ".join(f"{row[g]:.1f}" for g in graders) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--problems", type=int, default=40, help="Problems drawn from each source.")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--before-rev", default=DEFAULT_BEFORE_REV, help="Git revision of the 'before' grader.")
    parser.add_argument("--no-before", action="store_true", help="Skip the 'before' grader.")
    parser.add_argument("--out", help="Write items and verdicts to this JSON file.")
    parser.add_argument("--show-misses", type=int, default=0, help="Print up to N items 'after' gets wrong.")
    args = parser.parse_args()
    # Imported here, not at the top: tests load this file by path, without this folder on sys.path.
    from _common import cpu_extensions, print_cpu

    print_cpu()
    logging.disable(logging.WARNING)  # Math-Verify warns about every unparsable expression

    import rstar_trl.grading as after

    items = build_items(args.problems, args.seed)
    graders: dict[str, Callable[[str, str], bool]] = {}
    if not args.no_before:
        graders["before"] = ours(grading_module_at(args.before_rev))
    graders["after"] = ours(after)
    graders["mv"] = plain_math_verify
    graders["mv_raw"] = plain_math_verify_raw
    verdicts: dict[str, list[bool]] = {}
    seconds: dict[str, float] = {}
    for name, grade in graders.items():
        started = time.monotonic()
        verdicts[name] = [grade(item["text"], item["gold"]) for item in items]
        seconds[name] = round(time.monotonic() - started, 1)
        print(f"{name}: {seconds[name]} s", file=sys.stderr)

    names = list(graders)
    tables = {by: agreement(items, verdicts, by) for by in ("source", "style", "kind", "label")}
    for by, table in tables.items():
        print(_markdown(by, table, names), end="\n\n")
    if args.show_misses:
        misses = [i for i, item in enumerate(items) if verdicts["after"][i] != item["label"]]
        for i in misses[: args.show_misses]:
            item = items[i]
            print(
                f"--- {item['source']}/{item['style']} label={item['label']} gold={item['gold']!r} "
                f"extracted={after.extract_answer(item['text'])!r} mv={verdicts['mv'][i]}\n{item['text'][-300:]}\n"
            )
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        records = [dict(item, **{name: verdicts[name][i] for name in names}) for i, item in enumerate(items)]
        Path(args.out).write_text(json.dumps(records, indent=1))
    summary = {"items": len(items), "seconds": seconds, "stats": after.grading_stats(), "cpu": cpu_extensions()}
    summary.update({by: table for by, table in tables.items()})
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
