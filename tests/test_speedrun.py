"""The speedrun end to end at its smallest preset: killed mid-run, rerun, it finishes without redoing stages."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import phikit
from phikit.inference.decoding import chat
from phikit.speedrun import TALK_SCRIPT


def _start(out: Path, *extra: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "phikit", "speedrun", "--preset", "micro", "--minutes", "0.4", "--out", str(out),
           *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)


@pytest.mark.slow
def test_speedrun_survives_sigkill_and_resumes(tmp_path):
    out = tmp_path / "run"
    proc = _start(out)
    deadline = time.time() + 300
    # Kill it hard in the middle of pretraining, once a checkpoint exists.
    while time.time() < deadline and not list((out / "pretrain" / "checkpoints").glob("step-*")):
        assert proc.poll() is None, proc.stdout.read()
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    finished = {p.stem: p.stat().st_mtime_ns for p in (out / "stages").glob("*.json")}
    assert {"data", "tokenizer", "pack"} <= finished.keys() and "report" not in finished

    proc = _start(out)
    log, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, log
    for stage in ("data", "tokenizer", "pack"):
        assert f"{stage}: done already" in log
        assert (out / "stages" / f"{stage}.json").stat().st_mtime_ns == finished[stage]
    assert "talk to it:   phikit chat --model" in log

    report = (out / "report.md").read_text()
    assert "## Results" in report and "![loss curves](loss.png)" in report and (out / "loss.png").stat().st_size > 0
    chats = json.loads((out / "stages" / "eval.json").read_text())["transcript"]
    assert [m["content"] for c in chats for m in c if m["role"] == "user"] == [t for c in TALK_SCRIPT for t in c]
    assert "## Talk to it" in report
    assert all(line in report for c in chats for m in c for line in m["content"].splitlines())
    for fmt in ("code", "qa", "instruct", "chat", "chatml"):
        assert f"**{fmt}**" in report
    scores = json.loads((out / "stages" / "eval.json").read_text())["scores"]
    assert set(scores) == {"untrained", "pretrained", "sft"}
    # Training helps even at this size: held-out perplexity falls far below the untrained model's.
    assert scores["pretrained"]["heldout_perplexity"] < scores["untrained"]["heldout_perplexity"] / 3

    # The chat model speaks ChatML and stops at <|im_end|>.
    model, tok = phikit.load(out / "model-chat")
    assert tok.has_chatml
    answer = chat(model, tok, [{"role": "user", "content": "What is 2 + 3?"}], max_new_tokens=40)
    assert "<|im_end|>" not in answer and "<|im_start|>" not in answer

    # A third run has nothing left to do.
    proc = _start(out)
    log, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0 and log.count("done already") == 7, log

    # Asking for the ablation later runs only it (same steps for both arms) and writes the report again with it.
    proc = _start(out, "--ablation")
    log, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0 and log.count("done already") == 6 and "report: finished" in log, log
    arms = json.loads((out / "stages" / "ablation.json").read_text())["arms"]
    assert arms["textbook"]["steps"] == arms["web-like"]["steps"] > 0
    # Same compute; the textbook-trained model predicts the held-out worked solutions better.
    assert arms["textbook"]["heldout_perplexity"] < arms["web-like"]["heldout_perplexity"]
    assert "## Ablation: textbook data vs an unfiltered web-like mix" in (out / "report.md").read_text()


def test_answers_are_read_from_the_answer_line_only():
    from phikit.eval.exercises import final_answer
    assert final_answer("Step 1: 4 + 9 = 13.\nAnswer: 13") == 13
    assert final_answer("Step 1: 5 - 7 = -2.\nAnswer: -2\n") == -2
    assert final_answer("Step 1: Alice originally had 5 apples.\nAnswer: Alice has 5 apples now.") == 5
    assert final_answer(" 12") == 12  # a bare number is an answer too
    # A solution cut off before its answer line has no answer: not the "1" of "Step 1".
    assert final_answer("Step 1: 3 - 2 = 1.\nStep 2: 1 + 4 =") is None
    assert final_answer("") is None


def test_generation_budget_fits_the_longest_reference_solution():
    from phikit.data import procedural
    from phikit.eval.exercises import solution_tokens
    from phikit.tokenizer import train_bpe
    problems = procedural.generate(40, "heldout", seed=0, kinds=("word_problem",))
    tok = train_bpe((r["text"] for r in problems), 400, split_digits=True)
    budget = solution_tokens(tok, [r["text"][len(r["prompt"]):] for r in problems])
    assert all(len(tok.encode(r["text"][len(r["prompt"]):])) < budget for r in problems)
    assert budget > 96  # the old fixed budget cut most word-problem solutions off before their answer


def test_baseline_test_is_the_exact_hypergeometric_tail():
    """The report's 'clearly above the baseline' verdict rests on a one-sided Fisher exact test; check it against
    the hypergeometric tail computed by hand: P(at least a of the a+b successes fall in the trained group)."""
    from math import comb

    from phikit.speedrun_report import above_baseline_p, baseline_lines

    def tail(a, n, b, m):
        k = a + b
        return sum(comb(n, i) * comb(m, k - i) for i in range(a, min(n, k) + 1)) / comb(n + m, k)

    for trained, base in (([7, 60], [0, 60]), ([3, 60], [1, 60]), ([20, 60], [6, 60]), ([0, 60], [0, 60])):
        assert abs(above_baseline_p(trained, base) - tail(*trained, *base)) < 1e-12
    ev = {"untrained": {"arithmetic_easy_counts": [0, 60]},
          "pretrained": {"arithmetic_easy_counts": [4, 60]}, "sft": {"arithmetic_easy_counts": [7, 60]}}
    (line,) = baseline_lines(ev)
    assert "sft 7/60 against untrained 0/60" in line and "clearly above" in line


def test_sft_data_keeps_one_step_solutions_a_third_of_the_arithmetic():
    """Dedup leaves each one-step exercise once; the SFT conversations repeat them back to a third of the
    arithmetic, so the assistant does not add a second step to a one-step question."""
    from phikit.data import procedural
    from phikit.data.conversations import sft_mix
    from phikit.data.dedup import dedup
    records = list(dedup(procedural.generate(3000, "train", seed=0, kinds=("arithmetic_easy",)), threshold=0.95))
    convs = [c for c in sft_mix(records, seed=0) if c["kind"] == "arithmetic_easy"]
    one_step = [r for r in records if r["text"].count("Step ") == 1]
    assert len(one_step) < len(records) / 5  # few distinct one-step exercises: the space is small
    steps = [c["messages"][1]["content"].count("Step ") for c in convs]
    assert 0.25 < steps.count(1) / len(steps) < 0.42
    assert {c["messages"][0]["content"] for c in convs} == {r["question"] for r in records}


def _finished_run(out: Path, **plan) -> None:
    """A run directory whose stages are all marked finished, made with `plan`'s settings."""
    (out / "stages").mkdir(parents=True)
    for stage in ("data", "tokenizer", "pack", "pretrain", "sft", "eval", "report"):
        (out / "stages" / f"{stage}.json").write_text(json.dumps({"stage": stage, "seconds": 1.0,
                                                                   "report": str(out / "report.md")}))
    (out / "speedrun.json").write_text(json.dumps({"preset": "micro", "minutes": 0.4, "seed": 0, "ablation": False,
                                                   "teacher_url": None, "teacher_model": "teacher", **plan}))


