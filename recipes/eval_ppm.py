"""How good is a trained PPM, before search uses it: accuracy on held-out preference pairs and first-error
localisation on ProcessBench-layout data (rstar_trl/ppm/quality.py; arXiv 2501.04519 §3.3, arXiv 2412.06559).

    # held-out pairs: another round's pairs (searched by another policy), minus any pair the PPM trained on
    python recipes/eval_ppm.py --ppm_path runs/tiny/round_2/ppm --pairs runs/tiny/round_3/pairs \\
        --exclude_pairs runs/tiny/round_2/pairs --output_dir runs/eval_ppm/round_2
    # first-error localisation on tiny problems with injected wrong steps (built on the fly, 400 rows)
    python recipes/eval_ppm.py --ppm_path runs/tiny/round_2/ppm --processbench tiny-validation
    # ProcessBench itself (plain-text steps, joined with "\\n\\n"); the threshold chosen on another dataset
    python recipes/eval_ppm.py --ppm_path path/to/ppm --processbench Qwen/ProcessBench --processbench_split gsm8k \\
        --threshold_from runs/eval_ppm/math/results.json --ppm_backend vllm
    python recipes/eval_ppm.py --config my_settings.yaml

Pairs (`--pairs`): rows with `prompt`, `chosen`, `rejected` as `build_preference_pairs` writes them (a round's
pairs/ folder, a JSON/JSONL/parquet file or a Hub dataset). Each side is scored as `PPMTrainer` read it,
`ppm_text(prompt, step)`; the accuracy is the share of pairs whose chosen step scores higher (a tie counts as half,
or as wrong with --ties wrong), with a 95% Wilson interval. It means something only on pairs the PPM was NOT trained
on: another round's pairs, a held-out split or slice (--pairs_split "train[80%:]"), and --exclude_pairs drops any
pair that is also in the training pairs.

ProcessBench layout (`--processbench`): rows with `problem`, `steps` (list of str) and `label` (0-based index of the
first wrong step, -1 if none). Every prefix steps[:i+1] is scored; the predicted first error is the first step whose
value is below --threshold (-1 if none); error acc (label != -1, found exactly), correct acc (label == -1, predicted
-1) and their harmonic mean F1 are reported, with an F1 sweep over thresholds that is chosen on the evaluated data
itself (an oracle, not a result). `tiny-validation` / `tiny-test` / `tiny-train` build rows from the tiny task with
injected wrong steps (`make_tiny_processbench`; `python -m rstar_trl.ppm tiny-processbench --output FILE`
writes them to a file).

Writes results.json (the numbers, per-pair scores and per-row step values) and results.md (the tables) to
--output_dir, prints the tables, and with --update_cards puts them in the PPM checkpoint's README.md, one section per
dataset, replaced on a re-run.
"""

import json
import logging
import os
import time
from dataclasses import asdict, dataclass, field

from trl import TrlParser

import rstar_trl
from rstar_trl.ppm import load_ppm_scorer, read_value_transform
from rstar_trl.ppm.quality import (
    DEFAULT_THRESHOLD_GRID,
    RAW_PROMPT,
    TIE_RULES,
    add_quality_to_card,
    load_examples,
    make_tiny_processbench,
    pair_accuracy,
    processbench_report,
    quality_markdown,
    score_processbench,
    validate_pairs,
    validate_processbench,
    write_quality_report,
)
from rstar_trl.solve import ppm_scorer_options

TINY_SPLITS = {"tiny-validation": "validation", "tiny-test": "test", "tiny-train": "train"}


