"""Sandbox worker: runs untrusted programs one at a time for `PythonExecutor`.

Started by the parent as ``python -I _worker.py CONFIG_JSON`` (stdlib only, so it runs without the package
on ``sys.path``). Start-up, in this order:

1. In a private mount namespace, every mount except the private working directory becomes read-only.
2. The process forks: it stays behind as the worker's keeper (see `_fork_keeper`), the child is the worker.
3. The worker preloads the modules programs commonly use, then locks itself down with operating-system
   layers (resource limits, Landlock, no capabilities, a seccomp-bpf filter; `_confine`) and then the
   Python-level one (the audit hook made by `_make_guard`).
4. It points stderr at /dev/null (the start-up log file stays for start-up failures only), sends a ready
   frame naming the layers it got, and serves requests read from its request pipe.

Frames are a 4-byte big-endian length followed by UTF-8 JSON. Standard streams point to /dev/null, so a
program that writes straight to fd 1 or 2 can neither corrupt the protocol nor fill a file.
"""

import ast
import builtins
import ctypes
import importlib
import io
import json
import os
import random
import re
import resource
import select
import shutil
import signal
import stat
import struct
import sys
import types

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


# ---------------------------------------------------------------------------------------------------------------
# Operating-system layers (Linux). They hold even against code that gets past the audit hook.
# ---------------------------------------------------------------------------------------------------------------

_LIBC = ctypes.CDLL(None, use_errno=True)

# System call numbers: (x86_64, aarch64); None where the architecture has no such call. From
# asm/unistd_64.h (x86_64) and asm-generic/unistd.h (aarch64); tests/test_executor.py checks them against the
# headers where those are installed.
_SYSCALLS = {
    "fork": (57, None), "vfork": (58, None), "clone": (56, 220), "clone3": (435, 435), "execve": (59, 221),
    "execveat": (322, 281), "kill": (62, 129), "tkill": (200, 130), "tgkill": (234, 131),
    "rt_sigqueueinfo": (129, 138), "rt_tgsigqueueinfo": (297, 240), "pidfd_open": (434, 434),
    "pidfd_send_signal": (424, 424), "pidfd_getfd": (438, 438), "ptrace": (101, 117),
    "process_vm_readv": (310, 270), "process_vm_writev": (311, 271), "mknod": (133, None), "mknodat": (259, 33),
    "socket": (41, 198), "socketpair": (53, 199), "mount": (165, 40), "umount2": (166, 39), "unshare": (272, 97),
    "setns": (308, 268), "pivot_root": (155, 41), "chroot": (161, 51), "open_tree": (428, 428),
    "move_mount": (429, 429), "fsopen": (430, 430), "fsconfig": (431, 431), "fsmount": (432, 432),
    "fspick": (433, 433), "mount_setattr": (442, 442), "keyctl": (250, 219), "add_key": (248, 217),
    "request_key": (249, 218), "bpf": (321, 280), "perf_event_open": (298, 241), "userfaultfd": (323, 282),
    "init_module": (175, 105), "finit_module": (313, 273), "delete_module": (176, 106), "kexec_load": (246, 104),
    "kexec_file_load": (320, 294), "reboot": (169, 142), "swapon": (167, 224), "swapoff": (168, 225),
    "personality": (135, 92), "setuid": (105, 146), "setgid": (106, 144), "setreuid": (113, 145),
    "setregid": (114, 143), "setresuid": (117, 147), "setresgid": (119, 149), "setfsuid": (122, 151),
    "setfsgid": (123, 152), "setgroups": (116, 159), "setrlimit": (160, 164), "prlimit64": (302, 261),
    "io_uring_setup": (425, 425), "io_uring_enter": (426, 426), "io_uring_register": (427, 427),
    "open_by_handle_at": (304, 265), "capset": (126, 91), "landlock_create_ruleset": (444, 444),
    "landlock_add_rule": (445, 445), "landlock_restrict_self": (446, 446),
}  # fmt: skip
_ARCHES = {"x86_64": (0, 0xC000003E), "aarch64": (1, 0xC00000B7)}  # table column, AUDIT_ARCH_* value

