"""Decoding behaviour: seeds, stop strings, streaming, padding rows, quantization, bad input."""
from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

from phikit import build_model, get_config
from phikit.inference.decoding import complete, generate, stream
from phikit.inference.sampling import SamplingParams, sample_next
from phikit.inference import native
from phikit.inference.quant import BLOCK_ROWS, CpuLinear, prepare_cpu_linears, quantize_model

KERNELS = pytest.mark.skipif(native.extension() is None, reason="the C++ kernels cannot be built here")


@pytest.fixture(scope="module")
def model(phi_tokenizer):
    # 51200 embedding rows for a 50295-token tokenizer, as the released phi models have.
    config = get_config("tiny", hidden_size=64, intermediate_size=256, vocab_size=51200,
                        tokenizer_vocab_size=len(phi_tokenizer), initializer_range=0.1,
                        eos_token_id=phi_tokenizer.eos_token_id, max_position_embeddings=128)
    return build_model(config, seed=2).eval()


def test_sampling_is_reproducible_by_seed(model, phi_tokenizer):
    kw = dict(max_new_tokens=8, temperature=1.0, top_k=50, top_p=0.95, min_p=0.01, stop_token_ids=[])
    first = generate(model, phi_tokenizer, ["Once upon a time", "def f(x):"], seed=7, **kw)
    again = generate(model, phi_tokenizer, ["Once upon a time", "def f(x):"], seed=7, **kw)
    other = generate(model, phi_tokenizer, ["Once upon a time", "def f(x):"], seed=8, **kw)
    assert first == again
    assert first != other
    greedy = generate(model, phi_tokenizer, "Once upon a time", max_new_tokens=16, stop_token_ids=[])
    assert generate(model, phi_tokenizer, "Once upon a time", max_new_tokens=16, top_k=1, temperature=1.0,
                    seed=3, stop_token_ids=[]) == greedy  # top_k=1 sampling is greedy


def test_stop_string_is_cut_exactly_across_token_boundaries(model, phi_tokenizer):
    prompt = "Alice was beginning to get very tired"
    full = complete(model, phi_tokenizer, [prompt], max_new_tokens=24, stop_token_ids=[])[0]
    # A stop string that starts inside one token and ends inside a later one.
    pieces = [phi_tokenizer.decode([t]) for t in full.token_ids]
    start = len(pieces[0]) + len(pieces[1]) - 1
    stop = full.text[start:start + len(pieces[2]) + 2]
    assert len(stop) >= 3
    cut = complete(model, phi_tokenizer, [prompt], max_new_tokens=24, stop=[stop], stop_token_ids=[])[0]
    assert cut.text == full.text[:full.text.index(stop)]
    assert cut.finish_reason == "stop"
    assert cut.token_ids == full.token_ids[:len(cut.token_ids)] and len(cut.token_ids) < len(full.token_ids)


def test_stop_token_ends_the_row_and_is_not_printed(model, phi_tokenizer):
    full = complete(model, phi_tokenizer, ["a", "bc def"], max_new_tokens=12, stop_token_ids=[])
    stop_id = full[0].token_ids[4]
    got = complete(model, phi_tokenizer, ["a", "bc def"], max_new_tokens=12, stop_token_ids=[stop_id])
    first = full[0].token_ids.index(stop_id)
    assert got[0].token_ids == full[0].token_ids[:first] and got[0].finish_reason == "stop"
    # The other row is unaffected by its neighbour finishing (unless it meets the same token).
    if stop_id not in full[1].token_ids:
        assert got[1].token_ids == full[1].token_ids and got[1].finish_reason == "length"


def test_streaming_joins_to_the_non_streaming_output(model, phi_tokenizer):
    for kw in (dict(), dict(stop=["e"]), dict(temperature=0.9, seed=5)):
        text = generate(model, phi_tokenizer, "The weather", max_new_tokens=20, stop_token_ids=[], **kw)
        deltas = list(stream(model, phi_tokenizer, "The weather", max_new_tokens=20, stop_token_ids=[], **kw))
        assert "".join(deltas) == text
        assert all(deltas)


def test_sample_next_samples_the_given_distribution():
    probs = torch.tensor([0.5, 0.25, 0.15, 0.1, 0.0])
    logits = probs.log().expand(40000, 5)
    ids = sample_next(logits, SamplingParams(temperature=1.0), torch.Generator().manual_seed(0))
    freq = torch.bincount(ids, minlength=5).float() / len(ids)
    assert freq[4] == 0  # a masked token is never drawn
    assert torch.allclose(freq, probs, atol=0.01)
    again = sample_next(logits[:8], SamplingParams(temperature=1.0), torch.Generator().manual_seed(0))
    assert again.tolist() == ids[:8].tolist()  # a seed reproduces its draws


