"""Weight quantization for decoding, and the fast CPU paths of fp32 and bf16 linear layers.

Decoding one token reads every weight once, so its speed is memory bandwidth: int8 weights (1 byte) decode about
twice as fast as bf16 and four times as fast as fp32, when the kernel keeps up with memory. Prompts (many rows at
once) are compute-bound instead, so prompt-sized inputs of quantized layers dequantize one layer at a time and
run a matrix-matrix product: in bf16 where bf16 GEMM is native, else in fp32 (exact).

    quantize_model(model, "int8")              int8 weights, one scale per output channel. On the CPU, decoding
                                               runs fbgemm's int8 GEMM, which also rounds each call's activations to
                                               8 bits (one scale per call, as llama.cpp's q8_0 rounds them per block);
                                               on a GPU it is weight-only.
    quantize_model(model, "int8-weight-only")  the same weights; activations stay bf16 (torch's _weight_int8pack_mm),
                                               exact but ~3x slower on a CPU without VNNI
    quantize_model(model, "int4")              group-wise asymmetric int4 (groups of 32 inputs), _weight_int4pack_mm
                                               (every mode first joins each attention's q/k/v into one layer)
    prepare_cpu_linears(model)                 bf16 and fp32 nn.Linear layers on the CPU run on packed copies of
                                               their weights in the kernels measured fastest on this CPU
                                               (CpuKernels: they differ by 2-5x between CPUs with and without
                                               native bf16)
"""
from __future__ import annotations

import functools
import os
import threading
import time
import warnings
import weakref
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

# Inputs with at least this many rows (prompt processing) take the fp32 path on the CPU; fewer rows (decoding,
# small batches) use the low-precision kernels, which win as long as reading the weights dominates.
PREFILL_ROWS = 16
# int4 prompts dequantize this many output channels at a time (4 MB of fp32 at phi-1.5's width): the block stays
# in cache between dequantizing and multiplying (1024: 0.97x the time, 512: 1x, 128: 1.26x on 2 cores).
INT4_BLOCK_ROWS = 512

MODES = ("int8", "int8-weight-only", "int4")
# The group sizes torch's CPU int4 kernel takes (others fail on the first decoding step, not when quantizing).
INT4_GROUP_SIZES = (32, 64, 128, 256)


def _rows(x: torch.Tensor) -> int:
    return x.numel() // x.shape[-1]


_local = threading.local()