# Refused by the seccomp filter (EPERM). clone is allowed for threads only, tgkill for this process's own
# threads only (Python's faulthandler and `signal.raise_signal` use it), prlimit64 for reading limits only.
_DENIED_SYSCALLS = (
    # new processes and programs
    "fork", "vfork", "execve", "execveat",
    # other processes: signals, debugging, their memory
    "kill", "tkill", "rt_sigqueueinfo", "rt_tgsigqueueinfo", "pidfd_open", "pidfd_send_signal", "pidfd_getfd",
    "ptrace", "process_vm_readv", "process_vm_writev",
    # device nodes and FIFOs; the network
    "mknod", "mknodat", "socket", "socketpair",
    # mounts and namespaces, the new mount API included
    "mount", "umount2", "unshare", "setns", "pivot_root", "chroot", "open_tree", "move_mount", "fsopen",
    "fsconfig", "fsmount", "fspick", "mount_setattr",
    # the kernel itself
    "keyctl", "add_key", "request_key", "bpf", "perf_event_open", "userfaultfd", "init_module", "finit_module",
    "delete_module", "kexec_load", "kexec_file_load", "reboot", "swapon", "swapoff", "personality",
    # identity and limits
    "setuid", "setgid", "setreuid", "setregid", "setresuid", "setresgid", "setfsuid", "setfsgid", "setgroups",
    "setrlimit",
    # io_uring runs file operations this filter never sees; file handles open files without a path check
    "io_uring_setup", "io_uring_enter", "io_uring_register", "open_by_handle_at",
)  # fmt: skip

_PR_SET_PDEATHSIG, _PR_SET_SECCOMP, _PR_SET_NO_NEW_PRIVS, _SECCOMP_MODE_FILTER = 1, 22, 38, 2
_MS_RDONLY, _MS_REMOUNT, _MS_BIND, _MS_REC, _MS_PRIVATE = 0x1, 0x20, 0x1000, 0x4000, 0x40000
# Per-mount options a read-only remount must keep (a user namespace may not clear them: EPERM).
_MOUNT_OPTIONS = {b"nosuid": 0x2, b"nodev": 0x4, b"noexec": 0x8, b"noatime": 0x400, b"nodiratime": 0x800,
                  b"relatime": 0x200000}  # fmt: skip


def _libc_call(name: str, *args) -> int:
    """Call a libc function with integer (passed as unsigned long), bytes or None arguments; raise OSError on -1."""
    result = getattr(_LIBC, name)(*(ctypes.c_ulong(a) if isinstance(a, int) else a for a in args))
    if result == -1:
        errno = ctypes.get_errno()
        raise OSError(errno, os.strerror(errno))
    return result


def _syscall_numbers() -> dict[str, int] | None:
    """This machine's system call numbers, or None on an architecture (or a 32-bit/big-endian Python) we have no
    table for: a seccomp filter with the wrong table would refuse (or kill) the wrong calls."""
    arch = _ARCHES.get(os.uname().machine)
    if arch is None or struct.calcsize("P") != 8 or sys.byteorder != "little":
        return None
    return {name: numbers[arch[0]] for name, numbers in _SYSCALLS.items() if numbers[arch[0]] is not None}


def _make_filesystem_readonly(workdir: str) -> bool:
    """In the worker's own mount namespace: bind the private directory onto itself, then remount every other mount
    read-only, so nothing outside the directory can be written, created or deleted, whatever code runs. Writes
    to device nodes such as /dev/null still work (a read-only mount only stops changes to the file system).
    Returns whether every mount is now read-only."""
    target = os.fsencode(workdir)
    try:
        _libc_call("mount", None, b"/", None, _MS_REC | _MS_PRIVATE, None)  # none of this may reach the host
        _libc_call("mount", target, target, None, _MS_BIND, None)
    except OSError:
        return False
    os.chdir(workdir)  # the old working directory is the one under the bind mount, soon read-only
    with open("/proc/self/mountinfo", "rb") as f:
        mounts = [line.split()[4:6] for line in f]  # mount point (octal-escaped) and per-mount options
    complete = True
    for point, options in mounts:
        point = re.sub(rb"\\([0-7]{3})", lambda m: bytes([int(m[1], 8)]), point)
        if point == target:
            continue
        flags = _MS_REMOUNT | _MS_BIND | _MS_RDONLY
        for option in options.split(b","):
            flags |= _MOUNT_OPTIONS.get(option, 0)
        try:
            _libc_call("mount", None, point, None, flags, None)
        except OSError:
            complete = False
    return complete


