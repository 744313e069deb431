"""The sandbox's worker process ("zygote"): stdlib only, started as `python -I _child.py`.

It reads one JSON request per line on stdin, forks a fresh isolated process for each program, supervises it
(wall-clock deadline, output cap) and writes one JSON result per line on stdout. Forking from this small warm
interpreter costs about a millisecond; starting a new Python for every program would cost ~50 ms.

Isolation of each program, layer by layer (each layer that the OS refuses is reported, never silently assumed):
- a new session / process group, killed as a whole at the deadline;
- new PID, mount, network, IPC and UTS namespaces (a user namespace too when not root): the program cannot see or
  signal the evaluator, has no network at all (not even loopback), sees the whole file system read-only except a
  fresh size-limited tmpfs working directory, and every process it forks dies with it;
- an unprivileged identity: when root, a throwaway uid of its own (so RLIMIT_NPROC counts only its processes);
  otherwise all capabilities dropped and no_new_privs set;
- rlimits: address space, CPU seconds, process count, file size, open files, no core dumps;
- a scrubbed environment, stdin from /dev/null, stdout/stderr through capped pipes.
"""
from __future__ import annotations

import ctypes
import json
import os
import resource
import selectors
import shutil
import signal
import sys
import tempfile
import time
import traceback

CLONE_NEWNS, CLONE_NEWUTS, CLONE_NEWIPC = 0x00020000, 0x04000000, 0x08000000
CLONE_NEWUSER, CLONE_NEWPID, CLONE_NEWNET = 0x10000000, 0x20000000, 0x40000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_BIND, MS_REC, MS_PRIVATE = 1, 2, 4, 0x1000, 0x4000, 0x40000
MOUNT_ATTR_RDONLY, AT_RECURSIVE, AT_FDCWD = 0x1, 0x8000, -100
SYS_MOUNT_SETATTR = {"x86_64": 442, "aarch64": 442}.get(os.uname().machine)
SYS_CAPSET = {"x86_64": 126, "aarch64": 91}.get(os.uname().machine)
PR_SET_PDEATHSIG, PR_SET_NO_NEW_PRIVS = 1, 38
SAFE_ENV = {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8", "PYTHONHASHSEED": "0",
            "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
FIRST_SANDBOX_UID = 0x7F000000  # far above any real account; one uid per running program

libc = ctypes.CDLL(None, use_errno=True)


def _check(ret: int, what: str) -> None:
    if ret != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def _write_file(path: str, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)


def enter_worker_namespaces(root: bool) -> list[str]:
    """Once per worker: its own network (no interfaces up: not even loopback works), IPC, UTS and mount
    namespaces (and a user namespace when not root, to be allowed the rest). Returns the layers granted."""
    uid, gid = os.getuid(), os.getgid()
    flags = CLONE_NEWNS | CLONE_NEWNET | CLONE_NEWIPC | CLONE_NEWUTS | (0 if root else CLONE_NEWUSER)
    if libc.unshare(flags) != 0:
        return []
    if not root:
        # Map our own uid/gid only: inside we hold capabilities to mount; programs drop them before running.
        _write_file("/proc/self/setgroups", "deny")
        _write_file("/proc/self/uid_map", f"{uid} {uid} 1")
        _write_file("/proc/self/gid_map", f"{gid} {gid} 1")
    return ["mount", "network", "ipc", "uts"] + ([] if root else ["user"])


def _mount_setattr(path: str, attr_set: int, attr_clr: int, flags: int) -> None:
    if SYS_MOUNT_SETATTR is None:
        raise OSError("mount_setattr is unknown on this architecture")

    class MountAttr(ctypes.Structure):
        _fields_ = [("attr_set", ctypes.c_uint64), ("attr_clr", ctypes.c_uint64),
                    ("propagation", ctypes.c_uint64), ("userns_fd", ctypes.c_uint64)]

    attr = MountAttr(attr_set, attr_clr, 0, 0)
    _check(libc.syscall(SYS_MOUNT_SETATTR, AT_FDCWD, path.encode(), flags, ctypes.byref(attr),
                        ctypes.sizeof(attr)), f"mount_setattr {path}")


def _blocking_ancestor(path: str) -> str | None:
    """The outermost directory on `path` that a stranger uid cannot pass through (e.g. /root, mode 0700)."""
    parts = os.path.abspath(path).split(os.sep)[1:]
    for i in range(1, len(parts) + 1):
        ancestor = os.sep + os.sep.join(parts[:i])
        try:
            if not os.stat(ancestor).st_mode & 0o001:
                return ancestor
        except OSError:
            return None
    return None


def expose_interpreter(paths: list[str]) -> None:
    """Let a stranger uid import from `paths` (the interpreter's sys.path) when they lie inside private
    directories (Python under /root, a venv in a 0750 home): cover each private directory with an empty
    tmpfs and bind only the needed paths back. The rest of that private directory stays hidden."""
    by_ancestor: dict[str, list[str]] = {}
    for p in paths:
        if os.path.isdir(p) and (a := _blocking_ancestor(p)):
            by_ancestor.setdefault(a, []).append(os.path.abspath(p))
    for ancestor, needed in by_ancestor.items():
        handles = {p: os.open(p, os.O_PATH) for p in needed}
        _check(libc.mount(b"tmpfs", ancestor.encode(), b"tmpfs", MS_NOSUID | MS_NODEV, b"mode=755,size=1m"),
               f"cover {ancestor}")
        for p, fd in handles.items():
            os.makedirs(p, mode=0o755, exist_ok=True)
            _check(libc.mount(f"/proc/self/fd/{fd}".encode(), p.encode(), None, MS_BIND | MS_REC, None),
                   f"expose {p}")
            os.close(fd)


def lock_file_system(base: str, stranger: bool) -> None:
    """Once per worker: the whole tree read-only, except `base`, a tmpfs holding the programs' working dirs."""
    _check(libc.mount(None, b"/", None, MS_REC | MS_PRIVATE, None), "make mounts private")
    if stranger:
        expose_interpreter([p for p in sys.path if p] + [sys.prefix, sys.base_prefix])
    for shared_tmp in {tempfile.gettempdir(), "/tmp", "/var/tmp", "/dev/shm"}:
        # Other people's temporary files are none of the program's business: cover them with an empty tmpfs.
        if os.path.isdir(shared_tmp) and not os.path.islink(shared_tmp):
            _check(libc.mount(b"tmpfs", shared_tmp.encode(), b"tmpfs", MS_NOSUID | MS_NODEV, b"mode=1777,size=1m"),
                   f"cover {shared_tmp}")
    os.makedirs(base, exist_ok=True)
    _check(libc.mount(b"tmpfs", base.encode(), b"tmpfs", MS_NOSUID | MS_NODEV, b"mode=755,size=1m"),
           "mount the working-dir base")
    _mount_setattr("/", MOUNT_ATTR_RDONLY, 0, AT_RECURSIVE)
    _mount_setattr(base, 0, MOUNT_ATTR_RDONLY, 0)


def enter_program_namespaces(workdir: str, disk_mb: int) -> bool:
    """Per program: a PID namespace (must be followed by a fork) and a mount namespace with a fresh /proc
    and a fresh size-limited tmpfs as the working directory."""
    if libc.unshare(CLONE_NEWPID | CLONE_NEWNS) != 0:
        return False
    pid = os.fork()
    if pid:
        _wait_and_mirror(pid)
    try:
        _check(libc.mount(b"proc", b"/proc", b"proc", MS_NOSUID | MS_NODEV, None), "mount /proc")
    except OSError:
        pass  # an old /proc only shows more processes; the PID namespace still stops signals
    opts = f"size={disk_mb}m,nr_inodes=4096,mode=1777".encode()
    _check(libc.mount(b"tmpfs", workdir.encode(), b"tmpfs", MS_NOSUID | MS_NODEV, opts), "mount tmpfs workdir")
    return True


def drop_privileges(root: bool, sandbox_uid: int) -> None:
    if root:
        os.setgroups([])
        os.setgid(sandbox_uid)
        os.setuid(sandbox_uid)  # from root to a fresh uid: every capability is gone
    else:
        libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)
        if SYS_CAPSET is not None:
            header = (ctypes.c_uint32 * 2)(0x20080522, 0)  # _LINUX_CAPABILITY_VERSION_3, this thread
            data = (ctypes.c_uint32 * 6)()  # effective, permitted, inheritable (x2 words): all empty
            libc.syscall(SYS_CAPSET, ctypes.byref(header), ctypes.byref(data))


