"""recipes/generate.py for real: sharded over 2 processes with `accelerate launch`, and resumed after `kill -9`.

Both must end with exactly the dataset one uninterrupted process gives (trees depend only on settings, model and
problem, never on batching, sharding or restarts)."""

import glob
import json
import os
import signal
import subprocess
import sys
import time

import pytest
from datasets import load_from_disk

from rstar_trl.search.shards import ShardStore

pytestmark = pytest.mark.slow

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECIPE = os.path.join(ROOT, "recipes", "generate.py")


def _args(policy: str, output_dir: str, *extra: str) -> list[str]:
    return [RECIPE, "--model_name_or_path", policy, "--output_dir", output_dir, "--limit", "12",
            "--num_rollouts", "3", "--num_candidates", "3", "--max_step_tokens", "48", "--max_answer_tokens", "32",
            "--problems_in_flight", "4", "--torch_threads", "1", "--executor_workers", "1", "--seed", "0",
            *extra]  # fmt: skip


def _env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def _run(command: list[str]) -> None:
    result = subprocess.run(command, env=_env(), capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


def _same(a, b) -> None:
    assert a.column_names == b.column_names
    for column in a.column_names:
        assert a[column] == b[column], column


@pytest.fixture(scope="module")
def reference(tiny_policy, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("generate_one_process"))
    _run([sys.executable, *_args(tiny_policy, out)])
    trees = load_from_disk(os.path.join(out, "trees"))
    assert len(trees) == 12 and sum(trees["num_nodes"]) > 12
    return trees


def test_two_processes_return_the_one_process_dataset(tiny_policy, reference, tmp_path):
    out = str(tmp_path / "two")
    # `--multi_gpu` makes accelerate start the processes with torchrun; without CUDA they form a gloo (CPU) group.
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "2", "--multi_gpu",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]  # fmt: skip
    _run([*launch, *_args(tiny_policy, out, "--shard_size", "2")])
    shards = glob.glob(os.path.join(out, "shards", "*.jsonl"))
    assert {os.path.basename(p)[:7] for p in shards} == {"rank000", "rank001"}  # both processes searched
    rows = [json.loads(line) for p in shards for line in open(p)]
    assert sorted(r["index"] for r in rows) == list(range(12))  # each problem searched exactly once
    _same(load_from_disk(os.path.join(out, "trees")), reference)


def test_kill_9_then_rerun_gives_the_uninterrupted_dataset(tiny_policy, reference, tmp_path):
    out = str(tmp_path / "killed")
    command = [sys.executable, *_args(tiny_policy, out, "--shard_size", "1", "--problems_in_flight", "2")]
    proc = subprocess.Popen(command, env=_env(), cwd=ROOT, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    shard_dir = os.path.join(out, "shards")
    deadline = time.time() + 300
    while len(glob.glob(os.path.join(shard_dir, "*.jsonl"))) < 3:
        assert proc.poll() is None, "the run ended before it could be killed"
        assert time.time() < deadline, "no shards written in 300 s"
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    saved = len(glob.glob(os.path.join(shard_dir, "*.jsonl")))
    assert 3 <= saved < 12 and not os.path.exists(os.path.join(out, "trees"))

    _run(command)
    with open(os.path.join(out, "generate_stats.json")) as f:
        stats = json.load(f)["stats"]
    assert stats["problems_resumed"] == saved and stats["problems_searched"] == 12 - saved
    _same(load_from_disk(os.path.join(out, "trees")), reference)


def test_resuming_with_other_settings_is_refused(tmp_path):
    ShardStore(str(tmp_path), {"seed": 0, "num_rollouts": 8})
    with pytest.raises(ValueError, match=r"other settings \(num_rollouts: 8 -> 16\).*new output_dir"):
        ShardStore(str(tmp_path), {"seed": 0, "num_rollouts": 16})


def test_a_torn_shard_write_is_never_read(tmp_path):
    store = ShardStore(str(tmp_path), {"seed": 0}, shard_size=2)
    store.add({"index": 0, "x": 1})
    store.add({"index": 1, "x": 2})  # flushed: a whole shard
    with open(os.path.join(tmp_path, "shards", "rank000-dead-00009.jsonl.tmp"), "w") as f:
        f.write('{"index": 2, "x"')  # what a kill during a write leaves
    assert sorted(store.load()) == [0, 1]


SCRIPT = """
import json, sys
from rstar_trl import MCTSConfig, MCTSGenerator
from rstar_trl.tiny import tiny_splits, to_dataset

if __name__ == "__main__":
    policy, out = sys.argv[1], sys.argv[2]
    config = MCTSConfig(num_rollouts=3, num_candidates=3, max_step_tokens=48, max_answer_tokens=32,
                        problems_in_flight=4, torch_threads=1, executor_workers=1, seed=0)
    generator = MCTSGenerator(policy, config, to_dataset(tiny_splits()["train"][:12]))
    trees = generator.generate()
    if generator.state.is_main_process:
        trees.to_json(out)
"""


def test_two_processes_without_output_dir_gather_in_memory(tiny_policy, reference, tmp_path):
    script = tmp_path / "search.py"
    script.write_text(SCRIPT)
    out = str(tmp_path / "trees.jsonl")
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "2", "--multi_gpu",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]  # fmt: skip
    _run([*launch, str(script), tiny_policy, out])
    from datasets import Dataset

    _same(Dataset.from_json(out), reference.select_columns(Dataset.from_json(out).column_names))


