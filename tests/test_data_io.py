"""Record files: malformed lines reported with file and line, skipped or fatal by flag; shards cover every line."""
from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest

from phikit.cli import main
from phikit.data.io import DataError, ReadStats, read_records, write_records


def _write(path, lines):
    path.write_text("".join(line + "\n" for line in lines))
    return path


def test_malformed_lines_named_and_skipped_or_fatal(tmp_path):
    f = _write(tmp_path / "a.jsonl", ['{"text": "one"}', '{"text": "two"', '', '[1, 2]', '{"txt": "x"}',
                                      '{"text": "five"}'])
    with pytest.raises(DataError, match=r"a\.jsonl:2: malformed JSON"):
        list(read_records([f]))
    stats = ReadStats()
    got = [r["text"] for r in read_records([f], on_error="skip", stats=stats, quiet=True)]
    assert got == ["one", "five"]
    assert [m.split(": ")[0].rsplit("/", 1)[-1] for m in stats.skipped] == ["a.jsonl:2", "a.jsonl:4", "a.jsonl:5"]
    assert "no string field 'text'" in stats.skipped[2]


def test_cli_reports_bad_line_and_exits_2(tmp_path, capsys):
    f = _write(tmp_path / "in.jsonl", ['{"text": "a b c"}', 'not json'])
    cmd = ["data", "dedup", str(f), "--output", str(tmp_path / "out.jsonl")]
    assert main(cmd) == 2
    err = capsys.readouterr().err
    assert "in.jsonl:2: malformed JSON" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out.jsonl").exists() and not (tmp_path / "out.jsonl.tmp").exists()
    assert main(cmd + ["--on-error", "skip"]) == 0
    assert "in.jsonl:2" in capsys.readouterr().err
    assert [json.loads(x)["text"] for x in (tmp_path / "out.jsonl").read_text().splitlines()] == ["a b c"]


def test_byte_range_shards_cover_every_line_once(tmp_path):
    lines = [json.dumps({"text": "x" * (i % 37), "i": i}) for i in range(500)]
    f = _write(tmp_path / "c.jsonl", lines)
    for world in (1, 2, 3, 7):
        seen = [r["i"] for rank in range(world) for r in read_records([f], shard=(rank, world))]
        assert sorted(seen) == list(range(500))
    # line numbers stay right inside a later shard
    bad = _write(tmp_path / "d.jsonl", lines[:300] + ["{oops"] + lines[300:])
    with pytest.raises(DataError, match=r"d\.jsonl:301:"):
        for rank in range(3):
            list(read_records([bad], shard=(rank, 3)))


def test_parquet_and_gzip_round_trip(tmp_path):
    records = [{"text": f"doc {i}", "n": i} for i in range(25)]
    for name in ("r.parquet", "r.jsonl.gz", "r.jsonl"):
        assert write_records(tmp_path / name, records) == 25
        assert list(read_records([tmp_path / name])) == records
    assert pq.read_table(tmp_path / "r.parquet").num_rows == 25  # readable by pyarrow itself
    with pytest.raises(DataError, match="no column 'body'"):
        list(read_records([tmp_path / "r.parquet"], text_field="body"))
