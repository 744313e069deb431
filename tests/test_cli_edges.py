"""The edges of every verb: nothing a user made is deleted or overwritten, bad input is one line (exit 2, no
traceback, checked before the work), progress in a log is plain lines, library logs stay quiet, --help is quick."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from phikit.cli import main
from train_shards import motif_shards

ROOT = Path(__file__).resolve().parents[1]


def user_files(tmp_path: Path) -> Path:
    """A directory of someone's own work, as in `mkdir -p home2/projects/src; echo code > .../main.py`."""
    home = tmp_path / "home2"
    (home / "projects" / "src").mkdir(parents=True)
    (home / "projects" / "src" / "main.py").write_text("code\n")
    (home / "notes.txt").write_text("keep me\n")
    (home / "results.json").write_text('{"mine": true}\n')
    (home / "model.gguf").write_text("not a model\n")
    # Files whose names phikit's outputs also hold: they alone do not make the folder one of phikit's outputs.
    for name in ("config.json", "config.yaml", "tokenizer.json", "adapter_config.json"):
        (home / name).write_text("{}\n")
    return home


def snapshot(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def one_line_error(capsys, *words: str) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    for word in words:
        assert word in err, err
    return err


@pytest.fixture
def inputs(tmp_path, tiny_phi_checkpoint):
    """What the writing verbs read: a model, an adapter-shaped directory, chats, pairs, shards, a corpus."""
    chats = tmp_path / "chats.jsonl"
    chats.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"},
                                              {"role": "assistant", "content": "hello"}]}) + "\n")
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(json.dumps({"prompt": "hi", "chosen": "hello", "rejected": "go away"}) + "\n")
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("the cat sat on the mat\n" * 50)
    samples = tmp_path / "samples.jsonl"
    samples.write_text(json.dumps({"task_id": "HumanEval/0", "completion": "    return True\n"}) + "\n")
    return {"model": str(tiny_phi_checkpoint), "chats": str(chats), "pairs": str(pairs), "corpus": str(corpus),
            "shards": str(motif_shards(tmp_path / "shards", 50)), "samples": str(samples)}


def writing_verbs(home: Path, i: dict) -> list[tuple[list[str], list[str]]]:
    """(argv writing into `home`, its replace flags): every verb that writes a file or a directory."""
    return [
        (["convert", i["model"], str(home)], ["--force"]),
        (["convert", i["model"], str(home / "model.gguf")], ["--force"]),
        (["convert", i["model"], str(home / "notes.txt"), "--to", "hf"], ["--force"]),
        (["merge", "--model", i["model"], "--adapter", i["model"], "--out", str(home)], []),
        (["tokenizer", "build-phi", str(home)], []),
        (["tokenizer", "train", i["corpus"], "--vocab-size", "300", "--output", str(home)], []),
        (["train", "--config", str(ROOT / "configs" / "cpu-tiny.yaml"), f"data={i['shards']}", f"out_dir={home}",
          "model_config.vocab_size=128", "max_steps=1", "warmup_steps=0"], ["--resume"]),
        (["train", "--export", i["model"], str(home)], []),
        (["sft", "--model", i["model"], "--data", i["chats"], "--out", str(home), "--max-steps", "1"], ["--resume"]),
        (["dpo", "--model", i["model"], "--data", i["pairs"], "--out", str(home), "--max-steps", "1"], ["--resume"]),
        (["eval", "--model", i["model"], "--tasks", "perplexity", "--text-files", i["corpus"], "--output",
          str(home)], []),
        (["eval", "--model", i["model"], "--tasks", "perplexity", "--text-files", i["corpus"], "--output",
          str(home / "results.json")], []),
        (["eval", "--samples", str(home / "samples")], []),
        (["speedrun", "--out", str(home), "--preset", "micro"], ["--fresh"]),
    ]


def test_a_directory_of_user_files_given_to_every_writing_verb_is_left_alone(tmp_path, inputs, capsys):
    home = user_files(tmp_path)
    (home / "samples").write_text((Path(inputs["samples"])).read_text())
    (home / "samples_results.jsonl").write_text("my own results\n")
    before = snapshot(home)
    for argv, flags in writing_verbs(home, inputs):
        for extra in ([], flags):
            assert main(argv + extra) == 2, argv + extra
            one_line_error(capsys)
            assert snapshot(home) == before, argv + extra
    assert not [p for p in tmp_path.rglob(".*partial*")]  # no staging left behind


def test_outputs_of_the_same_kind_are_replaced_and_only_with_force(tmp_path, tiny_phi_checkpoint, capsys):
    gguf = pytest.importorskip("gguf")
    out = tmp_path / "out.gguf"
    assert main(["convert", str(tiny_phi_checkpoint), str(out), "--dtype", "fp32"]) == 0
    capsys.readouterr()
    assert main(["convert", str(tiny_phi_checkpoint), str(out)]) == 2
    one_line_error(capsys, "already holds a GGUF file", "--force")
    assert main(["convert", str(tiny_phi_checkpoint), str(out), "--force", "--dtype", "fp32"]) == 0
    assert gguf.GGUFReader(out).fields["general.architecture"]
    tok = tmp_path / "tok"
    for _ in range(2):  # a tokenizer directory is rewritten by the next build
        assert main(["tokenizer", "build-phi", str(tok)]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.gguf", "tok"]


def test_convert_checks_its_output_before_converting(tiny_phi_checkpoint, tmp_path, monkeypatch, capsys):
    import phikit.checkpoint
    loads = []
    monkeypatch.setattr(phikit.checkpoint, "load", lambda *a, **k: loads.append(a) or 1 / 0)
    assert main(["convert", str(tiny_phi_checkpoint), "/proc/x.gguf"]) == 2
    one_line_error(capsys, "/proc", "does not accept new files")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "keep.txt").write_text("mine")
    assert main(["convert", str(tiny_phi_checkpoint), ".", "--force"]) == 2
    one_line_error(capsys, ". exists and is not a model directory", "keep.txt")
    assert loads == [] and (tmp_path / "keep.txt").read_text() == "mine"