def weight_scratch(shape: torch.Size, device: torch.device, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A reusable buffer per weight shape and dtype (and thread) for the prompt path: converting into memory that
    is already mapped is ~6x faster than into a fresh allocation, which page-faults on every call."""
    buffers = _local.__dict__.setdefault("buffers", {})
    key = (tuple(shape), str(device), dtype)
    if key not in buffers:
        # Never an inference tensor (made under torch.inference_mode, as generation and measure_cpu_kernels run):
        # writing into one later under plain no_grad would raise.
        with torch.inference_mode(False):
            buffers[key] = torch.empty(shape, dtype=dtype, device=device)
    return buffers[key]


# Operators that compiled graphs call opaquely. Registered as plain CPU kernels of a library rather than with
# torch.library.custom_op: a decoding step calls them ~100-150 times, and custom_op's Python wrapper made each call
# about 3x dearer (61 against 20 us for a small torch.mv, measured in one process on this CPU). Inference only.
_LIB = torch.library.Library("phikit", "DEF")
_LIB.define("bf16_mv(Tensor weight, Tensor x) -> Tensor")
_LIB.define("packed_linear(Tensor x, int layer_id, int out_features) -> Tensor")
_LIB.define("int8_linear_dynamic(Tensor x, int layer_id, int out_features) -> Tensor")


def _bf16_mv(weight: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """torch.mv, kept whole inside torch.compile graphs (see Bf16Linear)."""
    return torch.mv(weight, x)


_LIB.impl("bf16_mv", _bf16_mv, "CPU")


@torch.library.register_fake("phikit::bf16_mv", lib=_LIB)
def _(weight: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return weight.new_empty(weight.shape[0])


class _PackedOutsideGraphs:
    """A layer with a packed copy of its weights that torch.compile cannot trace: the compiled graph calls a
    custom op with the layer's `_key`, which finds the layer in its class's `_registry`. Copies and pickles leave
    the packed copy out (it is made again on use) and register under their own key."""

    _registry: "weakref.WeakValueDictionary[int, nn.Module]"

    def _register(self) -> None:
        self._key = id(self)
        self._registry[self._key] = self

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_packed"] = None
        return state

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        self._register()


_LIVE_PACKED: "weakref.WeakValueDictionary[int, _PackedCpuLinear]" = weakref.WeakValueDictionary()
_LIVE_INT8: "weakref.WeakValueDictionary[int, Int8Linear]" = weakref.WeakValueDictionary()


@dataclass(frozen=True)
class CpuKernels:
    """Which kernel each CPU linear path takes. CPUs differ by several times here, in both directions: with native
    bf16 (AVX512-BF16, AMX) oneDNN's packed products stream weights 2.5-3.3x faster than torch's plain
    matrix-vector product, and bf16 GEMM beats an fp32 upcast 5x; without it, torch.mv and fbgemm's fp16 GEMM win
    and bf16 GEMM is the slowest choice. So the choices are measured once per process (measure_cpu_kernels); the
    defaults are the right ones for CPUs without native bf16."""

    fp32_single_row_packed: bool = False  # one row (decoding) on the oneDNN-packed fp32 copy, not F.linear
    bf16_packing: str = "fp16"            # bf16 layers' packed copy: "fp16" (fbgemm's GEMM) or "bf16" (oneDNN's)
    bf16_single_row_packed: bool = False  # one row on that copy, not torch.mv
    bf16_native_gemm: bool = False        # prompt-sized inputs in bf16 F.linear, not on an fp32 upcast
    int8_full_range: bool = False         # int8 layers round activations to 8 bits, not 7 (fbgemm sums exactly)
    int4_kernel_max_rows: int = 16        # int4 inputs of fewer rows take torch's int4 kernel, more dequantize
    int8_kernel_max_rows: int = 16        # int8 inputs of fewer rows take fbgemm's int8 GEMM, more a bf16/fp32 one


_kernels: CpuKernels | None = None
_DEFAULT_KERNELS = CpuKernels()
# Another kernel than the default is chosen only when it is this much faster: the host's speed drifts by 10-30%.
_CLEAR_WIN = 1.25


def _seconds(fn, repeats: int = 3) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


@torch.inference_mode()
def measure_cpu_kernels(timings: dict[str, float] | None = None) -> CpuKernels:
    """Time each candidate kernel on this CPU and return the choices (about 0.7 s on 2 cores); `timings`, when
    given, receives each candidate's best time in seconds (benchmarks/kernels.py prints them). Four 4096 x 2048
    matrices (128 MB in fp32, 64 MB in bf16) exceed a last-level cache, so a pass streams weights from memory as
    decoding does; prompts are timed at 128 rows."""
    timings = {} if timings is None else timings

    def timed(name: str, fn) -> float:
        timings[name] = _seconds(fn)
        return timings[name]

    gen = torch.Generator().manual_seed(0)
    fp32 = [torch.randn(4096, 2048, generator=gen) * 0.02 for _ in range(4)]
    bf16 = [w.bfloat16() for w in fp32]
    row, rows, prompt = (torch.randn(n, 2048, generator=gen) for n in (1, 8, 128))
    choice = {}
    onednn = packed_fp32_available()
    if onednn:
        try:
            packed = [torch.ops.mkldnn._reorder_linear_weight(w, 8) for w in fp32]
            plain = timed("fp32 one row, F.linear", lambda: [F.linear(row, w) for w in fp32])
            fast = timed("fp32 one row, oneDNN packed", lambda: [
                torch.ops.mkldnn._linear_pointwise(row, p, None, "none", [], "") for p in packed])
            choice["fp32_single_row_packed"] = fast * _CLEAR_WIN < plain
            del packed
        except RuntimeError:  # a oneDNN build without these kernels for this CPU: keep the plain product
            onednn = False
    prompt_bf16, scratch = prompt.bfloat16(), torch.empty(bf16[0].shape)
    native = timed("bf16 128 rows, bf16 GEMM", lambda: F.linear(prompt_bf16, bf16[0]))
    upcast = timed("bf16 128 rows, fp32 upcast", lambda: F.linear(prompt, scratch.copy_(bf16[0])).bfloat16())
    choice["bf16_native_gemm"] = native * _CLEAR_WIN < upcast
    products = {}  # packing -> (one row, 8 rows) on the packed copy
    if packed_fp16_available():
        packed16 = [torch.ops.quantized.linear_prepack_fp16(w.float(), None) for w in bf16]
        products["fp16"] = [timed(f"bf16 {len(x)} row(s), fbgemm fp16 packed", lambda: [
            torch.ops.quantized.linear_dynamic_fp16(x, p) for p in packed16]) for x in (row, rows)]
        del packed16
    if onednn and packed_bf16_available():
        try:
            packed_bf16 = [torch.ops.mkldnn._reorder_linear_weight(w, 8) for w in bf16]
            products["bf16"] = [timed(f"bf16 {len(x)} row(s), oneDNN packed", lambda: [
                torch.ops.mkldnn._linear_pointwise(x, p, None, "none", [], "") for p in packed_bf16])
                for x in (row.bfloat16(), rows.bfloat16())]
            del packed_bf16
        except RuntimeError:  # a oneDNN build without bf16 kernels
            pass
    if products:
        packing = "fp16" if "fp16" in products else "bf16"
        if "bf16" in products and "fp16" in products:
            # Where bf16 is native its own GEMM also serves prompts of any length, so a tie goes to it.
            margin = 1.0 if choice["bf16_native_gemm"] else _CLEAR_WIN
            if products["bf16"][1] * margin < products["fp16"][1]:
                packing = "bf16"
        choice["bf16_packing"] = packing
        mv = timed("bf16 1 row(s), torch.mv", lambda: [torch.mv(w, row[0].bfloat16()) for w in bf16])
        choice["bf16_single_row_packed"] = products[packing][0] * _CLEAR_WIN < mv
    choice["int8_full_range"] = _int8_full_range_is_exact()
    choice.update(_quantized_kernel_limits(fp32[0], CpuKernels(**choice), timed))
    return CpuKernels(**choice)


def _kernel_max_rows(name: str, kernel, prompt_path, make_input, candidates: tuple[int, ...], beyond: int,
                     timed) -> int:
    """The fewest rows among `candidates` at which a quantized kernel stops clearly beating its prompt path
    (`beyond` when it wins at all of them): the kernel's time grows with the rows, the prompt path's hardly."""
    for rows in candidates:
        x = make_input(rows)
        fast = timed(f"{name} {rows} rows, quantized kernel", lambda: kernel(x))
        slow = timed(f"{name} {rows} rows, prompt path", lambda: prompt_path(x))
        if fast * _CLEAR_WIN >= slow:
            return rows
    return beyond


def _quantized_kernel_limits(weight: torch.Tensor, kernels: CpuKernels, timed) -> dict[str, int]:
    """int4_kernel_max_rows and int8_kernel_max_rows for this CPU.
    - int4: torch's int4 kernel against the blocked dequantization. With native bf16 the kernel wins up to 64-96
      rows (3.2 against 6.6 ms for an 8192 x 2048 layer at 32 rows), so batches of 16-63 rows stay on it.
    - int8: fbgemm's int8 GEMM against the integer weights in a bf16 or fp32 GEMM. fbgemm rounds all rows'
      activations to 8 (or 7) bits with one scale, so inputs of 64 rows or more, prompts, keep the precise path
      whatever the speed. With VNNI fbgemm wins at every size (0.35 against 2.27 ms at 16 rows)."""
    layer = nn.Linear(weight.shape[1], weight.shape[0], bias=False)
    layer.weight.data = weight
    int4 = Int4Linear(layer)
    with use_cpu_kernels(kernels):
        limits = {"int4_kernel_max_rows": _kernel_max_rows(
            "int4", lambda x: torch.ops.aten._weight_int4pack_mm_for_cpu(x, int4.weight, int4.group_size,
                                                                          int4.scales_and_zeros),
            int4._forward_prompt, lambda n: torch.randn(n, weight.shape[1]).bfloat16(), (16, 32, 64, 128, 256),
            512, timed)}
        limits["int8_kernel_max_rows"] = PREFILL_ROWS
        if "fbgemm" in torch.backends.quantized.supported_engines:
            int8 = Int8Linear(layer, torch.float32, dynamic=True)
            limits["int8_kernel_max_rows"] = _kernel_max_rows(
                "int8", lambda x: torch.ops.quantized.linear_dynamic(x, int8._fbgemm_weights(),
                                                                     not kernels.int8_full_range),
                int8._forward_prompt, lambda n: torch.randn(n, weight.shape[1]), (16, 32), 64, timed)
    return limits


def _int8_full_range_is_exact() -> bool:
    """Whether fbgemm's int8 product is exact with 8-bit activations. Without VNNI it adds pairs of u8 x s8
    products in int16, which saturates (255 * 127 * 2 > 32767), so activations get 7 bits; with VNNI the pairs go
    straight to int32. Tested, not assumed: the worst case (activations 255, weights +-127) against fp32."""
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


def cpu_kernels() -> CpuKernels:
    """This process's kernel choices, measured on first use (PHIKIT_CPU_KERNELS=default takes the defaults
    without measuring, for runs that must not depend on the host)."""
    global _kernels
    if _kernels is None:
        _kernels = CpuKernels() if os.environ.get("PHIKIT_CPU_KERNELS") == "default" else measure_cpu_kernels()
    return _kernels


def _current_kernels() -> CpuKernels:
    """The choices in force, without measuring (layers read this on every call, also inside compiled graphs)."""
    return _kernels if _kernels is not None else _DEFAULT_KERNELS


@contextmanager
def use_cpu_kernels(kernels: CpuKernels):
    """Run the CPU layers on these choices inside the block (tests, comparisons); packed copies follow."""
    global _kernels
    previous, _kernels = _kernels, kernels
    try:
        yield kernels
    finally:
        _kernels = previous


class _PackedCpuLinear(_PackedOutsideGraphs, nn.Linear):
    """nn.Linear whose multi-row inputs, on the CPU and outside autograd, run on a packed copy of its weights in a
    faster kernel's layout. The copy (one more copy of the weights) is made on first use, remade when the weights
    change (a training step), and skipped while memory is short (it would leave less than a fifth of the machine
    free): the plain path is slower, not wrong. Subclasses say how to pack and how to multiply."""

    _packed: tuple | None = None
    _registry = _LIVE_PACKED
    _packed_bytes_per_weight = 4

    def _pack(self):
        raise NotImplementedError

    def _multiply_packed(self, x: torch.Tensor, packed) -> torch.Tensor:
        raise NotImplementedError

    def _multiply_unpacked(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)

    def _packing(self) -> str:
        """The packed copy's format (a change of format makes it again)."""
        return ""

    def _packed_weight(self):
        # Inference tensors (weights loaded under torch.inference_mode) keep no version counter; they cannot be
        # trained, and changing them in place needs inference_mode, so their address alone identifies them.
        key = (self._packing(),) + tuple((t.data_ptr(), None if t.is_inference() else t._version)
                                         for t in (self.weight, self.bias) if t is not None)
        # Read once into a local: another thread may reset self._packed (weights changed) between two reads.
        packed = self._packed
        if packed is None or packed[0] != key:
            self._packed = None  # frees the old copy before the new one is made
            # Short of memory: remember the refusal (None) for these weights.
            need = self.weight.numel() * self._packed_bytes_per_weight
            packed = (key, self._pack() if _memory_to_spare(need) else None)
            self._packed = packed
        return packed[1]

    def multiply_rows(self, x2: torch.Tensor) -> torch.Tensor:
        """x2 [rows, in_features], contiguous: the product on the packed weights when there are some."""
        packed = self._packed_weight()
        return self._multiply_unpacked(x2) if packed is None else self._multiply_packed(x2, packed)

    def _forward_rows(self, x: torch.Tensor) -> torch.Tensor:
        shape, x2 = x.shape, x.reshape(-1, self.in_features).contiguous()
        if torch.compiler.is_compiling():  # the packed copy cannot be traced: reach it through an opaque operator
            y = torch.ops.phikit.packed_linear(x2, self._key, self.out_features)
        else:
            y = self.multiply_rows(x2)
        return y.reshape(*shape[:-1], self.out_features)