def test_padding_rows_are_never_produced(model, phi_tokenizer):
    boosted = build_model(model.config, seed=2).eval()
    with torch.no_grad():
        boosted.lm_head.bias[len(phi_tokenizer):] = 100.0  # padding rows would win every argmax and sample
    for kw in (dict(), dict(temperature=1.0, seed=0), dict(num_beams=2)):
        got = complete(boosted, phi_tokenizer, ["hello"], max_new_tokens=8, stop_token_ids=[], **kw)[0]
        assert got.token_ids and max(got.token_ids) < len(phi_tokenizer)


def test_int8_and_int4_decode_close_to_fp32(model, phi_tokenizer):
    prompts = ["def add(a, b):", "Once upon a time"]
    fp32 = complete(model, phi_tokenizer, prompts, max_new_tokens=8, stop_token_ids=[], return_logprobs=True)
    for mode in ("int8", "int8-weight-only", "int4"):
        q = quantize_model(build_model(model.config, seed=2).eval(), mode)
        assert q.quantized == mode
        got = complete(q, phi_tokenizer, prompts, max_new_tokens=8, stop_token_ids=[], return_logprobs=True)
        # First tokens follow the same prompt; the quantized model's logprob of it stays close.
        for a, b in zip(fp32, got):
            assert len(b.token_ids) == 8
            assert abs(a.logprobs[0] - b.logprobs[0]) < (0.5 if mode == "int4" else 0.1)


def test_compiled_int8_decodes_the_same_tokens_as_eager(model, phi_tokenizer):
    """On the CPU, compile=True reaches the int8 kernel through an opaque operator (a C++ call cannot be traced),
    so the compiled model computes what the eager one does."""
    q = quantize_model(build_model(model.config, seed=2).eval(), "int8")
    prompts = ["def add(a, b):", "Once upon a time"]
    eager = complete(q, phi_tokenizer, prompts, max_new_tokens=12, stop_token_ids=[])
    compiled = complete(q, phi_tokenizer, prompts, max_new_tokens=12, stop_token_ids=[], compile=True)
    assert [c.token_ids for c in compiled] == [e.token_ids for e in eager]


def compiled_step_code(model, batch: int) -> str:
    """The code of the graph torch.compile traces for one decoding step (forward_static) of `batch` rows."""
    from phikit.model import KVCache
    graphs = []

    def capture(gm, example_inputs):
        graphs.append(gm.code)
        return gm.forward

    cache = KVCache.allocate(model.config, batch, 64, dtype=model.dtype)
    cache.write_index = torch.zeros(1, dtype=torch.long)
    key_mask = torch.zeros(batch, 1, 64, dtype=torch.bool)
    key_mask[..., 0] = True
    with torch.inference_mode():
        torch.compile(model.forward_static, backend=capture, fullgraph=True)(
            torch.ones(batch, 1, dtype=torch.long), torch.zeros(batch, 1, dtype=torch.long), key_mask, cache)
    return graphs[0]


@KERNELS
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("batch", [1, 2])
def test_compiled_steps_call_the_matrix_vector_kernels(model, phi_tokenizer, dtype, batch):
    """Compiled decoding steps reach the C++ kernels through their opaque operator (inductor would lower the
    product to its own, slower code) and decode what eager decoding does; a model prepared in fp32 and then cast
    follows its new dtype, and a deep copy's graph uses the copy's weights, not the original's."""
    original = prepare_cpu_linears(copy.deepcopy(model))
    twin = copy.deepcopy(original).to(dtype)
    assert type(twin.lm_head) is CpuLinear
    with torch.no_grad():
        for p in original.parameters():
            p.mul_(-1)  # were the copy's graph to read the original's layers, its logits would change
    assert "phikit.float_rows" in compiled_step_code(twin, batch=batch)
    prompts = ["def add(a, b):", "Once upon a time there was"][:batch]
    assert_compiled_decoding_equals_eager(twin, phi_tokenizer, prompts,
                                          logprob_tolerance=1e-3 if dtype == torch.float32 else 0.05)


def assert_compiled_decoding_equals_eager(model, tokenizer, prompts: list[str], logprob_tolerance: float) -> None:
    eager = complete(model, tokenizer, prompts, max_new_tokens=8, stop_token_ids=[], return_logprobs=True)
    compiled = complete(model, tokenizer, prompts, max_new_tokens=8, stop_token_ids=[], return_logprobs=True,
                        compile=True)
    for e, c in zip(eager, compiled):
        assert c.token_ids == e.token_ids
        assert max(abs(a - b) for a, b in zip(e.logprobs, c.logprobs)) < logprob_tolerance