@dataclass
class EvalPPMConfig:
    """Settings of recipes/eval_ppm.py (every field is a command-line flag and a YAML key of --config)."""

    ppm_path: str | None = field(
        default=None,
        metadata={"help": "The PPM checkpoint to evaluate (folder or Hub id), e.g. runs/tiny/round_2/ppm."},
    )
    pairs: str | None = field(
        default=None,
        metadata={"help": "Held-out preference pairs (prompt/chosen/rejected, as build_preference_pairs writes them): "
                  "a round's pairs/ folder, a JSON/JSONL/parquet file or a Hub dataset id. Use pairs the PPM was NOT "
                  "trained on (e.g. the next round's pairs, or a held-out split)."},
    )  # fmt: skip
    pairs_split: str | None = field(
        default=None,
        metadata={"help": "Split of --pairs, in the datasets syntax with slices (e.g. 'test', 'train[1000:]'); a "
                  "local file or folder has one split, 'train'. Default: its only split."},
    )  # fmt: skip
    exclude_pairs: str | None = field(
        default=None,
        metadata={"help": "The PPM's training pairs (same kinds of source as --pairs): pairs of --pairs with the same "
                  "prompt and steps (either way round) are dropped and counted, so that only held-out pairs count."},
    )  # fmt: skip
    exclude_by: str = field(
        default="pair",
        metadata={"help": "What --exclude_pairs drops: 'pair' (the same prompt and steps) or 'question' (every pair "
                  "on a question the training pairs have; the strict reading of held-out when rounds search the same "
                  "problems). The question is read out of the prompt with --prompt_template.",
                  "choices": ["pair", "question"]},
    )  # fmt: skip
    processbench: str | None = field(
        default=None,
        metadata={"help": "First-error data in ProcessBench's layout (problem, steps, label): a JSON/JSONL/parquet "
                  "file, a dataset folder, a Hub id (e.g. Qwen/ProcessBench with --processbench_split gsm8k), or "
                  "tiny-validation / tiny-test / tiny-train to build rows from the tiny task with injected wrong "
                  "steps (--tiny_rows, --tiny_error_fraction, --tiny_seed)."},
    )  # fmt: skip
    processbench_split: str | None = field(
        default=None,
        metadata={"help": "Split of --processbench (Qwen/ProcessBench: gsm8k, math, olympiadbench, omnimath); slices "
                  "allowed. Default: its only split."},
    )  # fmt: skip
    tiny_rows: int = field(default=400, metadata={"help": "--processbench tiny-*: rows (the split's first problems)."})
    tiny_error_fraction: float = field(
        default=0.5, metadata={"help": "--processbench tiny-*: share of rows with an injected wrong step."}
    )
    tiny_seed: int = field(default=0, metadata={"help": "--processbench tiny-*: seed of the injected errors."})
    limit: int | None = field(
        default=None, metadata={"help": "Evaluate only the first N pairs and the first N ProcessBench rows."}
    )
    ties: str = field(
        default="half",
        metadata={"help": "A pair whose two steps score the same counts as half a correct pair ('half') or as a "
                  "wrong one ('wrong'); ties are counted either way.", "choices": list(TIE_RULES)},
    )  # fmt: skip
    compare: str = field(
        default="raw",
        metadata={"help": "Pairs: compare the raw scores r ('raw', what the Bradley-Terry loss of Eq. 4 compares) or "
                  "the values tanh(r / scale) ('value', which can tie where tanh saturates).",
                  "choices": ["raw", "value"]},
    )  # fmt: skip
    threshold: float = field(
        default=0.0,
        metadata={"help": "First-error threshold in value space [-1, 1]: a step whose value is below it is the "
                  "predicted error. 0: the sign of the value (a tanh of a Bradley-Terry score)."},
    )  # fmt: skip
    threshold_from: str | None = field(
        default=None,
        metadata={"help": "A results.json of an earlier run on OTHER data: its oracle threshold (the best F1 there) "
                  "replaces --threshold. The honest way to use a tuned threshold."},
    )  # fmt: skip
    threshold_grid: list[float] = field(
        default_factory=lambda: list(DEFAULT_THRESHOLD_GRID),
        metadata={"help": "Thresholds of the F1 sweep (default -0.95 to 0.95 by 0.05). Its best F1 is chosen on the "
                  "evaluated data itself: an optimistic oracle, not a result."},
    )  # fmt: skip
    step_separator: str = field(
        default="auto",
        metadata={"help": "How steps are joined into a partial solution: 'auto' (concatenated as written when every "
                  "step ends with one of our step markers, else '\\n\\n'), or the separator itself with backslash "
                  "escapes ('\\n\\n', '\\n', or '' for none)."},
    )  # fmt: skip
    prompt_template: str = field(
        default="policy",
        metadata={"help": "The prompt the PPM reads ProcessBench problems in: 'policy', 'few_shot' or a template with "
                  "a {question} field (the one its training pairs were built with). Pairs carry their own prompt "
                  "(the template only reads their question for --exclude_by question)."},
    )  # fmt: skip
    ppm_backend: str = field(
        default="transformers",
        metadata={"help": "PPM engine: 'transformers' or 'vllm' (pooling runner).",
                  "choices": ["transformers", "vllm"]},
    )  # fmt: skip
    ppm_batch_size: int = field(default=32, metadata={"help": "Texts per PPM forward pass (transformers)."})
    ppm_max_length: int | None = field(
        default=2048, metadata={"help": "Tokens of a PPM input kept (the last ones), as in training."}
    )
    ppm_gpu_memory_utilization: float | None = field(
        default=None, metadata={"help": "ppm_backend='vllm': share of GPU memory the engine reserves (default: vLLM "
                                "backend's default)."}
    )  # fmt: skip
    dtype: str = field(default="auto", metadata={"help": "ppm_backend='vllm': model dtype."})
    device: str | None = field(
        default=None, metadata={"help": "ppm_backend='transformers': device (default: CUDA if available, else CPU)."}
    )
    rows_per_call: int = field(
        default=32, metadata={"help": "Pairs or ProcessBench rows per scorer call (all their texts in one batch)."}
    )
    output_dir: str = field(default="runs/eval_ppm", metadata={"help": "Folder of results.json and results.md."})
    update_cards: bool = field(
        default=False,
        metadata={"help": "Add the report to the PPM's model card (README.md of a local --ppm_path), one section per "
                  "dataset, replaced on a re-run; the rest of the card is kept."},
    )  # fmt: skip


