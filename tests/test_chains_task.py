"""The second task family of bench/search_efficiency.py (long register programs), and a tiny policy built on it."""

import contextlib
import io
import json
import re

import pytest
from bench_module import bench_module

from rstar_trl import build_program, render_trajectory, split_steps
from rstar_trl.tiny import build_tiny_policy


@pytest.fixture(scope="module")
def chains():
    return bench_module("_chains")


def _run(steps) -> str:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(build_program(steps), {})  # our own template code
    return out.getvalue()


def test_every_program_prints_its_answer_and_has_one_step_per_instruction(chains):
    splits = chains.chain_splits(num_bootstrap=400, num_bench=200)
    for p in splits["bootstrap"] + splits["bench"]:
        assert _run(p["steps"]) == p["answer"] + "\n", p["problem"]
        assert 0 <= int(p["answer"]) <= 999
        instructions = re.findall(r"(?<=[.] )[A-Z][^.?]*[.]", p["problem"])  # the sentences after the start
        assert len(instructions) == p["level"] == len(p["steps"]) - 1
        assert [s.comment for s in p["steps"][1:]] == instructions
        assert all("\n" not in s.code for s in p["steps"][:-1])
        assert p["problem"].endswith(f"What is {p['steps'][-1].code.split('print(')[1][0]} at the end?")
        rendered = render_trajectory(p["problem"], p["steps"])
        assert [s.comment for s in split_steps(rendered["completion"])] == [s.comment for s in p["steps"]]
    assert {p["level"] for p in splits["bench"]} == set(chains.BENCH_LENGTHS)
    assert {p["level"] for p in splits["bootstrap"]} == set(chains.BOOTSTRAP_LENGTHS)


def test_splits_are_seeded_distinct_and_disjoint(chains):
    one, again = (
        chains.chain_splits(num_bootstrap=300, num_bench=100),
        chains.chain_splits(num_bootstrap=300, num_bench=100),
    )
    assert one == again
    texts = [p["problem"] for split in one.values() for p in split]
    assert len(set(texts)) == len(texts) == 400
    other = chains.chain_splits(seed=1, num_bootstrap=300, num_bench=100)
    assert {p["problem"] for p in other["bench"]} != {p["problem"] for p in one["bench"]}


def test_a_tiny_policy_bootstraps_on_another_task(chains, tmp_path):
    from transformers import AutoTokenizer

    problems = chains.chain_splits(num_bootstrap=300, num_bench=10)["bootstrap"]
    sizes = {"hidden_size": 32, "num_layers": 1, "num_heads": 2, "intermediate_size": 64}
    out = build_tiny_policy(tmp_path / "policy", bootstrap_steps=10, bootstrap_problems=problems, progress=False,
                            **sizes)  # fmt: skip
    info = json.loads((tmp_path / "policy" / "tiny_policy.json").read_text())
    assert info["bootstrap_problems"] == 300 and info["bootstrap_levels"] is None
    assert info["loss_end"] < info["loss_start"]
    # The tokenizer learned the chains' words, not the word problems': "Swap" is one or two tokens, "apples" is not.
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert len(tokenizer.tokenize(" Swap")) <= 2
    assert len(tokenizer.tokenize(" apples")) > 2
