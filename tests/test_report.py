"""recipes/tiny/report.py: the registered verdict rule applied to paired results (docs/results.md)."""

import importlib.util
import json
import random
from pathlib import Path

import pytest
from datasets import Dataset

from rstar_trl.hub import save_dataset_folder

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("tiny_report", ROOT / "recipes" / "tiny" / "report.py")
report = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(report)


def _results(
    path: Path, methods: dict[str, list[bool]], tokens: dict[str, float] | None = None, dataset: str = "tiny-test"
) -> None:
    path.mkdir(parents=True, exist_ok=True)
    summaries = []
    for name, correct in methods.items():
        records = [{"index": i, "correct": c, "tokens": 60} for i, c in enumerate(correct)]
        random.Random(0).shuffle(records)  # the report pairs by problem index, not by position
        summaries.append({"method": name, "num_problems": len(correct), "correct": sum(correct),
                          "tokens_per_problem": (tokens or {}).get(name, 60.0), "problems": records})  # fmt: skip
    (path / "results.json").write_text(json.dumps({"dataset": dataset, "methods": summaries}))


def test_verdict_rule():
    assert report.verdict(0.05, (0.02, 0.08), 0.001) == "holds"
    assert report.verdict(0.05, (0.02, 0.08), 0.2) == "inconclusive"  # not significant after adjustment
    assert report.verdict(0.0, (-0.01, 0.015), 1.0) == "does not hold"  # rules out a 2-point gain
    assert report.verdict(-0.05, (-0.08, -0.02), 0.001) == "does not hold"  # significant the other way
    assert report.verdict(0.01, (-0.02, 0.04), 0.5) == "inconclusive"


def test_part_a_pairs_problems_and_gives_each_claim_its_verdict(tmp_path):
    rng = random.Random(1)
    n = 2000
    base = [rng.random() < 0.3 for _ in range(n)]
    better = [c or rng.random() < 0.15 for c in base]  # right wherever round 0 was, and on ~10% more
    rounds = {0: base, 1: base, 2: better, 3: better, 4: better}
    for k, correct in rounds.items():
        _results(tmp_path / "eval" / "a" / f"round_{k}", {"greedy": correct})
    for k in range(1, 5):  # what round k's search solved: the first 10 * k problems of level 3
        levels = [1, 2, 3, 3] * 20
        solved = [level == 3 and i < 20 * k for i, level in enumerate(levels)]
        round_dir = tmp_path / f"round_{k}"
        save_dataset_folder(Dataset.from_dict({"solved": solved, "level": levels}), str(round_dir / "trees"), "")
        for stage, rows in (("sft", 7 * k), ("pairs", 100 + k)):
            (round_dir / stage).mkdir()
            (round_dir / stage / "DONE.json").write_text(json.dumps({"rows": rows}))
    text, records = report.part_a(str(tmp_path))
    assert "| 1 | 10/80 (12.5%) | 0/20 | 0/20 | 10/40 | 0/0 | 0/0 | 7 | 101 |" in text
    assert "| 4 | 40/80 (50.0%) | 0/20 | 0/20 | 40/40 | 0/0 | 0/0 | 28 | 104 |" in text
    assert (tmp_path / "accuracy_by_round.png").stat().st_size > 1000
    verdicts = {r["claim"]: r["verdict"] for r in records}
    assert verdicts == {"A1": "holds", "A2.1": "does not hold", "A2.2": "holds", "A2.3": "does not hold",
                        "A2.4": "does not hold"}  # fmt: skip
    a1 = next(r for r in records if r["claim"] == "A1")
    assert a1["only_b"] == 0 and a1["only_a"] == sum(better) - sum(base) and a1["p_holm"] >= a1["p_value"]
    assert "| A1 | round 4 | round 0 |" in text and "level 1" in text


def test_part_d_small_samples_are_inconclusive(tmp_path):
    rng = random.Random(2)
    for kind in ("mcts", "rejection", "random"):
        _results(tmp_path / "eval" / "d" / kind, {"greedy": [rng.random() < 0.5 for _ in range(40)]})
    _, records = report.part_d(str(tmp_path))
    assert [r["verdict"] for r in records] == ["inconclusive", "inconclusive"]


def test_part_g_compares_grpo_with_its_starting_policy(tmp_path):
    rng = random.Random(3)
    start = [rng.random() < 0.3 for _ in range(2000)]
    worse = [c and rng.random() < 0.8 for c in start]  # loses a fifth of what round 2 solved
    _results(tmp_path / "eval" / "a" / "round_2", {"greedy": start})
    _results(tmp_path / "eval" / "grpo_round_2", {"greedy": worse})
    text, (record,) = report.part_g(str(tmp_path))
    assert record["claim"] == "G1" and record["verdict"] == "does not hold" and record["only_a"] == 0
    assert record["p_holm"] == record["p_value"]  # one claim: nothing to adjust
    assert "| G1 | round 2 + GRPO | round 2 |" in text


def test_missing_results_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="round_0"):
        report.part_a(str(tmp_path))


def test_the_search_budget_is_the_largest_within_best_of_16_tokens_on_validation(tmp_path):
    budget = tmp_path / "eval" / "mcts_budget"
    names = ["best_of_n@16", *report.MCTS_CANDIDATES]
    tokens = {"best_of_n@16": 1000.0, "mcts@2x2x4:best": 400.0, "mcts@4x2x4:best": 900.0, "mcts@4x4x4:best": 1700.0}
    _results(budget, {name: [True, False] for name in names}, tokens, dataset="tiny-validation")
    assert report.choose_mcts(str(tmp_path)) == "mcts@4x2x4:best"
    tokens["mcts@2x2x4:best"] = 1200.0
    tokens["mcts@4x2x4:best"] = 1500.0
    _results(budget, {name: [True, False] for name in names}, tokens, dataset="tiny-validation")
    assert report.choose_mcts(str(tmp_path)) == "mcts@2x2x4:best"  # none fits: the smallest
    _results(budget, {name: [True, False] for name in names}, tokens, dataset="tiny-test")
    with pytest.raises(SystemExit, match="tiny-validation"):
        report.choose_mcts(str(tmp_path))