def _set_parent_death_signal() -> None:
    _libc_call("prctl", _PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


def _fork_keeper(request_fd: int, reply_fd: int) -> None:
    """Fork; return in the child (the worker). The parent stays behind as the worker's keeper and never returns.

    The keeper ends the worker when the executor's process goes away, even in the middle of a busy loop: it
    waits for the request pipe to hang up (only the executor holds its write end). It also reports how the
    worker ended as its own exit status (128 + n for a signal n), and in a new PID namespace it is PID 1, which
    the kernel shields from signals it raises itself (a program's `raise(SIGSEGV)` in PID 1 would be ignored).
    The worker dies with the keeper (PR_SET_PDEATHSIG); so does PID 1 with `unshare`. Outside a PID namespace the
    keeper's parent is a thread of the executor's process, and that signal fires when the *thread* ends, so
    there the hang-up alone tells the keeper to go.
    """
    if os.getpid() == 1:
        _set_parent_death_signal()
    keeper = os.getpid()
    # The worker holds the only write end, so this pipe hangs up when the worker ends (or closes it: then the
    # keeper ends the worker, which only harms that worker).
    alive_r, alive_w = os.pipe()
    worker = os.fork()
    if worker == 0:
        os.close(alive_r)
        _set_parent_death_signal()
        if os.getppid() != keeper:  # the keeper died before the line above
            os._exit(1)
        return
    os.close(alive_w)
    os.close(reply_fd)  # the executor must see the reply pipe close when the worker dies
    poller = select.poll()
    for fd in (request_fd, alive_r):
        poller.register(fd, 0)  # no events asked: it wakes only on a hang-up
    poller.poll()
    os.kill(worker, signal.SIGKILL)  # a no-op if it has ended already
    code = os.waitstatus_to_exitcode(os.waitpid(worker, 0)[1])
    os._exit(128 - code if code < 0 else code)


def _seccomp_program(numbers: dict[str, int], machine: str, pid: int) -> bytes:
    """The classic-BPF program for `_confine`: refuse `_DENIED_SYSCALLS` with EPERM, allow everything else."""

    def op(code: int, k: int, jt: int = 0, jf: int = 0) -> bytes:
        return struct.pack("=HBBI", code, jt, jf, k)

    load, jeq, jge, jset, ret = 0x20, 0x15, 0x35, 0x45, 0x06  # BPF_LD|W|ABS, BPF_JMP|JEQ/JGE/JSET|K, BPF_RET|K
    allow, kill, eperm, enosys = 0x7FFF0000, 0x80000000, 0x50000 | 1, 0x50000 | 38

    def arg(index: int, high: bool = False) -> int:  # offset of one half of args[index] in struct seccomp_data
        return 16 + 8 * index + 4 * high

    # Another architecture's calls (i386 through int 0x80 on x86_64) use other numbers: end the process.
    program = [op(load, 4), op(jeq, _ARCHES[machine][1], 1, 0), op(ret, kill), op(load, 0)]
    if machine == "x86_64":  # x32 calls set bit 30 and reach the same table under other numbers
        program += [op(jge, 0x40000000, 0, 1), op(ret, kill)]
    # Each block below ends in a return when its call matches, and is jumped over (with A still the number)
    # when it does not.
    program += [op(jeq, numbers["clone"], 0, 4), op(load, arg(0)), op(jset, 0x10000, 0, 1)]  # CLONE_THREAD
    program += [op(ret, allow), op(ret, eperm)]
    for name, index, value in (("tgkill", 0, pid), ("prlimit64", 2, 0)):  # tgkill(pid, ...); prlimit64(.., NULL, ..)
        program += [op(jeq, numbers[name], 0, 6), op(load, arg(index, high=True)), op(jeq, 0, 0, 3)]
        program += [op(load, arg(index)), op(jeq, value, 0, 1), op(ret, allow), op(ret, eperm)]
    denied = [numbers[name] for name in _DENIED_SYSCALLS if name in numbers]
    for i, number in enumerate(denied):
        program.append(op(jeq, number, len(denied) - i + 1, 0))  # to the EPERM return below
    # clone3 passes its flags in memory a filter cannot read: ENOSYS makes libc fall back to clone.
    program += [op(jeq, numbers["clone3"], 2, 0), op(ret, allow), op(ret, eperm), op(ret, enosys)]
    return b"".join(program)


def _install_seccomp(numbers: dict[str, int]) -> None:
    """Install the filter (PR_SET_NO_NEW_PRIVS is already set). It binds this thread and the threads it starts;
    the preloaded modules start none (the parent pins their thread counts to 1)."""
    program = _seccomp_program(numbers, os.uname().machine, os.getpid())

    class SockFprog(ctypes.Structure):
        _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_char_p)]

    fprog = SockFprog(len(program) // 8, program)
    _libc_call("prctl", _PR_SET_SECCOMP, _SECCOMP_MODE_FILTER, ctypes.addressof(fprog), 0, 0)


def _restrict_writes(numbers: dict[str, int], workdir: str) -> int:
    """Landlock: from now on this process may create, change or delete files only under `workdir` (and write to
    /dev/null), whatever the mounts allow. Returns the Landlock ABI version, 0 where the kernel has none."""
    try:
        abi = _libc_call("syscall", numbers["landlock_create_ruleset"], None, 0, 1)  # ..._VERSION
        _apply_landlock(numbers, workdir, abi)
    except OSError:
        return 0
    return abi


def _apply_landlock(numbers: dict[str, int], workdir: str, abi: int) -> None:
    write_file, refer, truncate = 1 << 1, 1 << 13, 1 << 14
    handled = write_file | sum(1 << bit for bit in range(4, 13))  # REMOVE_DIR/FILE, MAKE_CHAR/DIR/REG/.../SYM
    handled |= (refer if abi >= 2 else 0) | (truncate if abi >= 3 else 0)  # rights newer kernels know
    ruleset = _libc_call("syscall", numbers["landlock_create_ruleset"], struct.pack("=Q", handled), 8, 0)
    try:
        for path, allowed in ((workdir, handled), ("/dev/null", handled & (write_file | truncate))):
            fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
            try:  # struct landlock_path_beneath_attr, packed; rule type 1: LANDLOCK_RULE_PATH_BENEATH
                _libc_call("syscall", numbers["landlock_add_rule"], ruleset, 1, struct.pack("=Qi", allowed, fd), 0)
            finally:
                os.close(fd)
        _libc_call("syscall", numbers["landlock_restrict_self"], ruleset, 0)
    finally:
        os.close(ruleset)


def _confine(workdir: str) -> dict[str, object]:
    """Lock the worker down below Python: Landlock, no capabilities, the seccomp filter. Returns what was applied.

    Dropping every capability matters where the worker runs as root: root without capabilities cannot mount,
    change the clock, load modules, bypass file permissions, or read another root process's memory or
    environment through /proc (that needs CAP_SYS_PTRACE towards a process with more capabilities).
    """
    layers = {"seccomp": False, "landlock": 0, "capabilities_dropped": False}
    numbers = _syscall_numbers() if sys.platform.startswith("linux") else None
    if numbers is None:
        return layers
    # Each step may be missing from an old kernel: `isolation` then reports it missing, the others still apply.
    if not _succeeds(_libc_call, "prctl", _PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0):  # Landlock and seccomp need it
        return layers
    layers["landlock"] = _restrict_writes(numbers, workdir)
    # capset(header {version 3, this thread}, two empty {effective, permitted, inheritable} sets)
    capset = struct.pack("=Ii", 0x20080522, 0), bytes(24)
    layers["capabilities_dropped"] = _succeeds(_libc_call, "syscall", numbers["capset"], *capset)
    layers["seccomp"] = _succeeds(_install_seccomp, numbers)
    return layers


def _succeeds(call, *args) -> bool:
    try:
        call(*args)
    except OSError:
        return False
    return True


def _lock_down(config: dict) -> None:
    """Apply resource limits. RLIMIT_NPROC=0 forbids new processes for non-root users (root ignores it;
    there the seccomp filter does that job)."""
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


# ---------------------------------------------------------------------------------------------------------------
# Python layer: the audit hook
# ---------------------------------------------------------------------------------------------------------------

_BLOCKED_EVENTS = frozenset(
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
        # A trace or profile function sees the hook's own frame and can rewrite its variables.
        "sys.settrace", "sys.setprofile", "sys.monitoring.register_callback",
        # A sub-interpreter starts without this interpreter's audit hooks.
        "cpython.PyInterpreterState_New",
    }
)  # fmt: skip
# Extension modules that call C functions without raising audit events.
_BLOCKED_MODULES = frozenset({"_cffi_backend", "_testcapi", "_testinternalcapi"})
# Events that write to paths: the event, then (index of a path it writes, index of that path's dir_fd or -1)
# for each such path. Every written path must resolve inside the private directory.
_WRITE_EVENTS = (
    ("os.remove", ((0, 1),)),  # os.unlink too
    ("os.rmdir", ((0, 1),)),
    ("os.mkdir", ((0, 2),)),
    ("os.chmod", ((0, 2),)),
    ("os.chown", ((0, 3),)),
    ("os.utime", ((0, 3),)),
    ("os.truncate", ((0, -1),)),
    ("os.setxattr", ((0, -1),)),
    ("os.removexattr", ((0, -1),)),
    ("os.rename", ((0, 2), (1, 3))),  # os.replace too; the source leaves its directory
    ("os.link", ((0, 2), (1, 3))),  # a hard link to an outside file would make that file writable
    ("os.symlink", ((1, 2),)),  # the link's target (argument 0) is checked as a "link" below
    ("shutil.rmtree", ((0, 1),)),
    ("shutil.move", ((0, -1), (1, -1))),
    ("shutil.copyfile", ((1, -1),)),
    ("shutil.copytree", ((1, -1),)),
)
_WRITE_EVENT_NAMES = tuple(event for event, _ in _WRITE_EVENTS)
_WRITE_LAYOUTS = tuple(layout for _, layout in _WRITE_EVENTS)


