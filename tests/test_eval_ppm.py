"""The PPM quality report (rstar_trl/ppm/quality.py, recipes/eval_ppm.py): the tiny ProcessBench-layout rows, the
ProcessBench protocol on hand-made step values, pair accuracy and prefix scoring with a recording scorer, the recipe
end to end on a briefly trained PPM (checked against an independent recomputation from the checkpoint), the model
card section, and clear errors on bad input."""

import importlib.util
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from datasets import Dataset
from tiny_ppm import train_tiny_ppm

from rstar_trl import format_prompt, render_step
from rstar_trl.format import build_program, split_steps
from rstar_trl.hub import save_dataset_folder
from rstar_trl.ppm import PPMScorer, ppm_text
from rstar_trl.ppm.quality import (
    first_error_prediction,
    load_examples,
    make_tiny_processbench,
    oracle_threshold,
    pair_accuracy,
    processbench_metrics,
    processbench_report,
    score_processbench,
    threshold_sweep,
    update_card_section,
    validate_processbench,
)
from rstar_trl.stats import wilson_interval
from rstar_trl.tiny import generate_problems

REPO = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("eval_ppm_recipe", REPO / "recipes" / "eval_ppm.py")
recipe = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(recipe)


# -- the tiny ProcessBench-layout rows ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_problems() -> list[dict]:
    return generate_problems(40, seed=11)


def _printed(steps: list[str]) -> str:
    """What the program of rendered steps prints, parsed back from the text (independent of the injection code)."""
    printed = []
    exec(build_program(split_steps("".join(steps))), {"__builtins__": {}, "print": lambda x: printed.append(str(x))})
    return printed[-1]


def test_tiny_processbench_rows_carry_their_first_error(tiny_problems):
    rows = make_tiny_processbench(40, problems=tiny_problems, error_fraction=0.5, seed=3)
    assert rows == make_tiny_processbench(40, problems=tiny_problems, error_fraction=0.5, seed=3)  # deterministic
    assert rows != make_tiny_processbench(40, problems=tiny_problems, error_fraction=0.5, seed=4)
    validate_processbench(Dataset.from_list(rows))
    erroneous = [r for r in rows if r["label"] != -1]
    assert len(erroneous) == 20 and {r["error_kind"] for r in erroneous} == {"number", "operation"}
    assert len({r["label"] for r in erroneous}) >= 3  # errors land on different steps, not always the first/last
    for row, problem in zip(rows, tiny_problems):
        template = [render_step(step) for step in problem["steps"]]
        assert row["problem"] == problem["problem"] and len(row["steps"]) == len(template)
        final = row["steps"][-1]
        answer = final[final.index("\\boxed{") + 7 : final.index("}.<end_of_answer>")]
        output = final[final.index("<output>") + 8 : final.index("<end_of_output>")]
        assert answer == output == _printed(row["steps"])  # the output block and answer are the program's
        if row["label"] == -1:
            assert row["steps"] == template and row["final_answer_correct"] and answer == problem["answer"]
            continue
        k = row["label"]
        assert row["steps"][:k] == template[:k]  # everything before the first error is right
        assert row["steps"][k] != template[k]
        assert not row["final_answer_correct"] and answer != problem["answer"]  # the error carries through
        for later, right in zip(row["steps"][k + 1 : -1], template[k + 1 : -1]):
            assert later == right  # later steps as the template wrote them (building on the wrong value)
        if row["error_kind"] == "operation":  # a computation error: the comment still states the problem
            assert row["steps"][k].split("\n")[0] == template[k].split("\n")[0]
        else:  # a misread number: the comment states it wrongly
            assert row["steps"][k].split("\n")[0] != template[k].split("\n")[0]


def test_tiny_processbench_from_the_validation_split_and_bad_settings():
    rows = make_tiny_processbench(6, split="validation", seed=0)
    assert [r["id"] for r in rows] == [f"tiny-validation-{i}" for i in range(6)]
    assert sum(r["label"] != -1 for r in rows) == 3
    with pytest.raises(ValueError, match="unknown tiny split 'dev'"):
        make_tiny_processbench(6, split="dev")
    with pytest.raises(ValueError, match="error_fraction"):
        make_tiny_processbench(6, problems=generate_problems(6), error_fraction=1.5)


