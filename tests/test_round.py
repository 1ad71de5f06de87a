"""The self-evolution round recipe (`recipes/round.py`, `rstar_trl.rounds`): stages, resume, cards, Hub, bad input."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import get_type_hints

import pytest
from datasets import Dataset
from fake_hub import FakeHub

from rstar_trl.hub import load_dataset_folder
from rstar_trl.rounds import ARTIFACTS, RoundArguments, RoundSearchConfig, StaleStageError, downstream, plan_round

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = str(ROOT / "recipes" / "round.py")
# Small budgets: a whole round of the tiny default in well under a minute. At temperature 1 (the recipe: 0.8) a few
# of the 48 problems get both correct and wrong answers (about 15 pairs); at 0.8 none did.
SMALL = ["--limit", "48", "--num_rollouts", "4", "--num_candidates", "4", "--temperature", "1.0",
         "--sft_max_steps", "30", "--ppm_max_steps", "20", "--logging_steps", "5"]  # fmt: skip


def _env(**extra: str) -> dict[str, str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
    env.update(extra)
    return env


def _round(args: list[str], env: dict | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, SCRIPT, *args], cwd=ROOT, env=env or _env(), capture_output=True, text=True, timeout=timeout
    )


def _args(run_dir, policy: str | None = None, **overrides) -> tuple[RoundArguments, RoundSearchConfig]:
    search = RoundSearchConfig(output_dir=str(run_dir), num_rollouts=4, num_candidates=4, max_step_tokens=64,
                               temperature=1.0)  # fmt: skip
    return RoundArguments(model_name_or_path=policy, **overrides), search


@pytest.fixture(scope="module")
def killed_round(tiny_policy, tmp_path_factory):
    """Round 1 of the tiny default, killed (SIGKILL) once its trees stage had finished, then run again to the end.

    Yields the run folder, the second run's output and the trees marker's modification time before the re-run."""
    run_dir = tmp_path_factory.mktemp("round") / "run"
    args = [*SMALL, "--model_name_or_path", tiny_policy, "--output_dir", str(run_dir)]
    first = subprocess.Popen(
        [sys.executable, SCRIPT, *args], cwd=ROOT, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        start_new_session=True,
    )  # fmt: skip
    marker = run_dir / "round_1" / "trees" / "DONE.json"
    deadline = time.time() + 240
    while not marker.exists() and first.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    os.killpg(first.pid, signal.SIGKILL)
    first.wait()
    assert marker.exists(), "the first run ended before its trees stage finished"
    assert not (run_dir / "round_1" / "ppm" / "DONE.json").exists(), "the kill came after the round had finished"
    trees_mtime = marker.stat().st_mtime
    second = _round(args)
    assert second.returncode == 0, second.stderr[-3000:]
    return run_dir, second.stdout, trees_mtime


@pytest.mark.slow
def test_round_one_writes_every_artifact_and_reports_the_solved_rate(killed_round):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    run_dir, output, _ = killed_round
    round_dir = run_dir / "round_1"
    for artifact in ARTIFACTS:
        assert (round_dir / artifact / "DONE.json").exists(), artifact
        assert (round_dir / artifact / "README.md").read_text().strip(), artifact
    trees = json.loads((round_dir / "trees" / "DONE.json").read_text())
    assert trees["num_problems"] == 48 and 0 < trees["num_solved"] < 48
    assert f"solved {trees['num_solved']}/48 problems ({100 * trees['solved_rate']:.1f}%)" in output
    for artifact in ARTIFACTS:
        assert str(round_dir / artifact) in output
    sft = load_dataset_folder(str(round_dir / "sft"))
    assert {"prompt", "completion"} <= set(sft.column_names) and len(sft) >= trees["num_solved"]
    assert len(load_dataset_folder(str(round_dir / "pairs"))) > 0
    assert AutoModelForCausalLM.from_pretrained(round_dir / "policy").num_parameters() > 0
    ppm = AutoModelForSequenceClassification.from_pretrained(round_dir / "ppm")
    assert ppm.config.num_labels == 1
    assert not list((round_dir / "policy").glob("checkpoint-*"))


@pytest.mark.slow
def test_sft_data_baselines_train_like_the_round_on_sampled_data(killed_round):
    """recipes/sft_data_baselines.py: samples of the round's search policy, right ones (rejection) or any answered
    ones (random), at most sft_top_k per problem, as many rows as the round's MCTS data, the round's training."""
    from collections import Counter

    from transformers import AutoModelForCausalLM

    from rstar_trl.grading import extract_answer, grade_answer

    run_dir, _, _ = killed_round
    round_dir = run_dir / "round_1"
    mcts_rows = len(load_dataset_folder(str(round_dir / "sft")))
    gold = load_dataset_folder(str(round_dir / "trees"))["answer"]
    record = json.loads((round_dir / "round.json").read_text())
    command = [sys.executable, str(ROOT / "recipes" / "sft_data_baselines.py"), "--round_dir", str(round_dir),
               "--num_samples", "4"]  # fmt: skip
    datas = {}
    for kind in ("rejection", "random"):
        result = subprocess.run([*command, "--kind", kind], cwd=ROOT, env=_env(), capture_output=True, text=True,
                                timeout=600)  # fmt: skip
        assert result.returncode == 0, result.stderr[-3000:]
        out = round_dir / "sft_baselines" / kind
        data = datas[kind] = load_dataset_folder(str(out / "data"))
        sampling = json.loads((out / "sampling.json").read_text())
        assert 0 < len(data) == min(mcts_rows, sampling["pool_rows"]) and sampling["samples"] == 4 * len(gold)
        assert max(Counter(data["problem_index"]).values()) <= record["config"]["round"]["sft_top_k"]
        for row in data:  # `correct` is what grading the written answer against the gold answer says
            answer = extract_answer(row["completion"])
            assert row["correct"] == bool(answer and grade_answer(answer, gold[row["problem_index"]]))
        baseline = json.loads((out / "baseline.json").read_text())
        assert baseline["training"]["rows"] == len(data)
        assert baseline["training"]["base_model"] == record["base_model"]  # from the base, as the round's policy
        AutoModelForCausalLM.from_pretrained(out / "policy")
        again = subprocess.run([*command, "--kind", kind], cwd=ROOT, env=_env(), capture_output=True, text=True,
                               timeout=300)  # fmt: skip
        assert again.returncode == 0 and f"{len(data)} rows" in again.stdout  # finished parts are not redone
    assert all(datas["rejection"]["correct"])
    random_sampling = json.loads((round_dir / "sft_baselines" / "random" / "sampling.json").read_text())
    if random_sampling["correct"] < random_sampling["answered"]:  # wrong answers exist: random keeps some
        assert not all(datas["random"]["correct"]) or len(datas["random"]) < random_sampling["pool_rows"]


@pytest.mark.slow
def test_rerun_after_kill_skips_finished_stages_and_completes_the_rest(killed_round):
    run_dir, output, trees_mtime = killed_round
    assert "[round 1] trees: finished earlier, skipped" in output
    assert "[round 1] trees: running" not in output
    assert "[round 1] ppm: running" in output
    assert (run_dir / "round_1" / "trees" / "DONE.json").stat().st_mtime == trees_mtime
    policy = json.loads((run_dir / "round_1" / "policy" / "DONE.json").read_text())
    assert policy["global_step"] == 30


@pytest.mark.slow
def test_cards_carry_lineage_sizes_solved_rate_config_and_citation(killed_round, tiny_policy):
    run_dir, _, _ = killed_round
    round_dir = run_dir / "round_1"
    cards = {artifact: (round_dir / artifact / "README.md").read_text() for artifact in ARTIFACTS}
    trees = json.loads((round_dir / "trees" / "DONE.json").read_text())
    rate = f"| 1 | 48 | {trees['num_solved']} | {100 * trees['solved_rate']:.1f}% |"
    sft_rows = json.loads((round_dir / "sft" / "DONE.json").read_text())["rows"]
    pair_rows = json.loads((round_dir / "pairs" / "DONE.json").read_text())["rows"]
    for artifact, card in cards.items():
        assert "Self-evolution lineage" in card, artifact
        assert f"base model (fine-tuned every round) | `{tiny_policy}`" in card, artifact
        assert f"`{round_dir / 'sft'}` ({sft_rows} rows)" in card and f"({pair_rows} pairs)" in card, artifact
        assert rate in card, artifact
        assert '"num_rollouts": 4' in card and '"sft_max_steps": 30' in card, artifact
        assert "2501.04519" in card, artifact
    assert "| steps | 30 |" in cards["policy"]
    assert "self-evolution round 1" in cards["ppm"]  # the PPM trainer's own card, with the lineage after it
    assert cards["ppm"].count("Self-evolution lineage") == 1


@pytest.fixture
def fake_hub():
    with FakeHub() as hub:  # the shared local fake of the Hub's HTTP API, git-LFS path included (tests/fake_hub.py)
        yield hub


@pytest.mark.slow
def test_push_uploads_each_artifact_with_its_card_to_its_repo(killed_round, fake_hub, tmp_path, tiny_policy):
    hub = fake_hub
    run_dir = tmp_path / "run"
    shutil.copytree(killed_round[0], run_dir)
    hub_args = ["--push_to_hub", "--hub_org", "test-org", "--hub_run_name", "tiny"]
    result = _round([*SMALL, "--model_name_or_path", tiny_policy, "--output_dir", str(run_dir), *hub_args],
                    env=_env(**hub.env()))  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    for artifact in ARTIFACTS:
        assert f"[round 1] {artifact}: finished earlier, skipped" in result.stdout  # nothing is recomputed
    created = {(r["organization"], r["name"], r.get("type")) for r in hub.created}
    assert created == {("test-org", f"tiny-round1-{a}", "dataset" if a in ("trees", "sft", "pairs") else "model")
                       for a in ARTIFACTS}  # fmt: skip
    assert not hub.unknown and not hub.rejected
    assert hub.cards and all("rstar-math" in card["tags"] for card in hub.cards)  # every card checked has its tags
    for artifact in ARTIFACTS:  # and every repo got its card
        kind = "dataset" if artifact in ("trees", "sft", "pairs") else "model"
        assert b"rstar-math" in hub.last_commit(kind, f"test-org/tiny-round1-{artifact}")["regular"]["README.md"]
    policy = hub.last_commit("model", "test-org/tiny-round1-policy")
    assert {"README.md", "config.json", "tokenizer.json"} <= set(policy["regular"])
    assert "model.safetensors" in policy["lfs"]  # large files go through git-LFS, checked by sha256
    weights = (run_dir / "round_1" / "policy" / "model.safetensors").read_bytes()
    assert hub.lfs_objects[policy["lfs"]["model.safetensors"]["oid"]] == weights
    assert b"`test-org/tiny-round1-sft`" in policy["regular"]["README.md"]  # cards name the Hub repos when pushing
    pairs = hub.last_commit("dataset", "test-org/tiny-round1-pairs")
    assert "data/train-00000-of-00001.parquet" in pairs["lfs"]
    assert b"tiny-round1-trees" in pairs["regular"]["README.md"]
    assert "models/test-org/tiny-round1-ppm" in hub.commits and "datasets/test-org/tiny-round1-trees" in hub.commits
    assert "pushed policy" in result.stdout


@pytest.mark.slow
def test_push_without_a_reachable_hub_keeps_the_round_and_prints_the_upload_command(killed_round, tmp_path,
                                                                                   tiny_policy):  # fmt: skip
    run_dir = tmp_path / "run"
    shutil.copytree(killed_round[0], run_dir)
    result = _round(
        [*SMALL, "--model_name_or_path", tiny_policy, "--output_dir", str(run_dir), "--push_to_hub",
         "--hub_org", "test-org", "--hub_run_name", "tiny"],
        env=_env(HF_ENDPOINT="http://127.0.0.1:9", HF_HUB_OFFLINE="0", HF_TOKEN="hf_fake_token"),
    )  # fmt: skip
    assert result.returncode == 1
    assert "Round 1 done" in result.stdout
    assert "Nothing is lost" in result.stderr
    for artifact in ARTIFACTS:
        command = f"hf upload test-org/tiny-round1-{artifact} {run_dir / 'round_1' / artifact} ."
        assert command in result.stderr, artifact
        assert (run_dir / "round_1" / artifact / "DONE.json").exists()


@pytest.mark.slow
def test_two_process_launch_runs_a_ppm_guided_round_with_an_extra_search_of_unsolved_problems(killed_round, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(killed_round[0] / "round_1", run_dir / "round_1")
    base_model = json.loads((killed_round[0] / "round_1" / "round.json").read_text())["base_model"]
    command = [
        # On a machine without CUDA, accelerate's `--cpu` starts ONE process unless MPI is set up; torchrun's
        # processes (`--multi_gpu`) form a gloo group instead.
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
        "--num_machines", "1", "--dynamo_backend", "no", "--mixed_precision", "no",
        SCRIPT, "--config", str(ROOT / "recipes/tiny/round2.yaml"), *SMALL, "--limit", "24",
        "--output_dir", str(run_dir), "--ppm_guided", "true", "--unsolved_rollouts", "2",
        "--sft_max_steps", "6", "--ppm_max_steps", "4",
    ]  # fmt: skip
    result = subprocess.run(command, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=420)
    assert result.returncode == 0, result.stderr[-4000:]
    round_dir = run_dir / "round_2"
    lineage = json.loads((round_dir / "round.json").read_text())
    assert lineage["search_policy"] == str(run_dir / "round_1" / "policy")
    assert lineage["search_ppm"] == str(run_dir / "round_1" / "ppm")
    assert lineage["base_model"] == base_model
    trees = load_dataset_folder(str(round_dir / "trees"))
    assert len(trees) == 24 and trees["problem"] == load_dataset_folder(str(run_dir / "round_1" / "trees"))[
        "problem"][:24]  # fmt: skip
    done = json.loads((round_dir / "trees" / "DONE.json").read_text())
    passes = done["passes"]
    assert passes[0]["problems"] == 24 and done["stats"]["scoring_s"] > 0  # PPM-initialised Q (Eq. 3)
    if len(passes) > 1:
        assert passes[1]["rollouts"] == 2 and passes[1]["seed"] == passes[0]["seed"] + 1
        assert set(trees["search_pass"]) <= {0, 1} and trees["search_pass"].count(1) == passes[1]["problems"]
        assert passes[0]["solved"] + passes[1]["solved"] == sum(trees["solved"])
    else:
        assert all(trees["solved"])
    assert result.stdout.count("Round 2 done") == 1  # only the main process reports
    shards = list((round_dir / "search" / "all" / "shards").glob("*.jsonl"))
    assert {path.name[:7] for path in shards} == {"rank000", "rank001"}  # both processes searched their share
    for path in shards:  # each problem's passes all ran in its own process (index % 2 == rank)
        assert all(json.loads(line)["index"] % 2 == int(path.name[4:7]) for line in path.open())
    policy = json.loads((round_dir / "policy" / "DONE.json").read_text())
    assert policy["global_step"] == 6
    assert policy["world_size"] == 2  # the trainers ran data-parallel over both processes
    assert json.loads((round_dir / "ppm" / "DONE.json").read_text())["world_size"] == 2
    assert (round_dir / "ppm" / "model.safetensors").exists()


@pytest.mark.slow
def test_two_process_round_one_from_nothing_builds_the_tiny_policy_once(tmp_path):
    # The main process builds the tiny policy while the other waits; the build's trainer must not join the process
    # group (it did, and both processes waited for each other forever).
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
        "--num_machines", "1", "--dynamo_backend", "no", "--mixed_precision", "no",
        SCRIPT, "--output_dir", str(tmp_path), "--tiny_bootstrap_steps", "8", "--limit", "8", "--num_rollouts", "1",
        "--num_candidates", "2", "--stop_after", "trees",
    ]  # fmt: skip
    result = subprocess.run(command, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    info = json.loads((tmp_path / "tiny_policy" / "tiny_policy.json").read_text())
    assert info["bootstrap_steps"] == 8
    assert len(load_dataset_folder(str(tmp_path / "round_1" / "trees"))) == 8
    assert not (tmp_path / "round_1" / "sft").exists()  # --stop_after trees


# -- fingerprints, --redo, resume equality, LoRA ----------------------------------------------------------------------


def _copy_run(killed_round, tmp_path) -> Path:
    run_dir = tmp_path / "run"
    shutil.copytree(killed_round[0], run_dir)
    return run_dir


def _markers(round_dir: Path) -> dict[str, float]:
    return {path.parent.name: path.stat().st_mtime_ns for path in round_dir.glob("*/DONE.json")}


@pytest.mark.slow
def test_changed_settings_are_refused_naming_each_stage_and_field(killed_round, tmp_path, tiny_policy):
    run_dir = _copy_run(killed_round, tmp_path)
    round_dir = run_dir / "round_1"
    before, lineage = _markers(round_dir), (round_dir / "round.json").read_text()
    result = _round([*SMALL, "--model_name_or_path", tiny_policy, "--output_dir", str(run_dir), "--num_rollouts", "2",
                     "--sft_learning_rate", "1e-4", "--pairs_per_side", "1"], timeout=120)  # fmt: skip
    assert result.returncode != 0
    message = result.stderr
    assert "holds work made with other settings or inputs" in message
    assert f"trees (finished, {round_dir / 'trees'}):" in message and "num_rollouts: 4 -> 2" in message
    assert "pairs (finished" in message and "pairs_per_side: 2 -> 1" in message
    assert "policy (finished" in message and "sft_learning_rate: 0.0005 -> 0.0001" in message
    assert "sft (finished" not in message and "ppm (finished" not in message  # their settings and inputs are unchanged
    assert "--redo trees " in message  # trees come first: redoing them recomputes every other stage
    assert "deletes and recomputes trees, sft, pairs, policy, ppm" in message
    # Refused before any compute: nothing was rewritten, not even the lineage.
    assert _markers(round_dir) == before and (round_dir / "round.json").read_text() == lineage
    # A recomputed input makes the stages reading it stale, even with unchanged settings.
    done = json.loads((round_dir / "sft" / "DONE.json").read_text())
    done["output_sha256"] = "0" * 64
    (round_dir / "sft" / "DONE.json").write_text(json.dumps(done))
    from trl import TrlParser

    argv = ["--config", str(ROOT / "recipes/tiny/round1.yaml"), *SMALL, "--model_name_or_path", tiny_policy,
            "--output_dir", str(run_dir)]  # fmt: skip
    with pytest.raises(StaleStageError) as refused:
        plan_round(*TrlParser((RoundArguments, RoundSearchConfig)).parse_args_and_config(argv))
    message = str(refused.value)
    assert re.search(r"policy \(finished.*\n\s+sft: [0-9a-f]{12}\.\.\. -> 0{12}\.\.\.\n", message), message
    assert "trees (" not in message and "ppm (" not in message and "--redo policy " in message
    # A stage finished by an older rstar_trl (no fingerprint) cannot be vouched for either.
    done = json.loads((round_dir / "pairs" / "DONE.json").read_text())
    del done["fingerprint"]
    (round_dir / "pairs" / "DONE.json").write_text(json.dumps(done))
    with pytest.raises(StaleStageError) as refused:
        plan_round(*TrlParser((RoundArguments, RoundSearchConfig)).parse_args_and_config(argv))
    assert "fingerprint: none recorded (an older rstar_trl made it) -> this run's" in str(refused.value)
    assert "--redo pairs,policy " in str(refused.value)
    # Stages after --stop_after are not reached, so they are not checked: the search of a finished round can be
    # re-launched with more processes (reproduce.sh does), though its training stages were made by one.
    argv_two = [*argv, "--sft_learning_rate", "1e-4"]
    plan_round(*TrlParser((RoundArguments, RoundSearchConfig)).parse_args_and_config([*argv_two, "--stop_after",
                                                                                      "trees"]))  # fmt: skip
    with pytest.raises(StaleStageError, match="sft_learning_rate: 0.0005 -> 0.0001"):
        plan_round(*TrlParser((RoundArguments, RoundSearchConfig)).parse_args_and_config([*argv_two, "--stop_after",
                                                                                          "policy"]))  # fmt: skip


def test_redo_names_the_stages_and_everything_downstream():
    assert downstream(["trees"]) == list(ARTIFACTS)
    assert downstream(["sft"]) == ["sft", "policy", "ppm"]
    assert downstream(["pairs"]) == ["pairs", "ppm"]
    assert downstream(["policy", "pairs"]) == ["pairs", "policy", "ppm"]
    assert downstream(["ppm"]) == ["ppm"]


def test_bad_redo_values_are_refused(tmp_path, tiny_policy):
    with pytest.raises(ValueError, match="--redo takes stages among trees, sft, pairs, policy, ppm or `all`, got ppn"):
        plan_round(*_args(tmp_path, policy=tiny_policy, redo="policy,ppn"))
    assert plan_round(*_args(tmp_path, policy=tiny_policy, limit=2, redo="all")).redo == list(ARTIFACTS)
    assert plan_round(*_args(tmp_path, policy=tiny_policy, limit=2, redo="pairs")).redo == ["pairs", "ppm"]


@pytest.mark.slow
def test_lora_round_merges_adapters_into_plain_checkpoints_and_cards_say_so(killed_round, tmp_path, tiny_policy):
    """--use_peft on a finished round is refused until --redo policy; then LoRA policy and PPM, merged; then an
    unchanged re-run skips everything."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification
    from trl import TrlParser

    from rstar_trl.ppm import TransformersPPMScorer
    from rstar_trl.rounds import RoundModelConfig

    run_dir = _copy_run(killed_round, tmp_path)
    round_dir = run_dir / "round_1"
    lora = ["--use_peft", "--lora_r", "8", "--lora_alpha", "16", "--lora_target_modules", "q_proj", "v_proj"]
    command = [*SMALL, "--model_name_or_path", tiny_policy, "--output_dir", str(run_dir), *lora]
    parser = TrlParser((RoundArguments, RoundSearchConfig, RoundModelConfig))
    with pytest.raises(StaleStageError) as refused:  # what the script reports as `error: ...`, in-process
        plan_round(*parser.parse_args_and_config(["--config", str(ROOT / "recipes/tiny/round1.yaml"), *command]))
    assert "peft.use_peft: False -> True" in str(refused.value) and "--redo policy " in str(refused.value)

    result = _round([*command, "--redo", "policy"])
    assert result.returncode == 0, result.stderr[-3000:]
    for stage in ("trees", "sft", "pairs"):
        assert f"[round 1] {stage}: finished earlier, skipped" in result.stdout
    assert "--redo: deleted policy, ppm" in result.stdout
    for stage in ("policy", "ppm"):
        folder = round_dir / stage
        info = json.loads((folder / "DONE.json").read_text())
        assert info["finetuning"]["method"] == "lora" and info["finetuning"]["r"] == 8
        assert info["finetuning"]["target_modules"] == ["q_proj", "v_proj"]
        assert info["fingerprint"]["peft.use_peft"] is True and info["fingerprint"]["peft.lora_r"] == 8
        # A plain checkpoint at the top (what vLLM and the Auto classes load), the adapter beside it.
        assert (folder / "model.safetensors").exists() and not (folder / "adapter_config.json").exists()
        assert (folder / "adapter" / "adapter_config.json").exists()
        assert not (folder / "STARTED.json").exists() and not list(folder.glob("checkpoint-*"))
        card = (folder / "README.md").read_text()
        assert "LoRA (r = 8; alpha = 16; dropout = 0.05; target modules: q_proj, v_proj" in card, stage
        assert "merged into this checkpoint" in card
    assert "How it was trained: LoRA (r = 8" in (round_dir / "policy" / "README.md").read_text()
    assert "| fine-tuning | LoRA (r = 8" in (round_dir / "ppm" / "README.md").read_text()
    assert "trained in full: score)" in (round_dir / "ppm" / "README.md").read_text()  # once, no absent "classifier"
    assert "| how the PPM was trained | LoRA (r = 8" in (round_dir / "trees" / "README.md").read_text()

    # The merged policy is the base model plus the adapter, and differs from the base model.
    policy = AutoModelForCausalLM.from_pretrained(round_dir / "policy")
    base = AutoModelForCausalLM.from_pretrained(tiny_policy)
    adapted = PeftModel.from_pretrained(base, round_dir / "policy" / "adapter").eval()
    ids = torch.tensor([[5, 17, 42, 7, 3]])
    with torch.no_grad():
        merged_logits, adapted_logits = policy(ids).logits, adapted(ids).logits
        base_logits = AutoModelForCausalLM.from_pretrained(tiny_policy)(ids).logits
    assert torch.allclose(merged_logits, adapted_logits, atol=1e-5)
    assert not torch.allclose(merged_logits, base_logits, atol=1e-3)
    ppm = AutoModelForSequenceClassification.from_pretrained(round_dir / "ppm")
    assert ppm.config.num_labels == 1 and "rstar_value_transform" in ppm.config.to_dict()
    # The merged PPM is the round's policy with the trained score head and the adapter.
    backbone = AutoModelForSequenceClassification.from_pretrained(round_dir / "policy", num_labels=1)
    adapted_ppm = PeftModel.from_pretrained(backbone, round_dir / "ppm" / "adapter").eval()
    with torch.no_grad():
        assert torch.allclose(ppm(ids).logits, adapted_ppm(ids).logits, atol=1e-5)
    with TransformersPPMScorer(str(round_dir / "ppm"), device="cpu") as scorer:
        (value,) = scorer.score(["What is 2 + 3?"], ["# add\nprint(2 + 3)\n<end_of_step>\n"])
    assert -1 <= value <= 1

    again = _round(command)
    assert again.returncode == 0, again.stderr[-3000:]
    for stage in ARTIFACTS:
        assert f"[round 1] {stage}: finished earlier, skipped" in again.stdout, stage
    assert "running" not in again.stdout