class PackedFp32Linear(_PackedCpuLinear):
    """nn.Linear with fp32 weights whose multi-row inputs run on a oneDNN-packed copy of the weights: at 2-128
    rows torch's plain fp32 GEMM is 1.4-5x slower than the blocked layout. Single rows take the packed copy too
    where it was measured faster (CpuKernels.fp32_single_row_packed: 3.3x on an AVX512-BF16 CPU, where torch's
    plain matrix-vector product streams at 23 GB/s of the machine's 50-75), else the plain path.

    The class is swapped in place (same parameters, same state_dict), see prepare_cpu_linears."""

    def _pack(self):
        return torch.ops.mkldnn._reorder_linear_weight(self.weight.detach(), 8)

    def _multiply_packed(self, x: torch.Tensor, packed) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, packed, self.bias, "none", [], "")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (x.device.type == "cpu" and self.weight.dtype == torch.float32 and x.dtype == torch.float32
                and (_rows(x) > 1 or _current_kernels().fp32_single_row_packed) and not torch.is_grad_enabled()):
            return self._forward_rows(x)
        return super().forward(x)


# fp16's largest value: bf16 weights beyond it cannot take the fp16 path (none of phi's come near).
_FP16_MAX = 65504.0
# From about this many rows on, upcasting a layer to fp32 for torch's fp32 GEMM is as fast as fbgemm's fp16 GEMM
# (one phi-1.5 layer, 2 threads: 0.85x its time at 128 rows, 0.98x at 512, 0.93x at 1024).
FP16_PACKED_MAX_ROWS = 512


