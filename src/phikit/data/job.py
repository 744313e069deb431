"""Running a data step as datatrove tasks, on this machine (local), a Slurm cluster or a Ray cluster.

A step is a list of stages; each stage is a datatrove PipelineStep run as `tasks` tasks, at most `workers` at a
time. Everything a step makes before its output is complete lives in a work folder beside the output,
`OUTPUT.partial/` (the per-task parts, the datatrove logs and completion marks, and `job.json`, the settings it
was started with). A task writes its parts under temporary names and renames them when done, and datatrove marks
a task complete only after it returned, so a rerun of the same command after a crash or `kill -9` redoes only the
tasks that had not finished. The last stage writes the output (atomically); the work folder is then removed.
Locally and on Ray the command waits for every stage; on Slurm it submits the stages as dependent job arrays
and returns (the output appears when the last one ends; rerunning the command then finds it done and removes
the work folder). Every process a local stage starts (datatrove's workers and its manager process) dies with the
command, even on `kill -9` (on Linux), so a killed run leaves nothing behind to race its rerun.
"""
from __future__ import annotations

import ctypes
import hashlib
import importlib.util
import json
import os
import shutil
import signal
import sys
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from datatrove.pipeline.base import PipelineStep

from .io import WORK_SUFFIX, DataError, expand_paths, write_parts, write_report

EXECUTORS = ("local", "slurm", "ray")


class JobIncomplete(ValueError):
    """Some tasks of a stage did not finish: a rerun of the same command completes them."""


@dataclass
class Executor:
    """Where and how wide tasks run. `options` go to datatrove's executor: for Slurm at least partition and
    time (also e.g. cpus_per_task, mem_per_cpu_gb, qos, sbatch_args); for Ray e.g. cpus_per_task."""
    kind: str = "local"
    workers: int | None = None  # default: 2 locally, every task at once on a cluster
    options: dict[str, Any] = field(default_factory=dict)
    verbose: bool = False

    def check(self) -> None:
        """Refuse a wrong setting in one line before any work starts."""
        if self.kind not in EXECUTORS:
            raise ValueError(f"unknown executor {self.kind!r}: choose local, slurm or ray")
        if self.workers is not None and self.workers < 1:
            raise ValueError(f"--workers must be at least 1, got {self.workers}")
        if self.kind == "slurm":
            if not self.options.get("partition") or not self.options.get("time"):
                raise ValueError("the slurm executor needs a partition and a time limit: pass --slurm-partition "
                                 "and --slurm-time")
            if shutil.which("sbatch") is None:
                raise ValueError("--executor slurm needs Slurm's sbatch on PATH: run on a Slurm login node")
        elif self.options and self.kind == "local":
            raise ValueError(f"options {sorted(self.options)} are for --executor slurm or ray, not local")
        if self.kind == "ray" and importlib.util.find_spec("ray") is None:
            raise ValueError("--executor ray needs ray: pip install ray")

    def running(self, tasks: int) -> int:
        """How many of `tasks` tasks run at once."""
        return min(self.workers or (2 if self.kind == "local" else tasks), tasks)

    def build(self, stage: "Stage", logging_dir: Path, depends=None):
        """The datatrove executor of one stage (not yet run)."""
        pipeline, tasks = [stage.step], stage.tasks
        workers = self.running(tasks)
        if self.kind == "local":
            from datatrove.executor import LocalPipelineExecutor
            # forked workers share what the parent already loaded (a tokenizer, a benchmark index)
            return LocalPipelineExecutor(pipeline, tasks=tasks, workers=workers, logging_dir=str(logging_dir),
                                         start_method=_start_method(stage.start_method))
        if self.kind == "slurm":
            from datatrove.executor import SlurmPipelineExecutor
            return SlurmPipelineExecutor(pipeline, tasks=tasks, workers=workers, logging_dir=str(logging_dir),
                                         job_name=f"phikit-{stage.name}", depends=depends, **self.options)
        from datatrove.executor import RayPipelineExecutor
        return RayPipelineExecutor(pipeline, tasks=tasks, workers=workers, logging_dir=str(logging_dir),
                                   **self.options)


@dataclass
class Stage:
    name: str
    step: Any  # a datatrove PipelineStep
    tasks: int
    # how local workers start: forked (sharing what the command loaded), or "spawn" for steps that run torch,
    # whose thread pool does not survive a fork of a process that already used it
    start_method: str = "fork"