def test_compiled_decoding_outlasts_the_default_recompile_limit(model, phi_tokenizer, monkeypatch):
    """Each batch size is one graph of the shared forward_static; past torch's default limit (8 graphs per
    function) compiled decoding keeps working, also from a thread of its own (torch's limit is per thread; the
    server decodes in its own thread). The graphs run uncompiled here, which is enough to count them."""
    import threading
    import torch._dynamo
    real_compile = torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: real_compile(fn, backend="eager", **kw))
    fresh = build_model(model.config, seed=2).eval()
    errors = []

    def decode_many_batch_sizes():
        try:
            for batch in range(1, 11):
                out = complete(fresh, phi_tokenizer, ["def f(x):"] * batch, max_new_tokens=2, stop_token_ids=[],
                               compile=True)
                assert len(out) == batch
        except Exception as e:  # noqa: BLE001 - reported in the main thread
            errors.append(e)

    thread = threading.Thread(target=decode_many_batch_sizes)
    thread.start()
    thread.join()
    assert not errors, errors[0]


@pytest.mark.parametrize("mode", ["int8", "int8-weight-only", "int4"])
def test_quantized_attention_fuses_qkv_exactly(model, mode):
    """quantize_model gives each attention one [3d, d] projection; its output is bit for bit the three separately
    quantized projections side by side, on the decoding (one row), batch and prompt paths."""
    from phikit.inference.quant import Int4Linear, Int8Linear
    reference = model.model.layers[0].self_attn
    q = quantize_model(copy.deepcopy(model), mode)
    attn = q.model.layers[0].self_attn
    assert attn.qkv_proj is not None and not hasattr(attn, "q_proj")
    dtype = torch.float32 if mode == "int8" else torch.bfloat16
    separate = [Int8Linear(m, dtype, dynamic=mode == "int8") if mode.startswith("int8") else Int4Linear(m)
                for m in (reference.q_proj, reference.k_proj, reference.v_proj)]
    torch.manual_seed(0)
    for rows in (1, 3, 20):
        x = torch.randn(rows, model.config.hidden_size, dtype=dtype)
        torch.testing.assert_close(attn.qkv_proj(x), torch.cat([m(x) for m in separate], -1), rtol=0, atol=0)


@pytest.mark.parametrize("mode", ["int8", "int8-weight-only", "int4"])
@pytest.mark.parametrize("rows", [1, 3, 20])
def test_quantized_linear_matches_fp32_on_decode_and_prompt_rows(mode, rows):
    """Each kernel path (one row, a small batch, a prompt-sized block) stays within its quantization error of the
    fp32 product."""
    torch.manual_seed(0)
    layer = torch.nn.Linear(256, 384)
    x = torch.randn(rows, 256)
    reference = layer(x)
    quantized = quantize_model(torch.nn.Sequential(layer), mode)[0]
    with torch.no_grad():
        got = quantized(x.to(torch.float32 if mode == "int8" else torch.bfloat16)).float()
    error = (got - reference).norm() / reference.norm()
    assert error < (0.1 if mode == "int4" else 0.02), error  # 4 bits: ~range/15/sqrt(12) on uniform weights


