"""The CPU matrix-vector kernels on their own: how fast each precision streams its weights, against the read floor.

Decoding one token reads every weight once, so a kernel is as good as the fraction of the memory's read bandwidth
it reaches. This times phikit's layers (fp32, bf16, int8, int4; the C++ kernels where they are built, else
torch's) at 1, 8 and 16 rows on four phi-1.5-sized matrices (8192 x 2048: far beyond a last-level cache), and
the read floor (summing the same bytes), interleaved and as medians: GB/s of weights read, floor fraction, and
the instruction set in use. Attach its JSON line (the last printed) to a report of slow decoding.

    python benchmarks/matvec.py                    # or: phikit bench matvec
    python benchmarks/matvec.py --isa avx2         # the AVX2 kernels on a CPU that has AVX512
    python benchmarks/matvec.py --smoke            # tiny matrices, seconds
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch

from phikit.inference import native
from phikit.inference.quant import Int4Linear, Int8Linear, prepare_cpu_linears


def layers(precision: str, weights: list[torch.Tensor]) -> list[torch.nn.Module]:
    made = []
    for w in weights:
        linear = torch.nn.Linear(w.shape[1], w.shape[0], bias=False)
        linear.weight.data = w
        if precision == "int8":
            made.append(Int8Linear(linear, torch.float32, dynamic=True))
        elif precision == "int4":
            made.append(Int4Linear(linear))
        else:
            made.append(prepare_cpu_linears(linear.to(torch.bfloat16 if precision == "bf16" else torch.float32)))
    return made


def weight_bytes(layer: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in layer.buffers() if t.dim() >= 2) + \
        sum(p.numel() * p.element_size() for p in layer.parameters() if p.dim() >= 2)


@torch.inference_mode()
def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own choice)")
    p.add_argument("--rows", default="1,8,16", help="comma list of input rows")
    p.add_argument("--precisions", default="fp32,bf16,int8,int4")
    p.add_argument("--repeats", type=int, default=7, help="timed rounds (median kept)")
    p.add_argument("--isa", choices=["avx2", "avx512"], help="force an instruction set (default: the CPU's best)")
    p.add_argument("--smoke", action="store_true",
                   help="tiny matrices and 2 rounds: checks that it runs")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.isa:
        os.environ["PHIKIT_CPU_ISA"] = args.isa
    shape, count = ((256, 128), 2) if args.smoke else ((8192, 2048), 4)
    repeats = 2 if args.smoke else args.repeats
    gen = torch.Generator().manual_seed(0)
    weights = [torch.randn(*shape, generator=gen) * 0.02 for _ in range(count)]
    floor_data = torch.ones(sum(w.numel() for w in weights))  # the fp32 bytes, read by a sum
    results = {}
    for precision in args.precisions.split(","):
        made = layers(precision, weights)
        nbytes = sum(weight_bytes(m) for m in made)
        dtype = torch.float32 if precision in ("fp32", "int8") else torch.bfloat16
        for rows in (int(r) for r in args.rows.split(",")):
            x = torch.randn(rows, shape[1], generator=gen).to(dtype)
            times, floor = [], []
            for _ in range(repeats + 1):  # the first round warms up
                start = time.perf_counter()
                for m in made:
                    m(x)
                times.append(time.perf_counter() - start)
                start = time.perf_counter()
                floor_data[:nbytes // 4].sum()
                floor.append(time.perf_counter() - start)
            kernel_s, floor_s = statistics.median(times[1:]), statistics.median(floor[1:])
            row = {"gb_s": round(nbytes / kernel_s / 1e9, 2), "floor_fraction": round(floor_s / kernel_s, 3)}
            results[f"{precision}-{rows}"] = row
            print(f"{precision:>5} {rows:>3} rows {row['gb_s']:7.2f} GB/s  floor fraction {row['floor_fraction']:.2f}")
    print(json.dumps({"benchmark": "matvec", "threads": torch.get_num_threads(), "torch": torch.__version__,
                      "isa": native.isa() if native.extension() is not None else "torch",
                      "few_row_streams": native.few_row_streams() if native.extension() is not None else None,
                      "shape": list(shape), "results": results}))


if __name__ == "__main__":
    main()
