"""Sandbox worker: runs untrusted programs one at a time for `PythonExecutor`.

Started by the parent as ``python -I _worker.py CONFIG_JSON`` (stdlib only, so it runs without the package
on ``sys.path``). It preloads the modules programs commonly use, locks itself down (resource limits, audit
hooks), sends a ready frame, then serves requests read from its request pipe. Frames are a 4-byte big-endian
length followed by UTF-8 JSON. Standard streams point to /dev/null, so a program that writes straight to
fd 1 cannot corrupt the protocol.
"""

import ast
import builtins
import importlib
import io
import json
import os
import random
import resource
import shutil
import struct
import sys

_HEADER = struct.Struct(">I")


def _send(fd: int, message: dict) -> None:
    data = json.dumps(message).encode("utf-8", "replace")
    os.write(fd, _HEADER.pack(len(data)) + data)


def _recv(fd: int) -> dict | None:
    header = _read_exact(fd, _HEADER.size)
    if header is None:
        return None
    body = _read_exact(fd, _HEADER.unpack(header)[0])
    return None if body is None else json.loads(body)


def _read_exact(fd: int, n: int) -> bytes | None:
    chunks = []
    while n:
        chunk = os.read(fd, n)
        if not chunk:
            return None
        chunks.append(chunk)
        n -= len(chunk)
    return b"".join(chunks)


class _CappedOutput(io.TextIOBase):
    """A stdout that keeps the first `limit` characters and drops the rest (marking the cut)."""

    def __init__(self, limit: int):
        self.limit = limit
        self.parts: list[str] = []
        self.size = 0
        self.truncated = False
        self.buffer = _CappedBytes(self)

    def writable(self) -> bool:
        return True

    def write(self, text) -> int:
        if not isinstance(text, str):
            raise TypeError(f"write() argument must be str, not {type(text).__name__}")
        room = self.limit - self.size
        if room > 0:
            self.parts.append(text[:room])
            self.size += min(len(text), room)
        if len(text) > max(room, 0):
            self.truncated = True
        return len(text)

    def getvalue(self) -> str:
        return "".join(self.parts)


class _CappedBytes(io.RawIOBase):
    """`sys.stdout.buffer` for programs that write bytes; non-UTF-8 bytes are replaced, never fatal."""

    def __init__(self, text: _CappedOutput):
        self.text = text

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        self.text.write(bytes(data).decode("utf-8", "replace"))
        return len(data)


