"""`MCTSConfig` and `MCTSGenerator`: batched code-augmented MCTS over many problems at once (paper §3.2).

Many trees are in flight. Each *wave* advances every tree by one step of its current rollout, with one batched
call per stage for all trees together:

1. pick, in every tree, the leaf its rollout expands next (UCT descent for a new rollout);
2. ONE generation call: `num_candidates` next steps for every such leaf;
3. ONE `run_batch`: the cumulative program of every new candidate (failing code never becomes a node; the rule is
   `steps.check_completion` / `steps.check_execution`, shared with the evaluation);
4. ONE generation call for the answers of candidates that closed their program (after the executor's output);
5. ONE scoring call (if a PPM is given) for the new nodes rollouts can pass through (Eq. 3), then terminal rewards
   and back-propagation (Eq. 2).

A rollout is one descent from the root to a terminal node, one step per wave, expanding every node it passes; an
expansion none of whose candidates survives is retried with fresh seeds within the same rollout. See
docs/method.md for every rule and how it compares with the paper and the official code.

Pipeline lanes (`MCTSConfig.pipeline_lanes`): the trees in flight are split into lanes, each running these waves
in its own thread; the lanes share the engine (the transformers backend, vLLM's offline engine and a server decode
their calls in one running batch) and take turns with the PPM, so one lane's generation
overlaps another's execution, grading and scoring. Every seed is per tree, so the trees do not depend on the lanes.

Search passes (round 4, paper §3.4.2: problems still unsolved after 16 rollouts are searched again with 64, then
128): with `MCTSConfig.unsolved_rollouts`, a problem whose pass ends unsolved joins the queue for its next pass,
a fresh search, at once and in the same run, so the trees in flight stay full until the last pass of the last
problem ends (a pass-by-pass loop would idle while the slowest trees of a pass finish).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
import time
from collections import Counter, deque
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from typing import Protocol

import torch
from datasets import Dataset
from tqdm.auto import tqdm

from ..closing import Closeable
from ..executor import PythonExecutor
from ..format import (
    ANSWER_STOP_STRINGS,
    FEW_SHOT_PROMPT,
    OUTPUT_END,
    OUTPUT_START,
    POLICY_PROMPT,
    STEP_STOP_STRINGS,
    Step,
    build_program,
    format_prompt,
)
from ..grading import extract_answer, grade_answer
from .backends import GenerationBackend, TransformersBackend, mix_seed
from .shards import ShardStore, pass_of
from .steps import check_completion, check_execution, closes_program, needs_execution
from .tree import Node, SearchTree

logger = logging.getLogger(__name__)

PROMPT_TEMPLATES = {"policy": POLICY_PROMPT, "few_shot": FEW_SHOT_PROMPT}
BACKENDS = ("transformers", "vllm", "server")
DEAD_END_BACKUPS = ("node", "path")


def _gold_is_gradable(gold: str) -> bool:
    """Whether answers can be graded against `gold`: its braces balance (LaTeX that does not is cut off or
    malformed, and would grade only by string equality) and it grades equal to itself."""
    depth = 0
    for char in gold.replace("\\{", "").replace("\\}", ""):
        depth += (char == "{") - (char == "}")
        if depth < 0:
            return False
    return depth == 0 and grade_answer(gold, gold)


class StepScorer(Protocol):
    """Anything that values partial solutions in [-1, 1] (the PPM). One call scores a whole batch."""

    def score(self, questions: list[str], partial_solutions: list[str]) -> list[float]: ...


@dataclass
class MCTSConfig:
    """Settings of `MCTSGenerator`.

    > Parameters that control the search

    Args:
        num_rollouts: rollouts per problem (paper §3.4: 8 in round 1, 16 in rounds 2-4).
        unsolved_rollouts: round 4 (paper §3.4.2: 64, then 128): rollout budgets of fresh searches of the problems
            still unsolved after the previous pass, one pass per entry, each with a new seed (seed + pass number).
            A problem joins the queue for its next pass as soon as its pass ends, within the same run; its row is
            that of its last pass (`search_pass`). Only problems with a gold answer get extra passes: without one
            (test time) whether a tree solved its problem is not known.
        num_candidates: candidate next steps sampled per expansion (5 in round 1, 8 in rounds 2-3, 16 in round 4).
        c_puct: exploration constant c of UCT(s) = Q(s) + c * sqrt(ln N_parent / N(s)).
        max_depth: steps after which a node is terminal with reward -1.
        max_consecutive_errors: attempts at expanding a leaf within one rollout (fresh seeds each) before a leaf
            none of whose candidates survived becomes a dead end.
        dead_end_backup: where a dead end's -1 goes: "node" (that node only) or "path" (backed up to the root).
        allow_unexecuted_answers: keep answers written without a closed, executed program (policies that do not
            write code); by default they are dropped (`dropped_unexecuted_answer`).
        problems_in_flight: trees searched at once; every wave batches all their expansions.
        pipeline_lanes: the trees in flight are split into this many lanes, each running its own waves, that share
            the generation engine: while one lane's candidates are executed, graded and scored, another lane
            generates, so the engine does not wait for those stages. Every backend decodes the calls of several lanes
            in one running batch (continuous batching). 1: one wave of all trees at a time. The
            trees are the same for any number of lanes (every seed is per tree) as long as a sequence's samples do
            not depend on its batch neighbours; see docs/method.md. With lanes, answers are graded in the lanes'
            threads, where `rstar_trl.grading`'s time limit is a watchdog rather than a signal.

    > Parameters that control generation

    Args:
        backend: generation engine: "transformers", "vllm" (offline `vllm.LLM`) or "server" (an OpenAI-compatible
            completions server such as `vllm serve`, at `server_url`).
        max_step_tokens: token budget of one step.
        max_answer_tokens: token budget of the answer written after the program's output.
        temperature: sampling temperature.
        top_p: nucleus sampling threshold.
        generation_batch_size: sequences per `generate` call (transformers backend).
        device: device of the transformers backend (default: CUDA when available).
        torch_threads: CPU threads torch may use (small models generate fastest with 1).
        prefix_cache_mb: memory for the KV cache of prefixes already encoded (transformers backend; 0: off).
        dtype: dtype when the model is loaded from a path.
        tensor_parallel_size: GPUs one vLLM engine spans.
        gpu_memory_utilization: share of GPU memory vLLM reserves (on CPU: share of RAM).
        max_model_len: vLLM context length (default: the model's).
        enable_prefix_caching: vLLM automatic prefix caching (siblings share long prefixes).
        server_url: base URL of the generation server (backend="server").
        server_model: served model name (default: the server's first).
        server_concurrency: requests in flight to the server.
        server_max_retries: retries of a request to a generation or PPM server that fails transiently (with
            exponential back-off).
        seed: seed of all sampling. Each expansion's seed derives from (seed, problem index, node), so a
            problem's tree does not depend on batching, sharding over processes or resuming.
        prompt_template: "policy" (fine-tuned policies), "few_shot" (round-1 bootstrap model) or a template
            string with a `{question}` field.

    > Parameters that control saving and resuming

    Args:
        output_dir: if set, finished trees are written here in shards as they complete (per process) and a
            re-run with the same settings skips them; the final dataset is identical to an uninterrupted run.
        shard_size: finished trees per shard file.
        gather_trees: under a multi-process launch, "all" (every process gets every tree back) or "main" (only the
            main process does; the others get the same rows with `tree` and `best_trajectory` left empty, enough
            to see which problems are solved, so they never hold every tree in memory).

    > Parameters that control code execution

    Args:
        executor_timeout: seconds a step's program may run.
        executor_memory_mb: memory a sandbox worker may add to its start-up footprint.
        executor_workers: sandbox worker processes (default: the CPUs divided by the processes of the launch on
            this node).
    """

    num_rollouts: int = field(default=8, metadata={"help": "Rollouts per problem (paper: 8 in round 1, 16 later)."})
    unsolved_rollouts: list[int] = field(
        default_factory=list,
        metadata={"help": "Extra searches of the problems still unsolved, one per entry, each with this many "
                  "rollouts and a new seed (round 4 of the paper: 64 128). A problem unsolved after a pass joins "
                  "the queue for the next one at once, in the same run. Needs gold answers."},
    )  # fmt: skip
    num_candidates: int = field(
        default=5, metadata={"help": "Candidate next steps sampled per expansion (paper: 5, 8, 16 by round)."}
    )
    c_puct: float = field(default=2.0, metadata={"help": "Exploration constant c of UCT (paper: 2)."})
    max_depth: int = field(default=16, metadata={"help": "Steps after which a node is terminal with reward -1."})
    max_consecutive_errors: int = field(
        default=3,
        metadata={"help": "Attempts at expanding a leaf, within one rollout and with fresh seeds, before a leaf no "
                  "candidate of which survived becomes a dead end (terminal, value -1)."},
    )  # fmt: skip
    dead_end_backup: str = field(
        default="node",
        metadata={"help": "Where a dead end's -1 goes (too deep, expansions that keep failing, context full): 'node' "
                  "(that node only, as the official code does) or 'path' (backed up to the root like an answer).",
                  "choices": list(DEAD_END_BACKUPS)},
    )  # fmt: skip
    allow_unexecuted_answers: bool = field(
        default=False,
        metadata={"help": "Keep candidates that write <answer> without a closed, executed program (for policies that "
                  "do not write code). By default they are dropped and counted as dropped_unexecuted_answer."},
    )  # fmt: skip
    problems_in_flight: int = field(
        default=256, metadata={"help": "Trees searched at once; each wave batches all their expansions."}
    )
    pipeline_lanes: int = field(
        default=1,
        metadata={"help": "Split the trees in flight into this many lanes that share the generation engine: while "
                  "one lane's candidates are executed, graded and scored, another lane generates (every backend "
                  "decodes the lanes' calls in one running batch). 1: one wave "
                  "of all trees at a time. Seeds are per tree, so the trees do not depend on it as long as a "
                  "sequence's results do not depend on its batch neighbours (docs/method.md)."},
    )  # fmt: skip
    backend: str = field(
        default="transformers",
        metadata={"help": "Generation engine: 'transformers', 'vllm' (offline engine) or 'server' (an "
                  "OpenAI-compatible completions server such as `vllm serve`, see --server_url).",
                  "choices": list(BACKENDS)},
    )  # fmt: skip
    max_step_tokens: int = field(default=256, metadata={"help": "Token budget of one step."})
    max_answer_tokens: int = field(
        default=64, metadata={"help": "Token budget of the answer written after the program's output."}
    )
    temperature: float = field(default=0.8, metadata={"help": "Sampling temperature."})
    top_p: float = field(default=0.95, metadata={"help": "Nucleus sampling threshold."})
    generation_batch_size: int = field(
        default=256, metadata={"help": "Sequences per generate call (transformers backend)."}
    )
    device: str | None = field(default=None, metadata={"help": "Device for the transformers backend (default: auto)."})
    torch_threads: int | None = field(
        default=None,
        metadata={"help": "CPU threads torch may use (transformers backend on CPU). Small models generate fastest "
                  "with 1, and fewer threads leave cores to the sandbox workers. Default: torch's own choice."},
    )  # fmt: skip
    prefix_cache_mb: float = field(
        default=1024,
        metadata={"help": "Transformers backend: memory (MB, on the generation device) for the KV cache of prefixes "
                  "already encoded, and as much again for those of a transformers PPM. A node's children, retries and "
                  "answers then encode only their new tokens, and its children's PPM values only their step. 0: off."},
    )  # fmt: skip
    dtype: str = field(
        default="auto", metadata={"help": "Model dtype when loading from a path: auto/float32/bfloat16."}
    )
    tensor_parallel_size: int = field(default=1, metadata={"help": "vLLM: GPUs one engine spans."})
    gpu_memory_utilization: float | None = field(
        default=None,
        metadata={"help": "vLLM: share of GPU memory to reserve (on CPU: share of RAM, weights included). Default: "
                  "0.9 on a GPU, on CPU 0.15 or half the free RAM, whichever is less."},
    )  # fmt: skip
    max_model_len: int | None = field(default=None, metadata={"help": "vLLM: context length (default: model's)."})
    enable_prefix_caching: bool = field(
        default=True, metadata={"help": "vLLM: automatic prefix caching (sibling nodes share long prefixes)."}
    )
    server_url: str | None = field(
        default=None, metadata={"help": "backend='server': base URL of the completions server, e.g. http://host:8000."}
    )
    server_model: str | None = field(
        default=None, metadata={"help": "backend='server': served model name (default: the server's first)."}
    )
    server_concurrency: int = field(default=64, metadata={"help": "backend='server': requests in flight."})
    server_max_retries: int = field(
        default=5,
        metadata={
            "help": "backend='server', and a PPM server (--ppm_server_url): retries of a request that fails "
            "transiently (exponential back-off)."
        },
    )
    seed: int = field(
        default=42,
        metadata={"help": "Seed of all sampling. Each expansion's seed derives from (seed, problem, node): a tree "
                  "does not depend on batching, process count or resuming (same model + machine: same trees)."},
    )  # fmt: skip
    output_dir: str | None = field(
        default=None,
        metadata={"help": "Write finished trees here in shards as they complete; a re-run skips them (resumable)."},
    )
    shard_size: int = field(default=64, metadata={"help": "Finished trees per shard file (with output_dir)."})
    gather_trees: str = field(
        default="all",
        metadata={"help": "Multi-process: 'all' processes get every tree back, or only the 'main' one (the others "
                  "get the rows without `tree` / `best_trajectory`, so they never hold every tree in memory).",
                  "choices": ["all", "main"]},
    )  # fmt: skip
    prompt_template: str = field(
        default="policy",
        metadata={"help": "'policy', 'few_shot' (round-1 bootstrap model) or a template with a {question} field."},
    )
    executor_timeout: float = field(default=10.0, metadata={"help": "Seconds a step's program may run."})
    executor_memory_mb: int = field(default=1024, metadata={"help": "Memory (MB) a sandbox worker may allocate."})
    executor_workers: int | None = field(
        default=None,
        metadata={"help": "Sandbox worker processes (default: the CPUs divided by the processes on this node)."},
    )

    def __post_init__(self):
        for name in ("num_rollouts", "num_candidates", "max_depth", "problems_in_flight", "max_step_tokens",
                     "pipeline_lanes"):  # fmt: skip
            if getattr(self, name) < 1:
                raise ValueError(f"MCTSConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.pipeline_lanes > self.problems_in_flight:
            raise ValueError(
                f"MCTSConfig.pipeline_lanes ({self.pipeline_lanes}) splits the problems in flight "
                f"({self.problems_in_flight}) into lanes: it cannot exceed problems_in_flight"
            )
        self.unsolved_rollouts = list(self.unsolved_rollouts or [])  # a tuple would not match run.json's list
        bad = [n for n in self.unsolved_rollouts if isinstance(n, bool) or not isinstance(n, int) or n < 1]
        if bad:
            raise ValueError(
                f"MCTSConfig.unsolved_rollouts holds the rollout count of each extra pass, integers >= 1; got "
                f"{self.unsolved_rollouts} ({bad[0]!r} is not)"
            )
        if self.max_consecutive_errors < 1:
            raise ValueError(f"MCTSConfig.max_consecutive_errors must be >= 1, got {self.max_consecutive_errors}")
        if self.dead_end_backup not in DEAD_END_BACKUPS:
            raise ValueError(
                f"MCTSConfig.dead_end_backup must be one of {list(DEAD_END_BACKUPS)}, got {self.dead_end_backup!r}"
            )
        if self.backend not in BACKENDS:
            raise ValueError(f"MCTSConfig.backend must be one of {list(BACKENDS)}, got {self.backend!r}")
        if self.backend == "server" and not self.server_url:
            raise ValueError("MCTSConfig.backend='server' needs server_url (e.g. http://127.0.0.1:8000)")
        if self.prompt_template not in PROMPT_TEMPLATES and "{question}" not in self.prompt_template:
            raise ValueError("MCTSConfig.prompt_template must be 'policy', 'few_shot' or contain '{question}'")

    @property
    def template(self) -> str:
        return PROMPT_TEMPLATES.get(self.prompt_template, self.prompt_template)


@dataclass
class _Search:
    """The state of one search of a problem: its tree, its pass's budget and seed, and where its current rollout is.

    `seed` is the run's seed plus the pass number: pass 0 keeps the seeds a run without extra passes uses, and pass
    p > 0 seeds from (seed + p, the problem's index in the whole dataset, node). (Earlier versions ran each pass as
    a separate run over the unsolved problems, with the index within that subset: their pass p > 0 trees differ.)"""

    index: int
    tree: SearchTree
    prompt: str
    num_rollouts: int
    seed: int
    pass_number: int = 0
    cursor: Node | None = None
    rollouts: int = 0

    def next_leaf(self) -> Node | None:
        """The node this tree expands in the coming wave, or None when its search is over."""
        if self.cursor is None:
            if self.rollouts >= self.num_rollouts or not self.tree.root.selectable():
                return None
            self.cursor = self.tree.select_leaf()
        return self.cursor

    def end_rollout(self) -> None:
        self.rollouts += 1
        self.cursor = None


class _Run:
    """What the lanes of one `generate` share: the queue of searches, the finished rows, the shard store and the
    progress bar, all behind `lock`; `stop` tells every lane to stop after its current wave."""

    def __init__(self, queue: deque, finished: dict, store: ShardStore | None, progress, lanes: int):
        self.queue, self.finished, self.store, self.progress = queue, finished, store, progress
        self.solved = 0
        self.in_flight = [0] * lanes  # per lane
        self.lock = threading.Lock()
        self.stop = threading.Event()


def _join(pool: ThreadPoolExecutor) -> None:
    """Wait for the lanes to end their current wave, even through more Ctrl-C's: the shards are written and the
    sandbox closed only once no lane is left to touch them."""
    while True:
        try:
            pool.shutdown(wait=True)
            return
        except KeyboardInterrupt:
            logger.warning("MCTS: waiting for the lanes to end their current wave; then the finished trees are saved")


def _lock_unless(unneeded: bool):
    return nullcontext() if unneeded else threading.Lock()


@dataclass
class _Candidate:
    search: _Search
    leaf: Node
    text: str
    tokens: int
    sample: int = 0
    step: Step | None = None
    output: str = ""

    @property
    def final(self) -> bool:
        return self.step is not None and self.step.is_final

    @property
    def answer_seed_parts(self) -> tuple[int, ...]:
        return (self.search.index, self.leaf.id, self.leaf.failed_expansions, self.sample, 1)


# Settings a tree depends on (a resumed run must use the same); the rest (batching, devices, workers) do not.
_TREE_SETTINGS = ("num_rollouts", "unsolved_rollouts", "num_candidates", "c_puct", "max_depth",
                  "max_consecutive_errors", "dead_end_backup", "allow_unexecuted_answers", "backend",
                  "max_step_tokens", "max_answer_tokens", "temperature", "top_p", "seed", "prompt_template",
                  "executor_timeout", "executor_memory_mb")  # fmt: skip
# Tree settings newer than some output_dirs: a run.json written without one was searched with this value.
_SETTINGS_ADDED_LATER = {"unsolved_rollouts": []}


def _claim_gpus(local_rank: int, per_process: int) -> None:
    """Give this process's vLLM engine its own GPUs (local rank r: GPUs r*tp .. r*tp+tp-1 of those visible).

    vLLM's engine core runs in a process it spawns, which reads CUDA_VISIBLE_DEVICES when it starts; without this,
    every process's engine would land on the first GPU. (Not exercised by the test suite: no GPU here.)"""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    ids = visible.split(",") if visible else [str(i) for i in range(torch.cuda.device_count())]
    mine = ids[local_rank * per_process : (local_rank + 1) * per_process]
    if len(mine) < per_process:
        raise ValueError(
            f"process {local_rank} needs {per_process} GPU(s) (tensor_parallel_size) but only {len(ids)} are visible "
            f"for all processes of this node: launch fewer processes or lower tensor_parallel_size"
        )
    os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(mine)


def _model_id(backend: GenerationBackend) -> str:
    """What model a backend runs (path or name where it can tell), for the resume fingerprint."""
    for candidate in (
        getattr(getattr(getattr(backend, "model", None), "config", None), "name_or_path", None),  # transformers
        getattr(getattr(getattr(getattr(backend, "llm", None), "llm_engine", None), "model_config", None), "model",
                None),  # vLLM
        getattr(backend, "model", None) if isinstance(getattr(backend, "model", None), str) else None,  # server
    ):  # fmt: skip
        if candidate:
            return str(candidate)
    return type(backend).__name__


def process_device(state, args: MCTSConfig, model) -> str | None:
    """The device of this process's backend under `accelerate launch` on several GPUs (its own GPU; a vLLM engine
    gets its share of GPUs claimed), or None to leave it to `args.device`."""
    if state.num_processes == 1 or args.device is not None or not torch.cuda.is_available():
        return None
    if args.backend == "vllm" and not isinstance(model, GenerationBackend):
        _claim_gpus(state.local_process_index, args.tensor_parallel_size)
    return f"cuda:{state.local_process_index}"


def build_backend(model, args: MCTSConfig, processing_class=None, device: str | None = None) -> GenerationBackend:
    """The generation backend `args.backend` names, for `model` (a path / Hub id, or a loaded model for
    transformers)."""
    if isinstance(model, GenerationBackend):
        return model
    if args.backend == "transformers":
        return TransformersBackend(
            model, processing_class, device=device or args.device, dtype=args.dtype,
            batch_size=args.generation_batch_size, torch_threads=args.torch_threads,
            prefix_cache_mb=args.prefix_cache_mb,
        )  # fmt: skip
    if args.backend == "vllm":
        from .vllm_backend import VLLMBackend

        if not isinstance(model, str) and type(model).__name__ != "LLM":
            raise TypeError(
                "backend='vllm' loads its own weights: pass a model path or Hub id (save a loaded model with "
                "save_pretrained first) or a vllm.LLM"
            )
        tokenizer = processing_class if isinstance(processing_class, str) else None
        return VLLMBackend(
            model, tokenizer=tokenizer, tensor_parallel_size=args.tensor_parallel_size,
            gpu_memory_utilization=args.gpu_memory_utilization, max_model_len=args.max_model_len, dtype=args.dtype,
            enable_prefix_caching=args.enable_prefix_caching, seed=args.seed,
        )  # fmt: skip
    from .server_backend import OpenAIServerBackend

    return OpenAIServerBackend(
        args.server_url, model=args.server_model, tokenizer=processing_class,
        concurrency=args.server_concurrency, max_retries=args.server_max_retries,
    )  # fmt: skip


def _light(row: dict) -> dict:
    """A result row without its heavy columns (the tree JSON and the best trajectory)."""
    return {**row, "tree": None, "best_trajectory": None}


class MCTSGenerator(Closeable):
    """Generate MCTS search trees (and their Q-labelled steps) for a dataset of problems.

    Args:
        model: the policy: a path or Hub id, a loaded causal LM, or a ready `GenerationBackend`.
        args: the search settings.
        train_dataset: problems with a `problem` column and (unless a PPM scores terminal nodes) an `answer` column.
        processing_class: the tokenizer (needed when `model` is a loaded model).
        ppm: an optional `StepScorer`. New nodes then start from its value (Eq. 3), and problems without a gold
            answer are searched in test-time mode (terminal nodes valued by the scorer).

    Example:
        >>> generator = MCTSGenerator("path/to/policy", MCTSConfig(num_rollouts=8), train_dataset=problems)
        >>> trees = generator.generate()  # datasets.Dataset, one row per problem
    """

    def __init__(self, model, args: MCTSConfig | None = None, train_dataset: Dataset | None = None,
                 processing_class=None, ppm: StepScorer | None = None):  # fmt: skip
        self.args = args or MCTSConfig()
        self.ppm = ppm
        self.dataset = self._check_dataset(train_dataset, test_time=ppm is not None)
        from accelerate import PartialState

        # Under `accelerate launch --num_processes N`, each process searches every N-th problem with its own
        # backend on its own device; a plain `python` run is one process.
        # cpu=True on machines without CUDA: torchrun-launched processes then form a gloo group (MULTI_CPU).
        self.state = PartialState(cpu=not torch.cuda.is_available())
        self.backend = build_backend(model, self.args, processing_class, process_device(self.state, self.args, model))
        self._owns_backend = self.backend is not model
        self.model_name = model if isinstance(model, str) else _model_id(self.backend)
        self.stats: dict[str, float] = {}

    def close(self) -> None:
        """Release the backend this generator built (a vLLM engine's process and memory); a backend passed in is
        left to its owner. Also done on leaving a `with MCTSGenerator(...) as generator:` block."""
        if self._owns_backend:
            self.backend.close()
            self._owns_backend = False

    @staticmethod
    def _check_dataset(dataset, test_time: bool) -> Dataset:
        if dataset is None:
            raise ValueError("MCTSGenerator needs train_dataset: a datasets.Dataset with 'problem' and 'answer'")
        if not isinstance(dataset, Dataset):
            raise TypeError(f"train_dataset must be a datasets.Dataset, got {type(dataset).__name__}")
        if len(dataset) == 0:
            raise ValueError("train_dataset is empty: there are no problems to search")
        required = ["problem"] if test_time else ["problem", "answer"]
        missing = [c for c in required if c not in dataset.column_names]
        if missing:
            raise ValueError(
                f"train_dataset is missing the column(s) {missing}; it has {dataset.column_names}. "
                "Rename them (dataset.rename_column) or load benchmark files with rstar_trl.load_problems"
            )
        return dataset

    # -- the search loop ----------------------------------------------------------------------------------

    def generate(self) -> Dataset:
        """Search every problem; returns one row per problem, in input order (see the README for the columns).

        With `args.output_dir`, finished trees are saved in shards as they complete and problems already saved
        there are skipped (a problem whose saved pass ended unsolved, with passes left, goes on with its next pass).
        Under `accelerate launch`, every process searches its share and gets the whole dataset back (with
        `gather_trees="main"`, the others get it without the trees); a problem's passes all run in its process."""
        args = self.args
        rank, world = self.state.process_index, self.state.num_processes
        counts: Counter[str] = Counter()
        timers = Counter()
        start = time.perf_counter()
        searches: list[_Search | None] = [None] * len(self.dataset)
        status = ["searched"] * len(self.dataset)
        ready = [s for s in self._prepare(searches, status, counts) if s.index % world == rank]
        store = None
        done: dict[int, dict] = {}
        if args.output_dir:
            store = ShardStore(args.output_dir, self._fingerprint(), rank=rank, shard_size=args.shard_size,
                               defaults=_SETTINGS_ADDED_LATER)  # fmt: skip
            done = store.load()
            counts["problems_resumed"] = 0
        queue: deque[_Search] = deque()
        for search in ready:
            row = done.get(search.index)
            if row is None:
                queue.append(search)
                continue
            resumed = self._next_pass(search, pass_of(row), row["solved"])
            if resumed is None:
                counts["problems_resumed"] += 1
            else:  # its saved pass ended unsolved: the next pass, not pass 0 again
                counts[f"problems_resumed_for_pass{resumed.pass_number}"] += 1
                queue.appendleft(resumed)
        finished: dict[int, dict] = {}
        executor = PythonExecutor(
            timeout=args.executor_timeout, memory_mb=args.executor_memory_mb, max_workers=args.executor_workers
        )
        progress = tqdm(
            total=sum(s.num_rollouts for s in queue), desc="MCTS rollouts" + (f" [rank {rank}]" if world > 1 else ""),
            unit="rollout", disable=not self.state.is_local_main_process,
        )  # fmt: skip
        lanes = args.pipeline_lanes
        run = _Run(queue, finished, store, progress, lanes)
        sizes = [args.problems_in_flight // lanes + (i < args.problems_in_flight % lanes) for i in range(lanes)]
        lane_counts, lane_timers = [Counter() for _ in sizes], [Counter() for _ in sizes]
        # Lanes share the engine (and the PPM) through a lock, so a lane's call never interleaves with another's;
        # backends that take concurrent calls (a server) go without one.
        self._engine_lock = _lock_unless(lanes == 1 or getattr(self.backend, "concurrent_calls", False))
        self._scorer_lock = _lock_unless(lanes == 1 or getattr(self.ppm, "concurrent_calls", False))
        waves = 0
        try:
            if lanes == 1:
                waves = self._lane(0, sizes[0], run, executor, lane_counts[0], lane_timers[0])
            else:
                pool = ThreadPoolExecutor(lanes, thread_name_prefix="mcts-lane")
                futures = [pool.submit(self._stopping_lane, lane, size, run, executor, lane_counts[lane],
                                       lane_timers[lane]) for lane, size in enumerate(sizes)]  # fmt: skip
                try:
                    wait(futures, return_when=FIRST_EXCEPTION)
                finally:
                    run.stop.set()  # a lane failed, or Ctrl-C: the others stop after their current wave
                    _join(pool)
                waves = sum(future.result() for future in futures)  # re-raises a lane's error
        finally:
            progress.close()
            executor.close()
            if store is not None:
                store.flush()  # whatever finished is kept, even when the search stops on an error
            for lane_count, lane_timer in zip(lane_counts, lane_timers):
                counts.update(lane_count)
                timers.update(lane_timer)
        total = time.perf_counter() - start
        self.stats = self._report(counts, timers, total, waves)
        rows = self._collect(store, finished, done)
        for i, search in enumerate(searches):
            if status[i] != "searched":
                rows[i] = self._row(search, status[i])
        missing = [i for i in range(len(self.dataset)) if i not in rows]
        if missing:
            raise RuntimeError(f"no search result for problem(s) {missing[:10]} (of {len(missing)} missing)")
        return self._to_dataset([rows[i] for i in range(len(self.dataset))])

    def _stopping_lane(self, lane: int, slots: int, run: _Run, *rest) -> int:
        """`_lane` in a thread of its own: an error in it stops the other lanes after their current wave."""
        try:
            return self._lane(lane, slots, run, *rest)
        except BaseException:
            run.stop.set()
            raise

    def _lane(self, lane: int, slots: int, run: _Run, executor: PythonExecutor, counts: Counter,
              timers: Counter) -> int:  # fmt: skip
        """Lane number `lane`: run waves over up to `slots` trees at once, taking problems from the shared queue,
        until the queue is empty and this lane's trees are done (or `run.stop` is set). Returns its waves."""
        active: list[_Search] = []
        waves = 0
        while not run.stop.is_set():
            # Trees still searching first, then new ones from the queue into every free slot, in this same wave:
            # a search that ends (and the next pass it may queue) leaves no slot idle for a wave.
            waiting, active = deque(active), []
            expansions: list[tuple[_Search, Node]] = []
            while waiting or len(active) < slots:
                if waiting:
                    search = waiting.popleft()
                else:
                    with run.lock:
                        search = run.queue.popleft() if run.queue else None
                    if search is None:
                        break
                leaf = search.next_leaf()
                if leaf is not None:
                    expansions.append((search, leaf))
                    active.append(search)
                    continue
                with run.lock:
                    run.progress.update(search.num_rollouts - min(search.rollouts, search.num_rollouts))
                    following = self._end_search(search, counts, run.finished, run.store)
                    if following is not None:
                        # First in the queue: the longer searches of later passes start as early as they can, so the
                        # run does not end waiting for one of them while the other slots sit empty.
                        run.queue.appendleft(following)
                        run.progress.total += following.num_rollouts
                        run.progress.refresh()
                    else:
                        run.solved += search.tree.solved
            if not expansions:  # nothing in flight and nothing queued
                run.in_flight[lane] = 0
                return waves
            rollouts_before = sum(s.rollouts for s in active)
            self._wave(expansions, executor, counts, timers)
            waves += 1
            with run.lock:
                run.in_flight[lane] = len(active)
                run.progress.update(sum(s.rollouts for s in active) - rollouts_before)
                run.progress.set_postfix(solved=run.solved, in_flight=sum(run.in_flight), queued=len(run.queue))
        return waves

    def _end_search(self, search: _Search, counts: Counter, finished: dict[int, dict],
                    store: ShardStore | None) -> _Search | None:  # fmt: skip
        """Record a search that is over: its row is saved (every pass's, so a resumed run knows where a problem
        stands) and counted per pass. Returns the search of the problem's next pass, or None when this one was its
        last: then its row is the problem's result and `problems_searched` / `problems_solved` count it once."""
        number, solved = search.pass_number, search.tree.solved
        counts[f"problems_searched_pass{number}"] += 1
        counts[f"problems_solved_pass{number}"] += solved
        row = self._row(search, "searched")
        if store is not None:
            store.add(row)
        following = self._next_pass(search, number, solved)
        if following is None:
            counts["problems_searched"] += 1
            counts["problems_solved"] += solved
            finished[search.index] = row
        return following

    def _next_pass(self, search: _Search, ended_pass: int, solved: bool) -> _Search | None:
        """A fresh search of `search`'s problem for the pass after `ended_pass` (paper §3.4.2: a new tree, the next
        budget of `unsolved_rollouts`, seed + pass number), or None: the problem is solved, has no passes left, or
        has no gold answer (at test time `SearchTree.solved` is always False: "unsolved" is not known)."""
        budgets = self.args.unsolved_rollouts
        if solved or ended_pass >= len(budgets) or search.tree.gold_answer is None:
            return None
        tree = SearchTree(search.tree.question, search.tree.gold_answer, self.args.c_puct)
        number = ended_pass + 1
        return _Search(search.index, tree, search.prompt, budgets[ended_pass], self.args.seed + number, number)

    def _collect(self, store: ShardStore | None, finished: dict[int, dict], done: dict[int, dict]) -> dict:
        """Every process's rows: from the shards on disk (shared filesystem) or, without output_dir, gathered.
        With `gather_trees="main"` the other processes keep only the rows' light columns (`_light`)."""
        if self.state.num_processes == 1:
            return {**done, **finished}
        self.state.wait_for_everyone()
        light = self.args.gather_trees == "main" and not self.state.is_main_process
        if store is not None:
            return store.load(transform=_light if light else None)
        from accelerate.utils import gather_object

        if self.args.gather_trees == "all":
            return {row["index"]: row for row in gather_object(list(finished.values()))}
        import torch.distributed as dist

        rows = {row["index"]: row for row in gather_object([_light(row) for row in finished.values()])}
        parts = [None] * self.state.num_processes if self.state.is_main_process else None
        dist.gather_object(list(finished.values()), parts, dst=0)  # the trees go to the main process only
        if parts is not None:
            rows = {row["index"]: row for part in parts for row in part}
        return rows

    def _fingerprint(self) -> dict:
        problems = json.dumps(
            [[str(p), None if a is None else str(a)] for p, a in zip(
                self.dataset["problem"],
                self.dataset["answer"] if "answer" in self.dataset.column_names else [None] * len(self.dataset))]
        )  # fmt: skip
        return {
            **{name: getattr(self.args, name) for name in _TREE_SETTINGS},
            "model": self.model_name,
            "ppm": type(self.ppm).__name__ if self.ppm is not None else None,
            "num_problems": len(self.dataset),
            "problems_sha256": hashlib.sha256(problems.encode()).hexdigest(),
        }

    def _prepare(self, searches: list, status: list[str], counts: Counter) -> list[_Search]:
        """Build one search per problem; problems that cannot be searched are counted and left unsolved."""
        template = self.args.template
        questions = [str(p) for p in self.dataset["problem"]]
        prompts = [format_prompt(q, template) for q in questions]
        golds = self.dataset["answer"] if "answer" in self.dataset.column_names else [None] * len(prompts)
        lengths = self.backend.count_tokens(prompts)
        limit = self.backend.max_context
        ready = []
        for i, (question, prompt, gold, length) in enumerate(zip(questions, prompts, golds, lengths)):
            gold = None if gold is None or str(gold).strip() == "" else str(gold)
            tree = SearchTree(question, gold, self.args.c_puct)
            searches[i] = _Search(i, tree, prompt, self.args.num_rollouts, self.args.seed)
            if limit and length + self.args.max_step_tokens > limit:
                status[i] = "prompt_too_long"
            elif gold is None and self.ppm is None:
                status[i] = "missing_gold_answer"
            elif gold is not None and not _gold_is_gradable(gold):
                status[i] = "unparseable_gold_answer"
            else:
                ready.append(searches[i])
                continue
            counts[status[i]] += 1
        return ready

    def _wave(self, expansions, executor: PythonExecutor, counts: Counter, timers: Counter) -> None:
        args = self.args
        # 2. ONE generation call for all leaves of all trees. Seeds come from (pass, problem, node, attempt), so a
        # tree never depends on the other trees in flight.
        prefixes = [search.prompt + search.tree.trajectory_text(leaf) for search, leaf in expansions]
        seeds = [mix_seed(search.seed, search.index, leaf.id, leaf.failed_expansions) for search, leaf in expansions]
        with self._engine_lock:  # timed inside: with lanes, the time a lane waits for the engine is not generation
            t0 = time.perf_counter()
            samples = self.backend.generate(
                prefixes, args.num_candidates, STEP_STOP_STRINGS, args.max_step_tokens, args.temperature, args.top_p,
                seeds,
            )  # fmt: skip
            timers["generation"] += time.perf_counter() - t0
        candidates: list[_Candidate] = []
        out_of_room: list[tuple[_Search, Node]] = []
        for (search, leaf), completions in zip(expansions, samples):
            seen = {child.text.strip() for child in leaf.children}
            for sample, completion in enumerate(completions):
                counts["candidates"] += 1
                counts["tokens"] += completion.num_tokens
                counts[f"tokens_pass{search.pass_number}"] += completion.num_tokens
                step, reason = check_completion(completion, args.allow_unexecuted_answers)
                if reason is None and completion.text.strip() in seen:
                    reason = "duplicate"
                if reason is not None:
                    counts[f"dropped_{reason}"] += 1
                    counts[f"tokens_dropped_{reason}"] += completion.num_tokens
                    continue
                seen.add(completion.text.strip())
                candidates.append(_Candidate(search, leaf, completion.text, completion.num_tokens, sample, step=step))
            if completions and all(c.finish_reason == "prompt_too_long" for c in completions):
                out_of_room.append((search, leaf))

        # 3. ONE run_batch for the cumulative programs of all candidates that end a step or close the program.
        to_run = [cand for cand in candidates if needs_execution(cand.text)]
        programs = [build_program([*(node.step for node in cand.leaf.path()), cand.step]) for cand in to_run]
        t0 = time.perf_counter()
        results = executor.run_batch(programs)
        timers["execution"] += time.perf_counter() - t0
        failed = set()
        for cand, result in zip(to_run, results):
            cand.output = result.output
            reason = check_execution(cand.step, result)
            if reason is not None:
                counts[f"dropped_{reason}"] += 1
                counts[f"tokens_dropped_{reason}"] += cand.tokens
                failed.add(id(cand))
        candidates = [cand for cand in candidates if id(cand) not in failed]

        # 4. ONE generation call for the answers of candidates that closed their program.
        closed = [cand for cand in candidates if closes_program(cand.text)]
        for cand in closed:
            cand.text = f"{cand.text}\n{OUTPUT_START}{cand.output.strip()}{OUTPUT_END}\n"
        if closed:
            with self._engine_lock:
                t0 = time.perf_counter()
                answers = self.backend.generate(
                    [cand.search.prompt + cand.search.tree.trajectory_text(cand.leaf) + cand.text for cand in closed],
                    1, ANSWER_STOP_STRINGS, args.max_answer_tokens, args.temperature, args.top_p,
                    [mix_seed(cand.search.seed, *cand.answer_seed_parts) for cand in closed],
                )  # fmt: skip
                timers["generation"] += time.perf_counter() - t0
            for cand, (answer,) in zip(closed, answers):
                cand.text += answer.text
                cand.tokens += answer.num_tokens
                counts["tokens"] += answer.num_tokens
                counts[f"tokens_pass{cand.search.pass_number}"] += answer.num_tokens

        # 5. New nodes, ONE scoring call (Eq. 3), terminal rewards (Eq. 2), and each rollout's next node.
        t0 = time.perf_counter()
        new_nodes: list[tuple[_Search, Node, _Candidate]] = []
        for cand in candidates:
            text = cand.text if cand.final else cand.text + "\n"
            node = cand.search.tree.add_child(cand.leaf, text, output=cand.output)
            new_nodes.append((cand.search, node, cand))
        timers["bookkeeping"] += time.perf_counter() - t0
        # Eq. 3 initialises the nodes a later rollout can pass through. Nodes that are terminal at creation are
        # valued by their reward alone: a graded answer by correctness (+1 / -1), a node cut at max_depth by -1. At
        # test time (no gold answer) an answer's reward is the PPM's value of the whole solution.
        to_score = [
            (search, node) for search, node, cand in new_nodes
            if not (cand.final and search.tree.gold_answer is not None) and node.depth < args.max_depth
        ]  # fmt: skip
        if self.ppm is not None and to_score:
            with self._scorer_lock:
                t0 = time.perf_counter()
                scores = self.ppm.score(
                    [search.tree.question for search, _ in to_score],
                    [search.tree.trajectory_text(node) for search, node in to_score],
                )
                timers["scoring"] += time.perf_counter() - t0
            for (_, node), score in zip(to_score, scores):
                node.ppm_score = float(score)
        t0 = time.perf_counter()
        for search, node, cand in new_nodes:
            self._settle(search.tree, node, cand.final, counts, timers)
        for search, leaf in out_of_room:
            if not leaf.children:
                counts["terminal_context_full"] += 1
                self._dead_end(search.tree, leaf, "context_full")
        for search, leaf in expansions:
            self._advance(search, leaf, counts)
        timers["bookkeeping"] += time.perf_counter() - t0

    def _dead_end(self, tree: SearchTree, node: Node, reason: str) -> None:
        """A node no rollout can go beyond (too deep, expansions that keep failing, no room left): terminal with
        value -1, on that node only or backed up to the root (`MCTSConfig.dead_end_backup`)."""
        tree.finish(node, reason, -1.0, backpropagate=self.args.dead_end_backup == "path")

    def _settle(self, tree: SearchTree, node: Node, final: bool, counts: Counter, timers: Counter) -> None:
        """Value a new node: Eq. 3 for a node rollouts can pass through (with a PPM), its reward for a terminal one;
        terminal children are backed up at creation (Eq. 2), even when no rollout selects them."""
        if final:
            node.answer = extract_answer(node.step.answer or "")
            if tree.gold_answer is None:  # test time: the PPM's value is the terminal reward
                tree.finish(node, "answer", node.ppm_score if node.ppm_score is not None else 0.0)
                return
            t0 = time.perf_counter()
            node.correct = node.answer is not None and grade_answer(node.answer, tree.gold_answer)
            timers["grading"] += time.perf_counter() - t0
            counts["answers_correct" if node.correct else "answers_wrong"] += 1
            if node.answer is None:
                counts["answers_without_box"] += 1
            tree.finish(node, "answer", 1.0 if node.correct else -1.0)  # Eq. 2 with the +1 / -1 terminal reward
        elif node.depth >= self.args.max_depth:
            counts["terminal_max_depth"] += 1
            self._dead_end(tree, node, "max_depth")
        elif node.ppm_score is not None:
            tree.initialise_with_score(node, node.ppm_score)  # Eq. 3: N = 1, q = PPM(x + s_1..s_i)

    def _advance(self, search: _Search, leaf: Node, counts: Counter) -> None:
        """Move the rollout one step down, retry a failed expansion, or end the rollout at a terminal node.

        A rollout is one descent from the root to a terminal node. An expansion in which no candidate survived is
        retried in the next wave with fresh seeds (the attempt number is part of the seed); after
        `max_consecutive_errors` failed attempts the leaf is a dead end, which ends the rollout."""
        if not leaf.children and not leaf.terminal:
            leaf.failed_expansions += 1
            counts["failed_expansions"] += 1
            if leaf.failed_expansions < self.args.max_consecutive_errors:
                return  # the cursor stays on the leaf: the same rollout tries again
            counts["terminal_errors"] += 1
            self._dead_end(search.tree, leaf, "errors")
        nxt = search.tree.best_child(leaf) if not leaf.terminal else None
        if nxt is None:
            search.end_rollout()
        else:
            search.cursor = nxt

    # -- results ------------------------------------------------------------------------------------------

    def _report(self, counts: Counter, timers: Counter, total: float, waves: int) -> dict[str, float]:
        accounted = sum(timers.values()) - timers["bookkeeping"]
        stats = {
            **{k: int(v) for k, v in sorted(counts.items())},
            "waves": waves,
            "time_s": round(total, 3),
            "tokens_per_s": round(counts["tokens"] / total, 1) if total else 0.0,
            "generation_s": round(timers["generation"], 3),
            "execution_s": round(timers["execution"], 3),
            "scoring_s": round(timers["scoring"], 3),
            "grading_s": round(timers["grading"], 3),
            "bookkeeping_s": round(max(0.0, total - accounted), 3),  # lanes overlap the parts (docs/method.md)
        }
        for part in ("generation", "execution", "scoring", "grading", "bookkeeping"):
            stats[f"{part}_fraction"] = round(stats[f"{part}_s"] / total, 3) if total else 0.0
        logger.info(
            "MCTS: %d/%d problems solved, %d tokens in %.1f s (%.0f tokens/s); time: generation %.0f%%, "
            "execution %.0f%%, scoring %.0f%%, grading %.0f%%, bookkeeping %.0f%%",
            counts["problems_solved"], len(self.dataset), counts["tokens"], total, stats["tokens_per_s"],
            *(100 * stats[f"{p}_fraction"] for p in ("generation", "execution", "scoring", "grading", "bookkeeping")),
        )  # fmt: skip
        return stats

    @staticmethod
    def _row(search: _Search, status: str) -> dict:
        tree = search.tree
        best = tree.best_terminal()
        return {
            "index": search.index,
            "problem": tree.question,
            "answer": tree.gold_answer,
            "solved": tree.solved,
            "status": status,
            "rollouts": search.rollouts,
            "search_pass": search.pass_number,
            "num_nodes": len(tree.nodes) - 1,
            "best_answer": best.answer if best else None,
            "best_trajectory": tree.trajectory_text(best) if best else None,
            "tree": tree.to_json(),
        }

    def _to_dataset(self, rows: list[dict]) -> Dataset:
        # The light rows of non-main processes (gather_trees="main") have None where the trees were.
        columns = ["problem", "answer", "solved", "status", "rollouts", "num_nodes", "best_answer",
                   "best_trajectory", "tree"]  # fmt: skip
        data = {c: [row[c] for row in rows] for c in columns}
        data["search_pass"] = [pass_of(row) for row in rows]
        for column in self.dataset.column_names:
            if column not in data:
                data[column] = self.dataset[column]
        return Dataset.from_dict(data)

    def config_dict(self) -> dict:
        return asdict(self.args)
