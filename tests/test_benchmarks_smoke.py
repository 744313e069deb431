"""Every benchmark starts on a fresh install: each script in benchmarks/ runs once with --smoke (a tiny preset) as
a user would start it, and prints its JSON line last. No timings are asserted here; the speed targets live in the
benchmarks themselves. A benchmark is what `phikit bench` lists (a script with a main guard); shared helpers such
as lm_setup.py have none and are left out."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from phikit.commands.bench import BENCH_DIR, available

BENCHMARKS = available()


def test_benchmarks_are_found_and_helpers_left_out():
    assert {"decode", "matvec", "serve"} <= set(BENCHMARKS)
    assert "lm_setup" not in BENCHMARKS


@pytest.mark.parametrize("name", BENCHMARKS)
def test_benchmark_smoke_run_prints_its_json_line(name, tmp_path):
    # From a directory of its own, as `python benchmarks/NAME.py` is run: the script's folder comes first on the
    # path, so a benchmark named like an installed package would shadow it and fail here.
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    done = subprocess.run([sys.executable, str(BENCH_DIR / f"{name}.py"), "--smoke"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    last = done.stdout.strip().splitlines()[-1]
    assert isinstance(json.loads(last), dict), last
