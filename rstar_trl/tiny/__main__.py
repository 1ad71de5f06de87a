"""Build the tiny default policy from scratch: ``python -m rstar_trl.tiny --output_dir runs/my_tiny_policy``.

The package ships the policy this command builds with its defaults (seed 0, 600 bootstrap steps), so the recipes
start from the same weights on every machine and skip the build; see `rstar_trl.tiny.provide_tiny_policy`. To
refresh the shipped copy after changing the task or the build, run it with ``--output_dir`` set to the package's
``rstar_trl/tiny/bootstrap_policy`` folder.
"""

from __future__ import annotations

import argparse
import json
import os

from .policy import build_tiny_policy


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(
        prog="python -m rstar_trl.tiny",
        description="Build the embedded tiny default policy (tokenizer, ~1M-parameter Llama, bootstrap SFT on CPU).",
    )
    parser.add_argument("--output_dir", required=True, help="Folder of the checkpoint (Auto classes load it).")
    parser.add_argument("--seed", type=int, default=0, help="Seed of the problems, tokenizer, weights and data order.")
    parser.add_argument(
        "--bootstrap_steps", type=int, default=600, help="Optimizer steps of SFT on the bootstrap split (default 600)."
    )
    parser.add_argument("--overwrite", action="store_true", help="Replace a checkpoint already in --output_dir.")
    parser.add_argument("--quiet", action="store_true", help="No progress bar.")
    args = parser.parse_args(argv)
    if os.path.exists(os.path.join(args.output_dir, "config.json")) and not args.overwrite:
        parser.error(f"--output_dir {args.output_dir} already holds a checkpoint: choose another or pass --overwrite")
    out = build_tiny_policy(args.output_dir, seed=args.seed, bootstrap_steps=args.bootstrap_steps,
                            progress=not args.quiet)  # fmt: skip
    with open(os.path.join(out, "tiny_policy.json")) as f:
        info = json.load(f)
    print(
        f"built {out}: {info['num_parameters']:,} parameters, "
        f"loss {info['loss_start']:.3f} -> {info['loss_end']:.3f}, {info['build_seconds']:.0f} s, "
        f"weights sha256 {info['weights_sha256'][:16]}"
    )
    return out


if __name__ == "__main__":
    main()
