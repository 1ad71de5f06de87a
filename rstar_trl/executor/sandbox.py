"""`PythonExecutor`: a warm pool of sandboxed worker processes for policy-written code.

Why hand-written: MCTS checks every candidate step by running its cumulative program, tens of thousands of
short programs per minute, written by a model. None of our dependencies runs untrusted code: `exec` in the
caller has no isolation (the public rStar code does exactly that), and a process per call pays interpreter
start-up (~0.5 s with sympy) every time. See the README's "Sandbox threat model" for what is and is not
contained.
"""

from __future__ import annotations

import json
import os
import select
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from functools import cache
from pathlib import Path

_WORKER = Path(__file__).with_name("_worker.py")
_HEADER = struct.Struct(">I")
# A program can write to the reply pipe itself, so a frame is read with a deadline and a size cap.
_MAX_FRAME = 64 * 2**20
_FRAME_GRACE_S = 1.0
DEFAULT_PRELOAD = ("math", "cmath", "fractions", "decimal", "itertools", "functools", "collections", "statistics",
                   "random", "re", "numpy", "sympy")  # fmt: skip
# Environment variables that are safe and useful to pass through; everything else is dropped.
_ENV_PASSTHROUGH = ("LANG", "LC_ALL", "OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")


# How many processes of a launch run on this node: torchrun / `accelerate launch` (LOCAL_WORLD_SIZE), then MPI
# launchers (Intel MPI, Open MPI, MVAPICH), the same variables accelerate reads.
_LOCAL_PROCESSES_VARIABLES = ("LOCAL_WORLD_SIZE", "MPI_LOCALNRANKS", "OMPI_COMM_WORLD_LOCAL_SIZE",
                              "MV2_COMM_WORLD_LOCAL_SIZE")  # fmt: skip


def local_processes() -> int:
    """The processes of this launch on this node (1 outside a multi-process launch)."""
    for name in _LOCAL_PROCESSES_VARIABLES:
        value = os.environ.get(name, "").strip()
        if value.isdigit() and int(value) > 0:
            return int(value)
    return 1


def default_workers() -> int:
    """Default sandbox workers of one process: its share of the node's CPUs, at least 1.

    Under `accelerate launch` / torchrun with N processes per node, each process creates its own executor, so each
    gets cpu_count // N workers instead of cpu_count (which would oversubscribe the node N times). A process pinned
    to fewer CPUs (taskset, cgroup cpusets) gets at most those."""
    cpus = os.cpu_count() or 1
    share = cpus // local_processes()
    if hasattr(os, "sched_getaffinity"):
        share = min(share, len(os.sched_getaffinity(0)))
    return max(1, share)


@dataclass(frozen=True)
class ExecutionResult:
    """What running one program gave.

    Args:
        ok: the program ran to the end without an exception (``sys.exit(0)`` counts as ok).
        output: what it printed (or the value of a final bare expression), capped; a cut is marked.
        error: ``"ExceptionType (line n): message"`` when not ok, else None.
        timed_out: the wall-clock limit was hit (the worker was killed and replaced).
    """

    ok: bool
    output: str
    error: str | None = None
    timed_out: bool = False