def test_the_module_entry_writes_a_processbench_file(tmp_path):
    out = tmp_path / "pb.jsonl"
    command = [sys.executable, "-m", "rstar_trl.ppm", "tiny-processbench", "--output", str(out), "--num", "8",
               "--split", "test", "--seed", "2"]  # fmt: skip
    run = subprocess.run(
        command, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"}
    )
    assert run.returncode == 0, run.stderr[-2000:]
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert rows == make_tiny_processbench(8, split="test", seed=2)
    assert "Wrote 8 rows (4 with an injected error, 4 correct)" in run.stdout and "Warning" not in run.stderr


# -- the protocol on hand-made values -----------------------------------------------------------------------------

# (step values, label): the first-error prediction at threshold 0 is given in the comment.
HAND = [
    ([0.5, 0.2, -0.1, 0.3], 2),  # 2: exact
    ([-0.4, 0.6], 0),  # 0: exact
    ([0.9, 0.8, 0.7, -0.2], 1),  # 3: late
    ([0.1, -0.3, -0.5], 2),  # 1: early
    ([0.4, 0.4, 0.4], 1),  # -1: missed
    ([0.3, 0.0, 0.2], -1),  # -1: right (a value equal to the threshold is not below it)
    ([0.3, 0.2], -1),  # -1: right
    ([0.3, -0.01], -1),  # 1: a false alarm
]


def test_first_error_prediction_is_the_first_step_below_the_threshold():
    assert [first_error_prediction(v, 0.0) for v, _ in HAND] == [2, 0, 3, 1, -1, -1, -1, 1]
    assert first_error_prediction([0.2, -0.5, -0.9], -0.6) == 2
    assert first_error_prediction([0.2, 0.1], 0.15) == 1
    assert first_error_prediction([0.0], 0.0) == -1


def test_processbench_scores_on_hand_made_values():
    labels = [label for _, label in HAND]
    metrics = processbench_metrics(labels, [first_error_prediction(v, 0.0) for v, _ in HAND])
    counts = ("num_erroneous", "error_correct", "num_correct", "correct_correct")
    assert [metrics[k] for k in counts] == [5, 2, 3, 2]
    assert metrics["error_acc"] == pytest.approx(0.4) and metrics["correct_acc"] == pytest.approx(2 / 3)
    assert metrics["f1"] == pytest.approx(0.5)  # 2 * 0.4 * (2/3) / (0.4 + 2/3)
    assert (metrics["early"], metrics["late"], metrics["missed"]) == (1, 1, 1)
    assert metrics["error_ci95"] == pytest.approx(list(wilson_interval(2, 5)))
    # At -0.45 only the 4th row's error is found (at step 2, exactly), and no correct row is flagged.
    low = processbench_metrics(labels, [first_error_prediction(v, -0.45) for v, _ in HAND])
    assert low["error_acc"] == pytest.approx(0.2) and low["correct_acc"] == 1.0
    assert low["f1"] == pytest.approx(1 / 3)
    # F1 is 0 when one side is 0, undefined without rows of one kind.
    assert processbench_metrics([1, -1], [0, -1])["f1"] == 0.0
    only_errors = processbench_metrics([1, 0], [1, 0])
    assert only_errors["error_acc"] == 1.0 and only_errors["correct_acc"] is None and only_errors["f1"] is None


def test_threshold_sweep_and_oracle():
    labels, values = [label for _, label in HAND], [v for v, _ in HAND]
    sweep = threshold_sweep(labels, values, [-0.45, 0.0, 0.35])
    assert [round(e["f1"], 6) for e in sweep] == [round(1 / 3, 6), 0.5, 0.0]
    assert sweep[2]["correct_acc"] == 0.0  # every correct row has a step below 0.35
    oracle = oracle_threshold(sweep)
    assert oracle["threshold"] == 0.0 and oracle["f1"] == pytest.approx(0.5) and "oracle" in oracle["note"]
    tied = [{"threshold": 0.1, "f1": 0.5}, {"threshold": -0.2, "f1": 0.5}, {"threshold": 0.3, "f1": None}]
    assert oracle_threshold(tied)["threshold"] == -0.2  # equal F1: the lowest threshold
    assert oracle_threshold([{"threshold": 0.0, "f1": None}]) is None
    report = processbench_report(labels, values, threshold=0.0, thresholds=[-0.45, 0.0, 0.35])
    assert report["predictions"] == [2, 0, 3, 1, -1, -1, -1, 1]
    assert report["at_threshold"]["f1"] == pytest.approx(0.5) and report["oracle"]["threshold"] == 0.0


