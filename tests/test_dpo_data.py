"""Preference pairs in the shapes datasets store them, bad pairs counted or fatal, completion-only log-probs."""
from __future__ import annotations

import pytest
import torch

from phikit import build_model, get_config
from phikit.tokenizer import IM_END, build_phi_tokenizer, train_bpe
from phikit.train.chat_data import IGNORE_INDEX, add_chatml_tokens
from phikit.train.dpo import BadExample, build_pair_examples, collate_pairs, completion_logps, parse_preference


@pytest.fixture(scope="module")
def phi_tok():
    tok = build_phi_tokenizer()
    tok.add_chatml()
    return tok


def test_ultrafeedback_binarized_shape():
    record = {"prompt": "What is 2+2?",
              "chosen": [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4"}],
              "rejected": [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "5"}],
              "score_chosen": 9.0, "score_rejected": 2.0}
    assert parse_preference(record) == ([{"role": "user", "content": "What is 2+2?"}], "4", "5")


def test_conversational_and_plain_shapes_with_system():
    conv = {"prompt": [{"role": "user", "content": "Hi"}], "chosen": [{"role": "assistant", "content": "Hello"}],
            "rejected": [{"role": "assistant", "content": "Go away"}]}
    assert parse_preference(conv) == ([{"role": "user", "content": "Hi"}], "Hello", "Go away")
    orca = {"system": "Be kind.", "question": "Hi", "chosen": "Hello", "rejected": "Go away"}
    assert parse_preference(orca)[0] == [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Hi"}]
    msgs = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}],
            "chosen": "Hello", "rejected": "Go away"}
    assert parse_preference(msgs)[0] == [{"role": "user", "content": "Hi"}]


@pytest.mark.parametrize("record,kind", [
    ({"prompt": "q", "chosen": "same", "rejected": "same"}, "identical_pair"),
    ({"prompt": "q", "chosen": "a"}, "malformed"),
    ({"prompt": [{"role": "oracle", "content": "q"}], "chosen": "a", "rejected": "b"}, "unknown_role"),
    ({"chosen": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
      "rejected": [{"role": "user", "content": "other"}, {"role": "assistant", "content": "b"}]}, "prompt_mismatch"),
])
def test_bad_pairs_are_named(record, kind):
    with pytest.raises(BadExample) as err:
        parse_preference(record)
    assert err.value.kind == kind


def test_bad_pairs_counted_skipped_or_fatal(phi_tok):
    records = [{"prompt": "q", "chosen": "yes", "rejected": "no"}, {"prompt": "q", "chosen": "x", "rejected": "x"},
               {"prompt": "word " * 100, "chosen": "a", "rejected": "b"}]
    pairs, report = build_pair_examples(records, phi_tok, max_length=64)
    assert len(pairs) == 1 and report.problems == {"identical_pair": 1, "too_long": 1}
    with pytest.raises(ValueError, match="pair 2.*identical"):
        build_pair_examples(records, phi_tok, max_length=64, on_bad="error")


def test_labels_cover_the_answer_and_im_end(phi_tok):
    pairs, _ = build_pair_examples([{"prompt": "Say hi", "chosen": "Hi there!", "rejected": "No."}], phi_tok, 64)
    chosen = pairs[0].chosen
    assert phi_tok.decode([t for t in chosen.labels if t != IGNORE_INDEX]) == "Hi there!" + IM_END
    assert phi_tok.decode(chosen.input_ids).startswith("<|im_start|>user\nSay hi<|im_end|>\n<|im_start|>assistant\n")


def test_completion_logps_sum_only_the_answer_tokens():
    tok = train_bpe(["yes no maybe what why"] * 20, vocab_size=300, whitespace_tokens=False)
    model = build_model(get_config("tiny", vocab_size=320, hidden_size=32, intermediate_size=64,
                                   num_attention_heads=1, max_position_embeddings=64), seed=0).eval()
    add_chatml_tokens(model, tok)
    pairs, _ = build_pair_examples([{"prompt": "why", "chosen": "yes yes", "rejected": "no"}], tok, 64)
    batch = collate_pairs(pairs, tok.eos_token_id)
    with torch.no_grad():
        logps, counts = completion_logps(model, batch)
        for row, ex in enumerate([pairs[0].chosen, pairs[0].rejected]):
            full = torch.log_softmax(model(torch.tensor([ex.input_ids])).logits[0].double(), -1)
            expected = sum(full[t - 1, ex.labels[t]] for t in range(1, len(ex)) if ex.labels[t] != IGNORE_INDEX)
            assert float(logps[row]) == pytest.approx(float(expected), abs=1e-4)
            assert int(counts[row]) == ex.num_trained


def test_malformed_json_line_is_a_counted_bad_pair(phi_tok, tmp_path):
    from phikit.train.chat_data import read_records
    path = tmp_path / "pairs.jsonl"
    path.write_text('{"prompt": "q", "chosen": "yes", "rejected": "no"}\n{"prompt": "q", "chosen": \n')
    pairs, report = build_pair_examples(read_records(path), phi_tok, max_length=64)
    assert len(pairs) == 1 and report.problems == {"malformed": 1}
    with pytest.raises(ValueError, match="pair 2: line 2 is not valid JSON"):
        build_pair_examples(read_records(path), phi_tok, max_length=64, on_bad="error")


def test_precomputed_reference_matches_the_policy_at_the_start_under_bf16():
    from phikit.train.dpo import make_dpo_loss_fn, precompute_reference
    tok = train_bpe(["yes no maybe what why"] * 20, vocab_size=300, whitespace_tokens=False)
    model = build_model(get_config("tiny", vocab_size=320, hidden_size=32, intermediate_size=64,
                                   num_attention_heads=1, max_position_embeddings=64), seed=0).eval()
    add_chatml_tokens(model, tok)
    records = [{"prompt": "why " * k, "chosen": "yes " * (k + 1), "rejected": "no maybe"} for k in range(1, 5)]
    pairs, _ = build_pair_examples(records, tok, 64)
    precompute_reference(model, pairs, 4, tok.eos_token_id, precision="bf16")
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):  # how the Trainer runs a bf16 step
        _, metrics = make_dpo_loss_fn("precompute")(model, collate_pairs(pairs, tok.eos_token_id))
    # Unchanged policy = reference: every reward is exactly 0 (an fp32 reference is off by bf16 rounding).
    assert metrics["rewards/chosen"] == 0 and metrics["rewards/rejected"] == 0
