"""The PPM as a reward for TRL's online trainers (rstar_trl.ppm.reward) and recipes/grpo.py with a real GRPOTrainer."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from vllm_serve import memory_share

from rstar_trl.format import STEP_MARKERS, format_prompt
from rstar_trl.ppm import CompletionJudge, CorrectnessReward, PPMReward, TransformersPPMScorer
from rstar_trl.solve import aggregate_step_scores

ROOT = Path(__file__).resolve().parents[1]
QUESTION = "Tom has 3 bags with 4 apples each. He eats 2 apples. How many apples does he have?"
# The policy guesses the output block (here wrongly: 11); the program prints 10.
GOOD = (
    "# Tom has 3 bags with 4 apples each.\napples = 3 * 4\n<end_of_step>\n# He eats 2 apples.\napples -= 2\n"
    "print(apples)\n<end_of_code>\n<output>11<end_of_output>\n<answer>Tom has \\boxed{11} apples.<end_of_answer>"
)
WRONG = GOOD.replace("apples -= 2", "apples -= 3")  # runs, prints 9
CRASH = GOOD.replace("apples -= 2", "apples -= oranges")  # NameError in step 2
CUT = "# Tom has 3 bags with 4 apples each.\napples = 3 * 4\n<end_of_step>\n# He eats 2 app"  # length limit
UNEXECUTED = "# Tom has 12 apples and eats 2.\n<answer>\\boxed{10}<end_of_answer>"  # answers without running code


@pytest.fixture(scope="module")
def judge(tiny_policy):
    with CompletionJudge(tiny_policy) as judge:
        yield judge


def test_the_judge_checks_completions_as_the_search_would(judge):
    good, wrong, crash, cut, unexecuted = judge.judge([GOOD, WRONG, CRASH, CUT, UNEXECUTED])
    assert good.valid and good.output == "10" and good.answer == "Tom has \\boxed{11} apples."
    # The PPM reads the executed output, not the policy's guess, and one prefix per step.
    assert len(good.prefixes) == 2 and good.prefixes[0].endswith("<end_of_step>\n")
    assert "<output>10<end_of_output>" in good.prefixes[1] and "<output>11" not in good.prefixes[1]
    assert good.prefixes[1].startswith(good.prefixes[0])
    assert wrong.valid and wrong.output == "9"
    assert crash.error == "code_error" and cut.error == "no_step_marker" and unexecuted.error == "no_output"


def test_completion_ids_are_decoded_with_the_step_markers(judge, tiny_policy):
    tokenizer = AutoTokenizer.from_pretrained(tiny_policy)
    ids = tokenizer(GOOD, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    # What TRL passes as `completions`: decoded without special tokens, so the markers are gone.
    trl_text = tokenizer.decode(ids, skip_special_tokens=True)
    assert not any(marker in trl_text for marker in STEP_MARKERS)
    (text,) = judge.texts([trl_text], [ids])
    assert text == GOOD
    assert CompletionJudge().texts([[{"role": "assistant", "content": GOOD}]]) == [GOOD]


def test_correctness_grades_the_executed_output(judge):
    reward = CorrectnessReward(judge=judge)
    got = reward(prompts=None, completions=[GOOD, WRONG, CRASH, CUT], answer=["10"] * 4)
    assert got == [1.0, 0.0, 0.0, 0.0]
    written = CorrectnessReward(judge=judge, graded="answer")
    assert written(completions=[GOOD], answer=["11"]) == [1.0] and written(completions=[GOOD], answer=["10"]) == [0.0]


@pytest.mark.parametrize("aggregation", ["min", "last", "mean", "product"])
def test_ppm_reward_aggregates_the_values_of_every_step(judge, ppm_path, aggregation):
    reward = PPMReward(ppm_path, aggregation=aggregation, judge=judge, device="cpu")
    completions = [GOOD, WRONG, CRASH]
    got = reward(prompts=[format_prompt(QUESTION)] * 3, completions=completions, problem=[QUESTION] * 3)
    # Independently: score each executed prefix alone with the plain scorer, then aggregate.
    scorer = TransformersPPMScorer(ppm_path, device="cpu", batch_size=1)
    for value, item in zip(got[:2], judge.judge(completions[:2])):
        steps = [scorer.score([QUESTION], [prefix])[0] for prefix in item.prefixes]
        expected = aggregate_step_scores(steps, "prod" if aggregation == "product" else aggregation)
        assert value == pytest.approx(expected, abs=1e-5)
    assert got[2] == -1.0  # rejected by the search: the lowest value
    assert reward.__name__ == f"ppm_{'prod' if aggregation == 'product' else aggregation}"


@pytest.mark.slow
def test_ppm_reward_on_vllm_pooling_gives_the_transformers_rewards(judge, ppm_path):
    completions, questions = [GOOD, WRONG, CRASH], [QUESTION] * 3
    local = PPMReward(ppm_path, aggregation="mean", judge=judge, device="cpu")(completions=completions,
                                                                               problem=questions)  # fmt: skip
    with PPMReward(ppm_path, aggregation="mean", backend="vllm", judge=judge, gpu_memory_utilization=memory_share(),
                   dtype="float32", max_model_len=1024) as reward:  # fmt: skip
        served = reward(completions=completions, problem=questions)
    assert served == pytest.approx(local, abs=1e-3) and served[2] == -1.0
    assert local[0] != pytest.approx(local[1], abs=1e-3)  # different completions, different rewards: can fail


def test_ppm_reward_errors_name_the_problem(judge, ppm_path):
    with pytest.raises(ValueError, match="aggregation 'max'"):
        PPMReward(ppm_path, aggregation="max", judge=judge)
    reward = PPMReward(ppm_path, judge=judge, device="cpu")
    with pytest.raises(ValueError, match="column 'problem'.*'question'"):
        reward(completions=[GOOD], question=[QUESTION])
    with pytest.raises(ValueError, match="column 'answer'"):
        CorrectnessReward(judge=judge)(completions=[GOOD], problem=[QUESTION])


@pytest.mark.slow
def test_grpo_recipe_trains_and_resumes(tiny_policy, ppm_path, tmp_path):
    """recipes/grpo.py with a real GRPOTrainer: 2 steps, then a re-run with 3 steps resumes from the checkpoint."""
    out = tmp_path / "grpo"
    command = [
        sys.executable, str(ROOT / "recipes/grpo.py"), "--model_name_or_path", tiny_policy, "--ppm_path", ppm_path,
        "--dataset", "tiny-train", "--limit", "8", "--output_dir", str(out), "--per_device_train_batch_size", "8",
        "--num_generations", "4", "--max_completion_length", "160", "--temperature", "0.8", "--learning_rate", "1e-3",
        "--logging_steps", "1", "--save_steps", "2", "--report_to", "none", "--seed", "0", "--max_steps", "2",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TRL_EXPERIMENTAL_SILENCE": "1"}
    run = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    record = json.loads((out / "grpo.json").read_text())
    assert record["rewards"] == ["ppm_min", "correct"] and record["steps"] == 2
    state = json.loads((out / "checkpoint-2" / "trainer_state.json").read_text())
    logged = [entry for entry in state["log_history"] if "rewards/ppm_min/mean" in entry]
    assert len(logged) == 2
    for entry in logged:  # both rewards were computed on real completions
        assert -1.0 <= entry["rewards/ppm_min/mean"] <= 1.0 and 0.0 <= entry["rewards/correct/mean"] <= 1.0
    before = AutoModelForCausalLM.from_pretrained(tiny_policy).state_dict()
    after = AutoModelForCausalLM.from_pretrained(out).state_dict()
    assert any(not torch.equal(before[name], after[name]) for name in before)  # GRPO updated the policy

    run = subprocess.run([*command[:-1], "3"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "Resuming from" in run.stdout and str(out / "checkpoint-2") in run.stdout
    assert json.loads((out / "grpo.json").read_text())["steps"] == 3


def test_grpo_recipe_rejects_bad_input(tmp_path):
    command = [sys.executable, str(ROOT / "recipes/grpo.py"), "--output_dir", str(tmp_path / "o")]
    missing = subprocess.run([*command, "--round_dir", str(tmp_path / "nope")], cwd=ROOT, capture_output=True,
                             text=True, timeout=300)  # fmt: skip
    assert missing.returncode != 0 and "--round_dir" in missing.stderr and "does not exist" in missing.stderr
    nothing = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert nothing.returncode != 0 and "--model_name_or_path" in nothing.stderr


def test_grpo_recipe_explains_every_option_and_trains_in_float32_on_cpu(tmp_path):
    import dataclasses
    import importlib.util

    spec = importlib.util.spec_from_file_location("grpo_recipe", ROOT / "recipes" / "grpo.py")
    recipe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(recipe)
    for field in dataclasses.fields(recipe.GRPOScriptArguments):
        assert field.metadata.get("help"), field.name
    config = recipe.RecipeGRPOConfig(output_dir=str(tmp_path), report_to="none")
    assert config.bf16 is (torch.cuda.is_available() and torch.cuda.is_bf16_supported())