def _make_guard(workdir: str, readable_roots: list[str], hidden_roots: list[str]):
    """The audit hook (PEP 578): refuses what a math program never needs; file writes only inside `workdir`.

    This is the second layer, below the operating system's: it gives clear errors and covers what the OS layers
    do not (reading the home directory, other processes' /proc entries), and it is all there is where those
    layers are missing. A program can rebind any global, builtin or module attribute (`builtins.any`,
    `os.path.realpath`, `posixpath._joinrealpath`) and write to any closure cell or mutable container it can
    reach, so the hook looks up no global name and calls no Python-level function: everything it uses is a
    C function, a built-in type or an immutable value, bound as a keyword-only default when it is defined.
    Defaults rather than closure cells: the hook's frame is reachable from the traceback of a refusal, a frame's
    variables are writable from Python 3.13 on (PEP 667), and defaults are copied into every call's own frame.
    Path arguments must be str or bytes: converting another path-like object runs program code, which could
    answer one path to the hook and another to the system call.
    """
    realpath = os.path.realpath
    workdir = realpath(workdir)
    readable = frozenset(realpath(p) for p in [workdir, *readable_roots])
    hidden = frozenset(realpath(p) for p in hidden_roots if p and realpath(p) != "/")
    # `root + "/"` for each root: "under a root" is then one C call, `path.startswith(prefixes)`
    inside, readable_inside, hidden_inside = (tuple(r.rstrip("/") + "/" for r in roots)
                                              for roots in ([workdir], readable, hidden))  # fmt: skip
    own_proc = f"/proc/{os.getpid()}"
    encoding = sys.getfilesystemencoding()

    def guard(
        event, args, *,
        blocked=_BLOCKED_EVENTS, blocked_modules=_BLOCKED_MODULES,
        write_events=frozenset(_WRITE_EVENT_NAMES), write_names=_WRITE_EVENT_NAMES, write_layouts=_WRITE_LAYOUTS,
        workdir=workdir, inside=inside, own_proc=own_proc, readable=readable, readable_inside=readable_inside,
        hidden=hidden, hidden_inside=hidden_inside, encoding=encoding,
        write_flags=os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND,
        directory_flags=os.O_DIRECTORY | os.O_PATH,
        type_=type, str_=str, bytes_=bytes, int_=int, decode=bytes.decode, deny=PermissionError,
        os_error=OSError, getcwd=os.getcwd, lstat=os.lstat, stat_=os.stat, readlink=os.readlink,
        is_link=stat.S_ISLNK, is_dir=stat.S_ISDIR,
    ):  # fmt: skip
        if event in blocked:
            raise deny(f"sandbox: {event} is not allowed")
        if event == "import":
            name = str_.__str__(args[0])  # an exact str: a subclass could lie about its hash
            if name in blocked_modules:
                raise deny(f"sandbox: importing {name} is not allowed")
            return
        if event == "open":
            path, mode, flags = args
            if path is None:
                return
            if type_(path) is int_:
                if path > 2:  # only the (null) standard streams; higher descriptors belong to the worker
                    raise deny("sandbox: opening inherited file descriptors is not allowed")
                return
            writing = flags & write_flags or (type_(mode) is str_ and ("w" in mode or "a" in mode or "x" in mode
                                                                         or "+" in mode))  # fmt: skip
            # mode None: `os.open`, the one opener whose event leaves out its dir_fd
            checks = ((path, -1, "write" if writing else "read", mode is None),)
        elif event in write_events:
            checks = []
            for index, fd_index in write_layouts[write_names.index(event)]:
                checks.append((args[index], -1 if fd_index < 0 else args[fd_index], "write", False))
            if event == "os.symlink":
                checks.append((args[0], -1, "link", False))
        else:
            return
        for path, dir_fd, kind, os_open in checks:
            if type_(path) is bytes_:
                path = decode(path, encoding, "surrogateescape")
            elif type_(path) is int_ and kind == "write":
                raise deny(f"sandbox: {event} on a file descriptor is not allowed")
            elif type_(path) is not str_:
                raise deny(f"sandbox: {event} needs a str or bytes path, not {type_(path).__name__}")
            base = None
            if dir_fd is not None and type_(dir_fd) is not int_:
                raise deny(f"sandbox: {event} with a dir_fd that is not an int is not allowed")
            if dir_fd is not None and dir_fd != -1:  # -1: the default, the current directory
                try:
                    base = readlink(f"/proc/self/fd/{dir_fd}")
                except os_error:
                    base = ""
                if not base.startswith("/"):
                    raise deny(f"sandbox: {event} relative to a file descriptor that is no directory")
            if not path.startswith("/"):
                parts = path.split("/")
                if kind == "link":  # a relative symlink target must stay below the link's own directory
                    if ".." in parts:
                        raise deny(f"sandbox: a symlink target with '..' is not allowed: {path!r}")
                    continue
                if os_open and (kind == "write" or ".." in parts):
                    # It may be relative to a directory descriptor the event does not name.
                    raise deny(f"sandbox: os.open of a relative path for writing or with '..': {path!r}")
                path = (getcwd() if base is None else base) + "/" + path
            # Resolve symbolic links and '..' like os.path.realpath (which a program could rebind).
            pending = path.split("/")[::-1]
            real = ""
            hops = 0
            while pending:
                name = pending.pop()
                if name == "" or name == ".":
                    continue
                if name == "..":
                    real = real.rpartition("/")[0]
                    continue
                real = real + "/" + name
                try:
                    mode_bits = lstat(real).st_mode
                except os_error:
                    continue  # does not exist (yet): the rest is taken literally
                if is_link(mode_bits) and hops < 40:
                    hops += 1
                    target = readlink(real)
                    real = "" if target.startswith("/") else real.rpartition("/")[0]
                    pending.extend(target.split("/")[::-1])
            real = real or "/"
            if kind != "read":
                if real != workdir and not real.startswith(inside) and real != "/dev/null":
                    raise deny(f"sandbox: {event} outside the working directory is not allowed: {path!r}")
                continue
            if os_open and real != workdir and not real.startswith(inside):
                try:
                    directory = flags & directory_flags or is_dir(stat_(real).st_mode)
                except os_error:
                    directory = False
                if directory:  # it could serve as a dir_fd for relative paths that escape the checks
                    raise deny(f"sandbox: opening a directory outside the working directory: {path!r}")
            if real.startswith("/proc/") and real.split("/")[2].isdigit():
                if real != own_proc and not real.startswith(own_proc + "/"):
                    raise deny("sandbox: reading other processes' /proc entries is not allowed")
            if real in readable or real.startswith(readable_inside):
                continue
            if real in hidden or real.startswith(hidden_inside):
                raise deny(f"sandbox: reading {path!r} is not allowed")

    return guard