def _kill_when(args: list[str], path: Path, timeout: float = 300) -> None:
    """Run the recipe and SIGKILL it as soon as `path` exists (it must appear before the run ends)."""
    process = subprocess.Popen([sys.executable, SCRIPT, *args], cwd=ROOT, env=_env(), stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, start_new_session=True)  # fmt: skip
    deadline = time.time() + timeout
    while not path.exists() and process.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    assert path.exists(), f"the run ended (or timed out) before {path} appeared"


def _weights(folder: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(folder / "model.safetensors")


@pytest.mark.slow
def test_training_resumed_after_kills_ends_with_the_weights_of_an_uninterrupted_round(killed_round, tmp_path,
                                                                                       tiny_policy):  # fmt: skip
    """killed_round trained policy and PPM in one go (after the search, in the same process, no checkpoints). Here
    the same round retrains them with checkpoints every 10 steps and is killed three times: in the policy's training
    (after its first checkpoint), right after the policy finished (the PPM then starts in a fresh process), and in
    the PPM's training (after its first checkpoint). The final weights must be those of the uninterrupted run."""
    import torch

    run_dir = _copy_run(killed_round, tmp_path)
    round_dir = run_dir / "round_1"
    command = [*SMALL, "--model_name_or_path", tiny_policy, "--output_dir", str(run_dir), "--save_steps", "10"]
    _kill_when([*command, "--redo", "policy"], round_dir / "policy" / "checkpoint-10" / "trainer_state.json")
    assert not (round_dir / "policy" / "DONE.json").exists()
    _kill_when(command, round_dir / "policy" / "DONE.json")
    assert not list((round_dir / "ppm").glob("checkpoint-*"))  # the PPM had not checkpointed yet
    _kill_when(command, round_dir / "ppm" / "checkpoint-10" / "trainer_state.json")
    assert not (round_dir / "ppm" / "DONE.json").exists()
    result = _round(command)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "[round 1] ppm: running (resumed)" in result.stdout
    assert json.loads((round_dir / "ppm" / "DONE.json").read_text())["resumed_from"].endswith("checkpoint-10")
    for stage in ("policy", "ppm"):
        expected, got = _weights(killed_round[0] / "round_1" / stage), _weights(round_dir / stage)
        assert expected.keys() == got.keys()
        for name in expected:
            assert torch.allclose(expected[name], got[name], rtol=0, atol=1e-6), (stage, name)


def test_model_initialisations_are_seeded(tiny_policy, tmp_path):
    """The PPM's new score head does not depend on what the process drew from the RNG before."""
    import torch
    from transformers import AutoTokenizer

    from rstar_trl.rounds import _load_ppm

    tokenizer = AutoTokenizer.from_pretrained(tiny_policy)
    first = _load_ppm(tiny_policy, 42, tokenizer).score.weight.detach().clone()
    torch.rand(1000)
    second = _load_ppm(tiny_policy, 42, tokenizer).score.weight.detach().clone()
    assert torch.equal(first, second)
    assert not torch.equal(first, _load_ppm(tiny_policy, 43, tokenizer).score.weight)


def _markerless_model(folder: Path) -> str:
    """A tiny Llama whose tokenizer lacks the step markers (as Qwen2.5-Math's does), with untied output embeddings."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    words = ["<pad>", "<unk>", "#", "x", "=", "1", "2", "+", "print", "(", ")", "\n"]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", unk_token="<unk>",
                                        eos_token="<pad>")  # fmt: skip
    config = LlamaConfig(vocab_size=len(words), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, tie_word_embeddings=False)  # fmt: skip
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


def test_lora_trains_the_embeddings_of_new_step_marker_tokens_and_merges_them(tmp_path):
    import torch
    from peft import get_peft_model

    from rstar_trl.format import STEP_MARKERS
    from rstar_trl.rounds import RoundModelConfig, _load_policy, _merge_adapter, _policy_peft_config

    base = _markerless_model(tmp_path / "base")
    tokenizer, model, added = _load_policy(base, seed=0)
    assert added == len(STEP_MARKERS) and model.get_input_embeddings().weight.shape[0] == len(tokenizer)
    lora = RoundModelConfig(use_peft=True, lora_r=4, lora_alpha=8)
    config = _policy_peft_config(lora, model, tokenizer, added)
    marker_ids = tokenizer.convert_tokens_to_ids(list(STEP_MARKERS))
    assert config.trainable_token_indices == {"model.embed_tokens": marker_ids, "lm_head": marker_ids}
    assert _policy_peft_config(lora, model, tokenizer, 0).trainable_token_indices is None  # markers already known
    peft_model = get_peft_model(model, config)
    optimizer = torch.optim.SGD([p for p in peft_model.parameters() if p.requires_grad], lr=1.0)
    ids = torch.tensor([[3, 4, 5, marker_ids[0], 8, 9, 3, 10, marker_ids[1]]])
    for _ in range(3):
        peft_model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    peft_model.eval()  # no LoRA dropout
    with torch.no_grad():
        trained = peft_model(input_ids=ids).logits
    folder = tmp_path / "policy"
    peft_model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    how = _merge_adapter(str(folder), lambda: _load_policy(base, 0, tokenizer)[1])
    assert how["method"] == "lora" and how["trainable_token_indices"]
    merged = type(model).from_pretrained(folder)
    _, untrained, _ = _load_policy(base, 0)
    with torch.no_grad():
        assert torch.allclose(merged(input_ids=ids).logits, trained, atol=1e-5)
        new_rows = merged.get_input_embeddings().weight[marker_ids]
        assert not torch.allclose(new_rows, untrained.get_input_embeddings().weight[marker_ids])


def test_lora_options_are_trl_model_config_options():
    from trl import ModelConfig, TrlParser

    from rstar_trl.rounds import RoundModelConfig

    types, reference_types = get_type_hints(RoundModelConfig), get_type_hints(ModelConfig)
    for name, option in RoundModelConfig.__dataclass_fields__.items():
        reference = ModelConfig.__dataclass_fields__[name]
        assert (types[name], option.default) == (reference_types[name], reference.default), name
    args, search, lora = TrlParser((RoundArguments, RoundSearchConfig, RoundModelConfig)).parse_args_and_config(
        ["--use_peft", "--lora_r", "4", "--lora_target_modules", "all-linear"])  # fmt: skip
    config = lora.peft_config("SEQ_CLS")
    assert (config.r, config.lora_alpha, config.task_type, config.target_modules) == (4, 32, "SEQ_CLS", "all-linear")
    assert RoundModelConfig().peft_config("CAUSAL_LM") is None


# -- planning and bad input: checked before any compute ------------------------------------------------------------


def test_later_rounds_search_with_the_previous_policy_and_from_round_three_its_ppm(tmp_path, tiny_policy):
    def finish(k: int) -> None:  # stand-ins for round k's policy and PPM (round k + 1 only reads their markers)
        for artifact in ("policy", "ppm"):
            (tmp_path / f"round_{k}" / artifact).mkdir(parents=True)
            (tmp_path / f"round_{k}" / artifact / "DONE.json").write_text("{}")
        (tmp_path / f"round_{k}" / "round.json").write_text(json.dumps({"base_model": tiny_policy}))

    finish(1)
    two = plan_round(*_args(tmp_path, round=2, limit=4))
    assert (two.search_policy, two.search_ppm, two.base_model) == (str(tmp_path / "round_1" / "policy"), None,
                                                                  tiny_policy)  # fmt: skip
    finish(2)
    three = plan_round(*_args(tmp_path, round=3, limit=4))
    assert three.search_policy == str(tmp_path / "round_2" / "policy")
    assert three.search_ppm == str(tmp_path / "round_2" / "ppm")
    assert three.base_model == tiny_policy  # every round fine-tunes the BASE model


def test_round_three_without_a_previous_ppm_is_refused(tmp_path, tiny_policy):
    (tmp_path / "round_2" / "policy").mkdir(parents=True)
    (tmp_path / "round_2" / "policy" / "DONE.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match=r"PPM-initialised Q .*round_2/ppm has not finished"):
        plan_round(*_args(tmp_path, round=3, base_model=tiny_policy))


def test_round_two_without_round_one_is_refused(tmp_path, tiny_policy):
    with pytest.raises(FileNotFoundError, match="run round 1 first or pass --model_name_or_path"):
        plan_round(*_args(tmp_path, round=2, base_model=tiny_policy))


def test_missing_paths_are_refused(tmp_path, tiny_policy):
    with pytest.raises(FileNotFoundError, match="--model_name_or_path './no/such/policy' does not exist"):
        plan_round(*_args(tmp_path, policy="./no/such/policy"))
    with pytest.raises(FileNotFoundError, match="--dataset .*missing.jsonl' does not exist"):
        plan_round(*_args(tmp_path, policy=tiny_policy, dataset=str(tmp_path / "missing.jsonl")))
    assert not (tmp_path / "round_1").exists()


def test_a_dataset_without_answers_is_refused(tmp_path, tiny_policy):
    path = tmp_path / "problems.jsonl"
    path.write_text("".join(json.dumps({"problem": f"What is {i} + 1?"}) + "\n" for i in range(3)))
    with pytest.raises(ValueError, match="answer"):
        plan_round(*_args(tmp_path, policy=tiny_policy, dataset=str(path)))


def test_push_without_an_org_is_refused(tmp_path, tiny_policy):
    with pytest.raises(ValueError, match="--hub_org"):
        plan_round(*_args(tmp_path, policy=tiny_policy, push_to_hub=True))


def test_unknown_config_keys_are_refused(tmp_path):
    from trl import TrlParser

    config = tmp_path / "round.yaml"
    config.write_text("round: 1\nnum_rolouts: 4\n")
    with pytest.raises(ValueError, match="num_rolouts"):
        TrlParser((RoundArguments, RoundSearchConfig)).parse_args_and_config(["--config", str(config)])


def test_the_script_stops_on_bad_input_before_any_compute(tmp_path):
    result = _round(["--output_dir", str(tmp_path / "run"), "--model_name_or_path", "./no/such/policy"], timeout=120)
    assert result.returncode != 0
    assert "error: --model_name_or_path './no/such/policy' does not exist" in result.stderr
    assert not (tmp_path / "run").exists()


def test_help_documents_every_option():
    from trl import TrlParser

    from rstar_trl.rounds import RoundModelConfig

    help_text = TrlParser((RoundArguments, RoundSearchConfig, RoundModelConfig)).format_help()
    options = (*RoundArguments.__dataclass_fields__, *RoundSearchConfig.__dataclass_fields__,
               *RoundModelConfig.__dataclass_fields__)  # fmt: skip
    for name in options:
        assert f"--{name}" in help_text, name
    for field in (*RoundArguments.__dataclass_fields__.values(), *RoundModelConfig.__dataclass_fields__.values()):
        assert field.metadata.get("help"), field.name
    assert "--redo" in help_text and "`all`" in help_text


def test_shipped_recipes_parse(tmp_path):
    from trl import TrlParser

    recipes = sorted((ROOT / "recipes").glob("tiny/round*.yaml")) + sorted(
        (ROOT / "recipes" / "rstar-math" / "qwen2.5-math-7b").glob("round*.yaml"))  # fmt: skip
    assert len(recipes) == 8
    for k, recipe in enumerate(recipes, start=1):
        args, search = TrlParser((RoundArguments, RoundSearchConfig)).parse_args_and_config(["--config", str(recipe)])
        assert args.round == (k - 1) % 4 + 1, recipe
        assert search.c_puct == 2.0 and search.max_depth == 16, recipe
        assert (args.round == 4) == bool(search.unsolved_rollouts), recipe


def test_dataset_folders_round_trip(tmp_path):
    from rstar_trl.hub import save_dataset_folder

    data = Dataset.from_dict({"prompt": ["a", "b"], "completion": ["c", "d"]})
    save_dataset_folder(data, str(tmp_path / "sft"), "card")
    assert load_dataset_folder(str(tmp_path / "sft")).to_dict() == data.to_dict()
    with pytest.raises(FileNotFoundError, match="not a dataset folder"):
        load_dataset_folder(str(tmp_path))
