"""Tokenize documents into flat token shards the trainer reads (the format: phikit.data.shards).

Tokenizing runs as datatrove tasks, one per contiguous piece of the input, so the same command scales from a
laptop to Slurm or Ray (phikit.data.job). The shard directory is built in the work folder `OUTPUT.partial/` and
moved into place when its index is written, so it is never seen half-made. The token stream of each split (its
shards in index order) depends only on the inputs, never on the number of tasks or workers. Each document goes to
the held-out "val" split by a hash of its text, so the split is stable too. Memory stays flat: records stream
through in batches and tokens go to disk as they are made.

    index = pack(["corpus.jsonl"], "shards/", tokenizer_path="tok/", val_fraction=0.01, workers=2)
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from datatrove.pipeline.base import PipelineStep

from .io import DataError, ReadStats, read_records
from .job import (Executor, Stage, WorkFolder, default_tasks, fingerprint, load_once, read_manifests, task_file,
                  write_json)
from .shards import SPLITS, ShardWriter, dtype_for, read_index, write_index


def is_val(text: str, val_fraction: float) -> bool:
    """Held-out membership by a hash of the document text: the same for any task or worker count."""
    if val_fraction <= 0:
        return False
    h = int.from_bytes(hashlib.blake2b(text.encode("utf-8", "replace"), digest_size=8).digest(), "little")
    return h / 2 ** 64 < val_fraction


class TokenizeToShards(PipelineStep):
    """datatrove step: read this task's byte range of every input, tokenize in batches, write one shard per
    split, then a small per-task manifest (written last, so a task either finished or left nothing behind)."""

    name = "phikit pack"
    type = "Tokenizer"

    def __init__(self, inputs: Sequence[str], work: str, text_field: str = "text", val_fraction: float = 0.01,
                 on_error: str = "fail", batch_size: int = 512, tokenizer_threads: bool = True) -> None:
        super().__init__()
        self.tokenizer_threads = tokenizer_threads
        self.inputs = [str(p) for p in inputs]
        self.work = str(work)
        self.text_field = text_field
        self.val_fraction = val_fraction
        self.on_error = on_error
        self.batch_size = batch_size

    def run(self, data=None, rank: int = 0, world_size: int = 1):
        # Several worker processes already use the cores: let each tokenize on one thread, not oversubscribe.
        os.environ["TOKENIZERS_PARALLELISM"] = "true" if self.tokenizer_threads else "false"
        out = Path(self.work) / "shards"
        from phikit.tokenizer import Tokenizer

        tok = load_once("tokenizer", out / "tokenizer.json", Tokenizer.from_file)
        eos = tok.eos_token_id
        writers = {s: ShardWriter(out, f"{s}-{rank:05d}.bin", dtype_for(len(tok))) for s in SPLITS}
        stats = ReadStats()
        docs = {s: 0 for s in SPLITS}
        batch: list[str] = []

        def flush() -> None:
            # encode_batch_fast skips the character offsets we do not need (and uses every core it may).
            encoded = tok.backend.encode_batch_fast(batch, add_special_tokens=False)
            parts: dict[str, list[int]] = {s: [] for s in SPLITS}
            for text, e in zip(batch, encoded):
                split = "val" if is_val(text, self.val_fraction) else "train"
                parts[split] += e.ids
                parts[split].append(eos)
                docs[split] += 1
            for split, ids in parts.items():
                if ids:  # one array per batch, made in the shard's dtype: no int64 copy on the way
                    writers[split].write(np.array(ids, dtype=writers[split].dtype))
                    self.stat_update(f"{split}_tokens", value=len(ids))
            batch.clear()

        for rec in read_records(self.inputs, self.text_field, self.on_error, stats,
                                shard=(rank, world_size), quiet=True):
            batch.append(rec[self.text_field])
            if len(batch) >= self.batch_size:
                flush()
        if batch:
            flush()
        manifest = {s: writers[s].close() | {"documents": docs[s]} for s in SPLITS}
        manifest["skipped"] = stats.skipped
        write_json(task_file(Path(self.work), "tokenize", rank), manifest)
        return iter(())


class IndexStage(PipelineStep):
    """One task: index.json from the tasks' manifests, then the finished shard directory moved into place."""
    name = "phikit pack index"
    type = "Writer"

    def __init__(self, work: str, tasks: int, output: str, vocab_size: int, eos_id: int, settings: dict) -> None:
        super().__init__()
        self.work, self.tasks, self.output = work, tasks, output
        self.vocab_size, self.eos_id, self.settings = vocab_size, eos_id, settings

    def run(self, data=None, rank: int = 0, world_size: int = 1):
        work = Path(self.work)
        manifests = read_manifests(work, "tokenize", self.tasks)
        shards = work / "shards"
        write_index(shards, {s: [m[s] for m in manifests] for s in SPLITS}, self.vocab_size, self.eos_id,
                    documents=sum(m[s]["documents"] for m in manifests for s in SPLITS),
                    skipped_records=[msg for m in manifests for msg in m["skipped"]])
        write_json(shards / RUN_ARGS, self.settings)
        os.replace(shards, self.output)  # an empty directory at the output is replaced too
        return iter(())


