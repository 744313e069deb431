"""The rebuilt phi tokenizer against known ids and an independent build with tokenizers' ByteLevelBPETokenizer."""
import random

import pytest
from tokenizers import AddedToken, ByteLevelBPETokenizer

from phikit.cli import main as cli_main
from phikit.tokenizer import Tokenizer, gpt2_vocab_files, train_bpe


def test_known_vectors(phi_tokenizer):
    assert phi_tokenizer.encode("This is a test.") == [1212, 318, 257, 1332, 13]
    assert phi_tokenizer.encode("\n    return") == [198, 50284, 7783]
    assert phi_tokenizer.encode("  ") == [50286]
    assert phi_tokenizer.encode("<|endoftext|>") == [50256]
    assert len(phi_tokenizer) == 50295
    assert phi_tokenizer.eos_token_id == phi_tokenizer.bos_token_id == 50256
    # ids of the whitespace runs: n spaces -> 50257 + 31 - n; n tabs (9..2) -> 50287 + 9 - n
    for n in range(2, 32):
        assert phi_tokenizer.token_to_id(" " * n) == 50257 + 31 - n
    for n in range(2, 10):
        assert phi_tokenizer.token_to_id("\t" * n) == 50287 + 9 - n


def mixed_strings(count: int = 300) -> list[str]:
    rng = random.Random(0)
    pieces = ["def ", "return", "class Foo:", "\n", "    ", "\t", "\t\t", "  ", " " * 9, " " * 40, "\t" * 12,
              "x = 1", "# comment", "for i in range(10):", "é", "naïve", "日本語", "🙂", "Ω≈ç√", "<|endoftext|>",
              "'''doc'''", "\"\"\"", "print(f'{x!r}')", "if a != b:", "0x1F", "3.14159", "Hello, world!", "\r\n",
              "λ", "ß", "  # indented", "\u200b", "ünïcödé", "\\n", "{}[]()", "a+b*c", " "]
    out = []
    for _ in range(count):
        out.append("".join(rng.choice(pieces) for _ in range(rng.randint(1, 12))))
    return out


def independent_phi_tokenizer() -> ByteLevelBPETokenizer:
    vocab, merges = gpt2_vocab_files()
    tok = ByteLevelBPETokenizer(str(vocab), str(merges), add_prefix_space=False, trim_offsets=False)
    tok.add_special_tokens(["<|endoftext|>"])
    tok.add_tokens([AddedToken(" " * n) for n in range(31, 1, -1)] + [AddedToken("\t" * n) for n in range(9, 1, -1)])
    return tok


def test_matches_independent_build_and_round_trips(phi_tokenizer):
    ref = independent_phi_tokenizer()
    assert ref.get_vocab_size() == len(phi_tokenizer)
    for s in mixed_strings():
        ids = phi_tokenizer.encode(s)
        assert ids == ref.encode(s).ids, repr(s)
        assert phi_tokenizer.decode(ids) == s


def test_save_and_reload(tmp_path, phi_tokenizer):
    phi_tokenizer.save(tmp_path)
    again = Tokenizer.from_file(tmp_path)
    for s in mixed_strings(30):
        assert again.encode(s) == phi_tokenizer.encode(s)


def test_train_bpe(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("def add(a, b):\n    return a + b\n" * 200 + "The quick brown fox. " * 300)
    assert cli_main(["tokenizer", "train", str(corpus), "--vocab-size", "400", "--output", str(tmp_path / "t")]) == 0
    tok = Tokenizer.from_file(tmp_path / "t")
    assert tok.token_to_id("<|endoftext|>") == 0
    s = "def add(a, b):\n    return a + b"
    assert tok.decode(tok.encode(s)) == s
    assert len(tok.encode(s)) < len(s.encode())  # merges were learned
    with pytest.raises(ValueError, match="too small"):
        train_bpe(["x"], 100)


def test_build_phi_cli(tmp_path):
    assert cli_main(["tokenizer", "build-phi", str(tmp_path / "tok"), "--chatml"]) == 0
    tok = Tokenizer.from_file(tmp_path / "tok")
    assert tok.has_chatml and tok.encode("<|im_start|>user")[0] == 50295
    assert cli_main(["tokenizer", "build-phi"]) == 2  # missing argument: usage error, no traceback
    (tmp_path / "file").write_text("x")
    assert cli_main(["tokenizer", "build-phi", str(tmp_path / "file")]) == 2  # a file, not a directory


def test_missing_tokenizer_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="build-phi"):
        Tokenizer.from_file(tmp_path)


def test_train_bpe_split_digits_keeps_one_digit_per_token_and_the_space_on_the_first():
    corpus = [f"Step 1: {a} + {b} = {a + b}.\nAnswer: {a + b}" for a in range(2, 60) for b in range(2, 11)]
    tok = train_bpe(corpus * 3, 400, split_digits=True)
    text = "What is 15 + 7? Step 2: 122 - 9 = 113."
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    pieces = [tok.decode([i]) for i in ids]
    assert all(sum(c.isdigit() for c in p) <= 1 for p in pieces), pieces
    # " 15" is " 1" then "5": no bare space token stands between "=" and the result it predicts.
    assert pieces[pieces.index(" =") + 1] == " 1", pieces
    assert not any(p == " " and q[:1].isdigit() for p, q in zip(pieces, pieces[1:])), pieces


def test_unreadable_tokenizer_files_are_one_line_errors(tmp_path, phi_tokenizer):
    (tmp_path / "tokenizer.json").write_text('{"version": "1.0", "model": ')
    with pytest.raises(ValueError, match="not a readable tokenizer.json"):
        Tokenizer.from_file(tmp_path)
    phi_tokenizer.save(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text('{"chat_template": ')
    with pytest.raises(ValueError, match="tokenizer_config.json is not valid JSON"):
        Tokenizer.from_file(tmp_path)
    # transformers also writes a list of named templates; the default one is the chat template.
    (tmp_path / "tokenizer_config.json").write_text('{"chat_template": [{"name": "default", "template": "T"}]}')
    assert Tokenizer.from_file(tmp_path).chat_template == "T"


def test_train_on_files_without_text_is_a_one_line_error(tmp_path, capsys):
    # An empty .txt file is one blank document: a tokenizer of bare bytes must not be written from it.
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "blank.txt").write_text(" \n\n")
    out = tmp_path / "tok"
    assert cli_main(["tokenizer", "train", str(tmp_path / "empty.txt"), str(tmp_path / "blank.txt"),
                     "--vocab-size", "400", "--output", str(out)]) == 2
    assert "no documents" in capsys.readouterr().err and not out.exists()
