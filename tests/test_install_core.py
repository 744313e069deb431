"""`pip install phikit` alone (no extras) in a clean virtual environment: a wheel built from this checkout, its
core dependencies only, and `phikit generate` and `phikit chat` working there on a tiny model."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from phikit.cli import EXTRAS

ROOT = Path(__file__).resolve().parents[1]


def sh(*argv, **kwargs) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(a) for a in argv], capture_output=True, text=True, timeout=900, **kwargs)
    assert proc.returncode == 0, f"{' '.join(map(str, argv))}\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    return proc


@pytest.mark.slow
def test_the_core_install_generates_and_chats(tmp_path, tiny_phi_checkpoint):
    # The wheel, built from a copy of the checkout (the build writes egg-info beside the sources) with this
    # environment's setuptools (no download of a build backend).
    source = tmp_path / "source"
    shutil.copytree(ROOT / "src", source / "src", ignore=shutil.ignore_patterns("*.egg-info", "__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    clean = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    sh(sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", tmp_path / "dist",
       source, env=clean)
    wheel = next((tmp_path / "dist").glob("phikit-*.whl"))
    venv = tmp_path / "venv"
    sh(sys.executable, "-m", "venv", venv, env=clean)  # no system site packages: only what the install brings
    pip = [venv / "bin" / "python", "-m", "pip", "install", "-q", "--disable-pip-version-check"]
    # The CPU torch first, as the Makefile does, so that the core's `torch` never resolves to a CUDA build.
    sh(*pip, "torch==2.13.0", env=clean)
    sh(*pip, "-c", ROOT / "constraints.txt", wheel, env=clean)
    python, phikit = venv / "bin" / "python", venv / "bin" / "phikit"
    check = "import importlib.util, sys; print([m for m in sys.argv[1:] if importlib.util.find_spec(m)])"
    assert sh(python, "-c", check, *EXTRAS, env=clean).stdout.strip() == "[]"  # no extra came with the core
    env = {"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"}
    out = sh(phikit, "generate", "--model", tiny_phi_checkpoint, "--prompt", "def add(a, b):",
             "--max-new-tokens", "5", cwd=tmp_path, env=env)
    assert out.stdout.strip() and "new tokens" in out.stderr
    chat = sh(phikit, "chat", "--model", tiny_phi_checkpoint, "--max-new-tokens", "4", input="Hello there!\n/exit\n",
              cwd=tmp_path, env=env)
    assert "Bob> " in chat.stdout
    # A verb of an extra says what to install, in one line.
    serve = subprocess.run([phikit, "serve", "--model", tiny_phi_checkpoint], capture_output=True, text=True, env=env)
    assert serve.returncode == 2 and "pip install 'phikit[serve]'" in serve.stderr
    assert len(serve.stderr.strip().splitlines()) == 1
