"""The CPU decoding kernels (inference/cpu_kernels.cpp) against float64 references: every precision, awkward shapes
(widths not a multiple of 16 or 32, 1-17 rows, non-contiguous input), on each instruction set this CPU has, on
torch's fallback path, and when the extension cannot be built at all."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from phikit.inference import native
from phikit.inference.quant import CpuLinear, Int4Linear, Int8Linear, float_rows, prepare_cpu_linears

ISAS = ["avx2",
        pytest.param("avx512", marks=pytest.mark.skipif(
            native.isa() not in ("avx512", "avx512_bf16"), reason="this CPU has no AVX512 with VNNI")),
        pytest.param("avx512_bf16", marks=pytest.mark.skipif(
            native.isa() != "avx512_bf16", reason="this CPU has no AVX512-BF16"))]
# 3, 7: the remainders of the row tiles (4 with AVX512, 2 with AVX2), and a group of 8 rows in the lanes of the
# AVX512 fp32/bf16 kernels; 12, 16: a group of 16 lanes, partial and whole; 17: a prompt (float weights: the GEMM path)
ROWS = [1, 2, 3, 7, 12, 16, 17]
WIDTHS = [40, 100, 160, 2080]  # 40, 100: not a multiple of 16 or 32; 160: 32 but not 64; 2080: a long row


@pytest.fixture
def kernels(request, monkeypatch):
    """The kernel path of the given instruction set ("torch": the fallback, as without a compiler)."""
    mode = request.param
    if mode == "torch":
        monkeypatch.setattr(native, "extension", lambda: None)
    else:
        if native.extension() is None:
            pytest.skip("the C++ kernels cannot be built here")
        monkeypatch.setenv("PHIKIT_CPU_ISA", mode)
        assert native.isa() == mode
    return mode


@pytest.fixture(params=["one", "many"])
def streams(request):
    """How one or two activation rows read the weights (one weight row at a time or several), restored after."""
    before = native.few_row_streams()
    native.set_few_row_streams(request.param)
    yield request.param
    for weights, streams in before.items():
        native.set_few_row_streams(streams, weights)


def rows_of(rows: int, width: int, dtype: torch.dtype) -> torch.Tensor:
    """Input rows as a non-contiguous view (every other column of a wider tensor)."""
    wide = torch.randn(rows, 2 * width, dtype=torch.float32).to(dtype)
    x = wide[:, ::2]
    assert not x.is_contiguous()
    return x


def block_quantized(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Activations rounded to int8 in blocks of 32 as the kernels define it: d = max|x| / 127 per block, q =
    round(x * 127 / max|x|), computed here in fp32 from the definition. Returns (q, d) per block, padded to 32."""
    rows, width = x.shape
    blocks = -(-width // 32)
    padded = torch.nn.functional.pad(x.float(), (0, blocks * 32 - width)).view(rows, blocks, 32)
    amax = padded.abs().amax(-1, keepdim=True)
    inv = torch.where(amax > 0, 127 / amax, torch.zeros_like(amax))
    return torch.round(padded * inv), amax / 127


@pytest.mark.parametrize("kernels", ISAS + ["torch"], indirect=True)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("width", WIDTHS)
def test_float_kernels_equal_float64(kernels, streams, dtype, width):
    torch.manual_seed(width)
    layer = prepare_cpu_linears(torch.nn.Linear(width, 37).to(dtype))
    assert type(layer) is CpuLinear
    for rows in ROWS:
        x = rows_of(rows, width, dtype)
        with torch.inference_mode():
            got = layer(x).double()
        exact = x.double() @ layer.weight.double().T + layer.bias.double()
        # fp32: summation order only; bf16: the output's rounding to bf16 (torch.mv's bf16 partial sums without
        # the kernels)
        tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2 ** -5, atol=2 ** -5)
        torch.testing.assert_close(got, exact, **tol)
    if kernels == "torch":
        return
    for rows in (20, 28, 33):  # the kernel itself past one group: lane groups of 16 + 8, 16 + 16, 16 + 16 + 8
        x = rows_of(rows, width, dtype)
        got = float_rows(x, layer.weight, layer.bias).double()
        exact = x.double() @ layer.weight.double().T + layer.bias.double()
        torch.testing.assert_close(got, exact, rtol=1e-5, atol=1e-5)  # fp32 output: summation order only


