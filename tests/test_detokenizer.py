"""The incremental detokenizer against tokenizer.decode of the whole output: the released pieces join to the
decoded text (cut before the earliest stop string), none holds half a character or a possible stop start."""
import random

import pytest

from phikit.inference.detokenizer import Detokenizer, stop_prefix_length


def pieces_of(tokenizer, ids: list[int], stop: list[str]) -> tuple[list[str], Detokenizer]:
    detokenizer = Detokenizer(tokenizer, stop)
    out = []
    for i in ids:
        out.append(detokenizer.push(i))
        if detokenizer.stopped:
            break
    out.append(detokenizer.finish())
    return out, detokenizer


def reference(tokenizer, ids: list[int], stop: list[str]) -> str:
    """The whole output decoded at once, cut where the earliest stop string begins."""
    text = tokenizer.decode(ids)
    hits = [at for at in (text.find(s) for s in stop if s) if at >= 0]
    return text[:min(hits)] if hits else text


def test_stop_prefix_is_held_back():
    assert stop_prefix_length("hello wor", ["world"]) == 3
    assert stop_prefix_length("hello", ["\nUser:"]) == 0
    assert stop_prefix_length("a\nUs", ["\nUser:", "\nBob:"]) == 3
    assert stop_prefix_length("x", []) == 0


def test_never_splits_a_utf8_character(phi_tokenizer):
    text = "naïve café 🙂 ñandú 日本語 done"
    ids = phi_tokenizer.encode(text)
    assert len(ids) > len(text.split())  # multi-byte characters span several byte-level tokens
    detokenizer = Detokenizer(phi_tokenizer, ["STOP"])
    deltas = [detokenizer.push(i) for i in ids] + [detokenizer.finish()]
    assert "".join(deltas) == text
    assert not any("\ufffd" in d for d in deltas)
    # "ST" at the end is held back (it may begin "STOP") and released once it cannot.
    detokenizer = Detokenizer(phi_tokenizer, ["STOP"])
    held = [detokenizer.push(i) for i in phi_tokenizer.encode("a ST")]
    assert "".join(held) == "a " and detokenizer.finish() == "ST"


def test_without_stops_every_character_comes_out_whole(phi_tokenizer):
    text = "naïve 日本語 🙂 done"
    pieces, _ = pieces_of(phi_tokenizer, phi_tokenizer.encode(text), [])
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)


@pytest.mark.parametrize("text, stop", [
    ("emoji 🙂🙃 and 中文字 then 🎉 done", []),  # 4-byte characters split over two or three tokens
    ("the answer is 42\nUser: next", ["\nUser:"]),  # a stop string spanning tokens
    ("a bcd e", ["bcd", "cd e"]),  # overlapping stops: the earliest start wins
    (" understanding it", ["stand", "erst"]),  # the later-listed stop begins first
    ("price: 5€ and 日本 STOP more", ["本 S", "OP"]),  # a stop beginning with a multi-byte character
    ("no stop here, only SToPs", ["STOP"]),  # a long-held prefix that never completes
    ("ends with a partial stop ST", ["STOP", "T"]),
    ("\n\n\nUser", ["\n\nUser", "\nUs"]),  # a stop's prefix repeated before the match
])
def test_pieces_join_to_the_decoded_text(phi_tokenizer, text, stop):
    ids = phi_tokenizer.encode(text)
    pieces, detokenizer = pieces_of(phi_tokenizer, ids, stop)
    want = reference(phi_tokenizer, ids, stop)
    assert "".join(pieces) == want == detokenizer.text
    assert detokenizer.stopped == (want != phi_tokenizer.decode(ids))
    assert all("\ufffd" not in p for p in pieces)
    for s in stop:  # nothing released could still have been the start of a stop
        assert s not in "".join(pieces)


def test_random_byte_tokens_decode_as_a_whole(phi_tokenizer):
    """Token ids drawn at random give byte sequences that are often not UTF-8 at all (lone continuation bytes,
    characters cut short): the pieces still join to what decoding the whole output shows."""
    vocab = len(phi_tokenizer)
    byte_tokens = [i for i in range(vocab) if "\ufffd" in phi_tokenizer.decode([i])]  # partial characters
    rng = random.Random(0)
    for trial in range(200):
        ids = [rng.choice(byte_tokens) if rng.random() < 0.5 else rng.randrange(vocab) for _ in range(rng.randint(1, 30))]
        stop = [rng.choice(["e", "th", "\ufffd", "in"])] if trial % 2 else []
        pieces, _ = pieces_of(phi_tokenizer, ids, stop)
        assert "".join(pieces) == reference(phi_tokenizer, ids, stop), ids


def test_each_token_decodes_a_bounded_window(phi_tokenizer):
    """The cost per token does not grow with the output: decode() only ever sees a few ids."""
    seen = []

    class Counting:
        def decode(self, ids):
            seen.append(len(ids))
            return phi_tokenizer.decode(ids)

    ids = phi_tokenizer.encode("日本語 and more text 🙂 " * 200)
    pieces, _ = pieces_of(Counting(), ids, ["\nUser:"])
    assert "".join(pieces) == phi_tokenizer.decode(ids)
    assert max(seen) <= 8
