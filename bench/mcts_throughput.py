"""Benchmark: generated tokens/s of `MCTSGenerator` vs the same backend's raw batched generation, same run.

    .venv/bin/python bench/mcts_throughput.py --backend transformers [--problems 256 --in_flight 64] [--policy DIR]
    .venv/bin/python bench/mcts_throughput.py --backend vllm
    .venv/bin/python bench/mcts_throughput.py --backend vllm --problems 1000 --in_flight 1000   # memory at scale

Two baselines, both with the same backend, batch size, stop strings and token budgets, measured after the search:

- "ratio" (the headline): raw generation of exactly the requests the search made (every prefix it expanded with
  its number of samples, every answer request), packed into full batches. Same prompts, same sequences: the ratio
  is what the search itself costs on top of generation (code execution, grading, bookkeeping, waves that are
  smaller or less regular than full batches).
- "ratio_root_prompts": the same number of sequences sampled from the problem prompts only. Those contexts are
  shorter than the search's (a step at depth 5 attends over the question and four earlier steps), so this ratio
  also counts the cost of longer contexts.

Without --policy, the embedded tiny policy is built once into bench/.cache/tiny_policy.
Peak RSS is sampled over this process and its children (vLLM's engine, sandbox workers).
Last line: one JSON object.
"""

import argparse
import json
import os
import threading
import time
from collections import defaultdict

import psutil

from rstar_trl import MCTSConfig, MCTSGenerator, format_prompt
from rstar_trl.format import STEP_STOP_STRINGS
from rstar_trl.search import GenerationBackend
from rstar_trl.tiny import build_tiny_policy, tiny_splits, to_dataset


class Recording(GenerationBackend):
    """Passes every call through to the real backend and keeps the requests (instrumentation, not a double)."""

    def __init__(self, backend: GenerationBackend):
        self.backend = backend
        self.requests: dict[tuple, list[str]] = defaultdict(list)

    @property
    def max_context(self):
        return self.backend.max_context

    def count_tokens(self, texts):
        return self.backend.count_tokens(texts)

    def generate(self, prompts, n, stop, max_new_tokens, temperature=1.0, top_p=1.0, seed=0):
        self.requests[(n, tuple(stop), max_new_tokens, temperature, top_p)].extend(prompts)
        return self.backend.generate(prompts, n, stop, max_new_tokens, temperature, top_p, seed)


class PeakRSS(threading.Thread):
    """Samples the summed RSS of this process and all its descendants."""

    def __init__(self, interval: float = 0.25):
        super().__init__(daemon=True)
        self.interval, self.peak, self.stopped = interval, 0, threading.Event()

    def run(self):
        me = psutil.Process()
        while not self.stopped.is_set():
            total = 0
            for proc in [me, *me.children(recursive=True)]:
                try:
                    total += proc.memory_info().rss
                except psutil.Error:
                    pass
            self.peak = max(self.peak, total)
            time.sleep(self.interval)


