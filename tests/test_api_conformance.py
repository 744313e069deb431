"""The public surface DESIGN.md promises (section 2), called the way a user calls it, on a tiny random model with
the real phi tokenizer."""
from __future__ import annotations

import inspect
import json

import pytest
import torch

import phikit
from phikit.cli import main as cli_main

VERBS = ["generate", "chat", "serve", "convert", "tokenizer", "data", "train", "sft", "dpo", "eval", "bench",
         "speedrun"]
PROMPT = "def add(a, b):"


@pytest.fixture(scope="module")
def loaded(tiny_phi_checkpoint):
    return phikit.load(tiny_phi_checkpoint)


def test_load_signature_and_result(loaded):
    params = inspect.signature(phikit.load).parameters
    assert list(params)[:3] == ["path_or_repo_id", "device", "dtype"]
    assert params["device"].default == "cpu" and params["dtype"].default is None
    model, tok = loaded
    assert isinstance(model, phikit.PhiForCausalLM) and isinstance(tok, phikit.Tokenizer)
    assert next(model.parameters()).dtype == torch.float32
    assert tok.encode("This is a test.") == [1212, 318, 257, 1332, 13] and tok.encode("  ") == [50286]


def test_save_is_hf_native_and_transformers_loads_it(tiny_phi_checkpoint, loaded):
    from transformers import PhiForCausalLM
    files = {p.name for p in tiny_phi_checkpoint.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= files
    assert json.loads((tiny_phi_checkpoint / "config.json").read_text())["model_type"] == "phi"
    ref = PhiForCausalLM.from_pretrained(tiny_phi_checkpoint).eval()
    ids = torch.tensor([loaded[1].encode(PROMPT)])
    with torch.no_grad():
        torch.testing.assert_close(loaded[0](ids).logits, ref(ids).logits, atol=1e-4, rtol=1e-4)


def test_model_call_keywords(loaded):
    model, tok = loaded
    ids = torch.tensor([tok.encode(PROMPT)])
    plain = model(ids)
    assert plain.logits.shape == (1, ids.shape[1], 51200)
    out = model(ids, attention_mask=torch.ones_like(ids), position_ids=None, inputs_embeds=None,
                past_key_values=None, use_cache=True, output_hidden_states=True, output_attentions=True)
    n = model.config.num_hidden_layers
    assert len(out.hidden_states) == n + 1 and len(out.attentions) == n and out.past_key_values is not None
    embeds = model.get_input_embeddings()(ids)
    torch.testing.assert_close(model(inputs_embeds=embeds).logits, plain.logits)


def test_generate_forms_and_keywords(loaded):
    model, tok = loaded
    one = phikit.generate(model, tok, PROMPT, max_new_tokens=6)
    assert isinstance(one, str) and not one.startswith(PROMPT)  # the continuation only
    both = phikit.generate(model, tok, [PROMPT, "Hello there, a longer prompt"], max_new_tokens=6)
    assert isinstance(both, list) and both[0] == one
    sampling = dict(max_new_tokens=6, temperature=0.9, top_k=40, top_p=0.9, min_p=0.01, repetition_penalty=1.1,
                    seed=7, stop=["\n\n"])
    assert phikit.generate(model, tok, PROMPT, **sampling) == phikit.generate(model, tok, PROMPT, **sampling)
    assert isinstance(phikit.generate(model, tok, PROMPT, max_new_tokens=4, num_beams=2), str)
    assert "".join(phikit.stream(model, tok, PROMPT, max_new_tokens=6)) == one


def test_padding_rows_are_never_sampled(loaded):
    model, tok = loaded
    bias = model.lm_head.bias.detach().clone()
    try:
        with torch.no_grad():
            model.lm_head.bias[len(tok):] = 1e4  # rows 50295..51199 would win every step
        out = phikit.generate(model, tok, PROMPT, max_new_tokens=4, temperature=1.0, seed=0, return_logprobs=True)
        assert all(i < len(tok) for i in out.token_ids)
    finally:
        with torch.no_grad():
            model.lm_head.bias.copy_(bias)


def test_chat_renders_chatml_for_instruction_tuned_tokenizers(phi_tokenizer):
    from tokenizers import Tokenizer as Backend

    from phikit.inference.decoding import chat_prompt
    tok = phikit.Tokenizer(Backend.from_str(phi_tokenizer.backend.to_str()))  # a copy: the fixture is shared
    tok.add_chatml()
    messages = [{"role": "system", "content": "S"}, {"role": "user", "content": "Hi"}]
    prompt, _, _ = chat_prompt(tok, messages)
    assert prompt == "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    model = phikit.build_model(phikit.get_config("tiny", vocab_size=51200, tokenizer_vocab_size=len(tok)), seed=0)
    assert isinstance(phikit.chat(model, tok, messages, max_new_tokens=4), str)


def test_load_int8(tiny_phi_checkpoint):
    model, tok = phikit.load(tiny_phi_checkpoint, quantize="int8")
    assert getattr(model, "quantized", None) == "int8"
    assert isinstance(phikit.generate(model, tok, PROMPT, max_new_tokens=3), str)


def test_every_verb_has_help_with_an_example(capsys):
    assert cli_main(["--help"]) == 0
    listing = capsys.readouterr().out
    for verb in VERBS:
        assert f"\n    {verb}" in listing
        assert cli_main([verb, "--help"]) == 0
        assert "example" in capsys.readouterr().out.lower(), verb
