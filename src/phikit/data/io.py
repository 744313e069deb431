"""Reading and writing record files (JSONL, gzipped JSONL, Parquet) for the data pipeline.

Every bad line is reported with its file and line number; `on_error="skip"` skips it (and says so on stderr and
in the returned error list), `on_error="fail"` stops with that message. Nothing is dropped silently.
Outputs are written to a temporary name and renamed into place when complete, so a crash never leaves a
half-written file; `AppendLog` is the exception: an append-only JSONL whose torn last line is repaired on reopen.
"""
from __future__ import annotations

import gzip
import io
import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

JSONL_SUFFIXES = (".jsonl", ".json", ".jsonl.gz", ".json.gz", ".ndjson")
PARQUET_SUFFIXES = (".parquet", ".pq")
TEXT_SUFFIXES = (".txt", ".md", ".py")
REPORT_SUFFIX = ".report.json"  # OUTPUT.report.json: the counts a step writes beside its output
WORK_SUFFIX = ".partial"  # OUTPUT.partial/: a step's tasks and their parts until the output is complete


class DataError(ValueError):
    """Bad input data; the message names the file, the line and the fix."""


@dataclass
class ReadStats:
    """What a read saw: records yielded and bad lines skipped (each as 'file:line: reason')."""
    records: int = 0
    skipped: list[str] = field(default_factory=list)
    where: str = ""  # "file:line" of the record last yielded, for a later step's message about it


def expand_paths(paths: Sequence[str | Path]) -> list[Path]:
    """Files named directly, plus the record files inside named directories (sorted, recursively)."""
    out: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.is_file() and _is_data(f.relative_to(p)))
            if not found:
                raise FileNotFoundError(f"directory {p} holds no .jsonl or .parquet files: point at the data files")
            out.extend(found)
        elif p.exists():
            out.append(p)
        else:
            raise FileNotFoundError(f"input {p} does not exist: check the path")
    return out


def _is_data(relative: Path) -> bool:
    """A record file inside a directory given as input; not what the steps write beside their outputs (reports,
    rejects, work folders, hidden files)."""
    name = relative.name
    return (_kind(relative) in ("jsonl", "parquet") and not name.endswith((REPORT_SUFFIX, ".rejected.jsonl"))
            and not any(part.startswith(".") or part.endswith(WORK_SUFFIX) for part in relative.parts))


def _kind(path: Path) -> str:
    name = path.name.lower()
    if name.endswith(JSONL_SUFFIXES):
        return "jsonl"
    if name.endswith(PARQUET_SUFFIXES):
        return "parquet"
    if name.endswith(TEXT_SUFFIXES):
        return "text"
    return "unknown"


def shard_ranges(paths: Sequence[Path], shard: tuple[int, int] | None) -> list[tuple[int, int]]:
    """For each file, the byte range [lo, hi) of it that belongs to shard (rank, world): the inputs are taken as
    one stream of bytes (their concatenation, in order) cut into `world` equal contiguous pieces. So shard r holds
    records that all come before shard r+1's, the split depends only on the files and `world`, and the
    concatenation of every shard's output is the output of one pass over the inputs."""
    sizes = [p.stat().st_size for p in paths]
    if not shard:
        return [(0, size) for size in sizes]
    rank, world = shard
    total = sum(sizes)
    r0, r1 = total * rank // world, total * (rank + 1) // world
    out, start = [], 0
    for size in sizes:
        out.append((min(max(r0 - start, 0), size), min(max(r1 - start, 0), size)))
        start += size
    return out