def _separator(setting: str) -> str | None:
    """None for 'auto', else the separator with its backslash escapes decoded."""
    return None if setting == "auto" else setting.encode().decode("unicode_escape")


def _threshold_from(path: str) -> tuple[float, str]:
    try:
        with open(path) as f:
            earlier = json.load(f)
        oracle = earlier["processbench"]["oracle"]
        return float(oracle["threshold"]), f"oracle of {earlier['processbench']['dataset']}"
    except FileNotFoundError:
        raise SystemExit(f"--threshold_from {path!r} does not exist") from None
    except (ValueError, KeyError, TypeError) as exc:
        raise SystemExit(
            f"--threshold_from {path!r}: not a results.json of recipes/eval_ppm.py with a ProcessBench oracle "
            f"threshold ({type(exc).__name__}: {exc})"
        ) from None


def _load(name: str, source: str, split: str | None, limit: int | None):
    try:
        return load_examples(source, split=split, limit=limit)
    except FileNotFoundError:
        raise SystemExit(f"--{name} {source!r} does not exist") from None
    except ValueError as exc:
        raise SystemExit(f"--{name} {source!r}: {exc}") from None


def _label(source: str, split: str | None, limit: int | None) -> str:
    """How a dataset is named in the report and the card (a card keeps one section per name)."""
    return source + (f" [{split}]" if split else "") + (f" (first {limit})" if limit else "")


def _scorer(args: EvalPPMConfig):
    """The PPM scorer, reading questions as whole prompts (the report formats them)."""
    return load_ppm_scorer(args.ppm_path, args.ppm_backend, **ppm_scorer_options(args, RAW_PROMPT))


