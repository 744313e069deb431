"""Exact and near-duplicate removal.

Exact: a hash of the normalized text (Unicode NFKC, case-folded, punctuation dropped, whitespace collapsed), so
copies that differ only in case, spacing or punctuation count as the same document.
Near: MinHash signatures of word 5-gram shingles, candidates from an LSH index (datasketch), and a candidate is a
duplicate when its estimated Jaccard similarity reaches the threshold. The first occurrence is kept.
The LSH bands are chosen so that a pair at the threshold is a candidate with probability >= 0.9999: the index
only finds candidates, the estimated similarity decides (an index tuned for the threshold itself misses about
half of the pairs there, and some far above it).
"""
from __future__ import annotations

import hashlib
import re
import unicodedata
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator

from datasketch import MinHash, MinHashLSH

_WORD = re.compile(r"\w+")


def normalize(text: str) -> str:
    # casefold, not lower: "STRASSE" is "Straße" in capitals. NFKC again after it, as casefolding can decompose.
    folded = unicodedata.normalize("NFKC", unicodedata.normalize("NFKC", text).casefold())
    return " ".join(_WORD.findall(folded))


def lsh_params(threshold: float, num_perm: int, miss: float = 1e-4) -> tuple[int, int]:
    """(bands, rows) with the most rows per band that still make a pair of Jaccard similarity `threshold` a
    candidate with probability at least 1 - miss (more rows: fewer dissimilar candidates to compare)."""
    best = (num_perm, 1)
    for rows in range(1, num_perm + 1):
        bands = num_perm // rows
        if (1 - threshold ** rows) ** bands <= miss:
            best = (bands, rows)
    return best


def shingles(text: str, n: int = 5) -> set[bytes]:
    words = normalize(text).split()
    if len(words) < n:  # a short document is one shingle
        return {" ".join(words).encode()}
    return {" ".join(words[i:i + n]).encode() for i in range(len(words) - n + 1)}


@dataclass
class DedupReport:
    input: int = 0
    kept: int = 0
    exact_duplicates: int = 0
    near_duplicates: int = 0
    removed: list[dict[str, Any]] = field(default_factory=list)  # {index, reason, duplicate_of, similarity}

    def summary(self) -> dict[str, Any]:
        return {"input": self.input, "kept": self.kept, "exact_duplicates": self.exact_duplicates,
                "near_duplicates": self.near_duplicates, "removed": self.removed}


class Deduplicator:
    """Feed documents in order with `seen(text)`; it answers None (new) or why it is a duplicate."""

    def __init__(self, threshold: float = 0.8, num_perm: int = 128, ngram: int = 5, near: bool = True,
                 seed: int = 1) -> None:
        if not 0 < threshold <= 1:
            raise ValueError(f"threshold must be in (0, 1], got {threshold}")
        if num_perm < 2:
            raise ValueError(f"num_perm must be at least 2, got {num_perm} (128 is the usual setting)")
        if ngram < 1:  # 0-word shingles are all the same empty string: every document would be a duplicate
            raise ValueError(f"ngram must be at least 1 word, got {ngram} (5 is the usual setting)")
        self.threshold, self.num_perm, self.ngram, self.near, self.seed = threshold, num_perm, ngram, near, seed
        self.exact: dict[bytes, int] = {}
        self.lsh = MinHashLSH(num_perm=num_perm, params=lsh_params(threshold, num_perm))
        self.signatures: dict[int, MinHash] = {}
        self.count = 0

    def seen(self, text: str) -> dict[str, Any] | None:
        index = self.count
        self.count += 1
        digest = hashlib.blake2b(normalize(text).encode(), digest_size=16).digest()
        if digest in self.exact:
            return {"index": index, "reason": "exact", "duplicate_of": self.exact[digest], "similarity": 1.0}
        if self.near:
            m = MinHash(num_perm=self.num_perm, seed=self.seed)
            m.update_batch(list(shingles(text, self.ngram)))
            # The most similar kept document; among equally similar ones the earliest (-c), whatever the order
            # the index returns them in.
            best = max(((m.jaccard(self.signatures[c]), -c) for c in self.lsh.query(m)), default=None)
            if best and best[0] >= self.threshold:
                return {"index": index, "reason": "near", "duplicate_of": -best[1], "similarity": round(best[0], 3)}
        # Only kept documents are remembered, so every removal points at a document that is in the output.
        self.exact[digest] = index
        if not self.near:
            return None
        self.lsh.insert(index, m)
        self.signatures[index] = m
        return None


def dedup(records: Iterable[dict], text_field: str = "text", threshold: float = 0.8, num_perm: int = 128,
          ngram: int = 5, near: bool = True, report: DedupReport | None = None) -> Iterator[dict]:
    """Yield the records that are not duplicates of an earlier one; `report` collects what was removed and why."""
    report = report if report is not None else DedupReport()
    d = Deduplicator(threshold, num_perm, ngram, near)
    for rec in records:
        report.input += 1
        why = d.seen(rec[text_field])
        if why is None:
            report.kept += 1
            yield rec
            continue
        if "id" in rec:
            why["id"] = rec["id"]
        report.removed.append(why)
        if why["reason"] == "exact":
            report.exact_duplicates += 1
        else:
            report.near_duplicates += 1


def jaccard(a: str, b: str, ngram: int = 5) -> float:
    """Exact Jaccard similarity of two texts' shingle sets (for reports and tests)."""
    sa, sb = shingles(a, ngram), shingles(b, ngram)
    return len(sa & sb) / max(1, len(sa | sb))