@pytest.mark.parametrize("kernels", ISAS, indirect=True)
@pytest.mark.parametrize("width", WIDTHS)
def test_int8_kernel_is_the_block_quantized_product(kernels, width):
    """Decoding steps and prompts alike (33 rows: four tiles of 8 and one row): exactly (to fp32 summation) sum over
    blocks of d_x * (q_x . q_w), times the channel's scale."""
    torch.manual_seed(width)
    layer = Int8Linear(torch.nn.Linear(width, 37), torch.float32, dynamic=True)
    for rows in ROWS + [33]:
        x = rows_of(rows, width, torch.float32)
        with torch.inference_mode():
            got = layer(x).double()
        q, d = block_quantized(x)
        w = torch.nn.functional.pad(layer.plain_weight().double(), (0, q.shape[1] * 32 - width)).view(37, -1, 32)
        per_block = torch.einsum("rbk,nbk->rnb", q.double(), w)
        exact = (per_block * d.double().view(rows, 1, -1)).sum(-1) * layer.scales.double()
        exact += layer.bias.double()
        torch.testing.assert_close(got, exact, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kernels", ISAS, indirect=True)
@pytest.mark.parametrize("width", [96, 160, 2080])  # int4 takes widths divisible by its group (32); 2080: 8 + 1 superblocks
def test_int4_kernel_is_the_block_quantized_product(kernels, width):
    """Decoding steps and prompts alike: sum over blocks of 32 of scale * d_x * (q_x . q) + minimum * sum(x), the
    int4 weight being q * scale + minimum per group of 32 inputs."""
    torch.manual_seed(width)
    layer = Int4Linear(torch.nn.Linear(width, 48))
    assert layer.native
    dequantized = layer.dequantize().double()
    groups = width // 32
    scales, mins = (t.double() for t in layer.group_scales_and_mins())
    codes = ((dequantized.view(48, groups, 32) - mins[..., None]) / scales[..., None]).round()
    for rows in ROWS + [33]:
        x = rows_of(rows, width, torch.bfloat16)
        with torch.inference_mode():
            got = layer(x).double()
        q, d = block_quantized(x)
        per_block = torch.einsum("rbk,nbk->rnb", q.double(), codes) * d.double().view(rows, 1, -1)
        exact = (per_block * scales).sum(-1)
        exact += x.double().view(rows, groups, 32).sum(-1) @ mins.T
        exact += layer.bias.double()
        torch.testing.assert_close(got, exact, rtol=1e-2, atol=2e-2)  # the output is bf16


@pytest.mark.parametrize("kernels", ISAS + ["torch"], indirect=True)
@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_quantized_layers_stay_near_the_float64_product(kernels, mode):
    """On every path (the fallback is fbgemm's int8 GEMM, torch's int4 kernel) the output stays within the
    quantization error of the float64 product with the original weights."""
    torch.manual_seed(0)
    linear = torch.nn.Linear(160, 64)
    layer = Int8Linear(linear, torch.float32, dynamic=True) if mode == "int8" else Int4Linear(linear)
    dtype = torch.float32 if mode == "int8" else torch.bfloat16
    for rows in ROWS:
        x = rows_of(rows, 160, dtype)
        with torch.inference_mode():
            got = layer(x).double()
        exact = x.double() @ linear.weight.detach().double().T + linear.bias.detach().double()
        error = float((got - exact).norm() / exact.norm())
        assert error < (0.1 if mode == "int4" else 0.03), (rows, error)


@pytest.mark.parametrize("kernels", ISAS, indirect=True)
@pytest.mark.parametrize("mode", ["fp32", "bf16", "int8", "int4"])
def test_threads_sharing_a_matrix_give_the_one_thread_result(kernels, mode):
    """A matrix large enough for the threads to share (they take chunks of it, and a thread done with its own share
    takes the rest of another's): the result of 1 thread to the bit with 2, 3 or 4 (more threads than cores, so
    that some run late and others take over their chunks), for 1 row, 2 and a batch; within tolerance of float64."""
    torch.manual_seed(1)
    out = 1008 if mode == "int4" else 1000  # int8: the last 1000 % 16 channels on their own; int4: groups of 16
    linear = torch.nn.Linear(2048, out)
    if mode in ("fp32", "bf16"):
        layer = prepare_cpu_linears(linear.to(torch.bfloat16) if mode == "bf16" else linear)
    else:
        layer = Int8Linear(linear, torch.float32, dynamic=True) if mode == "int8" else Int4Linear(linear)
    dtype = torch.bfloat16 if mode in ("bf16", "int4") else torch.float32
    threads = torch.get_num_threads()
    try:
        for rows in (1, 2, 8):
            x = torch.randn(rows, 2048).to(dtype)
            results = []
            for n in (1, 2, 3, 4):
                torch.set_num_threads(n)
                with torch.inference_mode():
                    results.append(layer(x))
            for got in results[1:]:
                assert torch.equal(got, results[0]), (rows, mode)
            exact = x.double() @ linear.weight.detach().double().T + linear.bias.detach().double()
            error = float((results[0].double() - exact).norm() / exact.norm())
            assert error < {"fp32": 1e-6, "bf16": 1e-2, "int8": 0.03, "int4": 0.1}[mode], (rows, error)
    finally:
        torch.set_num_threads(threads)


def test_a_cpu_without_avx512_takes_the_avx2_path(monkeypatch):
    """The instruction set comes from the CPU's flags: without AVX512 (or without VNNI) the AVX2 kernels, whatever
    is asked for; PHIKIT_CPU_ISA=avx2 forces them on a CPU that has more."""
    with_avx512 = native.cpu_flags()
    monkeypatch.setattr(native, "cpu_flags", lambda: frozenset(with_avx512 - {"avx512_vnni"}))
    if {"avx2", "fma", "f16c"} <= with_avx512:
        assert native.isa() == "avx2"
    monkeypatch.setattr(native, "cpu_flags", lambda: frozenset({"avx2", "fma", "f16c", *native.AVX512_FLAGS}))
    if torch.backends.cpu.get_cpu_capability() != "DEFAULT":
        assert native.isa() == "avx512"
        monkeypatch.setenv("PHIKIT_CPU_ISA", "avx512_bf16")  # more than the CPU has: what it has
        assert native.isa() == "avx512"
        monkeypatch.setattr(native, "cpu_flags",
                            lambda: frozenset({"avx2", "fma", "f16c", "avx512_bf16", *native.AVX512_FLAGS}))
        assert native.isa() == "avx512_bf16"
        monkeypatch.setenv("PHIKIT_CPU_ISA", "avx512")
        assert native.isa() == "avx512"
        monkeypatch.setenv("PHIKIT_CPU_ISA", "avx2")
        assert native.isa() == "avx2"
    monkeypatch.setattr(native, "cpu_flags", lambda: frozenset({"sse4_2"}))
    assert native.isa() is None  # no AVX2: torch's kernels


def test_a_missing_compiler_falls_back_with_one_line(monkeypatch, tmp_path, capfd):
    """When the extension cannot be built (no compiler here), decoding runs on torch's kernels after a one-line
    notice, and nothing half-built is left in the cache."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    monkeypatch.setattr(native, "isa", lambda: "avx2")
    native.forget()
    try:
        assert native.extension() is None
        err = capfd.readouterr().err
        notice = [line for line in err.splitlines() if "kernels unavailable" in line]
        assert len(notice) == 1 and "using torch's kernels" in notice[0]
        assert not any((tmp_path / "phikit" / "kernels").glob("*/*.so"))
        layer = prepare_cpu_linears(torch.nn.Linear(40, 24))
        x = torch.randn(3, 40)
        with torch.inference_mode():
            torch.testing.assert_close(layer(x).double(), x.double() @ layer.weight.double().T
                                       + layer.bias.double(), rtol=1e-5, atol=1e-5)
    finally:
        native.forget()


def test_few_row_streams_are_measured_once_per_machine_unless_named(monkeypatch, capfd):
    """How one or two rows read fp32 and bf16 weights fastest is measured once per machine (not by the process that
    built the library) and kept beside the library (a later process reads it; unclear answers are kept after three,
    their majority); PHIKIT_CPU_STREAMS names it instead,
    and a value that is neither way is said in one line."""
    if native.extension() is None:
        pytest.skip("the C++ kernels cannot be built here")
    before = native.few_row_streams()
    kept = native.cache_dir() / native.build_key() / native.STREAMS_FILE
    unclear = kept.with_name(native.UNCLEAR_FILE)
    saved = kept.read_text() if kept.exists() else None
    saved_unclear = unclear.read_text() if unclear.exists() else None
    try:
        kept.unlink(missing_ok=True)
        monkeypatch.setattr(native, "_built_here", True)
        native.forget()
        native.extension()
        assert native.few_row_streams() == {"fp32": "one", "bf16": "one"} and not kept.exists(), \
            "the process that built the library measures nothing"
        monkeypatch.setattr(native, "_built_here", False)
        kept.write_text(json.dumps({"fp32": "one", "bf16": "many"}))
        native.forget()
        assert native.extension() is not None
        assert native.few_row_streams() == {"fp32": "one", "bf16": "many"}, "read from the file"
        kept.unlink()
        native.forget()
        native.extension()  # measured here, kept where the answer was clear
        measured = native.few_row_streams()
        assert set(measured) == {"fp32", "bf16"} and set(measured.values()) <= {"one", "many"}
        assert not kept.exists() or json.loads(kept.read_text()) == measured
        answers = {"fp32": "many", "bf16": "one"}
        for clear in (False, True):
            kept.unlink(missing_ok=True)
            unclear.unlink(missing_ok=True)
            monkeypatch.setattr(native, "_faster_few_row_streams", lambda module: (answers, clear))
            native.forget()
            native.extension()
            assert native.few_row_streams() == answers and kept.exists() == clear, "kept only when clear"
        kept.unlink()
        tries = [{"fp32": "many", "bf16": "one"}, {"fp32": "many", "bf16": "many"}, {"fp32": "one", "bf16": "many"}]
        for i, answer in enumerate(tries):  # a host never quiet: the third unclear answer keeps the majority
            monkeypatch.setattr(native, "_faster_few_row_streams", lambda module: (answer, False))
            native.forget()
            native.extension()
            if i < native.UNCLEAR_LIMIT - 1:
                assert native.few_row_streams() == answer and not kept.exists() and unclear.exists()
        assert native.few_row_streams() == json.loads(kept.read_text()) == {"fp32": "many", "bf16": "many"}
        assert not unclear.exists()
        monkeypatch.setattr(native, "_faster_few_row_streams", lambda module: (answers, True))
        kept.write_text("{not json")
        native.forget()
        native.extension()
        assert json.loads(kept.read_text()) == answers, "a spoiled file is measured anew"
        for forced in ("one", "many"):
            monkeypatch.setenv("PHIKIT_CPU_STREAMS", forced)
            native.forget()
            native.extension()
            assert native.few_row_streams() == {"fp32": forced, "bf16": forced}
        monkeypatch.setenv("PHIKIT_CPU_STREAMS", "eight")
        native.forget()
        native.extension()
        assert native.few_row_streams() == answers
        assert "PHIKIT_CPU_STREAMS='eight' is neither 'one' nor 'many'" in capfd.readouterr().err
        with pytest.raises(ValueError, match="'one' or 'many'"):
            native.set_few_row_streams("8")
        with pytest.raises(ValueError, match="fp32 or bf16"):
            native.set_few_row_streams("one", "int8")
        native.set_few_row_streams("one")
        native.set_few_row_streams("many", "bf16")
        assert native.few_row_streams() == {"fp32": "one", "bf16": "many"}
    finally:  # the machine's own choice back as it was: the answers above are this test's, not measured
        for path, text in ((kept, saved), (unclear, saved_unclear)):
            if text is not None:
                path.write_text(text)
            else:
                path.unlink(missing_ok=True)
        for weights, streams in before.items():
            native.set_few_row_streams(streams, weights)


def test_the_built_extension_is_cached_per_machine():
    """Built once (by this suite's first test at the latest), the library is found under a key of the source, the
    CPU's flags and torch's version, and a new process loads it without compiling."""
    import subprocess
    import sys
    if native.extension() is None:
        pytest.skip("the C++ kernels cannot be built here")
    assert (native.cache_dir() / native.build_key() / f"{native.MODULE}.so").exists()
    done = subprocess.run([sys.executable, "-c", "from phikit.inference import native; assert native.extension()"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "compiling" not in done.stderr


@pytest.mark.parametrize("kernels", ISAS[:2] + ["torch"], indirect=True)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
# 20: not a multiple of 8; 80: phi-2's, a masked last vector with AVX512; 136: 3 passes of the AVX2 values, 5
# vectors of bf16 with AVX512; 264: past the AVX512 kernels' 8 vectors a row (fp32 and bf16), so AVX2 there
@pytest.mark.parametrize("head_dim", [20, 32, 64, 80, 136, 264])
def test_decoding_attention_reads_the_cache_where_it_lies(kernels, dtype, head_dim):
    """One query (a strided view) against a cache's strided view (the first `length` rows of a larger buffer), with
    and without a mask, on the kernels and on torch's path alike: the float64 attention of the cached values, to fp32
    summation order; a row that may see no key averages the values, as torch's softmax of equal scores does."""
    from phikit.model import single_query_attention
    torch.manual_seed(head_dim)
    for length in (1, 3, 5, 17, 130):  # keys 4 at a time, and the rest
        buffers = torch.randn(2, 2, 3, 160, head_dim).to(dtype)  # [k/v, batch, heads, capacity, head_dim]
        k, v = buffers[0, :, :, :length], buffers[1, :, :, :length]
        q = torch.randn(2, 3, 1, 2 * head_dim).to(dtype)[..., ::2]  # a strided view, as of a joined projection
        mask = torch.rand(2, 1, 1, length) < 0.7
        mask[..., -1] = True
        hidden = single_query_attention(q, k, v, torch.zeros_like(mask), 1 / 8)  # no key to see: the plain mean
        torch.testing.assert_close(hidden.double(), v.double().mean(2, keepdim=True), rtol=2 ** -7, atol=2 ** -7)
        for m in (mask, None):
            scores = (q.double() @ k.double().transpose(-1, -2)) / 8
            if m is not None:
                scores = scores.masked_fill(~m, float("-inf"))
            exact = scores.softmax(-1) @ v.double()
            got = single_query_attention(q, k, v, m, 1 / 8)
            tol = 1e-5 if dtype == torch.float32 else 2 ** -7  # bf16: the output's rounding
            assert got.dtype == dtype
            torch.testing.assert_close(got.double(), exact, rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1, 32, 64, 32, 1), (8, 32, 80, 32, 8), (3, 4, 20, 10, 1), (2, 2, 16, 16, 2)])