class _Guard:
    """Audit hook (PEP 578) that refuses what a math program never needs.

    This is the Python-level layer; the OS-level layers (namespaces, resource limits) are set up by the parent
    and in `_lock_down`. Audit hooks cannot be removed once added, and the hook keeps its state in its own
    attributes rather than in globals a program could rebind.
    """

    BLOCKED = frozenset(
        {
            "os.system", "os.exec", "os.spawn", "os.posix_spawn", "os.fork", "os.forkpty", "pty.spawn",
            "subprocess.Popen", "os.kill", "os.killpg", "signal.pthread_kill", "os.setuid", "os.setgid",
            "os.chroot", "socket.__new__", "socket.bind", "socket.connect", "socket.getaddrinfo",
            "socket.gethostbyname", "socket.gethostbyaddr", "socket.sendto", "ctypes.dlopen", "ctypes.dlsym",
            "ctypes.call_function", "ctypes.cdata", "ctypes.cdata/buffer", "ctypes.string_at",
            "ctypes.wstring_at", "ctypes.addressof", "resource.setrlimit", "resource.prlimit",
            "gc.get_referrers", "gc.get_referents", "gc.get_objects", "sys.remote_exec", "webbrowser.open",
            "urllib.Request", "http.client.connect", "ftplib.connect", "smtplib.connect", "os.startfile",
            "sys._current_frames", "mmap.__new__",
        }
    )  # fmt: skip
    # Filesystem events whose first argument is a path that must stay inside the private directory.
    PATH_WRITES = frozenset(
        {
            "os.remove", "os.rmdir", "os.mkdir", "os.chmod", "os.chown",
            "os.truncate", "os.utime", "os.chflags", "os.lchflags", "os.mknod", "os.mkfifo", "shutil.rmtree",
            "shutil.move", "shutil.copyfile", "shutil.copytree", "os.setxattr", "os.removexattr",
        }
    )  # fmt: skip

    def __init__(self, workdir: str, readable_roots: list[str], hidden_roots: list[str]):
        self.workdir = os.path.realpath(workdir)
        self.readable = [os.path.realpath(p) for p in readable_roots]
        self.hidden = [os.path.realpath(p) for p in hidden_roots if p and os.path.realpath(p) != "/"]
        self.own_proc = (f"/proc/{os.getpid()}", "/proc/self", "/proc/thread-self")

    @staticmethod
    def _under(path: str, roots) -> bool:
        return any(path == root or path.startswith(root.rstrip("/") + "/") for root in roots)

    def _resolve(self, path) -> str:
        if isinstance(path, bytes):
            path = path.decode("utf-8", "replace")
        return os.path.realpath(os.fspath(path))

    def _check_write(self, event: str, path) -> None:
        if isinstance(path, int):
            raise PermissionError(f"sandbox: {event} on a file descriptor is not allowed")
        if not self._under(self._resolve(path), [self.workdir]):
            raise PermissionError(f"sandbox: {event} outside the working directory is not allowed: {path!r}")

    def _check_open(self, path, mode, flags) -> None:
        if isinstance(path, int):
            if path > 2:  # only the (null) standard streams; higher descriptors belong to the worker
                raise PermissionError("sandbox: opening inherited file descriptors is not allowed")
            return
        if path is None:
            return
        real = self._resolve(path)
        writing = (mode and any(c in str(mode) for c in "wax+")) or (
            flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND)
        )
        if writing:
            if not self._under(real, [self.workdir]):
                raise PermissionError(f"sandbox: writing outside the working directory is not allowed: {path!r}")
            return
        if real.startswith("/proc/") and real.split("/")[2].isdigit() and not self._under(real, self.own_proc):
            raise PermissionError("sandbox: reading other processes' /proc entries is not allowed")
        if self._under(real, [self.workdir, *self.readable]):
            return
        if self._under(real, self.hidden):
            raise PermissionError(f"sandbox: reading {path!r} is not allowed")

    def __call__(self, event: str, args: tuple) -> None:
        if event in self.BLOCKED:
            raise PermissionError(f"sandbox: {event} is not allowed")
        if event == "open":
            self._check_open(*args)
        elif event in self.PATH_WRITES and args:
            self._check_write(event, args[0])
        elif event in ("os.rename", "os.link", "os.symlink"):  # both ends: the new name is a write too
            self._check_write(event, args[0])
            self._check_write(event, args[1])


def _lock_down(config: dict) -> None:
    """Apply resource limits. RLIMIT_NPROC=0 forbids new processes for non-root users (root ignores it;
    there the audit hook and the PID namespace do that job)."""
    limits = {
        resource.RLIMIT_CORE: 0,
        resource.RLIMIT_FSIZE: config["max_file_bytes"],
        resource.RLIMIT_NOFILE: 64,
        resource.RLIMIT_NPROC: 0,
    }
    if config["memory_mb"]:
        vm_bytes = _vm_size()
        limits[resource.RLIMIT_AS] = vm_bytes + config["memory_mb"] * 2**20
    for kind, value in limits.items():
        try:
            resource.setrlimit(kind, (value, value))
        except (ValueError, OSError):
            pass  # e.g. a hard limit already lower than ours: keep the stricter one


def _vm_size() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmSize:"))


def _clean_workdir(workdir: str) -> None:
    # Files a program left behind must not be visible to the next program.
    for entry in os.scandir(workdir):
        if entry.is_dir(follow_symlinks=False):
            shutil.rmtree(entry.path, ignore_errors=True)
        else:
            os.unlink(entry.path)


def _format_error(exc: BaseException) -> str:
    tb = exc.__traceback__
    line = None
    while tb is not None:
        if tb.tb_frame.f_code.co_filename == "<program>":
            line = tb.tb_lineno
        tb = tb.tb_next
    where = f" (line {line})" if line else ""
    return f"{type(exc).__name__}{where}: {exc}"


