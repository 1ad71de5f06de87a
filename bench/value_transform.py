"""Experiment: which PPM value transform (arXiv 2501.04519 §3.3, Eq. 4) to default to, measured on the tiny default.

The PPM's value of a raw score r is tanh(r / scale) (`rstar_trl.ppm.ValueTransform`); the Bradley-Terry loss (Eq. 4)
sees either r or that value (`train_through_tanh`). Variants:

| variant | training (Eq. 4 on) | value at inference |
|---|---|---|
| a | raw r | tanh(r) (the paper's linear + tanh head read literally; older rstar_trl checkpoints) |
| b | raw r (the same model as a) | tanh(r / 5) (the authors' public code) |
| c | tanh(r) (the tanh head trained end to end) | tanh(r) |
| d | tanh(r / 5) | tanh(r / 5) |
| none | no PPM: Q from terminal rewards only (reference) | - |

Every PPM is trained the way a round trains its PPM (`PPMTrainer` from the round's policy, with the round's ppm_*
settings from its round.json, i.e. recipes/tiny/round2.yaml) on the round's preference pairs, split BY PROBLEM
into train and held-out (default 80/20, fixed seed). Metrics:

- held-out pair accuracy (share of held-out pairs whose chosen step scores higher). a and b are the same trained
  model and tanh is monotonic, so their pair accuracy is identical by construction; only the search can tell
  them apart.
- problems solved by PPM-guided MCTS (the PPM initialises Q, Eq. 3) with the search settings of
  recipes/tiny/round3.yaml (a PPM-guided data-generation round), on tiny train problems that no round searches
  (default 1500-1699 of `tiny_splits()["train"]`; rounds search the first 512).
- test-time accuracy of PPM-guided MCTS (`Evaluator`, method `mcts@RxC`, answers valued by the PPM, no gold
  answer in the search) on the same problems.

Resumable: each trained PPM (`models/<training>/DONE.json`), each search (shards under `search/<variant>/`) and
each result (`results/<variant>.<search|eval>.json`) is skipped when already there.

    OMP_NUM_THREADS=1 .venv/bin/python bench/value_transform.py --round_dir runs/fid/round_2 \\
        --output_dir runs/fid/value_transform [--variants none a b c d] [--problems 1500:1700] \\
        [--eval_methods mcts@8x5]

Prints a markdown table and, last, one JSON line with every variant's numbers.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import random
import subprocess
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import datasets
import torch
import yaml
from _common import cpu_extensions, print_cpu

from rstar_trl.hub import load_dataset_folder
from rstar_trl.ppm import (
    PPMConfig,
    PPMTrainer,
    TransformersPPMScorer,
    ValueTransform,
    build_preference_pairs,
    build_sft_dataset,
    value_from_score,
)
from rstar_trl.search import MCTSConfig, MCTSGenerator
from rstar_trl.tiny import tiny_splits, to_dataset

logger = logging.getLogger("value_transform")

# Training runs (the transform the loss sees; the scale of "raw" only sets what its checkpoint records).
TRAININGS = {
    "raw": ValueTransform(scale=1.0, train_through_tanh=False),
    "tanh": ValueTransform(scale=1.0, train_through_tanh=True),
    "tanh5": ValueTransform(scale=5.0, train_through_tanh=True),
}
# variant -> (training, value transform at inference, label)
VARIANTS = {
    "none": (None, None, "no PPM (Q from terminal rewards only)"),
    "a": ("raw", ValueTransform(1.0, False), "(a) Eq. 4 on raw r, value tanh(r)"),
    "b": ("raw", ValueTransform(5.0, False), "(b) Eq. 4 on raw r, value tanh(r/5)"),
    "c": ("tanh", ValueTransform(1.0, True), "(c) Eq. 4 on tanh(r), value tanh(r)"),
    "d": ("tanh5", ValueTransform(5.0, True), "(d) Eq. 4 on tanh(r/5), value tanh(r/5)"),
}


def _read_json(path: str) -> dict | None:
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def _write_json(path: str, data: dict) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(f"{path}.tmp", "w") as f:
        json.dump(data, f, indent=2, default=str)
    os.replace(f"{path}.tmp", path)


def split_pairs(
    pairs: datasets.Dataset, heldout_fraction: float, seed: int, fold: int = 0
) -> tuple[datasets.Dataset, datasets.Dataset, list[int]]:
    """Train / held-out pairs, split BY PROBLEM (`problem_index`): no problem has pairs on both sides.

    The problems are shuffled with `seed` and cut into round(1 / heldout_fraction) folds; fold `fold` is held out
    (fold 0 is the split the searched PPMs are trained on; the other folds give cross-validated pair accuracy, every
    pair held out exactly once)."""
    problems = sorted(set(pairs["problem_index"]))
    random.Random(seed).shuffle(problems)
    folds = max(2, round(1 / heldout_fraction))
    bounds = [round(k * len(problems) / folds) for k in range(folds + 1)]
    heldout = set(problems[bounds[fold] : bounds[fold + 1]])
    is_heldout = [p in heldout for p in pairs["problem_index"]]
    train = pairs.select([i for i, h in enumerate(is_heldout) if not h])
    held = pairs.select([i for i, h in enumerate(is_heldout) if h])
    return train, held, sorted(heldout)


def train_ppm(
    name: str,
    round_dir: str,
    out: str,
    train: datasets.Dataset,
    held: datasets.Dataset,
    seed: int | None = None,
    fold: int = 0,
) -> dict:
    """A PPM as the round's `_train_ppm` trains it (same settings from round.json), with transform `name`, on the
    train pairs of split `fold`; `seed` replaces the round's training seed (for the spread over seeds)."""
    suffix = ("" if seed is None else f"-seed{seed}") + ("" if fold == 0 else f"-fold{fold}")
    folder = os.path.join(out, "models", name + suffix)
    done = _read_json(os.path.join(folder, "DONE.json"))
    if done is not None:
        return done
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, set_seed

    from rstar_trl.rounds import RoundArguments, _trainer_settings

    lineage = _read_json(os.path.join(round_dir, "round.json"))
    # Round folders written by earlier versions: settings since moved (unsolved_rollouts, from the round's settings to
    # the search's) or added are taken from where they are now, or left at their defaults.
    saved_round, saved_search = lineage["config"]["round"], lineage["config"]["search"]
    round_fields = {f.name for f in dataclasses.fields(RoundArguments)}
    round_args = RoundArguments(**{k: v for k, v in saved_round.items() if k in round_fields})
    moved = {k: v for k, v in saved_round.items() if k not in round_fields}
    search = MCTSConfig(**{f.name: {**moved, **saved_search}[f.name] for f in dataclasses.fields(MCTSConfig)
                           if f.name in {**moved, **saved_search}})  # fmt: skip
    settings = {**_trainer_settings(round_args, "ppm", folder, search), "disable_tqdm": True}
    if seed is not None:
        settings["seed"] = seed
    set_seed(settings["seed"])  # the new score head's init too: every training of one seed starts from one model
    policy = os.path.join(round_dir, "policy")
    tokenizer = AutoTokenizer.from_pretrained(policy)
    model = AutoModelForSequenceClassification.from_pretrained(policy, num_labels=1, dtype="auto")
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (
            tokenizer.eos_token_id)  # fmt: skip
    transform = TRAININGS[name]
    config = PPMConfig(
        self_evolution_round=round_args.round, value_scale=transform.scale,
        train_through_tanh=transform.train_through_tanh, **settings,
    )  # fmt: skip
    trainer = PPMTrainer(model=model, args=config, train_dataset=train, processing_class=tokenizer)
    t0 = time.perf_counter()
    output = trainer.train()
    trainer.save_model(folder)
    raw = trainer.predict(trainer._prepare_dataset(held, tokenizer, config, "heldout")).predictions  # (pairs, 2)
    info = {
        "training": name,
        "transform": transform.to_dict(),
        "train_pairs": len(train),
        "heldout_pairs": len(raw),
        "train_loss": output.training_loss,
        "global_step": output.global_step,
        "train_time_s": round(time.perf_counter() - t0, 1),
        "heldout_pair_accuracy": float((raw[:, 0] > raw[:, 1]).mean()),
        "heldout_raw_scores": raw.tolist(),
        "settings": {k: v for k, v in settings.items() if k != "output_dir"},
    }
    _write_json(os.path.join(folder, "DONE.json"), info)
    return info


