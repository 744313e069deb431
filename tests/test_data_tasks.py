"""The corpus steps as datatrove tasks: the same output for any number of tasks and workers (checked against
brute force and against the one-process path), resumable after `kill -9`, bad lines handled in every task, wrong
executor options refused before any work, Slurm jobs submitted with the options given, Ray on a local instance."""
from __future__ import annotations

import gzip
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from phikit.cli import main
from phikit.data.decontaminate import build_index, decontaminate
from phikit.data.shards import ShardSet

def _humaneval_prompts(n: int) -> list[str]:
    from phikit.data.decontaminate import humaneval_path
    with gzip.open(humaneval_path(), "rt") as f:
        return [json.loads(line)["prompt"] for line in f][:n]


def _corpus(seed: int, n: int = 400) -> list[dict]:
    """Random-word documents, near copies (a few words replaced), exact copies (case and spacing changed) and
    documents holding a HumanEval prompt; ids say what each is."""
    rng = random.Random(seed)
    vocab = [f"w{i}" for i in range(3000)]
    docs = []
    for i in range(n):
        kind = rng.random()
        if kind < 0.15 and docs:
            src = rng.choice(docs)["text"].split()
            for _ in range(rng.randrange(1, 4)):
                src[rng.randrange(len(src))] = rng.choice(vocab)
            docs.append({"id": f"near-{i}", "text": " ".join(src)})
        elif kind < 0.25 and docs:
            docs.append({"id": f"exact-{i}", "text": "  " + rng.choice(docs)["text"].upper() + " !"})
        else:
            docs.append({"id": f"doc-{i}", "text": " ".join(rng.choice(vocab) for _ in range(rng.randrange(20, 80)))})
    for i, prompt in enumerate(_humaneval_prompts(5)):
        docs.insert(rng.randrange(len(docs)), {"id": f"bench-{i}", "text": "Some code.\n" + prompt})
    return docs