_SAFE_BUILTINS = dict(builtins.__dict__)


def run_program(code: str, output_limit: int) -> dict:
    """Execute one program in fresh globals; return the result fields (and whether to recycle the worker)."""
    out = _CappedOutput(output_limit)
    sys.stdout = out
    random.seed(0)  # programs that use `random` give the same output every run
    result = {"ok": True, "error": None, "recycle": False}
    try:
        tree = ast.parse(code, "<program>")
        tail = tree.body.pop() if tree.body and isinstance(tree.body[-1], ast.Expr) else None
        namespace = {"__name__": "__main__", "__builtins__": builtins}
        exec(compile(tree, "<program>", "exec"), namespace)
        if tail is not None:  # like the REPL: a final bare expression's value is shown
            value = eval(compile(ast.Expression(tail.value), "<program>", "eval"), namespace)
            if value is not None:
                print(repr(value), file=out)
    except SystemExit as exc:
        if exc.code not in (None, 0):
            result.update(ok=False, error=f"SystemExit: {exc.code}")
    except MemoryError:
        result.update(ok=False, error="MemoryError: the program exceeded the memory limit", recycle=True)
    except PermissionError as exc:
        result.update(ok=False, error=_format_error(exc), recycle=str(exc).startswith("sandbox:"))
    except BaseException as exc:  # KeyboardInterrupt, GeneratorExit, anything a program can raise
        result.update(ok=False, error=_format_error(exc))
    finally:
        sys.stdout = sys.__stdout__
    current = builtins.__dict__
    if len(current) != len(_SAFE_BUILTINS) or any(current.get(k) is not v for k, v in _SAFE_BUILTINS.items()):
        # A program rebound or added a builtin: undo it so the next program starts clean.
        current.clear()
        current.update(_SAFE_BUILTINS)
    output = out.getvalue()
    if out.truncated:
        output += "\n[output truncated]"
    result.update(output=output, truncated=out.truncated)
    return result


def _become_init(fds: tuple[int, ...]) -> None:
    """In a new PID namespace this process is PID 1, which the kernel shields from signals it raises itself
    (a program's `raise(SIGSEGV)` would be ignored instead of ending it). So PID 1 forks the real worker, reaps,
    and exits with the worker's status (128 + n for a signal n)."""
    child = os.fork()
    if child == 0:
        return
    for fd in fds:
        os.close(fd)
    while True:
        pid, status = os.waitpid(-1, 0)
        if pid == child:
            code = os.waitstatus_to_exitcode(status)
            os._exit(128 - code if code < 0 else code)


def main() -> None:
    config = json.loads(sys.argv[1])
    request_fd, reply_fd = config["request_fd"], config["reply_fd"]
    if os.getpid() == 1:
        _become_init((request_fd, reply_fd))
    workdir = os.getcwd()
    failed = []
    for name in config["preload"]:
        try:
            importlib.import_module(name)
        except Exception:  # an optional module that is not installed: programs simply cannot import it
            failed.append(name)
    sys.setrecursionlimit(config["recursion_limit"])
    _lock_down(config)
    readable = [sys.prefix, sys.base_prefix, sys.exec_prefix, *[p for p in sys.path if p]]
    sys.addaudithook(_Guard(workdir, readable, config["hidden_roots"]))
    _SAFE_BUILTINS.update(builtins.__dict__)
    _send(reply_fd, {"ready": True, "pid": os.getpid(), "preload_failed": failed})
    while True:
        request = _recv(request_fd)
        if request is None:  # parent closed the pipe: exit quietly
            return
        sys.setrecursionlimit(config["recursion_limit"])  # a previous program may have changed it
        result = run_program(request["code"], config["output_limit"])
        result["id"] = request["id"]
        try:
            os.chdir(workdir)  # a program may have changed directory; the next one starts in its private dir
            _clean_workdir(workdir)
        except OSError:
            result["recycle"] = True
        _send(reply_fd, result)


if __name__ == "__main__":
    main()