def test_rotary_in_place_is_torch_to_the_bit(dtype, shape):
    """A decoding step's rotary embedding on the kernels equals apply_partial_rotary exactly (every product and sum
    rounded as torch rounds them), on q and k as views of a projection's output, with one row of angles for every
    sequence or one per sequence; the channels past rotary_dim are left alone."""
    from phikit.model import RotaryEmbedding, apply_partial_rotary, rotate_query_and_key
    if native.extension() is None:
        pytest.skip("the C++ kernels cannot be built here")
    batch, heads, head_dim, rotary_dim, angle_rows = shape
    torch.manual_seed(head_dim)
    cos, sin = RotaryEmbedding(rotary_dim, 10000.0)(torch.randint(0, 2048, (angle_rows, 1)))
    qk = (torch.randn(batch, 1, 2, heads, head_dim) * 4).to(dtype)
    q, k = qk.permute(2, 0, 3, 1, 4).unbind(0)  # [batch, heads, 1, head_dim] strided views, as a fused projection
    expected = apply_partial_rotary(q, cos, sin), apply_partial_rotary(k, cos, sin)
    with torch.inference_mode():
        got = rotate_query_and_key(*qk.clone().permute(2, 0, 3, 1, 4).unbind(0), cos, sin)
    for g, e in zip(got, expected):
        assert g.dtype == dtype and torch.equal(g, e)