def test_an_interrupted_save_leaves_the_old_model(tiny_phi_checkpoint, tmp_path, monkeypatch):
    import phikit
    import phikit.checkpoint
    model, tokenizer = phikit.load(tiny_phi_checkpoint)
    out = phikit.save(model, tokenizer, tmp_path / "m")
    before = snapshot(out)

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(phikit.checkpoint, "_write_weights", interrupted)
    with pytest.raises(KeyboardInterrupt):
        phikit.save(model, tokenizer, out)
    assert snapshot(out) == before and [p.name for p in tmp_path.iterdir()] == ["m"]


def test_eval_task_files_fail_in_one_line_naming_the_record(tiny_phi_checkpoint, tmp_path, monkeypatch, capsys):
    import phikit
    loads = []
    monkeypatch.setattr(phikit, "load", lambda *a, **k: loads.append(a) or 1 / 0)  # checks come first
    arc = tmp_path / "data" / "arc_easy"
    arc.mkdir(parents=True)
    good = {"question": "Q?", "choices": {"text": ["a", "b"], "label": ["A", "B"]}, "answerKey": "A"}
    cases = [
        ([good, {"question": "Q?", "answerKey": "A"}], "test.jsonl:2: no 'choices' field"),
        ([{**good, "answerKey": "Z"}], "test.jsonl:1: not a arc_easy record (answerKey 'Z' is not one of the"),
        ([], "holds no records"),
    ]
    for records, message in cases:
        (arc / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
        argv = ["eval", "--model", str(tiny_phi_checkpoint), "--tasks", "arc_easy", "--data-dir", str(tmp_path / "data")]
        assert main(argv) == 2
        one_line_error(capsys, message)
    (arc / "test.jsonl").write_text(json.dumps(good) + "\n")
    assert main(argv + ["--output", str(tmp_path)]) == 2  # a directory: refused before the evaluation
    one_line_error(capsys, "is a directory")
    assert loads == []


def test_sft_data_directory_and_info_into_a_closed_pipe(tiny_phi_checkpoint, tmp_path, capsys):
    assert main(["sft", "--model", str(tiny_phi_checkpoint), "--data", str(tmp_path), "--out", str(tmp_path / "r")]) == 2
    one_line_error(capsys, "--data", "is a directory")
    assert not (tmp_path / "r").exists()
    # `phikit info --json M | head -1`: the reader leaves early; no "Broken pipe", exit 0.
    proc = subprocess.run(f"{sys.executable} -m phikit info --json {tiny_phi_checkpoint} | head -1", shell=True,
                          capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT / "src")})
    assert proc.stdout == "{\n" and proc.stderr == "", proc.stderr


def test_progress_in_a_log_is_plain_lines(tiny_phi_checkpoint, tmp_path):
    gguf_out = tmp_path / "m.gguf"
    proc = subprocess.run([sys.executable, "-m", "phikit", "convert", str(tiny_phi_checkpoint), str(gguf_out),
                           "--dtype", "fp32"], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT / "src")})
    assert proc.returncode == 0, proc.stderr
    assert "\r" not in proc.stderr and "gguf fp32: 100%" in proc.stderr


def test_plain_progress_lines_and_their_interval(monkeypatch):
    import io

    from phikit import progress
    log = io.StringIO()
    monkeypatch.setattr(progress, "PLAIN_INTERVAL", 0.0)
    bar = progress.tqdm(total=3, desc="steps", file=log)
    for _ in range(3):
        bar.update(1)
    bar.close()
    lines = log.getvalue().splitlines()
    assert "\r" not in log.getvalue() and lines[0].startswith("steps:   0%") and lines[-1].startswith("steps: 100%")


def test_version_help_without_torch_and_missing_extras(capsys, monkeypatch):
    from phikit import __version__
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"phikit {__version__}"
    code = ("import sys\nfrom phikit.cli import main, VERBS\n"
            "for argv in [['--help']] + [[v, '--help'] for v in VERBS]:\n"
            "    try:\n        main(argv)\n    except SystemExit:\n        pass\n"
            "print(sorted(m for m in ('torch', 'numpy', 'transformers', 'datatrove', 'fastapi') if m in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT / "src")})
    assert proc.returncode == 0 and proc.stdout.strip().splitlines()[-1] == "[]", proc.stderr
    # A verb whose extra is missing names the pip command, in one line, before any work.
    import importlib.util
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "fastapi" else real(name, *a))
    assert main(["serve", "--model", "x"]) == 2
    one_line_error(capsys, "pip install 'phikit[serve]'", "fastapi")


def test_library_logs_are_quiet_unless_verbose():
    import logging

    from phikit.cli import quiet_libraries
    quiet_libraries(verbose=False)
    assert logging.getLogger("datatrove").getEffectiveLevel() > logging.INFO
    assert os.environ["LOGURU_LEVEL"] == "WARNING" and os.environ["TRANSFORMERS_VERBOSITY"] == "error"
