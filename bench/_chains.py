"""A second task family for `search_efficiency.py`: long register programs ("chains").

The tiny default's word problems are short (1-6 steps, most 2-4), so a sampled solution costs little more than one
MCTS expansion, and there is little for a step-level search to save. The premise of step-level search (paper
§3.1) is that a long solution whose steps can each go wrong is best built step by step: a correct prefix is
generated once and shared by every continuation tried after it, where full-solution sampling pays for the whole
prefix again with each sample. This family is built to have that shape:

    Start with a = 14 and b = 6. Add 5 to a. Double b. Add b to a. Swap a and b. Subtract 3 from a.
    Add 7 to b. ... What is a at the end?

One step per instruction (the comment restates it, the code is one line: `a += 5`, `b *= 2`, `a, b = b, a`), the
last step also prints the answer. A program has 2-10 instructions; the benchmark's problems have 7-10 (8-11
steps, 150-300 solution tokens), the bootstrap every length, shorter ones more often, so that the policy writes
the format at every length but loses its place in long programs, like the tiny default's policy at levels 3-5.
What goes wrong in a step (a skipped or repeated instruction, a miscopied number, the wrong register) runs without
error, so only the final answer tells a right solution from a wrong one: the executor filters nothing, the search
gets no help beyond the gold answer's reward and sharing prefixes.
"""

from __future__ import annotations

import random

from rstar_trl.format import Step

# Instruction counts of the bootstrap (each entry one share: short programs more often) and of the benchmark.
BOOTSTRAP_LENGTHS = (2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7, 8, 9, 10)
BENCH_LENGTHS = (7, 8, 9, 10)
_MAX_VALUE = 999


def _instruction(rng: random.Random, values: dict[str, int]) -> tuple[str, str]:
    """One instruction that keeps both registers in 0..999: (sentence, code). Updates `values`."""
    reg = rng.choice("ab")
    other = "b" if reg == "a" else "a"
    options = ["add", "add", "sub", "sub", "add_other", "double", "swap"]
    while True:
        kind = rng.choice(options)
        if kind == "add":
            k = rng.randint(2, 12)
            new, sentence, code = values[reg] + k, f"Add {k} to {reg}.", f"{reg} += {k}"
        elif kind == "sub":
            k = rng.randint(2, 12)
            new, sentence, code = values[reg] - k, f"Subtract {k} from {reg}.", f"{reg} -= {k}"
        elif kind == "add_other":
            new, sentence, code = values[reg] + values[other], f"Add {other} to {reg}.", f"{reg} += {other}"
        elif kind == "double":
            new, sentence, code = 2 * values[reg], f"Double {reg}.", f"{reg} *= 2"
        else:
            values["a"], values["b"] = values["b"], values["a"]
            return "Swap a and b.", "a, b = b, a"
        if 0 <= new <= _MAX_VALUE:
            values[reg] = new
            return sentence, code


def make_chain(rng: random.Random, length: int) -> dict:
    """One program of `length` instructions: `problem`, `answer`, `level` (= length) and template `steps`."""
    values = {"a": rng.randint(2, 30), "b": rng.randint(2, 30)}
    start = f"Start with a = {values['a']} and b = {values['b']}."
    steps = [Step(start, f"a, b = {values['a']}, {values['b']}")]
    sentences = [start]
    for _ in range(length):
        sentence, code = _instruction(rng, values)
        sentences.append(sentence)
        steps.append(Step(sentence, code))
    target = rng.choice("ab")
    answer = str(values[target])
    last = steps[-1]
    steps[-1] = Step(last.comment, f"{last.code}\nprint({target})", is_final=True, output=answer,
                     answer=f"The answer is \\boxed{{{answer}}}.")  # fmt: skip
    problem = " ".join(sentences) + f" What is {target} at the end?"
    return {"problem": problem, "answer": answer, "level": length, "steps": steps}


def chain_problems(num: int, lengths: tuple[int, ...], seed: int, exclude: set[str] = frozenset()) -> list[dict]:
    """`num` distinct programs (none in `exclude`), lengths cycling through `lengths` in a shuffled order."""
    rng = random.Random(seed)
    plan = [lengths[i % len(lengths)] for i in range(num)]
    rng.shuffle(plan)
    seen, kept = set(exclude), []
    for length in plan:
        while True:
            problem = make_chain(rng, length)
            if problem["problem"] not in seen:
                seen.add(problem["problem"])
                kept.append(problem)
                break
    return kept


def chain_splits(seed: int = 0, num_bootstrap: int = 3000, num_bench: int = 1000) -> dict[str, list[dict]]:
    """`bootstrap` (every length, for the policy's SFT) and `bench` (7-10 instructions), disjoint."""
    bootstrap = chain_problems(num_bootstrap, BOOTSTRAP_LENGTHS, seed * 2 + 1)
    bench = chain_problems(num_bench, BENCH_LENGTHS, seed * 2 + 2, {p["problem"] for p in bootstrap})
    return {"bootstrap": bootstrap, "bench": bench}