class Bf16Linear(_PackedCpuLinear):
    """nn.Linear with bf16 weights on the CPU, on the kernels measured fastest for this CPU (CpuKernels).

    - one row (decoding): torch.mv, which streams bf16 weights twice as fast as bf16 F.linear on CPUs without
      native bf16; or, where measured faster (CPUs with AVX512-BF16: 2.7x), the packed copy below;
    - 2 to FP16_PACKED_MAX_ROWS rows (batched decoding, prompts): a packed copy of the weights. Without native bf16,
      fbgemm's fp16 GEMM on an fp16-packed copy, with fp32 activations and accumulation: 4.6x bf16 F.linear at 8
      rows and 1.2-1.3x the fp32 upcast at 128-256 rows (one phi-1.5 layer, 2 threads); bf16 -> fp16 is exact for
      every weight of magnitude 6.1e-5 to 65504 (fp16 has more mantissa bits), smaller ones keep an absolute error
      below 3e-8. With native bf16, oneDNN's bf16 GEMM on a oneDNN-packed copy (2x plain bf16 F.linear at 8 rows).
    - more rows, or no packed copy (memory short, no such kernel): prompt-sized inputs in bf16 F.linear where bf16
      matrix products are native (5x an fp32 upcast), else in fp32 on an upcast copy of one layer at a time; small
      batches in bf16 F.linear.

    The class is swapped in place (same parameters, same state_dict), see prepare_cpu_linears."""

    _packed_bytes_per_weight = 2

    def _packing(self) -> str:
        return _current_kernels().bf16_packing

    def _pack(self):
        if self._packing() == "bf16":
            if not packed_bf16_available():
                return None
            return torch.ops.mkldnn._reorder_linear_weight(self.weight.detach(), 8)
        if not packed_fp16_available() or float(self.weight.detach().abs().max()) > _FP16_MAX:
            return None
        bias = self.bias.detach().float() if self.bias is not None else None
        return torch.ops.quantized.linear_prepack_fp16(self.weight.detach().float(), bias)

    def multiply_rows(self, x2: torch.Tensor) -> torch.Tensor:
        if x2.shape[0] >= FP16_PACKED_MAX_ROWS and self._packing() == "fp16":
            return self._multiply_unpacked(x2)
        return super().multiply_rows(x2)

    def _multiply_packed(self, x: torch.Tensor, packed) -> torch.Tensor:
        if self._packing() == "bf16":
            return torch.ops.mkldnn._linear_pointwise(x, packed, self.bias, "none", [], "")
        return torch.ops.quantized.linear_dynamic_fp16(x.float(), packed).to(x.dtype)

    def _multiply_unpacked(self, x: torch.Tensor) -> torch.Tensor:
        if _rows(x) >= PREFILL_ROWS and not _current_kernels().bf16_native_gemm:
            weight = weight_scratch(self.weight.shape, self.weight.device).copy_(self.weight)
            bias = self.bias.float() if self.bias is not None else None
            return F.linear(x.float(), weight, bias).to(x.dtype)
        return F.linear(x, self.weight, self.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type != "cpu" or self.weight.dtype != torch.bfloat16 or x.dtype != torch.bfloat16:
            return super().forward(x)
        if _rows(x) == 1 and not (_current_kernels().bf16_single_row_packed and not torch.is_grad_enabled()):
            # torch.compile would lower torch.mv to its own (slower) product, so the compiled step calls it opaquely
            mv = torch.ops.phikit.bf16_mv if torch.compiler.is_compiling() else torch.mv
            y = mv(self.weight, x.reshape(-1))
            if self.bias is not None:
                y = y + self.bias
            return y.reshape(*x.shape[:-1], self.out_features)
        if not torch.is_grad_enabled():
            return self._forward_rows(x)
        return super().forward(x)


def _packed_linear(x: torch.Tensor, layer_id: int, out_features: int) -> torch.Tensor:
    """The packed layer with this id applied to x (compiled graphs reach packed weights through this)."""
    return _LIVE_PACKED[layer_id].multiply_rows(x)


_LIB.impl("packed_linear", _packed_linear, "CPU")


@torch.library.register_fake("phikit::packed_linear", lib=_LIB)
def _(x: torch.Tensor, layer_id: int, out_features: int) -> torch.Tensor:
    return x.new_empty(x.shape[0], out_features)


def _memory_to_spare(nbytes: int) -> bool:
    """Whether `nbytes` more leave a fifth of the machine's memory free (Linux; elsewhere assume yes)."""
    try:
        with open("/proc/meminfo") as f:
            info = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in f}
        return info["MemAvailable"] - nbytes > 0.2 * info["MemTotal"]
    except (OSError, KeyError, ValueError, IndexError):
        return True


