"""Exact and near-duplicate removal.

Exact: a hash of the normalized text (Unicode NFKC, case-folded, punctuation dropped, whitespace collapsed), so
copies that differ only in case, spacing or punctuation count as the same document.
Near: word 5-gram shingles of the normalized text; MinHash signatures of them and an LSH index (datasketch) only
find candidate pairs, and a candidate is a duplicate when the EXACT Jaccard similarity of the two shingle sets
reaches the threshold (a MinHash estimate from 128 hashes has a standard deviation of ~0.035 at 0.8: deciding by
it would keep ~40% of the pairs at 0.81). The first occurrence is kept.
The LSH bands are chosen so that a pair at the threshold is a candidate with probability >= 0.9999 (higher above
it): an index tuned for the threshold itself misses about half of the pairs there, and some far above it.
Shingles are compared as sorted sets of 64-bit hashes (the first 8 bytes of each one's SHA-1).
"""
from __future__ import annotations

import hashlib
import heapq
import json
import os
import re
import unicodedata
from array import array
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import numpy as np
from datasketch import MinHash, MinHashLSH
from datatrove.pipeline.base import PipelineStep

from .io import REPORT_SUFFIX, DataError, ReadStats, RecordWriter, read_records, write_parts
from .job import Stage, read_manifests, task_file, write_json

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


def shingle_hashes(shingle_set: Iterable[bytes]) -> np.ndarray:
    """The shingles' 64-bit hashes, sorted and unique: the first 8 bytes of each one's SHA-1, so their low 32 bits
    are datasketch's sha1_hash32, the values its MinHash signatures are made of."""
    digests = b"".join(hashlib.sha1(s).digest()[:8] for s in shingle_set)
    return np.unique(np.frombuffer(digests, dtype="<u8"))


def sorted_jaccard(a: np.ndarray, b: np.ndarray) -> float:
    """Exact Jaccard similarity of two sorted arrays of unique values (two documents' shingle hashes)."""
    at = np.searchsorted(b, a)
    common = int(np.count_nonzero(b[np.minimum(at, len(b) - 1)] == a)) if len(b) else 0
    return common / max(1, len(a) + len(b) - common)


def minhash(hashes: np.ndarray, num_perm: int, permutations=None) -> MinHash:
    """The MinHash signature of a document from its shingle hashes (seed 1, as `MinHash(num_perm, seed=1)` of
    the shingles themselves)."""
    m = MinHash(num_perm=num_perm, seed=1, hashfunc=int, scheme="affine32",
                permutations=permutations if permutations is not None else _permutations(num_perm, 1))
    m.update_batch((hashes & np.uint64(0xFFFFFFFF)).tolist())
    return m


def shingles(text: str, n: int = 5) -> set[bytes]:
    return word_shingles(normalize(text).split(), n)


def word_shingles(words: list[str], n: int = 5) -> set[bytes]:
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
        self.permutations = _permutations(num_perm, seed)
        self.hashes: dict[int, np.ndarray] = {}  # the shingle hashes of each kept document
        self.count = 0

    def seen(self, text: str) -> dict[str, Any] | None:
        index = self.count
        self.count += 1
        digest = hashlib.blake2b(normalize(text).encode(), digest_size=16).digest()
        if digest in self.exact:
            return {"index": index, "reason": "exact", "duplicate_of": self.exact[digest], "similarity": 1.0}
        if self.near:
            hashes = shingle_hashes(shingles(text, self.ngram))
            m = minhash(hashes, self.num_perm, self.permutations)
            # The most similar kept document by exact Jaccard similarity; among equally similar ones the earliest
            # (-c), whatever the order the index returns them in.
            best = max(((sorted_jaccard(hashes, self.hashes[c]), -c) for c in self.lsh.query(m)), default=None)
            if best and best[0] >= self.threshold:
                return {"index": index, "reason": "near", "duplicate_of": -best[1], "similarity": round(best[0], 3)}
        # Only kept documents are remembered, so every removal points at a document that is in the output.
        self.exact[digest] = index
        if not self.near:
            return None
        self.lsh.insert(index, m)
        self.hashes[index] = hashes
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



