"""Run model-written code safely: every program in its own isolated, resource-limited process.

    from phikit.sandbox import run_code, run_many
    r = run_code("print(1 + 1)")            # SandboxResult(status="passed", stdout="2\\n", ...)
    rs = run_many(programs, timeout=3.0)    # a pool of warm worker processes, results in input order

Each worker (see _child.py) forks one process per program with: a wall-clock deadline and a CPU limit that
kill the whole process group (and PID namespace), an address-space limit, process-count, file-size and open-file
limits, a fresh tmpfs working directory with the rest of the file system read-only, a scrubbed environment, no
network (a new network namespace), stdin closed and output capped. `isolation()` says which of the kernel layers
this machine grants; when namespaces are unavailable (some containers) a warning says so once and the rlimits,
process group, scrubbed environment and privilege drop still apply.

"passed" means the program ran to its end and exited 0 (a program that leaves early through sys.exit(0) or
os._exit(0) has not finished and is "failed", as in the official HumanEval checker).
"""
from __future__ import annotations

import atexit
import json
import os
import queue
import shutil
import subprocess
import sys
import tempfile
import threading
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

from ..progress import tqdm

CHILD_SCRIPT = Path(__file__).with_name("_child.py")
SUPERVISOR_GRACE_S = 10.0  # how long past a program's deadline a worker may take to answer before it is replaced


@dataclass
class SandboxResult:
    status: str  # "passed" | "failed" | "timeout" | "error"
    passed: bool
    stdout: str
    stderr: str
    returncode: int | None
    duration: float
    error: str | None = None  # str() of the exception that ended the program (None: ran to its end or killed)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Limits:
    timeout: float = 10.0
    memory_mb: int = 1024
    max_processes: int = 32
    file_size_mb: int = 64
    max_open_files: int = 64
    max_output_bytes: int = 1 << 20

    def validate(self) -> "Limits":
        if self.timeout <= 0:
            raise ValueError(f"sandbox timeout must be > 0 seconds, got {self.timeout}")
        if self.memory_mb < 64:
            raise ValueError(f"sandbox memory_mb must be >= 64 (Python itself needs ~30 MB), got {self.memory_mb}")
        return self


class _Worker:
    """One warm `_child.py` process; runs one program at a time."""

    def __init__(self) -> None:
        env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8"}  # the evaluator's secrets stay here
        self.base = tempfile.mkdtemp(prefix="phikit-sandbox-")  # the worker's tmpfs of working dirs mounts here
        self.proc = subprocess.Popen([sys.executable, "-I", str(CHILD_SCRIPT), self.base], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env,
                                     start_new_session=True, close_fds=True)
        hello = self._read_line(30.0)
        if not hello or not hello.get("ready"):
            self.close()
            raise RuntimeError("the sandbox worker did not start: run `python -I "
                               f"{CHILD_SCRIPT}` to see why")
        self.isolation: dict = hello["isolation"]

    def _read_line(self, timeout: float) -> dict | None:
        box: list = []
        reader = threading.Thread(target=lambda: box.append(self.proc.stdout.readline()), daemon=True)
        reader.start()
        reader.join(timeout)
        if not box or not box[0]:
            return None
        return json.loads(box[0])

    def run(self, code: str, limits: Limits) -> SandboxResult:
        req = {"code": code, **asdict(limits)}
        try:
            self.proc.stdin.write((json.dumps(req) + "\n").encode())
            self.proc.stdin.flush()
            answer = self._read_line(limits.timeout + SUPERVISOR_GRACE_S)
        except (BrokenPipeError, OSError, ValueError):
            answer = None
        if answer is None:
            self.close()
            return SandboxResult("error", False, "", "[sandbox] worker stopped answering; it was replaced",
                                 None, limits.timeout)
        return SandboxResult(passed=answer["status"] == "passed", **answer)

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        for f in (self.proc.stdin, self.proc.stdout):
            try:
                f.close()
            except OSError:
                pass
        shutil.rmtree(self.base, ignore_errors=True)


class SandboxPool:
    """A fixed number of warm workers; thread-safe. Use as a context manager or call close()."""

    def __init__(self, workers: int | None = None) -> None:
        self.size = max(1, workers or min(8, os.cpu_count() or 1))
        self._idle: queue.Queue[_Worker] = queue.Queue()
        self._started = 0
        self._lock = threading.Lock()
        self.isolation: dict | None = None

    def _take(self) -> _Worker:
        with self._lock:
            if self._started < self.size and self._idle.empty():
                self._started += 1
                worker = _Worker()
                self._note_isolation(worker.isolation)
                return worker
        return self._idle.get()

    def _give(self, worker: _Worker) -> None:
        if not worker.alive:
            try:
                worker = _Worker()
            except RuntimeError:
                with self._lock:
                    self._started -= 1
                return
        self._idle.put(worker)

    def _note_isolation(self, isolation: dict) -> None:
        if self.isolation is None:
            self.isolation = isolation
            if "network" not in isolation["namespaces"]:
                warnings.warn("sandbox: this OS refuses new namespaces here (" + "; ".join(isolation["notes"]) +
                              "): programs run with rlimits, their own process group and a scrubbed environment, "
                              "but WITHOUT network isolation or a read-only file system", RuntimeWarning)

    def run(self, code: str, timeout: float = 10.0, memory_mb: int = 1024, **limits) -> SandboxResult:
        lim = Limits(timeout=timeout, memory_mb=memory_mb, **limits).validate()
        worker = self._take()
        try:
            return worker.run(code, lim)
        finally:
            self._give(worker)

    def run_many(self, codes: Sequence[str], timeout: float = 10.0, memory_mb: int = 1024,
                 progress: bool = False, **limits) -> list[SandboxResult]:
        with ThreadPoolExecutor(self.size) as ex:
            futures = [ex.submit(self.run, c, timeout, memory_mb, **limits) for c in codes]
            return [f.result() for f in tqdm(futures, desc="sandbox", disable=not progress, unit="prog")]

    def close(self) -> None:
        with self._lock:
            while not self._idle.empty():
                self._idle.get_nowait().close()
            self._started = 0

    def __enter__(self) -> "SandboxPool":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


_default_pool: SandboxPool | None = None
_default_lock = threading.Lock()


def default_pool() -> SandboxPool:
    global _default_pool
    with _default_lock:
        if _default_pool is None:
            _default_pool = SandboxPool()
            atexit.register(_default_pool.close)
        return _default_pool


def run_code(code: str, timeout: float = 10.0, memory_mb: int = 1024, **limits) -> SandboxResult:
    """Run one Python program in the sandbox. Extra limits: max_processes, file_size_mb, max_open_files,
    max_output_bytes."""
    return default_pool().run(code, timeout, memory_mb, **limits)


def run_many(codes: Sequence[str], timeout: float = 10.0, workers: int | None = None, memory_mb: int = 1024,
             progress: bool = False, **limits) -> list[SandboxResult]:
    """Run many programs concurrently; results in input order."""
    if workers is None:
        return default_pool().run_many(codes, timeout, memory_mb, progress=progress, **limits)
    with SandboxPool(workers) as pool:
        return pool.run_many(codes, timeout, memory_mb, progress=progress, **limits)


def isolation() -> dict:
    """Which isolation layers are active on this machine (namespaces, read-only file system, root)."""
    pool = default_pool()
    worker = pool._take()
    try:
        return dict(worker.isolation)
    finally:
        pool._give(worker)
