"""Weight quantization for decoding, and the CPU paths of fp32, bf16, int8 and int4 linear layers.

Decoding one token reads every weight once, so its speed is memory bandwidth: int8 weights (1 byte) decode about
twice as fast as bf16 and four times as fast as fp32, when the kernel keeps up with memory. A few rows (decoding,
small batches, prompt lookup) run on phikit's C++ matrix-vector kernels (native.py, cpu_kernels.cpp), which read
the weights in place at memory speed; prompts (many rows at once) are compute-bound instead and run a matrix-matrix
product, quantized layers dequantizing a block of output channels at a time: in bf16 where bf16 GEMM is native,
else in fp32 (exact). No layer keeps a second copy of its weights.

    quantize_model(model, "int8")              int8 weights, one scale per output channel; on the CPU decoding
                                               rounds the activations to int8 in blocks of 32 (as llama.cpp's q8_0)
                                               and multiplies in integers; on a GPU it is weight-only
    quantize_model(model, "int8-weight-only")  the same weights; activations stay bf16 (torch's _weight_int8pack_mm)
    quantize_model(model, "int4")              group-wise asymmetric int4 (groups of 32 inputs), activations in int8
                                               blocks of 32 on the CPU kernels
                                               (every mode first joins each attention's q/k/v into one layer)
    prepare_cpu_linears(model)                 fp32 and bf16 nn.Linear layers on the CPU take CpuLinear's paths

Where the C++ kernels cannot be built (no compiler, no AVX2), the same layers run on torch's kernels: fbgemm's
int8 GEMM, torch's int4 kernel (on a packed copy), torch.mv and F.linear.
"""
from __future__ import annotations

import functools
import threading
import time
import warnings
import weakref

import torch
import torch.nn.functional as F
from torch import nn

from . import native
from ..model import PhiAttention

# Inputs with fewer rows (decoding up to 16 sequences, prompt lookup, beams) take the C++ kernels for float weights,
# which win as long as reading the weights dominates; more rows (prompts) a GEMM. int8 and int4 rows take the
# kernels at any count (_on_kernels).
DECODE_ROWS = 17
# Prompts dequantize (or upcast) this many output channels at a time (4 MB of fp32 at phi-1.5's width): the block
# stays in cache between dequantizing and multiplying (1024: 0.97x the time, 512: 1x, 128: 1.26x on 2 cores).
BLOCK_ROWS = 512

MODES = ("int8", "int8-weight-only", "int4")
# The group sizes torch's CPU int4 kernel takes (others fail on the first decoding step, not when quantizing).
INT4_GROUP_SIZES = (32, 64, 128, 256)
INT4_SUPERBLOCK = 8  # groups of 32 sharing the bf16 steps of their 8-bit scale and minimum codes (kSuper in C++)
KERNEL_CHANNELS = 16  # output channels the C++ kernels take side by side (kGroup there)


_local = threading.local()