# ---------------------------------------------------------------------------------------------------------------
# Serving
# ---------------------------------------------------------------------------------------------------------------


def _clean_workdir(workdir: str) -> None:
    """Remove what a program left behind, so the next program cannot see it. Raises OSError if anything stays
    (e.g. a directory the program made unreadable): the worker is then replaced."""
    for entry in os.scandir(workdir):
        if entry.is_dir(follow_symlinks=False):
            shutil.rmtree(entry.path, ignore_errors=True)
        else:
            os.unlink(entry.path)
    if os.listdir(workdir):
        raise OSError(f"could not empty {workdir}")


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
    """Execute one program as a fresh `__main__` module; return the result fields (and whether to recycle)."""
    out = _CappedOutput(output_limit)
    sys.stdout = out
    random.seed(0)  # programs that use `random` give the same output every run
    result = {"ok": True, "error": None, "recycle": False}
    # Each program is its own `__main__`, so no program finds the worker's module (or a previous program's) there.
    module = types.ModuleType("__main__")
    module.__builtins__ = builtins
    sys.modules["__main__"] = module
    try:
        tree = ast.parse(code, "<program>")
        tail = tree.body.pop() if tree.body and isinstance(tree.body[-1], ast.Expr) else None
        exec(compile(tree, "<program>", "exec"), module.__dict__)
        if tail is not None:  # like the REPL: a final bare expression's value is shown
            value = eval(compile(ast.Expression(tail.value), "<program>", "eval"), module.__dict__)
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