# -- scoring with a recording scorer ------------------------------------------------------------------------------


class RecordingScorer(PPMScorer):
    """Values a text by a number written at its end ("... v=0.25"), and records every call's texts."""

    def __init__(self, prompt_template: str):
        super().__init__(prompt_template)
        self.calls: list[list[str]] = []

    def score(self, questions, partial_solutions):
        texts = self.texts(questions, partial_solutions)
        self.calls.append(texts)
        return [float(text.rsplit("v=", 1)[1].split()[0]) if "v=" in text else 0.0 for text in texts]


def test_pair_accuracy_scores_what_training_saw_and_counts_ties():
    pairs = Dataset.from_dict({
        "prompt": ["P1 ", "P2 ", "P3 ", "P4 ", "P5 ", "P6 "],
        "chosen": ["v=0.5", "v=0.1", "v=0.2", "v=0.3", "same v=0.1", "v=0.9"],
        "rejected": ["v=0.2", "v=0.4", "tie v=0.2", "v=-0.3", "same v=0.1", "v=0.0"],
        "kind": ["step", "step", "final", "final", "step", "step"],
    })  # fmt: skip
    scorer = RecordingScorer(prompt_template="<q>{question}</q>")
    # Pair 6 was a training pair (listed the other way round): excluded.
    exclude = Dataset.from_dict({"prompt": ["P6 "], "chosen": ["v=0.0"], "rejected": ["v=0.9"]})
    result = pair_accuracy(scorer, pairs, ties="half", exclude=exclude, rows_per_call=2, progress=False)
    assert scorer.prompt_template == "<q>{question}</q>"  # restored after the call
    # Each side is read as ppm_text(prompt, step), both sides of 2 pairs per call; pair 5 (identical) dropped.
    assert scorer.calls == [
        [ppm_text("P1 ", "v=0.5"), ppm_text("P2 ", "v=0.1"), ppm_text("P1 ", "v=0.2"), ppm_text("P2 ", "v=0.4")],
        [ppm_text("P3 ", "v=0.2"), ppm_text("P4 ", "v=0.3"), ppm_text("P3 ", "tie v=0.2"), ppm_text("P4 ", "v=-0.3")],
    ]
    assert (result["num_pairs"], result["num_prompts"], result["excluded"], result["dropped_identical"]) == (
        4,
        4,
        1,
        1,
    )
    assert (result["wins"], result["tied"], result["losses"]) == (2, 1, 1)
    assert result["accuracy"] == pytest.approx(2.5 / 4) and result["accuracy_if_ties_wrong"] == pytest.approx(0.5)
    assert result["ci95"] == pytest.approx(list(wilson_interval(2.5, 4)))
    assert result["compared"] == "value"  # the recording scorer has no raw scores
    assert result["by_kind"]["final"]["n"] == 2 and result["by_kind"]["final"]["accuracy"] == pytest.approx(0.75)
    assert result["scores"] == [[0.5, 0.2], [0.1, 0.4], [0.2, 0.2], [0.3, -0.3]]
    wrong = pair_accuracy(scorer, pairs, ties="wrong", progress=False)
    assert wrong["accuracy"] == pytest.approx(3 / 5) and wrong["num_pairs"] == 5


def test_pair_accuracy_can_exclude_every_pair_on_a_training_question():
    pairs = Dataset.from_dict({
        "prompt": [format_prompt("Q1") + "# a\n<end_of_step>\n", format_prompt("Q2"), format_prompt("Q1"),
                   format_prompt("Q12")],
        "chosen": ["v=0.5", "v=0.1", "v=0.3", "v=0.2"],
        "rejected": ["v=0.2", "v=0.4", "v=0.1", "v=0.1"],
    })  # fmt: skip
    exclude = Dataset.from_dict({"prompt": [format_prompt("Q1") + "# b\n<end_of_step>\n"], "chosen": ["x"],
                                 "rejected": ["y"]})  # fmt: skip
    scorer = RecordingScorer(prompt_template="{question}")
    by_pair = pair_accuracy(scorer, pairs, exclude=exclude, progress=False)
    assert by_pair["excluded"] == 0 and by_pair["num_pairs"] == 4
    by_question = pair_accuracy(scorer, pairs, exclude=exclude, exclude_by="question", progress=False)
    assert (by_question["excluded"], by_question["num_pairs"], by_question["excluded_by"]) == (2, 2, "question")
    assert by_question["scores"] == [[0.1, 0.4], [0.2, 0.1]]  # Q2 and Q12 are other questions than Q1
    foreign = Dataset.from_dict({"prompt": ["Question: Q1\n"], "chosen": ["a"], "rejected": ["b"]})
    with pytest.raises(ValueError, match="row 0: the prompt was not built with the prompt template"):
        pair_accuracy(scorer, foreign, exclude=exclude, exclude_by="question", progress=False)


