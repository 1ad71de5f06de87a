"""Tables, paired tests and verdicts of the tiny reproduction (docs/results.md), from what reproduce.sh wrote.

    python recipes/tiny/report.py a runs/repro     # or b, c, d, g; prints markdown, writes <OUT>/report_<part>.json
    python recipes/tiny/report.py choose-mcts runs/repro   # parts b and c's search budget, chosen on validation

Every claim compares two per-problem correctness vectors on the same problems (`rstar_trl.stats`): the difference
with Newcombe's 95% interval and the exact McNemar p-value, Holm-adjusted within a part. The verdict rule was fixed
before any test-split number was seen (docs/results.md, "Pre-registration"):

- holds: adjusted p < 0.05 and the difference in the claimed direction;
- does not hold: the interval's upper end (in the claimed direction) is below the smallest effect of interest
  (`MIN_EFFECT`, 2 points), or the difference is significant in the other direction;
- inconclusive: anything else.
"""

from __future__ import annotations

import json
import os
import sys
from collections import Counter

from rstar_trl.stats import holm, paired_comparison, wilson_interval
from rstar_trl.tiny import tiny_splits

MIN_EFFECT = 0.02  # smallest accuracy difference the claims care about (2 points)
LEVELS = (1, 2, 3, 4, 5)


def load(path: str) -> dict[str, dict]:
    """The methods of one results.json, by label."""
    with open(path) as f:
        results = json.load(f)
    return {m["method"]: m for m in results["methods"]}


def correctness(method: dict) -> list[bool]:
    return [r["correct"] for r in sorted(method["problems"], key=lambda r: r["index"])]


def verdict(diff: float, ci: tuple[float, float], p_adjusted: float) -> str:
    if p_adjusted < 0.05 and diff > 0:
        return "holds"
    if ci[1] < MIN_EFFECT or (p_adjusted < 0.05 and diff < 0):
        return "does not hold"
    return "inconclusive"


def claims_table(claims: list[tuple[str, str, dict, str, dict]]) -> tuple[str, list[dict]]:
    """claims: (id, label A, method A, label B, method B), each claiming A > B."""
    comparisons = [paired_comparison(correctness(a), correctness(b)) for _, _, a, _, b in claims]
    adjusted = holm([c.p_value for c in comparisons])
    lines = ["| claim | A | B | A | B | A - B (95% CI) | A only / B only | p (exact McNemar) | p (Holm) | verdict |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---|"]  # fmt: skip
    records = []
    for (cid, la, _, lb, _), c, p in zip(claims, comparisons, adjusted):
        v = verdict(c.difference, c.ci95, p)
        lines.append(
            f"| {cid} | {la} | {lb} | {100 * c.accuracy_a:.1f}% | {100 * c.accuracy_b:.1f}% | "
            f"{100 * c.difference:+.1f} ({100 * c.ci95[0]:+.1f}, {100 * c.ci95[1]:+.1f}) | {c.only_a} / {c.only_b} | "
            f"{c.p_value:.2g} | {p:.2g} | **{v}** |"
        )
        records.append({"claim": cid, "a": la, "b": lb, **c.to_dict(), "p_holm": p, "verdict": v})
    return "\n".join(lines), records


def accuracy_table(rows: list[tuple[str, dict]], split: str = "test") -> str:
    """Accuracy with Wilson intervals, tokens per problem and accuracy by level, one row per (label, method)."""
    problems = tiny_splits()[split]
    levels = " | ".join(f"level {lv}" for lv in LEVELS)
    lines = [f"| | accuracy (95% CI) | correct | tokens / problem | {levels} |",
             "|---|---:|---:|---:|" + "---:|" * len(LEVELS)]  # fmt: skip
    for label, method in rows:
        n, k = method["num_problems"], method["correct"]
        low, high = wilson_interval(k, n)
        right, total = Counter(), Counter()
        for r in method["problems"]:
            level = problems[r["index"]]["level"]
            total[level] += 1
            right[level] += r["correct"]
        by_level = " | ".join(f"{right[lv]}/{total[lv]}" for lv in LEVELS)
        lines.append(
            f"| {label} | {100 * (k / n):.1f}% ({100 * low:.1f}-{100 * high:.1f}) | {k}/{n} | "
            f"{method['tokens_per_problem']:.0f} | {by_level} |"
        )
    return "\n".join(lines)