def packed_fp32_available() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")


@functools.cache
def packed_bf16_available() -> bool:
    """Whether oneDNN packs and multiplies bf16 weights on this CPU (some builds refuse without AVX512)."""
    if not packed_fp32_available():
        return False
    try:
        packed = torch.ops.mkldnn._reorder_linear_weight(torch.ones(16, 16, dtype=torch.bfloat16), 8)
        torch.ops.mkldnn._linear_pointwise(torch.ones(2, 16, dtype=torch.bfloat16), packed, None, "none", [], "")
        return True
    except RuntimeError:
        return False


def packed_fp16_available() -> bool:
    return "fbgemm" in torch.backends.quantized.supported_engines and hasattr(torch.ops.quantized,
                                                                                "linear_prepack_fp16")


def prepare_cpu_linears(model: nn.Module) -> nn.Module:
    """Give every CPU nn.Linear its fast inference path (idempotent; numerics stay those of the layer's dtype or
    better), on the kernels measured fastest for this CPU (cpu_kernels, measured on the first call): bf16 weights
    compute single rows with torch.mv or a packed copy, several rows on a packed copy (fbgemm fp16 or oneDNN bf16)
    (Bf16Linear); fp32 weights compute several rows, and single rows where that is faster, on oneDNN-packed
    weights (PackedFp32Linear). A layer whose dtype changed since (model.to) gets the path of its new dtype."""
    packed = packed_fp32_available()
    if any(isinstance(m, (nn.Linear, Int8Linear, Int4Linear)) and m.weight.device.type == "cpu"
           for m in model.modules()):
        cpu_kernels()  # quantized layers read the choices too (their prompt path, int8's activation bits)
    for m in model.modules():
        if type(m) not in (nn.Linear, Bf16Linear, PackedFp32Linear) or m.weight.device.type != "cpu":
            continue
        if m.weight.dtype == torch.bfloat16:
            cls = Bf16Linear
        elif m.weight.dtype == torch.float32 and packed:
            cls = PackedFp32Linear
        else:
            cls = nn.Linear
        if type(m) is not cls:
            m.__class__ = cls
            if cls is not nn.Linear:
                m._packed = None
                m._register()
    return model