def default_tasks(inputs: Sequence[str | Path], per_task: int = 64 << 20) -> int:
    """One task per 64 MB of input, at least 4 (so 2-4 local workers all have work): a function of the input
    only, so the output does not change with the worker count, and a task's memory stays flat as corpora grow."""
    size = sum(p.stat().st_size for p in expand_paths(inputs))
    return max(4, min(4096, size // per_task + 1))


def fingerprint(inputs: Sequence[str | Path]) -> list[list]:
    """Each input file's path, size and a hash of its first and last MiB: a rerun resumes (or reuses a finished
    output) only over the same files, and a file written again with the same content still counts as the same."""
    out = []
    for p in expand_paths(inputs):
        size, h = p.stat().st_size, hashlib.blake2b(digest_size=16)
        with open(p, "rb") as f:
            h.update(f.read(1 << 20))
            if size > 2 << 20:
                f.seek(size - (1 << 20))
                h.update(f.read())
        out.append([str(p.resolve()), size, h.hexdigest()])
    return out


class WorkFolder:
    """`OUTPUT.partial/`: the tasks' parts and logs until the output is complete (see the module docstring)."""

    def __init__(self, output: str | Path, step: str, settings: dict[str, Any], overwrite: bool = False) -> None:
        self.output = Path(output)
        self.path = self.output.with_name(self.output.name + WORK_SUFFIX)
        job = {"step": step, "settings": settings}
        marker = self.path / "job.json"
        if self.path.exists():
            if not marker.is_file():
                raise ValueError(f"{self.path} exists and is not a phikit work folder: move it away or pick "
                                 "another output")
            if overwrite:  # redo from the start: our own unfinished run is discarded
                shutil.rmtree(self.path)
            elif json.loads(marker.read_text()) != json.loads(json.dumps(job)):
                raise ValueError(f"{self.path} holds an unfinished run with other inputs or settings: rerun "
                                 "that command to finish it, or pass --overwrite to discard it")
        if not self.path.exists():
            from phikit.files import write_text_atomic
            self.path.mkdir(parents=True)
            write_text_atomic(marker, json.dumps(job, indent=1) + "\n")

    def file(self, name: str) -> Path:
        return self.path / name

    def run(self, stages: Sequence[Stage], executor: Executor) -> bool:
        """Run the stages in order; True when they all finished here (False: submitted to Slurm)."""
        _quiet_datatrove(executor.verbose)
        if executor.kind == "slurm":
            last = None
            for i, stage in enumerate(stages):
                last = executor.build(stage, self.path / "logs" / f"{i}-{stage.name}", depends=last)
            last.run()
            return False
        if executor.kind == "ray":
            import logging

            import ray
            if not ray.is_initialized():  # the cluster RAY_ADDRESS names, else a local instance
                ray.init(address=os.environ.get("RAY_ADDRESS"), log_to_driver=executor.verbose,
                         logging_level=logging.INFO if executor.verbose else logging.ERROR)
        for i, stage in enumerate(stages):
            ex = executor.build(stage, self.path / "logs" / f"{i}-{stage.name}")
            with _children_die_with_us(executor.kind == "local"):
                ex.run()
            missing = ex.get_incomplete_ranks()
            if missing:
                raise JobIncomplete(f"{len(missing)} of {stage.tasks} {stage.name} tasks did not finish (logs in "
                                    f"{self.path / 'logs'}): rerun the same command to complete them")
        return True

    def remove(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)

    @staticmethod
    def remove_finished(output: str | Path) -> None:
        """The work folder of an output that is complete (left by a Slurm job, whose last task cannot remove it)."""
        path = Path(output).with_name(Path(output).name + WORK_SUFFIX)
        if (path / "job.json").is_file():
            shutil.rmtree(path, ignore_errors=True)


# A local stage's processes outlive a command killed with SIGKILL: datatrove's manager process waits for clients
# forever and a busy worker finishes its task (writing into the work folder a rerun uses). On Linux the kernel
# kills them with the command instead: forked ones get it from a fork hook, spawned pool workers (which run no
# fork hook) from a pool initializer, set through a multiprocess context of our own.
_PR_SET_PDEATHSIG = 1
_prctl = ctypes.CDLL(None, use_errno=True).prctl if sys.platform == "linux" else None
_guarding = 0  # the pid of this process while what it forks must die with it


def _die_with(parent: int) -> None:
    """Have the kernel SIGKILL this process when `parent` (the process that started it) dies."""
    global _guarding
    _prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:  # the parent died before the line above took effect
        os._exit(1)
    _guarding = os.getpid()  # and what this process forks dies with it


def _after_fork_in_child() -> None:
    if _guarding:
        _die_with(_guarding)


@contextmanager
def _children_die_with_us(on: bool):
    """While this runs, every process forked here (and spawned by a pool of our context) dies with this process.
    The signal comes when the forking thread ends: datatrove forks from the thread that runs the stage."""
    global _guarding
    if not on or _prctl is None or _guarding:
        yield
        return
    _guarding = os.getpid()
    try:
        yield
    finally:
        _guarding = 0


if _prctl is not None:
    import multiprocess.context

    os.register_at_fork(after_in_child=_after_fork_in_child)

    class _SpawnDyingWithParent(multiprocess.context.SpawnContext):
        def Pool(self, processes=None, initializer=None, initargs=(), maxtasksperchild=None):
            assert initializer is None, "datatrove's pool takes no initializer"
            return super().Pool(processes, _die_with, (os.getpid(),), maxtasksperchild)

    # A private table of multiprocess: where a later version renames it, spawned workers just lose the guard.
    _CONTEXTS = getattr(multiprocess.context, "_concrete_contexts", None)
    if isinstance(_CONTEXTS, dict):
        _CONTEXTS["phikit-spawn"] = _SpawnDyingWithParent()


def _start_method(method: str) -> str:
    registered = _prctl is not None and "phikit-spawn" in (getattr(sys.modules.get("multiprocess.context"),
                                                                     "_concrete_contexts", None) or {})
    return "phikit-spawn" if method == "spawn" and registered else method


def _quiet_datatrove(verbose: bool) -> None:
    """datatrove logs every task's start, end and statistics, and a failing task's traceback (the error itself
    reaches the command, which prints it in one line): shown with --verbose only."""
    from loguru import logger

    (logger.enable if verbose else logger.disable)("datatrove")


# One loaded object of each kind per process, with the file it came from (path, modification time).
_LOADED: dict[str, tuple[tuple[str, int], Any]] = {}


def load_once(kind: str, path: Path, load: Callable[[Path], Any], value: Any = None) -> Any:
    """What load(path) gives, loaded once per process: a worker loads a step's tokenizer or index once, not once
    per task, and local workers forked from the command inherit it. `value` is what the command just wrote to
    `path`: kept as loaded, so forked workers load nothing at all."""
    key = (str(Path(path).resolve()), Path(path).stat().st_mtime_ns)
    if value is not None or _LOADED.get(kind, (None,))[0] != key:
        _LOADED[kind] = (key, load(path) if value is None else value)
    return _LOADED[kind][1]


def task_file(folder: Path, kind: str, rank: int, suffix: str = ".json") -> Path:
    return folder / f"{kind}-{rank:05d}{suffix}"


def write_json(path: Path, obj: Any) -> None:
    from phikit.files import write_text_atomic

    write_text_atomic(path, json.dumps(obj) + "\n")


def read_manifests(folder: Path, kind: str, tasks: int) -> list[dict[str, Any]]:
    out = []
    for rank in range(tasks):
        path = task_file(folder, kind, rank)
        if not path.is_file():
            raise JobIncomplete(f"task {rank} left no {path.name}: rerun the same command to complete it")
        out.append(json.loads(path.read_text()))
    return out


class ConcatStage(PipelineStep):
    """The last stage of a step whose tasks each wrote `part-NNNNN.jsonl` and `<kind>-NNNNN.json` (with at least
    "input" and "skipped"): one task writes the parts, in order, as the output, and the report that
    `summarize(manifests, work folder)` makes of the tasks' counts."""
    name = "merge"
    type = "Writer"

    def __init__(self, step: str, work: str, kind: str, tasks: int, output: str,
                 summarize: Callable[[list[dict], Path], dict]) -> None:
        super().__init__()
        self.step, self.work, self.kind, self.tasks, self.output, self.summarize = \
            step, work, kind, tasks, output, summarize

    def run(self, data=None, rank: int = 0, world_size: int = 1):
        folder = Path(self.work)
        manifests = read_manifests(folder, self.kind, self.tasks)
        if sum(m["input"] for m in manifests) == 0:
            raise DataError(f"the inputs hold no documents: nothing to {self.step} (check the files and "
                            "--text-field)")
        summary = self.summarize(manifests, folder)
        write_parts(self.output, [task_file(folder, "part", r, ".jsonl") for r in range(self.tasks)])
        skipped = [s for m in manifests for s in m["skipped"]]
        write_report(self.output, {"step": self.step, **summary, "skipped_lines": len(skipped), "skipped": skipped})
        return iter(())