def weight_scratch(shape: torch.Size, device: torch.device, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A reusable buffer per weight shape and dtype (and thread) for the prompt path: converting into memory that
    is already mapped is ~6x faster than into a fresh allocation, which page-faults on every call."""
    buffers = _local.__dict__.setdefault("buffers", {})
    key = (tuple(shape), str(device), dtype)
    if key not in buffers:
        # Never an inference tensor (made under torch.inference_mode, as generation runs):
        # writing into one later under plain no_grad would raise.
        with torch.inference_mode(False):
            buffers[key] = torch.empty(shape, dtype=dtype, device=device)
    return buffers[key]


# The kernels' entry points as operators, for torch.compile: a compiled graph calls them opaquely (their fake
# forms give the output's shape). Registered as plain CPU kernels of a library rather than with
# torch.library.custom_op, whose Python wrapper made each call about 3x dearer; eager code calls the functions
# directly. Inference only.
_LIB = torch.library.Library("phikit", "DEF")
_LIB.define("float_rows(Tensor x, Tensor weight, Tensor? bias) -> Tensor")
_LIB.define("int8_rows(Tensor x, Tensor weight, Tensor scales, Tensor? bias) -> Tensor")
_LIB.define("int4_rows(Tensor x, Tensor weight, Tensor scales, Tensor mins, Tensor steps, Tensor? bias, "
            "int in_features) -> Tensor")
_LIB.define("int8_linear_dynamic(Tensor x, int layer_id, int out_features) -> Tensor")


def _f32(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.float().contiguous()


def float_rows(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x [rows, in] @ weight.T + bias for fp32 or bf16 weights, in fp32, on the C++ kernels (bf16 weights take
    bf16 rows as they are)."""
    ext = native.extension()
    kernel = ext.linear_bf16 if weight.dtype == torch.bfloat16 else ext.linear_f32
    return kernel(x, weight, bias, native.isa_code())


def int8_rows(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """The int8 product with activations rounded to int8 in blocks of 32, in fp32, on the C++ kernels."""
    return native.extension().linear_int8(x, weight, _f32(scales), bias, native.isa_code())


def int4_rows(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor, steps: torch.Tensor,
              bias: torch.Tensor | None, in_features: int) -> torch.Tensor:
    """The int4 product (Int4Linear's layout) with activations rounded to int8 in blocks of 32, on the C++ kernels."""
    return native.extension().linear_int4(x, weight, scales, mins, steps, bias, in_features, native.isa_code())


for _name, _fn in (("float_rows", float_rows), ("int8_rows", int8_rows), ("int4_rows", int4_rows)):
    _LIB.impl(_name, _fn, "CPU")


@torch.library.register_fake("phikit::float_rows", lib=_LIB)
def _(x, weight, bias):
    return x.new_empty(x.shape[0], weight.shape[0], dtype=torch.float32)


@torch.library.register_fake("phikit::int8_rows", lib=_LIB)
def _(x, weight, scales, bias):
    return x.new_empty(x.shape[0], weight.shape[0], dtype=torch.float32)


@torch.library.register_fake("phikit::int4_rows", lib=_LIB)
def _(x, weight, scales, mins, steps, bias, in_features):
    return x.new_empty(x.shape[0], weight.shape[0], dtype=torch.float32)


def _on_kernels(x2: torch.Tensor, any_rows: bool = False) -> bool:
    """Whether these rows go to the C++ kernels: CPU rows, with the kernels built, a few of them for float weights;
    `any_rows` for int8 and int4, whose integer products beat a dequantize-and-GEMM at prompts too (VNNI's dot
    products do twice the multiply-adds of bf16's; phi-1.5 shapes, 2 Zen 4 cores, 128 rows: int8 239 vs 73 tokens/s,
    int4 195 vs 102)."""
    return (x2.device.type == "cpu" and (any_rows or x2.shape[0] < DECODE_ROWS)
            and native.extension() is not None)


def _call(op: str, *args) -> torch.Tensor:
    """The kernel `op`, through its operator inside compiled graphs (which cannot trace a C++ call)."""
    if torch.compiler.is_compiling():
        return getattr(torch.ops.phikit, op)(*args)
    return globals()[op](*args)


@functools.cache
def onednn_fp32_wins() -> bool:
    """Whether oneDNN's fp32 product on weights as they are beats F.linear (MKL's sgemm on torch's CPU builds) for
    prompts here. MKL takes a slow path on some CPUs (half oneDNN's speed on an AMD EPYC with AVX512); measured once
    per process, on a 128 x 1024 x 1024 product (a few milliseconds), since it differs from CPU to CPU."""
    if not torch.backends.mkldnn.is_available():
        return False
    x, w = torch.randn(128, 1024), torch.randn(1024, 1024)

    def best(product) -> float:
        product()
        times = []
        for _ in range(3):
            start = time.perf_counter()
            product()
            times.append(time.perf_counter() - start)
        return min(times)
    with torch.inference_mode():
        try:
            onednn = best(lambda: torch.ops.mkldnn._linear_pointwise(x, w, None, "none", [], ""))
        except (RuntimeError, AttributeError):  # a build without the op
            return False
        return onednn < 0.9 * best(lambda: F.linear(x, w))


def fp32_product(x2: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear for fp32 prompts on the CPU, through oneDNN where that measured faster (see onednn_fp32_wins)."""
    if x2.device.type == "cpu" and not torch.compiler.is_compiling() and onednn_fp32_wins():
        return torch.ops.mkldnn._linear_pointwise(x2, weight, bias, "none", [], "")
    return F.linear(x2, weight, bias)


def blocked_product(x2: torch.Tensor, out_features: int, weight_rows, dtype: torch.dtype) -> torch.Tensor:
    """x2 @ W.T in fp32 for a W never held whole, the product running in `dtype` (bf16 where bf16 GEMM is native):
    `weight_rows(start, end, out)` writes output channels start:end of W into `out` ([end - start, in], `dtype`) and
    returns it. Blocks of BLOCK_ROWS channels stay in cache between making and multiplying, and the scratch is one
    block, not a copy of the matrix."""
    rows = min(BLOCK_ROWS, out_features)
    block = weight_scratch((rows, x2.shape[1]), x2.device, dtype)
    x_in_dtype = x2.to(dtype)
    y = torch.empty(x2.shape[0], out_features, device=x2.device)
    for start in range(0, out_features, rows):
        end = min(start + rows, out_features)
        w = weight_rows(start, end, block[:end - start])
        y[:, start:end] = fp32_product(x_in_dtype, w) if dtype == torch.float32 else F.linear(x_in_dtype, w)
    return y


def _prompt_dtype() -> torch.dtype:
    return torch.bfloat16 if native.native_bf16() else torch.float32


class CpuLinear(nn.Linear):
    """nn.Linear with fp32 or bf16 weights, on the CPU, outside autograd: a few rows (decoding) on the C++
    matrix-vector kernels, which read the weights in place at memory speed; more rows (prompts) in torch's GEMM,
    bf16 in bf16 where that is native, else in fp32 a block of output channels at a time. No copy of the weights is
    kept. Without the kernels, single bf16 rows take torch.mv (2x bf16 F.linear there) and the rest F.linear.

    The class is swapped in place (same parameters, same state_dict), see prepare_cpu_linears."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight  # a module attribute costs a lookup each time: decoding calls this 100+ times a step
        dtype = weight.dtype
        if (x.device.type != "cpu" or torch.is_grad_enabled() or x.dtype != dtype
                or dtype not in (torch.float32, torch.bfloat16)):
            return super().forward(x)
        shape, x2 = x.shape, x.reshape(-1, self.in_features)
        if _on_kernels(x2):
            y = _call("float_rows", x2, weight, self.bias).to(dtype)
        elif dtype == torch.bfloat16 and x2.shape[0] >= DECODE_ROWS and not native.native_bf16():
            y = blocked_product(x2, self.out_features, lambda s, e, out: out.copy_(self.weight[s:e]), torch.float32)
            y = (y + self.bias if self.bias is not None else y).to(dtype)
        elif dtype == torch.bfloat16 and x2.shape[0] == 1:
            y = torch.mv(self.weight, x2[0])[None]
            y = y + self.bias if self.bias is not None else y
        elif dtype == torch.float32:
            y = fp32_product(x2.contiguous(), self.weight, self.bias)
        else:
            return super().forward(x)
        return y.reshape(*shape[:-1], self.out_features)

    def kernel_operands(self, dtype: torch.dtype) -> list[torch.Tensor] | None:
        """[weight, bias] as a decoding layer step passes this layer to the C++ kernels (model.native_layer_step),
        or None where it cannot take them (another dtype, no bias)."""
        weight, bias = self.weight, self.bias
        if weight.dtype != dtype or bias is None or dtype not in (torch.float32, torch.bfloat16):
            return None
        return [weight, bias]


def prepare_cpu_linears(model: nn.Module) -> nn.Module:
    """Give every CPU nn.Linear its fast inference path (CpuLinear; idempotent, same parameters and state_dict), and
    build or load the C++ kernels now rather than inside the first timed generation. A layer whose dtype changed
    since (model.to) follows: CpuLinear reads the dtype on every call."""
    cpu = [m for m in model.modules()
           if isinstance(m, (nn.Linear, Int8Linear, Int4Linear)) and m.weight.device.type == "cpu"]
    if cpu:
        native.extension()
        native.keep_freed_scratch()
        if any(m.weight.dtype == torch.float32 for m in cpu):
            onednn_fp32_wins()  # measured now rather than inside the first request's prompt
    for m in cpu:
        if type(m) is nn.Linear:
            m.__class__ = CpuLinear
    return model


_LIVE_INT8: "weakref.WeakValueDictionary[int, Int8Linear]" = weakref.WeakValueDictionary()


@functools.cache
def int8_full_range() -> bool:
    """Whether fbgemm's int8 product is exact with 8-bit activations (its path without the C++ kernels). Without
    VNNI it adds pairs of u8 x s8 products in int16, which saturates (255 * 127 * 2 > 32767), so activations get 7
    bits; with VNNI the pairs go straight to int32. Tested, not assumed: the worst case (activations 255, weights
    +-127) against fp32."""
    if "fbgemm" not in torch.backends.quantized.supported_engines:
        return False
    with warnings.catch_warnings():  # quantized-tensor constructors warn about their future in torch
        warnings.simplefilter("ignore")
        weight = torch.full((16, 256), 127.0)
        weight[1::2] = -127.0
        qweight = torch._make_per_channel_quantized_tensor(
            weight.to(torch.int8), torch.ones(16, dtype=torch.double), torch.zeros(16, dtype=torch.long), 0)
        x = torch.ones(1, 256)
        x[0, ::3] = 0.0  # quantizes to codes 0 and 255
        got = torch.ops.quantized.linear_dynamic(x, torch.ops.quantized.linear_prepack(qweight, None), False)
    return bool(torch.allclose(got, F.linear(x, weight), atol=0.01))


def side_by_side(rows: torch.Tensor) -> torch.Tensor:
    """Rows [out, n] of bytes (out a multiple of 16, n of 4) in the order the int8/int4 kernels read: per group of 16
    rows and run of 4 bytes, the 16 rows' runs one after another (a 64-byte vector)."""
    out, n = rows.shape
    return rows.reshape(-1, KERNEL_CHANNELS, n // 4, 4).transpose(1, 2).reshape(out, n)


def rows_of(stored: torch.Tensor) -> torch.Tensor:
    """The inverse of side_by_side: [out, n] rows again (a copy)."""
    out, n = stored.shape
    return stored.reshape(-1, n // 4, KERNEL_CHANNELS, 4).transpose(1, 2).reshape(out, n)


class Int8Linear(nn.Module):
    """y = x @ (q * scale)^T + b with q int8 [out, in] and one scale per output channel (symmetric).

    With `dynamic` (mode "int8"), CPU inputs, decoding steps and prompts alike, round their activations to int8 in
    blocks of 32 (one scale per block) and multiply in integers on the C++ kernels (VNNI's dot products where the
    CPU has them). For them `weight` keeps each group of 16 output channels side by side (`grouped`): per run of 4
    inputs 64 bytes, 4 per channel (the last out % 16 channels stay rows); `plain_weight` gives [out, in]. Without
    the kernels a few rows take fbgemm's int8 GEMM on a packed copy of the weights (one scale per call; 7-bit
    activations where fbgemm's sums could overflow, see int8_full_range). The weight-only form (mode
    "int8-weight-only") keeps bf16 activations in torch's _weight_int8pack_mm. Off the kernels, more rows (prompts)
    multiply the integer weights block by block in a float GEMM, exact."""

    def __init__(self, linear: nn.Linear, act_dtype: torch.dtype, dynamic: bool = False) -> None:
        super().__init__()
        self.in_features, self.out_features, self.dynamic = linear.in_features, linear.out_features, dynamic
        device = linear.weight.device
        self.grouped = (dynamic and device.type == "cpu" and self.in_features % 4 == 0
                        and native.extension() is not None)
        weight = native.empty_weights((self.out_features, self.in_features), torch.int8, device)
        scales = torch.empty(self.out_features, device=device)
        for start in range(0, self.out_features, BLOCK_ROWS):  # in blocks: no fp32 copy of a whole large matrix
            w = linear.weight.detach()[start:start + BLOCK_ROWS].float()
            scale = (w.abs().amax(dim=1) / 127.0).clamp(min=1e-8)
            q = (w / scale[:, None]).round().clamp(-127, 127).to(torch.int8)
            end = start + q.shape[0]
            grouped_end = min(end, self._grouped_rows()) if self.grouped else start
            weight[start:grouped_end] = side_by_side(q[:grouped_end - start])
            weight[grouped_end:end] = q[grouped_end - start:]
            scales[start:end] = scale
        self.register_buffer("weight", weight)
        self.register_buffer("scales", scales.to(act_dtype))
        # a copy, never a view of the caller's tensor (the loader's file mapping, given back after this)
        bias = linear.bias.detach().to(act_dtype, copy=True) if linear.bias is not None else None
        self.register_buffer("bias", bias)
        self._packed = None  # fbgemm's packed copy, made on first use where the C++ kernels are missing
        self._key = id(self)
        _LIVE_INT8[self._key] = self

    def __getstate__(self) -> dict:  # copies and pickles leave fbgemm's packed copy out (made again on use)
        return {**self.__dict__, "_packed": None}

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        self._key = id(self)
        _LIVE_INT8[self._key] = self

    def _grouped_rows(self) -> int:
        return self.out_features // KERNEL_CHANNELS * KERNEL_CHANNELS

    def plain_weight(self, start: int = 0, end: int | None = None) -> torch.Tensor:
        """The integer weights of output channels start:end as [end - start, in] rows (start a multiple of 16 where
        `grouped`; a copy then)."""
        end = self.out_features if end is None else end
        if not self.grouped:
            return self.weight[start:end]
        grouped_end = max(start, min(end, self._grouped_rows()))
        return torch.cat((rows_of(self.weight[start:grouped_end]), self.weight[grouped_end:end]))

    def dequantize(self) -> torch.Tensor:
        return self.plain_weight().float() * self.scales.float()[:, None]

    def _fbgemm_weights(self) -> torch.ScriptObject:
        if self._packed is None:
            with warnings.catch_warnings():  # quantized-tensor constructors warn about their future in torch
                warnings.simplefilter("ignore")
                qweight = torch._make_per_channel_quantized_tensor(
                    self.plain_weight(), self.scales.double(), torch.zeros(self.out_features, dtype=torch.long), 0)
                bias = self.bias.float() if self.bias is not None else None
                self._packed = torch.ops.quantized.linear_prepack(qweight, bias)
        return self._packed

    def _forward_prompt(self, x2: torch.Tensor) -> torch.Tensor:
        """The integer weights block by block in a float GEMM (int8 values are exact in bf16 and fp32), then the
        per-channel scale on the output (it factors out)."""
        y = blocked_product(x2, self.out_features, lambda s, e, out: out.copy_(self.plain_weight(s, e)),
                            _prompt_dtype())
        y = y * self.scales.float()
        return y + self.bias.float() if self.bias is not None else y

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, self.in_features)
        cpu, few = x.device.type == "cpu", x2.shape[0] < DECODE_ROWS
        if cpu and self.grouped and _on_kernels(x2, any_rows=True):
            y = _call("int8_rows", x2, self.weight, self.scales, self.bias).to(x.dtype)
        # torch's weight-only kernel reads 16 inputs at a time with no tail (AVX512): other widths read past each
        # row, giving garbage or a crash, so they take the exact prompt path
        elif cpu and (not few or (not self.dynamic and self.in_features % 16)
                      or (self.dynamic and "fbgemm" not in torch.backends.quantized.supported_engines)):
            y = self._forward_prompt(x2).to(x.dtype)
        elif cpu and self.dynamic and torch.compiler.is_compiling():
            # torch.compile cannot trace fbgemm's packed weights: call the kernel through an opaque custom op
            y = torch.ops.phikit.int8_linear_dynamic(x2.float().contiguous(), self._key, self.out_features)
            y = y.to(x.dtype)
        elif cpu and self.dynamic:
            y = _int8_linear_dynamic(x2.float().contiguous(), self._key, self.out_features).to(x.dtype)
        elif cpu:
            x2 = x2.to(self.scales.dtype).contiguous()
            # the kernel's aligned loads crash on a view that starts mid-way (x[1:] of a row); compiled graphs
            # cannot read addresses, and their own buffers are aligned
            if not torch.compiler.is_compiling() and x2.data_ptr() % 32:
                x2 = x2.clone()
            y = torch.ops.aten._weight_int8pack_mm(x2, self.weight, self.scales).to(x.dtype)
            if self.bias is not None:
                y = y + self.bias
        else:  # GPU: the dequantized matrix is cheap to form; the read of int8 weights is what saves bandwidth
            y = F.linear(x2, self.plain_weight().to(x.dtype)) * self.scales.to(x.dtype)
            if self.bias is not None:
                y = y + self.bias.to(x.dtype)
        return y.reshape(*shape[:-1], self.out_features)

    def kernel_operands(self, dtype: torch.dtype) -> list[torch.Tensor] | None:
        """[weight, scales, bias] for a decoding layer step on the C++ kernels, or None off them."""
        if not self.grouped or self.bias is None or self.scales.dtype != torch.float32:
            return None
        return [self.weight, self.scales, self.bias]

    def extra_repr(self) -> str:
        kind = "activations int8 per block of 32" if self.dynamic else "weight-only"
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 per-channel, {kind}"


def _int8_linear_dynamic(x: torch.Tensor, layer_id: int, out_features: int) -> torch.Tensor:
    """fbgemm's int8 GEMM for the Int8Linear with this id (its packed weights stay outside the compiled graph)."""
    return torch.ops.quantized.linear_dynamic(x, _LIVE_INT8[layer_id]._fbgemm_weights(), not int8_full_range())


_LIB.impl("int8_linear_dynamic", _int8_linear_dynamic, "CPU")


@torch.library.register_fake("phikit::int8_linear_dynamic", lib=_LIB)
def _(x: torch.Tensor, layer_id: int, out_features: int) -> torch.Tensor:
    return x.new_empty(x.shape[0], out_features)


def _int4_shape_problem(in_features: int, out_features: int, group_size: int) -> str | None:
    """Why int4 cannot take a layer of this shape (None when it can)."""
    if group_size not in INT4_GROUP_SIZES:
        return (f"int4 group size must be one of {', '.join(map(str, INT4_GROUP_SIZES))} (torch's int4 kernel), "
                f"got {group_size}")
    if in_features % group_size or out_features % 16:
        return (f"int4 needs in_features ({in_features}) divisible by the group size ({group_size}) and "
                f"out_features ({out_features}) divisible by 16: use int8")
    return None


class Int4Linear(nn.Module):
    """Group-wise asymmetric int4: each run of `group_size` inputs of an output channel has its own scale and
    minimum (w = q * scale + minimum, q in 0..15).

    The codes (`nibbles`, uint8 [out, in / 2]) are stored for the CPU kernels in groups of 16 output channels: per
    group and run of 8 inputs 64 bytes, 4 per channel, byte t holding input t in its low nibble and input 4 + t in
    its high nibble, so that a vector holds the 16 channels side by side and a group is one run of memory. With groups
    of 32 (the default) on the CPU kernels, a group's scale and minimum are 8-bit codes (`scales` uint8, `mins` int8
    [out / 16, in / 32, 16]) times a bf16 step per superblock of 8 groups (`steps` [out / 16, superblocks, 2, 16]:
    the scale's and the minimum's), 4.625 bits per weight in all. Rows run on the C++ kernels, with activations
    rounded to int8 in blocks of 32 (prompts too). Where the C++ kernels are missing (or the group size is not 32),
    more rows dequantize a block of output channels at a time into a float GEMM, and the scales and minimums are bf16
    [out, in / group_size] and decoding runs torch's int4 kernel on its packed copy (`int4pack`,
    `scales_and_zeros`)."""

    def __init__(self, linear: nn.Linear, group_size: int = 32, inner_k_tiles: int = 2) -> None:
        super().__init__()
        self.in_features, self.out_features, self.group_size = linear.in_features, linear.out_features, group_size
        problem = _int4_shape_problem(self.in_features, self.out_features, group_size)
        if problem:
            raise ValueError(problem)
        device = linear.weight.device
        self.native = group_size == 32 and device.type == "cpu" and native.extension() is not None
        groups, channel_groups = self.in_features // group_size, self.out_features // KERNEL_CHANNELS
        # every row is written below
        nibbles = native.empty_weights((self.out_features, self.in_features // 2), torch.uint8, device)
        if self.native:  # codes and steps, written by _stored as each block of channels is quantized
            blocks, superblocks = groups, -(-groups // INT4_SUPERBLOCK)
            self.register_buffer("scales", torch.zeros(channel_groups, blocks, KERNEL_CHANNELS, dtype=torch.uint8,
                                                       device=device))
            self.register_buffer("mins", torch.zeros_like(self.scales, dtype=torch.int8))
            self.register_buffer("steps", torch.zeros(channel_groups, superblocks, 2, KERNEL_CHANNELS,
                                                      dtype=torch.bfloat16, device=device))
        else:  # fp32 while quantizing, bf16 once done
            scales = torch.zeros(self.out_features, groups, device=device)
            mins = torch.zeros_like(scales)
        torch_packed = []
        for start in range(0, self.out_features, BLOCK_ROWS):  # in blocks: no fp32 copy of a whole large matrix
            end = min(start + BLOCK_ROWS, self.out_features)
            w = linear.weight.detach()[start:end].float().reshape(end - start, groups, group_size)
            scale, lo = self._stored((w.amax(-1) - w.amin(-1)) / 15, w.amin(-1), start, end)
            # q is chosen for the scale and minimum actually stored
            q = ((w - lo[..., None]) / scale.clamp(min=1e-12)[..., None]).round().clamp(0, 15).to(torch.uint8)
            halves = q.view(end - start, -1, 2, 4)  # per run of 8 inputs, byte t: input t | input 4 + t << 4
            nibbles[start:end] = side_by_side((halves[:, :, 0] | (halves[:, :, 1] << 4)).view(end - start, -1))
            if not self.native:
                scales[start:end], mins[start:end] = scale, lo
                torch_packed.append(q.view(end - start, -1).to(torch.int32))
        self.register_buffer("nibbles", nibbles)
        if not self.native:  # bf16 scales and minimums, and torch's kernel with its own packing
            self.register_buffer("scales", scales.bfloat16())
            self.register_buffer("mins", mins.bfloat16())
            packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(torch.cat(torch_packed), inner_k_tiles)
            self.register_buffer("int4pack", packed)
            zero = mins + 8 * scales  # torch's kernel: w = (q - 8) * scale + zero
            sz = torch.stack([scales, zero], -1).transpose(0, 1).contiguous().to(torch.bfloat16)
            self.register_buffer("scales_and_zeros", sz)  # [in/group, out, 2], the kernel's layout
        bias = linear.bias.detach().to(torch.bfloat16, copy=True) if linear.bias is not None else None
        self.register_buffer("bias", bias)

    def _stored(self, scale: torch.Tensor, lo: torch.Tensor, start: int, end: int):
        """The scale and minimum [rows, groups] as stored, in fp32: on the C++ kernels 8-bit codes of a superblock's
        steps (written into the layer's buffers), bf16 otherwise."""
        if not self.native:
            return scale.bfloat16().float(), lo.bfloat16().float()
        rows, groups = scale.shape
        superblocks = self.steps.shape[1]
        pad = superblocks * INT4_SUPERBLOCK - groups
        by_super = lambda t: F.pad(t, (0, pad)).view(rows, superblocks, INT4_SUPERBLOCK)  # noqa: E731
        by_group = lambda t: t.view(-1, KERNEL_CHANNELS, *t.shape[1:]).movedim(1, -1)  # noqa: E731  [group, ..., 16]
        step = by_super(scale).amax(-1) / 255
        step_min = by_super(lo).abs().amax(-1) / 127
        step, step_min = step.bfloat16().float(), step_min.bfloat16().float()
        scale_code = (by_super(scale) / step.clamp(min=1e-30)[..., None]).round().clamp(0, 255)
        min_code = (by_super(lo) / step_min.clamp(min=1e-30)[..., None]).round().clamp(-127, 127)
        channel_groups = slice(start // KERNEL_CHANNELS, end // KERNEL_CHANNELS)
        self.scales[channel_groups] = by_group(scale_code.view(rows, -1)[:, :groups].to(torch.uint8))
        self.mins[channel_groups] = by_group(min_code.view(rows, -1)[:, :groups].to(torch.int8))
        self.steps[channel_groups] = by_group(torch.stack([step, step_min], -1).bfloat16())
        return ((scale_code * step[..., None]).view(rows, -1)[:, :groups],
                (min_code * step_min[..., None]).view(rows, -1)[:, :groups])

    def group_scales_and_mins(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Each group's scale and minimum as fp32 [out, in / group_size], whatever the layout."""
        if not self.native:
            return self.scales.float(), self.mins.float()
        by_channel = lambda t: t.movedim(-1, 1).reshape(self.out_features, *t.shape[1:-1])  # noqa: E731
        steps = by_channel(self.steps.float()).repeat_interleave(INT4_SUPERBLOCK, dim=1)[:, :self.scales.shape[1]]
        return by_channel(self.scales.float()) * steps[..., 0], by_channel(self.mins.float()) * steps[..., 1]

    @property
    def weight(self) -> torch.Tensor:
        """The 4-bit codes (where the layer's weights live, for code that asks any layer for its `weight`)."""
        return self.nibbles

    def dequantize(self, out: torch.Tensor | None = None) -> torch.Tensor:
        """The fp32 weight (written into `out` when given)."""
        if out is None:
            out = torch.empty(self.out_features, self.in_features, device=self.nibbles.device)
        for start in range(0, self.out_features, BLOCK_ROWS):
            end = min(start + BLOCK_ROWS, self.out_features)
            self._dequantize_rows(start, end, out[start:end])
        return out

    def _dequantize_rows(self, start: int, end: int, out: torch.Tensor) -> torch.Tensor:
        """Output channels start:end of the weight, written into `out` (fp32 or bf16 [end - start, in_features]):
        on the C++ kernels in one pass, else in fp32 in torch."""
        if self.native:
            return native.extension().dequantize_int4(self.nibbles, self.scales, self.mins, self.steps, start, end,
                                                      self.in_features, out)
        rows, packed = end - start, rows_of(self.nibbles[start:end]).view(end - start, -1, 1, 4)
        q = torch.cat((packed & 15, packed >> 4), dim=2).view(rows, self.in_features)
        groups = self.in_features // self.group_size
        view = (out if out.dtype == torch.float32 else torch.empty(out.shape)).view(rows, groups, self.group_size)
        view.copy_(q.view(rows, groups, self.group_size))
        view.mul_(self.scales[start:end, :, None].float()).add_(self.mins[start:end, :, None].float())
        return out if view.data_ptr() == out.data_ptr() else out.copy_(view.view(rows, -1))

    def _forward_prompt(self, x2: torch.Tensor) -> torch.Tensor:
        """Many rows: dequantize a block of output channels at a time and multiply it while it is in cache (2x
        faster than dequantizing the whole matrix first, and no full-size scratch copy)."""
        y = blocked_product(x2, self.out_features, self._dequantize_rows, _prompt_dtype())
        return y + self.bias.float() if self.bias is not None else y

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, self.in_features)
        if self.native and _on_kernels(x2, any_rows=True):
            y = _call("int4_rows", x2, self.nibbles, self.scales, self.mins, self.steps, self.bias,
                      self.in_features).to(x.dtype)
        elif x2.shape[0] >= DECODE_ROWS or self.native:
            y = self._forward_prompt(x2).to(x.dtype)
        else:
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2.to(torch.bfloat16).contiguous(), self.int4pack,
                                                           self.group_size, self.scales_and_zeros).to(x.dtype)
            if self.bias is not None:
                y = y + self.bias.to(x.dtype)
        return y.reshape(*shape[:-1], self.out_features)

    def kernel_operands(self, dtype: torch.dtype) -> list[torch.Tensor] | None:
        """[codes, scales, mins, steps, bias] for a decoding layer step on the C++ kernels, or None off them."""
        if not self.native or self.bias is None:
            return None
        return [self.nibbles, self.scales, self.mins, self.steps, self.bias]

    def extra_repr(self) -> str:
        kind = "C++ kernels" if self.native else "torch's int4 kernel"
        return (f"in_features={self.in_features}, out_features={self.out_features}, int4 group={self.group_size}, "
                f"{kind}")


def activation_dtype(mode: str, device: torch.device, dtype: torch.dtype) -> torch.dtype:
    """The dtype a model quantized in `mode` keeps its other weights (embedding, LayerNorms) and activations in:
    on the CPU fp32 for int8 (its kernels take fp32 rows), bf16 for int8-weight-only and int4 (torch's weight-only
    kernels take bf16); on a GPU the model's own dtype, fp32 made bf16."""
    if torch.device(device).type == "cpu":
        return torch.float32 if mode == "int8" else torch.bfloat16
    return torch.bfloat16 if dtype == torch.float32 else dtype


@torch.no_grad()
def quantize_model(model: nn.Module, mode: str, group_size: int = 32, release=None) -> nn.Module:
    """Replace every nn.Linear (lm_head included) by its quantized form, in place, one layer at a time; returns the
    model. `release(tensor)`, when given, is called with each original weight once it has been quantized (the
    loader gives its file pages back), so the original and quantized models are never held whole side by side.

    The other weights and the activations take activation_dtype(mode). An int8 model on the CPU keeps its KV cache
    in bf16 (`cache_dtype`), as llama.cpp keeps f16: its fp32 activations would make the cache of 8 sequences of 160
    tokens a third of the bytes of phi-1.5's int8 weights, read at every step. The quantized model can generate but
    not be trained or saved."""
    if mode not in MODES:
        raise ValueError(f"unknown quantization {mode!r}: choose one of {', '.join(MODES)}")
    if getattr(model, "quantized", None):
        raise ValueError(f"model is already quantized ({model.quantized}): load the original weights again")
    first = next(model.parameters())
    device = first.device
    if device.type == "meta":
        raise ValueError("model weights are on the meta device (not loaded): load or materialize them before "
                         "quantizing")
    if mode == "int4" and device.type != "cpu":
        raise ValueError("int4 weight-only quantization runs on the CPU only: use int8 on a GPU")
    dynamic = mode == "int8" and device.type == "cpu"
    act_dtype = activation_dtype(mode, device, first.dtype)
    if mode == "int4":  # checked before changing anything: a refusal half-way would leave a half-quantized model
        for name, m in model.named_modules():
            problem = isinstance(m, nn.Linear) and _int4_shape_problem(m.in_features, m.out_features, group_size)
            if problem:
                raise ValueError(f"{name}: {problem}")

    def quantized(linear: nn.Linear) -> nn.Module:
        q = Int8Linear(linear, act_dtype, dynamic) if mode.startswith("int8") else Int4Linear(linear, group_size)
        return q.to(device)

    def let_go(*linears: nn.Linear) -> None:
        for linear in linears:
            for tensor in (linear.weight, linear.bias):
                if release is not None and tensor is not None:
                    release(tensor)

    for attn in list(model.modules()):  # q, k and v as one layer: one kernel call per step instead of three
        if isinstance(attn, PhiAttention) and attn.qkv_proj is None:
            let_go(*attn.fuse_qkv(quantized))
    replacements = [(parent, name, child) for parent in model.modules()
                    for name, child in parent.named_children() if isinstance(child, nn.Linear)]
    for parent, name, child in replacements:
        setattr(parent, name, quantized(child))
        let_go(child)
    model.to(dtype=act_dtype)  # embeddings and LayerNorms; the quantized buffers keep their integer dtypes
    model.quantized = mode
    if dynamic:
        model.kv_cache_dtype = torch.bfloat16
    model.eval()
    return model