# --- the same, as datatrove tasks over a corpus of any size -----------------------------------------------------
#
# Five stages, each sharded, so no process holds the corpus's signatures:
#   1. signatures (one task per input shard): the normalized-text digest, the shingle hashes and the MinHash of
#      each document; the digests go to partition files by digest, one key per LSH band to partition files by
#      that band's hash, the shingle hashes to one file per task (sorted per document, read memory-mapped).
#   2. exact (one task per digest partition): documents with the digest of an earlier one are its copies.
#   3. buckets (one task per band partition): documents sharing a band are candidate pairs (copies left out:
#      they share every band with the document they copy).
#   4. verify (one task per input shard, by the later document of each pair): the pair's exact Jaccard
#      similarity from the two documents' shingle hashes; pairs at or above the threshold are kept as edges.
#   5. resolve (one task): documents in input order, keeping one byte per document for "kept": exactly the
#      rule of `Deduplicator` (a document is a duplicate of the most similar earlier *kept* one), then the
#      output, written from the shards' records without the removed ones, and the report.
# Documents are numbered by their position in the input (shards are contiguous pieces of it), so the output and
# the report do not depend on how many tasks or workers ran.

_DIGESTS = np.dtype([("d0", "<u8"), ("d1", "<u8"), ("row", "<u4")])
_BANDS = np.dtype([("h", "<u8"), ("d0", "<u8"), ("row", "<u4")])
_PAIRS = np.dtype([("hi", "<u8"), ("lo", "<u8")])
_EDGES = np.dtype([("hi", "<u8"), ("lo", "<u8"), ("j", "<f8")])
_COPIES = np.dtype([("doc", "<u8"), ("rep", "<u8")])


def _permutations(num_perm: int, seed: int):
    return MinHash(num_perm=num_perm, seed=seed).permutations


def _band_keys(sigs: np.ndarray, bands: int, rows: int) -> np.ndarray:
    """[docs, bands] 64-bit keys of each band's rows (a different mix per band, so bands do not collide)."""
    keys = np.empty((len(sigs), bands), dtype=np.uint64)
    with np.errstate(over="ignore"):
        for b in range(bands):
            h = np.full(len(sigs), np.uint64(0x9E3779B97F4A7C15) * np.uint64(b + 1), dtype=np.uint64)
            for c in sigs[:, b * rows:(b + 1) * rows].T:
                h = (h ^ c.astype(np.uint64)) * np.uint64(0x100000001B3)
                h ^= h >> np.uint64(29)
            keys[:, b] = h
    return keys


class _Step(PipelineStep):
    """A stage of the dedup job: its settings, the work folder, the task offsets of stage 1."""
    type = "Dedup"

    def __init__(self, work: str, tasks: int, partitions: int, threshold: float = 0.8, num_perm: int = 128,
                 ngram: int = 5, near: bool = True) -> None:
        super().__init__()
        self.work, self.tasks, self.partitions = work, tasks, partitions
        self.threshold, self.num_perm, self.ngram, self.near = threshold, num_perm, ngram, near

    def folder(self) -> Path:
        return Path(self.work)

    def offsets(self) -> np.ndarray:
        """Position in the input of each input task's first document (and the total at the end)."""
        counts = [m["count"] for m in read_manifests(self.folder(), "sig", self.tasks)]
        return np.cumsum([0] + counts).astype(np.uint64)

    def load(self, kind: str, dtype: np.dtype, ranks: Iterable[int], part: int) -> np.ndarray:
        arrays = [np.fromfile(self.folder() / f"{kind}-{r:05d}-{part:05d}.bin", dtype=dtype) for r in ranks]
        return np.concatenate(arrays) if arrays else np.zeros(0, dtype)


