"""Seeded multi-step arithmetic word problems for the embedded tiny default.

Each problem is a short story, one quantity-changing sentence after another, ending with a question::

    Mia has 23 apples. Then Mia buys 4 more apples. Then Mia gets 3 bags with 5 apples each.
    How many apples does Mia have now?

and comes with a template solution in the code-augmented step format: one `Step` per sentence, whose comment
restates the sentence and whose code is one line updating a variable; the last step also prints the answer.

Difficulty levels (the bootstrap has mostly levels 1-2 and a little of each harder one, so the bootstrapped policy
is unreliable beyond level 1 and search and self-evolution have room to improve it):

| level | steps | what is new |
|---|---|---|
| 1 | 1-2 | a start and at most one change |
| 2 | 3 | two changes |
| 3 | 4 | three changes |
| 4 | 5 | a distractor sentence with an irrelevant number among three changes |
| 5 | 6 | two people, relational phrasing ("3 times as many as", "half of"), quantities depending on earlier ones |
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import datasets

from rstar_trl.format import Step

__all__ = ["LEVELS", "generate_problems", "tiny_splits", "to_dataset"]

LEVELS = (1, 2, 3, 4, 5)
# Values stay small so answers are short numbers (< 10000, in practice < 1000) and never negative.
_MAX_VALUE = 999
# Small operands: a ~1 M-parameter model copies and adds short numbers far more reliably than long ones.
_START = (5, 30)  # a first count
_CHANGE = (2, 12)  # one change (at least 2: "1 apples" is not English)
_BAGS, _EACH = (2, 5), (2, 6)  # "3 bags with 5 apples each"

# (name, possessive pronoun): a pronoun is only needed for "half of her apples" style phrasing.
_NAMES = (
    ("Mia", "her"), ("Ava", "her"), ("Emma", "her"), ("Lily", "her"), ("Zoe", "her"), ("Nora", "her"),
    ("Ella", "her"), ("Ruby", "her"), ("Anna", "her"), ("Sara", "her"), ("Maya", "her"), ("Lucy", "her"),
    ("Tom", "his"), ("Leo", "his"), ("Max", "his"), ("Sam", "his"), ("Ben", "his"), ("Jack", "his"),
    ("Noah", "his"), ("Liam", "his"), ("Eli", "his"), ("Owen", "his"), ("Finn", "his"), ("Hugo", "his"),
)  # fmt: skip
_FOODS = ("apples", "oranges", "pears", "plums", "cookies", "candies", "muffins", "eggs", "lemons", "peaches")
_THINGS = ("marbles", "stickers", "pencils", "books", "cards", "stamps", "coins", "shells", "toys", "beads")
_CONTAINERS = ("bags", "boxes", "packs")
_TIMES = {2: "twice", 3: "3 times", 4: "4 times"}


@dataclass
class _Person:
    name: str
    pronoun: str
    var: str
    value: int = 0


@dataclass(frozen=True)
class _Sentence:
    text: str
    code: str
    comment: str = ""  # defaults to the sentence itself

    def step(self) -> Step:
        return Step(self.comment or self.text, self.code)


# ------------------------------------------------------------------------------------------------------------------
# Sentences. Each builder updates the person's value and returns the sentence with its one line of code.
# ------------------------------------------------------------------------------------------------------------------


def _start(rng: random.Random, who: _Person, obj: str) -> _Sentence:
    if rng.random() < 0.3:
        bags, each = rng.randint(*_BAGS), rng.randint(*_EACH)
        who.value = bags * each
        container = rng.choice(_CONTAINERS)
        return _Sentence(f"{who.name} has {bags} {container} with {each} {obj} each.", f"{who.var} = {bags} * {each}")
    who.value = rng.randint(*_START)
    return _Sentence(f"{who.name} has {who.value} {obj}.", f"{who.var} = {who.value}")


def _change(rng: random.Random, who: _Person, obj: str, others: Sequence[str]) -> _Sentence:
    """A plain change of one person's count: buys / finds / gets / gives away / loses / eats / sells, maybe in bags."""
    other = rng.choice(others)
    bagged = rng.random() < 0.25
    taking = who.value >= _CHANGE[0] and rng.random() < 0.5
    if bagged:
        container, bags = rng.choice(_CONTAINERS), rng.randint(*_BAGS)
        most_each = min(_EACH[1], who.value // bags)  # the most per bag that can still be taken away
        each = rng.randint(_EACH[0], max(_EACH[0], most_each)) if taking else rng.randint(*_EACH)
        if taking and bags * each <= who.value:  # else there is too little to take: add instead
            verb = rng.choice(("gives away", "sells"))
            who.value -= bags * each
            return _Sentence(
                f"Then {who.name} {verb} {bags} {container} with {each} {obj} each.", f"{who.var} -= {bags} * {each}"
            )
        verb = rng.choice(("buys", "gets"))
        who.value += bags * each
        return _Sentence(
            f"Then {who.name} {verb} {bags} {container} with {each} {obj} each.", f"{who.var} += {bags} * {each}"
        )
    if taking:
        amount = rng.randint(_CHANGE[0], min(who.value, _CHANGE[1]))
        verbs = [f"gives away {amount} {obj}", f"gives {amount} {obj} to {other}", f"loses {amount} {obj}"]
        verbs += [f"sells {amount} {obj}"] + ([f"eats {amount} {obj}"] * 2 if obj in _FOODS else [])
        who.value -= amount
        return _Sentence(f"Then {who.name} {rng.choice(verbs)}.", f"{who.var} -= {amount}")
    amount = rng.randint(*_CHANGE)
    verbs = [f"buys {amount} more {obj}", f"finds {amount} {obj}", f"gets {amount} {obj} from {other}"]
    who.value += amount
    return _Sentence(f"Then {who.name} {rng.choice(verbs)}.", f"{who.var} += {amount}")


def _distractor(rng: random.Random, who: _Person, obj: str, others: Sequence[str]) -> _Sentence:
    """A sentence with a number that does not matter for the question (level 4)."""
    note = f" This does not change how many {obj} {who.name} has."
    kind = rng.randrange(3)
    if kind == 0:
        other, amount = rng.choice(others), rng.randint(*_START)
        return _Sentence(
            f"{other} has {amount} {obj}.", f"{other.lower()}_{obj} = {amount}", f"{other} has {amount} {obj}." + note
        )
    if kind == 1:
        thing, amount = rng.choice([t for t in _THINGS + _FOODS if t != obj]), rng.randint(*_START)
        return _Sentence(
            f"{who.name} also has {amount} {thing}.",
            f"{thing} = {amount}",
            f"{who.name} also has {amount} {thing}." + note,
        )
    age = rng.randint(6, 14)
    return _Sentence(f"{who.name} is {age} years old.", f"age = {age}", f"{who.name} is {age} years old." + note)


def _relate(rng: random.Random, new: _Person, ref: _Person, obj: str) -> _Sentence:
    """Introduce a second person's count relative to the first ("3 times as many as", "half as many as")."""
    options: list[Callable[[], _Sentence]] = []

    def times() -> _Sentence:
        factor = rng.choice((2, 3, 4))
        new.value = factor * ref.value
        return _Sentence(
            f"{new.name} has {_TIMES[factor]} as many {obj} as {ref.name}.", f"{new.var} = {factor} * {ref.var}"
        )

    def more() -> _Sentence:
        amount = rng.randint(*_CHANGE)
        new.value = ref.value + amount
        return _Sentence(f"{new.name} has {amount} more {obj} than {ref.name}.", f"{new.var} = {ref.var} + {amount}")

    def fewer() -> _Sentence:
        amount = rng.randint(_CHANGE[0], min(_CHANGE[1], ref.value - 1))
        new.value = ref.value - amount
        return _Sentence(f"{new.name} has {amount} fewer {obj} than {ref.name}.", f"{new.var} = {ref.var} - {amount}")

    def half() -> _Sentence:
        new.value = ref.value // 2
        return _Sentence(f"{new.name} has half as many {obj} as {ref.name}.", f"{new.var} = {ref.var} // 2")

    options += [times, times, more]
    options += [fewer] if ref.value > _CHANGE[0] + 1 else []
    options += [half, half] if ref.value % 2 == 0 else []
    return rng.choice(options)()


def _relational_change(rng: random.Random, who: _Person, ref: _Person, obj: str) -> _Sentence:
    """A change of one person's count that depends on a count (theirs or another person's)."""
    options: list[Callable[[], _Sentence]] = []

    def halve() -> _Sentence:
        verb = rng.choice(("gives away", "sells", "loses") + (("eats",) if obj in _FOODS else ()))
        who.value -= who.value // 2
        return _Sentence(f"Then {who.name} {verb} half of {who.pronoun} {obj}.", f"{who.var} -= {who.var} // 2")

    def buy_times() -> _Sentence:
        factor = rng.choice((2, 3))
        who.value += factor * ref.value
        return _Sentence(
            f"Then {who.name} buys {_TIMES[factor]} as many {obj} as {ref.name} has.",
            f"{who.var} += {factor} * {ref.var}",
        )

    def match() -> _Sentence:
        who.value += ref.value
        return _Sentence(f"Then {who.name} finds as many {obj} as {ref.name} has.", f"{who.var} += {ref.var}")

    options += [buy_times, match]
    options += [halve, halve] if who.value % 2 == 0 and who.value >= 2 else []
    return rng.choice(options)()


# ------------------------------------------------------------------------------------------------------------------
# Problems
# ------------------------------------------------------------------------------------------------------------------


def _story(rng: random.Random, level: int) -> tuple[list[_Sentence], _Person, str]:
    """The sentences of one problem, the person the question asks about, and the object counted."""
    (name, pronoun), (other_name, other_pronoun) = rng.sample(_NAMES, 2)
    others = [n for n, _ in _NAMES if n != name]
    obj = rng.choice(_FOODS + _THINGS)
    if level == 5:
        first = _Person(name, pronoun, f"{name.lower()}_{obj}")
        second = _Person(other_name, other_pronoun, f"{other_name.lower()}_{obj}")
        sentences = [_start(rng, first, obj), _relate(rng, second, first, obj)]
        # Three changes, at least one of them relational (its quantity depends on earlier ones).
        relational_at = rng.randrange(3)
        for i in range(3):
            who, ref = (first, second) if rng.random() < 0.5 else (second, first)
            if i == relational_at or rng.random() < 0.4:
                sentences.append(_relational_change(rng, who, ref, obj))
            else:
                sentences.append(_change(rng, who, obj, [n for n in others if n != other_name]))
        # The last sentence combines both counts, so the answer depends on every earlier quantity of both.
        giver, taker = (second, first) if rng.random() < 0.5 else (first, second)
        taker.value += giver.value
        sentences.append(
            _Sentence(
                f"Then {giver.name} gives all of {giver.pronoun} {obj} to {taker.name}.", f"{taker.var} += {giver.var}"
            )
        )
        return sentences, taker, obj
    who = _Person(name, pronoun, obj)
    num_changes = {1: rng.randint(0, 1), 2: 2, 3: 3, 4: 3}[level]
    sentences = [_start(rng, who, obj)] + [_change(rng, who, obj, others) for _ in range(num_changes)]
    if level == 4:  # the distractor goes anywhere after the start and before the last (printing) sentence
        sentences.insert(rng.randint(1, len(sentences) - 1), _distractor(rng, who, obj, others))
    return sentences, who, obj


def _make_problem(rng: random.Random, level: int) -> dict:
    while True:  # rejection sampling keeps every value in range; deterministic for the rng state
        sentences, target, obj = _story(rng, level)
        if 0 <= target.value <= _MAX_VALUE:
            break
    answer = str(target.value)
    question = f"How many {obj} does {target.name} have{' now' if len(sentences) > 1 else ''}?"
    steps = [s.step() for s in sentences]
    last = steps[-1]
    steps[-1] = Step(
        last.comment,
        f"{last.code}\nprint({target.var})",
        is_final=True,
        output=answer,
        answer=f"The answer is \\boxed{{{answer}}}.",
    )
    problem = " ".join(s.text for s in sentences) + " " + question
    return {"problem": problem, "answer": answer, "level": level, "steps": steps}


def generate_problems(num: int, level: int | tuple[int, ...] = LEVELS, seed: int = 0) -> list[dict]:
    """Generate `num` word problems with gold answers and template step solutions.

    Args:
        num: how many problems.
        level: one difficulty level (1-5) or a tuple of levels; with a tuple, problems cycle through its entries
            (so a level listed twice gets twice the share) and come out shuffled.
        seed: the same seed gives the same problems.

    Returns:
        dicts with `problem` (str), `answer` (str, an integer), `level` (int) and `steps` (list of `Step`; run
        as a program with `build_program` they print the answer).
    """
    levels = (level,) if isinstance(level, int) else tuple(level)
    if not levels or any(lv not in LEVELS for lv in levels):
        raise ValueError(f"levels must be in {LEVELS}, got {level!r}")
    rng = random.Random(seed)
    plan = [levels[i % len(levels)] for i in range(num)]
    rng.shuffle(plan)
    return [_make_problem(rng, lv) for lv in plan]


def _stream(seed: int, name: str) -> int:
    """An independent seed per split, so that splits never share a random stream."""
    return int.from_bytes(hashlib.sha256(f"rstar_trl.tiny:{seed}:{name}".encode()).digest()[:8], "big")


def _unique(num: int, level: tuple[int, ...], seed: int, exclude: set[str]) -> list[dict]:
    """`num` problems whose texts are distinct from each other and from `exclude` (short problems can collide)."""
    kept: list[dict] = []
    seen = set(exclude)
    draw = 0
    while len(kept) < num:
        for problem in generate_problems(num, level, _stream(seed, f"draw{draw}")):
            if problem["problem"] not in seen and len(kept) < num:
                seen.add(problem["problem"])
                kept.append(problem)
        draw += 1
    return kept


# The bootstrap is mostly levels 1-2 with a little of every harder level (each level listed is one share: levels 1
# and 2 get 4/11 each, levels 3-5 1/11 each). The policy it gives writes every level's format but is unreliable:
# on a validation draw, greedy decoding solves 76% / 45% / 8% / 4% / 0% of levels 1-5, while one of 8 samples is
# right for 90% / 77% / 31% / 29% / 0%, room for search and self-evolution at levels 1-4. A bootstrap of levels
# 1-2 only solved those perfectly and could not write the 4+ steps of levels 3-5, so search found almost nothing
# beyond greedy there (docs/results.md, "Design").
BOOTSTRAP_LEVELS = (1, 1, 1, 1, 2, 2, 2, 2, 3, 4, 5)
# Train, validation and test: levels 2-4 (where that room is) get two shares each, levels 1 and 5 one.
_EVAL_LEVELS = (1, 2, 2, 3, 3, 4, 4, 5)


def tiny_splits(
    seed: int = 0,
    num_bootstrap: int = 2000,
    num_train: int = 2000,
    num_validation: int = 1000,
    num_test: int = 2000,
    bootstrap_levels: tuple[int, ...] = BOOTSTRAP_LEVELS,
) -> dict[str, list[dict]]:
    """The tiny default's problem sets.

    Returns:
        `bootstrap` (template solutions of `bootstrap_levels`, for the initial SFT of the tiny policy), `train`
        (levels 1-5, the problems self-evolution searches), `validation` (levels 1-5, for choosing settings) and
        `test` (levels 1-5, for reporting only; 2000 problems, so that greedy accuracy differences of a few points
        are detectable). Train, validation and test share one level mix (`_EVAL_LEVELS`). The four are disjoint
        (no problem text in two of them); each split has its own random stream, so resizing one split leaves the
        splits drawn before it as they were (the order: bootstrap, train, test, validation).
    """
    bootstrap = _unique(num_bootstrap, tuple(bootstrap_levels), _stream(seed, "bootstrap"), set())
    seen = {p["problem"] for p in bootstrap}
    train = _unique(num_train, _EVAL_LEVELS, _stream(seed, "train"), seen)
    seen |= {p["problem"] for p in train}
    test = _unique(num_test, _EVAL_LEVELS, _stream(seed, "test"), seen)
    seen |= {p["problem"] for p in test}
    validation = _unique(num_validation, _EVAL_LEVELS, _stream(seed, "validation"), seen)
    return {"bootstrap": bootstrap, "train": train, "validation": validation, "test": test}


def to_dataset(problems: Sequence[dict]) -> datasets.Dataset:
    """The problems as a `datasets.Dataset` with `problem`, `answer` and `level` columns (solutions left out)."""
    return datasets.Dataset.from_dict(
        {
            "problem": [p["problem"] for p in problems],
            "answer": [p["answer"] for p in problems],
            "level": [p["level"] for p in problems],
        }
    )
