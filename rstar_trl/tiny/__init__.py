"""The embedded tiny default: seeded arithmetic word problems and a ~1 M-parameter policy built on CPU in minutes.

It lets every recipe (search, PPM training, self-evolution) run end to end without downloading anything. The
policy is shipped with the package (`SHIPPED_POLICY`, built by `python -m rstar_trl.tiny`), so every machine starts
from the same weights.
"""

from .policy import SHIPPED_POLICY, build_tiny_policy, provide_tiny_policy
from .problems import generate_problems, tiny_splits, to_dataset

__all__ = [
    "SHIPPED_POLICY",
    "build_tiny_policy",
    "generate_problems",
    "provide_tiny_policy",
    "tiny_splits",
    "to_dataset",
]
