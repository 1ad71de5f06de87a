"""The embedded tiny default: seeded word problems with verified template solutions, and the tiny policy build."""

import contextlib
import io
import json
import os
import re
from pathlib import Path

import pytest

from rstar_trl import STEP_MARKERS, Step, build_program, render_trajectory, split_steps
from rstar_trl.tiny import (
    SHIPPED_POLICY,
    build_tiny_policy,
    generate_problems,
    provide_tiny_policy,
    tiny_splits,
    to_dataset,
)
from rstar_trl.tiny.problems import BOOTSTRAP_LEVELS

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
        "validation": 1000,
        "test": 2000,
    }
    assert {p["level"] for p in splits["bootstrap"]} == set(BOOTSTRAP_LEVELS)
    for name in ("train", "validation", "test"):
        assert {p["level"] for p in splits[name]} == {1, 2, 3, 4, 5}, name
    texts = {name: {p["problem"] for p in problems} for name, problems in splits.items()}
    for name, problems in splits.items():
        assert len(texts[name]) == len(problems), f"{name} repeats a problem"
    names = sorted(texts)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            assert not texts[a] & texts[b], f"{a} and {b} share problems"


def test_each_split_has_its_own_stream(splits):
    """Resizing one split leaves the splits drawn before it as they were (validation comes last)."""
    resized = tiny_splits(seed=0, num_validation=10, num_train=50)
    assert resized["bootstrap"] == splits["bootstrap"]
    assert len(resized["validation"]) == 10 and len(resized["train"]) == 50
    assert tiny_splits(seed=0, num_validation=10)["test"] == splits["test"]
    assert tiny_splits(seed=1)["test"] != splits["test"]


def test_to_dataset(splits):
    ds = to_dataset(splits["test"])
    assert ds.column_names == ["problem", "answer", "level"] and len(ds) == 2000
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

    # The reloaded pair generates: a prompt in, new tokens out, stopping on the configured eos ids.
    inputs = tokenizer(render_trajectory(problem["problem"], [])["prompt"], return_tensors="pt")
    generated = model.generate(**inputs, max_new_tokens=5, do_sample=False)
    assert generated.shape[1] > inputs["input_ids"].shape[1]


# -- the shipped policy ------------------------------------------------------------------------------------------


def test_the_shipped_policy_is_the_default_build():
    """The shipped checkpoint is what `python -m rstar_trl.tiny` builds with the defaults the recipes ask for."""
    import inspect

    from rstar_trl.rounds import RoundArguments
    from rstar_trl.tiny.policy import _sha256, shipped_policy_info

    info = shipped_policy_info()
    assert info is not None, f"no shipped policy in {SHIPPED_POLICY}"
    defaults = {name: p.default for name, p in inspect.signature(build_tiny_policy).parameters.items()}
    for name in ("seed", "bootstrap_steps", "hidden_size", "num_layers", "num_heads", "intermediate_size",
                 "batch_size", "lr", "num_bootstrap"):  # fmt: skip
        assert info[{"num_bootstrap": "bootstrap_problems"}.get(name, name)] == defaults[name], name
    assert tuple(info["bootstrap_levels"]) == defaults["bootstrap_levels"] == BOOTSTRAP_LEVELS
    assert RoundArguments().tiny_bootstrap_steps == info["bootstrap_steps"]
    assert _sha256(os.path.join(SHIPPED_POLICY, "model.safetensors")) == info["weights_sha256"]


def test_provide_copies_the_shipped_policy_and_it_solves_level_1_problems(tmp_path):
    from rstar_trl.grading import grade_answer
    from rstar_trl.solve import Solver, SolverConfig

    assert provide_tiny_policy(tmp_path / "p") == "copied"
    for name in os.listdir(SHIPPED_POLICY):
        if not name.startswith((".", "__")):
            assert (tmp_path / "p" / name).read_bytes() == (Path(SHIPPED_POLICY) / name).read_bytes(), name
    problems = [p for p in tiny_splits()["validation"] if p["level"] == 1][:12]
    config = SolverConfig(max_step_tokens=64, max_answer_tokens=32, torch_threads=1, executor_workers=1)
    with Solver(str(tmp_path / "p"), args=config) as solver:
        (result,) = solver.iter_solve([p["problem"] for p in problems], ["greedy"])
    right = sum(bool(s.answer and grade_answer(s.answer, problems[s.index]["answer"])) for s in result.solutions)
    # The shipped policy solves about 80% of level-1 problems greedily (docs/results.md); a random or broken
    # checkpoint none.
    assert right >= 6, [s.trajectory for s in result.solutions]


def test_provide_builds_when_the_settings_differ_and_refuses_a_damaged_copy(tmp_path, monkeypatch):
    import shutil

    from rstar_trl.tiny import policy

    assert provide_tiny_policy(tmp_path / "built", bootstrap_steps=2) == "built"
    info = json.loads((tmp_path / "built" / "tiny_policy.json").read_text())
    assert info["bootstrap_steps"] == 2 and info["weights_sha256"] != policy.shipped_policy_info()["weights_sha256"]

    damaged = tmp_path / "damaged"
    shutil.copytree(SHIPPED_POLICY, damaged)
    weights = damaged / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-8] + b"\0" * 8)
    monkeypatch.setattr(policy, "SHIPPED_POLICY", str(damaged))
    with pytest.raises(RuntimeError, match="does not match its record"):
        provide_tiny_policy(tmp_path / "copy")


def test_build_command(tmp_path):
    import subprocess
    import sys

    out = tmp_path / "cli"
    cmd = [sys.executable, "-m", "rstar_trl.tiny", "--output_dir", str(out), "--bootstrap_steps", "2", "--quiet"]
    done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert done.returncode == 0, done.stderr
    assert "built" in done.stdout and "weights sha256" in done.stdout
    assert json.loads((out / "tiny_policy.json").read_text())["bootstrap_steps"] == 2
    again = subprocess.run(cmd, capture_output=True, text=True)
    assert again.returncode == 2 and "already holds a checkpoint" in again.stderr
    assert "--overwrite" in subprocess.run([*cmd[:3], "--help"], capture_output=True, text=True).stdout
