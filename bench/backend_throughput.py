"""Benchmark: raw generation tokens/s of the transformers and vLLM backends on the same model, same run.

    .venv/bin/python bench/backend_throughput.py                       # the tiny policy (1.1M parameters)
    .venv/bin/python bench/backend_throughput.py --model large         # a locally built 25M-parameter Llama

"large" is built once into bench/.cache/llama_25m with random weights and the tiny tokenizer (nothing can be
downloaded here). Random weights never write a stop marker, so every sample runs to --max_new_tokens: the figure
is pure decoding speed. Each backend samples --n continuations of --prompts problem prompts.
Last line: one JSON object with "ratio" = vllm_tokens_per_s / transformers_tokens_per_s.
"""

import argparse
import gc
import json
import os
import time

import torch

from rstar_trl import format_prompt
from rstar_trl.format import STEP_STOP_STRINGS
from rstar_trl.search import TransformersBackend, VLLMBackend
from rstar_trl.tiny import build_tiny_policy, tiny_splits

CACHE = os.path.join(os.path.dirname(os.path.abspath(__file__)), ".cache")


def tiny_policy() -> str:
    path = os.path.join(CACHE, "tiny_policy")
    if not os.path.exists(os.path.join(path, "config.json")):
        build_tiny_policy(path)
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny", help="'tiny', 'large' or a model directory")
    parser.add_argument("--prompts", type=int, default=64, help="problem prompts")
    parser.add_argument("--n", type=int, default=4, help="samples per prompt")
    parser.add_argument("--max_new_tokens", type=int, default=64, help="token budget per sample")
    parser.add_argument("--batch", type=int, default=256, help="transformers: sequences per generate call")
    parser.add_argument("--torch_threads", type=int, default=1, help="transformers: CPU threads")
    args = parser.parse_args()
    path = {"tiny": tiny_policy, "large": large_model}.get(args.model, lambda: args.model)()
    prompts = [format_prompt(p["problem"]) for p in tiny_splits()["train"][: args.prompts]]
    figures = {}
    backend = TransformersBackend(path, device="cpu", batch_size=args.batch, torch_threads=args.torch_threads)
    figures["transformers"] = measure(backend, prompts, args.n, args.max_new_tokens)
    del backend
    gc.collect()
    backend = VLLMBackend(path, gpu_memory_utilization=0.15, max_model_len=1024, dtype="float32")
    figures["vllm"] = measure(backend, prompts, args.n, args.max_new_tokens)
    from safetensors import safe_open

    with safe_open(os.path.join(path, "model.safetensors"), "pt") as f:
        parameters = sum(f.get_slice(k).get_shape().numel() if hasattr(f.get_slice(k).get_shape(), "numel")
                         else int(torch.Size(f.get_slice(k).get_shape()).numel()) for k in f.keys())  # fmt: skip
    for name, value in figures.items():
        print(f"{name:>12}: {value:8.0f} tokens/s")
    print(json.dumps({"ratio": round(figures["vllm"] / figures["transformers"], 3), "model": args.model,
                      "transformers_tokens_per_s": round(figures["transformers"], 1),
                      "vllm_tokens_per_s": round(figures["vllm"], 1), "parameters": parameters,
                      "sequences": args.prompts * args.n, "max_new_tokens": args.max_new_tokens}))  # fmt: skip


if __name__ == "__main__":
    main()
