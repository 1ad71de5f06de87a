"""Evaluate a policy (and a PPM) by greedy decoding, majority voting, best-of-N, PPM-weighted voting, PPM-guided MCTS
(one search, or T independent searches with an answer-selection rule) and step-level beam search, each at its budget;
compare them at matched compute (generated tokens per problem). The methods run through the inference API
(`rstar_trl.solve.Solver`, which never sees the gold answers); this recipe grades and reports.

    python recipes/eval.py --model_name_or_path runs/tiny/round_1/policy --methods greedy maj@4 maj@16 --limit 50
    python recipes/eval.py --config recipes/tiny/eval.yaml                    # all methods on the tiny test split
    python recipes/eval.py --config recipes/tiny/eval.yaml --model_name_or_path runs/tiny/round_2/policy \\
        --ppm_path runs/tiny/round_2/ppm --output_dir runs/eval/round_2
    python recipes/eval.py --config recipes/rstar-math/qwen2.5-math-7b/eval.yaml   # the paper's test-time setting
    python recipes/eval.py --model_name_or_path path/to/policy --dataset HuggingFaceH4/MATH-500 \\
        --backend vllm --gpu_memory_utilization 0.9 --methods greedy maj@64
    accelerate launch --num_processes 8 recipes/eval.py --config ...   # each process solves every 8th problem
    python recipes/eval.py --config ... --ppm_path other/ppm --samples_from runs/eval/round_2 --output_dir ...
                                        # best_of_n of another PPM on the same samples (no new sampling)

Methods (see --methods and rstar_trl/solve.py): greedy; maj@K (vote of K samples); best_of_n@N[:last|min|mean|prod]
(the PPM's best of N samples, step values aggregated); weighted_maj@N (vote weighted by (v + 1) / 2 of the PPM's
value); mcts@RxC (ONE PPM-guided search, R rollouts x C candidates); mcts@TxRxC[:best|vote|topK] (T independent
searches, answer by best PPM score, PPM-weighted vote, or majority vote among the K best-scored searches); beam@BxK
(beam width B, K candidates per beam and step). Writes results.json (summary and per-problem answers, scores and
candidates), results.md (the table, with 95% Wilson intervals), accuracy_vs_tokens.png and, when it draws samples,
samples.jsonl (what --samples_from reads) to --output_dir. Under `accelerate launch` (on CPU: --multi_gpu, one core
per process) the problems are shared out; seeds depend on problems, not processes, so the results are the same.
"""

import logging
import os

from trl import TrlParser

from rstar_trl.evaluation import EvalConfig, Evaluator, add_eval_to_cards, write_report


def main(args: EvalConfig) -> None:
    if args.model_name_or_path is None:
        raise SystemExit("--model_name_or_path is required: the policy to evaluate (e.g. runs/tiny/round_1/policy)")
    for name in ("model_name_or_path", "ppm_path"):
        path = getattr(args, name)
        # A Hub id is "org/name"; anything else that does not exist locally is a wrong path.
        if path and not os.path.exists(path) and (path.startswith((".", "/")) or path.count("/") > 1):
            raise SystemExit(f"--{name} {path!r} does not exist")
    with Evaluator(args=args) as evaluator:
        results = evaluator.evaluate()
        if not evaluator.solver.state.is_main_process:  # every process has the results; the main one reports
            return
    paths = write_report(results, args.output_dir)
    print("\n" + open(paths["results.md"]).read())
    for path in paths.values():
        print(f"Wrote {path}")
    if args.update_cards:
        for card in add_eval_to_cards(results, [args.model_name_or_path, args.ppm_path]):
            print(f"Updated the model card {card}")


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    parser = TrlParser((EvalConfig,))
    try:
        (eval_args,) = parser.parse_args_and_config()
    except ValueError as exc:  # bad settings (unknown method, PPM method without --ppm_path): no traceback
        raise SystemExit(f"error: {exc}") from None
    main(eval_args)
