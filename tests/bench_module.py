"""Load a file of bench/ as a module: the benchmarks are scripts, not a package, but tests check their parts."""

import importlib.util
from pathlib import Path
from types import ModuleType


def bench_module(name: str) -> ModuleType:
    """The module of bench/<name>.py (loaded afresh each call)."""
    path = Path(__file__).resolve().parents[1] / "bench" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