def value_stats(raw_scores: list[list[float]], transform: ValueTransform) -> dict:
    """How the search sees the held-out steps: mean |value|, the share at |value| > 0.99 (saturated)."""
    values = value_from_score(torch.tensor(raw_scores, dtype=torch.float64), transform).flatten()
    return {
        "mean_abs_value": round(values.abs().mean().item(), 4),
        "saturated_share": round((values.abs() > 0.99).double().mean().item(), 4),
        "heldout_value_accuracy": round((values.view(-1, 2)[:, 0] > values.view(-1, 2)[:, 1]).double().mean().item(),
                                        4),
    }  # fmt: skip


def search_settings(path: str) -> dict:
    """The `MCTSConfig` settings of a round recipe (YAML), without its output_dir."""
    with open(path) as f:
        recipe = yaml.safe_load(f)
    names = {f.name for f in dataclasses.fields(MCTSConfig)} - {"output_dir"}
    return {k: v for k, v in recipe.items() if k in names}


def run_search(variant: str, policy: str, scorer, problems: datasets.Dataset, settings: dict, out: str) -> dict:
    path = os.path.join(out, "results", f"{variant}.search.json")
    done = _read_json(path)
    if done is not None:
        return done
    config = MCTSConfig(**{**settings, "output_dir": os.path.join(out, "search", variant)})
    t0 = time.perf_counter()
    with MCTSGenerator(policy, args=config, train_dataset=problems, ppm=scorer) as generator:
        trees = generator.generate()
        stats = generator.stats
    solved = list(trees["solved"])
    levels = sorted(set(problems["level"]))
    info = {
        "solved": sum(solved),
        "problems": len(solved),
        "solved_by_level": {
            str(level): f"{sum(s for s, lv in zip(solved, problems['level']) if lv == level)}/"
            f"{sum(lv == level for lv in problems['level'])}"
            for level in levels
        },
        "search_time_s": round(time.perf_counter() - t0, 1),
        "stats": stats,
        "config": dataclasses.asdict(config),
    }
    _write_json(path, info)
    return info


