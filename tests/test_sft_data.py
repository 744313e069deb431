"""Conversation shapes, ChatML rendering against phikit.inference.formats and transformers' chat template, assistant-only
loss masks, packing that keeps attention inside each conversation, and ChatML rows in the embedding."""
from __future__ import annotations

import pytest
import torch

from phikit import build_model, get_config
from phikit.inference.formats import get_format
from phikit.tokenizer import IM_END, build_phi_tokenizer, train_bpe
from phikit.train.chat_data import (IGNORE_INDEX, BadExample, add_chatml_tokens, build_sft_examples,
                                    collate_packed, pack_examples, parse_conversation, render_chatml,
                                    tokenize_conversation)

MESSAGES = [{"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": "Write\n    code"},
            {"role": "assistant", "content": "\n    return 1\n"},
            {"role": "user", "content": "Thanks!"},
            {"role": "assistant", "content": "You're welcome  "}]


@pytest.fixture(scope="module")
def phi_tok():
    tok = build_phi_tokenizer()
    tok.add_chatml()
    return tok


def test_shapes_openai_sharegpt_alpaca_and_system_field():
    sharegpt = {"conversations": [{"from": "system", "value": "S"}, {"from": "human", "value": "Q"},
                                  {"from": "gpt", "value": "A"}]}
    assert parse_conversation(sharegpt) == [{"role": "system", "content": "S"}, {"role": "user", "content": "Q"},
                                            {"role": "assistant", "content": "A"}]
    assert parse_conversation({"messages": MESSAGES}) == MESSAGES
    alpaca = {"instruction": "Sum", "input": "1 2", "output": "3", "system": "Be brief."}
    assert parse_conversation(alpaca) == [{"role": "system", "content": "Be brief."},
                                          {"role": "user", "content": "Sum\n\n1 2"},
                                          {"role": "assistant", "content": "3"}]


@pytest.mark.parametrize("record,kind", [
    ({"messages": [{"role": "user", "content": "hi"}]}, "no_assistant"),
    ({"messages": [{"role": "narrator", "content": "x"}, {"role": "assistant", "content": "y"}]}, "unknown_role"),
    ({"conversations": [{"from": "human", "value": 3}]}, "malformed"),
    ({"text": "plain text"}, "malformed"),
])
def test_bad_conversations_are_named(record, kind):
    with pytest.raises(BadExample) as err:
        parse_conversation(record)
    assert err.value.kind == kind


def test_rendering_equals_formats_chatml_and_transformers_chat_template(phi_tok, tmp_path):
    transformers = pytest.importorskip("transformers")
    assert render_chatml(MESSAGES) == get_format("chatml").render(MESSAGES, add_generation_prompt=False)
    assert render_chatml(MESSAGES[:2], True) == get_format("chatml").render(MESSAGES[:2])
    phi_tok.save(tmp_path)
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path)
    ids = hf.apply_chat_template(MESSAGES, tokenize=True)
    ids = ids["input_ids"] if hasattr(ids, "keys") else ids
    assert tokenize_conversation(phi_tok, MESSAGES).input_ids == list(ids)


def test_loss_covers_assistant_content_and_im_end_only(phi_tok):
    ex = tokenize_conversation(phi_tok, MESSAGES)
    trained = [label for label in ex.labels if label != IGNORE_INDEX]
    # The first assistant turn starts with "\n", which BPE merges with the header's "\n" into one prompt token.
    assert phi_tok.decode(trained) == "    return 1\n" + IM_END + "You're welcome  " + IM_END
    runs = [i for i in range(1, len(ex.labels)) if (ex.labels[i] == IGNORE_INDEX) != (ex.labels[i - 1] == IGNORE_INDEX)]
    assert len(runs) == 4  # two trained spans, nothing else


def test_report_counts_skips_truncates_or_stops(phi_tok):
    long = {"messages": [{"role": "user", "content": "word " * 50}, {"role": "assistant", "content": "ok " * 50}]}
    records = [{"messages": MESSAGES}, long, {"messages": [{"role": "user", "content": "x"}]}]
    examples, report = build_sft_examples(records, phi_tok, max_length=64)
    assert len(examples) == 1 and report.problems == {"too_long": 1, "no_assistant": 1}
    assert "too_long 1" in report.summary() and "no_assistant 1" in report.summary()
    examples, report = build_sft_examples(records, phi_tok, max_length=80, too_long="truncate")
    assert len(examples) == 2 and report.truncated == 1 and len(examples[1]) == 80
    with pytest.raises(ValueError, match="record 3.*no assistant"):
        build_sft_examples(records, phi_tok, max_length=80, too_long="truncate", on_bad="error")
    with pytest.raises(ValueError, match="more than max_length"):
        build_sft_examples(records, phi_tok, max_length=64, too_long="error")


