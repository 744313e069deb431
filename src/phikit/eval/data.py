"""Benchmark data from local files, in the layouts the public datasets use (as exported by `datasets`):
JSONL, JSON (a list of records) or Parquet, one file per split, or sharded like the Hub's `test-00000-of-00001`.

    DATA_DIR/<task dir>/<split>.jsonl            e.g. data/arc_easy/test.jsonl
    DATA_DIR/<task dir>/<split>-00000-of-00001.parquet
    DATA_DIR/<task dir>/<subset>/<split>.parquet  e.g. data/ai2_arc/ARC-Easy/test.parquet
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

SUFFIXES = (".jsonl", ".json", ".parquet")


class Record(dict):
    """A task record that knows where it came from (`FILE:LINE`, or `FILE row N`), for messages about it."""
    where: str = "a record"


def _record(value, where: str) -> Record:
    if not isinstance(value, dict):
        raise ValueError(f"{where}: expected a JSON object (a record with the task's fields), got "
                         f"{type(value).__name__}")
    rec = Record(value)
    rec.where = where
    return rec


def read_file(path: Path) -> list[Record]:
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq
        return [_record(r, f"{path} row {i}") for i, r in enumerate(pq.read_table(path).to_pylist(), 1)]
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".json" and text.lstrip().startswith("["):
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{e.lineno}: not valid JSON ({e.msg}): fix the file") from e
        return [_record(r, f"{path} record {i}") for i, r in enumerate(rows, 1)]
    records = []
    for line_no, line in enumerate(text.split("\n"), 1):
        if line.strip():
            try:
                records.append(_record(json.loads(line), f"{path}:{line_no}"))
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{line_no}: not valid JSON ({e.msg}): one JSON object per line is "
                                 "expected") from e
    return records


def split_files(directory: Path, split: str) -> list[Path]:
    files = [directory / f"{split}{s}" for s in SUFFIXES if (directory / f"{split}{s}").is_file()]
    if not files:
        files = sorted(p for s in SUFFIXES for p in directory.glob(f"{split}-*{s}"))
    return files


def load_split(data_dir: str | Path | None, dir_names: Sequence[str], split: str, task: str,
               source: str) -> list[dict]:
    """Records of one split; a missing file raises a message saying where to put it."""
    if data_dir is None:
        raise FileNotFoundError(f"{task} needs local data: pass --data-dir DIR with {dir_names[0]}/{split}.jsonl "
                                f"(or .parquet), exported from the dataset {source}")
    root = Path(data_dir).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"data directory {root} does not exist: create it or point --data-dir elsewhere")
    for name in dir_names:
        files = split_files(root / name, split)
        if files:
            records = [r for f in files for r in read_file(f)]
            if not records:  # scoring nothing would report n=0 and acc nan as if it were a result
                raise ValueError(f"{task}: {', '.join(map(str, files))} holds no records: export {source} split "
                                 f"'{split}' there")
            return records
    tried = ", ".join(f"{root / n}/{split}.jsonl" for n in dir_names[:2])
    raise FileNotFoundError(f"{task}: no {split} split found (looked for {tried} and .json/.parquet/sharded "
                            f"variants): export {source} split '{split}' there")