class Int8Linear(_PackedOutsideGraphs, nn.Module):
    """y = x @ (q * scale)^T + b with q int8 [out, in] and one scale per output channel (symmetric).

    With `dynamic`, CPU inputs of fewer than CpuKernels.int8_kernel_max_rows rows (16, or up to 64 where measured
    faster) run through fbgemm's int8 GEMM: the activations are rounded to unsigned integers with one scale and
    zero point per call, and the product is exact in int32. 8-bit
    integers where fbgemm sums exactly (VNNI; CpuKernels.int8_full_range), else 7-bit: its non-VNNI kernel sums
    pairs of products in int16, which 8-bit activations can overflow."""

    _registry = _LIVE_INT8

    def __init__(self, linear: nn.Linear, act_dtype: torch.dtype, dynamic: bool = False) -> None:
        super().__init__()
        self.in_features, self.out_features, self.dynamic = linear.in_features, linear.out_features, dynamic
        w = linear.weight.detach().float()
        scale = (w.abs().amax(dim=1) / 127.0).clamp(min=1e-8)
        self.register_buffer("weight", (w / scale[:, None]).round().clamp(-127, 127).to(torch.int8))
        self.register_buffer("scales", scale.to(act_dtype))
        bias = linear.bias.detach().to(act_dtype) if linear.bias is not None else None
        self.register_buffer("bias", bias)
        self._packed = None  # fbgemm's packed copy of the weights, made on first use (not part of the state)
        self._register()

    def dequantize(self) -> torch.Tensor:
        return self.weight.float() * self.scales.float()[:, None]

    def _fbgemm_weights(self) -> torch.ScriptObject:
        if self._packed is None:
            with warnings.catch_warnings():  # quantized-tensor constructors warn about their future in torch
                warnings.simplefilter("ignore")
                qweight = torch._make_per_channel_quantized_tensor(
                    self.weight, self.scales.double(), torch.zeros(self.out_features, dtype=torch.long), 0)
                bias = self.bias.float() if self.bias is not None else None
                self._packed = torch.ops.quantized.linear_prepack(qweight, bias)
        return self._packed

    def _forward_prompt(self, x2: torch.Tensor) -> torch.Tensor:
        """A product with the integer weights, then the per-channel scale on the output (it factors out). In bf16
        where bf16 GEMM is native (4x fp32 there; int8 values are exact in bf16, the activations are rounded to
        bf16), else in fp32, exact."""
        dtype = torch.bfloat16 if _current_kernels().bf16_native_gemm else torch.float32
        weight = weight_scratch(self.weight.shape, x2.device, dtype).copy_(self.weight)
        y = F.linear(x2.to(dtype), weight).float() * self.scales.float()
        return y + self.bias.float() if self.bias is not None else y

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, self.in_features)
        # fbgemm's GEMM only for the dynamic form, up to the measured row count; the weight-only form's kernel is
        # a matrix-vector one, so its prompts start at PREFILL_ROWS
        limit = _current_kernels().int8_kernel_max_rows if self.dynamic else PREFILL_ROWS
        # torch's weight-only kernel reads 16 inputs at a time with no tail (AVX512): other widths read past each
        # row, giving garbage or a crash, so they take the exact prompt path
        if x.device.type == "cpu" and (x2.shape[0] >= limit or (not self.dynamic and self.in_features % 16)):
            y = self._forward_prompt(x2).to(x.dtype)
        elif x.device.type == "cpu" and self.dynamic and torch.compiler.is_compiling():
            # torch.compile cannot trace fbgemm's packed weights: call the kernel through an opaque custom op
            y = torch.ops.phikit.int8_linear_dynamic(x2.float().contiguous(), self._key, self.out_features)
            y = y.to(x.dtype)
        elif x.device.type == "cpu" and self.dynamic:
            y = torch.ops.quantized.linear_dynamic(x2.float().contiguous(), self._fbgemm_weights(),
                                                   not _current_kernels().int8_full_range).to(x.dtype)
        elif x.device.type == "cpu":
            x2 = x2.to(self.scales.dtype).contiguous()
            # the kernel's aligned loads crash on a view that starts mid-way (x[1:] of a row); compiled graphs
            # cannot read addresses, and their own buffers are aligned
            if not torch.compiler.is_compiling() and x2.data_ptr() % 32:
                x2 = x2.clone()
            y = torch.ops.aten._weight_int8pack_mm(x2, self.weight, self.scales).to(x.dtype)
            if self.bias is not None:
                y = y + self.bias
        else:  # GPU: the dequantized matrix is cheap to form; the read of int8 weights is what saves bandwidth
            y = F.linear(x2, self.weight.to(x.dtype)) * self.scales.to(x.dtype)
            if self.bias is not None:
                y = y + self.bias.to(x.dtype)
        return y.reshape(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        kind = "fbgemm dynamic" if self.dynamic else "weight-only"
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 per-channel, {kind}"


def _int8_linear_dynamic(x: torch.Tensor, layer_id: int, out_features: int) -> torch.Tensor:
    """fbgemm's int8 GEMM for the Int8Linear with this id (its packed weights stay outside the compiled graph)."""
    return torch.ops.quantized.linear_dynamic(x, _LIVE_INT8[layer_id]._fbgemm_weights(),
                                              not _current_kernels().int8_full_range)


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
    zero point (w = (q - 8) * scale + zero, q in 0..15), packed for torch's CPU int4 kernel."""

    def __init__(self, linear: nn.Linear, group_size: int = 32, inner_k_tiles: int = 2) -> None:
        super().__init__()
        self.in_features, self.out_features, self.group_size = linear.in_features, linear.out_features, group_size
        problem = _int4_shape_problem(self.in_features, self.out_features, group_size)
        if problem:
            raise ValueError(problem)
        w = linear.weight.detach().float().reshape(self.out_features, -1, group_size)
        lo, hi = w.amin(-1, keepdim=True), w.amax(-1, keepdim=True)
        scale = ((hi - lo) / 15).clamp(min=1e-6)
        q = ((w - lo) / scale).round().clamp(0, 15)
        zero = lo + 8 * scale  # so that (q - 8) * scale + zero == q * scale + lo
        q = q.reshape(self.out_features, self.in_features).to(torch.int32)
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, inner_k_tiles)
        self.register_buffer("weight", packed)
        # [in/group, out, 2] (scale, zero), the kernel's layout
        sz = torch.stack([scale[..., 0], zero[..., 0]], -1).transpose(0, 1).contiguous().to(torch.bfloat16)
        self.register_buffer("scales_and_zeros", sz)
        bias = linear.bias.detach().to(torch.bfloat16) if linear.bias is not None else None
        self.register_buffer("bias", bias)
        # The same 4-bit values two to a byte, for the prompt path (unpacking the kernel's layout is not public):
        # half a byte per weight more, where a byte per weight would double int4's memory.
        q = q.to(torch.uint8)
        self.register_buffer("nibbles", q[:, 0::2] | (q[:, 1::2] << 4), persistent=False)

    def dequantize(self, out: torch.Tensor | None = None) -> torch.Tensor:
        """The fp32 weight (written into `out` when given)."""
        if out is None:
            out = torch.empty(self.out_features, self.in_features, device=self.nibbles.device)
        for start in range(0, self.out_features, INT4_BLOCK_ROWS):
            end = min(start + INT4_BLOCK_ROWS, self.out_features)
            self._dequantize_rows(start, end, out[start:end])
        return out

    def _dequantize_rows(self, start: int, end: int, out: torch.Tensor) -> torch.Tensor:
        """Output channels start:end of the fp32 weight, written into `out` [end - start, in_features]."""
        pairs = out.view(end - start, -1, 2)
        nibbles = self.nibbles[start:end]
        pairs[..., 0].copy_(nibbles & 15)
        pairs[..., 1].copy_(nibbles >> 4)
        scale = self.scales_and_zeros[:, start:end, 0].transpose(0, 1).float()[..., None]
        low = self.scales_and_zeros[:, start:end, 1].transpose(0, 1).float()[..., None] - 8 * scale
        out.view(end - start, -1, self.group_size).mul_(scale).add_(low)  # (q - 8) * scale + zero
        return out

    def _forward_prompt(self, x2: torch.Tensor) -> torch.Tensor:
        """Many rows: dequantize a block of output channels at a time and multiply it while it is in cache. In
        bf16 where bf16 GEMM is native (4x fp32 there), else in fp32. 2x faster than dequantizing the whole
        matrix first (a phi-1.5 fc1 at 128 rows: 10 against 19 ms on 2 cores), and no full-size scratch copy."""
        dtype = torch.bfloat16 if _current_kernels().bf16_native_gemm else torch.float32
        rows = min(INT4_BLOCK_ROWS, self.out_features)
        block = weight_scratch((rows, self.in_features), x2.device)
        block_in_dtype = weight_scratch((rows, self.in_features), x2.device, dtype) if dtype != torch.float32 else None
        x_in_dtype = x2.to(dtype)
        y = torch.empty(x2.shape[0], self.out_features, device=x2.device)
        for start in range(0, self.out_features, rows):
            end = min(start + rows, self.out_features)
            weight = self._dequantize_rows(start, end, block[:end - start])
            if block_in_dtype is not None:
                weight = block_in_dtype[:end - start].copy_(weight)
            y[:, start:end] = F.linear(x_in_dtype, weight)
        if self.bias is not None:
            y += self.bias.float()
        return y

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, self.in_features)
        if x2.shape[0] >= _current_kernels().int4_kernel_max_rows:
            y = self._forward_prompt(x2).to(x.dtype)
        else:
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2.to(torch.bfloat16).contiguous(), self.weight,
                                                           self.group_size, self.scales_and_zeros).to(x.dtype)
            if self.bias is not None:
                y = y + self.bias.to(x.dtype)
        return y.reshape(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int4 group={self.group_size}"


def _fuse_qkv(model: nn.Module) -> None:
    """Each attention's q/k/v projections become one [3d, d] nn.Linear (`qkv_proj`), quantized like the others.
    Exact: the scales are per output channel (int8) or per output channel and input group (int4), and fbgemm
    rounds the one input vector the same way for all three. One kernel call instead of three per layer: on 2 CPU
    cores a pass of fbgemm over phi-1.5's matrices takes 88 ms instead of 107, about 5% of an eager int8 step."""
    for attn in model.modules():
        if not all(isinstance(getattr(attn, n, None), nn.Linear) for n in ("q_proj", "k_proj", "v_proj")) \
                or not hasattr(attn, "qkv_proj"):
            continue
        parts = (attn.q_proj, attn.k_proj, attn.v_proj)
        if len({p.bias is None for p in parts}) > 1:
            continue
        fused = nn.Linear(parts[0].in_features, sum(p.out_features for p in parts),
                          bias=all(p.bias is not None for p in parts), device="meta")
        fused.weight = nn.Parameter(torch.cat([p.weight for p in parts]), requires_grad=False)
        if fused.bias is not None:
            fused.bias = nn.Parameter(torch.cat([p.bias for p in parts]), requires_grad=False)
        del attn.q_proj, attn.k_proj, attn.v_proj
        attn.qkv_proj = fused


@torch.no_grad()
def quantize_model(model: nn.Module, mode: str, group_size: int = 32) -> nn.Module:
    """Replace every nn.Linear (lm_head included) by its quantized form, in place; returns the model.

    On the CPU, "int8" keeps the other weights (embedding, LayerNorms) and the activations in fp32, which fbgemm's
    kernel takes; "int8-weight-only" and "int4" make them bf16, which torch's weight-only kernels are fast with.
    The quantized model can generate but not be trained or saved."""
    if mode not in MODES:
        raise ValueError(f"unknown quantization {mode!r}: choose one of {', '.join(MODES)}")
    if getattr(model, "quantized", None):
        raise ValueError(f"model is already quantized ({model.quantized}): load the original weights again")
    device = next(model.parameters()).device
    if device.type == "meta":
        raise ValueError("model weights are on the meta device (not loaded): load or materialize them before "
                         "quantizing")
    if mode == "int4" and device.type != "cpu":
        raise ValueError("int4 weight-only quantization runs on the CPU only: use int8 on a GPU")
    dynamic = mode == "int8" and device.type == "cpu" and "fbgemm" in torch.backends.quantized.supported_engines
    act_dtype = next(model.parameters()).dtype
    if device.type == "cpu":
        act_dtype = torch.float32 if dynamic else torch.bfloat16
    elif act_dtype == torch.float32:
        act_dtype = torch.bfloat16
    if mode == "int4":  # checked before changing anything: a refusal half-way would leave a half-quantized model
        for name, m in model.named_modules():
            problem = isinstance(m, nn.Linear) and _int4_shape_problem(m.in_features, m.out_features, group_size)
            if problem:
                raise ValueError(f"{name}: {problem}")
    _fuse_qkv(model)
    replacements = [(parent, name, child) for parent in model.modules()
                    for name, child in parent.named_children() if isinstance(child, nn.Linear)]
    for parent, name, child in replacements:
        q = Int8Linear(child, act_dtype, dynamic) if mode.startswith("int8") else Int4Linear(child, group_size)
        setattr(parent, name, q.to(device))
    model.to(dtype=act_dtype)  # embeddings and LayerNorms; the quantized buffers keep their integer dtypes
    model.quantized = mode
    model.eval()
    return model
