#!/usr/bin/env bash
# Miniature reproduction of rStar-Math's claims on the embedded tiny default (results: docs/results.md).
#
#   bash recipes/tiny/reproduce.sh a [OUT]   # Table 3 in miniature: rounds 1-4, greedy accuracy of every policy
#   bash recipes/tiny/reproduce.sh b [OUT]   # Table 8 in miniature: PPM vs PQM vs ORM at the same search budget
#   bash recipes/tiny/reproduce.sh c [OUT]   # PPM-guided MCTS vs best-of-N vs maj@k vs greedy at matched tokens
#   bash recipes/tiny/reproduce.sh d [OUT]   # SFT data: MCTS trajectories vs rejection sampling vs random samples
#   bash recipes/tiny/reproduce.sh g [OUT]   # GRPO with round 2's PPM as reward; the round-2 PPM's quality report
#   python recipes/tiny/report.py a [OUT]    # then: tables, paired tests and verdicts of a part
#
# OUT defaults to runs/repro. Stages already finished there are skipped (every part reuses the rounds it needs),
# so the parts can run in any order and a killed part resumes. Everything is evaluated on the held-out synthetic
# test split (tiny-test, 2000 problems; parts b and c use its first 1000); nothing is tuned on it: the design and
# the claims are in docs/results.md, written before the first test run. Seeds are fixed (42), and the bootstrap
# policy ships with the package, so a re-run gives the same numbers.
set -euo pipefail
PART=${1:?usage: reproduce.sh a|b|c|d|g [OUT]}
OUT=${2:-runs/repro}
PY=${PY:-.venv/bin/python}
ACCELERATE=${ACCELERATE:-.venv/bin/accelerate}
NPROC=${NPROC:-2}  # processes for searches and evaluations (the machine's cores; NPROC=1: everything in one process)
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1} TOKENIZERS_PARALLELISM=false

round() {  # run round $1 of the tiny recipe into $OUT (skipped when finished)
  if [ "$NPROC" -gt 1 ]; then
    # The search (most of a round's time) runs in NPROC processes, one core each: trees are seeded per problem, so
    # they are the same as in one process. The training stages then run in one process, so the round's policy and
    # PPM are exactly what the single-process recipe (the README's main command) trains.
    "$ACCELERATE" launch --multi_gpu --num_processes "$NPROC" --num_machines 1 --mixed_precision no \
      --dynamo_backend no recipes/round.py --config "recipes/tiny/round$1.yaml" --output_dir "$OUT" --stop_after trees
  fi
  "$ACCELERATE" launch --num_processes 1 recipes/round.py --config "recipes/tiny/round$1.yaml" --output_dir "$OUT"
}

evaluate() {  # evaluate: $1 policy, $2 ppm ("" for greedy / maj), $3 output dir, $4 limit, rest: methods
  local policy=$1 ppm=$2 out=$3 limit=$4 launch=("$PY")
  shift 4
  [ -f "$out/results.json" ] && return 0  # finished earlier
  if [ "${EVAL_NPROC:-$NPROC}" -gt 1 ]; then  # the problems shared out over the cores; the same results as one process
    launch=("$ACCELERATE" launch --multi_gpu --num_processes "${EVAL_NPROC:-$NPROC}" --num_machines 1
            --mixed_precision no --dynamo_backend no)
  fi
  "${launch[@]}" recipes/eval.py --config recipes/tiny/eval.yaml --model_name_or_path "$policy" --ppm_path "$ppm" \
    --output_dir "$out" --limit "$limit" --methods "$@"  # extra options after the methods pass through
}

# Parts b and c's search budget, chosen on the first 200 validation problems with the round-4 policy and PPM, as
# registered (docs/results.md, "Pre-registration"): the largest candidate within best_of_n@16's tokens per problem.
choose_mcts() {
  if [ -z "${MCTS:-}" ]; then
    evaluate "$OUT/round_4/policy" "$OUT/round_4/ppm" "$OUT/eval/mcts_budget" 200 best_of_n@16 mcts@2x2x4:best \
      mcts@4x2x4:best mcts@4x4x4:best --dataset tiny-validation
    MCTS=$("$PY" recipes/tiny/report.py choose-mcts "$OUT")
  fi
  echo "search budget of parts b and c: $MCTS"
}