GATHER_MAIN_SCRIPT = """
import sys
from rstar_trl import MCTSConfig, MCTSGenerator
from rstar_trl.tiny import tiny_splits, to_dataset

if __name__ == "__main__":
    policy, out, output_dir = sys.argv[1], sys.argv[2], sys.argv[3] or None
    config = MCTSConfig(num_rollouts=3, num_candidates=3, max_step_tokens=48, max_answer_tokens=32,
                        problems_in_flight=4, torch_threads=1, executor_workers=1, seed=0, gather_trees="main",
                        output_dir=output_dir, shard_size=2)
    generator = MCTSGenerator(policy, config, to_dataset(tiny_splits()["train"][:12]))
    generator.generate().to_json(f"{out}.rank{generator.state.process_index}.jsonl")
"""


@pytest.mark.parametrize("with_shards", [False, True], ids=["in-memory", "shards"])
def test_with_gather_trees_main_only_the_main_process_holds_the_trees(tiny_policy, reference, tmp_path, with_shards):
    from datasets import Dataset

    script = tmp_path / "search.py"
    script.write_text(GATHER_MAIN_SCRIPT)
    out = str(tmp_path / "trees")
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "2", "--multi_gpu",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]  # fmt: skip
    _run([*launch, str(script), tiny_policy, out, str(tmp_path / "shards") if with_shards else ""])
    main, other = Dataset.from_json(f"{out}.rank0.jsonl"), Dataset.from_json(f"{out}.rank1.jsonl")
    _same(main, reference.select_columns(main.column_names))
    assert all(tree is None for tree in other["tree"]) and all(t is None for t in other["best_trajectory"])
    for column in ("problem", "solved", "status", "rollouts", "num_nodes", "best_answer"):
        assert other[column] == reference[column], column


def test_two_processes_from_nothing_build_the_tiny_policy_once(tmp_path):
    # The README's 2-process CPU command without a model: the main process builds the tiny policy while the other
    # waits; the build's trainer joined the process group and both processes waited for each other forever.
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "2", "--multi_gpu", "--num_machines",
        "1", "--dynamo_backend", "no", "--mixed_precision", "no", RECIPE, "--output_dir", str(tmp_path),
        "--tiny_bootstrap_steps", "8", "--limit", "6", "--num_rollouts", "1", "--num_candidates", "2",
    ]  # fmt: skip
    result = subprocess.run(command, env=_env(), capture_output=True, text=True, timeout=420, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-4000:]
    assert json.loads((tmp_path / "tiny_policy" / "tiny_policy.json").read_text())["bootstrap_steps"] == 8
    assert len(load_from_disk(str(tmp_path / "trees"))) == 6