def main() -> None:
    config = json.loads(sys.argv[1])
    request_fd, reply_fd = config["request_fd"], config["reply_fd"]
    workdir = os.getcwd()
    # First, while this process still has every privilege it started with and before any audit hook exists.
    readonly = _make_filesystem_readonly(workdir) if config["private_mounts"] else False
    _fork_keeper(request_fd, reply_fd)
    failed = []
    for name in config["preload"]:
        try:
            importlib.import_module(name)
        except Exception:  # an optional module that is not installed: programs simply cannot import it
            failed.append(name)
    sys.setrecursionlimit(config["recursion_limit"])
    devnull = os.open(os.devnull, os.O_WRONLY)
    _lock_down(config)
    layers = {"readonly_fs": readonly, **_confine(workdir)}
    if config["audit_hooks"]:
        readable = [sys.prefix, sys.base_prefix, sys.exec_prefix, *[p for p in sys.path if p]]
        sys.addaudithook(_make_guard(workdir, readable, config["hidden_roots"]))
    _SAFE_BUILTINS.update(builtins.__dict__)
    os.dup2(devnull, 2)  # from here on nothing reaches the start-up log, which a program could otherwise fill
    os.close(devnull)
    _send(reply_fd, {"ready": True, "pid": os.getpid(), "preload_failed": failed, "layers": layers})
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