@pytest.mark.parametrize("kernels", ["avx2", "torch"], indirect=True)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("count", [1, 7, 8, 9, 2050, 3 * 2**14 + 5])  # tails; several threads' chunks
def test_gelu_at_inference_equals_the_float64_function(kernels, dtype, count):
    """The MLP's activation at inference (gelu_tanh: the C++ kernel once loaded, else torch's) is the tanh GELU of
    float64 within fp32 rounding, on a non-contiguous input with NaN and infinities in it; a bf16 result equals
    torch's bf16 GELU but below x = -3, where both lose digits to cancellation (within 4e-6). With autograd on it is
    torch's own, so training differentiates it."""
    from phikit.model import gelu_tanh
    torch.manual_seed(count)
    wide = torch.randn(count, 2) * 4
    wide[:3, 0] = torch.tensor([float("nan"), float("inf"), -30.0])[:min(count, 3)]
    x = wide[:, 0].to(dtype)  # every other value of a wider tensor
    with torch.inference_mode():
        got = gelu_tanh(x)
    expected = F.gelu(x.double(), approximate="tanh")
    assert got.dtype == dtype and got.shape == x.shape
    assert torch.equal(got.isnan(), expected.isnan()) and torch.equal(got.isinf(), expected.isinf())
    finite = expected.isfinite()
    bound = 1e-6 * (1 + expected.abs()) if dtype == torch.float32 else 8e-3 * expected.abs() + 1e-6
    assert ((got.double() - expected).abs() <= bound)[finite].all()
    if dtype == torch.bfloat16:
        same = got == F.gelu(x, approximate="tanh")
        assert (same | (x < -3) | x.isnan())[finite | x.isnan()].all()
    y = x.float().requires_grad_()
    gelu_tanh(y).sum().backward()
    assert y.grad is not None and y.grad[finite & x.isfinite()].isfinite().all()


