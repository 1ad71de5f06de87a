"""A PPM trained for a few steps on the tiny policy, for tests that need a trained checkpoint (not a good one)."""

import torch
from datasets import Dataset
from transformers import AutoTokenizer

from rstar_trl import PPMConfig, PPMTrainer


def train_tiny_ppm(policy: str, pairs: Dataset, path: str, max_steps: int) -> str:
    """Train a PPM from `policy` on `pairs` for `max_steps` steps (batch 8, lr 1e-3, seeded, on CPU) and save it to
    `path` as `PPMTrainer` saves it (with the value transform in its config). Returns `path`."""
    torch.manual_seed(0)
    args = PPMConfig(output_dir=path, per_device_train_batch_size=8, learning_rate=1e-3, max_steps=max_steps,
                     bf16=False, gradient_checkpointing=False, use_cpu=True, report_to="none", save_strategy="no",
                     disable_tqdm=True, seed=0)  # fmt: skip
    trainer = PPMTrainer(
        policy, args=args, train_dataset=pairs, processing_class=AutoTokenizer.from_pretrained(policy)
    )
    trainer.train()
    trainer.save_model(path)
    return path
