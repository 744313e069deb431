"""`phikit data synth` against phikit's own server serving a tiny model, with 30% of requests failing or hanging,
and the process killed mid-run and restarted: every prompt must end up answered exactly once."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from phikit.data import synth

HERE = Path(__file__).parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def teacher_url():
    port = _free_port()
    proc = subprocess.Popen([sys.executable, str(HERE / "data_teacher_server.py"), str(port), "0.3"])
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 90
    while time.time() < deadline:
        try:
            if httpx.get(url + "/v1/models", timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            time.sleep(0.3)
    else:
        proc.kill()
        pytest.fail("the test teacher server did not start")
    yield url
    proc.kill()  # hung requests would hold a graceful shutdown for their full 30 s
    proc.wait(10)


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def test_clean_strips_boilerplate():
    assert synth.clean("Sure! Here is a chapter about fractions:\n\nFractions are parts.") == "Fractions are parts."
    assert synth.clean("Certainly.\nOf course, here it is:\nText.\n\nI hope this helps!") == "Text."
    assert synth.clean("Surely a fraction is a part.") == "Surely a fraction is a part."


def test_prompts_are_a_stable_product():
    a = synth.build_prompts(["fractions", "tides"], ["kids", "adults"], ["textbook", "code"])
    assert len(a) == 8 and len({p["prompt_id"] for p in a}) == 8
    assert a == synth.build_prompts(["fractions", "tides"], ["kids", "adults"], ["textbook", "code"])
    b = synth.build_prompts(["fractions"], ["kids"], ["story"], seed_texts=["one two three four five six"] * 2,
                            extract_words=3)
    assert "For inspiration" in b[0]["prompt"] and len(b[0]["extract"].split()) == 3
    with pytest.raises(ValueError, match="unknown style"):
        synth.build_prompts(["x"], ["y"], ["poem"])


def test_synth_survives_faults_and_a_kill(tmp_path, teacher_url):
    topics = tmp_path / "topics.txt"
    topics.write_text("\n".join(f"topic number {i}" for i in range(6)) + "\n")
    out = tmp_path / "synth.jsonl"
    cmd = [sys.executable, "-m", "phikit", "data", "synth", "--base-url", teacher_url + "/v1", "--model", "tiny",
           "--max-tokens", "12", "--temperature", "0",
           "--topics", str(topics), "--audiences", "children,adults", "--styles", "textbook,qa",
           "--concurrency", "6", "--timeout", "1", "--max-retries", "30", "--retry-backoff", "0.05",
           "--min-words", "4",
           "--output", str(out)]
    env = {**os.environ, "OPENAI_API_KEY": "test-key"}
    expected = {p["prompt_id"] for p in synth.build_prompts(
        [f"topic number {i}" for i in range(6)], ["children", "adults"], ["textbook", "qa"])}
    assert len(expected) == 24

    # The answers go to the task's log in the work folder; the output appears when every prompt is answered.
    log = tmp_path / "synth.jsonl.partial" / "answers-00000.jsonl"
    first = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while len(_lines(log)) < 6 and time.time() < deadline and first.poll() is None:
        time.sleep(0.1)
    assert first.poll() is None, "the first run ended before it could be killed"
    first.send_signal(signal.SIGKILL)
    first.wait()
    partial = len(_lines(log)) + len(_lines(synth.rejected_path(log)))
    assert 6 <= partial < 24 and not out.exists()
    with open(log, "a") as f:  # a crash in the middle of a write leaves a torn line
        f.write('{"text": "half a rec')

    second = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert second.returncode == 0, second.stderr[-2000:]

    kept, rejected = _lines(out), _lines(synth.rejected_path(out))
    ids = [r["prompt_id"] for r in kept + rejected]
    assert len(ids) == len(set(ids)) == 24 and set(ids) == expected  # every prompt exactly once
    assert kept, "no answer was long enough to keep"
    for r in kept:
        assert len(r["text"].split()) >= 4
        assert r["teacher"] == "tiny" and r["usage"]["completion_tokens"] > 0
        assert {"topic", "audience", "style"} <= set(r)
    for r in rejected:
        assert "shorter than 4 words" in r["reason"]
    report = json.loads(out.with_name(out.name + ".report.json").read_text())
    assert report["already_done"] == partial and report["written"] + report["rejected"] == 24 - partial


def test_teacher_annotations_parse(teacher_url):
    from phikit.data import quality

    teacher = synth.Teacher(teacher_url + "/annotator/v1", "grader", timeout=1, max_retries=30, backoff=0.05)
    docs = ['"""Doc."""\n# a\n# b\n# c\nx = 1', "x = 1"]
    assert quality.annotate_with_teacher(docs, teacher, concurrency=2) == [2, 0]


def _mock_teacher(handler, **kw) -> synth.Teacher:
    """A Teacher whose HTTP client answers with `handler` (an httpx.MockTransport), for fast fault tests."""
    return synth.Teacher("http://teacher.test/v1", "m", backoff=0.001, transport=httpx.MockTransport(handler), **kw)


def _complete(teacher: synth.Teacher) -> dict:
    import asyncio
    import random

    async def go():
        async with teacher.client(1) as client:
            return await teacher.complete(client, [{"role": "user", "content": "x"}], random.Random(0))
    return asyncio.run(go())


def test_duplicate_topics_are_asked_once():
    prompts = synth.build_prompts(["tides", "fractions", "tides"], ["kids", "kids"], ["textbook"])
    assert [p["topic"] for p in prompts] == ["tides", "fractions"]


def test_a_refusal_stops_at_once_and_garbage_is_retried():
    calls = []

    def refuse(request):
        calls.append(request.headers.get("authorization"))
        return httpx.Response(401, json={"error": "invalid api key"})
    with pytest.raises(synth.TeacherRefused, match="HTTP 401.*invalid api key"):
        _complete(_mock_teacher(refuse, api_key="wrong", max_retries=5))
    assert calls == ["Bearer wrong"]  # not retried: a wrong key stays wrong

    replies = iter([httpx.Response(200, json=[]), httpx.Response(200, text="<html>busy</html>"),
                    httpx.Response(200, json={"choices": [{"message": {"content": [{"type": "text"}]}}]}),
                    httpx.Response(200, json={"choices": [{"message": {"content": "Tides rise."}}], "usage": "?"})])
    assert _complete(_mock_teacher(lambda r: next(replies), max_retries=5)) == \
        {"text": "Tides rise.", "usage": {}, "finish_reason": None}
    with pytest.raises(synth.TeacherError, match="gave up after 3 attempts: malformed response"):
        _complete(_mock_teacher(lambda r: httpx.Response(200, json=[]), max_retries=2))


def test_retry_after_is_never_cut_short(monkeypatch):
    import asyncio
    slept = []

    async def sleep(seconds):
        slept.append(seconds)
    monkeypatch.setattr(synth.asyncio, "sleep", sleep)
    replies = iter([httpx.Response(429, headers={"Retry-After": "2"})] * 6 + [httpx.Response(
        200, json={"choices": [{"message": {"content": "ok"}}]})])
    assert _complete(_mock_teacher(lambda r: next(replies), max_retries=8))["text"] == "ok"
    assert len(slept) == 6 and min(slept) >= 2.0
    assert asyncio  # the real module, restored by monkeypatch


def test_unreachable_teacher_is_one_line_error(tmp_path, capsys):
    from phikit.cli import main
    out = tmp_path / "synth.jsonl"
    start = time.time()
    rc = main(["data", "synth", "--base-url", f"http://127.0.0.1:{_free_port()}/v1", "--model", "m",
               "--limit", "40", "--output", str(out)])
    err = capsys.readouterr().err
    assert rc == 2 and time.time() - start < 10
    assert "phikit: error: cannot reach the teacher at http://127.0.0.1" in err and "check --base-url" in err
    assert "warning: prompt" not in err  # not one warning per prompt after minutes of backoff


def test_refusal_stops_a_run_and_other_outputs_are_refused(tmp_path):
    import asyncio
    prompts = synth.build_prompts(["tides", "fractions"], ["kids", "adults"], ["textbook"])
    teacher = _mock_teacher(lambda r: httpx.Response(404, json={"error": "no model m"}), max_retries=5)
    with pytest.raises(synth.TeacherRefused, match="no model m"):
        asyncio.run(synth.synthesize(prompts, tmp_path / "s.jsonl", teacher, concurrency=3, progress=False))
    assert _lines(tmp_path / "s.jsonl") == []
    with pytest.raises(ValueError, match="synth writes JSONL"):  # lines appended to a .parquet name are no parquet
        asyncio.run(synth.synthesize(prompts, tmp_path / "s.parquet", teacher, progress=False))


def test_overwrite_starts_over(tmp_path, teacher_url):
    """A rerun resumes (answered prompts are kept); --overwrite asks every prompt again."""
    from phikit.cli import main
    topics = tmp_path / "topics.txt"
    topics.write_text("fractions\n")
    out = tmp_path / "synth.jsonl"
    prompt = synth.build_prompts(["fractions"], ["children"], ["textbook"])[0]
    out.write_text(json.dumps({"prompt_id": prompt["prompt_id"], "text": "a stale answer"}) + "\n")
    synth.rejected_path(out).write_text(json.dumps({"prompt_id": "gone", "reason": "old"}) + "\n")
    args = ["data", "synth", "--base-url", teacher_url + "/v1", "--model", "tiny", "--max-tokens", "12",
            "--temperature", "0", "--topics", str(topics), "--audiences", "children", "--styles", "textbook",
            "--timeout", "1", "--max-retries", "30", "--retry-backoff", "0.05", "--min-words", "1",
            "--output", str(out)]
    assert main(args) == 0
    assert [r["text"] for r in _lines(out)] == ["a stale answer"]  # resumed: nothing left to ask
    assert main(args + ["--overwrite"]) == 0
    answers = _lines(out) + _lines(synth.rejected_path(out))
    assert [r["prompt_id"] for r in answers] == [prompt["prompt_id"]]
    assert answers[0].get("text") != "a stale answer"


def test_garbage_usage_and_lone_surrogates_do_not_crash_the_run(tmp_path):
    import asyncio
    long = " ".join(["tides"] * 60)
    replies = {"usage": json.dumps({"choices": [{"message": {"content": long}, "finish_reason": ["?"]}],
                                    "usage": {"prompt_tokens": "n/a", "completion_tokens": [3], "total_tokens": 7}}),
               "surrogate": json.dumps({"choices": [{"message": {"content": long + " \ud800"}}]})}
    for kind, body in replies.items():
        prompts = synth.build_prompts(["tides", "fractions"], ["kids", "adults"], ["textbook"])
        teacher = _mock_teacher(lambda r: httpx.Response(200, content=body.encode(),
                                                         headers={"content-type": "application/json"}),
                                max_retries=1)
        out = tmp_path / f"{kind}.jsonl"
        stats = asyncio.run(synth.synthesize(prompts, out, teacher, concurrency=2, progress=False))
        if kind == "usage":  # the answer is good: kept, with only the usable counts
            assert stats.written == 4 and stats.completion_tokens == 0
            assert [r["usage"] for r in _lines(out)] == [{"total_tokens": 7}] * 4
            assert {r["finish_reason"] for r in _lines(out)} == {None}
        else:  # not text: retried like any malformed reply, left for a rerun, and the log stays readable
            assert stats.failed == 4 and _lines(out) == []