def main(args: EvalPPMConfig) -> dict:
    if args.ppm_path is None:
        raise SystemExit("--ppm_path is required: the PPM checkpoint to evaluate (e.g. runs/tiny/round_2/ppm)")
    path = args.ppm_path
    if not os.path.exists(path) and (path.startswith((".", "/", "~")) or path.count("/") > 1):
        raise SystemExit(f"--ppm_path {path!r} does not exist")
    if os.path.isdir(path) and not os.path.isfile(os.path.join(path, "config.json")):
        raise SystemExit(f"--ppm_path {path!r} is not a checkpoint folder (no config.json)")
    if not args.pairs and not args.processbench:
        raise SystemExit("nothing to evaluate: pass --pairs (held-out preference pairs) and/or --processbench")
    for name in ("limit", "rows_per_call", "ppm_batch_size", "tiny_rows"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise SystemExit(f"--{name} must be >= 1, got {value}")
    if not -1 <= args.threshold <= 1:
        raise SystemExit(f"--threshold must be in [-1, 1] (PPM values are), got {args.threshold}")
    threshold, threshold_source = args.threshold, "default" if args.threshold == 0.0 else "--threshold"
    if args.threshold_from:
        threshold, threshold_source = _threshold_from(args.threshold_from)

    # Read and check all the data before loading the model.
    pairs = exclude = rows = None
    if args.pairs:
        pairs = _load("pairs", args.pairs, args.pairs_split, args.limit)
        if args.exclude_pairs:
            exclude = _load("exclude_pairs", args.exclude_pairs, None, None)
        try:
            validate_pairs(pairs, f"--pairs {args.pairs}")
            if exclude is not None:
                validate_pairs(exclude, f"--exclude_pairs {args.exclude_pairs}")
        except ValueError as exc:
            raise SystemExit(str(exc)) from None
    if args.processbench in TINY_SPLITS:
        from datasets import Dataset

        try:
            built = make_tiny_processbench(args.tiny_rows, TINY_SPLITS[args.processbench], args.tiny_error_fraction,
                                           args.tiny_seed)  # fmt: skip
        except ValueError as exc:
            raise SystemExit(f"--processbench {args.processbench}: {exc}") from None
        rows = Dataset.from_list(built[: args.limit] if args.limit else built)
        made = f"{args.tiny_rows} rows, errors {args.tiny_error_fraction:g}, seed {args.tiny_seed}"
        pb_dataset = _label(f"{args.processbench} ({made})", None, args.limit)
    elif args.processbench:
        rows = _load("processbench", args.processbench, args.processbench_split, args.limit)
        pb_dataset = _label(args.processbench, args.processbench_split, args.limit)
    if rows is not None:
        try:
            validate_processbench(rows, f"--processbench {args.processbench}")
        except ValueError as exc:
            raise SystemExit(str(exc)) from None

    start = time.perf_counter()
    results: dict = {
        "ppm": args.ppm_path,
        "ppm_backend": args.ppm_backend,
        "value_transform": read_value_transform(args.ppm_path).to_dict(),
        "settings": asdict(args),
        "rstar_trl_version": rstar_trl.__version__,
    }
    with _scorer(args) as scorer:
        if pairs is not None:
            try:
                section = pair_accuracy(scorer, pairs, ties=args.ties, exclude=exclude, exclude_by=args.exclude_by,
                                        prompt_template=args.prompt_template, compare=args.compare,
                                        rows_per_call=args.rows_per_call, source=f"--pairs {args.pairs}")  # fmt: skip
            except ValueError as exc:
                raise SystemExit(str(exc)) from None
            results["pairs"] = {"dataset": _label(args.pairs, args.pairs_split, args.limit), "source": args.pairs,
                                "split": args.pairs_split, "exclude": args.exclude_pairs, **section}  # fmt: skip
        if rows is not None:
            try:
                values, separator = score_processbench(scorer, rows, prompt_template=args.prompt_template,
                                                       step_separator=_separator(args.step_separator),
                                                       rows_per_call=args.rows_per_call)  # fmt: skip
            except ValueError as exc:
                raise SystemExit(f"--processbench {args.processbench}: {exc}") from None
            labels = list(rows["label"])
            report = processbench_report(labels, values, threshold, args.threshold_grid)
            ids = rows["id"] if "id" in rows.column_names else list(range(len(rows)))
            results["processbench"] = {
                "dataset": pb_dataset,
                "source": args.processbench,
                "split": args.processbench_split,
                "num_rows": len(rows),
                "step_separator": separator,
                "prompt_template": args.prompt_template,
                "threshold": threshold,
                "threshold_source": threshold_source,
                **{k: report[k] for k in ("at_threshold", "sweep", "oracle")},
                "rows": [
                    {"id": i, "label": label, "prediction": pred, "values": v}
                    for i, label, pred, v in zip(ids, labels, report["predictions"], values)
                ],
            }
    results["time_s"] = time.perf_counter() - start

    paths = write_quality_report(results, args.output_dir)
    print("\n" + quality_markdown(results))
    for written in paths.values():
        print(f"Wrote {written}")
    if args.update_cards:
        card = add_quality_to_card(results, args.ppm_path) if os.path.isdir(args.ppm_path) else None
        print(f"Updated the model card {card}" if card else f"No model card to update: {args.ppm_path}/README.md")
    return results


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    parser = TrlParser((EvalPPMConfig,))
    try:
        (config,) = parser.parse_args_and_config()
    except ValueError as exc:
        raise SystemExit(f"error: {exc}") from None
    main(config)
