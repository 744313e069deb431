"""The CPU kernel choices phikit makes on this machine, and the timings behind them.

phikit times candidate kernels once per process (phikit.inference.quant.measure_cpu_kernels) because CPUs differ by several
times in both directions: with native bf16 (AVX512-BF16, AMX) oneDNN's packed products stream weights 2-3x faster
than torch's plain ones; without it, torch.mv and fbgemm's fp16 GEMM win. This prints each timing (ms per pass
over four 4096 x 2048 matrices, or one at 128 rows), the choice, and a JSON line last: attach it to a report of
slow decoding.

    python benchmarks/kernels.py            # or: phikit bench kernels
    python benchmarks/kernels.py --threads 1
"""
from __future__ import annotations

import argparse
import dataclasses
import json

import torch

from phikit.inference.quant import measure_cpu_kernels


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own choice)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    timings: dict[str, float] = {}
    kernels = measure_cpu_kernels(timings)
    for name, seconds in timings.items():
        print(f"{name:<32} {seconds * 1e3:8.2f} ms")
    for field, value in dataclasses.asdict(kernels).items():
        print(f"{field:<32} {value}")
    print(json.dumps({"benchmark": "kernels", "threads": torch.get_num_threads(), "torch": torch.__version__,
                      "cpu_capability": torch.backends.cpu.get_cpu_capability(),
                      "choices": dataclasses.asdict(kernels),
                      "timings_ms": {k: round(v * 1e3, 3) for k, v in timings.items()}}))


if __name__ == "__main__":
    main()