case "$PART" in
  a)
    for k in 1 2 3 4; do round "$k"; done
    batch=()
    for k in 0 1 2 3 4; do  # NPROC evaluations at a time, one core each (each is deterministic on its own)
      if [ "$k" = 0 ]; then
        EVAL_NPROC=1 evaluate "$OUT/tiny_policy" "" "$OUT/eval/a/round_0" 2000 greedy &
      else  # each round's policy and PPM cards get the round's numbers (--update_cards)
        EVAL_NPROC=1 evaluate "$OUT/round_$k/policy" "$OUT/round_$k/ppm" "$OUT/eval/a/round_$k" 2000 greedy \
          --update_cards &
      fi
      batch+=($!)
      if [ "${#batch[@]}" -ge "$NPROC" ] || [ "$k" = 4 ]; then
        for pid in "${batch[@]}"; do wait "$pid"; done
        batch=()
      fi
    done
    ;;
  b)
    for k in 1 2 3 4; do round "$k"; done
    choose_mcts
    pids=()
    for loss in pqm orm; do  # the two baselines train side by side, one core each
      [ -f "$OUT/round_4/$loss/baseline.json" ] || "$PY" recipes/reward_baselines.py --round_dir "$OUT/round_4" \
        --loss_type "$loss" > "$OUT/round_4/$loss.log" 2>&1 &
      pids+=($!)
      if [ "${#pids[@]}" -ge "$NPROC" ]; then wait "${pids[0]}" || true; pids=("${pids[@]:1}"); fi
    done
    for pid in "${pids[@]}"; do wait "$pid" || true; done  # a failure is reported below, with its log
    for loss in pqm orm; do
      [ -f "$OUT/round_4/$loss/baseline.json" ] || { echo "the $loss baseline failed: $OUT/round_4/$loss.log" >&2; exit 1; }
    done
    # One set of best-of-16 samples for the three reward models (the same policy and seeds draw the same samples):
    # the PPM's run draws them, the PQM's and the ORM's score them (--samples_from), as the registered design has it.
    evaluate "$OUT/round_4/policy" "$OUT/round_4/ppm" "$OUT/eval/b/ppm" 1000 best_of_n@16 "$MCTS"
    for rm in pqm orm; do
      evaluate "$OUT/round_4/policy" "$OUT/round_4/$rm" "$OUT/eval/b/$rm" 1000 best_of_n@16 "$MCTS" \
        --samples_from "$OUT/eval/b/ppm"
    done
    ;;
  c)
    for k in 1 2 3 4; do round "$k"; done
    choose_mcts
    evaluate "$OUT/round_4/policy" "$OUT/round_4/ppm" "$OUT/eval/c" 1000 greedy maj@4 maj@16 best_of_n@4 \
      best_of_n@16 "$MCTS"
    ;;
  d)
    round 1
    for kind in rejection random; do
      "$PY" recipes/sft_data_baselines.py --round_dir "$OUT/round_1" --kind "$kind"
    done
    evaluate "$OUT/round_1/policy" "" "$OUT/eval/d/mcts" 2000 greedy
    for kind in rejection random; do
      evaluate "$OUT/round_1/sft_baselines/$kind/policy" "" "$OUT/eval/d/$kind" 2000 greedy
    done
    ;;
  g)  # the PPM beyond search (docs/results.md section 4): GRPO with round 2's PPM as reward, and its quality report
    for k in 1 2 3; do round "$k"; done
    [ -f "$OUT/grpo_round_2/grpo.json" ] || "$PY" recipes/grpo.py --config recipes/tiny/grpo.yaml \
      --round_dir "$OUT/round_2" --output_dir "$OUT/grpo_round_2"
    evaluate "$OUT/grpo_round_2" "" "$OUT/eval/grpo_round_2" 2000 greedy
    quality="$OUT/eval_ppm/round_2"
    [ -f "$quality/pairs/results.json" ] || "$PY" recipes/eval_ppm.py --ppm_path "$OUT/round_2/ppm" \
      --pairs "$OUT/round_3/pairs" --exclude_pairs "$OUT/round_2/pairs" --output_dir "$quality/pairs"
    [ -f "$quality/pairs_new_questions/results.json" ] || "$PY" recipes/eval_ppm.py --ppm_path "$OUT/round_2/ppm" \
      --pairs "$OUT/round_3/pairs" --exclude_pairs "$OUT/round_2/pairs" --exclude_by question \
      --output_dir "$quality/pairs_new_questions"
    [ -f "$quality/processbench/results.json" ] || "$PY" recipes/eval_ppm.py --ppm_path "$OUT/round_2/ppm" \
      --processbench tiny-validation --output_dir "$quality/processbench"
    ;;
  *) echo "unknown part $PART (a, b, c, d or g)" >&2; exit 2 ;;
esac