def test_other_settings_do_not_reuse_a_finished_run(tmp_path):
    from phikit.speedrun import Speedrun
    out = tmp_path / "run"
    _finished_run(out, preset="cpu-tiny", minutes=10.0)
    with pytest.raises(ValueError, match="made with --preset cpu-tiny, --minutes 10.0.*--fresh"):
        Speedrun(out=out, preset="micro", minutes=0.4, log=lambda s: None).run()
    assert json.loads((out / "speedrun.json").read_text())["preset"] == "cpu-tiny"  # left as it was
    results = Speedrun(out=out, preset="cpu-tiny", minutes=10.0, log=lambda s: None).run()  # same settings: resume
    assert set(results) == {"data", "tokenizer", "pack", "pretrain", "sft", "eval", "report"}


def test_fresh_deletes_only_a_speedrun_directory(tmp_path, monkeypatch, capsys):
    from phikit.cli import main
    from phikit.speedrun import Speedrun
    monkeypatch.setattr(Speedrun, "run", lambda self: {"report": {"report": "report.md"}})
    work = tmp_path / "project"
    work.mkdir()
    (work / "notes.txt").write_text("mine")
    assert main(["speedrun", "--fresh", "--out", str(work)]) == 2
    assert (work / "notes.txt").exists() and "not a speedrun directory" in capsys.readouterr().err
    run = tmp_path / "run"
    _finished_run(run)
    assert main(["speedrun", "--fresh", "--out", str(run)]) == 0 and not (run / "stages").exists()


