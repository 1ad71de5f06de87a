"""The embedded tiny default: seeded arithmetic word problems and a ~1 M-parameter policy built on CPU in minutes.

It lets every recipe (search, PPM training, self-evolution) run end to end without downloading anything.
"""

from .policy import build_tiny_policy
from .problems import generate_problems, tiny_splits, to_dataset

__all__ = ["build_tiny_policy", "generate_problems", "tiny_splits", "to_dataset"]
