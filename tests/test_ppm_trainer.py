"""PPMTrainer and TransformersPPMScorer: the loss of SPEC Eq. 4, its normalisation, data preparation, checkpoints."""

import copy
import math
import random

import datasets
import pytest
import torch
from peft import LoraConfig
from transformers import (
    AutoModelForSequenceClassification,
    LlamaConfig,
    LlamaForCausalLM,
    LlamaForSequenceClassification,
)
from transformers.utils import logging as hf_logging

from rstar_trl.format import STEP_END, format_prompt
from rstar_trl.ppm.scorer import TransformersPPMScorer, ppm_text, value_from_score
from rstar_trl.ppm.trainer import PPMConfig, PPMTrainer
from rstar_trl.tiny.policy import train_tokenizer

torch.set_num_threads(1)
datasets.disable_progress_bars()
hf_logging.disable_progress_bar()


def _question(a: int) -> str:
    return f"Sam has {a} coins. How many coins does Sam have?"


def _step(x: int) -> str:
    return f"# Step 1: count the coins.\nx = {x}\n{STEP_END}\n"


def _pairs(n: int, seed: int) -> datasets.Dataset:
    """A learnable pair task that needs the prefix: the chosen step copies the number (0-3) of the question."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        a, b = rng.sample(range(4), 2)
        rows.append({"prompt": format_prompt(_question(a)), "chosen": _step(a), "rejected": _step(b)})
    return datasets.Dataset.from_list(rows)


@pytest.fixture(scope="module")
def tokenizer():
    texts = [row["prompt"] + row["chosen"] for row in _pairs(300, seed=99)]
    return train_tokenizer(texts, vocab_size=300)


def _config(tokenizer, **overrides) -> LlamaConfig:
    sizes = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2}
    return LlamaConfig(
        vocab_size=len(tokenizer),
        intermediate_size=128,
        max_position_embeddings=512,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        **{**sizes, **overrides},
    )


def _model(tokenizer, seed: int = 0, **overrides) -> LlamaForSequenceClassification:
    torch.manual_seed(seed)
    return LlamaForSequenceClassification(_config(tokenizer, num_labels=1, **overrides))


@pytest.fixture(scope="module")
def policy_path(tokenizer, tmp_path_factory) -> str:
    """A tiny causal LM checkpoint, as a policy of the previous round would be saved."""
    path = str(tmp_path_factory.mktemp("policy"))
    torch.manual_seed(0)
    LlamaForCausalLM(_config(tokenizer)).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def _args(tmp_path, **overrides) -> PPMConfig:
    defaults = {
        "output_dir": str(tmp_path / "out"),
        "per_device_train_batch_size": 4,
        "per_device_eval_batch_size": 8,
        "learning_rate": 1e-3,
        "max_steps": 2,
        "bf16": False,
        "gradient_checkpointing": False,
        "use_cpu": True,
        "report_to": "none",
        "save_strategy": "no",
        "logging_steps": 1,
        "disable_tqdm": True,
        "seed": 0,
    }
    return PPMConfig(**{**defaults, **overrides})


def _auto_scores(model, tokenizer, texts: list[str]) -> list[float]:
    """Raw scores of the plain sequence classification forward, one unpadded text at a time."""
    with torch.no_grad():
        return [model(**tokenizer(text, return_tensors="pt")).logits[0, 0].item() for text in texts]


def _pair_scores(model, tokenizer, pairs: datasets.Dataset) -> tuple[list[float], list[float]]:
    """Raw scores of `prompt + chosen` and `prompt + rejected` by the plain forward."""
    chosen = _auto_scores(model, tokenizer, [ppm_text(p, c) for p, c in zip(pairs["prompt"], pairs["chosen"])])
    rejected = _auto_scores(model, tokenizer, [ppm_text(p, r) for p, r in zip(pairs["prompt"], pairs["rejected"])])
    return chosen, rejected


def _bradley_terry(chosen: float, rejected: float) -> float:
    return -math.log(1 / (1 + math.exp(rejected - chosen)))  # -log sigmoid(r_chosen - r_rejected)


def _batch(trainer: PPMTrainer) -> dict:
    dataset = trainer.train_dataset
    return trainer.data_collator([dataset[i] for i in range(len(dataset))])


_HAND_PAIRS = datasets.Dataset.from_list(
    [
        {"prompt": format_prompt(_question(3)), "chosen": _step(3), "rejected": _step(5), "weight": 1.0},
        {"prompt": format_prompt(_question(7)), "chosen": _step(7), "rejected": _step(1) + "x += 1\n", "weight": 0.5},
        {"prompt": format_prompt(_question(2) + " Quick."), "chosen": _step(2), "rejected": _step(9), "weight": 2.0},
    ]
)


@pytest.mark.parametrize(("attn_implementation", "share_prefix"), [("sdpa", True), ("eager", True), ("sdpa", False)])
def test_pair_loss_is_the_weighted_bradley_terry_loss_of_the_plain_scores(
    tokenizer, tmp_path, attn_implementation, share_prefix
):
    model = _model(tokenizer)
    model.set_attn_implementation(attn_implementation)
    trainer = PPMTrainer(
        model, args=_args(tmp_path, share_prefix=share_prefix), train_dataset=_HAND_PAIRS, processing_class=tokenizer
    )
    assert ("segment_ids" in _batch(trainer)) == share_prefix
    loss, outputs = trainer.compute_loss(trainer.model, _batch(trainer), return_outputs=True)

    chosen, rejected = _pair_scores(model, tokenizer, _HAND_PAIRS)
    weights = _HAND_PAIRS["weight"]
    by_hand = sum(w * _bradley_terry(c, r) for w, c, r in zip(weights, chosen, rejected)) / sum(weights)
    torch.testing.assert_close(outputs["scores"], torch.tensor([chosen, rejected]).T, atol=1e-5, rtol=1e-4)
    assert loss.item() == pytest.approx(by_hand, rel=1e-5)


def test_pqm_loss_is_the_weighted_squared_error_of_the_values(tokenizer, tmp_path):
    rows = [
        {"prompt": format_prompt(_question(3)), "completion": _step(3), "label": 0.75, "weight": 1.0},
        {"prompt": format_prompt(_question(4)), "completion": _step(8), "label": -1.0, "weight": 3.0},
    ]
    model = _model(tokenizer)
    trainer = PPMTrainer(
        model, args=_args(tmp_path, loss_type="pqm"), train_dataset=datasets.Dataset.from_list(rows),
        processing_class=tokenizer,
    )  # fmt: skip
    loss = trainer.compute_loss(trainer.model, _batch(trainer))
    scores = _auto_scores(model, tokenizer, [row["prompt"] + row["completion"] for row in rows])
    values = [value_from_score(s, trainer.args.value_transform) for s in scores]  # tanh(r / value_scale)
    by_hand = (1.0 * (values[0] - 0.75) ** 2 + 3.0 * (values[1] + 1.0) ** 2) / 4.0
    assert loss.item() == pytest.approx(by_hand, rel=1e-5)


def _one_step(tokenizer, tmp_path, batch_size: int, accumulation: int):
    """One SGD step (lr 1) on two weighted pairs: returns the logged loss and the parameter update (= -gradient)."""
    pairs = _HAND_PAIRS.select([0, 2])  # weights 1 and 2: a plain mean per micro-batch would be wrong
    model = _model(tokenizer)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    args = _args(
        tmp_path, per_device_train_batch_size=batch_size, gradient_accumulation_steps=accumulation, max_steps=1,
        optim="sgd", learning_rate=1.0, lr_scheduler_type="constant", max_grad_norm=0.0, weight_decay=0.0,
    )  # fmt: skip
    trainer = PPMTrainer(model, args=args, train_dataset=pairs, processing_class=tokenizer)
    trainer.train()
    update = {name: p.detach() - before[name] for name, p in model.named_parameters()}
    return trainer.state.log_history[0]["loss"], update


def test_gradient_accumulation_gives_the_gradient_of_the_whole_batch(tokenizer, tmp_path):
    loss_whole, update_whole = _one_step(tokenizer, tmp_path, batch_size=2, accumulation=1)
    loss_split, update_split = _one_step(tokenizer, tmp_path, batch_size=1, accumulation=2)

    chosen, rejected = _pair_scores(_model(tokenizer), tokenizer, _HAND_PAIRS.select([0, 2]))
    by_hand = (1.0 * _bradley_terry(chosen[0], rejected[0]) + 2.0 * _bradley_terry(chosen[1], rejected[1])) / 3.0
    assert loss_whole == pytest.approx(by_hand, rel=1e-4)
    assert loss_split == pytest.approx(loss_whole, rel=1e-4)
    assert any(u.abs().max() > 0 for u in update_whole.values())
    for name in update_whole:
        torch.testing.assert_close(update_split[name], update_whole[name], atol=1e-6, rtol=1e-4)


def test_training_raises_held_out_pair_accuracy_well_above_chance(tokenizer, tmp_path):
    args = _args(
        tmp_path, per_device_train_batch_size=16, learning_rate=1e-2, max_steps=-1, num_train_epochs=4,
        logging_steps=64, per_device_eval_batch_size=50,
    )  # fmt: skip
    trainer = PPMTrainer(
        _model(tokenizer), args=args, train_dataset=_pairs(1024, seed=0), eval_dataset=_pairs(200, seed=1),
        processing_class=tokenizer,
    )  # fmt: skip
    before = trainer.evaluate()["eval_accuracy"]
    trainer.train()
    after = trainer.evaluate()
    assert before < 0.65
    assert after["eval_accuracy"] >= 0.75, after
    assert after["eval_margin"] > 0 and after["eval_chosen_score"] > after["eval_rejected_score"]


def test_saved_checkpoint_reloads_with_the_auto_class_and_scores_like_the_trainer(tokenizer, policy_path, tmp_path):
    pairs = _pairs(16, seed=2)
    trainer = PPMTrainer(
        policy_path, args=_args(tmp_path, max_steps=3, self_evolution_round=2), train_dataset=pairs,
        processing_class=tokenizer,
    )  # fmt: skip
    trainer.train()
    trainer.save_model()
    out = trainer.args.output_dir

    reloaded, info = AutoModelForSequenceClassification.from_pretrained(out, output_loading_info=True)
    assert type(reloaded).__name__ == "LlamaForSequenceClassification" and reloaded.config.num_labels == 1
    assert not any(info.values()), info  # no missing, unexpected, mismatched or newly initialised weights
    trainer_scores = trainer.predict(trainer.train_dataset).predictions  # (pairs, 2) raw scores
    questions = [_question(int(p.split("Sam has ")[1].split()[0])) for p in pairs["prompt"]]
    assert [format_prompt(q) for q in questions] == pairs["prompt"]
    values = TransformersPPMScorer(out, batch_size=5).score(questions, list(pairs["chosen"]))
    by_hand = value_from_score(torch.tensor(trainer_scores[:, 0]), trainer.args.value_transform)  # the default's
    assert values == pytest.approx(by_hand.tolist(), abs=1e-5)

    card = open(f"{out}/README.md").read()
    assert "2501.04519" in card and "self-evolution round | 2" in card and "16 kept of 16" in card


def test_lora_trains_the_score_head_and_merges_into_a_standard_checkpoint(tokenizer, policy_path, tmp_path):
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    trainer = PPMTrainer(
        policy_path, args=_args(tmp_path, max_steps=3, learning_rate=1e-2), train_dataset=_pairs(16, seed=3),
        processing_class=tokenizer, peft_config=lora,
    )  # fmt: skip
    base = trainer.model.get_base_model()
    head_before = base.score.modules_to_save["default"].weight.detach().clone()
    embed_before = base.model.embed_tokens.weight.detach().clone()
    trainable = {name for name, p in trainer.model.named_parameters() if p.requires_grad}
    assert any("score" in name for name in trainable) and any("lora_" in name for name in trainable)
    trainer.train()
    assert not torch.equal(base.score.modules_to_save["default"].weight, head_before)
    assert torch.equal(base.model.embed_tokens.weight, embed_before)

    trainer.save_model()
    assert (tmp_path / "out" / "adapter_model.safetensors").exists()
    scores = trainer.predict(trainer.train_dataset).predictions
    merged_dir = str(tmp_path / "merged")
    trainer.model.merge_and_unload().save_pretrained(merged_dir)
    reloaded, info = AutoModelForSequenceClassification.from_pretrained(merged_dir, output_loading_info=True)
    assert not any(info.values()), info
    pairs = _pairs(16, seed=3)
    texts = [ppm_text(p, c) for p, c in zip(pairs["prompt"], pairs["chosen"])]
    assert _auto_scores(reloaded, tokenizer, texts) == pytest.approx(scores[:, 0].tolist(), abs=1e-4)


@pytest.mark.parametrize("loss_type", ["orm", "pqm"])
def test_baseline_losses_train(tokenizer, tmp_path, loss_type):
    if loss_type == "pqm":
        rng = random.Random(0)
        rows = [
            {"prompt": format_prompt(_question(a)), "completion": _step(x), "label": 1.0 if x == a else -0.5}
            for a, x in ((rng.randrange(10), rng.randrange(10)) for _ in range(16))
        ]
        dataset, metric = datasets.Dataset.from_list(rows), "mse"
    else:  # whole trajectories after the question
        dataset = _pairs(16, seed=4).map(lambda row: {"rejected": row["rejected"] + "print(x)\n<end_of_code>"})
        metric = "accuracy"
    trainer = PPMTrainer(
        _model(tokenizer), args=_args(tmp_path, loss_type=loss_type), train_dataset=dataset, eval_dataset=dataset,
        processing_class=tokenizer,
    )  # fmt: skip
    trainer.train()
    logged = trainer.state.log_history[0]
    assert math.isfinite(logged["loss"]) and metric in logged
    assert f"eval_{metric}" in trainer.evaluate()


@pytest.mark.parametrize(
    ("loss_type", "columns", "missing"),
    [("ppm", ["prompt", "chosen"], "rejected"), ("orm", ["chosen", "rejected"], "prompt"),
     ("pqm", ["prompt", "completion"], "label")],
)  # fmt: skip
def test_missing_columns_are_named(tokenizer, tmp_path, loss_type, columns, missing):
    full = {"prompt": "p", "chosen": "a", "rejected": "b", "completion": "c", "label": 0.5}
    dataset = datasets.Dataset.from_list([{c: full[c] for c in columns}])
    with pytest.raises(ValueError, match=f"'{missing}'"):
        PPMTrainer(_model(tokenizer), args=_args(tmp_path, loss_type=loss_type), train_dataset=dataset,
                   processing_class=tokenizer)  # fmt: skip


@pytest.mark.parametrize(
    ("row", "message"),
    [({"weight": -1.0}, "weights"), ({"weight": float("nan")}, "weights")],
)
def test_negative_or_nan_weights_are_refused(tokenizer, tmp_path, row, message):
    dataset = datasets.Dataset.from_list([{"prompt": "p ", "chosen": "a", "rejected": "b", **row}])
    with pytest.raises(ValueError, match=message):
        PPMTrainer(_model(tokenizer), args=_args(tmp_path), train_dataset=dataset, processing_class=tokenizer)


def test_pqm_labels_outside_minus_one_one_are_refused(tokenizer, tmp_path):
    dataset = datasets.Dataset.from_list([{"prompt": "p ", "completion": "a", "label": 2.0}])
    with pytest.raises(ValueError, match=r"\[-1, 1\]"):
        PPMTrainer(_model(tokenizer), args=_args(tmp_path, loss_type="pqm"), train_dataset=dataset,
                   processing_class=tokenizer)  # fmt: skip


def test_tokenizer_without_pad_token_pads_with_eos(tokenizer, tmp_path):
    no_pad = copy.deepcopy(tokenizer)
    no_pad.pad_token = None
    assert no_pad.pad_token is None
    trainer = PPMTrainer(_model(tokenizer), args=_args(tmp_path), train_dataset=_HAND_PAIRS, processing_class=no_pad)
    assert trainer.processing_class.pad_token == no_pad.eos_token
    assert trainer.model.config.pad_token_id == no_pad.eos_token_id
    trainer.train()


def test_empty_steps_and_identical_pairs_are_dropped_and_counted(tokenizer, tmp_path):
    prompt = format_prompt(_question(1))
    rows = [
        {"prompt": prompt, "chosen": _step(1), "rejected": _step(2)},
        {"prompt": prompt, "chosen": _step(1), "rejected": _step(1)},  # identical
        {"prompt": prompt, "chosen": "  \n", "rejected": _step(2)},  # empty step
        {"prompt": prompt, "chosen": _step(1), "rejected": ""},  # empty step
        {"prompt": prompt, "chosen": _step(1), "rejected": _step(1) + "print(x)\n"},  # a step extending the other
    ]
    trainer = PPMTrainer(
        _model(tokenizer), args=_args(tmp_path), train_dataset=datasets.Dataset.from_list(rows),
        processing_class=tokenizer,
    )  # fmt: skip
    stats = trainer.dataset_stats["train"]
    assert stats == {
        "examples": 5, "kept": 2, "truncated": 0, "dropped_empty_step": 2, "dropped_identical": 1,
        "dropped_step_too_long": 0,
    }  # fmt: skip
    assert len(trainer.train_dataset) == 2
    extended = trainer.train_dataset[1]
    assert extended["chosen_ids"] and extended["rejected_ids"]  # each side keeps its own last token


def test_long_prefixes_lose_their_start_never_the_step(tokenizer, tmp_path):
    long_prompt = format_prompt(_question(4) + " The coins are old." * 30)
    rows = [
        {"prompt": long_prompt, "chosen": _step(4), "rejected": _step(6) + "print(x)\n"},
        {"prompt": "Q ", "chosen": _step(4) * 20, "rejected": _step(6)},  # the step alone is too long
    ]
    max_length = 64
    trainer = PPMTrainer(
        _model(tokenizer), args=_args(tmp_path, max_length=max_length), train_dataset=datasets.Dataset.from_list(rows),
        processing_class=tokenizer,
    )  # fmt: skip
    stats = trainer.dataset_stats["train"]
    assert (stats["kept"], stats["truncated"], stats["dropped_step_too_long"]) == (1, 1, 1)
    example = trainer.train_dataset[0]
    full_chosen = tokenizer(long_prompt + _step(4))["input_ids"]
    full_rejected = tokenizer(long_prompt + _step(6) + "print(x)\n")["input_ids"]
    assert full_chosen[-len(example["chosen_ids"]) :] == example["chosen_ids"]
    assert full_rejected[-len(example["rejected_ids"]) :] == example["rejected_ids"]
    assert len(example["prompt_ids"]) + max(len(example["chosen_ids"]), len(example["rejected_ids"])) == max_length
    shared = len(full_rejected) - len(example["rejected_ids"])
    assert example["prompt_ids"] == full_rejected[shared - len(example["prompt_ids"]) : shared]


def test_scorer_returns_tanh_of_the_auto_class_logits_in_input_order(tokenizer):
    model = _model(tokenizer, seed=1).eval()
    with torch.no_grad():
        model.score.weight.mul_(50.0)  # large raw scores: values must still lie in [-1, 1]
    questions = [_question(a) for a in (3, 14, 159, 2)]
    partial = [_step(3), _step(14) * 3, "", _step(2) * 2]
    values = TransformersPPMScorer(model, tokenizer=tokenizer, device="cpu", batch_size=3).score(questions, partial)
    scores = _auto_scores(model, tokenizer, [format_prompt(q) + s for q, s in zip(questions, partial)])
    assert values == pytest.approx([math.tanh(s) for s in scores], abs=1e-5)
    assert all(-1.0 <= v <= 1.0 for v in values)


def test_scorer_keeps_the_last_max_length_tokens(tokenizer):
    model = _model(tokenizer, seed=1).eval()
    question, partial = _question(5) + " Really." * 20, _step(5)
    scorer = TransformersPPMScorer(model, tokenizer=tokenizer, device="cpu", max_length=32)
    values = scorer.score([question], [partial])
    ids = tokenizer(format_prompt(question) + partial, return_tensors="pt")["input_ids"][:, -32:]
    with torch.no_grad():
        assert values[0] == pytest.approx(math.tanh(model(input_ids=ids).logits[0, 0].item()), abs=1e-5)


def _build(tokenizer, tmp_path, dataset):
    return PPMTrainer(_model(tokenizer), args=_args(tmp_path), train_dataset=dataset, processing_class=tokenizer)


def test_an_empty_dataset_is_a_clear_error(tokenizer, tmp_path):
    empty = datasets.Dataset.from_dict({"prompt": [], "chosen": [], "rejected": []})
    with pytest.raises(ValueError, match="train dataset is empty"):
        _build(tokenizer, tmp_path, empty)


def test_a_dataset_emptied_by_the_filters_is_a_clear_error(tokenizer, tmp_path):
    identical = datasets.Dataset.from_list([{"prompt": "Q: 1 + 1\n", "chosen": "x = 2\n", "rejected": "x = 2\n"}] * 3)
    with pytest.raises(ValueError, match="every example of the train dataset was dropped.*dropped_identical': 3"):
        _build(tokenizer, tmp_path, identical)


def test_conversational_data_is_refused_with_what_to_do(tokenizer, tmp_path):
    row = {"prompt": [{"role": "user", "content": "1 + 1?"}], "chosen": [{"role": "assistant", "content": "2"}],
           "rejected": [{"role": "assistant", "content": "3"}]}  # fmt: skip
    with pytest.raises(ValueError, match="conversational.*apply_chat_template"):
        _build(tokenizer, tmp_path, datasets.Dataset.from_list([row]))


def test_implicit_prompt_and_margin_columns_are_refused_with_the_reason(tokenizer, tmp_path):
    implicit = datasets.Dataset.from_list([{"chosen": "Q: 1 + 1\nx = 2\n", "rejected": "Q: 1 + 1\nx = 3\n"}])
    with pytest.raises(ValueError, match="explicit prompt"):
        _build(tokenizer, tmp_path, implicit)
    margin = datasets.Dataset.from_list([{"prompt": "Q\n", "chosen": "x = 2\n", "rejected": "x = 3\n", "margin": 1.0}])
    with pytest.raises(ValueError, match="'margin' column"):
        _build(tokenizer, tmp_path, margin)


def test_gradient_checkpointing_gives_the_same_update(tokenizer, tmp_path):
    # The recipes' 7B path trains with gradient checkpointing: on CPU it must give the plain update (same loss, same
    # gradient), through the packed prefix|chosen|rejected rows and their block attention mask.
    pairs = _HAND_PAIRS.select([0, 2])
    updates = []
    for checkpointing in (False, True):
        model = _model(tokenizer)
        before = {name: p.detach().clone() for name, p in model.named_parameters()}
        args = _args(tmp_path / str(checkpointing), max_steps=1, optim="sgd", learning_rate=1.0,
                     lr_scheduler_type="constant", max_grad_norm=0.0, weight_decay=0.0,
                     gradient_checkpointing=checkpointing)  # fmt: skip
        trainer = PPMTrainer(model, args=args, train_dataset=pairs, processing_class=tokenizer)
        trainer.train()
        updates.append((trainer.state.log_history[0]["loss"],
                        {name: p.detach() - before[name] for name, p in model.named_parameters()}))  # fmt: skip
    (loss_plain, plain), (loss_ckpt, ckpt) = updates
    assert loss_ckpt == pytest.approx(loss_plain, rel=1e-5)
    assert any(float(u.abs().max()) > 0 for u in plain.values())
    for name in plain:
        torch.testing.assert_close(ckpt[name], plain[name], rtol=1e-4, atol=1e-6)


def test_default_precision_trains_on_cpu(tokenizer, tmp_path):
    # PPMConfig's own precision default (bf16 unless told otherwise on a GPU) must still train on a CPU-only machine.
    args = _args(tmp_path, max_steps=1)
    defaults = PPMConfig(output_dir=str(tmp_path / "defaults"), use_cpu=True, report_to="none")
    args.bf16, args.fp16 = defaults.bf16, defaults.fp16
    trainer = PPMTrainer(_model(tokenizer), args=args, train_dataset=_pairs(8, seed=0), processing_class=tokenizer)
    trainer.train()
    assert trainer.state.global_step == 1 and math.isfinite(trainer.state.log_history[0]["loss"])