def iter_jsonl_lines(path: Path, lo: int = 0, hi: int | None = None) -> Iterator[tuple[int, bytes]]:
    """(line number, raw line) pairs of the non-blank lines that start in bytes [lo, hi) of the file, undecoded
    (the caller reports a line that is not UTF-8 like any other bad line). A gzip file cannot be entered in the
    middle: its lines are placed in proportion to their offset in the decompressed text."""
    size = path.stat().st_size
    hi = size if hi is None else hi
    if lo >= hi:
        return
    if path.name.endswith(".gz"):
        whole = (lo, hi) == (0, size)
        total = 0 if whole else _gzip_length(path)
        with gzip.open(path, "rb") as f:
            offset = 0
            for i, raw in enumerate(f, 1):
                if whole or lo <= size * offset // max(total, 1) < hi:
                    yield from _decoded(path, i, raw)
                offset += len(raw)
        return
    with open(path, "rb") as f:
        lineno = 0
        if lo > 0:
            f.seek(lo - 1)
            if f.read(1) != b"\n":
                f.readline()  # the line that straddles the boundary belongs to the previous shard
            lineno = _count_newlines(path, f.tell())
        while f.tell() < hi:
            raw = f.readline()
            if not raw:
                break
            lineno += 1
            yield from _decoded(path, lineno, raw)


def _gzip_length(path: Path, chunk: int = 1 << 22) -> int:
    n = 0
    with gzip.open(path, "rb") as f:
        while buf := f.read(chunk):
            n += len(buf)
    return n


def _decoded(path: Path, lineno: int, raw: bytes) -> Iterator[tuple[int, bytes]]:
    if lineno == 1 and raw.startswith(b"\xef\xbb\xbf"):  # a UTF-8 byte order mark (editors on Windows add one)
        raw = raw[3:]
    if raw.strip():
        yield lineno, raw


def _count_newlines(path: Path, end: int, chunk: int = 1 << 24) -> int:
    """Newlines in the first `end` bytes (line numbers for a shard that starts mid-file)."""
    n = 0
    with open(path, "rb") as f:
        while end > 0:
            buf = f.read(min(chunk, end))
            if not buf:
                break
            n += buf.count(b"\n")
            end -= len(buf)
    return n


def read_records(paths: Sequence[str | Path], text_field: str | None = "text", on_error: str = "fail",
                 stats: ReadStats | None = None, shard: tuple[int, int] | None = None,
                 quiet: bool = False) -> Iterator[dict[str, Any]]:
    """Yield records (dicts) from JSONL/Parquet files or directories of them; .txt/.py/.md files are one record
    each with the file's content in `text_field`. When text_field is given, each record must hold a string there.
    Bad lines raise DataError (on_error="fail") or are skipped and reported (on_error="skip")."""
    if on_error not in ("fail", "skip"):
        raise ValueError(f"on_error must be 'fail' or 'skip', got {on_error!r}")
    stats = stats if stats is not None else ReadStats()

    def bad(where: str, reason: str) -> None:
        msg = f"{where}: {reason}"
        if on_error == "fail":
            raise DataError(f"{msg} (fix the record, or pass --on-error skip to skip bad lines)")
        stats.skipped.append(msg)
        if not quiet:
            print(f"warning: skipped {msg}", file=sys.stderr)

    files = expand_paths(paths)
    for path, (lo, hi) in zip(files, shard_ranges(files, shard)):
        kind = _kind(path)
        if lo >= hi and (shard or kind != "text"):
            continue  # not this shard's (an empty text file is still one record, of the first pass)
        if kind == "jsonl":
            for lineno, raw in iter_jsonl_lines(path, lo, hi):
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as e:  # a bad line like any other: --on-error skip skips it
                    bad(f"{path}:{lineno}", f"not UTF-8 ({e.reason} at byte {e.start}): re-encode the file as UTF-8")
                    continue
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError as e:
                    bad(f"{path}:{lineno}", f"malformed JSON ({e.msg}, column {e.colno})")
                    continue
                if not isinstance(rec, dict):
                    bad(f"{path}:{lineno}", f"expected a JSON object, got {type(rec).__name__}")
                    continue
                if text_field and not isinstance(rec.get(text_field), str):
                    bad(f"{path}:{lineno}", f"no string field {text_field!r} (use --text-field to name it)")
                    continue
                stats.records += 1
                stats.where = f"{path}:{lineno}"
                yield rec
        elif kind == "parquet":
            yield from _read_parquet(path, text_field, bad, stats, lo, hi)
        elif kind == "text":
            if lo != 0:  # a text file is one record: the shard holding its first byte reads it
                continue
            stats.records += 1
            # utf-8-sig: a byte order mark is not part of the text
            yield {text_field or "text": path.read_text(encoding="utf-8-sig", errors="replace"), "source": str(path)}
        else:
            raise DataError(f"{path}: unknown file type: use .jsonl, .jsonl.gz or .parquet")


