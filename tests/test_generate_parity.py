"""Decoding against transformers' generate: greedy (batched, left-padded), beam search, logprobs."""
from __future__ import annotations

import copy

import pytest
import torch

from phikit import build_model, get_config
from phikit.inference.decoding import complete, generate

transformers = pytest.importorskip("transformers")

PROMPTS = ["def fibonacci(n):", "The capital of France is a city that", "x"]
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


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


def _check_greedy_equals_transformers(ours, ref, tokenizer, prompts, device, compile):
    ids, mask = (t.to(device) for t in _left_padded(tokenizer, prompts))
    out = ref.generate(ids, attention_mask=mask, max_new_tokens=24, do_sample=False, num_beams=1,
                       pad_token_id=tokenizer.eos_token_id, eos_token_id=None, output_logits=True,
                       return_dict_in_generate=True)
    expected = out.sequences[:, ids.shape[1]:]
    got = complete(ours, tokenizer, prompts, max_new_tokens=24, stop_token_ids=[], return_logprobs=True,
                   compile=compile)
    for row, completion in enumerate(got):
        assert completion.token_ids == expected[row].tolist()
        assert completion.finish_reason == "length"
        assert completion.text == tokenizer.decode(expected[row].tolist())
        ref_logprobs = torch.stack([torch.log_softmax(step[row].float(), -1)[tok]
                                    for step, tok in zip(out.logits, expected[row])]).cpu()
        torch.testing.assert_close(torch.tensor(completion.logprobs), ref_logprobs, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("compile", [False, True], ids=["eager", "compiled"])
def test_greedy_batched_left_padded_equals_transformers(models, phi_tokenizer, compile, device):
    """compile=True decodes through torch.compile over a fixed-shape cache: the same tokens and logprobs (on the
    CPU, and on CUDA where there is a GPU)."""
    ours, ref = models
    if device != "cpu":
        ours, ref = copy.deepcopy(ours).to(device), copy.deepcopy(ref).to(device)
    _check_greedy_equals_transformers(ours, ref, phi_tokenizer, PROMPTS, device, compile)


@pytest.mark.parametrize("device", DEVICES)
def test_compiled_decoding_reuses_kept_caches(models, phi_tokenizer, device, monkeypatch):
    """Compiled decoding on CUDA keeps one cache per batch size and capacity on the model (CUDA graphs replay
    fixed addresses); the next call of that shape takes it, zeroed, and still equals transformers, although the
    cache holds the last call's keys and values (shorter prompts: stale columns sit where the mask must hide
    them). Kept on the CPU too here, to test the bookkeeping without a GPU."""
    import phikit.inference.decoding as generate_module

    ours, ref = copy.deepcopy(models[0]).to(device), copy.deepcopy(models[1]).to(device)
    monkeypatch.setattr(generate_module, "_keeps_static_caches", lambda device: True)
    _check_greedy_equals_transformers(ours, ref, phi_tokenizer, PROMPTS, device, compile=True)
    kept = dict(ours.__dict__["_static_decode_caches"])
    assert len(kept) == 1
    shorter = ["def f(x):", "A", "Once upon"]
    _check_greedy_equals_transformers(ours, ref, phi_tokenizer, shorter, device, compile=True)
    assert ours.__dict__["_static_decode_caches"] == kept  # the same cache object, taken and given back
    generate_module.free_decode_caches(ours)
    assert "_static_decode_caches" not in ours.__dict__


@pytest.mark.parametrize("compile", [False, True], ids=["eager", "compiled"])
def test_greedy_from_input_embeddings_equals_transformers(models, phi_tokenizer, compile):
    """Prompts given as input embeddings (soft prompts, a prefix from another model): a batch of different lengths
    decodes as transformers' generate(inputs_embeds=...), left-padded, tokens and logprobs."""
    ours, ref = models
    ids, mask = _left_padded(phi_tokenizer, PROMPTS)
    noise = torch.randn(ids.shape + (ours.config.hidden_size,), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():  # near the tokens' embeddings, but no token's: what a learned soft prompt looks like
        embeds = ref.model.embed_tokens(ids) + 0.05 * noise
    out = ref.generate(inputs_embeds=embeds, attention_mask=mask, max_new_tokens=16, do_sample=False, num_beams=1,
                       pad_token_id=phi_tokenizer.eos_token_id, eos_token_id=None, output_logits=True,
                       return_dict_in_generate=True)
    rows = [embeds[i, mask[i].bool()] for i in range(len(PROMPTS))]
    got = complete(ours, phi_tokenizer, rows, max_new_tokens=16, stop_token_ids=[], return_logprobs=True,
                   compile=compile)
    for row, completion in enumerate(got):
        assert completion.token_ids == out.sequences[row].tolist()
        assert completion.prompt_tokens == len(rows[row])
        ref_logprobs = torch.stack([torch.log_softmax(step[row].float(), -1)[tok]
                                    for step, tok in zip(out.logits, out.sequences[row])])
        torch.testing.assert_close(torch.tensor(completion.logprobs), ref_logprobs, atol=1e-4, rtol=1e-4)


def test_input_embeddings_of_the_prompt_tokens_continue_as_the_text(models, phi_tokenizer):
    ours, _ = models
    with torch.no_grad():
        embeds = ours.model.embed_tokens(torch.tensor(phi_tokenizer.encode(PROMPTS[0])))
    assert generate(ours, phi_tokenizer, embeds, max_new_tokens=12) == generate(ours, phi_tokenizer, PROMPTS[0],
                                                                                max_new_tokens=12)
    for bad, message in [(dict(prompt_or_prompts=[embeds, "text"]), "mix text and input embeddings"),
                         (dict(prompt_or_prompts=embeds[:, :5]), r"float \[tokens, 64\]"),
                         (dict(prompt_or_prompts=embeds, num_beams=2), "without beams"),
                         (dict(prompt_or_prompts=embeds, prompt_lookup=4), "without beams or prompt lookup")]:
        with pytest.raises(ValueError, match=message):
            generate(ours, phi_tokenizer, max_new_tokens=4, **bad)


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



@pytest.mark.parametrize("guesses,passes", [("right", 6), ("wrong", 40), ("four right", 9)])
def test_prompt_lookup_keeps_the_guesses_greedy_decoding_agrees_with(models, phi_tokenizer, monkeypatch, guesses,
                                                                      passes):
    """prompt_lookup feeds up to 8 guessed tokens with the last one and keeps the guesses the model's argmax
    agrees with: whatever the guesses, the tokens and logprobs are transformers' greedy ones, and each pass
    yields the guesses taken plus one, and asks for fewer guesses after a miss. Here the guesser is an oracle that knows the answer (right), misses every
    token (wrong), or knows the next four; the lookup itself is tested below. Passes for 40 tokens: the prompt's,
    then 9 tokens each (right), 1 (wrong) or 5 (four right)."""
    import phikit.inference.decoding as generation
    ours, ref = models
    prompt = phi_tokenizer.encode(PROMPTS[1])
    ids = torch.tensor([prompt])
    expected = ref.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=40, do_sample=False,
                            num_beams=1, pad_token_id=0, eos_token_id=None)[0, len(prompt):].tolist()

    requested = []

    def oracle(text_ids, max_tokens, longest_ngram=3, shortest_ngram=2):
        requested.append(max_tokens)
        assert text_ids[:len(prompt)] == prompt and text_ids[len(prompt):] == expected[:len(text_ids) - len(prompt)]
        answer = expected[len(text_ids) - len(prompt):][:max_tokens]
        if guesses == "wrong":
            return [(t + 1) % 50000 for t in answer]
        if guesses == "four right":
            return answer[:4] + [(t + 1) % 50000 for t in answer[4:]]
        return answer

    monkeypatch.setattr(generation, "_lookup_draft", oracle)
    plain = complete(ours, phi_tokenizer, [prompt], max_new_tokens=40, stop_token_ids=[], return_logprobs=True)[0]
    calls = []
    hook = ours.register_forward_hook(lambda *_: calls.append(1))
    try:
        got = complete(ours, phi_tokenizer, [prompt], max_new_tokens=40, stop_token_ids=[], return_logprobs=True,
                       prompt_lookup=8)[0]
    finally:
        hook.remove()
    assert got.token_ids == expected and got.finish_reason == "length"
    assert got.text == phi_tokenizer.decode(expected)
    torch.testing.assert_close(torch.tensor(got.logprobs), torch.tensor(plain.logprobs), atol=1e-4, rtol=1e-4)
    assert len(calls) == passes
    # A pass that keeps no guess halves the next guess; one that keeps them all doubles it back (up to 8); the
    # right oracle's fifth pass asks only for what is left of the 40 tokens.
    assert requested[:5] == {"right": [8, 8, 8, 8, 2], "wrong": [8, 4, 2, 1, 1], "four right": [8] * 5}[guesses]


def test_prompt_lookup_guesses_what_followed_the_latest_match():
    from phikit.inference.decoding import _lookup_draft
    assert _lookup_draft([5, 1, 2, 3, 9, 8, 7, 1, 2, 3], 2) == [9, 8]  # the 3-gram [1, 2, 3] seen before
    assert _lookup_draft([1, 2, 4, 1, 2, 6, 1, 2], 3) == [6, 1, 2]  # no 3-gram match; the latest [1, 2]
    assert _lookup_draft([1, 2, 4, 1, 2, 6, 2], 3) == []  # one matching token is not enough
    assert _lookup_draft([1, 2, 3, 4], 5) == []  # nothing repeats
    assert _lookup_draft([7, 7, 7, 7], 2) == [7]  # the latest earlier [7, 7, 7] is followed by one token
    assert _lookup_draft([1, 2, 1, 2], 0) == []


def test_prompt_lookup_stops_and_streams_as_plain_decoding(models, phi_tokenizer):
    """Stop strings and stop tokens end a row where plain greedy decoding ends it, with a batch of prompts (decoded
    one after the other); streaming joins to the same text; a repetition penalty sees the same tokens; bad
    combinations are one-line errors."""
    from phikit.inference.decoding import stream
    ours, _ = models
    prompts = PROMPTS + ["the cat sat on the mat. the cat sat on the mat. the cat sat on the"]
    free = complete(ours, phi_tokenizer, prompts, max_new_tokens=20, stop_token_ids=[])
    stop_id = free[0].token_ids[6]
    stop_text = phi_tokenizer.decode(free[1].token_ids[3:5])
    kw = dict(max_new_tokens=20, stop_token_ids=[stop_id], stop=[stop_text])
    plain = complete(ours, phi_tokenizer, prompts, **kw)
    looked = complete(ours, phi_tokenizer, prompts, prompt_lookup=5, **kw)
    assert [(c.text, c.token_ids, c.finish_reason) for c in looked] == \
        [(c.text, c.token_ids, c.finish_reason) for c in plain]
    assert plain[0].finish_reason == plain[1].finish_reason == "stop"
    assert "".join(stream(ours, phi_tokenizer, prompts[3], prompt_lookup=5, **kw)) == plain[3].text
    penalized = dict(max_new_tokens=20, stop_token_ids=[], repetition_penalty=1.3)  # seen tokens grow with guesses
    assert [c.token_ids for c in complete(ours, phi_tokenizer, prompts, prompt_lookup=5, **penalized)] == \
        [c.token_ids for c in complete(ours, phi_tokenizer, prompts, **penalized)]
    for bad, message in [(dict(temperature=0.7), "temperature=0"), (dict(compile=True), "eagerly"),
                         (dict(num_beams=2), "eagerly"), (dict(prompt_lookup=-1), ">= 0")]:
        with pytest.raises(ValueError, match=message) as err:
            complete(ours, phi_tokenizer, prompts[:1], **{"prompt_lookup": 4, **bad})
        assert "\n" not in str(err.value)
