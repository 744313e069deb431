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


@pytest.mark.parametrize("step", [["dedup"], ["filter", "--score-field", "s"],
                                  ["decontaminate", "--benchmarks", "humaneval"]])
def test_skipped_lines_are_counted_in_the_report(tmp_path, capsys, step):
    f = _write(tmp_path / "in.jsonl", ['{"text": "a b c", "s": 5}', '{"text": "d e', '{"text": "f g h", "s": 4}'])
    out = tmp_path / "out.jsonl"
    assert main(["data", step[0], str(f), "--output", str(out), "--on-error", "skip", *step[1:]]) == 0
    report = json.loads((tmp_path / "out.jsonl.report.json").read_text())
    assert report["skipped_lines"] == 1 and report["skipped"][0].endswith("in.jsonl:2: malformed JSON "
                                                                         "(Invalid control character at, column 14)")
    assert '"skipped_lines": 1' in capsys.readouterr().out


def test_tokenizer_train_reads_record_files_like_the_data_steps(tmp_path, capsys):
    from phikit.tokenizer import Tokenizer
    f = _write(tmp_path / "c.jsonl", ['{"text": "the cat sat on the mat"}', '{"text": "a dog'])
    out = tmp_path / "tok"
    assert main(["tokenizer", "train", str(f), "--vocab-size", "300", "--output", str(out)]) == 2
    assert "c.jsonl:2: malformed JSON" in capsys.readouterr().err and not out.exists()
    assert main(["tokenizer", "train", str(f), "--text-field", "body", "--output", str(out)]) == 2
    assert "no string field 'body'" in capsys.readouterr().err  # not a KeyError traceback
    assert main(["tokenizer", "train", str(_write(tmp_path / "e.jsonl", [])), "--output", str(out)]) == 2
    assert "no documents in" in capsys.readouterr().err and not out.exists()
    assert main(["tokenizer", "train", str(f), "--on-error", "skip", "--vocab-size", "300", "--output", str(out)]) == 0
    assert Tokenizer.from_file(out / "tokenizer.json").encode("the cat")


@pytest.mark.parametrize("argv,message", [
    (["filter", "IN", "--output", "OUT.jsonl"], "in.jsonl:1: edu_score='high' is not a number"),
    (["mix", "shards/a=abc", "--output", "OUT.yaml"], "is not DIR=WEIGHT"),
    (["procedural", "--n", "-5", "--output", "OUT.jsonl"], "--n must be at least 1"),
    (["pack", "EMPTY", "--output", "OUT"], "are empty: nothing to pack"),
])
def test_bad_values_are_one_line_errors_and_write_nothing(tmp_path, capsys, argv, message):
    src = _write(tmp_path / "in.jsonl", ['{"text": "a", "edu_score": "high"}'])
    empty = _write(tmp_path / "empty.jsonl", [])
    argv = [a.replace("IN", str(src)).replace("EMPTY", str(empty)).replace("OUT", str(tmp_path / "out"))
            for a in argv]
    assert main(["data", *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
    assert not list(tmp_path.glob("out*"))


def test_bom_crlf_and_invalid_utf8_lines(tmp_path):
    f = tmp_path / "win.jsonl"
    f.write_bytes(b'\xef\xbb\xbf{"text": "one"}\r\n{"text": "t\xffwo"}\r\n{"text": "three"}\r\n')
    stats = ReadStats()
    assert [r["text"] for r in read_records([f], on_error="skip", stats=stats, quiet=True)] == ["one", "three"]
    assert len(stats.skipped) == 1 and "win.jsonl:2: not UTF-8" in stats.skipped[0]
    with pytest.raises(DataError, match=r"win\.jsonl:2: not UTF-8"):
        list(read_records([f]))
    t = tmp_path / "doc.txt"
    t.write_bytes(b"\xef\xbb\xbfhello\r\n")
    assert [r["text"] for r in read_records([t])] == ["hello\n"]


def test_parquet_keeps_fields_missing_from_the_first_records(tmp_path):
    from phikit.data.io import RecordWriter

    recs = [{"text": "a"}, {"text": "b", "n": None}, {"text": "c", "n": 3, "contamination": [{"item": "x"}]},
            {"text": "d"}, {"text": "e", "n": 5}]
    for batch in (2, 10):  # the new field inside the first batch, and in a later one
        out = tmp_path / f"out{batch}.parquet"
        with RecordWriter(out, parquet_batch=batch) as w:
            w.write_all(recs)
        got = list(read_records([out]))
        assert [r.get("n") for r in got] == [None, None, 3, None, 5]
        assert [r.get("contamination") for r in got] == [None, None, [{"item": "x"}], None, None]
        assert not (tmp_path / f"out{batch}.parquet.tmp").exists()


def test_a_lone_surrogate_read_from_an_escape_is_written_back_as_it_came(tmp_path):
    """JSON may escape a lone surrogate ("\\ud800"), which has no UTF-8 form: that record keeps its escape, the
    others are written as UTF-8, and reading the output gives the same strings."""
    src = tmp_path / "in.jsonl"
    src.write_text('{"text": "caf\\u00e9"}\n{"text": "bad \\ud800 half"}\n{"text": "ok"}\n', encoding="utf-8")
    records = list(read_records([src], "text"))
    out = tmp_path / "out.jsonl"
    write_records(out, records)
    assert [r["text"] for r in read_records([out], "text")] == ["café", "bad \ud800 half", "ok"]
    assert "café" in out.read_text(encoding="utf-8")  # the other records stay readable UTF-8