def test_int4_dequantizes_to_its_grid_and_prompts_multiply_block_by_block():
    """Int4 keeps each weight's 4-bit code two to a byte; dequantized, every weight is at its group's nearest grid
    point minimum + k * scale (scale (hi - lo) / 15 and minimum lo, as stored: 8-bit codes of a bf16 step per
    superblock of 8 groups on the C++ kernels, bf16 on torch's), computed here from the definition. Prompts off the
    C++ kernels multiply that matrix a block of output channels at a time (more channels than one block, the last
    one partial) and equal the plain product with it; rows on the kernels, single or a whole prompt, agree with it to
    the rounding of their activations."""
    from phikit.inference.quant import Int4Linear
    torch.manual_seed(0)
    layer = torch.nn.Linear(128, 2 * BLOCK_ROWS + 48)
    int4 = Int4Linear(layer, group_size=32)
    groups = layer.weight.detach().reshape(layer.out_features, -1, 32)
    lo, hi = groups.amin(-1, keepdim=True), groups.amax(-1, keepdim=True)
    step = (hi - lo) / 15
    scale, minimum = (t[..., None] for t in int4.group_scales_and_mins())
    if int4.native:  # within half a code step of the superblock (whose steps are bf16: 2^-8 more)
        scale_step, min_step = step.amax(1, keepdim=True) / 255, lo.abs().amax(1, keepdim=True) / 127
        assert ((scale - step).abs() <= scale_step * 0.51 + step * 2 ** -7).all()
        assert ((minimum - lo).abs() <= min_step * 0.51 + lo.abs() * 2 ** -7).all()
    else:  # bf16: within 2^-8
        assert ((scale - step).abs() <= step * 2 ** -8).all() and ((minimum - lo).abs() <= lo.abs() * 2 ** -8).all()
    expected = (((groups - minimum) / scale).round().clamp(0, 15) * scale + minimum).reshape(layer.weight.shape)
    dequantized = int4.dequantize()
    torch.testing.assert_close(dequantized, expected, rtol=0, atol=1e-6)
    assert int4.nibbles.numel() == layer.weight.numel() // 2
    x = torch.randn(40, 128, dtype=torch.bfloat16)
    with torch.no_grad():
        prompt = int4._forward_prompt(x).float()
        rows = torch.cat([int4(x[i:i + 1]) for i in range(8)] + [int4(x)]).float()
    exact = torch.nn.functional.linear(x.double(), dequantized.double(), layer.bias.detach().double()).float()
    if native.native_bf16():  # the weights are rounded to bf16 for the GEMM, the output to bf16 at the end
        torch.testing.assert_close(prompt, exact, rtol=2e-2, atol=2e-2)
    else:
        torch.testing.assert_close(prompt, exact.bfloat16().float(), rtol=1e-2, atol=1e-3)
    torch.testing.assert_close(rows, torch.cat((exact[:8], exact)), rtol=3e-2, atol=3e-2)


@pytest.mark.parametrize("kw,message", [
    (dict(temperature=-1.0), "temperature"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.5), "top_p"),
    (dict(max_new_tokens=0), "max_new_tokens"),
    (dict(num_beams=2, temperature=0.7), "beam search"),
    (dict(max_new_tokens=2.5), "max_new_tokens must be an integer"),
    (dict(seed="x"), "seed must be an integer"),
    (dict(temperature="hot"), "temperature must be a number"),
    (dict(top_p=float("nan")), "top_p must be a number"),
])
def test_invalid_sampling_values_raise_one_line_errors(model, phi_tokenizer, kw, message):
    with pytest.raises(ValueError, match=message) as err:
        generate(model, phi_tokenizer, "hi", **kw)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("call,message", [
    (lambda m, t: generate(m, t, None), "prompt must be a string"),
    (lambda m, t: generate(m, t, ["fine", 5]), "prompt 1 must be a string, a list of token ids or an embedding tensor"),
    (lambda m, t: generate(m, t, "hi", stop=5), "stop must be a string or a list of strings"),
    (lambda m, t: generate(m, t, "hi", stop=["ok", None]), "stop must be"),
    (lambda m, t: list(stream(m, t, ["a", "b"])), "stream_chunks"),
])
def test_wrong_argument_types_raise_one_line_errors(model, phi_tokenizer, call, message):
    with pytest.raises(ValueError, match=message) as err:
        call(model, phi_tokenizer)
    assert "\n" not in str(err.value)


def test_complete_takes_one_string_as_one_prompt(model, phi_tokenizer):
    # Not one prompt per character.
    got = complete(model, phi_tokenizer, "Hi", max_new_tokens=3, stop_token_ids=[])
    assert [c.text for c in got] == [generate(model, phi_tokenizer, "Hi", max_new_tokens=3, stop_token_ids=[])]


def test_empty_and_over_long_prompts(model, phi_tokenizer):
    with pytest.raises(ValueError, match="empty"):
        generate(model, phi_tokenizer, "")
    long_prompt = "word " * 300  # the test model's context is 128 tokens
    with pytest.raises(ValueError, match="truncate"):
        generate(model, phi_tokenizer, long_prompt, max_new_tokens=4)
    got = complete(model, phi_tokenizer, [long_prompt], max_new_tokens=4, truncate=True, stop_token_ids=[])[0]
    assert got.prompt_tokens < 128 and len(got.token_ids) == 4
    # Generation stops at the end of the context with finish_reason "length".
    near = complete(model, phi_tokenizer, ["word " * 120], max_new_tokens=50, stop_token_ids=[])[0]
    assert near.prompt_tokens + len(near.token_ids) == 128 and near.finish_reason == "length"