class SignatureStage(_Step):
    name = "dedup signatures"

    def __init__(self, inputs: Sequence[str], text_field: str, on_error: str, **settings: Any) -> None:
        super().__init__(**settings)
        self.inputs, self.text_field, self.on_error = list(inputs), text_field, on_error

    def run(self, data=None, rank: int = 0, world_size: int = 1):
        folder, parts = self.folder(), self.partitions
        bands, rows = lsh_params(self.threshold, self.num_perm)
        perms = _permutations(self.num_perm, 1)
        stats = ReadStats()
        digests, sigs, hashes = [], [], []
        outs = {kind: [open(folder / f"{kind}-{rank:05d}-{p:05d}.bin.tmp", "wb") for p in range(parts)]
                for kind in (("digest", "band") if self.near else ("digest",))}
        shingle_files = [open(folder / f"{kind}-{rank:05d}.bin.tmp", "wb") for kind in ("shingles", "shingle-ends")] \
            if self.near else []
        row = written = 0

        def flush() -> None:
            nonlocal row, written
            if not digests:
                return
            d = np.array(digests, dtype=np.uint64).reshape(-1, 2)
            recs = np.zeros(len(d), _DIGESTS)
            recs["d0"], recs["d1"], recs["row"] = d[:, 0], d[:, 1], np.arange(row, row + len(d))
            for p, f in enumerate(outs["digest"]):
                f.write(recs[recs["d0"] % parts == p].tobytes())
            if self.near:
                ends = written + np.cumsum([len(h) for h in hashes], dtype=np.uint64)
                shingle_files[0].write(np.concatenate(hashes).tobytes())
                shingle_files[1].write(ends.tobytes())
                written = int(ends[-1])
                s = np.array(sigs, dtype=np.uint32)
                keys = _band_keys(s, bands, rows)
                b = np.zeros(keys.size, _BANDS)
                b["h"], b["d0"] = keys.ravel(), np.repeat(d[:, 0], bands)
                b["row"] = np.repeat(np.arange(row, row + len(d)), bands)
                for p, f in enumerate(outs["band"]):
                    f.write(b[b["h"] % parts == p].tobytes())
            row += len(d)
            digests.clear()
            sigs.clear()
            hashes.clear()

        with RecordWriter(folder / f"records-{rank:05d}.jsonl") as records:
            for rec in read_records(self.inputs, self.text_field, self.on_error, stats,
                                    shard=(rank, world_size), quiet=True):
                records.write(rec)
                normalized = normalize(rec[self.text_field])
                digest = hashlib.blake2b(normalized.encode(), digest_size=16).digest()
                digests.append(np.frombuffer(digest, dtype="<u8"))
                if self.near:
                    hashes.append(shingle_hashes(word_shingles(normalized.split(), self.ngram)))
                    sigs.append(minhash(hashes[-1], self.num_perm, perms).hashvalues)
                if len(digests) >= 4096:
                    flush()
            flush()
        for f in [*shingle_files, *(f for fs in outs.values() for f in fs)]:
            f.close()
            os.replace(f.name, f.name[:-4])
        write_json(task_file(folder, "sig", rank), {"count": row, "skipped": stats.skipped})
        return iter(())


class ExactStage(_Step):
    name = "dedup exact"

    def run(self, data=None, rank: int = 0, world_size: int = 1):
        offsets = self.offsets()
        recs = [np.fromfile(self.folder() / f"digest-{r:05d}-{rank:05d}.bin", _DIGESTS) for r in range(self.tasks)]
        doc = np.concatenate([offsets[r] + x["row"].astype(np.uint64) for r, x in enumerate(recs)])
        recs = np.concatenate(recs)
        order = np.lexsort((doc, recs["d1"], recs["d0"]))
        d0, d1, doc = recs["d0"][order], recs["d1"][order], doc[order]
        same = np.zeros(len(doc), bool)
        same[1:] = (d0[1:] == d0[:-1]) & (d1[1:] == d1[:-1])
        first = np.maximum.accumulate(np.where(same, 0, np.arange(len(doc))))  # each one's group start
        copies = np.zeros(int(same.sum()), _COPIES)
        copies["doc"], copies["rep"] = doc[same], doc[first[same]]
        copies = copies[np.argsort(copies["doc"], kind="stable")]
        _write_array(self.folder() / f"copies-{rank:05d}.bin", copies)
        return iter(())


