"""Decoding against transformers' generate: greedy (batched, left-padded), beam search, logprobs."""
from __future__ import annotations

import pytest
import torch

from phikit import build_model, get_config
from phikit.generate import complete

transformers = pytest.importorskip("transformers")

PROMPTS = ["def fibonacci(n):", "The capital of France is a city that", "x"]


@pytest.fixture(scope="module")
def models(phi_tokenizer):
    # Embedding as large as the tokenizer (no padding rows, which transformers would not mask), and a wider init
    # than usual so greedy choices are not near-ties that float rounding could flip.
    config = get_config("tiny", hidden_size=64, intermediate_size=256, vocab_size=len(phi_tokenizer),
                        initializer_range=0.1, eos_token_id=phi_tokenizer.eos_token_id)
    ours = build_model(config, seed=1).eval()
    ref = transformers.PhiForCausalLM(transformers.PhiConfig(**config.to_hf_dict())).eval()
    ref.load_state_dict(ours.state_dict(), strict=False)
    return ours, ref


def _left_padded(tokenizer, prompts):
    rows = tokenizer.encode_batch(prompts)
    width = max(map(len, rows))
    ids = torch.tensor([[tokenizer.eos_token_id] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    return ids, mask


@pytest.mark.parametrize("compile", [False, True], ids=["eager", "compiled"])
def test_greedy_batched_left_padded_equals_transformers(models, phi_tokenizer, compile):
    """compile=True decodes through torch.compile over a fixed-shape cache: the same tokens and logprobs."""
    ours, ref = models
    ids, mask = _left_padded(phi_tokenizer, PROMPTS)
    out = ref.generate(ids, attention_mask=mask, max_new_tokens=24, do_sample=False, num_beams=1,
                       pad_token_id=phi_tokenizer.eos_token_id, eos_token_id=None, output_logits=True,
                       return_dict_in_generate=True)
    expected = out.sequences[:, ids.shape[1]:]
    got = complete(ours, phi_tokenizer, PROMPTS, max_new_tokens=24, stop_token_ids=[], return_logprobs=True,
                   compile=compile)
    for row, completion in enumerate(got):
        assert completion.token_ids == expected[row].tolist()
        assert completion.finish_reason == "length"
        assert completion.text == phi_tokenizer.decode(expected[row].tolist())
        ref_logprobs = torch.stack([torch.log_softmax(step[row].float(), -1)[tok]
                                    for step, tok in zip(out.logits, expected[row])])
        torch.testing.assert_close(torch.tensor(completion.logprobs), ref_logprobs, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("length_penalty,early_stopping",
                         [(1.0, False), (0.5, True), (2.0, "never"), (-1.0, False)])
def test_beam_search_equals_transformers(models, phi_tokenizer, length_penalty, early_stopping):
    ours, ref = models
    prompt = PROMPTS[0]
    ids = torch.tensor([phi_tokenizer.encode(prompt)])
    kwargs = dict(attention_mask=torch.ones_like(ids), max_new_tokens=16, do_sample=False, num_beams=4)
    # The stop token is one the best beam picks on its own (its 6th token), so hypotheses finish early and the
    # finished-hypothesis bookkeeping and each early-stopping rule are exercised.
    free = ref.generate(ids, eos_token_id=None, pad_token_id=0, **kwargs)[0, ids.shape[1]:].tolist()
    stop_id = free[5]
    out = ref.generate(ids, length_penalty=length_penalty, early_stopping=early_stopping, eos_token_id=stop_id,
                       pad_token_id=stop_id, **kwargs)
    expected = out[0, ids.shape[1]:].tolist()
    if stop_id in expected:
        expected = expected[:expected.index(stop_id)]
    got = complete(ours, phi_tokenizer, [prompt], max_new_tokens=16, num_beams=4, length_penalty=length_penalty,
                   early_stopping=early_stopping, stop_token_ids=[stop_id])[0]
    assert got.token_ids == expected
    assert got.text == phi_tokenizer.decode(expected)
    assert got.finish_reason == ("stop" if len(expected) < 16 else "length")


def test_beam_search_without_stops_equals_transformers(models, phi_tokenizer):
    ours, ref = models
    ids = torch.tensor([phi_tokenizer.encode(PROMPTS[1])])
    out = ref.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False, num_beams=3,
                       eos_token_id=None, pad_token_id=0)
    got = complete(ours, phi_tokenizer, [PROMPTS[1]], max_new_tokens=12, num_beams=3, stop_token_ids=[])[0]
    assert got.token_ids == out[0, ids.shape[1]:].tolist()
    assert got.finish_reason == "length"
