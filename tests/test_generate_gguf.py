"""GGUF export, read back with the gguf package's own reader and run through transformers' Phi model, and run by
llama.cpp itself (llama-cpp-python) when it is installed."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from phikit import build_model, get_config
from phikit.inference.gguf_export import export_gguf
from phikit.tokenizer import train_bpe

gguf = pytest.importorskip("gguf")


@pytest.fixture(scope="module")
def tokenizer():
    # A small BPE (with phi's whitespace-run tokens) keeps the file small: gguf's reader parses every string.
    text = ["def fib(n):\n    return n if n < 2 else fib(n - 1) + fib(n - 2)\n", "the quick brown fox jumps"] * 20
    return train_bpe(text, vocab_size=320)


@pytest.fixture(scope="module")
def model(tokenizer):
    config = get_config("tiny", hidden_size=64, intermediate_size=256, vocab_size=512,
                        tokenizer_vocab_size=len(tokenizer))
    return build_model(config, seed=3).eval()


def _state_from_gguf(path, model):
    """Our tensor names -> dequantized tensors, through gguf's reader and its phi2 name map."""
    reader = gguf.GGUFReader(path)
    tensors = {t.name: t for t in reader.tensors}
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.PHI2, model.config.num_hidden_layers)
    state = {}
    for name, ref in model.state_dict().items():
        t = tensors[names.get_name(name, try_suffixes=(".weight", ".bias"))]
        state[name] = torch.from_numpy(np.array(gguf.quants.dequantize(t.data, t.tensor_type))).reshape(ref.shape)
    return reader, state


@pytest.mark.parametrize("dtype,tolerance", [("f32", 1e-5), ("f16", 2e-2), ("q8_0", 5e-2), ("q4_0", 0.5)])
def test_gguf_round_trip_gives_the_same_logits_in_transformers(model, tokenizer, tmp_path, dtype, tolerance):
    transformers = pytest.importorskip("transformers")
    path = export_gguf(model, tokenizer, tmp_path / f"tiny-{dtype}.gguf", dtype=dtype)
    reader, state = _state_from_gguf(path, model)
    f = reader.fields
    assert bytes(f["general.architecture"].parts[-1]).decode() == "phi2"
    assert int(f["phi2.rope.dimension_count"].parts[-1][0]) == model.config.rotary_dim
    assert int(f["phi2.block_count"].parts[-1][0]) == model.config.num_hidden_layers
    tokens = [bytes(f["tokenizer.ggml.tokens"].parts[i]).decode() for i in f["tokenizer.ggml.tokens"].data]
    assert len(tokens) == model.config.vocab_size
    assert tokens[tokenizer.eos_token_id] == "<|endoftext|>" and tokens[tokenizer.token_to_id("  ")] == "  "
    assert tokens[-1].startswith("[PAD")  # embedding rows past the tokenizer
    assert int(f["tokenizer.ggml.eos_token_id"].parts[-1][0]) == tokenizer.eos_token_id

    ref = transformers.PhiForCausalLM(transformers.PhiConfig(**model.config.to_hf_dict())).eval()
    ref.load_state_dict(state, strict=False)
    ids = torch.tensor([tokenizer.encode("def fib(n):\n    return")])
    with torch.no_grad():
        expected, got = model(ids).logits, ref(ids).logits
    real = len(tokenizer)
    assert (got[..., :real] - expected[..., :real]).abs().max().item() < tolerance
    assert got[..., real:].max().item() < -1e8  # padding rows carry a -1e9 bias: never sampled
    assert not path.with_name(path.name + ".tmp").exists()


def test_gguf_export_refuses_bad_input(model, tokenizer, tmp_path):
    with pytest.raises(ValueError, match="dtype"):
        export_gguf(model, tokenizer, tmp_path / "m.gguf", dtype="q3_k")
    with pytest.raises(ValueError, match=".gguf"):
        export_gguf(model, tokenizer, tmp_path / "m.bin")


def test_gguf_block_types_refuse_rows_not_a_multiple_of_32(tokenizer, tmp_path):
    """q8_0 and q4_0 quantize rows in blocks of 32: a model with other widths is refused in one line naming the
    tensor and the types that fit, before anything is written; f16 still exports it."""
    config = get_config("tiny", hidden_size=64, intermediate_size=240, num_hidden_layers=1, vocab_size=len(tokenizer),
                        tokenizer_vocab_size=len(tokenizer))
    odd = build_model(config, seed=0).eval()
    for dtype in ("q8_0", "q4_0"):
        with pytest.raises(ValueError, match="fc2.weight has rows of 240: export this model with dtype f16") as err:
            export_gguf(odd, tokenizer, tmp_path / f"odd-{dtype}.gguf", dtype=dtype)
        assert "\n" not in str(err.value)
    assert list(tmp_path.iterdir()) == []
    assert export_gguf(odd, tokenizer, tmp_path / "odd-f16.gguf", dtype="f16").exists()


LLAMA_TEXTS = ["def f(x):\n        return  x\t+ 1\n\n\n",
               "Alice: h\u00e9llo w\u00f6rld \U0001f642 \u65e5\u672c\u8a9e\nBob:",
               "<|endoftext|>Instruct: add 2 and 3.<|endoftext|>", "   spaces before and after   ", "it's 12345 don't"]