def test_packed_rows_give_each_conversation_its_own_logits():
    """A packed row (segment ids + restarted positions) must equal running each conversation alone."""
    tok = train_bpe(["the cat sat on the mat and the dog ran"] * 30, vocab_size=300, whitespace_tokens=False)
    model = build_model(get_config("tiny", vocab_size=320, hidden_size=64, intermediate_size=128,
                                   num_attention_heads=2, max_position_embeddings=128), seed=0).eval()
    add_chatml_tokens(model, tok)
    convs = [[{"role": "user", "content": "the cat" * k}, {"role": "assistant", "content": "sat on the mat"}]
             for k in (1, 2, 3, 4, 5)]
    examples, _ = build_sft_examples([{"messages": c} for c in convs], tok, max_length=128)
    rows = pack_examples(examples, max_length=60)
    assert sorted(i for row in rows for i in row) == list(range(5))
    assert all(sum(len(examples[i]) for i in row) <= 60 for row in rows) and len(rows) < 5
    batch = collate_packed(examples, rows, pad_id=tok.eos_token_id)
    with torch.no_grad():
        packed = model(batch["input_ids"], position_ids=batch["position_ids"], segment_ids=batch["segment_ids"]).logits
        for r, row in enumerate(rows):
            pos = 0
            for i in row:
                n = len(examples[i])
                alone = model(torch.tensor([examples[i].input_ids])).logits[0]
                torch.testing.assert_close(packed[r, pos:pos + n], alone, rtol=1e-4, atol=1e-4)
                assert batch["labels"][r, pos:pos + n].tolist() == examples[i].labels
                pos += n


def test_chatml_rows_use_padding_rows_when_there_is_room_and_resize_otherwise():
    tok = train_bpe(["a b c d e f g"] * 10, vocab_size=300, whitespace_tokens=False)
    n = len(tok)
    roomy = build_model(get_config("tiny", vocab_size=n + 10, hidden_size=32, intermediate_size=64,
                                   num_attention_heads=1), seed=0)
    start, end = add_chatml_tokens(roomy, tok)
    assert (start, end) == (n, n + 1) and roomy.config.vocab_size == n + 10
    assert roomy.config.tokenizer_vocab_size == n + 2 and tok.chat_template
    mean = roomy.model.embed_tokens.weight[:n].mean(0)
    torch.testing.assert_close(roomy.model.embed_tokens.weight[n + 1], mean)
    tok2 = train_bpe(["a b c d e f g"] * 10, vocab_size=300, whitespace_tokens=False)
    tight = build_model(get_config("tiny", vocab_size=len(tok2), hidden_size=32, intermediate_size=64,
                                   num_attention_heads=1), seed=0)
    old = tight.model.embed_tokens.weight.detach().clone()
    add_chatml_tokens(tight, tok2)
    assert tight.config.vocab_size == -(-(len(tok2)) // 64) * 64 >= len(tok2)
    assert tight.lm_head.weight.shape[0] == tight.config.vocab_size
    torch.testing.assert_close(tight.model.embed_tokens.weight[:len(old)], old)
    assert tight(torch.tensor([[end, start]])).logits.shape[-1] == tight.config.vocab_size


def test_phi_vocabulary_puts_chatml_in_the_padding_rows(phi_tok):
    assert phi_tok.token_to_id("<|im_start|>") == 50295 and phi_tok.token_to_id(IM_END) == 50296


def test_malformed_json_line_is_a_counted_bad_record(phi_tok, tmp_path):
    import json

    from phikit.train.chat_data import read_records
    path = tmp_path / "chats.jsonl"
    path.write_text(json.dumps({"messages": MESSAGES}) + "\n\n" + '{"messages": [}\n')
    examples, report = build_sft_examples(read_records(path), phi_tok, max_length=128)
    assert len(examples) == 1 and report.problems == {"malformed": 1}  # skipped by default, as the docs say
    assert "line 3 is not valid JSON" in report.summary()
    with pytest.raises(ValueError, match="record 2: line 3 is not valid JSON.*--on-bad skip"):
        build_sft_examples(read_records(path), phi_tok, max_length=128, on_bad="error")
