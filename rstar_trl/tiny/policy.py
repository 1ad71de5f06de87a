"""Build the tiny default policy: a byte-level BPE tokenizer, a ~1 M-parameter Llama, a short SFT bootstrap.

The result is a normal Hugging Face checkpoint (Auto classes load it) that writes the code-augmented step format
on the tiny word problems. The package ships the policy `build_tiny_policy()` gives with its defaults
(`SHIPPED_POLICY`; `python -m rstar_trl.tiny` rebuilds it), so every machine starts from the same weights.

Calibration of the defaults (seed 0, chosen on the `validation` split, docs/results.md "Design"): the bootstrap is
mostly levels 1-2 with a little of every harder level (`BOOTSTRAP_LEVELS`), 600 steps of batch 32. The policy writes
every level's format but is unreliable, like a base model: greedy decoding (the executor writing the output block,
paper §3.2) solves 76% / 45% / 8% / 4% / 0% of levels 1-5 on 600 validation problems, while one of 8 samples at
T = 0.8 is right for 90% / 77% / 31% / 29% / 0%. Shorter bootstraps (150-200 steps) left a policy that solves
almost nothing; a bootstrap of levels 1-2 only solved those perfectly but could not write the longer solutions of
levels 3-5, so neither sampling nor search found them. The build takes 6-12 minutes on 2 CPU cores.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Iterator, Sequence

import datasets
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast, PrinterCallback, set_seed
from transformers.utils import logging as hf_logging
from trl import SFTConfig, SFTTrainer

from rstar_trl.format import ANSWER_END, STEP_MARKERS, render_trajectory
from rstar_trl.tiny.problems import BOOTSTRAP_LEVELS, LEVELS, _stream, generate_problems, tiny_splits

__all__ = ["EOS_TOKEN", "SHIPPED_POLICY", "build_tiny_policy", "provide_tiny_policy", "train_tokenizer"]

EOS_TOKEN = "<|endoftext|>"
# The policy `python -m rstar_trl.tiny` builds with its defaults, shipped with the package (about 4 MB) so that every
# machine starts the tiny default from the same weights: a CPU build differs in the last bits from machine to machine
# (vector extensions change float rounding), and so would every number downstream of it.
SHIPPED_POLICY = os.path.join(os.path.dirname(os.path.abspath(__file__)), "bootstrap_policy")
_SHIPPED_FILES = ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
                  "tokenizer_config.json", "tiny_policy.json")  # fmt: skip
_TOKENIZER_PROBLEMS = 2000


def _render(problems: Sequence[dict]) -> list[dict[str, str]]:
    """Prompt/completion pairs (TRL's prompt-completion format) with the default `POLICY_PROMPT`."""
    return [render_trajectory(p["problem"], p["steps"]) for p in problems]


def train_tokenizer(texts: Sequence[str], vocab_size: int = 600) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer with one token per digit and the step markers as single special tokens.

    Digits are split one per token so that any number is spelled with known tokens and copied digit by digit.
    """
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS_TOKEN, *STEP_MARKERS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # any byte stays encodable
        min_frequency=2,
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=EOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=EOS_TOKEN,
        extra_special_tokens=list(STEP_MARKERS),
        model_max_length=1024,
    )


@contextlib.contextmanager
def _quiet(enabled: bool) -> Iterator[None]:
    """Silence datasets' and transformers' progress bars and TRL's warnings, and restore them afterwards."""
    if not enabled:
        yield
        return
    trl_logger = logging.getLogger("trl")
    bars, hf_bars, level = datasets.is_progress_bar_enabled(), hf_logging.is_progress_bar_enabled(), trl_logger.level
    datasets.disable_progress_bars()
    hf_logging.disable_progress_bar()
    trl_logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        trl_logger.setLevel(level)
        if bars:
            datasets.enable_progress_bars()
        if hf_bars:
            hf_logging.enable_progress_bar()


def _model(tokenizer: PreTrainedTokenizerFast, seed: int, **sizes: int) -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=sizes["hidden_size"],
        num_hidden_layers=sizes["num_layers"],
        num_attention_heads=sizes["num_heads"],
        num_key_value_heads=sizes["num_heads"],
        intermediate_size=sizes["intermediate_size"],
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        # LlamaConfig defaults to bos=1, eos=2: wrong ids here, and generation would never stop.
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    # A completion ends with `<end_of_answer>` then eos: plain `generate` should stop at either.
    model.generation_config.eos_token_id = [tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids(ANSWER_END)]
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model


def build_tiny_policy(
    output_dir: str | os.PathLike[str],
    *,
    seed: int = 0,
    bootstrap_steps: int = 600,
    hidden_size: int = 128,
    num_layers: int = 4,
    num_heads: int = 4,
    intermediate_size: int = 512,
    batch_size: int = 32,
    lr: float = 3e-3,
    bootstrap_levels: tuple[int, ...] = BOOTSTRAP_LEVELS,
    num_bootstrap: int = 2000,
    progress: bool = True,
    bootstrap_problems: Sequence[dict] | None = None,
    tokenizer_problems: Sequence[dict] | None = None,
) -> str:
    """Train the tiny default policy from scratch on CPU and save it (model, tokenizer, `tiny_policy.json`).

    Args:
        output_dir: where the checkpoint goes; `AutoTokenizer`/`AutoModelForCausalLM.from_pretrained` load it.
        seed: seeds the problems, the tokenizer corpus, the initial weights and the data order.
        bootstrap_steps: optimizer steps of SFT on the `bootstrap` split of `tiny_splits(seed)`.
        hidden_size, num_layers, num_heads, intermediate_size: the Llama's size.
        batch_size, lr: SFT batch size and peak learning rate (warm-up then cosine decay).
        bootstrap_levels, num_bootstrap: the levels (a level listed twice gets twice the share) and size of the
            bootstrap split the policy learns from.
        progress: show a progress bar while training (False: build silently).
        bootstrap_problems: another task's problems to learn from instead of the tiny default's bootstrap split:
            dicts with `problem` and `steps` (a list of `Step`), like `generate_problems` gives. Then
            `bootstrap_levels` and `num_bootstrap` are unused.
        tokenizer_problems: the problems the tokenizer is trained on (default: the tiny default's, or
            `bootstrap_problems` when those are given).

    Returns:
        `output_dir` as a string.
    """
    start = time.perf_counter()
    output_dir = os.fspath(output_dir)
    set_seed(seed)

    # The tokenizer sees every level (its own draw, not the test split) so later rounds' text is in vocabulary; for
    # another task, it learns that task's problems.
    corpus = (
        tokenizer_problems
        or bootstrap_problems
        or generate_problems(_TOKENIZER_PROBLEMS, LEVELS, _stream(seed, "tokenizer"))
    )
    tokenizer = train_tokenizer([row["prompt"] + row["completion"] + EOS_TOKEN for row in _render(corpus)])
    sizes = {"hidden_size": hidden_size, "num_layers": num_layers, "num_heads": num_heads}
    model = _model(tokenizer, seed, intermediate_size=intermediate_size, **sizes)

    custom = bootstrap_problems is not None
    if not custom:
        bootstrap_problems = tiny_splits(seed, num_bootstrap=num_bootstrap, bootstrap_levels=tuple(bootstrap_levels))[
            "bootstrap"
        ]
    bootstrap = datasets.Dataset.from_list(_render(bootstrap_problems))
    with tempfile.TemporaryDirectory() as scratch:
        args = SFTConfig(
            output_dir=scratch,
            max_steps=bootstrap_steps,
            per_device_train_batch_size=batch_size,
            learning_rate=lr,
            lr_scheduler_type="cosine",
            warmup_steps=0.05,
            weight_decay=0.0,
            completion_only_loss=True,  # the prompt is given at inference: learn only to write solutions
            max_length=1024,
            bf16=False,
            gradient_checkpointing=False,  # TRL turns it on by default; a 1 M model needs no memory saving
            use_cpu=True,
            dataloader_num_workers=0,
            logging_steps=max(1, bootstrap_steps // 20),
            logging_first_step=True,
            report_to="none",
            save_strategy="no",
            seed=seed,
            disable_tqdm=not progress,
        )
        with _quiet(not progress):
            trainer = SFTTrainer(model=model, args=args, train_dataset=bootstrap, processing_class=tokenizer)
            if not progress:  # without a progress bar the Trainer prints every log line instead
                trainer.remove_callback(PrinterCallback)
            trainer.train()
            model.save_pretrained(output_dir)
            tokenizer.save_pretrained(output_dir)
    # The first entry is the first step's loss, the last the mean over the last logging window.
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    elapsed = time.perf_counter() - start
    info = {
        "seed": seed,
        "bootstrap_steps": bootstrap_steps,
        "bootstrap_problems": len(bootstrap),
        "bootstrap_levels": None if custom else list(bootstrap_levels),
        "hidden_size": hidden_size,
        "num_layers": num_layers,
        "num_heads": num_heads,
        "intermediate_size": intermediate_size,
        "batch_size": batch_size,
        "lr": lr,
        "vocab_size": len(tokenizer),
        "num_parameters": sum(p.numel() for p in model.parameters()),
        "loss_start": losses[0] if losses else None,
        "loss_end": losses[-1] if losses else None,
        "loss_history": losses,
        "build_seconds": round(elapsed, 1),
        "torch_threads": torch.get_num_threads(),
        "weights_sha256": _sha256(os.path.join(output_dir, "model.safetensors")),
    }
    with open(os.path.join(output_dir, "tiny_policy.json"), "w") as f:
        json.dump(info, f, indent=2)
    return output_dir


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def shipped_policy_info() -> dict | None:
    """The shipped policy's build record (`tiny_policy.json`), or None when this installation has no shipped copy."""
    record = os.path.join(SHIPPED_POLICY, "tiny_policy.json")
    if not all(os.path.exists(os.path.join(SHIPPED_POLICY, name)) for name in _SHIPPED_FILES):
        return None
    with open(record) as f:
        return json.load(f)


def shipped_policy_matches(*, seed: int = 0, bootstrap_steps: int = 600) -> bool:
    """Whether this installation ships a policy built with these settings (so `provide_tiny_policy` copies it)."""
    info = shipped_policy_info()
    return info is not None and (info["seed"], info["bootstrap_steps"]) == (seed, bootstrap_steps)


def provide_tiny_policy(
    output_dir: str | os.PathLike[str], *, seed: int = 0, bootstrap_steps: int = 600, build: bool = False
) -> str:
    """Put the tiny default policy in `output_dir`: a copy of the shipped policy when it was built with these
    settings (the default), else a build from scratch (`build_tiny_policy`).

    Args:
        output_dir: where the checkpoint goes.
        seed, bootstrap_steps: the build settings asked for.
        build: build from scratch even when the shipped policy matches (a few minutes on 2 CPU cores; on another
            machine the weights may differ in the last bits, see `SHIPPED_POLICY`).

    Returns:
        "copied" or "built".
    """
    output_dir = os.fspath(output_dir)
    if not build and shipped_policy_matches(seed=seed, bootstrap_steps=bootstrap_steps):
        info = shipped_policy_info()
        if _sha256(os.path.join(SHIPPED_POLICY, "model.safetensors")) != info["weights_sha256"]:
            raise RuntimeError(
                f"the shipped tiny policy in {SHIPPED_POLICY} does not match its record (weights_sha256): the "
                "installation is damaged; reinstall rstar_trl, or build the policy with `python -m rstar_trl.tiny`"
            )
        os.makedirs(output_dir, exist_ok=True)
        for name in _SHIPPED_FILES:
            shutil.copyfile(os.path.join(SHIPPED_POLICY, name), os.path.join(output_dir, name))
        return "copied"
    build_tiny_policy(output_dir, seed=seed, bootstrap_steps=bootstrap_steps)
    return "built"