def tree_data(variant: str, policy: str, scorer, problems: datasets.Dataset, settings: dict, recipe: str, out: str):
    """The training data a round would build from the variant's trees (the scale changes Q, so which pairs pass the
    Q gap and which solutions rank first): preference pairs and SFT rows with the round recipe's settings."""
    path = os.path.join(out, "results", f"{variant}.data.json")
    done = _read_json(path)
    if done is not None:
        return done
    from rstar_trl.rounds import RoundArguments

    with open(recipe) as f:
        round_settings = {k: v for k, v in yaml.safe_load(f).items() if k in RoundArguments.__dataclass_fields__}
    round_args = RoundArguments(**round_settings)
    config = MCTSConfig(**{**settings, "output_dir": os.path.join(out, "search", variant)})
    with MCTSGenerator(policy, args=config, train_dataset=problems, ppm=scorer) as generator:
        trees = generator.generate()  # the saved trees: nothing is searched again
    pairs, pair_stats = build_preference_pairs(
        trees, min_q_gap=round_args.pairs_min_q_gap, per_side=round_args.pairs_per_side, return_stats=True
    )
    sft, sft_stats = build_sft_dataset(trees, top_k=round_args.sft_top_k, return_stats=True)
    info = {
        "pairs": len(pairs),
        "pair_stats": pair_stats,
        "pair_keys": [f"{k}:{p}:{c}:{r}" for k, p, c, r in zip(pairs["kind"], pairs["problem_index"],
                                                                 pairs["chosen_node"], pairs["rejected_node"])],
        "sft_rows": len(sft),
        "sft_keys": [f"{p}:{c}" for p, c in zip(sft["problem_index"], sft["completion"])],
    }  # fmt: skip
    _write_json(path, info)
    return info


