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


# A two-layer model small enough that a pretraining test runs in seconds on one thread.
TINY_MODEL = {"vocab_size": 128, "hidden_size": 64, "intermediate_size": 256, "num_hidden_layers": 2,
              "num_attention_heads": 2, "max_position_embeddings": 128}


def motif_shards(directory: str | Path, count: int) -> Path:
    """motif_docs(count) written as shards: the first 90% train, the rest val (vocab 100, eos 0)."""
    docs = motif_docs(count)
    split = count * 9 // 10
    return write_shards(directory, docs[:split], docs[split:], 100, 0, shard_tokens=3000)


def tiny_run_config(shards: str | Path, out_dir: str | Path, **overrides):
    """A validated TrainConfig for TINY_MODEL on `shards`: 20 cosine steps, no evaluation or checkpoints unless
    overridden."""
    from phikit.train.config import TrainConfig

    base = dict(model="tiny", model_config=TINY_MODEL, data=str(shards), seq_len=32, global_batch_size=8,
                micro_batch_size=2, max_steps=20, lr=3e-3, schedule="cosine", warmup_steps=2, eval_every=0,
                checkpoint_every=0, out_dir=str(out_dir), tensorboard=False, seed=1)
    return TrainConfig(**{**base, **overrides}).validate()


def train_losses(run_dir: str | Path) -> dict[int, float]:
    """Step -> training loss, from a run's metrics.jsonl."""
    from phikit.train.report import read_metrics

    return {r["step"]: r["loss"] for r in read_metrics(run_dir) if r["event"] == "train"}