def test_int8_layers_keep_16_channels_side_by_side_only_for_the_kernels():
    """On the kernels an int8 layer stores each group of 16 output channels side by side (the last out % 16 as
    rows); `plain_weight` gives back exactly the row-by-row codes. Inputs not a multiple of 4 keep plain rows and
    take fbgemm's product, within the quantization error of the float64 one."""
    torch.manual_seed(0)
    linear = torch.nn.Linear(40, 37)
    w = linear.weight.detach()
    codes = (w / (w.abs().amax(1, keepdim=True) / 127).clamp(min=1e-8)).round().clamp(-127, 127).to(torch.int8)
    layer = Int8Linear(linear, torch.float32, dynamic=True)
    assert layer.grouped == (native.extension() is not None)
    if layer.grouped:
        assert not torch.equal(layer.weight, codes)  # the stored order differs
    assert torch.equal(layer.plain_weight(), codes) and torch.equal(layer.plain_weight(16, 37), codes[16:])
    odd = Int8Linear(torch.nn.Linear(38, 37), torch.float32, dynamic=True)
    assert not odd.grouped
    x = torch.randn(3, 38)
    with torch.inference_mode():
        got = odd(x).double()
    exact = x.double() @ odd.dequantize().double().T + odd.bias.double()
    assert float((got - exact).norm() / exact.norm()) < 0.03