def run_eval(variant: str, policy: str, ppm_dir: str, scorer, problems, settings: dict, methods, out: str) -> dict:
    path = os.path.join(out, "results", f"{variant}.eval.json")
    done = _read_json(path)
    if done is not None:
        return done
    try:
        from rstar_trl.evaluation import EvalConfig, Evaluator

        config = EvalConfig(model_name_or_path=policy, ppm_path=ppm_dir, methods=list(methods), output_dir=None,
                            **settings)  # fmt: skip
        with Evaluator(policy, args=config, eval_dataset=problems, ppm=scorer) as evaluator:
            results = evaluator.evaluate()
    except Exception as exc:  # the evaluation API may be under refactoring: report, don't lose the search results
        logger.exception("evaluation of variant %s failed", variant)
        return {"error": f"{type(exc).__name__}: {exc}"}
    info = {
        m["method"]: {
            "accuracy": m["accuracy"],
            "correct": m["correct"],
            "tokens_per_problem": m["tokens_per_problem"],
        }
        for m in results["methods"]
    }
    _write_json(path, info)
    return info


def table(rows: list[dict], methods: list[str]) -> str:
    head = ["variant", "held-out pair acc.", "held-out values at abs > 0.99", "solved by search (round-3 settings)",
            "pairs from its trees (same as a)", "SFT rows (same as a)"]  # fmt: skip
    head += [f"test-time {m}" for m in methods]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        acc = "-" if row.get("heldout_pair_accuracy") is None else f"{100 * row['heldout_pair_accuracy']:.1f}%"
        if row.get("cv_pair_accuracy") is not None:
            acc += f"; all folds {100 * row['cv_pair_accuracy']:.1f}% of {row['cv_pairs']}"
        if len(row.get("heldout_pair_accuracy_seeds", [])) > 1:
            seeds = row["heldout_pair_accuracy_seeds"]
            acc += f" (seeds: {', '.join(f'{100 * a:.1f}' for a in seeds)}; mean {100 * sum(seeds) / len(seeds):.1f}%)"
        sat = "-" if row.get("saturated_share") is None else f"{100 * row['saturated_share']:.1f}%"
        search = row.get("search") or {}
        solved = f"{search['solved']}/{search['problems']}" if search else "-"
        data, reference = row.get("data") or {}, next((r.get("data") for r in rows if r["variant"] == "a"), None)
        pairs = sft = "-"
        if data:
            same = reference and len(set(data["pair_keys"]) & set(reference["pair_keys"]))
            pairs = f"{data['pairs']}" + (f" ({same})" if reference else "")
            same = reference and len(set(data["sft_keys"]) & set(reference["sft_keys"]))
            sft = f"{data['sft_rows']}" + (f" ({same})" if reference else "")
        cells = [row["label"], acc, sat, solved, pairs, sft]
        for m in methods:
            result = (row.get("eval") or {}).get(m)
            cells.append(f"{100 * result['accuracy']:.1f}% ({result['correct']})" if result else "-")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--round_dir", default="runs/fid/round_2", help="A finished round (pairs/, policy/).")
    parser.add_argument("--output_dir", default="runs/fid/value_transform")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--problems", default="1500:1700", help="Slice of tiny_splits()['train'] searched.")
    parser.add_argument("--search_config", default="recipes/tiny/round3.yaml", help="Search settings (a round).")
    parser.add_argument("--eval_methods", nargs="*", default=["mcts@8x5"], help="Test-time methods (none: skip).")
    parser.add_argument("--heldout_fraction", type=float, default=0.2)
    parser.add_argument("--split_seed", type=int, default=0)
    parser.add_argument(
        "--no_cross_validation", action="store_true",
        help="Skip the other folds (cross-validated pair accuracy: one more PPM per fold and training).",
    )  # fmt: skip
    parser.add_argument(
        "--extra_seeds", type=int, nargs="*", default=[],
        help="Also train each PPM with these seeds (pair accuracy only; the search uses the round's seed).",
    )  # fmt: skip
    args = parser.parse_args()
    print_cpu()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    datasets.disable_progress_bars()
    torch.set_num_threads(1)
    out = args.output_dir
    os.makedirs(out, exist_ok=True)

    pairs = load_dataset_folder(os.path.join(args.round_dir, "pairs"))
    train, held, heldout_problems = split_pairs(pairs, args.heldout_fraction, args.split_seed)
    _write_json(os.path.join(out, "split.json"), {"round_dir": args.round_dir, "train_pairs": len(train),
                                                  "heldout_pairs": len(held), "heldout_problems": heldout_problems,
                                                  "seed": args.split_seed})  # fmt: skip
    logger.info("pairs: %d train, %d held out (%d problems)", len(train), len(held), len(heldout_problems))
    start, stop = (int(x) for x in args.problems.split(":"))
    problems = to_dataset(tiny_splits()["train"][start:stop])
    settings = search_settings(args.search_config)
    policy = os.path.join(args.round_dir, "policy")

    rows = []
    for variant in args.variants:
        training, transform, label = VARIANTS[variant]
        row: dict = {"variant": variant, "label": label}
        scorer, ppm_dir = None, None
        if training is not None:
            trained = train_ppm(training, args.round_dir, out, train, held)
            ppm_dir = os.path.join(out, "models", training)
            accuracies = [trained["heldout_pair_accuracy"]] + [
                train_ppm(training, args.round_dir, out, train, held, seed)["heldout_pair_accuracy"]
                for seed in args.extra_seeds
            ]
            row["heldout_pair_accuracy_seeds"] = accuracies
            if not args.no_cross_validation:
                correct = total = 0
                for fold in range(max(2, round(1 / args.heldout_fraction))):
                    fold_train, fold_held, _ = split_pairs(pairs, args.heldout_fraction, args.split_seed, fold)
                    raw = train_ppm(training, args.round_dir, out, fold_train, fold_held, fold=fold)
                    correct += sum(c > r for c, r in raw["heldout_raw_scores"])
                    total += len(raw["heldout_raw_scores"])
                row.update(cv_pair_accuracy=correct / total, cv_pairs=total)
            row.update(training=training, transform=transform.to_dict(),
                       heldout_pair_accuracy=trained["heldout_pair_accuracy"], heldout_pairs=trained["heldout_pairs"],
                       **value_stats(trained["heldout_raw_scores"], transform))  # fmt: skip
            scorer = TransformersPPMScorer(ppm_dir, device="cpu", max_length=1024, value_transform=transform)
        logger.info("variant %s: search", variant)
        row["search"] = run_search(variant, policy, scorer, problems, settings, out)
        row["data"] = tree_data(variant, policy, scorer, problems, settings, args.search_config, out)
        if scorer is not None and args.eval_methods:
            logger.info("variant %s: test-time %s", variant, args.eval_methods)
            row["eval"] = run_eval(variant, policy, ppm_dir, scorer, problems, settings, args.eval_methods, out)
        rows.append(row)
        print(table(rows[-1:], args.eval_methods or []), flush=True)

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    print(f"\nround {args.round_dir}, problems {args.problems} of the tiny train split, commit {commit}\n")
    print(table(rows, args.eval_methods or []))
    summary = [{k: v for k, v in row.items() if k not in ("search", "data")} | {
        "search": {k: row["search"][k] for k in ("solved", "problems", "solved_by_level", "search_time_s")},
        "data": {k: row["data"][k] for k in ("pairs", "sft_rows")}} for row in rows]  # fmt: skip
    print(json.dumps({"round_dir": args.round_dir, "problems": args.problems, "command": " ".join(sys.argv),
                      "variants": summary, "cpu": cpu_extensions()}))  # fmt: skip


if __name__ == "__main__":
    main()
