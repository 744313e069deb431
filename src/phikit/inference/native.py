"""phikit's C++ decoding kernels (cpu_kernels.cpp): built once per machine, cached, chosen from the CPU's flags.

The build (torch.utils.cpp_extension with ninja, ~1 minute) happens the first time a process needs the kernels;
the library lands in the user's cache directory under a key made of the source, the CPU's flags and torch's
version, and is moved there only once complete, so later processes (and other processes racing the first) load
it in milliseconds. The instruction set comes from the CPU's flags. One thing is measured once per machine, by the
first process that loads the built library (about 0.5 s), and kept beside it where the answer was clear (else the
next process measures again; after three unclear answers their majority is kept): whether one or two activation
rows read fp32 and bf16 weights faster one row at a time or several rows at once, which differs between machines
whose CPUs have the same flags (`few_row_streams`).

    PHIKIT_CPU_ISA=avx2       use the AVX2 + FMA kernels even where AVX512 is present (tests, comparisons);
                              =avx512: AVX512 with VNNI but without its bf16 dot products
    PHIKIT_CPU_KERNELS=torch  do not build or load the extension: torch's own kernels, as on a machine without a
                              compiler
    PHIKIT_CPU_STREAMS=one    one or two activation rows read one weight row at a time (=many: several at once),
                              fp32 and bf16 weights both, instead of measuring which is faster
"""
from __future__ import annotations

import collections
import ctypes
import functools
import hashlib
import importlib.util
import json
import math
import mmap
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from types import ModuleType

import torch

SOURCE = Path(__file__).with_name("cpu_kernels.cpp")
MODULE = "phikit_cpu_kernels"
AVX512_FLAGS = ("avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_vnni")
ISAS = {"avx2": 0, "avx512": 1, "avx512_bf16": 2}


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags (Linux /proc/cpuinfo); empty where unknown."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def native_bf16() -> bool:
    """Whether the CPU multiplies bf16 matrices natively (AVX512-BF16 or AMX): oneDNN's bf16 GEMM then beats an
    fp32 upcast several times; without it, it is the slowest choice."""
    return bool({"avx512_bf16", "amx_bf16"} & cpu_flags())


def isa() -> str | None:
    """The kernels' instruction set here: "avx512_bf16" (AVX512 with VNNI and bf16 dot products), "avx512" (with
    VNNI), "avx2" (AVX2 + FMA), or None (none of them: torch's kernels). PHIKIT_CPU_ISA names a lower one to force
    it; asking for more than the CPU has gives what it has."""
    best = _best_isa(cpu_flags())
    wanted = os.environ.get("PHIKIT_CPU_ISA")
    return wanted if best and wanted in ISAS and ISAS[wanted] < ISAS[best] else best


@functools.cache  # every kernel call asks: answered once per set of flags
def _best_isa(flags: frozenset[str]) -> str | None:
    if not {"avx2", "fma", "f16c"} <= flags or torch.backends.cpu.get_cpu_capability() == "DEFAULT":
        return None
    if set(AVX512_FLAGS) <= flags:
        return "avx512_bf16" if "avx512_bf16" in flags else "avx512"
    return "avx2"


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "phikit" / "kernels"


def build_key() -> str:
    """What the compiled library depends on: its source and build flags, torch's version and ABI, the CPU's flags."""
    digest = hashlib.sha256(SOURCE.read_bytes() + Path(__file__).read_bytes())  # the source and its build flags
    digest.update(torch.__version__.encode())
    digest.update(str(torch._C._GLIBCXX_USE_CXX11_ABI).encode())
    digest.update(" ".join(sorted(cpu_flags())).encode())
    return digest.hexdigest()[:16]