def set_limits(req: dict) -> None:
    mb = 1024 * 1024
    cpu = int(req["timeout"]) + 1
    for res, value in ((resource.RLIMIT_AS, req["memory_mb"] * mb), (resource.RLIMIT_CPU, cpu),
                       (resource.RLIMIT_NPROC, req["max_processes"]), (resource.RLIMIT_FSIZE, req["file_size_mb"] * mb),
                       (resource.RLIMIT_NOFILE, req["max_open_files"]), (resource.RLIMIT_CORE, 0)):
        resource.setrlimit(res, (value, value))


def run_program(req: dict, workdir: str, out_w: int, err_w: int, done_w: int, root: bool, sandbox_uid: int,
                isolated: bool) -> None:
    """In the forked child: isolate, then execute the program in this interpreter. Never returns."""
    write, exit_ = os.write, os._exit  # our own references: a program that patches os.* cannot skip the exit
    code = 1
    try:
        os.setsid()
        devnull = os.open(os.devnull, os.O_RDONLY)
        os.dup2(devnull, 0)
        os.dup2(out_w, 1)
        os.dup2(err_w, 2)
        if isolated:
            # The first child in a new PID namespace is its init: when it exits, every process it forked dies.
            enter_program_namespaces(workdir, req["file_size_mb"])
        os.chdir(workdir)
        drop_privileges(root, sandbox_uid)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)  # after the uid change, which clears it
        set_limits(req)
        os.closerange(3, done_w)
        os.closerange(done_w + 1, 4096)
        os.environ.clear()
        os.environ.update(SAFE_ENV, HOME=workdir, TMPDIR=workdir)
        sys.path[:] = [p for p in sys.path if p and os.path.abspath(p) != os.path.dirname(__file__)]
        sys.stdin = open(0, "r", closefd=False)
        sys.stdout = open(1, "w", buffering=1, closefd=False, errors="backslashreplace")
        sys.stderr = open(2, "w", buffering=1, closefd=False, errors="backslashreplace")
        namespace = {"__name__": "__main__", "__builtins__": __builtins__}
        # The done pipe gets b"1" when the program ran to its end, else b"0" + str(exception): the official
        # HumanEval checker's "failed: <message>". sys.exit() is leaving early, a failure there as here.
        outcome = b"1"
        try:
            # "<string>", the name a bare exec() gives: syntax errors read exactly as in the official checker
            exec(compile(req["code"], "<string>", "exec"), namespace)
            code = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
            if not isinstance(e.code, (int, type(None))):
                print(e.code, file=sys.stderr)
            outcome = b"0" + _message(e)
        except BaseException as e:
            traceback.print_exc()
            code = 1
            outcome = b"0" + _message(e)
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except BaseException:  # the program closed or replaced its stdout: not a sandbox failure
                pass
        write(done_w, outcome)
    except BaseException:
        try:
            write(2, ("[sandbox setup failed] " + traceback.format_exc()).encode())
        except OSError:
            pass
        code = 125
    exit_(code & 0xFF)