def test_score_processbench_joins_steps_and_batches_rows():
    rows = Dataset.from_dict({
        "problem": ["Q1", "Q2", "Q3"],
        "steps": [["# a v=0.1\nx = 1\n<end_of_step>\n", "print(x) v=0.2\n<end_of_code>\n"],
                  ["# b v=-0.5\ny = 2\n<end_of_step>\n"],
                  ["# c\n<end_of_step>\n", "# d v=0.3\n<end_of_step>\n", "e v=0.7\n<end_of_code>\n"]],
        "label": [-1, 0, 1],
    })  # fmt: skip
    scorer = RecordingScorer(prompt_template="ignored {question}")
    values, separator = score_processbench(scorer, rows, prompt_template="policy", rows_per_call=2, progress=False)
    assert separator == ""  # our format: concatenated as written
    assert len(scorer.calls) == 2 and [len(c) for c in scorer.calls] == [3, 3]  # all prefixes of 2 rows per call
    texts = [text for call in scorer.calls for text in call]
    steps = rows["steps"]
    expected = [format_prompt(q) + "".join(s[: k + 1]) for q, s in zip(rows["problem"], steps) for k in range(len(s))]
    assert texts == expected
    assert values == [[0.1, 0.2], [-0.5], [0.0, 0.3, 0.7]]
    plain = Dataset.from_dict({"problem": ["Q"], "steps": [["First v=0.1", "Second v=0.2"]], "label": [-1]})
    scorer.calls.clear()
    values, separator = score_processbench(scorer, plain, prompt_template="Solve: {question}\n", progress=False)
    assert separator == "\n\n" and scorer.calls == [["Solve: Q\nFirst v=0.1", "Solve: Q\nFirst v=0.1\n\nSecond v=0.2"]]
    scorer.calls.clear()
    score_processbench(scorer, plain, prompt_template="{question}", step_separator=" | ", progress=False)
    assert scorer.calls == [["QFirst v=0.1", "QFirst v=0.1 | Second v=0.2"]]


def test_update_card_section_replaces_its_own_section_and_keeps_the_rest(tmp_path):
    card = tmp_path / "README.md"
    assert not update_card_section(str(card), "pairs a", "Title", "body")  # no card: nothing written
    card.write_text("# card\n\nintro\n")
    update_card_section(str(card), "pairs a", "Quality on a", "first")
    update_card_section(str(card), "pairs b", "Quality on b", "other")
    card.write_text(card.read_text() + "\n## Notes\n\nkept\n")
    update_card_section(str(card), "pairs a", "Quality on a", "second")
    text = card.read_text()
    assert text.startswith("# card\n\nintro\n") and text.endswith("## Notes\n\nkept\n")
    assert text.count("## Quality on a") == 1 and "second" in text and "first" not in text
    assert "## Quality on b\n\nother\n" in text


# -- the recipe end to end ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained_ppm(tiny_policy, tmp_path_factory) -> str:
    """A PPM as `PPMTrainer` saves it (value transform tanh(r / 5) in its config), trained a few steps on pairs of a
    right vs a wrong final step of tiny problems (other problems than those evaluated), with a model card."""
    problems = generate_problems(32, level=(1, 2), seed=101)
    prompts = [format_prompt(p["problem"]) + "".join(render_step(s) for s in p["steps"][:-1]) for p in problems]
    pairs = Dataset.from_dict({
        "prompt": prompts,
        "chosen": [render_step(p["steps"][-1]) for p in problems],
        "rejected": [render_step(p["steps"][-1]).replace(f"{{{p['answer']}}}", f"{{{int(p['answer']) + 7}}}")
                     for p in problems],
    })  # fmt: skip
    path = train_tiny_ppm(tiny_policy, pairs, str(tmp_path_factory.mktemp("trained_ppm")), max_steps=4)
    Path(path, "README.md").write_text("# PPM card\n\nTraining details.\n")
    return path