class BucketStage(_Step):
    name = "dedup buckets"

    def run(self, data=None, rank: int = 0, world_size: int = 1):
        offsets = self.offsets()
        recs = [np.fromfile(self.folder() / f"band-{r:05d}-{rank:05d}.bin", _BANDS) for r in range(self.tasks)]
        doc = np.concatenate([offsets[r] + x["row"].astype(np.uint64) for r, x in enumerate(recs)])
        recs = np.concatenate(recs)
        order = np.lexsort((doc, recs["h"]))
        h, d0, doc = recs["h"][order], recs["d0"][order], doc[order]
        starts = np.flatnonzero(np.r_[True, h[1:] != h[:-1]])
        ends = np.r_[starts[1:], len(h)]
        pairs = []
        for s, e in zip(starts[ends - starts > 1], ends[ends - starts > 1]):
            # one document per digest (the earliest, which is the one the others copy)
            _, first = np.unique(d0[s:e], return_index=True)
            members = np.sort(doc[s:e][first])
            if len(members) > 1:
                hi, lo = np.triu_indices(len(members), 1)[::-1]
                pairs.append(np.stack([members[hi], members[lo]], axis=1))
        pairs = np.concatenate(pairs) if pairs else np.zeros((0, 2), np.uint64)
        task = np.searchsorted(offsets, pairs[:, 0], side="right") - 1
        for t in range(self.tasks):
            p = np.zeros(int((task == t).sum()), _PAIRS)
            p["hi"], p["lo"] = pairs[task == t, 0], pairs[task == t, 1]
            _write_array(self.folder() / f"pairs-{rank:05d}-{t:05d}.bin", p)
        return iter(())


class VerifyStage(_Step):
    name = "dedup verify"

    def run(self, data=None, rank: int = 0, world_size: int = 1):
        offsets = self.offsets()
        pairs = self.load("pairs", _PAIRS, range(self.partitions), rank)
        pairs = np.stack([pairs["hi"], pairs["lo"]], axis=1)
        if len(pairs):
            pairs = np.unique(pairs, axis=0)  # a pair shares several bands
        sims = np.zeros(len(pairs))
        own = _ShingleSets(self.folder(), rank) if len(pairs) else None
        lo_task = np.searchsorted(offsets, pairs[:, 1], side="right") - 1
        for t in np.unique(lo_task):
            other = _ShingleSets(self.folder(), int(t))
            for k in np.flatnonzero(lo_task == t):
                sims[k] = sorted_jaccard(own[int(pairs[k, 0] - offsets[rank])], other[int(pairs[k, 1] - offsets[t])])
            del other
        keep = sims >= self.threshold
        edges = np.zeros(int(keep.sum()), _EDGES)
        edges["hi"], edges["lo"], edges["j"] = pairs[keep, 0], pairs[keep, 1], sims[keep]
        _write_array(self.folder() / f"edges-{rank:05d}.bin", edges)
        return iter(())


class _ShingleSets:
    """The sorted shingle hashes of one signature task's documents, memory-mapped (only the pages read are
    loaded): `[row]` is the task's row-th document's."""

    def __init__(self, folder: Path, rank: int) -> None:
        self.ends = np.memmap(folder / f"shingle-ends-{rank:05d}.bin", dtype=np.uint64, mode="r")
        self.hashes = np.memmap(folder / f"shingles-{rank:05d}.bin", dtype=np.uint64, mode="r")

    def __getitem__(self, row: int) -> np.ndarray:
        return self.hashes[int(self.ends[row - 1]) if row else 0:int(self.ends[row])]