def _import(path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(MODULE, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _build(target: Path) -> ModuleType:
    """Compile into a fresh directory beside `target`, then move it into place (another process may have won the
    race meanwhile: its copy is as good)."""
    global _built_here
    from torch.utils import cpp_extension
    target.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=".build-", dir=target.parent))
    try:
        print("phikit: compiling the CPU decoding kernels (once per machine, about a minute)", file=sys.stderr)
        # -fopenmp: at::parallel_for is OpenMP in torch's headers; without it the kernels run on one thread. The
        # library then shares torch's own libgomp (same soname, already loaded), so one thread pool serves both.
        # torch numbers a second build of one name in a process (its build directory differs: a fresh one each
        # time) as MODULE_v1, a library that cannot be imported as MODULE: each build here is a first one.
        cpp_extension.JIT_EXTENSION_VERSIONER.entries.pop(MODULE, None)
        cpp_extension.load(name=MODULE, sources=[str(SOURCE)], build_directory=str(work),
                           extra_cflags=["-O3", "-mavx2", "-mfma", "-mf16c", "-fopenmp"],
                           extra_ldflags=["-fopenmp"], verbose=False)
        _built_here = True
        if target.exists() and not (target / f"{MODULE}.so").exists():
            shutil.rmtree(target, ignore_errors=True)  # a build of ours left without its library
        try:
            os.rename(work, target)
        except OSError:  # already there (a concurrent build finished first)
            pass
        return _import(target / f"{MODULE}.so")
    finally:
        shutil.rmtree(work, ignore_errors=True)


# glibc maps each allocation above a threshold fresh from the system and unmaps it when freed, and its threshold
# moves with the process's history. A decoding step's [rows, vocabulary] temporaries (3 MB each at 16 rows) then
# page-fault anew on every step in some processes and not in others: sampling took twice as long, and serving 16
# rows 0.75x the speed. A fixed 32 MB threshold, with freed heap returned to the system beyond 32 MB, keeps them in
# memory that stays mapped.
KEEP_FREED_BYTES = 32 << 20
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's malloc.h


@functools.cache
def keep_freed_scratch() -> None:
    """Fix glibc's thresholds as above, once per process (not where the user set MALLOC_MMAP_THRESHOLD_ or
    MALLOC_TRIM_THRESHOLD_, nor off glibc)."""
    if {"MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_"} & os.environ.keys():
        return
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(M_MMAP_THRESHOLD, KEEP_FREED_BYTES)
        libc.mallopt(M_TRIM_THRESHOLD, KEEP_FREED_BYTES)
    except (OSError, AttributeError):
        pass


# Weights the decoding kernels stream are read faster from 2 MB pages than from 4 KB ones: one TLB entry covers 512
# times the bytes, and a step reads gigabytes in order (bf16 and fp32 matrices of phi-1.5's shapes, 2 threads, a
# 2-core Zen 4 EPYC: 5-7% more bandwidth). Where transparent huge pages are on "madvise" (a common default), memory
# gets them only when asked, which torch's allocator never does.
HUGE_PAGE = 2 << 20