@pytest.fixture(scope="module")
def eval_data(tmp_path_factory) -> dict[str, str]:
    """Held-out pairs as a round saves them (a dataset folder, with a `kind` column and one identical pair), and a
    ProcessBench-layout JSONL file of tiny problems with injected errors."""
    root = tmp_path_factory.mktemp("eval_data")
    problems = generate_problems(12, seed=202)
    rows = make_tiny_processbench(12, problems=problems, seed=1)
    pb = root / "pb.jsonl"
    pb.write_text("".join(json.dumps(row) + "\n" for row in rows))
    prompts, chosen, rejected, kinds = [], [], [], []
    for problem, row in zip(problems, rows):
        k = row["label"] if row["label"] != -1 else len(row["steps"]) - 1
        right = render_step(problem["steps"][k])
        prompts.append(format_prompt(problem["problem"]) + "".join(row["steps"][:k]))
        chosen.append(right)
        rejected.append(row["steps"][k] if row["label"] != -1 else right.replace("The answer", "Answer"))
        kinds.append("final" if k == len(row["steps"]) - 1 else "step")
    prompts.append(prompts[0])
    chosen.append(chosen[0])
    rejected.append(chosen[0])  # identical sides: dropped, as in training
    kinds.append("step")
    pairs = root / "pairs"
    save_dataset_folder(Dataset.from_dict({"prompt": prompts, "chosen": chosen, "rejected": rejected,
                                           "kind": kinds}), str(pairs), "# pairs\n")  # fmt: skip
    return {"pairs": str(pairs), "pb": str(pb)}


def _flat(rows) -> list[float]:
    return [x for row in rows for x in row]