def _read_parquet(path: Path, text_field, bad, stats: ReadStats, lo: int, hi: int) -> Iterator[dict]:
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises several types for a broken file
        raise DataError(f"{path}: not a readable Parquet file ({e}): check the file") from e
    if text_field and text_field not in pf.schema_arrow.names:
        raise DataError(f"{path}: no column {text_field!r} (columns: {', '.join(pf.schema_arrow.names)}); "
                        f"use --text-field")
    row = 0
    for group in range(pf.num_row_groups):
        size = path.stat().st_size
        if not lo <= size * group // pf.num_row_groups < hi:  # row groups placed in proportion within the file
            row += pf.metadata.row_group(group).num_rows
            continue
        for rec in pf.read_row_group(group).to_pylist():
            row += 1
            if text_field and not isinstance(rec.get(text_field), str):
                bad(f"{path}:row {row}", f"column {text_field!r} is not a string")
                continue
            stats.records += 1
            yield rec


class RecordWriter:
    """Write records to .jsonl, .jsonl.gz or .parquet; the file appears under its name only when closed
    without error (written as NAME.tmp, then renamed)."""

    def __init__(self, path: str | Path, parquet_batch: int = 10_000) -> None:
        self.path = Path(path)
        self.kind = _kind(self.path)
        if self.kind not in ("jsonl", "parquet"):
            raise ValueError(f"output {self.path} must end in .jsonl, .jsonl.gz or .parquet")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = self.path.with_name(self.path.name + ".tmp")
        self.count = 0
        self._rows: list[dict] = []
        self._batch = parquet_batch
        self._pq_writer = None
        if self.kind == "jsonl":
            raw = open(self.tmp, "wb")
            self._f = io.TextIOWrapper(gzip.GzipFile(fileobj=raw, mode="wb") if self.path.name.endswith(".gz")
                                       else raw, encoding="utf-8")

    def write(self, record: dict[str, Any]) -> None:
        self.count += 1
        if self.kind == "jsonl":
            try:
                self._f.write(json.dumps(record, ensure_ascii=False) + "\n")
            except UnicodeEncodeError:  # a lone surrogate (read from an input's "\ud800" escape) has no UTF-8
                self._f.write(json.dumps(record) + "\n")  # form: this record keeps its escapes, as it came in
        else:
            self._rows.append(record)
            if len(self._rows) >= self._batch:
                self._flush_parquet()

    def write_line(self, line: str) -> None:
        """One record already serialized as a JSON line (JSONL outputs only)."""
        self.count += 1
        self._f.write(line)

    def write_all(self, records: Iterable[dict[str, Any]]) -> None:
        for r in records:
            self.write(r)

    def _flush_parquet(self) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        if not self._rows:
            return
        # Columns are every field of any record (from_pylist would take the first record's fields and silently
        # drop the others, e.g. `contamination`, which only flagged records carry).
        names = list(self._pq_writer.schema.names) if self._pq_writer is not None else []
        names += [k for k in dict.fromkeys(k for r in self._rows for k in r) if k not in names]
        table = pa.Table.from_pydict({k: [r.get(k) for r in self._rows] for k in names})
        if self._pq_writer is not None:
            try:
                table = table.cast(self._pq_writer.schema)
            except (ValueError, TypeError, pa.ArrowException):
                # A field first seen in this batch (or a column that was all null so far): a Parquet file has one
                # schema, so rewrite what was written under one that holds both.
                self._pq_writer.close()
                table = pa.concat_tables([pq.read_table(self.tmp), table], promote_options="permissive")
                self._pq_writer = None
        if self._pq_writer is None:
            self._pq_writer = pq.ParquetWriter(self.tmp, table.schema)
        self._pq_writer.write_table(table)
        self._rows = []

    def close(self) -> None:
        if self.kind == "jsonl":
            self._f.close()
        else:
            self._flush_parquet()
            if self._pq_writer is None:  # no rows: still write a valid empty file
                import pyarrow as pa
                import pyarrow.parquet as pq
                pq.write_table(pa.table({"text": pa.array([], pa.string())}), self.tmp)
            else:
                self._pq_writer.close()
        os.replace(self.tmp, self.path)

    def abort(self) -> None:
        try:
            if self.kind == "jsonl":
                self._f.close()
            elif self._pq_writer is not None:
                self._pq_writer.close()
        finally:
            self.tmp.unlink(missing_ok=True)

    def __enter__(self) -> "RecordWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def write_parts(output: str | Path, parts: Sequence[Path], drop: Iterable[int] = (),
                dropped: Any = None) -> int:
    """Write the records of JSONL part files, in order, to `output` (any record format), leaving out those whose
    position (counted across all parts) is in the ascending sequence `drop`; `dropped(position, record)` is
    called for each one left out. Returns how many were written. Lines are copied as they are when the output is
    plain JSONL, so the result is byte for byte what one RecordWriter over the same records writes."""
    drop = iter(drop)
    next_drop = next(drop, None)
    position = 0
    with RecordWriter(output) as w:
        plain = w.kind == "jsonl" and not w.path.name.endswith(".gz")
        for part in parts:
            with open(part, "rb") as f:
                for line in f:
                    if position == next_drop:
                        if dropped is not None:
                            dropped(position, json.loads(line))
                        next_drop = next(drop, None)
                    elif plain:
                        w.write_line(line.decode("utf-8"))
                    else:
                        w.write(json.loads(line))
                    position += 1
        return w.count


