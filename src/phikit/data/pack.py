"""Tokenize documents into flat token shards the trainer reads ("phikit-shards-v1").

A shard directory holds `index.json`, a copy of the tokenizer, and `<split>-NNNNN.bin` files: flat little-endian
uint16/uint32 token ids with eos after every document. Tokenizing runs as a datatrove pipeline, one task per
byte range of the input, so the same command scales from a laptop (LocalPipelineExecutor) to Slurm or Ray, and the
output depends only on the inputs and `tasks`, never on how many workers run them. Each document goes to the
held-out "val" split by a hash of its text, so the split is stable too. Memory stays flat: records stream through
in batches and tokens go to disk as they are made.

    index = pack(["corpus.jsonl"], "shards/", tokenizer_path="tok/", val_fraction=0.01, workers=2)
    sources = load_mixture("mix.yaml")        # [(Path("shards/"), 0.8), (Path("code/"), 0.2)]
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
from datatrove.pipeline.base import PipelineStep

from .io import ReadStats, expand_paths, read_records

FORMAT = "phikit-shards-v1"
SPLITS = ("train", "val")


def dtype_for(vocab_size: int) -> str:
    return "uint16" if vocab_size <= 1 << 16 else "uint32"


def is_val(text: str, val_fraction: float) -> bool:
    """Held-out membership by a hash of the document text: the same for any task or worker count."""
    if val_fraction <= 0:
        return False
    h = int.from_bytes(hashlib.blake2b(text.encode("utf-8", "replace"), digest_size=8).digest(), "little")
    return h / 2 ** 64 < val_fraction


class ShardWriter:
    """Appends token arrays to `<dir>/<name>.tmp` with a running sha256; `close()` renames it into place."""

    def __init__(self, directory: Path, name: str, dtype: str) -> None:
        self.path = directory / name
        self.tmp = directory / (name + ".tmp")
        self.dtype = np.dtype(dtype).newbyteorder("<")
        self.f = open(self.tmp, "wb")
        self.sha = hashlib.sha256()
        self.tokens = 0

    def write(self, ids: np.ndarray) -> None:
        buf = ids.astype(self.dtype, copy=False).tobytes()
        self.f.write(buf)
        self.sha.update(buf)
        self.tokens += len(ids)

    def close(self) -> dict[str, Any]:
        self.f.close()
        os.replace(self.tmp, self.path)
        return {"file": self.path.name, "tokens": self.tokens, "sha256": self.sha.hexdigest()}


class TokenizeToShards(PipelineStep):
    """datatrove step: read this task's byte range of every input, tokenize in batches, write one shard per
    split, then a small per-task manifest (written last, so a task either finished or left nothing behind)."""

    name = "phikit pack"
    type = "Tokenizer"

    def __init__(self, inputs: Sequence[str], output_dir: str, text_field: str = "text", val_fraction: float = 0.01,
                 on_error: str = "fail", batch_size: int = 512, tokenizer_threads: bool = True) -> None:
        super().__init__()
        self.tokenizer_threads = tokenizer_threads
        self.inputs = [str(p) for p in inputs]
        self.output_dir = str(output_dir)
        self.text_field = text_field
        self.val_fraction = val_fraction
        self.on_error = on_error
        self.batch_size = batch_size

    def run(self, data=None, rank: int = 0, world_size: int = 1):
        # Several worker processes already use the cores: let each tokenize on one thread, not oversubscribe.
        os.environ["TOKENIZERS_PARALLELISM"] = "true" if self.tokenizer_threads else "false"
        out = Path(self.output_dir)
        tok = _tokenizer(out / "tokenizer.json")
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

        for rec in read_records(self.inputs, self.text_field, self.on_error, stats, shard=(rank, world_size)):
            batch.append(rec[self.text_field])
            if len(batch) >= self.batch_size:
                flush()
        if batch:
            flush()
        manifest = {s: writers[s].close() | {"documents": docs[s]} for s in SPLITS}
        manifest["skipped"] = stats.skipped
        _atomic_json(out / f".task-{rank:05d}.json", manifest)
        return iter(())


# One loaded tokenizer per process, by file: a worker process loads it once, not once per task, and local workers
# forked from the process that called pack() inherit the one pack() loaded (no load at all).
_loaded: dict[tuple[str, int], Any] = {}


def _file_key(path: Path) -> tuple[str, int]:
    return str(path.resolve()), path.stat().st_mtime_ns


def _tokenizer(path: Path):
    from phikit.tokenizer import Tokenizer

    key = _file_key(path)
    if key not in _loaded:
        _loaded.clear()
        _loaded[key] = Tokenizer.from_file(path)
    return _loaded[key]


def _atomic_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1) + "\n")
    os.replace(tmp, path)


def make_executor(pipeline: list, tasks: int, workers: int, logging_dir: str, executor: str = "local",
                  **cluster: Any):
    """A datatrove executor: "local" (a process pool on this machine), "slurm" (needs partition=, time=) or
    "ray" (a running Ray cluster). Finished tasks are skipped on rerun: resumable."""
    if executor == "local":
        from datatrove.executor import LocalPipelineExecutor
        return LocalPipelineExecutor(pipeline, tasks=tasks, workers=workers, logging_dir=logging_dir,
                                     start_method="fork" if workers > 1 else "forkserver")
    if executor == "slurm":
        from datatrove.executor import SlurmPipelineExecutor
        if "partition" not in cluster or "time" not in cluster:
            raise ValueError("the slurm executor needs a partition and a time limit: pass --slurm-partition "
                             "and --slurm-time")
        return SlurmPipelineExecutor(pipeline, tasks=tasks, workers=workers, logging_dir=logging_dir, **cluster)
    if executor == "ray":
        from datatrove.executor import RayPipelineExecutor
        return RayPipelineExecutor(pipeline, tasks=tasks, workers=workers, logging_dir=logging_dir, **cluster)
    raise ValueError(f"unknown executor {executor!r}: choose local, slurm or ray")


def default_tasks(inputs: Sequence[str | Path]) -> int:
    """One task per 64 MB of input, at least 4 (so 2-4 local workers all have work): a function of the input
    only, so the shards do not change with the worker count."""
    size = sum(p.stat().st_size for p in expand_paths(inputs))
    return max(4, min(1024, size // (64 << 20) + 1))


def pack(inputs: Sequence[str | Path], output_dir: str | Path, tokenizer_path: str | Path | None = None,
         text_field: str = "text", val_fraction: float = 0.01, tasks: int | None = None, workers: int = 2,
         on_error: str = "fail", executor: str = "local", **cluster: Any) -> dict[str, Any]:
    """Tokenize `inputs` into a shard directory and write its index.json; returns the index."""
    from phikit.tokenizer import Tokenizer, build_phi_tokenizer

    if not 0 <= val_fraction < 1:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer.from_file(tokenizer_path) if tokenizer_path else build_phi_tokenizer()
    existing = out / "tokenizer.json"
    if existing.exists() and json.loads(existing.read_text()) != json.loads(tok.backend.to_str()):
        raise ValueError(f"{out} was packed with a different tokenizer: pick a new output directory")
    tok.save(out)  # the tokenizer travels with its shards
    _loaded.clear()
    _loaded[_file_key(out / "tokenizer.json")] = tok
    tasks = tasks or default_tasks(inputs)
    # Finished tasks are skipped on rerun, which is only right when the rerun asks for the same thing.
    run_args = {"inputs": [str(Path(p).resolve()) for p in inputs], "text_field": text_field,
                "val_fraction": val_fraction, "tasks": tasks}
    args_file = out / ".pack-args.json"
    if args_file.exists() and json.loads(args_file.read_text()) != run_args:
        raise ValueError(f"{out} holds shards of a different pack run (other inputs or settings): pick a new "
                         f"output directory, or pass --overwrite")
    _atomic_json(args_file, run_args)
    step = TokenizeToShards(list(map(str, inputs)), str(out), text_field, val_fraction, on_error,
                            tokenizer_threads=workers == 1)
    make_executor([step], tasks, workers, str(out / ".logs"), executor, **cluster).run()
    return write_index(out, tasks, len(tok), tok.eos_token_id)


def write_index(out: Path, tasks: int, vocab_size: int, eos_id: int) -> dict[str, Any]:
    manifests = []
    for rank in range(tasks):
        m = out / f".task-{rank:05d}.json"
        if not m.exists():
            raise RuntimeError(f"task {rank} of the pack run did not finish (see {out / '.logs'}): rerun the same "
                               f"command to complete it")
        manifests.append(json.loads(m.read_text()))
    index = {
        "format": FORMAT,
        "dtype": dtype_for(vocab_size),
        "eos_id": eos_id,
        "vocab_size": vocab_size,
        "tokenizer": "tokenizer.json",
        # the contract's file entries exactly: file, tokens, sha256 (per-task document counts stay behind)
        "splits": {s: [{k: m[s][k] for k in ("file", "tokens", "sha256")} for m in manifests] for s in SPLITS},
        "documents": sum(m[s]["documents"] for m in manifests for s in SPLITS),
        "skipped_records": [msg for m in manifests for msg in m["skipped"]],
    }
    _atomic_json(out / "index.json", index)
    return index


# --- reading shards (what the trainer uses) --------------------------------------------------------------------

def read_index(directory: str | Path) -> dict[str, Any]:
    """index.json of a shard directory, checked against the format."""
    path = Path(directory) / "index.json"
    if not path.exists():
        raise FileNotFoundError(f"no index.json in {directory}: build shards with `phikit data pack`")
    index = json.loads(path.read_text())
    if index.get("format") != FORMAT:
        raise ValueError(f"{path} has format {index.get('format')!r}, expected {FORMAT!r}: repack the data")
    return index


def open_split(directory: str | Path, split: str = "train", check: bool = False) -> list[np.memmap]:
    """Memory-mapped token arrays of one split (empty shards left out); check=True verifies sha256."""
    directory = Path(directory)
    index = read_index(directory)
    if split not in index["splits"]:
        raise ValueError(f"{directory} has no split {split!r}: it has {', '.join(index['splits'])}")
    arrays = []
    for entry in index["splits"][split]:
        path = directory / entry["file"]
        if check and hashlib.sha256(path.read_bytes()).hexdigest() != entry["sha256"]:
            raise ValueError(f"{path} does not match its sha256 in index.json: the shard is corrupt, repack it")
        if entry["tokens"]:
            arrays.append(np.memmap(path, dtype=np.dtype(index["dtype"]).newbyteorder("<"), mode="r"))
    return arrays


def iter_documents(directory: str | Path, split: str = "train") -> Iterator[np.ndarray]:
    """Each document's token ids (without its eos), in shard order."""
    eos = read_index(directory)["eos_id"]
    for arr in open_split(directory, split):
        ends = np.flatnonzero(arr == eos)
        start = 0
        for end in ends:
            yield np.asarray(arr[start:end])
            start = end + 1