def _write_inputs(folder: Path, rows: list[dict]) -> list[Path]:
    """The corpus cut into three files of two kinds: plain JSONL, gzipped JSONL, plain JSONL again."""
    folder.mkdir(parents=True, exist_ok=True)
    cut = [0, len(rows) // 3, 2 * len(rows) // 3, len(rows)]
    paths = [folder / "a.jsonl", folder / "b.jsonl.gz", folder / "c.jsonl"]
    for path, lo, hi in zip(paths, cut, cut[1:]):
        text = "".join(json.dumps(r) + "\n" for r in rows[lo:hi])
        if path.name.endswith(".gz"):
            path.write_bytes(gzip.compress(text.encode()))
        else:
            path.write_text(text)
    return paths


STEPS = {
    "dedup": ["dedup", "--threshold", "0.7"],
    "exact": ["dedup", "--exact-only"],
    "decontaminate": ["decontaminate", "--benchmarks", "humaneval", "--action", "flag"],
    "filter": ["filter", "--threshold", "3"],
}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    docs = [{**d, "edu_score": (i * 7) % 6} for i, d in enumerate(_corpus(seed=5))]
    return docs, _write_inputs(root / "in", docs)


@pytest.mark.parametrize("step", list(STEPS))
def test_every_step_gives_the_same_bytes_for_any_tasks_and_workers(step, corpus, tmp_path, capsys):
    docs, inputs = corpus
    outputs = {}
    for tasks, workers in ((1, 1), (4, 2), (16, 2)):
        out = tmp_path / f"{step}-{tasks}-{workers}.jsonl"
        argv = ["data", STEPS[step][0], *map(str, inputs), *STEPS[step][1:], "--output", str(out),
                "--tasks", str(tasks), "--workers", str(workers)]
        assert main(argv) == 0, capsys.readouterr().err
        assert not Path(str(out) + ".partial").exists()  # the work folder is gone once the output is complete
        outputs[tasks, workers] = out.read_bytes(), Path(str(out) + ".report.json").read_bytes()
    assert len(set(outputs.values())) == 1
    kept = [json.loads(x) for x in outputs[1, 1][0].decode().splitlines()]
    report = json.loads(outputs[1, 1][1])
    assert report["input"] == len(docs)
    if step == "filter":
        assert [d["id"] for d in kept] == [d["id"] for i, d in enumerate(docs) if (i * 7) % 6 >= 3]
    if step == "exact":  # every planted exact copy and nothing else (the reference: the normalized texts)
        assert {d["id"] for d in docs} - {d["id"] for d in kept} == {d["id"] for d in docs if d["id"][:5] == "exact"}
    if step == "decontaminate":  # the same records as the one-process path, with the planted ones flagged
        index = build_index(["humaneval"])
        assert kept == list(decontaminate(docs, index, action="flag"))
        assert {d["id"] for d in kept if "contamination" in d} == {d["id"] for d in docs if d["id"][:5] == "bench"}


def _brute_force(docs: list[str], threshold: float) -> dict[int, int]:
    """Each document against every earlier kept one by exact Jaccard similarity of the shingle sets (Python
    sets, float division); removed when the best reaches the threshold (copies with the same normalized text
    first), pointing at the earliest of the most similar."""
    from phikit.data.dedup import normalize, shingles
    sets = [shingles(d) for d in docs]
    kept, expected, first = [], {}, {}
    for i, s in enumerate(sets):
        key = normalize(docs[i])
        if key in first and first[key] in kept:
            expected[i] = first[key]
            continue
        best = max(((len(s & sets[j]) / len(s | sets[j]), -j) for j in kept), default=(0.0, 0))
        if best[0] >= threshold:
            expected[i] = -best[1]
        else:
            kept.append(i)
            first.setdefault(key, i)
    return expected


@pytest.mark.parametrize("threshold,num_perm,tasks", [(0.8, 128, 5), (0.6, 64, 3), (0.5, 32, 8)])
def test_sharded_near_dedup_equals_brute_force_over_all_pairs(threshold, num_perm, tasks, tmp_path, capsys):
    from test_data_dedup import _edited_corpus

    docs = _edited_corpus(seed=int(threshold * 10) + num_perm)
    rng = random.Random(num_perm)
    for _ in range(30):  # copies (case and spacing changed) of documents that may themselves be removed
        docs.insert(rng.randrange(len(docs) + 1), "  " + rng.choice(docs).upper())
    inputs = _write_inputs(tmp_path / "in", [{"text": d} for d in docs])
    out = tmp_path / "out.jsonl"
    assert main(["data", "dedup", *map(str, inputs), "--threshold", str(threshold), "--num-perm", str(num_perm),
                 "--tasks", str(tasks), "--output", str(out)]) == 0
    report = json.loads(Path(str(out) + ".report.json").read_text())
    assert {r["index"]: r["duplicate_of"] for r in report["removed"]} == _brute_force(docs, threshold)
    assert report["exact_duplicates"] >= 1 and report["near_duplicates"] >= 1


def test_kill_minus_nine_then_rerun_gives_the_same_output(tmp_path):
    docs = _corpus(seed=9, n=3000)
    inputs = _write_inputs(tmp_path / "in", docs)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1] / "src")}

    def cmd(out: Path) -> list[str]:
        return [sys.executable, "-m", "phikit", "data", "dedup", *map(str, inputs), "--output", str(out),
                "--tasks", "12", "--workers", "2"]

    reference = tmp_path / "ref.jsonl"
    subprocess.run(cmd(reference), env=env, check=True, capture_output=True, timeout=300)
    out = tmp_path / "out.jsonl"
    first = subprocess.Popen(cmd(out), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                             start_new_session=True)
    done = tmp_path / "out.jsonl.partial" / "logs" / "0-signatures" / "completions"
    deadline = time.time() + 120
    while not (done.is_dir() and any(done.iterdir())) and time.time() < deadline and first.poll() is None:
        time.sleep(0.02)
    assert first.poll() is None, "the first run ended before it could be killed"
    os.killpg(first.pid, signal.SIGKILL)  # the command and its workers, mid-task
    first.wait()
    finished = len(list(done.iterdir()))
    assert 1 <= finished < 12 and not out.exists()
    second = subprocess.run(cmd(out), env=env, capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stderr[-2000:]
    assert out.read_bytes() == reference.read_bytes()
    assert Path(str(out) + ".report.json").read_bytes() == Path(str(reference) + ".report.json").read_bytes()


def _processes() -> dict[int, tuple[int, str, str]]:
    """Every process this machine shows: pid -> (parent pid, start time, state), from /proc."""
    out = {}
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:  # it just ended
            continue
        fields = stat[stat.rindex(")") + 2:].split()  # after "pid (name) "
        out[int(entry)] = (int(fields[1]), fields[19], fields[0])
    return out


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the kernel's parent-death signal is Linux's")
def test_kill_minus_nine_of_the_command_alone_leaves_no_worker_behind(tmp_path):
    """Only the command is killed (not its process group): its local workers and datatrove's manager process
    must die with it, not wait for work forever."""
    inputs = _write_inputs(tmp_path / "in", _corpus(seed=4, n=2000))
    out = tmp_path / "out.jsonl"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1] / "src")}
    cmd = [sys.executable, "-m", "phikit", "data", "dedup", "--threshold", "0.7", *map(str, inputs),
           "--output", str(out), "--tasks", "8", "--workers", "2"]
    first = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    seen: dict[int, str] = {}  # every descendant of the command: pid -> start time
    try:
        deadline = time.time() + 120
        while len(seen) < 3 and time.time() < deadline and first.poll() is None:  # a manager and 2 workers
            procs, tree = _processes(), {first.pid}
            for _ in range(4):  # the command's children, their children, ...
                tree |= {pid for pid, (ppid, _, _) in procs.items() if ppid in tree}
            seen = {pid: procs[pid][1] for pid in tree - {first.pid}}
            time.sleep(0.01)
        assert first.poll() is None and len(seen) >= 3, "the command ended before its workers could be seen"
        first.kill()
        first.wait()

        def left() -> list[int]:
            """Descendants seen before the kill still running, and any process forked from the command (they
            carry its command line, which names this test's output) since."""
            procs = _processes()
            return [pid for pid, (_, start, state) in procs.items() if state not in "ZX" and (
                seen.get(pid) == start or (pid != first.pid and str(out) in _cmdline(pid)))]

        deadline = time.time() + 10
        while left() and time.time() < deadline:
            time.sleep(0.05)
        assert not left(), f"processes of the killed command still run: {[_cmdline(p) for p in left()]}"
    finally:
        if first.poll() is None:
            first.kill()
        for pid in seen:  # leave nothing behind when the assertion fails
            try:
                if _processes().get(pid, (0, None))[1] == seen[pid]:
                    os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def test_bad_lines_in_every_task_are_skipped_or_fatal(tmp_path, capsys):
    lines = [json.dumps({"text": f"document {i} " + " ".join(f"w{(i * j) % 97}" for j in range(30)),
                         "edu_score": 4}) for i in range(200)]
    bad_at = [10, 75, 140, 190]  # 1-based line numbers, in different tasks
    for n in bad_at:
        lines[n - 1] = '{"text": "broken'
    src = tmp_path / "in.jsonl"
    src.write_text("\n".join(lines) + "\n")
    expected = [f"{src}:{n}" for n in bad_at]
    for step in ("dedup", "decontaminate", "filter", "pack"):
        extra = {"decontaminate": ["--benchmarks", "humaneval"]}.get(step, [])
        out = tmp_path / (f"{step}.jsonl" if step != "pack" else "shards")
        argv = ["data", step, str(src), *extra, "--output", str(out), "--tasks", "4"]
        assert main(argv) == 2
        err = capsys.readouterr().err
        # one line naming a bad line (tasks run side by side: whichever reached its bad line first)
        assert any(f"{where}: malformed JSON" in err for where in expected), err
        assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
        assert not out.exists() and not Path(str(out) + ".partial").exists()  # nothing half-written
        assert main(argv + ["--on-error", "skip"]) == 0
        warned = [ln.split("warning: skipped ")[1].split(": malformed")[0]
                  for ln in capsys.readouterr().err.splitlines() if ln.startswith("warning: skipped")]
        assert warned == expected  # every bad line, once, in input order
        if step == "pack":
            assert [m.split(": malformed")[0] for m in ShardSet(out).index["skipped_records"]] == expected
        else:
            report = json.loads(Path(str(out) + ".report.json").read_text())
            assert report["skipped_lines"] == 4 and report["input"] == 196