class ResolveStage(_Step):
    name = "dedup resolve"

    def __init__(self, output: str, **settings: Any) -> None:
        super().__init__(**settings)
        self.output = output

    def run(self, data=None, rank: int = 0, world_size: int = 1):
        folder = self.folder()
        manifests = read_manifests(folder, "sig", self.tasks)
        total = sum(m["count"] for m in manifests)
        if total == 0:
            raise DataError("the inputs hold no documents: nothing to deduplicate (check the files and "
                            "--text-field)")
        copies = [np.fromfile(folder / f"copies-{p:05d}.bin", _COPIES) for p in range(self.partitions)]
        has_copies = np.zeros(total, bool)
        for c in copies:
            has_copies[c["rep"].astype(np.int64)] = True
        kept = np.ones(total, bool)
        pending: dict[int, list[tuple[float, int]]] = {}  # removed documents with copies: their kept neighbours
        # what was removed, compactly (a corpus may lose millions of documents): position, duplicate of,
        # similarity, and whether the copy is exact
        removed, of, sims, exact = array("Q"), array("Q"), array("d"), bytearray()

        def remove(doc: int, duplicate_of: int, sim: float, is_exact: bool) -> None:
            removed.append(doc)
            of.append(duplicate_of)
            sims.append(sim)
            exact.append(is_exact)
            kept[doc] = False

        def events():
            copy_events = heapq.merge(*(((int(d), 0, int(r)) for d, r in zip(c["doc"], c["rep"])) for c in copies))
            edge_events = (e for t in range(self.tasks) for e in _grouped_edges(folder / f"edges-{t:05d}.bin")) \
                if self.near else iter(())
            return heapq.merge(copy_events, edge_events)

        for doc, kind, payload in events():
            if kind == 0:  # a copy of an earlier document: of a kept one, or of a removed one (then a near copy)
                if kept[payload]:
                    remove(doc, payload, 1.0, True)
                else:
                    sim, neg = max(pending[payload])
                    remove(doc, -neg, round(sim, 3), False)
                continue
            candidates = [(j, -lo) for lo, j in payload if kept[lo]]
            if candidates:
                sim, neg = max(candidates)
                remove(doc, -neg, round(sim, 3), False)
                if has_copies[doc]:
                    pending[doc] = candidates
            else:
                for lo, j in payload:
                    if lo in pending:
                        pending[lo].append((j, -doc))
        skipped = [s for m in manifests for s in m["skipped"]]
        head = {"step": "dedup", "input": total, "kept": total - len(removed), "exact_duplicates": sum(exact),
                "near_duplicates": len(exact) - sum(exact)}
        tail = {"skipped_lines": len(skipped), "skipped": skipped}
        # The report lists every removal: written as the output is, one entry at a time, never held whole.
        path = Path(self.output)
        path = path.with_name(path.name + REPORT_SUFFIX)
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "w", encoding="utf-8") as report:
            report.write(json.dumps(head)[:-1] + ', "removed": [')
            n = 0

            def dropped(position: int, rec: dict) -> None:
                nonlocal n
                why = {"index": removed[n], "reason": "exact" if exact[n] else "near", "duplicate_of": of[n],
                       "similarity": sims[n], **({"id": rec["id"]} if "id" in rec else {})}
                report.write(("\n" if n == 0 else ",\n") + json.dumps(why, default=str))
                n += 1

            write_parts(self.output, [folder / f"records-{r:05d}.jsonl" for r in range(self.tasks)], removed,
                        dropped)
            report.write("\n], " + json.dumps(tail)[1:] + "\n")
        os.replace(tmp, path)
        write_json(folder / "summary.json", {**head, **tail})  # what the command prints (not the long list)
        return iter(())


def _grouped_edges(path: Path) -> Iterator[tuple[int, int, list[tuple[int, float]]]]:
    """(document, 1, [(earlier similar document, similarity), ...]) per document, in order."""
    edges = np.fromfile(path, _EDGES)
    if not len(edges):
        return
    starts = np.flatnonzero(np.r_[True, edges["hi"][1:] != edges["hi"][:-1]])
    ends = np.r_[starts[1:], len(edges)]
    for s, e in zip(starts, ends):
        yield int(edges["hi"][s]), 1, [(int(lo), float(j)) for lo, j in zip(edges["lo"][s:e], edges["j"][s:e])]


def _write_array(path: Path, array: np.ndarray) -> None:
    tmp = path.with_name(path.name + ".tmp")
    array.tofile(tmp)
    os.replace(tmp, path)


def dedup_stages(inputs: Sequence[str | Path], output: str | Path, work: Path, tasks: int, text_field: str = "text",
                 on_error: str = "fail", threshold: float = 0.8, num_perm: int = 128, ngram: int = 5,
                 near: bool = True) -> list[Stage]:
    """The stages of a dedup job (run them with WorkFolder.run); checks the settings first."""
    Deduplicator(threshold, num_perm, ngram, near)  # the same refusals as the one-process path
    settings = dict(work=str(work), tasks=tasks, partitions=tasks, threshold=threshold, num_perm=num_perm,
                    ngram=ngram, near=near)
    stages = [Stage("signatures", SignatureStage([str(p) for p in inputs], text_field, on_error, **settings), tasks),
              Stage("exact", ExactStage(**settings), tasks)]
    if near:
        stages += [Stage("buckets", BucketStage(**settings), tasks), Stage("verify", VerifyStage(**settings), tasks)]
    return stages + [Stage("resolve", ResolveStage(str(output), **settings), 1)]
