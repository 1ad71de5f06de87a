"""Benchmark: generated tokens/s of `MCTSGenerator` vs the same backend's raw generation, same run.

    .venv/bin/python bench/mcts_throughput.py --backend transformers [--problems 256 --in_flight 64] [--policy DIR]
    .venv/bin/python bench/mcts_throughput.py --backend vllm
    .venv/bin/python bench/mcts_throughput.py --backend vllm --problems 1000 --in_flight 1000   # memory at scale
    .venv/bin/python bench/mcts_throughput.py --backend server --server_url http://127.0.0.1:8000 --lanes 4
        # a `vllm serve` of the policy started beforehand (the tiny policy: bench/.cache/tiny_policy)

Three baselines, all with the same backend (and, for transformers, the same --batch and --torch_threads), measured
after the search:

- "ratio" (the headline): best-of-N sampling of whole solutions from the problem prompts, what a user compares the
  search with: N = rollouts x candidates samples per problem (the search's prompt template, temperature and top-p),
  each running to the answer's end marker or to the search's budget for a whole path (max depth x step tokens,
  within the context), in one `generate` call that the backend batches as it likes. No code is executed: this is
  the engine's speed on the user's alternative. Its contexts are shorter than the search's deep steps and its
  batches are full, so this ratio counts everything the search adds: code execution, scoring, grading,
  bookkeeping, longer contexts, short calls and waves smaller than a full batch.
- "ratio_first_steps" (the headline before shared decoding rows): as many sequences as the search generated, spread
  evenly over the problem prompts, each stopped at the first step marker. Those ~47 samples per prompt of the same
  first step are nearly all identical, and the transformers backend decodes samples that agree as one batch row
  ("decoded_fraction" 0.07 on the tiny policy), so with it this baseline measures deduplication, not the engine.
- "ratio_own_requests": a replay of the search's own generation calls. `Recording` keeps every call the search
  made, in order (prompts, n, stop strings, token budget, temperature, top-p and the per-prompt seeds), and the
  replay re-issues exactly those calls one by one, not repacked into full batches. Same prompts, seeds and batch
  shapes give the same sequences (the replay's token count is checked against the search's), so this ratio is
  what the search costs on top of its own generation: execution, scoring, grading and bookkeeping only.

With --ppm, the search is PPM-guided (Eq. 3, the transformers scorer) and an unguided search of the same problems
runs first with the same backend: "ratio_ppm_guided" = guided tokens/s / unguided tokens/s (the PPM's cost).

The transformers backend's prefix cache is emptied before each measured part, so no part starts warm.
Without --policy, the tiny default policy (the copy shipped with the package) is put into bench/.cache/tiny_policy.
Peak RSS is sampled over this process and its children (vLLM's engine, sandbox workers).
Last line: one JSON object.
"""

import argparse
import inspect
import json
import os
import threading
import time
from dataclasses import replace

import psutil
from _common import cpu_extensions, print_cpu

from rstar_trl import MCTSConfig, MCTSGenerator, format_prompt
from rstar_trl.format import ANSWER_STOP_STRINGS, STEP_STOP_STRINGS
from rstar_trl.search import GenerationBackend
from rstar_trl.search.generator import build_backend
from rstar_trl.tiny import provide_tiny_policy, tiny_splits, to_dataset

PARTS = ("generation", "execution", "scoring", "grading", "bookkeeping")


class Recording(GenerationBackend):
    """Passes every call through to the real backend and keeps its arguments, in order (instrumentation, not a
    double): the replay must re-issue the very calls the search made, with their seeds and batch shapes."""

    def __init__(self, backend: GenerationBackend):
        self.backend = backend
        self.calls: list[dict] = []
        self.concurrent_calls = backend.concurrent_calls  # a server takes the lanes' calls at once

    @property
    def max_context(self):
        return self.backend.max_context

    def count_tokens(self, texts):
        return self.backend.count_tokens(texts)

    def generate(self, prompts, n, stop, max_new_tokens, temperature=1.0, top_p=1.0, seed=0):
        self.calls.append({
            "prompts": list(prompts), "n": n, "stop": list(stop), "max_new_tokens": max_new_tokens,
            "temperature": temperature, "top_p": top_p, "seed": seed if isinstance(seed, int) else list(seed),
        })  # fmt: skip
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