def test_a_resumed_training_keeps_its_step_count(tmp_path):
    from phikit.train.budget import planned_steps
    assert planned_steps(tmp_path / "plans" / "pretrain.json", lambda: 345) == 345
    # The rerun after a kill must not probe again: another count would change the cosine schedule mid-run.
    assert planned_steps(tmp_path / "plans" / "pretrain.json", lambda: pytest.fail("probed twice")) == 345


def test_unanswered_teacher_prompts_keep_the_data_stage_open(tmp_path, monkeypatch):
    from phikit.data import synth
    from phikit.speedrun import Speedrun

    async def partly(prompts, out, teacher, **kw):
        Path(out).write_text(json.dumps({"text": "A passage.", "prompt_id": prompts[0]["prompt_id"]}) + "\n")
        return synth.SynthStats(prompts=len(prompts), written=1, failed=len(prompts) - 1)
    monkeypatch.setattr(synth, "synthesize", partly)
    run = Speedrun(out=tmp_path, preset="micro", teacher_url="http://teacher.test/v1", log=lambda s: None)
    with pytest.raises(synth.TeacherError, match="teacher prompts are unanswered: rerun"):
        run._teacher_docs()


def test_micro_data_has_every_conversation_kind_and_keeps_new_phrasings_out(tmp_path):
    """The data stage's files: the SFT set holds every kind of conversation, and no training text (pretraining
    corpus or SFT set) uses a held-out phrasing, which the held-out file does use."""
    from test_data_procedural import held_out_phrasing_patterns

    from phikit.data.conversations import CONVERSATION_KINDS
    from phikit.speedrun import Speedrun
    run = Speedrun(out=tmp_path, preset="micro", log=lambda s: None)
    run.stage_data({})
    read = lambda name: [json.loads(line) for line in (tmp_path / "data" / name).read_text().splitlines()]
    sft, train, heldout = read("sft.jsonl"), read("train.jsonl"), read("heldout.jsonl")
    assert set(CONVERSATION_KINDS) <= {c["kind"] for c in sft}
    assert any(len(c["messages"]) >= 4 for c in sft if c["kind"] == "follow_up")  # a turn that refers back
    patterns = held_out_phrasing_patterns()
    texts = [r["text"] for r in train] + [m["content"] for c in sft for m in c["messages"]]
    assert not [t for t in texts if any(p.search(t) for p in patterns)]
    new = [r for r in heldout if r["kind"] == "word_problem_new_phrasing"]
    assert new and all(any(p.search(r["text"]) for p in patterns) for r in new)


def test_report_shows_the_conversation(tmp_path):
    from phikit.speedrun_report import write_report
    chats = [[{"role": "user", "content": "Hello!"}, {"role": "assistant", "content": "Hi! I'm a small model."}],
             [{"role": "user", "content": "Write a function."},
              {"role": "assistant", "content": "def f(x):\n    return x * x\n"}]]
    report = write_report(tmp_path, {"eval": {"scores": {}, "transcript": chats}}, 10, 1.0).read_text()
    section = report[report.index("## Talk to it"):]
    assert "user:  Hello!\n\nmodel: Hi! I'm a small model." in section
    assert "model: def f(x):\n           return x * x" in section  # continuation lines stay under the answer