def test_empty_inputs_and_foreign_outputs_are_refused(tmp_path, capsys):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    blank = tmp_path / "blank.jsonl"
    blank.write_text("\n\n")
    for step, extra in (("dedup", []), ("decontaminate", ["--benchmarks", "humaneval"])):
        for src in (empty, blank):
            out = tmp_path / f"{step}.jsonl"
            assert main(["data", step, str(src), *extra, "--output", str(out)]) == 2
            assert "nothing to" in capsys.readouterr().err and not out.exists()
    src = tmp_path / "in.jsonl"
    src.write_text('{"text": "one two three"}\n')
    notes = tmp_path / "notes.jsonl"
    notes.write_text("my own notes\n")
    for flags in ([], ["--overwrite"]):  # a file this step did not write is never replaced
        assert main(["data", "dedup", str(src), "--output", str(notes), *flags]) == 2
        assert "was not written by `phikit data dedup`" in capsys.readouterr().err
        assert notes.read_text() == "my own notes\n"
    assert main(["data", "dedup", str(src), "--output", str(src), "--overwrite"]) == 2
    assert "is one of the inputs" in capsys.readouterr().err
    out = tmp_path / "d.jsonl"
    assert main(["data", "dedup", str(src), "--output", str(out)]) == 0
    assert main(["data", "decontaminate", str(src), "--benchmarks", "humaneval", "--output", str(out),
                 "--overwrite"]) == 2  # another step's output
    capsys.readouterr()
    assert main(["data", "dedup", str(src), "--output", str(out), "--overwrite"]) == 0  # its own: replaced


