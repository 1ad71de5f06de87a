"""The embedded tiny default: seeded word problems with verified template solutions, and the tiny policy build."""

import contextlib
import io
import json
import re

import pytest

from rstar_trl import STEP_MARKERS, Step, build_program, render_trajectory, split_steps
from rstar_trl.tiny import build_tiny_policy, generate_problems, tiny_splits, to_dataset

_STEP_COUNTS = {1: {1, 2}, 2: {3}, 3: {4}, 4: {5}, 5: {6}}


def _run(steps: list[Step]) -> str:
    """What the solution's program prints (the template code is ours, so plain exec is fine here)."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(build_program(steps), {})
    return out.getvalue()


@pytest.fixture(scope="module")
def splits() -> dict[str, list[dict]]:
    return tiny_splits(seed=0)


def test_generation_is_deterministic_for_a_seed():
    assert generate_problems(50, (1, 2, 3, 4, 5), seed=3) == generate_problems(50, (1, 2, 3, 4, 5), seed=3)
    assert generate_problems(50, (1, 2, 3, 4, 5), seed=3) != generate_problems(50, (1, 2, 3, 4, 5), seed=4)
    assert tiny_splits(seed=1) == tiny_splits(seed=1)


@pytest.mark.parametrize("level", [1, 2, 3, 4, 5])
def test_levels_have_their_step_counts(level):
    problems = generate_problems(200, level, seed=level)
    assert {p["level"] for p in problems} == {level}
    counts = {len(p["steps"]) for p in problems}
    assert counts <= _STEP_COUNTS[level]
    assert counts == _STEP_COUNTS[level]  # level 1 has both 1- and 2-step problems
    for p in problems:
        # One step per sentence: the problem is the sentences plus the question.
        assert len(re.findall(r"[.?]( |$)", p["problem"])) == len(p["steps"]) + 1
        assert all(not s.is_final for s in p["steps"][:-1]) and p["steps"][-1].is_final


def test_level_4_has_a_distractor_and_level_5_relations():
    for p in generate_problems(100, 4, seed=0):
        # The distractor assigns a variable that the printed one never uses.
        printed = re.search(r"print\((\w+)\)", p["steps"][-1].code).group(1)
        assigned = {s.code.split()[0] for s in p["steps"]}
        assert len(assigned - {printed}) == 1
    relational = ("times as many", "half", "more", "fewer", "as many")
    for p in generate_problems(100, 5, seed=0):
        assert any(phrase in p["steps"][1].comment for phrase in relational)
        assert sum("as many" in s.comment or "half" in s.comment for s in p["steps"][2:5]) >= 1


def test_levels_cycle_through_a_tuple():
    problems = generate_problems(100, (1, 3, 3), seed=0)
    assert [sum(p["level"] == lv for p in problems) for lv in (1, 3)] == [34, 66]
    with pytest.raises(ValueError):
        generate_problems(5, (0, 1), seed=0)


def test_every_solution_prints_its_gold_answer(splits):
    problems = [p for split in splits.values() for p in split] + generate_problems(500, (1, 2, 3, 4, 5), seed=7)
    for p in problems:
        assert p["answer"].isdigit() and 0 <= int(p["answer"]) < 10000
        assert _run(p["steps"]) == p["answer"] + "\n", p["problem"]
        final = p["steps"][-1]
        assert final.code.endswith("print(" + final.code.split()[0] + ")")
        assert final.output == p["answer"]
        assert final.answer == f"The answer is \\boxed{{{p['answer']}}}."
        # Each intermediate step is a restating comment and one line of code.
        assert all(s.comment and "\n" not in s.code for s in p["steps"][:-1])


def test_solutions_render_and_split_back():
    for p in generate_problems(50, (1, 2, 3, 4, 5), seed=1):
        rendered = render_trajectory(p["problem"], p["steps"])
        assert rendered["prompt"].endswith("<code>\n") and p["problem"] in rendered["prompt"]
        assert split_steps(rendered["completion"]) == p["steps"]


def test_splits(splits):
    assert {name: len(problems) for name, problems in splits.items()} == {
        "bootstrap": 2000,
        "train": 2000,
        "test": 500,
    }
    assert {p["level"] for p in splits["bootstrap"]} == {1, 2}
    assert {p["level"] for p in splits["train"]} == {p["level"] for p in splits["test"]} == {1, 2, 3, 4, 5}
    seen = {p["problem"] for p in splits["bootstrap"] + splits["train"]}
    assert not seen & {p["problem"] for p in splits["test"]}
    assert len({p["problem"] for p in splits["test"]}) == 500


def test_to_dataset(splits):
    ds = to_dataset(splits["test"])
    assert ds.column_names == ["problem", "answer", "level"] and len(ds) == 500
    assert ds[0] == {key: splits["test"][0][key] for key in ("problem", "answer", "level")}


@pytest.mark.slow
def test_build_tiny_policy(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    sizes = {"hidden_size": 32, "num_layers": 1, "num_heads": 2, "intermediate_size": 64}
    out = build_tiny_policy(tmp_path / "policy", bootstrap_steps=20, progress=False, **sizes)
    tokenizer = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out)

    for marker in STEP_MARKERS:
        ids = tokenizer.encode(marker, add_special_tokens=False)
        assert len(ids) == 1, marker
        assert tokenizer.decode(ids, skip_special_tokens=False) == marker
    problem = generate_problems(1, 5, seed=0)[0]
    text = "".join(render_trajectory(problem["problem"], problem["steps"]).values()) + tokenizer.eos_token
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert tokenizer.decode(ids, skip_special_tokens=False) == text
    assert all(tokenizer.decode([i]) != "" for i in tokenizer.encode("0123456789", add_special_tokens=False))
    assert len(tokenizer.encode("0123456789", add_special_tokens=False)) == 10  # one token per digit

    assert model.config.eos_token_id == tokenizer.eos_token_id
    assert model.config.pad_token_id == tokenizer.pad_token_id
    assert model.config.bos_token_id == tokenizer.bos_token_id
    assert model.config.vocab_size == len(tokenizer) and model.config.tie_word_embeddings

    info = json.loads((tmp_path / "policy" / "tiny_policy.json").read_text())
    assert info["bootstrap_steps"] == 20 and info["hidden_size"] == 32
    assert info["loss_end"] < info["loss_start"]
    assert info["build_seconds"] < 120

    # The reloaded pair generates: a prompt in, new tokens out, stopping on the configured eos ids.
    inputs = tokenizer(render_trajectory(problem["problem"], [])["prompt"], return_tensors="pt")
    generated = model.generate(**inputs, max_new_tokens=5, do_sample=False)
    assert generated.shape[1] > inputs["input_ids"].shape[1]
