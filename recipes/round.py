"""One round of rStar-Math self-evolution (paper §3.4): search, SFT data and preference pairs, policy SFT, PPM.

    accelerate launch recipes/round.py                          # round 1 of the embedded tiny default, no downloads
    accelerate launch recipes/round.py --config recipes/tiny/round2.yaml            # the next round, same run folder
    accelerate launch --config_file recipes/accelerate_configs/multi_gpu.yaml recipes/round.py \\
        --config recipes/rstar-math/qwen2.5-math-7b/round1.yaml --push_to_hub --hub_org my-org

Without --config, the tiny recipe of the round gives the settings (recipes/tiny/round<k>.yaml for --round k,
default 1); command-line options override the config file. Everything goes under
--output_dir/round_<k>/{trees,sft,pairs,policy,ppm}; a re-run of the same command skips finished stages and resumes
an interrupted search (and, with --save_steps, an interrupted training). A stage made with other settings or inputs
than the command's is refused before any compute, naming the stage and each differing field; --redo STAGE[,STAGE]
(or --redo all) recomputes those stages and every stage after them. --use_peft trains LoRA adapters (TRL's
ModelConfig options: --lora_r, --lora_alpha, --lora_dropout, --lora_target_modules, ...) for the policy and the PPM,
merged into the saved checkpoints. With --push_to_hub each of the five is pushed, with its card, to
--hub_repo_pattern (default {org}/{run}-round{round}-{artifact}). A failed push (no network, no token) leaves the
round complete locally and prints the `hf upload` command that pushes it later.
"""

import logging
import os
import sys

from trl import TrlParser

from rstar_trl.rounds import RoundArguments, RoundModelConfig, RoundSearchConfig, plan_round, run_round

RECIPES = os.path.dirname(os.path.abspath(__file__))


def default_config(argv: list[str]) -> list[str]:
    """Without --config: the tiny recipe of the requested round (--round k, default 1)."""
    if "--config" in argv or any(a in argv for a in ("-h", "--help")):
        return argv
    round_number = "1"
    for i, arg in enumerate(argv):
        if arg == "--round" and i + 1 < len(argv):
            round_number = argv[i + 1]
        elif arg.startswith("--round="):
            round_number = arg.split("=", 1)[1]
    config = os.path.join(RECIPES, "tiny", f"round{round_number}.yaml")
    return ["--config", config, *argv] if os.path.exists(config) else argv


def main(args: RoundArguments, search: RoundSearchConfig, lora: RoundModelConfig | None = None) -> None:
    try:
        plan = plan_round(args, search, lora)  # every check happens here, before any compute
    except (ValueError, FileNotFoundError) as exc:
        raise SystemExit(f"error: {exc}") from exc
    result = run_round(args, search, plan)
    if not result.is_main_process:
        return
    if len(result.infos) < 5:
        again = " and --redo (which would start those stages over)" if args.redo else ""
        print(f"\nRound {plan.round} stopped after {args.stop_after} (--stop_after): {plan.round_dir}. Re-run "
              f"without --stop_after{again} to go on.")  # fmt: skip
        return
    trees = result.infos["trees"]
    print(f"\nRound {plan.round} done: the search solved {trees['num_solved']}/{trees['num_problems']} problems "
          f"({100 * trees['solved_rate']:.1f}%).")  # fmt: skip
    for name, label in (("trees", "MCTS trees"), ("sft", "SFT data"), ("pairs", "PPM pairs"),
                        ("policy", "policy"), ("ppm", "PPM")):  # fmt: skip
        info = result.infos[name]
        if name in ("policy", "ppm"):
            detail = f"{info['global_step']} steps on {info['rows']} {'pairs' if name == 'ppm' else 'rows'}"
        else:
            detail = f"{info['num_problems']} problems" if name == "trees" else f"{info['rows']} rows"
        print(f"  {label:<11} {plan.path(name)}  ({detail})")
    print(f"  lineage     {os.path.join(plan.round_dir, 'round.json')}")
    for artifact, url in result.pushed.items():
        print(f"  pushed {artifact:<6} {url}")
    if result.push_errors:
        for message in result.push_errors.values():
            print(f"\n{message}", file=sys.stderr)
        sys.exit(1)
    print(f"Next round: accelerate launch recipes/round.py --round {plan.round + 1} --output_dir {plan.run_dir}")


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    parser = TrlParser((RoundArguments, RoundSearchConfig, RoundModelConfig))
    main(*parser.parse_args_and_config(default_config(sys.argv[1:])))