def test_a_folder_input_skips_what_steps_wrote_there(tmp_path, capsys):
    folder = tmp_path / "data"
    folder.mkdir()
    (folder / "a.jsonl").write_text('{"text": "alpha beta gamma"}\n{"text": "alpha beta gamma"}\n')
    assert main(["data", "dedup", str(folder / "a.jsonl"), "--output", str(folder / "a.dedup.jsonl")]) == 0
    assert (folder / "a.dedup.jsonl.report.json").exists()
    capsys.readouterr()
    assert main(["data", "pack", str(folder), "--output", str(tmp_path / "shards")]) == 0
    # a.jsonl (2) + a.dedup.jsonl (1); the report beside it is not read as records
    assert json.loads(capsys.readouterr().out)["documents"] == 3


def test_pack_token_stream_is_the_same_for_any_tasks_and_logs_are_quiet(corpus, tmp_path):
    _, inputs = corpus
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1] / "src")}
    streams = []
    for tasks, workers in ((1, 1), (4, 2), (16, 2)):
        out = tmp_path / f"shards-{tasks}"
        run = subprocess.run([sys.executable, "-m", "phikit", "data", "pack", *map(str, inputs), "--output",
                              str(out), "--tasks", str(tasks), "--workers", str(workers), "--val-fraction", "0.1"],
                             env=env, capture_output=True, text=True, timeout=300)
        assert run.returncode == 0 and run.stderr == "", run.stderr[-2000:]  # no datatrove INFO lines
        shards = ShardSet(out)
        streams.append([np.concatenate(shards.arrays(s)).tobytes() for s in ("train", "val")])
        assert sorted(p.name for p in out.iterdir() if not p.name.endswith(".bin")) == \
            [".pack-args.json", "index.json", "tokenizer.json", "tokenizer_config.json"]
    assert streams[0] == streams[1] == streams[2]
    run = subprocess.run([sys.executable, "-m", "phikit", "data", "pack", str(inputs[0]), "--output",
                          str(tmp_path / "v"), "--verbose", "--workers", "1"], env=env, capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0 and "datatrove" in run.stderr  # --verbose shows them


def test_wrong_executor_options_are_one_line_errors_before_any_work(tmp_path, capsys, monkeypatch):
    src = tmp_path / "in.jsonl"
    src.write_text('{"text": "one two three"}\n')
    out = tmp_path / "o.jsonl"
    monkeypatch.setenv("PATH", str(tmp_path))  # no sbatch here
    cases = [
        (["--slurm-partition", "cpu"], "--slurm-partition only apply to --executor slurm"),
        (["--executor", "slurm"], "needs a partition and a time limit"),
        (["--executor", "slurm", "--slurm-partition", "cpu"], "needs Slurm's sbatch on PATH"),
        (["--executor", "ray", "--slurm-time", "1:00:00"], "--slurm-time only apply to --executor slurm"),
        (["--tasks", "0"], "--tasks must be at least 1"),
        (["--workers", "0"], "--workers must be at least 1"),
    ]
    for flags, message in cases:
        for step in (["dedup"], ["decontaminate", "--benchmarks", "humaneval"], ["pack"]):
            target = out if step[0] != "pack" else tmp_path / "shards"
            assert main(["data", step[0], str(src), *step[1:], "--output", str(target), *flags]) == 2
            err = capsys.readouterr().err
            assert message in err and len(err.strip().splitlines()) == 1, (flags, err)
            assert list(tmp_path.iterdir()) == [src]  # nothing started


def test_slurm_jobs_are_submitted_with_the_options_given(tmp_path, monkeypatch, capsys):
    """Slurm cannot run here: a stand-in sbatch records each submitted script; the stages are job arrays of the
    right size, chained by dependencies, with the partition, time, qos, cpus and memory asked for."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    sbatch = bin_dir / "sbatch"
    sbatch.write_text("#!/bin/sh\nn=$(ls %s | wc -l)\necho \"sbatch $*\" > %s/job-$((n+1000)).sh\n"
                      "cat \"$(eval echo \\${$#})\" >> %s/job-$((n+1000)).sh\necho Submitted batch job $((n+1000))\n"
                      % ((tmp_path / "jobs",) * 3))
    sbatch.chmod(0o755)
    (tmp_path / "jobs").mkdir()
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps({"text": f"doc {i}"}) + "\n" for i in range(10)))
    assert main(["data", "dedup", str(src), "--output", str(tmp_path / "o.jsonl"), "--executor", "slurm",
                 "--slurm-partition", "cpu-long", "--slurm-time", "02:30:00", "--slurm-qos", "high",
                 "--slurm-cpus-per-task", "3", "--slurm-mem-per-cpu-gb", "4", "--tasks", "6", "--workers",
                 "5"]) == 0
    assert "submitted dedup as 6 Slurm tasks" in capsys.readouterr().err
    scripts = [p.read_text() for p in sorted((tmp_path / "jobs").iterdir())]
    stages = [s for s in scripts if "merge_stats" not in s]  # (datatrove also submits a statistics job each)
    assert len(stages) == 5  # signatures, exact, buckets, verify, resolve
    for script in stages:
        assert "--partition=cpu-long" in script and "--time=02:30:00" in script and "--qos=high" in script
        assert "--cpus-per-task=3" in script and "--mem-per-cpu=4G" in script
    assert [s.split("--array=")[1].split("\n")[0] for s in stages] == ["0-5%5"] * 4 + ["0-0%1"]
    ids = [int(p.stem.split("-")[1]) for p in sorted((tmp_path / "jobs").iterdir())]
    jobs = dict(zip(ids, scripts))
    for before, after in zip(stages, stages[1:]):  # each stage waits for the one before
        job = next(i for i, s in jobs.items() if s is before)
        assert f"--dependency=afterok:{job}" in after.splitlines()[0]
    assert not (tmp_path / "o.jsonl").exists()


@pytest.mark.slow
def test_ray_runs_a_job_on_a_local_instance(corpus, tmp_path, capsys):
    ray = pytest.importorskip("ray")
    _, inputs = corpus
    local, remote = tmp_path / "local.jsonl", tmp_path / "ray.jsonl"
    argv = ["data", "dedup", *map(str, inputs), "--threshold", "0.7", "--tasks", "4"]
    assert main(argv + ["--output", str(local)]) == 0
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        assert main(argv + ["--output", str(remote), "--executor", "ray", "--workers", "2"]) == 0
    finally:
        ray.shutdown()
    assert remote.read_bytes() == local.read_bytes()


@pytest.mark.slow
def test_scores_do_not_change_with_tasks_or_workers(corpus, tiny_phi_checkpoint, tmp_path, capsys):
    docs, inputs = corpus
    annotations = tmp_path / "annotations.jsonl"
    annotations.write_text("".join(json.dumps({"id": d["id"], "score": i % 6}) + "\n"
                                   for i, d in enumerate(docs[:120:2])))
    outputs = []
    for tasks, workers in ((1, 1), (3, 2)):
        out = tmp_path / f"s{tasks}.jsonl"
        assert main(["data", "score", str(inputs[0]), "--model", str(tiny_phi_checkpoint), "--annotations",
                     str(annotations), "--max-tokens", "16", "--output", str(out), "--report-dir",
                     str(tmp_path / f"r{tasks}"), "--tasks", str(tasks), "--workers", str(workers)]) == 0
        outputs.append(out.read_bytes())
        report = json.loads((tmp_path / f"r{tasks}" / "report.json").read_text())
        assert report["documents"] == len(out.read_text().splitlines()) > 100
    scores = [json.loads(x)["edu_score"] for x in outputs[0].decode().splitlines()]
    assert len(set(scores)) > 10  # the scores differ from document to document
    assert outputs[0] == outputs[1]
