"""Token shards ("phikit-shards-v1"): the one place that knows the format, writes it and reads it.

A shard directory holds `index.json`, a copy of the tokenizer, and `<split>-NNNNN.bin` files: flat little-endian
uint16/uint32 token ids with eos after every document. `phikit data pack` writes them (`ShardWriter`,
`write_index`); the trainer reads them (`ShardSet`), alone or weighted in a mixture spec (`load_mixture`,
`write_mixture`): {"sources": [{"path": DIR, "weight": 0.8}, ...]} in YAML or JSON, paths relative to the spec.

    index.json = {"format": "phikit-shards-v1", "dtype": "uint16", "eos_id", "vocab_size", "tokenizer",
                  "splits": {"train": [{"file", "tokens", "sha256"}, ...], "val": [...]}, "documents", ...}
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Iterator

import numpy as np

FORMAT = "phikit-shards-v1"
SPLITS = ("train", "val")
DTYPES = {"uint16": np.uint16, "uint32": np.uint32}


def dtype_for(vocab_size: int) -> str:
    return "uint16" if vocab_size <= 1 << 16 else "uint32"


class ShardWriter:
    """Appends token arrays to `<dir>/<name>.tmp` with a running sha256; `close()` renames it into place and
    returns its index entry."""

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


def write_index(directory: Path, files: dict[str, list[dict[str, Any]]], vocab_size: int, eos_id: int,
                **extra: Any) -> dict[str, Any]:
    """index.json of a shard directory: `files` maps each split to its entries (file, tokens, sha256) in order."""
    from phikit.files import write_text_atomic

    index = {"format": FORMAT, "dtype": dtype_for(vocab_size), "eos_id": eos_id, "vocab_size": vocab_size,
             "tokenizer": "tokenizer.json",
             "splits": {s: [{k: e[k] for k in ("file", "tokens", "sha256")} for e in files[s]] for s in SPLITS},
             **extra}
    write_text_atomic(directory / "index.json", json.dumps(index, indent=1) + "\n")
    return index


def read_index(directory: str | Path) -> dict[str, Any]:
    """index.json of a shard directory, checked against the format."""
    path = Path(directory) / "index.json"
    if not path.is_file():
        raise FileNotFoundError(f"no token shards at {directory} (index.json missing): pack them first with "
                                "`phikit data pack`")
    index = json.loads(path.read_text())
    if index.get("format") != FORMAT:
        raise ValueError(f"{path} has format {index.get('format')!r}, expected {FORMAT!r}: re-pack the data with "
                         "this phikit")
    if index.get("dtype") not in DTYPES:
        raise ValueError(f"{path}: dtype {index.get('dtype')!r} is not one of {', '.join(DTYPES)}")
    return index


class ShardSet:
    """One shard directory: memory-mapped token files per split, checked against index.json."""

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        self.index = index = read_index(self.directory)
        index_path = self.directory / "index.json"
        self.dtype = np.dtype(DTYPES[index["dtype"]]).newbyteorder("<")
        self.eos_id = int(index["eos_id"])
        self.vocab_size = int(index["vocab_size"])
        self.tokenizer_path = self.directory / index.get("tokenizer", "tokenizer.json")
        self.splits: dict[str, list[np.ndarray]] = {}
        self.offsets: dict[str, np.ndarray] = {}
        for split, files in (index.get("splits") or {}).items():
            arrays = []
            for entry in files:
                path = self.directory / entry["file"]
                if not path.is_file():
                    raise FileNotFoundError(f"shard {path} listed in {index_path} is missing: re-pack the data")
                expected = int(entry["tokens"]) * self.dtype.itemsize
                if path.stat().st_size != expected:
                    raise ValueError(f"shard {path} has {path.stat().st_size} bytes, index.json says {expected}: "
                                     "the file is truncated or stale, re-pack the data")
                if entry["tokens"]:
                    arrays.append(np.memmap(path, dtype=self.dtype, mode="r"))
            self.splits[split] = arrays
            self.offsets[split] = np.cumsum([0] + [len(a) for a in arrays])

    def num_tokens(self, split: str) -> int:
        return int(self.offsets[split][-1]) if split in self.offsets else 0

    def read(self, split: str, start: int, length: int) -> np.ndarray:
        """Tokens [start, start+length) of the split's concatenated files, as int64."""
        offsets, arrays = self.offsets[split], self.splits[split]
        out = np.empty(length, dtype=np.int64)
        filled = 0
        f = int(np.searchsorted(offsets, start, side="right")) - 1
        while filled < length:
            lo = start + filled - offsets[f]
            piece = arrays[f][lo:lo + length - filled]
            out[filled:filled + len(piece)] = piece
            filled += len(piece)
            f += 1
        return out

    def arrays(self, split: str = "train") -> list[np.ndarray]:
        """The split's memory-mapped token arrays, in order (empty files left out)."""
        if split not in self.splits:
            raise ValueError(f"{self.directory} has no split {split!r}: it has {', '.join(self.splits)}")
        return self.splits[split]

    def documents(self, split: str = "train") -> Iterator[np.ndarray]:
        """Each document's token ids (without its eos), in shard order."""
        for arr in self.arrays(split):
            start = 0
            for end in np.flatnonzero(arr == self.eos_id):
                yield np.asarray(arr[start:end])
                start = end + 1

    def verify(self) -> list[str]:
        """Files whose sha256 does not match index.json (reads every byte: use on small sets or once)."""
        bad = []
        for files in self.index["splits"].values():
            for entry in files:
                digest = hashlib.sha256((self.directory / entry["file"]).read_bytes()).hexdigest()
                if entry.get("sha256") and digest != entry["sha256"]:
                    bad.append(entry["file"])
        return bad


def load_mixture(spec: str | Path) -> list[tuple[Path, float]]:
    """[(shard dir, weight normalized to sum 1)] from a YAML/JSON mixture spec; relative paths are taken
    relative to the spec file."""
    import yaml

    spec = Path(spec)
    if not spec.is_file():
        raise FileNotFoundError(f"training data {spec} not found: pass a shard directory or a mixture spec file")
    data = yaml.safe_load(spec.read_text())  # YAML is a superset of JSON
    sources = data.get("sources") if isinstance(data, dict) else None
    if not sources or not isinstance(sources, list):
        raise ValueError(f"{spec} is not a mixture spec: expected {{'sources': [{{'path': DIR, 'weight': W}}, ...]}}")
    out = []
    for i, s in enumerate(sources):
        if not isinstance(s, dict) or "path" not in s:
            raise ValueError(f"{spec}: source {i} needs a 'path' (a shard directory)")
        unknown = set(s) - {"path", "weight"}
        if unknown:
            raise ValueError(f"{spec}: unknown source key(s) {sorted(unknown)}: use path and weight")
        weight = float(s.get("weight", 1.0))
        if weight < 0:
            raise ValueError(f"{spec}: source {i} has weight {weight}: weights must be >= 0")
        path = Path(s["path"])
        path = path if path.is_absolute() else spec.parent / path
        read_index(path)
        out.append((path, weight))
    total = sum(w for _, w in out)
    if total <= 0:
        raise ValueError(f"{spec}: the weights sum to 0: give at least one source a positive weight")
    return [(p, w / total) for p, w in out]


def write_mixture(spec: str | Path, sources: list[tuple[str | Path, float]]) -> None:
    """Write a mixture spec (YAML or JSON by suffix) after checking every source is a shard directory."""
    import yaml

    from phikit.files import write_text_atomic

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
    write_text_atomic(spec, text)