# f32 is not exact: llama.cpp's GELU reads an fp16 table (3.8e-4 of the largest logit here).
@pytest.mark.parametrize("dtype,tolerance", [("f32", 2e-3), ("bf16", 2e-2), ("q8_0", 5e-2)])
def test_llama_cpp_runs_the_export_like_phikit(phi_tokenizer, tmp_path, dtype, tolerance):
    """llama.cpp is the reference here: it must tokenize as we do, give our logits, and decode our greedy tokens,
    never producing a padding row (a random model favours them as often as any other)."""
    llama_cpp = pytest.importorskip("llama_cpp", reason="pip install llama-cpp-python to run GGUF exports here")
    from phikit.inference.decoding import complete
    # A wide init spread makes greedy choices decisive: no near-tie for rounding on another CPU to flip.
    config = get_config("tiny", vocab_size=51200, tokenizer_vocab_size=len(phi_tokenizer), initializer_range=0.1)
    model = build_model(config, seed=0).eval()
    path = export_gguf(model, phi_tokenizer, tmp_path / f"phi-tiny-{dtype}.gguf", dtype=dtype)
    # An f32 KV cache (llama.cpp's default is f16) keeps the f32 comparison about the weights alone.
    llm = llama_cpp.Llama(str(path), n_ctx=256, n_threads=2, logits_all=True, verbose=False,
                          type_k=llama_cpp.GGML_TYPE_F32, type_v=llama_cpp.GGML_TYPE_F32)
    try:
        for text in LLAMA_TEXTS:
            assert llm.tokenize(text.encode(), add_bos=False, special=True) == phi_tokenizer.encode(text), text
        prompt = phi_tokenizer.encode("def fib(n):\n    return")
        llm.eval(prompt)
        got = torch.tensor(np.array(llm.scores[:len(prompt)]))
        with torch.no_grad():
            expected = model(torch.tensor([prompt])).logits[0]
        real = len(phi_tokenizer)
        error = (got[:, :real] - expected[:, :real]).abs().max() / expected[:, :real].abs().max()
        assert error.item() < tolerance  # relative to the largest logit
        if dtype == "f32":
            ours = complete(model, phi_tokenizer, [prompt], max_new_tokens=24, stop_token_ids=[])[0].token_ids
            llm.reset()
            theirs = []
            for token in llm.generate(prompt, temp=0.0, top_k=1, reset=True):
                theirs.append(token)
                if len(theirs) == len(ours):
                    break
            assert theirs == ours and max(theirs) < real
    finally:
        llm.close()


def test_llama_cpp_renders_and_ends_chatml_like_phikit(phi_tokenizer, tmp_path):
    """An instruction-tuned (ChatML) export: llama.cpp renders the GGUF's chat template to our prompt, tokenizes
    <|im_start|>/<|im_end|> to our ids and ends a turn at <|im_end|>."""
    llama_cpp = pytest.importorskip("llama_cpp", reason="pip install llama-cpp-python to run GGUF exports here")
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter
    from phikit.inference.decoding import chat_prompt
    from phikit.tokenizer import Tokenizer
    from phikit.train.chat_data import add_chatml_tokens
    tokenizer = Tokenizer(phi_tokenizer.backend.__class__.from_str(phi_tokenizer.backend.to_str()))
    model = build_model(get_config("tiny", vocab_size=51200, tokenizer_vocab_size=len(tokenizer)), seed=0).eval()
    im_start, im_end = add_chatml_tokens(model, tokenizer)
    path = export_gguf(model, tokenizer, tmp_path / "chat.gguf", dtype="f32")
    llm = llama_cpp.Llama(str(path), n_ctx=256, n_threads=2, verbose=False)
    try:
        messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+3?"}]
        ours, _, _ = chat_prompt(tokenizer, messages)
        rendered = Jinja2ChatFormatter(llm.metadata["tokenizer.chat_template"], eos_token="<|endoftext|>",
                                       bos_token="<|endoftext|>")(messages=messages).prompt
        assert rendered == ours
        assert llm.tokenize(ours.encode(), add_bos=False, special=True) == tokenizer.encode(ours)
        vocab = llama_cpp.llama_model_get_vocab(llm.model)
        assert llama_cpp.llama_vocab_is_eog(vocab, im_end) and not llama_cpp.llama_vocab_is_eog(vocab, im_start)
    finally:
        llm.close()


def test_llama_cpp_tokenizes_a_trained_bpe_like_phikit(model, tokenizer, tmp_path):
    """Models of one's own come with a BPE trained by phikit (train_bpe): llama.cpp splits text as it does."""
    llama_cpp = pytest.importorskip("llama_cpp", reason="pip install llama-cpp-python to run GGUF exports here")
    path = export_gguf(model, tokenizer, tmp_path / "own.gguf", dtype="f32")
    llm = llama_cpp.Llama(str(path), n_ctx=128, n_threads=2, verbose=False)
    try:
        for text in LLAMA_TEXTS + ["def fib(n):\n    return n if n < 2 else fib(n - 1)", "the  quick\n\n\nfox"]:
            assert llm.tokenize(text.encode(), add_bos=False, special=True) == tokenizer.encode(text), text
    finally:
        llm.close()
