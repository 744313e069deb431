"""Training data: weighted mixtures of token shards (shards and mixture specs read by phikit.data.shards),
deterministic batches.

Batches are a pure function of (seed, step): row i of the global batch at step s is a window of seq_len tokens
whose source and offset come from a generator seeded with (seed, s). A resumed run therefore sees exactly the
batches it would have seen, and 1 process or N processes see the same global batch (each process takes its
contiguous slice of rows).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from phikit.data.shards import ShardSet, load_mixture


@dataclass
class Source:
    shards: ShardSet
    weight: float


class Mixture:
    """Weighted sources that share one tokenizer (same eos id)."""

    def __init__(self, sources: list[Source]) -> None:
        if not sources:
            raise ValueError("the mixture has no sources: list at least one shard directory")
        eos = {s.shards.eos_id for s in sources}
        if len(eos) > 1:
            raise ValueError(f"mixture sources disagree on eos_id ({sorted(eos)}): pack them with one tokenizer")
        total = sum(s.weight for s in sources)
        if total <= 0 or any(s.weight < 0 for s in sources):
            raise ValueError("mixture weights must be >= 0 with a positive sum")
        self.sources = sources
        self.weights = np.array([s.weight / total for s in sources])
        self.eos_id = sources[0].shards.eos_id
        self.vocab_size = max(s.shards.vocab_size for s in sources)
        self.tokenizer_path = sources[0].shards.tokenizer_path

    @classmethod
    def from_path(cls, path: str | Path) -> "Mixture":
        """A shard directory (one source) or a mixture spec file."""
        path = Path(path)
        if path.is_dir():
            return cls([Source(ShardSet(path), 1.0)])
        return cls([Source(ShardSet(p), w) for p, w in load_mixture(path)])

    def check(self, seq_len: int, model_vocab_size: int) -> None:
        """Fail before any compute if the data cannot feed this model."""
        if self.vocab_size > model_vocab_size:
            raise ValueError(f"the data's vocabulary ({self.vocab_size} tokens) is larger than the model's embedding "
                             f"({model_vocab_size} rows): set model_config.vocab_size >= {self.vocab_size}")
        for s in self.sources:
            n = s.shards.num_tokens("train")
            if s.weight > 0 and n < seq_len:
                raise ValueError(f"{s.shards.directory} has {n} training tokens, fewer than seq_len {seq_len}: "
                                 "add data or lower seq_len")


def _segments(tokens: torch.Tensor, eos_id: int) -> torch.Tensor:
    """Document index of every token; an eos belongs to the document it ends."""
    is_eos = (tokens == eos_id).long()
    return is_eos.cumsum(-1) - is_eos


class PretrainBatches:
    """`batches(step, micro) -> {"input_ids", "labels"[, "segment_ids"]}` for this process, deterministic.

    labels equal input_ids (the loss shifts them, as transformers does), so seq_len tokens give seq_len - 1
    predictions.
    """

    def __init__(self, mixture: Mixture, seq_len: int, global_batch_size: int, micro_batch_size: int,
                 rank: int = 0, world_size: int = 1, seed: int = 0, document_masking: bool = False) -> None:
        if global_batch_size % (micro_batch_size * world_size):
            raise ValueError(f"global_batch_size {global_batch_size} is not a multiple of micro_batch_size "
                             f"{micro_batch_size} x {world_size} processes: change one of them")
        self.mixture, self.seq_len, self.seed = mixture, seq_len, seed
        self.global_batch_size, self.micro_batch_size = global_batch_size, micro_batch_size
        self.rank, self.world_size = rank, world_size
        self.rows_per_rank = global_batch_size // world_size
        self.grad_accum = self.rows_per_rank // micro_batch_size
        self.document_masking = document_masking
        self._cached: tuple[int, list[tuple[int, int]]] | None = None

    def windows(self, step: int) -> list[tuple[int, int]]:
        """(source index, start offset) for every row of the global batch at `step`."""
        if self._cached is None or self._cached[0] != step:
            rng = np.random.default_rng([self.seed, step])
            which = rng.choice(len(self.mixture.sources), size=self.global_batch_size, p=self.mixture.weights)
            limits = np.array([s.shards.num_tokens("train") - self.seq_len + 1 for s in self.mixture.sources])
            starts = rng.integers(0, limits[which])
            self._cached = (step, list(zip(which.tolist(), starts.tolist())))
        return self._cached[1]

    def __call__(self, step: int, micro: int) -> dict[str, torch.Tensor]:
        first = self.rank * self.rows_per_rank + micro * self.micro_batch_size
        rows = self.windows(step)[first:first + self.micro_batch_size]
        tokens = torch.from_numpy(np.stack([self.mixture.sources[s].shards.read("train", start, self.seq_len)
                                            for s, start in rows]))
        batch = {"input_ids": tokens, "labels": tokens}
        if self.document_masking:
            batch["segment_ids"] = _segments(tokens, self.mixture.eos_id)
        return batch


def heldout_batches(mixture: Mixture, seq_len: int, num_sequences: int, micro_batch_size: int, rank: int = 0,
                    world_size: int = 1, document_masking: bool = False) -> list[dict[str, torch.Tensor]]:
    """A fixed held-out set: evenly spaced windows of each source's "val" split, shared out by weight.

    Each process gets every world_size-th row; the evaluation sums losses and counts over processes.
    """
    rows = []
    counts = np.floor(mixture.weights * num_sequences).astype(int)
    counts[np.argmax(mixture.weights)] += num_sequences - counts.sum()
    for src, n in zip(mixture.sources, counts):
        available = src.shards.num_tokens("val") - seq_len
        if n == 0 or available < 0:
            continue
        starts = np.linspace(0, available, num=n).astype(int) if n > 1 else [0]
        rows += [src.shards.read("val", int(s), seq_len) for s in starts]
    # Every process gets the same number of rows: sharded models must run the same collectives on all of them.
    rows = rows[:len(rows) - len(rows) % world_size][rank::world_size]
    out = []
    for i in range(0, len(rows), micro_batch_size):
        tokens = torch.from_numpy(np.stack(rows[i:i + micro_batch_size]))
        batch = {"input_ids": tokens, "labels": tokens}
        if document_masking:
            batch["segment_ids"] = _segments(tokens, mixture.eos_id)
        out.append(batch)
    return out


def token_byte_lengths(tokenizer_path: str | Path, size: int) -> np.ndarray:
    """UTF-8 bytes each token id stands for (0 for special tokens and padding rows): the bits-per-byte divisor."""
    from tokenizers import Tokenizer as HFTokenizer

    from ..tokenizer import piece_bytes

    backend = HFTokenizer.from_file(str(tokenizer_path))
    added = backend.get_added_tokens_decoder()
    lengths = np.zeros(size, dtype=np.int64)
    for token, i in backend.get_vocab(with_added_tokens=True).items():
        if i >= size:
            continue
        if i in added:
            lengths[i] = 0 if added[i].special else len(token.encode())
        else:
            lengths[i] = len(piece_bytes(token))
    return lengths


def unigram_loss(mixture: Mixture, heldout: list[dict[str, torch.Tensor]], sample_tokens: int = 2_000_000) -> float:
    """Held-out cross-entropy (nats/token) of a unigram model fitted on the training split (add-one smoothing).

    The baseline a language model must beat by using context at all.
    """
    counts = np.ones(mixture.vocab_size, dtype=np.float64)
    for src, w in zip(mixture.sources, mixture.weights):
        n = min(src.shards.num_tokens("train"), sample_tokens)
        if n:
            counts += w * np.bincount(src.shards.read("train", 0, n), minlength=mixture.vocab_size) / n * sample_tokens
    logp = np.log(counts / counts.sum())
    targets = np.concatenate([b["labels"][:, 1:].reshape(-1).numpy() for b in heldout]) if heldout else np.array([])
    return float(-logp[targets].mean()) if len(targets) else float("nan")