def _message(e: BaseException) -> bytes:
    try:
        return str(e)[:4096].encode("utf-8", "backslashreplace")
    except BaseException:  # a hostile __str__
        return b""


def _wait_and_mirror(pid: int) -> None:
    """Init's parent: wait for the namespace's init and exit the way it did."""
    signal.signal(signal.SIGTERM, lambda *_: os.kill(pid, signal.SIGKILL))
    while True:
        try:
            _, status = os.waitpid(pid, 0)
            break
        except ChildProcessError:
            os._exit(125)
        except InterruptedError:
            continue
    if os.WIFSIGNALED(status):
        os._exit(128 + os.WTERMSIG(status))
    os._exit(os.WEXITSTATUS(status))


def supervise(req: dict, root: bool, slot_uid: int, base: str, isolated: bool) -> dict:
    workdir = tempfile.mkdtemp(prefix="run-", dir=base)
    os.chmod(workdir, 0o777)
    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()
    done_r, done_w = os.pipe()
    start = time.monotonic()
    pid = os.fork()
    if pid == 0:
        for fd in (out_r, err_r, done_r):
            os.close(fd)
        run_program(req, workdir, out_w, err_w, done_w, root, slot_uid, isolated)
    for fd in (out_w, err_w, done_w):
        os.close(fd)
    cap, deadline = req["max_output_bytes"], start + req["timeout"]
    chunks = {out_r: [], err_r: [], done_r: []}
    sizes = {out_r: 0, err_r: 0, done_r: 0}
    reason = None
    sel = selectors.DefaultSelector()
    for fd in chunks:
        sel.register(fd, selectors.EVENT_READ)
    while sel.get_map():
        left = deadline - time.monotonic()
        if left <= 0:
            reason = "timeout"
            break
        for key, _ in sel.select(timeout=left):
            data = os.read(key.fd, 65536)
            if not data:
                sel.unregister(key.fd)
                continue
            if sizes[key.fd] < cap:
                chunks[key.fd].append(data[: cap - sizes[key.fd]])
            sizes[key.fd] += len(data)
            if key.fd != done_r and sizes[key.fd] > cap:
                reason = "output"
        if reason:
            break
    if reason:
        _kill_group(pid)
    _, status = os.waitpid(pid, 0)
    duration = time.monotonic() - start
    sel.close()
    for fd in chunks:
        os.close(fd)
    shutil.rmtree(workdir, ignore_errors=True)
    returncode = os.WEXITSTATUS(status) if os.WIFEXITED(status) else -os.WTERMSIG(status)
    stdout = b"".join(chunks[out_r]).decode("utf-8", "replace")
    stderr = b"".join(chunks[err_r]).decode("utf-8", "replace")
    done = b"".join(chunks[done_r])
    finished = done == b"1"
    error = done[1:].decode("utf-8", "replace") if done[:1] == b"0" else None
    if reason == "timeout":
        status_name = "timeout"
    elif reason == "output":
        status_name = "failed"
        stderr += f"\n[sandbox] output limit of {cap} bytes exceeded: program killed"
    elif returncode == 125 and "[sandbox setup failed]" in stderr:
        status_name = "error"
    elif returncode == 0 and finished:
        status_name = "passed"
    else:
        status_name = "failed"
        if returncode == 0:
            how = "sys.exit" if error is not None else "os._exit"
            stderr += f"\n[sandbox] program exited early ({how}) before reaching its end"
        elif returncode == 128 + signal.SIGXCPU:
            stderr += "\n[sandbox] CPU time limit exceeded"
    return {"status": status_name, "returncode": returncode, "stdout": stdout, "stderr": stderr,
            "duration": duration, "error": error}