def test_package_level_entry_points(model, phi_tokenizer):
    import phikit
    import phikit.inference.decoding  # importing the decoding module leaves phikit.generate the function
    text = phikit.generate(model, phi_tokenizer, "Hi", max_new_tokens=3, stop_token_ids=[])
    assert text == phikit.inference.decoding.generate(model, phi_tokenizer, "Hi", max_new_tokens=3, stop_token_ids=[])
    assert "".join(phikit.stream(model, phi_tokenizer, "Hi", max_new_tokens=3, stop_token_ids=[])) == text
    assert isinstance(phikit.chat(model, phi_tokenizer, [{"role": "user", "content": "Hi"}], max_new_tokens=3), str)


def test_quantized_prompts_run_under_no_grad_after_inference_mode_runs():
    """Generation runs under torch.inference_mode and fills the prompt paths' reusable
    buffers; a user's own forward under plain no_grad must still be able to write into them."""
    from phikit.inference.quant import Int4Linear, Int8Linear
    torch.manual_seed(0)
    int4 = Int4Linear(torch.nn.Linear(256, 512))
    int8 = Int8Linear(torch.nn.Linear(256, 512), torch.float32, dynamic=True)
    x = torch.randn(100, 256)
    with torch.inference_mode():
        expected = int4(x.bfloat16()), int8(x)
    with torch.no_grad():
        torch.testing.assert_close(int4(x.bfloat16()), expected[0])
        torch.testing.assert_close(int8(x), expected[1])


def test_int8_weight_only_takes_any_width_and_unaligned_inputs():
    """torch's weight-only int8 kernel reads 16 inputs at a time with aligned loads: a width that is not a multiple
    of 16 must not reach it (it read past the row: here into large values after it), nor an input that starts
    mid-way through memory (it crashed)."""
    from phikit.inference.quant import Int8Linear
    torch.manual_seed(0)
    for width, start, rows in ((100, 0, 1), (100, 0, 3), (96, 8, 1), (96, 8, 3)):  # start 8: 16 bytes in
        int8 = Int8Linear(torch.nn.Linear(width, 48), torch.bfloat16)
        memory = torch.full((start + rows * width + 64,), 1e4, dtype=torch.bfloat16)
        x = memory[start:start + rows * width].view(rows, width)
        x.copy_(torch.randn(rows, width))
        with torch.no_grad():
            got = int8(x).double()
        exact = x.double() @ int8.dequantize().double().T + int8.bias.double()
        torch.testing.assert_close(got, exact, rtol=2e-2, atol=2e-2)
    x = torch.randn(3, 96, dtype=torch.bfloat16)
    with torch.no_grad():  # the check of the input's address stays out of compiled graphs
        torch.testing.assert_close(torch.compile(int8, backend="eager", fullgraph=True)(x), int8(x))


def test_int4_refuses_unfit_shapes_and_group_sizes_before_changing_the_model(model):
    """A layer int4 cannot take, or a group size torch's int4 kernel does not, is refused up front in one line
    naming the layer and the way out, and the model is left as it was (not half quantized, q/k/v not joined)."""
    from phikit.model import PhiForCausalLM
    from phikit.inference.quant import Int4Linear
    odd = build_model(dataclasses.replace(model.config, intermediate_size=240), seed=0)  # fc2 takes 240 inputs
    for kw, message in ((dict(), "mlp.fc2: int4 needs in_features \\(240\\).*use int8"),
                        (dict(group_size=16), "group size must be one of 32, 64, 128, 256")):
        with pytest.raises(ValueError, match=message) as err:
            quantize_model(odd, "int4", **kw)
        assert "\n" not in str(err.value)
        assert not getattr(odd, "quantized", None) and odd.model.layers[0].self_attn.qkv_proj is None
        assert not any(isinstance(m, Int4Linear) for m in odd.modules())
    with pytest.raises(ValueError, match="group size"):
        Int4Linear(torch.nn.Linear(64, 64), group_size=16)
    assert quantize_model(odd, "int8").quantized == "int8"
    with torch.device("meta"):
        unloaded = PhiForCausalLM(model.config)
    with pytest.raises(ValueError, match="meta device"):
        quantize_model(unloaded, "int8")


def test_cpu_linears_take_weights_made_under_inference_mode():
    """Weights loaded under torch.inference_mode are inference tensors: the CPU paths work on them."""
    torch.manual_seed(0)
    with torch.inference_mode():
        layers = [torch.nn.Linear(64, 96), torch.nn.Linear(64, 96).to(torch.bfloat16)]
    x = torch.randn(5, 64)
    for layer in layers:
        prepare_cpu_linears(layer)
        for rows in (1, 5, 20):
            with torch.inference_mode():
                got = layer(x[:rows].to(layer.weight.dtype)).double()
            exact = x[:rows].to(layer.weight.dtype).double() @ layer.weight.double().T + layer.bias.double()
            torch.testing.assert_close(got, exact, rtol=1e-2, atol=1e-3)
