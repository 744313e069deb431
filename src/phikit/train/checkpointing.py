"""Training checkpoints: atomic, checksummed, resumable, exportable with `phikit.save`.

Layout: RUN/checkpoints/step-00000100/
  __*.distcp, .metadata   model + optimizer state (torch.distributed.checkpoint: every process writes its
                          shard in parallel, and a checkpoint loads under a different number of processes)
  rng-rank{R}.pt          each process's torch RNG states (dropout)
  trainer.json            step, scaler, guard counters, the run config
  manifest.json           sha256 of every file above; written last, so its presence marks a complete checkpoint

A checkpoint is written into a temporary directory and renamed into place; a crash mid-write leaves no
`step-*` directory. On resume, checkpoints are tried newest first and one whose files do not match the manifest
is skipped with a warning.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from ..files import move_into_place
from .distributed import DistEnv, barrier, broadcast_object

MANIFEST = "manifest.json"


@contextlib.contextmanager
def _quiet():
    """One process without a process group is a normal way to train here, not something DCP should warn about."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        yield


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def checkpoint_dir(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / "checkpoints" / f"step-{step:08d}"


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete-looking checkpoints, newest first."""
    root = Path(run_dir) / "checkpoints"
    found = [p for p in root.glob("step-*") if p.is_dir() and p.name[5:].isdigit()] if root.is_dir() else []
    return sorted(found, key=lambda p: int(p.name[5:]), reverse=True)


def verify(path: Path) -> str | None:
    """None when every file matches the manifest, else the reason it does not."""
    manifest = path / MANIFEST
    if not manifest.is_file():
        return "manifest.json missing (interrupted write)"
    try:
        files = json.loads(manifest.read_text())["files"]
    except (ValueError, KeyError):
        return "manifest.json unreadable"
    for name, digest in files.items():
        f = path / name
        if not f.is_file():
            return f"{name} missing"
        if _sha256(f) != digest:
            return f"{name} does not match its checksum"
    return None


def save_checkpoint(run_dir: Path, step: int, model, optimizer, trainer_state: dict[str, Any], env: DistEnv,
                    keep_last: int) -> Path:
    """Every process calls this; returns the final checkpoint directory."""
    final = checkpoint_dir(run_dir, step)
    tmp = final.with_name(f".tmp-{final.name}")
    if env.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier(env)
    model_sd, optim_sd = get_state_dict(model, optimizer)
    with _quiet():
        dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=tmp)
    rng = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state()
    torch.save(rng, tmp / f"rng-rank{env.rank}.pt")
    barrier(env)
    if env.is_main:
        (tmp / "trainer.json").write_text(json.dumps({**trainer_state, "step": step}, indent=2))
        files = {p.name: _sha256(p) for p in sorted(tmp.iterdir()) if p.is_file()}
        (tmp / MANIFEST).write_text(json.dumps({"step": step, "files": files}, indent=2))
        move_into_place(tmp, final, "checkpoint")  # a re-run of the same step replaces it
        for old in list_checkpoints(run_dir)[keep_last:]:
            shutil.rmtree(old, ignore_errors=True)
    barrier(env)
    return final


def find_resumable(run_dir: Path, env: DistEnv) -> Path | None:
    """The newest checkpoint that verifies; warns about each corrupt one skipped. Same answer on every process."""
    choice = None
    if env.is_main:
        for path in list_checkpoints(run_dir):
            problem = verify(path)
            if problem is None:
                choice = str(path)
                break
            warnings.warn(f"skipping corrupt checkpoint {path}: {problem}; falling back to an older one",
                          stacklevel=2)
    choice = broadcast_object(choice, env)
    return Path(choice) if choice else None


def load_checkpoint(path: Path, model, optimizer, env: DistEnv) -> dict[str, Any]:
    """Restore model, optimizer and this process's RNG in place; returns trainer.json."""
    model_sd, optim_sd = get_state_dict(model, optimizer)
    state = {"model": model_sd, "optim": optim_sd}
    with _quiet():
        dcp.load(state, checkpoint_id=path)
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    rng_file = path / f"rng-rank{env.rank}.pt"
    if rng_file.is_file():  # absent when resuming with more processes than wrote the checkpoint
        rng = torch.load(rng_file, weights_only=True)
        torch.set_rng_state(rng["cpu"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state(rng["cuda"])
    return json.loads((path / "trainer.json").read_text())


def load_model_weights(path: Path, model) -> None:
    """Only the model weights of a checkpoint, into a plain (unwrapped) model on one process."""
    state = {"model": model.state_dict()}
    with _quiet():
        dcp.load(state, checkpoint_id=path, planner=dcp.DefaultLoadPlanner(allow_partial_load=True))
    model.load_state_dict(state["model"])


def export_checkpoint(path: str | Path, out_dir: str | Path) -> Path:
    """Write a training checkpoint as an HF-native model directory with `phikit.save`."""
    from ..checkpoint import save
    from ..config import PhiConfig
    from ..model import PhiForCausalLM
    from ..tokenizer import Tokenizer

    path = Path(path)
    if path.is_dir() and (path / "checkpoints").is_dir():  # a run directory: take its newest valid checkpoint
        found = find_resumable(path, DistEnv())
        if found is None:
            raise FileNotFoundError(f"{path} has no complete checkpoint to export")
        path = found
    problem = verify(path) if path.is_dir() else "not a directory"
    if problem:
        raise ValueError(f"cannot export {path}: {problem}")
    trainer = json.loads((path / "trainer.json").read_text())
    config = PhiConfig.from_hf_dict(trainer["model_config"])
    with torch.device("meta"):
        model = PhiForCausalLM(config)
    model.to_empty(device="cpu")
    model.make_buffers("cpu")
    load_model_weights(path, model)
    tok_file = path.parents[1] / "tokenizer.json"
    tokenizer = Tokenizer.from_file(tok_file) if tok_file.is_file() else None
    save(model, tokenizer, out_dir)
    return Path(out_dir)