def _small_model(mode: str):
    """A 3-layer phi with awkward widths (hidden 96 over 6 heads of 16, rotary on 8 of them) in `mode`, prepared
    for CPU decoding as generation prepares it."""
    from phikit.config import PhiConfig
    from phikit.inference.quant import quantize_model
    from phikit.model import build_model
    cfg = PhiConfig(vocab_size=304, hidden_size=96, intermediate_size=384, num_hidden_layers=3,
                    num_attention_heads=6, max_position_embeddings=64)
    model = build_model(cfg, seed=0)
    if mode == "bf16":
        model = model.bfloat16()
    elif mode in ("int8", "int4"):
        quantize_model(model, mode)
    return prepare_cpu_linears(model.eval())


@pytest.mark.parametrize("kernels", ISAS, indirect=True)
@pytest.mark.parametrize("mode", ["fp32", "bf16", "int8", "int4"])
@pytest.mark.parametrize("batch,padded", [(1, False), (3, True), (9, False)])
def test_a_decoding_layer_in_one_call_equals_the_modules(kernels, mode, batch, padded, monkeypatch):
    """A decoding step's decoder layer as one call of the kernels (model.native_layer_step) gives the output and
    writes the cache columns that the modules one by one give (torch's LayerNorm, adds, cache writes, the kernels'
    products): fp32 to rounding, bf16 within its precision (the LayerNorm sums in another order), with padding
    masked, at batch sizes that take the lanes kernels. Then six greedy steps of the whole model agree."""
    import phikit.model as M
    model = _small_model(mode)
    dtype = model.dtype
    ids = torch.randint(0, 304, (batch, 7), generator=torch.Generator().manual_seed(1))
    attention = torch.ones(batch, 7, dtype=torch.long)
    if padded:
        attention[0, :3] = 0
    with torch.inference_mode():
        prompt = model(ids, attention_mask=attention, use_cache=True)
        cache = prompt.past_key_values
        attention = torch.cat([attention, torch.ones(batch, 1, dtype=torch.long)], 1)
        x = (torch.randn(batch, 1, 96) * 3).to(dtype)
        positions = (attention.cumsum(-1) - 1)[:, -1:]
        cos, sin = model.model.rotary_emb(positions)
        mask = M.build_attention_mask(attention, batch, 1, 7, x.device) if padded else None
        layer = model.model.layers[1]
        fused = M.native_layer_step(layer, x, cos, sin, mask, cache)
        assert fused is not None, "the layer should run as one call"
        fused_keys, fused_values = cache.keys[1][:, :, 7].clone(), cache.values[1][:, :, 7].clone()
        monkeypatch.setattr(M, "NATIVE_LAYER_STEPS", False)
        expected, _ = layer(x, cos, sin, mask, cache, False)
    tolerance = {"fp32": 1e-5, "int8": 1e-4}.get(mode, 1e-2)
    written = (cache.keys[1][:, :, 7], cache.values[1][:, :, 7])
    for got, want in ((fused, expected), (fused_keys, written[0]), (fused_values, written[1])):
        assert got.dtype == want.dtype
        assert float((got.double() - want.double()).norm() / want.double().norm()) < tolerance
    tokens = {}
    for native_steps in (True, False):
        monkeypatch.setattr(M, "NATIVE_LAYER_STEPS", native_steps)
        with torch.inference_mode():
            state = model(ids, use_cache=True)
            token, cache, picked = state.logits[:, -1:].argmax(-1), state.past_key_values, []
            for _ in range(6):
                state = model(token, past_key_values=cache, use_cache=True)
                token = state.logits[:, -1:].argmax(-1)
                picked.append(token)
        tokens[native_steps] = torch.cat(picked, 1)
    assert torch.equal(tokens[True], tokens[False])


