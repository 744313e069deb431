"""`phikit bench NAME [ARGS]`: run benchmarks/NAME.py (each prints a JSON line last)."""
from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parents[3] / "benchmarks"


def available() -> list[str]:
    """The benchmarks: scripts in benchmarks/ with a main guard. Helpers the benchmarks share (lm_setup.py) sit
    beside them without one, and are not benchmarks."""
    if not BENCH_DIR.is_dir():
        return []
    return sorted(p.stem for p in BENCH_DIR.glob("*.py")
                  if not p.stem.startswith("_") and '__name__ == "__main__"' in p.read_text(encoding="utf-8"))


def configure(p: argparse.ArgumentParser) -> None:
    # Optional, so that a bare `phikit bench` names the benchmarks instead of argparse's "name, rest are required".
    names = ", ".join(available()) or "decode, serve, eval, pack, train"
    p.add_argument("name", nargs="?", help=f"benchmark: {names}")
    p.add_argument("rest", nargs=argparse.REMAINDER, help="arguments passed to the benchmark (see NAME --help)")
    p.epilog = "examples:\n  phikit bench decode\n  phikit bench decode --help"


def run(args: argparse.Namespace) -> int:
    choices = ", ".join(available()) or "none found"
    if not args.name:
        raise ValueError(f"name a benchmark: phikit bench NAME, NAME one of {choices}")
    script = BENCH_DIR / f"{args.name}.py"
    if args.name not in available():
        raise ValueError(f"no benchmark named {args.name!r}: choose one of {choices} "
                         "(benchmarks/ lives in the source checkout)")
    return subprocess.call([sys.executable, str(script), *args.rest])