def write_report(output: str | Path, report: dict[str, Any]) -> Path:
    """OUTPUT.report.json: a step's counts, beside its output (it also marks the output as this step's)."""
    from phikit.files import write_text_atomic

    path = Path(output)
    path = path.with_name(path.name + REPORT_SUFFIX)
    write_text_atomic(path, json.dumps(report, indent=2, default=str) + "\n")
    return path


def write_records(path: str | Path, records: Iterable[dict[str, Any]]) -> int:
    """Write all records atomically; returns how many."""
    with RecordWriter(path) as w:
        w.write_all(records)
        return w.count


class AppendLog:
    """An append-only JSONL file that survives a crash: each record is one line written whole and fsynced;
    on open, a torn last line (a crash mid-write) is cut off, so the file always holds whole records."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._repair()
        self._f = open(self.path, "ab")

    def _repair(self) -> None:
        if not self.path.exists():
            return
        data = self.path.read_bytes()
        end = data.rfind(b"\n") + 1  # keep everything up to the last complete line
        if end != len(data):
            with open(self.path, "r+b") as f:
                f.truncate(end)

    def records(self) -> Iterator[dict[str, Any]]:
        with open(self.path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if line.strip():
                    try:
                        yield json.loads(line)
                    except json.JSONDecodeError as e:
                        raise DataError(f"{self.path}:{lineno}: malformed JSON in the output log ({e.msg}): "
                                        f"delete that line and rerun") from e

    def append(self, record: dict[str, Any]) -> None:
        self._f.write((json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8"))
        self._f.flush()
        os.fsync(self._f.fileno())

    def close(self) -> None:
        self._f.close()

    def __enter__(self) -> "AppendLog":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
