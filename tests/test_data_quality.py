"""Educational-value scoring on a real corpus no one here wrote: the Python standard library's own source."""
from __future__ import annotations

import json
import sysconfig
from pathlib import Path

import numpy as np

from phikit.cli import main
from phikit.data import quality

STDLIB = Path(sysconfig.get_paths()["stdlib"])


def test_code_rubric_is_additive():
    bare = "def f(x):\n    return x+1\n"
    documented = ('"""Helpers."""\n\n\ndef f(x):\n    """Add one.\n\n    >>> f(1)\n    2\n    """\n'
                  '    # one more than x\n    return x + 1\n')
    assert quality.code_rubric(bare) == 1  # short functions only
    assert quality.code_rubric(documented) == 5
    assert quality.code_rubric("def (:") == 0


def test_heads_learn_a_separable_signal():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 6, 100)
    x = np.c_[y + rng.normal(0, 0.1, 100), rng.normal(size=(100, 5))]
    for head in ("rf", "linear"):
        fitted, metrics = quality.fit_head(x, y, head)
        assert metrics["heldout_f1"] > 0.95 and metrics["heldout"] == 20
        assert np.all((0 <= fitted.predict(x)) & (fitted.predict(x) <= 5))


def test_score_and_filter_stdlib(tmp_path, tiny_phi_checkpoint):
    corpus = tmp_path / "stdlib.jsonl"
    roots = [str(STDLIB / d) for d in ("json", "email", "concurrent", "logging", "importlib", "xml", "asyncio")]
    assert main(["data", "from-files", *roots, "--glob", "*.py", "--output", str(corpus)]) == 0
    n_docs = sum(1 for _ in corpus.open())
    assert n_docs > 80
    scored, report_dir = tmp_path / "scored.jsonl", tmp_path / "report"
    assert main(["data", "score", str(corpus), "--model", str(tiny_phi_checkpoint), "--annotator", "code-rubric",
                 "--sample", "80", "--max-tokens", "64", "--output", str(scored), "--report-dir",
                 str(report_dir)]) == 0
    report = json.loads((report_dir / "report.json").read_text())
    assert report["annotations"] == 80 and report["heldout"] == 16 and 0 <= report["heldout_f1"] <= 1
    assert report["documents"] == n_docs and sum(report["annotation_histogram"].values()) == 80
    png = (report_dir / "score_histogram.png").read_bytes()
    assert png.startswith(b"\x89PNG")
    assert "heldout_f1" in (report_dir / "report.md").read_text()
    rows = [json.loads(x) for x in scored.read_text().splitlines()]
    assert len(rows) == n_docs and all(0 <= r["edu_score"] <= 5 for r in rows)
    kept = tmp_path / "kept.jsonl"
    assert main(["data", "filter", str(scored), "--threshold", "2.5", "--output", str(kept)]) == 0
    expected = [r["id"] for r in rows if r["edu_score"] >= 2.5]
    assert [json.loads(x)["id"] for x in kept.read_text().splitlines()] == expected


def test_score_reply_parsing():
    assert quality.parse_score("Clear and useful.\nEducational score: 4") == 4
    assert quality.parse_score("**Educational score: 3/5**") == 3
    assert quality.parse_score("Educational score: 10") is None  # out of range, not a 1
    assert quality.parse_score("no verdict") is None


def test_one_failed_annotation_does_not_lose_the_others():
    import httpx

    from phikit.data.synth import Teacher

    def grade(request):
        if b"broken" in request.content:
            return httpx.Response(503, text="overloaded")
        return httpx.Response(200, json={"choices": [{"message": {"content": "Fine.\nEducational score: 3"}}]})
    teacher = Teacher("http://grader.test/v1", "g", max_retries=1, backoff=0.001, transport=httpx.MockTransport(grade))
    assert quality.annotate_with_teacher(["a lesson", "broken page", "another lesson"], teacher) == [3, None, 3]


def test_report_counts_kept_both_ways(tmp_path):
    # F1 judges rounded scores (2.6 counts as 3); kept_at_threshold is what `filter --threshold 3` keeps.
    report = quality.write_report(tmp_path, {"heldout_f1": 0.5}, np.array([2.6, 3.0, 1.0, 4.2]), 3.0)
    assert report["kept_at_threshold"] == 2 and report["kept_when_rounded"] == 3
    assert "| kept_when_rounded | 3 |" in (tmp_path / "report.md").read_text()


def test_a_score_of_exactly_half_rounds_up_as_filter_keeps_it(tmp_path):
    # `filter --threshold 2.5` keeps a document scored 2.5, so "rounds to 3 or more" must count it too.
    scores = np.array([2.5, 2.4999, 3.5, 1.0])
    report = quality.write_report(tmp_path, {}, scores, 3.0)
    assert report["kept_when_rounded"] == int(np.sum(scores >= 2.5)) == 2
    assert quality.round_half_up(scores).tolist() == [3.0, 2.0, 4.0, 1.0]


class _Head:
    """A stand-in head (saved by the command for its tasks): the raw score of document i, whose feature is i."""
    raw = [2.4999999999999996, 2.9999999999999996, 1.0, 4.2]

    def predict(self, features):
        return np.array([self.raw[int(i)] for i in features[:, 0]])


def test_score_report_counts_what_filter_keeps(tmp_path, monkeypatch):
    # A forest's mean can land a hair under a half (2.4999999999999996): written as 2.5, `filter --threshold 2.5`
    # keeps it, so the report's kept_when_rounded must count it too.
    monkeypatch.setattr(quality, "load_embedding_model", lambda name: (None, None))
    monkeypatch.setattr(quality, "_models", {})
    monkeypatch.setattr(quality, "embed", lambda texts, model, tok, max_tokens, **kw: np.array(
        [[float(t[5:t.index("(")])] for t in texts]))
    monkeypatch.setattr(quality, "fit_head", lambda *a, **k: (_Head(), {}))
    corpus, scored = tmp_path / "docs.jsonl", tmp_path / "scored.jsonl"
    corpus.write_text("".join(json.dumps({"id": str(i), "text": f"def f{i}(): pass"}) + "\n" for i in range(4)))
    assert main(["data", "score", str(corpus), "--annotator", "code-rubric", "--output", str(scored),
                 "--report-dir", str(tmp_path / "report"), "--workers", "1"]) == 0  # (the stand-ins live here)
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    for threshold, key in (("2.5", "kept_when_rounded"), ("3", "kept_at_threshold")):
        kept = tmp_path / f"kept{threshold}.jsonl"
        assert main(["data", "filter", str(scored), "--threshold", threshold, "--output", str(kept)]) == 0
        assert report[key] == len(kept.read_text().splitlines()), key
    assert report["kept_when_rounded"] == 3 and report["kept_at_threshold"] == 2