@cache
def _namespace_prefix() -> tuple[str, ...]:
    """The `unshare` command line that puts a worker in its own network, PID and mount namespaces, if allowed.

    Root can create namespaces directly; other users need unprivileged user namespaces. Tried once per process.
    """
    unshare = shutil.which("unshare")
    if unshare is None or not sys.platform.startswith("linux"):
        return ()
    base = [unshare, "--net", "--pid", "--fork", "--mount-proc", "--kill-child"]
    for prefix in (base, [*base[:1], "--map-root-user", *base[1:]]):
        try:
            probe = subprocess.run([*prefix, "true"], capture_output=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            continue
        if probe.returncode == 0:
            return tuple(prefix)
    return ()


class _Worker:
    """One sandboxed worker process and the pipes to it."""

    def __init__(self, executor: PythonExecutor):
        self.workdir = tempfile.mkdtemp(prefix="rstar-sandbox-")
        request_r, self.request_w = os.pipe()
        self.reply_r, reply_w = os.pipe()
        config = {
            "request_fd": request_r,
            "reply_fd": reply_w,
            "preload": list(executor.preload),
            "memory_mb": executor.memory_mb,
            "output_limit": executor.output_limit,
            "max_file_bytes": executor.max_file_bytes,
            "recursion_limit": executor.recursion_limit,
            "hidden_roots": [str(Path.home())],
            "private_mounts": bool(executor.namespace_prefix),
            "audit_hooks": executor.audit_hooks,
        }
        env = {k: os.environ[k] for k in _ENV_PASSTHROUGH if k in os.environ}
        env.update(
            PATH="/usr/bin:/bin", HOME=self.workdir, TMPDIR=self.workdir, PYTHONHASHSEED="0",
            PYTHONDONTWRITEBYTECODE="1", OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", MKL_NUM_THREADS="1",
        )  # fmt: skip
        self.log_path = self.workdir + ".log"  # the worker's stderr until it is ready; read if it fails to start
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(
                [*executor.namespace_prefix, sys.executable, "-I", str(_WORKER), json.dumps(config)],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=log,
                cwd=self.workdir,
                env=env,
                pass_fds=(request_r, reply_w),
                start_new_session=True,  # own process group: a timeout kills everything the worker started
            )
        os.close(request_r)
        os.close(reply_w)
        self.ready = False
        self.layers: dict[str, object] = {}  # the sandbox layers the worker reported in its ready frame
        self.request: tuple[int, str, float] | None = None  # (batch index, code, deadline)

    def fileno(self) -> int:
        return self.reply_r

    def send(self, request_id: int, code: str) -> None:
        data = json.dumps({"id": request_id, "code": code}).encode("utf-8", "surrogatepass")
        view = memoryview(_HEADER.pack(len(data)) + data)
        while view:
            view = view[os.write(self.request_w, view) :]

    def receive(self, deadline: float) -> dict | None:
        """Read one frame (called when the pipe is readable). None means the worker died, or broke the protocol:
        a frame still incomplete at `deadline` (at least a short grace from now) or longer than any real one."""
        deadline = max(deadline, time.monotonic() + _FRAME_GRACE_S)
        header = self._read_exact(_HEADER.size, deadline)
        size = _HEADER.unpack(header)[0] if header else _MAX_FRAME + 1
        body = self._read_exact(size, deadline) if size <= _MAX_FRAME else None
        if body is None:
            return None
        try:
            message = json.loads(body)
        except ValueError:
            return None
        return message if isinstance(message, dict) else None

    def _read_exact(self, n: int, deadline: float) -> bytes | None:
        chunks = []
        while n:
            try:
                if not select.select([self.reply_r], [], [], max(0.0, deadline - time.monotonic()))[0]:
                    return None
                chunk = os.read(self.reply_r, min(n, 2**20))
            except OSError:
                return None
            if not chunk:
                return None
            chunks.append(chunk)
            n -= len(chunk)
        return b"".join(chunks)

    def startup_log(self) -> str:
        try:
            return Path(self.log_path).read_text(errors="replace")[-2000:]
        except OSError:
            return ""

    def kill(self) -> None:
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        self.process.wait()
        for fd in (self.request_w, self.reply_r):
            try:
                os.close(fd)
            except OSError:
                pass
        shutil.rmtree(self.workdir, ignore_errors=True)
        try:
            os.unlink(self.log_path)
        except OSError:
            pass


class PythonExecutor:
    """Run untrusted Python programs in a warm pool of sandboxed worker processes.

    Each program runs as a fresh `__main__` module inside a long-lived worker (modules such as sympy are imported
    once, at start-up), with its own private temporary directory and a scrubbed environment, under resource
    limits, a seccomp filter, Landlock, no capabilities and audit hooks, and, where the OS allows, in its own
    network, PID and mount namespaces with a read-only file system. `isolation` says which layers are active.
    What a program prints is its output (or, like the REPL, the value of a final bare expression). Results are
    cached by program text, because the cumulative programs of sibling MCTS nodes repeat.

    Args:
        timeout: wall-clock seconds per program; on expiry the worker is killed and replaced.
        memory_mb: address space a worker may add on top of its start-up footprint (0: no limit).
        max_workers: worker processes running programs in parallel (default: `default_workers()`, the CPUs this
            process may use divided by the processes of the launch on this node, at least 1).
        output_limit: characters of output kept per program; longer output is cut and marked.
        preload: modules imported once per worker before the sandbox is locked.
        cache_size: how many results to remember by program text (0 disables the cache).
        isolate_namespaces: put workers in new network/PID/mount namespaces when the OS allows it.
        audit_hooks: install the Python-level guard (default). Turn it off only to test the OS-level layers alone.

    Example:
        >>> with PythonExecutor(timeout=5) as executor:
        ...     executor.run("print(6 * 7)").output
        '42\\n'
    """

    def __init__(
        self,
        timeout: float = 10.0,
        memory_mb: int = 1024,
        max_workers: int | None = None,
        output_limit: int = 4096,
        preload: tuple[str, ...] = DEFAULT_PRELOAD,
        cache_size: int = 100_000,
        max_file_bytes: int = 16 * 2**20,
        recursion_limit: int = 3000,
        isolate_namespaces: bool = True,
        audit_hooks: bool = True,
    ):
        if timeout <= 0:
            raise ValueError(f"timeout must be positive, got {timeout}")
        if memory_mb < 0:
            raise ValueError(f"memory_mb must be >= 0, got {memory_mb}")
        self.timeout = timeout
        self.memory_mb = memory_mb
        self.max_workers = default_workers() if max_workers is None else max_workers
        if self.max_workers < 1:
            raise ValueError(f"max_workers must be >= 1, got {max_workers}")
        self.output_limit = output_limit
        self.preload = tuple(preload)
        self.max_file_bytes = max_file_bytes
        self.recursion_limit = recursion_limit
        self.namespace_prefix = _namespace_prefix() if isolate_namespaces else ()
        self.audit_hooks = audit_hooks
        self.cache_size = cache_size
        self._cache: OrderedDict[str, ExecutionResult] = OrderedDict()
        self._lock = threading.Lock()
        self._workers: list[_Worker] = []
        self._next_id = 0
        self.stats = {"programs": 0, "cache_hits": 0, "timeouts": 0, "worker_restarts": 0}
        self._closed = False
        self._workers = [_Worker(self) for _ in range(self.max_workers)]
        self._wait_ready(self._workers, deadline=time.monotonic() + 120)

    @property
    def isolation(self) -> dict[str, object]:
        """Which sandbox layers are active on this machine (as the workers report them).

        ``readonly_fs``: every mount but the worker's directory is read-only (needs the namespaces);
        ``seccomp``: the system-call filter is installed (x86_64 and aarch64 only); ``landlock``: the Landlock ABI
        version confining writes to the worker's directory (0: the kernel has none); ``capabilities_dropped``:
        the worker holds no capabilities, even as root.
        """
        layers = self._workers[0].layers if self._workers else {}
        return {
            "namespaces": "net,pid,mount" if self.namespace_prefix else None,
            "user_namespace": "--map-root-user" in self.namespace_prefix,
            "readonly_fs": bool(layers.get("readonly_fs")),
            "seccomp": bool(layers.get("seccomp")),
            "landlock": int(layers.get("landlock") or 0),
            "capabilities_dropped": bool(layers.get("capabilities_dropped")),
            "audit_hooks": self.audit_hooks,
            "rlimits": {"memory_mb": self.memory_mb, "file_bytes": self.max_file_bytes, "nproc": 0},
            "env_scrubbed": True,
        }

    # -- public API -------------------------------------------------------------------------------------------

    def run(self, code: str) -> ExecutionResult:
        """Run one program and return its result."""
        return self.run_batch([code])[0]

    def run_batch(self, codes: list[str]) -> list[ExecutionResult]:
        """Run many programs in parallel across the workers; results come back in input order."""
        if self._closed:
            raise RuntimeError("PythonExecutor is closed")
        with self._lock:
            results: list[ExecutionResult | None] = [None] * len(codes)
            pending: dict[str, list[int]] = {}
            for i, code in enumerate(codes):
                if not isinstance(code, str):
                    raise TypeError(f"codes[{i}] must be str, got {type(code).__name__}")
                cached = self._cache.get(code)
                if cached is not None:
                    self._cache.move_to_end(code)
                    self.stats["cache_hits"] += 1
                    results[i] = cached
                else:
                    pending.setdefault(code, []).append(i)  # duplicates in one batch run once
            for code, result in self._execute(list(pending)).items():
                self._remember(code, result)
                for i in pending[code]:
                    results[i] = result
            return results  # type: ignore[return-value]

    def close(self) -> None:
        """Stop all workers and remove their directories. Safe to call twice."""
        if self._closed:
            return
        self._closed = True
        for worker in self._workers:
            worker.kill()
        self._workers = []

    def __enter__(self) -> PythonExecutor:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass

    # -- scheduling -------------------------------------------------------------------------------------------

    def _remember(self, code: str, result: ExecutionResult) -> None:
        if self.cache_size <= 0:
            return
        self._cache[code] = result
        if len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)

    def _execute(self, codes: list[str]) -> dict[str, ExecutionResult]:
        """Dispatch programs to idle workers and collect replies, enforcing each program's deadline."""
        queue = list(reversed(codes))
        done: dict[str, ExecutionResult] = {}
        by_id: dict[int, str] = {}
        while queue or any(w.request for w in self._workers):
            for worker in self._workers:
                if worker.ready and worker.request is None and queue:
                    code = queue.pop()
                    self._next_id += 1
                    by_id[self._next_id] = code
                    worker.request = (self._next_id, code, time.monotonic() + self.timeout)
                    try:
                        worker.send(self._next_id, code)
                    except OSError:  # died while idle (killed from outside): replace, then retry the program
                        queue.append(code)
                        worker.request = None
                        self._replace(worker)
            waiting = [w for w in self._workers if w.request or not w.ready]
            deadline = min((w.request[2] for w in waiting if w.request), default=time.monotonic() + 60)
            readable, _, _ = select.select(waiting, [], [], max(0.0, deadline - time.monotonic()))
            for worker in readable:
                message = worker.receive(worker.request[2] if worker.request else time.monotonic())
                if not worker.ready:
                    self._on_startup(worker, message)
                    continue
                if message is None or worker.request is None or message.get("id") != worker.request[0]:
                    done[worker.request[1]] = self._crash_result(worker)
                    worker.request = None
                    self._replace(worker)
                    continue
                done[worker.request[1]] = ExecutionResult(
                    ok=bool(message.get("ok")),
                    output=str(message.get("output", "")),
                    error=None if message.get("error") is None else str(message["error"]),
                )
                self.stats["programs"] += 1
                worker.request = None
                if message.get("recycle"):
                    self._replace(worker)
            now = time.monotonic()
            for worker in self._workers:
                if worker.request and worker.request[2] <= now and worker not in readable:
                    self.stats["timeouts"] += 1
                    self.stats["programs"] += 1
                    done[worker.request[1]] = ExecutionResult(
                        ok=False, output="", error=f"TimeoutError: no result within {self.timeout:g} s", timed_out=True
                    )
                    worker.request = None
                    self._replace(worker)
        return done

    def _crash_result(self, worker: _Worker) -> ExecutionResult:
        self.stats["programs"] += 1
        code = worker.process.poll()
        if code is None:
            try:
                code = worker.process.wait(timeout=1)
            except subprocess.TimeoutExpired:
                code = None
        how = f"signal {-code}" if code is not None and code < 0 else f"exit status {code}"
        if code is None:  # still running: it sent no well-formed reply (a program can write to the reply pipe)
            how = "no well-formed reply"
        if code is not None and code > 128:  # the worker's keeper reports a signal n as 128 + n
            how = f"signal {code - 128}"
        return ExecutionResult(ok=False, output="", error=f"WorkerCrash: the worker process died ({how})")

    def _replace(self, worker: _Worker) -> None:
        """Kill a worker and start its replacement; the new one joins the pool when its ready frame arrives."""
        self.stats["worker_restarts"] += 1
        worker.kill()
        self._workers[self._workers.index(worker)] = _Worker(self)

    def _on_startup(self, worker: _Worker, message: dict | None) -> None:
        if message is None or not message.get("ready"):
            log = worker.startup_log()
            worker.kill()
            self.close()
            raise RuntimeError(f"sandbox worker failed to start:\n{log}")
        worker.ready = True
        worker.layers = message.get("layers", {})

    def _wait_ready(self, workers: list[_Worker], deadline: float) -> None:
        while not all(w.ready for w in workers):
            starting = [w for w in workers if not w.ready]
            readable, _, _ = select.select(starting, [], [], max(0.0, deadline - time.monotonic()))
            if not readable:
                self.close()
                raise RuntimeError("sandbox workers did not start within 120 s")
            for worker in readable:
                self._on_startup(worker, worker.receive(deadline))
