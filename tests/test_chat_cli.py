"""`phikit chat` through a pseudo-terminal, and `phikit generate` from the command line."""
from __future__ import annotations

import json
import signal
import sys

import pytest

import phikit
from phikit.cli import main
from phikit.commands.chat import fit_history
from phikit.inference.formats import get_format
from phikit.inference.decoding import generate

pexpect = pytest.importorskip("pexpect")


def test_chat_holds_a_three_turn_conversation(tiny_phi_checkpoint):
    child = pexpect.spawn(sys.executable, ["-m", "phikit", "chat", "--model", str(tiny_phi_checkpoint),
                                           "--max-new-tokens", "6", "--user-name", "Ann", "--assistant-name", "Ben"],
                          encoding="utf-8", timeout=60, env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"})
    try:
        child.expect("chat format")
        for turn, message in enumerate(["Hello there!", "What is 2 + 2?", "Thanks, bye."]):
            child.expect_exact("Ann> ")
            child.sendline(message)
            child.expect_exact("Ben> ")
        child.expect_exact("Ann> ")
        child.sendline("first line \\")  # a continued line
        child.expect_exact("... ")
        child.sendline("second line")
        child.expect_exact("Ben> ")
        child.expect_exact("Ann> ")
        child.sendline("/reset")
        child.expect_exact("(conversation reset)")
        child.sendline("/system Be brief.")
        child.expect_exact("(system message set; conversation reset)")
        child.sendline("/exit")
        child.expect(pexpect.EOF)
    finally:
        child.close()
    assert child.exitstatus == 0


def test_history_is_trimmed_from_the_oldest_turn(phi_tokenizer):
    fmt = get_format("chat")
    messages = [{"role": "system", "content": "Be kind."}]
    for i in range(6):
        messages += [{"role": "user", "content": f"question {i} " * 5},
                     {"role": "assistant", "content": f"answer {i} " * 5}]
    messages.append({"role": "user", "content": "last question"})
    fitted = fit_history(phi_tokenizer, fmt, messages, budget=60)
    assert fitted[0] == messages[0] and fitted[-1] == messages[-1]
    assert len(phi_tokenizer.encode(fmt.render(fitted))) <= 60 < len(phi_tokenizer.encode(fmt.render(messages)))


def test_generate_cli_batch_json_matches_library(tiny_phi_checkpoint, tmp_path, capsys):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": "def add(a, b):"}) + "\n" + json.dumps({"prompt": "Hi"}) + "\n")
    assert main(["generate", "--model", str(tiny_phi_checkpoint), "--prompts-file", str(prompts),
                 "--max-new-tokens", "5", "--json"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    model, tokenizer = phikit.load(tiny_phi_checkpoint)
    assert [r["text"] for r in rows] == generate(model, tokenizer, ["def add(a, b):", "Hi"], max_new_tokens=5)
    assert all(len(r["logprobs"]) == len(r["token_ids"]) for r in rows)

    assert main(["generate", "--model", str(tiny_phi_checkpoint), "--prompt", "Hi", "--max-new-tokens", "5",
                 "--stream"]) == 0
    assert capsys.readouterr().out == generate(model, tokenizer, "Hi", max_new_tokens=5) + "\n"

    assert main(["generate", "--model", str(tiny_phi_checkpoint), "--prompts-file", str(prompts),
                 "--max-new-tokens", "5", "--json", "--prompt-lookup", "4"]) == 0
    assert [json.loads(line)["text"] for line in capsys.readouterr().out.splitlines()] == [r["text"] for r in rows]


@pytest.mark.parametrize("argv,message", [
    (["--prompt", "hi", "--temperature", "-1"], "temperature"),
    (["--prompt", "hi", "--top-p", "1.5"], "top_p"),
    (["--prompt", ""], "empty"),
    ([], "no prompt"),
    (["--prompts-file", "missing.txt"], "does not exist"),
    (["--prompts-file", "."], "not a file"),
    (["--prompt", "hi", "--system", "Be brief."], "--format"),
    (["--prompts-file", "NUMBER.jsonl"], "'prompt' must be a string"),
    (["--prompts-file", "LATIN1.txt"], "not UTF-8"),
    (["--prompts-file", "EMPTY.txt"], "holds no prompts"),
    (["--prompts-file", "BROKEN.jsonl"], "BROKEN.jsonl:2: not valid JSON"),
    (["--prompts-file", "NOPROMPT.jsonl"], "NOPROMPT.jsonl:1: expected a JSON object with a 'prompt' field"),
    (["--prompt", "hi", "--prompt-lookup", "4", "--temperature", "0.8"], "temperature=0"),
])
def test_generate_cli_bad_input_is_one_line(tiny_phi_checkpoint, tmp_path, capsys, argv, message):
    (tmp_path / "NUMBER.jsonl").write_text('{"prompt": "fine"}\n{"prompt": 5}\n')
    (tmp_path / "LATIN1.txt").write_bytes("café\n".encode("latin-1"))
    (tmp_path / "EMPTY.txt").write_text("\n \n")
    (tmp_path / "BROKEN.jsonl").write_text('{"prompt": "fine"}\n{"prompt": "unclosed\n')
    (tmp_path / "NOPROMPT.jsonl").write_text('{"text": "no prompt field"}\n')
    files = ("NUMBER.jsonl", "LATIN1.txt", "EMPTY.txt", "BROKEN.jsonl", "NOPROMPT.jsonl")
    argv = [str(tmp_path / a) if a in files else a for a in argv]
    assert main(["generate", "--model", str(tiny_phi_checkpoint), *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert message in err[-1] and err[-1].startswith("phikit: error:")


def test_streamed_answer_starts_where_the_printed_answer_does(tiny_phi_checkpoint, monkeypatch, capsys):
    # The model's first deltas are blanks: --stream must drop them all, as fmt.cut does for the whole text.
    import phikit.inference.decoding as engine
    deltas = ["\n", " ", " The sky", " is blue."]
    monkeypatch.setattr(engine, "stream", lambda *a, **k: iter(deltas))
    monkeypatch.setattr(engine, "complete", lambda model, tok, batch, **k: [
        engine.Completion("".join(deltas), [1] * len(deltas), None, "length", 3) for _ in batch])
    argv = ["generate", "--model", str(tiny_phi_checkpoint), "--prompt", "Why?", "--format", "qa"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert main(argv + ["--stream"]) == 0
    assert capsys.readouterr().out == printed == "The sky is blue.\n"


def test_quantized_model_reports_its_parameter_count(tiny_phi_checkpoint, capsys):
    assert main(["generate", "--model", str(tiny_phi_checkpoint), "--prompt", "Hi", "--max-new-tokens", "1",
                 "--quantize", "int8"]) == 0
    count = phikit.get_config("tiny", vocab_size=51200).num_parameters()
    assert f"({count / 1e6:,.1f}M parameters)" in capsys.readouterr().err


def _sigint_as_in_a_terminal() -> None:
    """In the spawned chat: Ctrl-C delivered as a user's terminal delivers it, whatever the test process had set
    (a disposition of "ignore" or a blocked signal is inherited across exec, and Python then keeps it)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})


def test_ctrl_c_stops_an_answer_and_ctrl_c_at_the_prompt_leaves(tmp_path, phi_tokenizer):
    import phikit
    from phikit import build_model, get_config
    # a long context, so that the answer is still running when Ctrl-C arrives (a 512-token one can finish first)
    config = get_config("tiny", vocab_size=51200, tokenizer_vocab_size=len(phi_tokenizer),
                        max_position_embeddings=16384)
    phikit.save(build_model(config, seed=0), phi_tokenizer, tmp_path / "long")
    child = pexpect.spawn(sys.executable, ["-m", "phikit", "chat", "--model", str(tmp_path / "long"),
                                           "--max-new-tokens", "16000"],
                          encoding="utf-8", timeout=60, env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"},
                          preexec_fn=_sigint_as_in_a_terminal)
    try:
        child.expect_exact("Alice> ")
        child.sendline("Tell me a long story.")
        child.expect_exact("Bob> ")
        child.expect(r"\S")  # the answer has begun
        child.sendintr()
        child.expect_exact("(stopped)")
        child.expect_exact("Alice> ")  # the conversation goes on
        child.sendintr()
        child.expect(pexpect.EOF)
    finally:
        child.close()
    assert "Traceback" not in child.before and child.exitstatus == 0


def test_streamed_answer_ends_where_the_printed_answer_does(tiny_phi_checkpoint, monkeypatch, capsys):
    # Blank deltas after the answer are held back and dropped, as fmt.cut drops them; blanks inside are kept.
    import phikit.inference.decoding as engine
    deltas = [" The sky", "\n\n", "is blue.", " ", "\n", "\n\n"]
    monkeypatch.setattr(engine, "stream", lambda *a, **k: iter(deltas))
    monkeypatch.setattr(engine, "complete", lambda model, tok, batch, **k: [
        engine.Completion("".join(deltas), [1] * len(deltas), None, "length", 3) for _ in batch])
    for name in ("qa", "code"):
        argv = ["generate", "--model", str(tiny_phi_checkpoint), "--prompt", "Why?", "--format", name]
        assert main(argv) == 0
        printed = capsys.readouterr().out
        assert main(argv + ["--stream"]) == 0
        assert capsys.readouterr().out == printed == get_format(name).cut("".join(deltas)) + "\n"


def test_prompts_file_lines_end_only_at_newlines_and_a_byte_order_mark_is_dropped(tmp_path):
    import argparse
    from phikit.commands.generate import read_prompts
    jsonl, text = tmp_path / "p.jsonl", tmp_path / "p.txt"
    jsonl.write_bytes(("\ufeff" + json.dumps({"prompt": "a\u2028b\x85c"}, ensure_ascii=False) + "\r\n\r\n"
                       + json.dumps({"prompt": "d"}) + "\r\n").encode("utf-8"))
    text.write_bytes("\ufeffone\u2028prompt\r\n\r\ntwo\\nlines\r\n".encode("utf-8"))
    assert read_prompts(argparse.Namespace(prompt=[], prompts_file=jsonl)) == ["a\u2028b\x85c", "d"]
    assert read_prompts(argparse.Namespace(prompt=[], prompts_file=text)) == ["one\u2028prompt", "two\nlines"]


def test_history_drops_whole_exchanges(phi_tokenizer):
    fmt = get_format("chat")
    messages = [{"role": "user", "content": "q " * 30}, {"role": "assistant", "content": "a"},
                {"role": "user", "content": "last"}]
    assert fit_history(phi_tokenizer, fmt, messages, budget=10) == messages[-1:]


def test_chat_goes_on_after_a_too_long_message_a_dropped_block_and_a_non_command(
        tiny_phi_checkpoint, monkeypatch, capsys):
    import builtins
    import phikit.inference.decoding as engine

    def typed(prompt=""):  # what the user types at each prompt; an exception is a key press
        item = lines.pop(0)
        if isinstance(item, BaseException):
            raise item
        return item

    lines = ["word " * 600,  # longer than the tiny model's context: an error, not the end of the chat
             '"""', "half a block", KeyboardInterrupt(),  # Ctrl-C in a block drops the block
             "/systematic doubt is healthy",  # a message, not the /system command
             "/sytem",  # a mistyped command: not sent to the model
             "//etc",  # the escape for a one-word message that starts with /
             "/exit"]
    prompts = []
    monkeypatch.setattr(builtins, "input", typed)
    monkeypatch.setattr(engine, "stream", lambda model, tok, prompt, **k: prompts.append(prompt) or iter(["Yes.\n\n"]))
    assert main(["chat", "--model", str(tiny_phi_checkpoint), "--max-new-tokens", "4"]) == 0
    out, err = capsys.readouterr()
    assert "longer than" in err and "Traceback" not in err
    assert "unknown command /sytem, see /help" in err
    assert prompts == ["Alice: /systematic doubt is healthy\nBob:", "Alice: /systematic doubt is healthy\nBob: Yes."
                       "\nAlice: /etc\nBob:"]
    assert out.endswith("Bob> Yes.\n") and "half a block" not in "".join(prompts)


def test_echoed_prompt_keeps_the_space_after_the_speaker_label(tiny_phi_checkpoint, monkeypatch, capsys):
    import phikit.inference.decoding as engine
    monkeypatch.setattr(engine, "stream", lambda *a, **k: iter([" Hi."]))
    monkeypatch.setattr(engine, "complete", lambda model, tok, batch, **k: [
        engine.Completion(" Hi.", [1], None, "length", 3) for _ in batch])
    argv = ["generate", "--model", str(tiny_phi_checkpoint), "--prompt", "Why?", "--format", "chat", "--echo"]
    for extra in ([], ["--stream"]):
        assert main(argv + extra) == 0
        assert capsys.readouterr().out == "Alice: Why?\nBob: Hi.\n"