def empty_weights(shape: tuple[int, ...] | torch.Size, dtype: torch.dtype, device: str | torch.device = "cpu"
                  ) -> torch.Tensor:
    """An uninitialized tensor for weights: on the CPU, where it takes 2 MB or more, in memory the kernel is asked to
    back with 2 MB pages (madvise MADV_HUGEPAGE on its whole 2 MB pages, aligned to 2 MB; it reads as zeros until
    written); elsewhere, or where the system has no such advice, torch.empty."""
    nbytes = math.prod(shape) * dtype.itemsize
    if torch.device(device).type != "cpu" or nbytes < HUGE_PAGE or not hasattr(mmap, "MADV_HUGEPAGE"):
        return torch.empty(shape, dtype=dtype, device=device)
    mapped = mmap.mmap(-1, nbytes + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)  # the tensor keeps it
    start = ctypes.addressof(ctypes.c_char.from_buffer(mapped))
    offset = -start % HUGE_PAGE
    try:  # whole 2 MB pages only: a last partial one would be resident in full
        mapped.madvise(mmap.MADV_HUGEPAGE, offset, nbytes // HUGE_PAGE * HUGE_PAGE)
    except OSError:  # transparent huge pages disabled: 4 KB pages, as torch's
        pass
    return torch.frombuffer(mapped, dtype=torch.uint8, count=nbytes, offset=offset).view(dtype).view(shape)


def move_to_huge_pages(module: torch.nn.Module) -> torch.nn.Module:
    """Copy each CPU parameter and buffer of 2 MB or more of `module` into empty_weights (in place: the same
    parameter objects, their data swapped), for a model built in this process rather than loaded (phikit.load
    places its weights so from the start). Only where nothing else holds the old tensors: their memory would stay
    beside the copies."""
    with torch.no_grad():
        for owner in module.modules():
            for table in (owner._parameters, owner._buffers):
                for name, tensor in table.items():
                    if (tensor is None or tensor.device.type != "cpu" or tensor.is_sparse
                            or tensor.numel() * tensor.element_size() < HUGE_PAGE):
                        continue
                    moved = empty_weights(tensor.shape, tensor.dtype).copy_(tensor)
                    if isinstance(tensor, torch.nn.Parameter):
                        tensor.data = moved
                    else:
                        table[name] = moved
    return module


# What extension() found, once per process (plain globals: compiled graphs read them as constants, where a cached
# function reading /proc could not be traced).
_tried = False
_extension: ModuleType | None = None
_built_here = False  # whether this process compiled the library


def extension() -> ModuleType | None:
    """The compiled kernels, or None (with a one-line notice) where they cannot be had: no AVX2, no compiler or
    ninja, a failed build. None means torch's own kernels: slower, never wrong."""
    global _tried, _extension
    if not _tried:
        _extension, _tried = _load(), True
        if _extension is not None:
            for weights, streams in _few_row_streams_here(_extension).items():
                set_few_row_streams(streams, weights)
    return _extension


# The way one or two activation rows read each type of floating-point weights (the kernels' fp32 way also serves the
# last few channels of int8 weights).
STREAM_TYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
_few_row_streams = {name: "one" for name in STREAM_TYPES}


def few_row_streams() -> dict[str, str]:
    """How the kernels stream fp32 and bf16 weights for one or two activation rows (decoding one or two sequences):
    "one" weight row at a time or "many" at once (8 with AVX512, 4 with AVX2), e.g. {"fp32": "many", "bf16": "one"}."""
    return dict(_few_row_streams)


def set_few_row_streams(streams: str, weights: str | None = None) -> None:
    """Make the kernels read "one" weight row at a time or "many" at once for one or two rows, for `weights` ("fp32"
    or "bf16") or both (tests, comparisons)."""
    if streams not in ("one", "many"):
        raise ValueError(f"few-row streams must be 'one' or 'many', got {streams!r}")
    if weights is not None and weights not in STREAM_TYPES:
        raise ValueError(f"few-row streams are set for fp32 or bf16 weights, got {weights!r}")
    for name in (weights,) if weights else STREAM_TYPES:
        _few_row_streams[name] = streams
        if _extension is not None:
            _extension.set_few_rows_many_streams(streams == "many", STREAM_TYPES[name].itemsize)


STREAMS_FILE = "few_row_streams.json"  # beside the library: what this machine measured
UNCLEAR_FILE = "few_row_streams_unclear.json"  # the answers of measurements that were not clear, until kept
UNCLEAR_LIMIT = 3  # unclear answers after which their majority is kept: the two ways read alike on this host


def _few_row_streams_here(module: ModuleType) -> dict[str, str]:
    """PHIKIT_CPU_STREAMS (for both types) where set, else what this machine measured before (kept beside the
    library, under the same key), else measured now (and kept if clear, or if it is the UNCLEAR_LIMIT-th unclear
    answer: then the majority of those, so that a host never quiet does not pay the measurement in every process);
    but not in the process that built the library, which takes one weight row at a time: there the two ways measured
    alike (192 MB of bf16 weights, 9 rounds: 6.15-6.27 against 6.17-6.33 ms, when a process loading the same library
    read one row 1.03-1.10x faster), a cause not found."""
    forced = os.environ.get("PHIKIT_CPU_STREAMS")
    if forced in ("one", "many"):
        return {name: forced for name in STREAM_TYPES}
    if forced:
        print(f"phikit: PHIKIT_CPU_STREAMS={forced!r} is neither 'one' nor 'many': using what this machine "
              "measured", file=sys.stderr)
    path = cache_dir() / build_key() / STREAMS_FILE
    try:
        kept = json.loads(path.read_text())
        if set(kept) == set(STREAM_TYPES) and set(kept.values()) <= {"one", "many"}:
            return kept
    except (OSError, ValueError):
        pass
    if _built_here:
        return {name: "one" for name in STREAM_TYPES}
    chosen, clear = _faster_few_row_streams(module)
    if not clear:  # another process busy on the cores, or the two ways alike: this process, unless it is the last
        unclear = path.with_name(UNCLEAR_FILE)
        try:
            answers = [a for a in json.loads(unclear.read_text())
                       if isinstance(a, dict) and {a.get(name) for name in STREAM_TYPES} <= {"one", "many"}]
        except (OSError, ValueError, TypeError):
            answers = []
        answers.append(chosen)
        if len(answers) < UNCLEAR_LIMIT:
            _write_whole(unclear, answers)
            return chosen
        chosen = {name: collections.Counter(a.get(name) for a in answers).most_common(1)[0][0]
                  for name in STREAM_TYPES}
    _write_whole(path, chosen)
    try:
        path.with_name(UNCLEAR_FILE).unlink(missing_ok=True)
    except OSError:  # a read-only cache
        pass
    return chosen


def _write_whole(path: Path, value) -> None:
    """`value` as JSON at `path`, written whole and then moved into place: a reader never sees half a file. A
    read-only cache keeps nothing (measured again next time)."""
    written = path.with_name(f".{path.name}.{os.getpid()}")
    try:
        written.write_text(json.dumps(value))
        os.replace(written, path)
    except OSError:
        written.unlink(missing_ok=True)


def _faster_few_row_streams(module: ModuleType) -> tuple[dict[str, str], bool]:
    """The faster way for each weight type on this host: one row of activations against the matrices of phi-1.5's
    layers (one layer in fp32, two in bf16: 192 MB, 6x a 32 MB last-level cache) on 2 MB pages as a model's weights
    lie, each way, 9 rounds in turns after one to warm up, medians compared; about 0.5 s in all. Machines with the
    same CPU flags differ here, and types too: on one 2-core EPYC one fp32 weight row at a time read up to 1.4x
    faster than four; on a 2-core Zen 4 EPYC eight fp32 rows at once read 1.03-1.08x faster than one, and one bf16
    row 1.04-1.08x faster than eight. On 4 KB pages eight bf16 rows read faster there, and one 48 MB matrix, best of
    5 calls, chose differently from run to run. Also whether the answer was clear enough to keep for the machine: each
    type's faster way won at least 7 of the 9 rounds (a measurement beside another busy process, or of two ways
    that read alike, is not)."""
    code, chosen, clear = isa_code(), {}, True
    layer = [(2048, 2048)] * 4 + [(8192, 2048), (2048, 8192)]  # q, k, v, dense, fc1, fc2
    for name, dtype in STREAM_TYPES.items():
        weights = [empty_weights(shape, dtype).fill_(1) for shape in layer * (4 // dtype.itemsize)]
        inputs = {k: torch.ones(1, k, dtype=dtype) for k in (2048, 8192)}
        kernel = module.linear_bf16 if name == "bf16" else module.linear_f32
        times: dict[str, list[float]] = {"one": [], "many": []}
        for turn in range(-1, 9):  # turn -1 warms up (first touch of the weights, the threads)
            for streams in ("one", "many") if turn % 2 else ("many", "one"):
                module.set_few_rows_many_streams(streams == "many", dtype.itemsize)
                start = time.perf_counter()
                for weight in weights:
                    kernel(inputs[weight.shape[1]], weight, None, code)
                if turn >= 0:
                    times[streams].append(time.perf_counter() - start)
        chosen[name] = min(times, key=lambda streams: statistics.median(times[streams]))
        other = "many" if chosen[name] == "one" else "one"
        clear &= sum(a < b for a, b in zip(times[chosen[name]], times[other])) >= 7
        weights.clear()  # one type's 192 MB at a time
    return chosen, clear


def loaded() -> ModuleType | None:
    """The kernels where this process has already looked for them (extension()), else None: for paths every
    forward takes, which should not start a build of their own."""
    return extension() if _tried else None


def forget() -> None:
    """Look for the extension again on next use (tests that change the cache directory or the compiler)."""
    global _tried, _extension
    _tried, _extension = False, None


def _load() -> ModuleType | None:
    if os.environ.get("PHIKIT_CPU_KERNELS") == "torch" or isa() is None:
        return None
    target = cache_dir() / build_key()
    try:
        if (target / f"{MODULE}.so").exists():
            return _import(target / f"{MODULE}.so")
        return _build(target)
    except Exception as e:  # noqa: BLE001 - any build or load failure falls back; the reason is printed
        reason = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
        print(f"phikit: CPU decoding kernels unavailable ({reason[:200]}): using torch's kernels", file=sys.stderr)
        return None


_isa_codes: dict[str | None, int] = {}


def isa_code() -> int:
    """isa() as the kernels number it (AVX2's where there is none), remembered per value of PHIKIT_CPU_ISA: every
    kernel call asks."""
    wanted = os.environ.get("PHIKIT_CPU_ISA")
    code = _isa_codes.get(wanted)
    if code is None:
        code = _isa_codes[wanted] = ISAS[isa() or "avx2"]
    return code