def test_an_int8_model_keeps_its_cache_in_bf16():
    """An int8 model on the CPU computes in fp32 and keeps its keys and values in bf16 (half the bytes a batch's
    decoding step reads from its cache). Over a prompt, its next chunk (torch's attention on the cache, upcast) and a
    decoding step (the cache read as it lies), its logits stay as close to the unquantized fp32 model's as with an
    fp32 cache: the rounding of the cache is small beside int8's own."""
    ids = torch.randint(0, 304, (2, 9), generator=torch.Generator().manual_seed(3))

    def logits_of(model, cache_dtype):
        with torch.inference_mode():
            cache = model(ids[:, :5], use_cache=True).past_key_values
            assert cache.keys[0].dtype == cache_dtype
            chunk = model(ids[:, 5:8], past_key_values=cache, use_cache=True).logits
            step = model(ids[:, 8:], past_key_values=cache, use_cache=True).logits
        return torch.cat((chunk, step), 1)

    reference = logits_of(_small_model("fp32"), torch.float32)
    model = _small_model("int8")
    assert model.dtype == torch.float32 and model.cache_dtype == torch.bfloat16
    error = {}
    for cache_dtype in (torch.bfloat16, torch.float32):
        model.kv_cache_dtype = cache_dtype
        got = logits_of(model, cache_dtype)
        assert got.dtype == torch.float32
        error[cache_dtype] = float((got - reference).norm() / reference.norm())
    assert 0 < error[torch.bfloat16] < 1.25 * error[torch.float32] < 0.05, error