def timed(backend, calls) -> tuple[int, float]:
    start = time.perf_counter()
    tokens = 0
    for (n, stop, max_new_tokens, temperature, top_p), prompts in calls:
        out = backend.generate(prompts, n, list(stop), max_new_tokens, temperature, top_p, seed=1)
        tokens += sum(c.num_tokens for row in out for c in row)
    return tokens, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backend", default="transformers", choices=["transformers", "vllm"], help="backend")
    parser.add_argument("--policy", default=None, help="policy directory (default: build the tiny policy)")
    parser.add_argument("--problems", type=int, default=256, help="problems searched")
    parser.add_argument("--in_flight", type=int, default=128, help="MCTSConfig.problems_in_flight")
    parser.add_argument("--rollouts", type=int, default=4, help="rollouts per problem")
    parser.add_argument("--candidates", type=int, default=4, help="candidates per expansion")
    parser.add_argument("--batch", type=int, default=256, help="sequences per generate call (transformers)")
    parser.add_argument("--torch_threads", type=int, default=1, help="CPU threads for torch (transformers)")
    parser.add_argument("--gpu_memory_utilization", type=float, default=0.15, help="vLLM (on CPU: share of RAM)")
    args = parser.parse_args()

    policy = args.policy or os.path.join(os.path.dirname(os.path.abspath(__file__)), ".cache", "tiny_policy")
    if not os.path.exists(os.path.join(policy, "config.json")):
        build_tiny_policy(policy)
    problems = to_dataset(tiny_splits()["train"][: args.problems])
    config = MCTSConfig(
        num_rollouts=args.rollouts, num_candidates=args.candidates, problems_in_flight=args.in_flight,
        generation_batch_size=args.batch, max_step_tokens=64, max_answer_tokens=32, backend=args.backend, seed=0,
        device="cpu", torch_threads=args.torch_threads, gpu_memory_utilization=args.gpu_memory_utilization,
    )  # fmt: skip
    memory = PeakRSS()
    memory.start()
    generator = MCTSGenerator(policy, config, problems)
    backend = generator.backend
    backend.generate(["warm-up"], 4, STEP_STOP_STRINGS, 8)  # first-call costs belong to neither side
    generator.backend = recording = Recording(backend)
    trees = generator.generate()
    stats = generator.stats
    mcts_tokens_per_s = stats["tokens"] / stats["time_s"]

    raw_tokens, raw_s = timed(backend, recording.requests.items())
    sequences = sum(key[0] * len(prompts) for key, prompts in recording.requests.items())
    prompts = [format_prompt(p) for p in problems["problem"]]
    per_prompt = max(1, round(sequences / len(prompts)))
    root_tokens, root_s = timed(backend, [((per_prompt, tuple(STEP_STOP_STRINGS), 64, 0.8, 0.95), prompts)])
    memory.stopped.set()
    memory.join()

    print(f"MCTS: {sum(trees['solved'])}/{len(trees)} solved, {stats['tokens']} tokens in {stats['time_s']:.1f} s "
          f"= {mcts_tokens_per_s:.0f} tokens/s over {stats['waves']} waves")  # fmt: skip
    print("MCTS time split: " + ", ".join(f"{p} {100 * stats[f'{p}_fraction']:.1f}%"
                                          for p in ("generation", "execution", "grading", "bookkeeping")))  # fmt: skip
    print(f"raw, same requests: {sequences} sequences, {raw_tokens} tokens in {raw_s:.1f} s = "
          f"{raw_tokens / raw_s:.0f} tokens/s")  # fmt: skip
    print(f"raw, root prompts:  {len(prompts) * per_prompt} sequences, {root_tokens} tokens in {root_s:.1f} s = "
          f"{root_tokens / root_s:.0f} tokens/s")  # fmt: skip
    print(f"peak RSS (this process + children): {memory.peak / 2**20:.0f} MB")
    print(json.dumps({
        "ratio": round(mcts_tokens_per_s / (raw_tokens / raw_s), 3),
        "ratio_root_prompts": round(mcts_tokens_per_s / (root_tokens / root_s), 3),
        "mcts_tokens_per_s": round(mcts_tokens_per_s, 1),
        "raw_tokens_per_s": round(raw_tokens / raw_s, 1),
        "root_prompts_tokens_per_s": round(root_tokens / root_s, 1),
        "backend": args.backend,
        "problems": len(trees),
        "in_flight": args.in_flight,
        "solved": sum(trees["solved"]),
        "sequences": sequences,
        "mcts_time_s": stats["time_s"],
        "generation_fraction": stats["generation_fraction"],
        "execution_fraction": stats["execution_fraction"],
        "bookkeeping_fraction": stats["bookkeeping_fraction"],
        "peak_rss_mb": round(memory.peak / 2**20, 1),
    }))  # fmt: skip


if __name__ == "__main__":
    main()