def _reference_scores(ppm: str, texts: list[str]) -> list[float]:
    """Raw scores r computed one text at a time, straight from the checkpoint (no scorer, no padding)."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(ppm)
    model = AutoModelForSequenceClassification.from_pretrained(ppm).eval()
    with torch.no_grad():
        return [float(model(**tokenizer(text, return_tensors="pt")).logits[0, 0]) for text in texts]


@pytest.mark.slow
def test_the_recipe_end_to_end_matches_an_independent_recomputation(trained_ppm, eval_data, tmp_path):
    ppm = str(tmp_path / "ppm")
    shutil.copytree(trained_ppm, ppm)
    out = tmp_path / "report"
    command = [sys.executable, str(REPO / "recipes" / "eval_ppm.py"), "--ppm_path", ppm, "--pairs",
               eval_data["pairs"], "--processbench", eval_data["pb"], "--output_dir", str(out), "--rows_per_call", "5",
               "--device", "cpu", "--threshold_grid", "-0.5", "0.0", "0.5", "--update_cards"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    run = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600, cwd=REPO)
    assert run.returncode == 0, run.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert results["value_transform"] == {"scale": 5.0, "train_through_tanh": False}

    # Pairs: every score is the checkpoint's raw score of ppm_text(prompt, step); the counts follow from them.
    pairs = load_examples(eval_data["pairs"])
    section = results["pairs"]
    assert (section["num_pairs"], section["dropped_identical"], section["compared"]) == (12, 1, "raw score")
    assert section["num_prompts"] == 12
    texts = [ppm_text(p, s) for p, c, r in zip(pairs["prompt"], pairs["chosen"], pairs["rejected"]) if c != r
             for s in (c, r)]  # fmt: skip
    reference = _reference_scores(ppm, texts)
    expected = [[reference[2 * i], reference[2 * i + 1]] for i in range(12)]
    assert _flat(section["scores"]) == pytest.approx(_flat(expected), abs=1e-4)
    wins = sum(c > r for c, r in expected)
    ties = sum(c == r for c, r in expected)
    assert (section["wins"], section["tied"]) == (wins, ties)
    assert section["accuracy"] == pytest.approx((wins + ties / 2) / 12)
    assert section["ci95"] == pytest.approx(list(wilson_interval(wins + ties / 2, 12)))
    assert sum(section["by_kind"][k]["n"] for k in section["by_kind"]) == 12

    # ProcessBench layout: values tanh(r / 5) of every prefix, predictions and scores recomputed here.
    rows = [json.loads(line) for line in Path(eval_data["pb"]).read_text().splitlines()]
    pb = results["processbench"]
    assert pb["num_rows"] == 12 and pb["step_separator"] == "" and pb["threshold"] == 0.0
    prefixes = [
        format_prompt(r["problem"]) + "".join(r["steps"][: k + 1]) for r in rows for k in range(len(r["steps"]))
    ]
    reference = iter(math.tanh(r / 5) for r in _reference_scores(ppm, prefixes))
    values = [[next(reference) for _ in r["steps"]] for r in rows]
    assert [len(row["values"]) for row in pb["rows"]] == [len(r["steps"]) for r in rows]
    assert _flat(row["values"] for row in pb["rows"]) == pytest.approx(_flat(values), abs=1e-4)
    predictions = [next((i for i, v in enumerate(vs) if v < 0), -1) for vs in values]
    assert [row["prediction"] for row in pb["rows"]] == predictions
    labels = [r["label"] for r in rows]
    found = sum(p == y for p, y in zip(predictions, labels) if y != -1)
    clean = sum(p == -1 for p, y in zip(predictions, labels) if y == -1)
    at = pb["at_threshold"]
    assert (at["error_correct"], at["num_erroneous"], at["correct_correct"], at["num_correct"]) == (found, 6, clean, 6)
    error_acc, correct_acc = found / 6, clean / 6
    f1 = 0.0 if error_acc + correct_acc == 0 else 2 * error_acc * correct_acc / (error_acc + correct_acc)
    assert at["f1"] == pytest.approx(f1)
    assert [e["threshold"] for e in pb["sweep"]] == [-0.5, 0.0, 0.5]
    assert pb["oracle"]["f1"] == max(e["f1"] for e in pb["sweep"])

    # The report: tables in results.md and on stdout, and one section per dataset in the card.
    table = (out / "results.md").read_text()
    assert "| all | 12 |" in table and "| 0.00 (default) |" in table and "optimistic oracle" in table
    assert "| all | 12 |" in run.stdout and "Updated the model card" in run.stdout
    card = Path(ppm, "README.md").read_text()
    assert card.startswith("# PPM card\n\nTraining details.\n")
    assert card.count("<!-- rstar_trl:ppm_quality pairs") == 1 and card.count("## PPM quality: pairs") == 1
    assert card.count("<!-- rstar_trl:ppm_quality processbench") == 1
    assert "| 0.00 (default) |" in card

    # A second run (in-process) on the same data, with the threshold of the first run's oracle: the card's two
    # sections are replaced in place, the rest of the card (a section added after them too) is kept.
    Path(ppm, "README.md").write_text(card + "\n## Notes\n\nkept\n")
    args = recipe.EvalPPMConfig(ppm_path=ppm, pairs=eval_data["pairs"], processbench=eval_data["pb"],
                                threshold_from=str(out / "results.json"), output_dir=str(tmp_path / "second"),
                                device="cpu", update_cards=True)  # fmt: skip
    second = recipe.main(args)
    assert _flat(second["pairs"]["scores"]) == pytest.approx(_flat(section["scores"]), abs=1e-5)
    assert second["processbench"]["threshold"] == pb["oracle"]["threshold"]
    assert second["processbench"]["threshold_source"] == f"oracle of {pb['dataset']}"
    card = Path(ppm, "README.md").read_text()
    assert card.startswith("# PPM card\n\nTraining details.\n") and card.endswith("## Notes\n\nkept\n")
    assert card.count("<!-- rstar_trl:ppm_quality pairs") == 1 and card.count("## PPM quality: pairs") == 1
    assert card.count("<!-- rstar_trl:ppm_quality processbench") == 1
    assert card.count("## PPM quality: first errors") == 1 and "| 0.00 (default) |" not in card
    assert f"| {pb['oracle']['threshold']:.2f} (oracle of" in card


def test_load_examples_reads_round_folders_files_and_slices(tmp_path):
    data = Dataset.from_dict({"prompt": [f"p{i}" for i in range(10)], "chosen": ["a"] * 10, "rejected": ["b"] * 10})
    folder = save_dataset_folder(data, str(tmp_path / "pairs"), "# card\n")
    assert load_examples(folder)["prompt"] == data["prompt"]
    assert load_examples(folder, split="train[2:5]")["prompt"] == ["p2", "p3", "p4"]
    assert load_examples(folder, split="train[50%:]", limit=2)["prompt"] == ["p5", "p6"]
    data.save_to_disk(str(tmp_path / "saved"))
    assert len(load_examples(str(tmp_path / "saved"), limit=4)) == 4
    path = _write_jsonl(tmp_path / "pairs.jsonl", data.to_list())
    assert load_examples(path, split="train[-1:]")["prompt"] == ["p9"]
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_examples(str(tmp_path / "missing.jsonl"))


# -- bad input ----------------------------------------------------------------------------------------------------


@pytest.fixture
def fake_ppm(tmp_path) -> str:
    """A folder that passes the checkpoint check: bad data must be refused before any model is loaded."""
    path = tmp_path / "ppm"
    path.mkdir()
    (path / "config.json").write_text("{}")
    return str(path)


def _write_jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


GOOD_ROW = {"id": "a", "problem": "What is 2 + 3?", "steps": ["Add them.", "The answer is 5."], "label": -1}


@pytest.mark.parametrize(
    "change, message",
    [
        ({"label": 2}, r"row 1 \(id 'b'\): 'label' 2 is out of range: -1 .* 0\.\.1 for its 2 steps"),
        ({"label": -2}, r"row 1 \(id 'b'\): 'label' -2 is out of range"),
        ({"steps": []}, r"row 1 \(id 'b'\): 'steps' must be a non-empty list"),
        ({"steps": ["Add them.", "  "]}, r"row 1 \(id 'b'\): step 1 of 'steps' is empty"),
        ({"problem": ""}, r"row 1 \(id 'b'\): empty or missing 'problem'"),
    ],
)
def test_bad_processbench_rows_are_named(fake_ppm, tmp_path, change, message):
    source = _write_jsonl(tmp_path / "pb.jsonl", [GOOD_ROW, {**GOOD_ROW, "id": "b", **change}])
    args = recipe.EvalPPMConfig(ppm_path=fake_ppm, processbench=source, output_dir=str(tmp_path / "out"))
    with pytest.raises(SystemExit, match=message):
        recipe.main(args)
    assert not (tmp_path / "out").exists()


def test_missing_columns_and_paths_are_clear_errors(fake_ppm, tmp_path):
    def fails(message, **settings):
        with pytest.raises(SystemExit, match=message):
            recipe.main(recipe.EvalPPMConfig(**{"ppm_path": fake_ppm, "output_dir": str(tmp_path / "out"),
                                                **settings}))  # fmt: skip

    no_label = _write_jsonl(tmp_path / "no_label.jsonl", [{k: v for k, v in GOOD_ROW.items() if k != "label"}])
    fails(r"ProcessBench-layout rows need the columns \['problem', 'steps', 'label'\]; missing \['label'\]",
          processbench=no_label)  # fmt: skip
    pairs = _write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": "Q ", "chosen": "a"}])
    fails(r"--pairs .*pairs.jsonl.*missing \['rejected'\]", pairs=pairs)
    empty_step = _write_jsonl(tmp_path / "empty.jsonl", [{"prompt": "Q ", "chosen": "a", "rejected": " "}])
    fails(r"row 0: the 'rejected' step is empty", pairs=empty_step)
    fails(r"--pairs '/nonexistent/pairs' does not exist", pairs="/nonexistent/pairs")
    fails(r"--pairs .*bad split 'test'", pairs=pairs, pairs_split="test")
    fails(r"nothing to evaluate")
    fails(r"--threshold must be in \[-1, 1\]", processbench=no_label, threshold=2.0)
    fails(r"--threshold_from .* does not exist", processbench=no_label, threshold_from=str(tmp_path / "none.json"))
    fails(r"--ppm_path '/nonexistent/ppm' does not exist", ppm_path="/nonexistent/ppm", pairs=pairs)
    with pytest.raises(SystemExit, match="--ppm_path is required"):
        recipe.main(recipe.EvalPPMConfig(pairs=pairs))
    assert not (tmp_path / "out").exists()


def test_the_recipe_help_documents_every_setting():
    from trl import TrlParser

    fields = recipe.EvalPPMConfig.__dataclass_fields__
    assert all(f.metadata.get("help") for f in fields.values())
    text = TrlParser((recipe.EvalPPMConfig,)).format_help()  # argparse %-formats the help strings
    assert all(f"--{name}" in text for name in fields)