def test_a_decoding_layer_with_hooks_runs_module_by_module():
    """A forward hook on a module inside a layer (interpretability, adapters) sees its call: the layer then runs
    module by module instead of as one call of the kernels."""
    import phikit.model as M
    if native.extension() is None:
        pytest.skip("the C++ kernels cannot be built here")
    model = _small_model("fp32")
    seen = []
    model.model.layers[2].mlp.fc1.register_forward_hook(lambda module, args, out: seen.append(out.shape))
    with torch.inference_mode():
        state = model(torch.tensor([[5, 6, 7]]), use_cache=True)
        model(torch.tensor([[8]]), past_key_values=state.past_key_values, use_cache=True)
    assert seen == [torch.Size([1, 3, 384]), torch.Size([1, 1, 384])]
    x = torch.randn(1, 1, 96)
    cos, sin = model.model.rotary_emb(torch.tensor([[4]]))
    with torch.inference_mode():
        assert M.native_layer_step(model.model.layers[2], x, cos, sin, None, state.past_key_values) is None
        assert M.native_layer_step(model.model.layers[0], x, cos, sin, None, state.past_key_values) is not None


def test_large_weights_move_to_memory_advised_for_huge_pages():
    """move_to_huge_pages copies each CPU parameter and buffer of 2 MB or more into memory advised for 2 MB pages
    (the same parameter objects, equal values, 2 MB-aligned) and leaves smaller ones where they are."""
    from test_foundation_checkpoint import vm_flags
    layer = torch.nn.Linear(1024, 1024)  # 4 MB of weights, 4 KB of bias
    layer.register_buffer("table", torch.arange(2**20, dtype=torch.int64))  # 8 MB
    weight, bias, values = layer.weight, layer.bias, layer.weight.detach().clone()
    bias_at = bias.data_ptr()
    native.move_to_huge_pages(layer)
    assert layer.weight is weight and torch.equal(layer.weight, values) and layer.bias.data_ptr() == bias_at
    assert torch.equal(layer.table, torch.arange(2**20))
    for t in (layer.weight, layer.table):
        assert t.data_ptr() % native.HUGE_PAGE == 0 and "hg" in vm_flags(t.data_ptr())
    assert "hg" not in vm_flags(bias_at)