def part_a(out: str) -> tuple[str, list[dict]]:
    greedy = {k: load(os.path.join(out, "eval", "a", f"round_{k}", "results.json"))["greedy"] for k in range(5)}
    table = accuracy_table([(f"round {k}" if k else "round 0 (bootstrap)", greedy[k]) for k in range(5)])
    claims = [("A1", "round 4", greedy[4], "round 0", greedy[0])]
    claims += [(f"A2.{k}", f"round {k}", greedy[k], f"round {k - 1}", greedy[k - 1]) for k in range(1, 5)]
    text, records = claims_table(claims)
    search, coverage = search_table(out)
    plot = plot_rounds(greedy, coverage, os.path.join(out, "accuracy_by_round.png"))
    return (
        f"### Greedy accuracy of each round's policy\n\n{table}\n\n### Claims\n\n{text}\n\n"
        f"### What each round's search found (its 256 train problems)\n\n{search}\n\nPlot: {plot}\n",
        records,
    )


def search_table(out: str) -> tuple[str, dict[int, dict]]:
    """Per round: problems the search solved (by level), SFT rows and PPM pairs, from the round's artifacts."""
    from rstar_trl.hub import load_dataset_folder

    levels = " | ".join(f"level {lv}" for lv in LEVELS)
    lines = [f"| round | solved | {levels} | SFT rows | PPM pairs |", "|---|---:|" + "---:|" * (len(LEVELS) + 2)]
    coverage = {}
    for k in range(1, 5):
        trees = load_dataset_folder(os.path.join(out, f"round_{k}", "trees")).select_columns(["solved", "level"])
        right, total = Counter(), Counter()
        for solved, level in zip(trees["solved"], trees["level"]):
            total[level] += 1
            right[level] += bool(solved)
        rows = {}
        for stage in ("sft", "pairs"):
            with open(os.path.join(out, f"round_{k}", stage, "DONE.json")) as f:
                rows[stage] = json.load(f)["rows"]
        solved, n = sum(right.values()), sum(total.values())
        coverage[k] = {"solved": solved, "problems": n, "by_level": {lv: (right[lv], total[lv]) for lv in LEVELS}}
        by_level = " | ".join(f"{right[lv]}/{total[lv]}" for lv in LEVELS)
        share = f"{solved}/{n} ({100 * solved / n:.1f}%)"
        lines.append(f"| {k} | {share} | {by_level} | {rows['sft']} | {rows['pairs']} |")
    return "\n".join(lines), coverage