def load_mixture(spec: str | Path) -> list[tuple[Path, float]]:
    """[(shard dir, weight normalized to sum 1)] from a YAML/JSON mixture spec; relative paths are taken
    relative to the spec file."""
    import yaml

    spec = Path(spec)
    if not spec.exists():
        raise FileNotFoundError(f"mixture spec {spec} does not exist")
    data = yaml.safe_load(spec.read_text())  # YAML is a superset of JSON
    sources = (data or {}).get("sources") if isinstance(data, dict) else None
    if not sources:
        raise ValueError(f"{spec}: expected {{'sources': [{{'path': DIR, 'weight': W}}, ...]}}")
    out = []
    for i, s in enumerate(sources):
        if not isinstance(s, dict) or "path" not in s:
            raise ValueError(f"{spec}: source {i} needs a 'path' (a shard directory)")
        weight = float(s.get("weight", 1.0))
        if weight <= 0:
            raise ValueError(f"{spec}: source {i} has weight {weight}: weights must be positive")
        path = Path(s["path"])
        path = path if path.is_absolute() else spec.parent / path
        read_index(path)
        out.append((path, weight))
    total = sum(w for _, w in out)
    return [(p, w / total) for p, w in out]


def write_mixture(spec: str | Path, sources: Sequence[tuple[str | Path, float]]) -> None:
    """Write a mixture spec (YAML or JSON by suffix) after checking every source is a shard directory."""
    import yaml

    for path, weight in sources:
        read_index(path)
        if weight <= 0:
            raise ValueError(f"weight of {path} is {weight}: weights must be positive")
    spec = Path(spec)
    # Readers take relative paths relative to the spec file, so a path given relative to the current directory
    # is rewritten relative to the spec's own directory (absolute paths stay as they are).
    data = {"sources": [{"path": str(p) if Path(p).is_absolute()
                         else os.path.relpath(Path(p).resolve(), spec.parent.resolve()), "weight": float(w)}
                        for p, w in sources]}
    text = json.dumps(data, indent=2) + "\n" if spec.suffix == ".json" else yaml.safe_dump(data, sort_keys=False)
    tmp = spec.with_name(spec.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, spec)