RUN_ARGS = ".pack-args.json"  # what a finished shard directory was packed from and how


def pack(inputs: Sequence[str | Path], output_dir: str | Path, tokenizer_path: str | Path | None = None,
         text_field: str = "text", val_fraction: float = 0.01, tasks: int | None = None, workers: int = 2,
         on_error: str = "fail", executor: str | Executor = "local", overwrite: bool = False,
         **cluster: Any) -> dict[str, Any] | None:
    """Tokenize `inputs` into a shard directory with its index.json; returns the index (None when the tasks were
    submitted to Slurm: the directory appears when they finish). A finished directory packed from the same
    inputs and settings is returned as it is; an interrupted run resumes."""
    from phikit.tokenizer import Tokenizer, build_phi_tokenizer

    if not 0 <= val_fraction < 1:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if not isinstance(executor, Executor):
        executor = Executor(executor, workers, cluster)
    executor.check()
    out = Path(output_dir)
    tok = Tokenizer.from_file(tokenizer_path) if tokenizer_path else build_phi_tokenizer()
    tasks = tasks or default_tasks(inputs)
    settings = {"inputs": fingerprint(inputs), "text_field": text_field, "val_fraction": val_fraction,
                "tasks": tasks, "tokenizer": hashlib.sha256(tok.backend.to_str().encode()).hexdigest()}
    if (out / "index.json").exists():
        done = out / RUN_ARGS
        if done.is_file() and json.loads(done.read_text()) == json.loads(json.dumps(settings)):
            return read_index(out)
        raise ValueError(f"{out} holds shards of a different pack run (other inputs or settings): pick a new "
                         f"output directory, or pass --overwrite")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"{out} exists and is not a shard directory: pick a new output directory")
    work = WorkFolder(out, "pack", settings, overwrite)
    shards = work.file("shards")
    shards.mkdir(exist_ok=True)
    tok.save(shards)  # the tokenizer travels with its shards
    load_once("tokenizer", shards / "tokenizer.json", Tokenizer.from_file, tok)
    # Several worker processes already use the cores: then each tokenizes on one thread.
    step = TokenizeToShards(list(map(str, inputs)), str(work.path), text_field, val_fraction, on_error,
                            tokenizer_threads=executor.running(tasks) == 1)
    stages = [Stage("tokenize", step, tasks),
              Stage("index", IndexStage(str(work.path), tasks, str(out), len(tok), tok.eos_token_id, settings), 1)]
    try:
        if not work.run(stages, executor):
            return None
    except DataError:
        work.remove()  # bad input: nothing there to resume (the input must change first)
        raise
    work.remove()
    return read_index(out)