def plot_rounds(greedy: dict[int, dict], coverage: dict[int, dict], path: str) -> str:
    """Greedy test accuracy of each round's policy by level, next to the share of its train problems each round's
    search solved."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    problems = tiny_splits()["test"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    rounds = sorted(greedy)
    for level in (*LEVELS, None):
        accuracy = []
        for k in rounds:
            rows = [r for r in greedy[k]["problems"] if level is None or problems[r["index"]]["level"] == level]
            accuracy.append(100 * sum(r["correct"] for r in rows) / len(rows))
        left.plot(rounds, accuracy, marker="o", linewidth=3 if level is None else 1,
                  label="all" if level is None else f"level {level}")  # fmt: skip
    left.set(title="policy, greedy (test)", xlabel="round", ylabel="% solved", xticks=rounds)
    searched = sorted(coverage)
    for level in (*LEVELS, None):
        shares = []
        for k in searched:
            right_total = coverage[k]["by_level"][level] if level else (coverage[k]["solved"], coverage[k]["problems"])
            shares.append(100 * right_total[0] / max(right_total[1], 1))
        right.plot(searched, shares, marker="o", linewidth=3 if level is None else 1,
                   label="all" if level is None else f"level {level}")  # fmt: skip
    right.set(title="the round's MCTS (its train problems)", xlabel="round", xticks=searched)
    right.legend(loc="center right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def part_b(out: str) -> tuple[str, list[dict]]:
    runs = {rm: load(os.path.join(out, "eval", "b", rm, "results.json")) for rm in ("ppm", "pqm", "orm")}
    search, bon = _b_methods(runs["ppm"])
    rows = [(f"{rm.upper()} {m}", runs[rm][m]) for rm in ("ppm", "pqm", "orm") for m in (search, bon)]
    table = accuracy_table(rows)
    claims = [
        ("B1", f"PPM {search}", runs["ppm"][search], f"ORM {bon}", runs["orm"][bon]),
        ("B2", f"PPM {search}", runs["ppm"][search], f"PQM {search}", runs["pqm"][search]),
        ("B3", f"PQM {search}", runs["pqm"][search], f"ORM {bon}", runs["orm"][bon]),
    ]
    text, records = claims_table(claims)
    return f"### Reward models at the same budget\n\n{table}\n\n### Claims\n\n{text}\n", records


def _b_methods(methods: dict) -> tuple[str, str]:
    search = next(m for m in methods if m.startswith("mcts"))
    bon = next(m for m in methods if m.startswith("best_of_n"))
    return search, bon


def part_c(out: str) -> tuple[str, list[dict]]:
    methods = load(os.path.join(out, "eval", "c", "results.json"))
    table = accuracy_table(list(methods.items()))
    search = next(m for m in methods if m.startswith("mcts"))
    maj = max((m for m in methods if m.startswith("maj@")), key=lambda m: methods[m]["tokens_per_problem"])
    bon = max((m for m in methods if m.startswith("best_of_n@")), key=lambda m: methods[m]["tokens_per_problem"])
    claims = [
        ("C1", search, methods[search], "greedy", methods["greedy"]),
        ("C2", search, methods[search], maj, methods[maj]),
        ("C3", search, methods[search], bon, methods[bon]),
    ]
    text, records = claims_table(claims)
    return f"### Methods at matched tokens\n\n{table}\n\n### Claims\n\n{text}\n", records


def part_d(out: str) -> tuple[str, list[dict]]:
    runs = {kind: load(os.path.join(out, "eval", "d", kind, "results.json"))["greedy"]
            for kind in ("mcts", "rejection", "random")}  # fmt: skip
    table = accuracy_table([(f"SFT on {kind} data", runs[kind]) for kind in ("mcts", "rejection", "random")])
    claims = [
        ("D1", "MCTS data", runs["mcts"], "random samples", runs["random"]),
        ("D2", "MCTS data", runs["mcts"], "rejection sampling", runs["rejection"]),
    ]
    text, records = claims_table(claims)
    return f"### SFT data\n\n{table}\n\n### Claims\n\n{text}\n", records


def part_g(out: str) -> tuple[str, list[dict]]:
    """GRPO from round 2 with the round-2 PPM as reward (docs/results.md section 4) against round 2's policy."""
    grpo = load(os.path.join(out, "eval", "grpo_round_2", "results.json"))["greedy"]
    sft = load(os.path.join(out, "eval", "a", "round_2", "results.json"))["greedy"]
    table = accuracy_table([("round 2 + GRPO (PPM + correctness rewards)", grpo), ("round 2", sft)])
    text, records = claims_table([("G1", "round 2 + GRPO", grpo, "round 2", sft)])
    return f"### GRPO with the PPM as reward\n\n{table}\n\n### Claim\n\n{text}\n", records


PARTS = {"a": part_a, "b": part_b, "c": part_c, "d": part_d, "g": part_g}
MCTS_CANDIDATES = ("mcts@2x2x4:best", "mcts@4x2x4:best", "mcts@4x4x4:best")  # registered, smallest first


def choose_mcts(out: str) -> str:
    """The registered choice of parts b and c's search budget, from the validation run reproduce.sh makes
    (`<out>/eval/mcts_budget`): the largest candidate whose tokens per problem do not exceed best_of_n@16's (the
    smallest candidate when none fits)."""
    path = os.path.join(out, "eval", "mcts_budget", "results.json")
    with open(path) as f:
        results = json.load(f)
    if results["dataset"] != "tiny-validation":
        raise SystemExit(f"{path}: the search budget must be chosen on tiny-validation")
    methods = {m["method"]: m for m in results["methods"]}
    limit = methods["best_of_n@16"]["tokens_per_problem"]
    fitting = [m for m in MCTS_CANDIDATES if methods[m]["tokens_per_problem"] <= limit]
    return fitting[-1] if fitting else MCTS_CANDIDATES[0]


def main(argv: list[str]) -> None:
    if len(argv) in (1, 2) and argv[0] == "choose-mcts":
        print(choose_mcts(argv[1] if len(argv) > 1 else "runs/repro"))
        return
    if len(argv) not in (1, 2) or argv[0] not in PARTS:
        raise SystemExit("usage: python recipes/tiny/report.py a|b|c|d|g|choose-mcts [OUT (default runs/repro)]")
    part, out = argv[0], argv[1] if len(argv) > 1 else "runs/repro"
    text, records = PARTS[part](out)
    print(text)
    with open(os.path.join(out, f"report_{part}.json"), "w") as f:
        json.dump(records, f, indent=2)


if __name__ == "__main__":
    main(sys.argv[1:])
