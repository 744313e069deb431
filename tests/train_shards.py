"""Test helper: token shards written exactly as the phikit-shards-v1 contract says (index.json + flat .bin)."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np


def motif_docs(count: int, seed: int = 0) -> list[list[int]]:
    """Documents with structure (a 4-token motif repeated 2-7 times, ids 1..99), so losses move and differences
    would show."""
    rng = np.random.default_rng(seed)
    return [list(rng.integers(1, 100, 4)) * int(rng.integers(2, 8)) for _ in range(count)]


def write_shards(directory: str | Path, train_docs: list[list[int]], val_docs: list[list[int]], vocab_size: int,
                 eos_id: int, tokenizer_json: str | Path | None = None, shard_tokens: int = 1 << 20,
                 dtype: str = "uint16") -> Path:
    """Documents -> eos-terminated flat token files of at most shard_tokens tokens, split train/val."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    splits = {}
    for split, docs in (("train", train_docs), ("val", val_docs)):
        stream = np.array([t for doc in docs for t in [*doc, eos_id]], dtype=dtype)
        entries = []
        for i, start in enumerate(range(0, max(len(stream), 1), shard_tokens)):
            part = stream[start:start + shard_tokens].astype(np.dtype(dtype).newbyteorder("<"))
            name = f"{split}-{i:05d}.bin"
            (directory / name).write_bytes(part.tobytes())
            entries.append({"file": name, "tokens": int(len(part)), "sha256": hashlib.sha256(part.tobytes()).hexdigest()})
        splits[split] = entries
    if tokenizer_json is not None:
        (directory / "tokenizer.json").write_bytes(Path(tokenizer_json).read_bytes())
    index = {"format": "phikit-shards-v1", "dtype": dtype, "eos_id": eos_id, "vocab_size": vocab_size,
             "tokenizer": "tokenizer.json", "splits": splits, "documents": len(train_docs) + len(val_docs)}
    (directory / "index.json").write_text(json.dumps(index, indent=2))
    return directory


def textbook_shards(directory: str | Path, n_train: int = 3000, n_val: int = 300, vocab_size: int = 512,
                    kinds: tuple[str, ...] | None = None, shard_tokens: int = 1 << 20) -> Path:
    """The procedural textbook corpus, tokenized with a BPE trained on it."""
    from phikit.data import procedural
    from phikit.tokenizer import train_bpe

    directory = Path(directory)
    train = [r["text"] for r in procedural.generate(n_train, "train", seed=0, kinds=kinds)]
    val = [r["text"] for r in procedural.generate(n_val, "heldout", seed=0, kinds=kinds)]
    tok = train_bpe(train, vocab_size)
    tok.save(directory / "tok")
    return write_shards(directory, tok.encode_batch(train), tok.encode_batch(val), len(tok), tok.eos_token_id,
                        directory / "tok" / "tokenizer.json", shard_tokens=shard_tokens)
