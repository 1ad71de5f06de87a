"""PPMTrainer under 2 processes (accelerate launch, gloo on CPU) makes the same update as 1 process."""

import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

pytestmark = pytest.mark.slow

SCRIPT = """
import sys
import torch
from datasets import Dataset
from transformers import AutoTokenizer
from rstar_trl import PPMConfig, PPMTrainer, format_prompt

if __name__ == "__main__":
    policy, out, batch = sys.argv[1], sys.argv[2], int(sys.argv[3])
    torch.manual_seed(0)
    questions = ["Ann has 3 pens. How many pens?", "Bo has 5 cups and 2 more. How many cups?",
                 "Cy has 9 hats and gives 4 away. How many hats?", "Di has 2 bags of 6 figs. How many figs?"]
    pairs = Dataset.from_dict({
        "prompt": [format_prompt(q) for q in questions],
        "chosen": ["# Count.\\nprint(3)\\n<end_of_code>", "# Add.\\nprint(5 + 2)\\n<end_of_code>",
                   "# Subtract.\\nprint(9 - 4)\\n<end_of_code>", "# Multiply.\\nprint(2 * 6)\\n<end_of_code>"],
        "rejected": ["# Count.\\nprint(4)\\n<end_of_code>", "# Add.\\nprint(5 - 2)\\n<end_of_code>",
                     "# Subtract.\\nprint(9 + 4)\\n<end_of_code>", "# Multiply.\\nprint(2 + 6)\\n<end_of_code>"],
        "weight": [1.0, 2.0, 3.0, 0.5],
    })
    args = PPMConfig(output_dir=out, per_device_train_batch_size=batch, max_steps=1, learning_rate=0.5, optim="sgd",
                     lr_scheduler_type="constant", bf16=False, gradient_checkpointing=False, use_cpu=True,
                     report_to="none", save_strategy="no", disable_tqdm=True, seed=0, dataloader_drop_last=False)
    tokenizer = AutoTokenizer.from_pretrained(policy)
    trainer = PPMTrainer(policy, args=args, train_dataset=pairs, processing_class=tokenizer)
    trainer.train()
    trainer.save_model(out)
"""


def _train(command: list[str]) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


def test_two_processes_make_the_one_process_update(tiny_policy, tmp_path):
    script = tmp_path / "train.py"
    script.write_text(SCRIPT)
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    _train([sys.executable, str(script), tiny_policy, one, "4"])
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "2", "--multi_gpu",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]  # fmt: skip
    _train([*launch, str(script), tiny_policy, two, "2"])
    a = load_file(os.path.join(one, "model.safetensors"))
    b = load_file(os.path.join(two, "model.safetensors"))
    start = load_file(os.path.join(tiny_policy, "model.safetensors"))
    assert a.keys() == b.keys()
    moved = [k for k in a if k in start and not torch.equal(a[k], start[k])]
    assert moved, "the step changed nothing: the comparison would be empty"
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-6, rtol=1e-5, msg=key)