def _kill_group(pid: int) -> None:
    # The program's session leader is `pid`; its PID-namespace init dies with it (PDEATHSIG), and with the init
    # every process of the namespace. Without namespaces the process group is what we can reach.
    for target in (lambda: os.killpg(pid, signal.SIGKILL), lambda: os.kill(pid, signal.SIGKILL)):
        try:
            target()
        except (ProcessLookupError, PermissionError):
            pass


def serve() -> None:
    root = os.geteuid() == 0
    # No PDEATHSIG here: it fires when the evaluator *thread* that started us ends, not the evaluator. When the
    # evaluator dies our stdin closes, and the loop below ends.
    base_uid = FIRST_SANDBOX_UID + (os.getpid() % 0x10000) * 16
    base = sys.argv[1]  # an empty directory made (and removed) by the evaluator
    layers, notes = [], []
    try:
        layers = enter_worker_namespaces(root)
        if not layers:
            notes.append(f"unshare refused: {os.strerror(ctypes.get_errno())}")
        else:
            lock_file_system(base, stranger=root)
            layers.append("read-only-fs")
    except OSError as e:
        notes.append(str(e))
    isolated = "read-only-fs" in layers
    if isolated:  # a quick check that the per-program layers work too
        trial = supervise({"code": "pass", "timeout": 5, "memory_mb": 256, "max_processes": 4, "file_size_mb": 1,
                           "max_open_files": 16, "max_output_bytes": 1024}, root, base_uid, base, True)
        if trial["status"] == "passed":
            layers.append("pid")
        else:
            notes.append("per-program namespaces refused: " + trial["stderr"].strip()[-200:])
            isolated = False
    isolation = {"namespaces": [x for x in layers if x != "read-only-fs"], "read_only_fs": "read-only-fs" in layers,
                 "root": root, "notes": notes}
    os.write(1, (json.dumps({"ready": True, "isolation": isolation}) + "\n").encode())
    inp = os.fdopen(0, "rb")
    runs = 0
    for line in inp:
        req = json.loads(line)
        try:
            result = supervise(req, root, base_uid + runs % 16, base, isolated)
        except Exception as e:  # the supervisor itself failed: report, keep serving
            result = {"status": "error", "returncode": None, "stdout": "", "stderr": f"[sandbox] {e!r}",
                      "duration": 0.0}
        runs += 1
        os.write(1, (json.dumps(result) + "\n").encode())


if __name__ == "__main__":
    serve()