def cache_option(cls, megabytes: float) -> dict:
    """`prefix_cache_mb` for `cls` if it has the option: the same bench then also measures versions without it."""
    return {"prefix_cache_mb": megabytes} if "prefix_cache_mb" in inspect.signature(cls).parameters else {}


def cold(backend) -> None:
    """Empty the transformers backend's prefix cache (if any): every measured part starts without cached prefixes."""
    cache = getattr(backend, "prefix_cache", None)
    if cache is not None:
        cache.clear()


class Decoded:
    """The transformers backend's batch rows decoded per sampled token since the last reading (None for other
    backends): below 1 where samples that agree shared a row."""

    def __init__(self, backend):
        self.backend = backend
        self.last = self._counts()

    def _counts(self) -> tuple[int, int] | None:
        if not hasattr(self.backend, "decoded_tokens"):
            return None
        return self.backend.decoded_tokens, self.backend.sampled_tokens

    def fraction(self) -> float | None:
        if self.last is None:
            return None
        (decoded, sampled), (last_decoded, last_sampled) = self._counts(), self.last
        self.last = (decoded, sampled)
        return round((decoded - last_decoded) / max(1, sampled - last_sampled), 3)


def timed(backend: GenerationBackend, calls: list[dict]) -> tuple[int, float]:
    """Tokens generated by `calls` (keyword arguments of `generate`), issued one by one as given, and the seconds."""
    start = time.perf_counter()
    tokens = 0
    for call in calls:
        out = backend.generate(**call)
        tokens += sum(c.num_tokens for row in out for c in row)
    return tokens, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backend", default="transformers", choices=["transformers", "vllm", "server"],
                        help="backend; 'server': a running `vllm serve` of the policy at --server_url")
    parser.add_argument("--server_url", default=None, help="--backend server: the server's URL")
    parser.add_argument("--policy", default=None, help="policy directory (default: build the tiny policy)")
    parser.add_argument("--problems", type=int, default=256, help="problems searched")
    parser.add_argument("--in_flight", type=int, default=128, help="MCTSConfig.problems_in_flight")
    parser.add_argument("--rollouts", type=int, default=4, help="rollouts per problem")
    parser.add_argument("--candidates", type=int, default=4, help="candidates per expansion")
    parser.add_argument("--batch", type=int, default=256, help="sequences per generate call (transformers)")
    parser.add_argument("--torch_threads", type=int, default=1, help="CPU threads for torch (transformers)")
    parser.add_argument("--gpu_memory_utilization", type=float, default=0.15, help="vLLM (on CPU: share of RAM)")
    parser.add_argument("--ppm", default=None, help="a PPM checkpoint: guided search, compared with unguided")
    parser.add_argument("--prefix_cache_mb", type=float, default=1024, help="transformers prefix cache (0: off)")
    parser.add_argument("--lanes", type=int, default=1,
                        help="MCTSConfig.pipeline_lanes of the search; above 1, a one-lane search of the same "
                        "problems runs first and 'ratio_lanes' compares the two (and 'same_trees' whether they agree)")
    args = parser.parse_args()
    print_cpu()

    policy = args.policy or os.path.join(os.path.dirname(os.path.abspath(__file__)), ".cache", "tiny_policy")
    if not os.path.exists(os.path.join(policy, "config.json")):
        provide_tiny_policy(policy)
    problems = to_dataset(tiny_splits()["train"][: args.problems])
    config = MCTSConfig(
        num_rollouts=args.rollouts, num_candidates=args.candidates, problems_in_flight=args.in_flight,
        generation_batch_size=args.batch, max_step_tokens=64, max_answer_tokens=32, backend=args.backend, seed=0,
        device="cpu", torch_threads=args.torch_threads, gpu_memory_utilization=args.gpu_memory_utilization,
        server_url=args.server_url,
        **cache_option(MCTSConfig, args.prefix_cache_mb),
    )  # fmt: skip
    memory = PeakRSS()
    memory.start()
    unguided = None
    with build_backend(policy, config) as backend:
        backend.generate(["warm-up"], 4, STEP_STOP_STRINGS, 8)  # first-call costs belong to neither side

        def search(ppm, lanes=args.lanes):
            cold(backend)
            if ppm is not None and getattr(ppm, "prefix_cache", None) is not None:
                ppm.prefix_cache.clear()
            recording = Recording(backend)
            generator = MCTSGenerator(recording, replace(config, pipeline_lanes=lanes), problems, ppm=ppm)
            decoded = Decoded(backend)
            trees = generator.generate()
            return trees, {**generator.stats, "decoded_fraction": decoded.fraction()}, recording

        def searches(ppm):
            one_lane = search(ppm, 1)[:2] if args.lanes > 1 else None
            return one_lane, *search(ppm)

        if args.ppm:
            from rstar_trl.ppm import TransformersPPMScorer

            _, unguided, _ = search(None)
            with TransformersPPMScorer(
                args.ppm, device="cpu", **cache_option(TransformersPPMScorer, args.prefix_cache_mb)
            ) as scorer:
                one_lane, trees, stats, recording = searches(scorer)
        else:
            one_lane, trees, stats, recording = searches(None)
        mcts_tokens_per_s = stats["tokens"] / stats["time_s"]

        cold(backend)
        own_tokens, own_s = timed(backend, recording.calls)
        sequences = sum(call["n"] * len(call["prompts"]) for call in recording.calls)
        prompts = [format_prompt(p, config.template) for p in problems["problem"]]
        longest = max(backend.count_tokens(prompts))
        path_budget = config.max_depth * config.max_step_tokens
        if backend.max_context:
            path_budget = min(path_budget, backend.max_context - longest)
        best_of_n = {"prompts": prompts, "n": args.rollouts * args.candidates, "stop": list(ANSWER_STOP_STRINGS),
                     "max_new_tokens": path_budget, "temperature": config.temperature, "top_p": config.top_p,
                     "seed": 1}  # fmt: skip
        per_prompt = max(1, round(sequences / len(prompts)))
        first_steps = {**best_of_n, "n": per_prompt, "stop": list(STEP_STOP_STRINGS),
                       "max_new_tokens": config.max_step_tokens}  # fmt: skip
        cold(backend)
        decoded = Decoded(backend)
        sampling_tokens, sampling_s = timed(backend, [best_of_n])
        sampling_decoded = decoded.fraction()
        cold(backend)
        first_tokens, first_s = timed(backend, [first_steps])
        first_decoded = decoded.fraction()
    memory.stopped.set()
    memory.join()
    own_per_s, sampling_per_s, first_per_s = own_tokens / own_s, sampling_tokens / sampling_s, first_tokens / first_s

    print(f"MCTS: {sum(trees['solved'])}/{len(trees)} solved, {stats['tokens']} tokens in {stats['time_s']:.1f} s "
          f"= {mcts_tokens_per_s:.0f} tokens/s over {stats['waves']} waves")  # fmt: skip
    print("MCTS time split: " + ", ".join(f"{p} {100 * stats[f'{p}_fraction']:.1f}%" for p in PARTS))
    print(f"raw, best-of-{best_of_n['n']} whole solutions: {len(prompts) * best_of_n['n']} sequences, "
          f"{sampling_tokens} tokens in {sampling_s:.1f} s = {sampling_per_s:.0f} tokens/s")  # fmt: skip
    print(f"raw, first steps:     {len(prompts) * per_prompt} sequences, {first_tokens} tokens in {first_s:.1f} s = "
          f"{first_per_s:.0f} tokens/s")  # fmt: skip
    if stats["decoded_fraction"] is not None:
        print(f"batch rows decoded per sampled token: MCTS {stats['decoded_fraction']}, best-of-N {sampling_decoded}, "
              f"first steps {first_decoded}")  # fmt: skip
    print(f"raw, own requests:    {len(recording.calls)} calls replayed as made, {sequences} sequences, {own_tokens} "
          f"tokens in {own_s:.1f} s = {own_per_s:.0f} tokens/s"
          + ("" if own_tokens == stats["tokens"] else f" (the search counted {stats['tokens']} tokens)"))  # fmt: skip
    print(f"MCTS / best-of-N sampling from the problem prompts: x{mcts_tokens_per_s / sampling_per_s:.2f}; "
          f"MCTS / first steps: x{mcts_tokens_per_s / first_per_s:.2f}; "
          f"MCTS / its own requests replayed: x{mcts_tokens_per_s / own_per_s:.2f}")  # fmt: skip
    if unguided:
        unguided_per_s = unguided["tokens"] / unguided["time_s"]
        print(
            f"unguided search of the same problems: {unguided['tokens']} tokens in {unguided['time_s']:.1f} s = "
            f"{unguided_per_s:.0f} tokens/s; PPM-guided / unguided: x{mcts_tokens_per_s / unguided_per_s:.2f}"
        )
    lanes = {}
    if one_lane:
        one_trees, one_stats = one_lane
        one_per_s = one_stats["tokens"] / one_stats["time_s"]
        lanes = {"ratio_lanes": round(mcts_tokens_per_s / one_per_s, 3), "one_lane_tokens_per_s": round(one_per_s, 1),
                 "one_lane_generation_fraction": one_stats["generation_fraction"],
                 "same_trees": one_trees["tree"] == trees["tree"]}  # fmt: skip
        # On a server the lanes' calls overlap: their generation time, summed, can pass the run's time.
        busy = "generation time / run time" if backend.concurrent_calls else "engine busy"
        print(f"one lane (all trees in one wave): {one_stats['tokens']} tokens in {one_stats['time_s']:.1f} s = "
              f"{one_per_s:.0f} tokens/s, {busy} {100 * one_stats['generation_fraction']:.0f}%; {args.lanes} lanes: "
              f"x{lanes['ratio_lanes']:.2f}, {busy} {100 * stats['generation_fraction']:.0f}%, same trees: "
              f"{lanes['same_trees']}")  # fmt: skip
    print(f"peak RSS (this process + children): {memory.peak / 2**20:.0f} MB")
    print(json.dumps({
        "ratio": round(mcts_tokens_per_s / sampling_per_s, 3),
        "ratio_own_requests": round(mcts_tokens_per_s / own_per_s, 3),
        "ratio_first_steps": round(mcts_tokens_per_s / first_per_s, 3),
        **({"ratio_ppm_guided": round(mcts_tokens_per_s / (unguided["tokens"] / unguided["time_s"]), 3),
            "unguided_tokens_per_s": round(unguided["tokens"] / unguided["time_s"], 1)} if unguided else {}),
        **lanes,
        "lanes": args.lanes,
        "ppm": args.ppm,
        "prefix_cache_mb": args.prefix_cache_mb,
        "mcts_tokens_per_s": round(mcts_tokens_per_s, 1),
        "sampling_tokens_per_s": round(sampling_per_s, 1),
        "own_requests_tokens_per_s": round(own_per_s, 1),
        "first_steps_tokens_per_s": round(first_per_s, 1),
        "best_of_n": best_of_n["n"],
        "decoded_fraction": {"mcts": stats["decoded_fraction"], "best_of_n": sampling_decoded,
                             "first_steps": first_decoded},
        "backend": args.backend,
        "problems": len(trees),
        "in_flight": args.in_flight,
        "torch_threads": args.torch_threads,
        "solved": sum(trees["solved"]),
        "sequences": sequences,
        "generate_calls": len(recording.calls),
        "mcts_tokens": int(stats["tokens"]),
        "own_requests_tokens": own_tokens,
        "sampling_tokens": sampling_tokens,
        "first_steps_tokens": first_tokens,
        "mcts_time_s": stats["time_s"],
        **{f"{p}_fraction": stats[f"{p}_fraction"] for p in PARTS},
        "peak_rss_mb": round(memory.peak / 2**20, 1),
        "cpu": cpu_extensions(),
    }))  # fmt: skip


if __name__ == "__main__":
    main()
