import os

import pytest

# Nothing in the test suite may reach the Hugging Face Hub: models and tokenizers are built locally.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_policy(tmp_path_factory) -> str:
    """A tiny policy (the default architecture, a shorter bootstrap) built once per test session, from nothing."""
    from rstar_trl.tiny import build_tiny_policy

    path = str(tmp_path_factory.mktemp("tiny_policy"))
    return build_tiny_policy(path, bootstrap_steps=250, progress=False)
