"""Benchmark the corpus steps at scale: dedup + decontaminate + pack as datatrove tasks, end to end.

A generated corpus (random-word documents of ~80 words, ~500 bytes each, cut into --files JSONL files) with
planted items whose truth is known: exact copies (case and spacing changed), near copies (1-3 words replaced,
exact Jaccard similarity of word 5-grams >= 0.8; their recall is also given for those in [0.8, 0.85), and every
near removal's exact similarity is recomputed from the corpus), non-duplicates that share half their words with
another document (Jaccard < 0.5: must be kept) and documents holding a HumanEval prompt (must be dropped).

For each corpus size (--scales, multiples of --docs) and worker count (--workers), `phikit data dedup`, then
`decontaminate` on its output, then `pack` on that, each in its own process; reported per step: wall seconds,
documents/s, the peak RSS of the largest single process (the command or one of its workers), and the output's
sha256 (it must not change with the worker count). Tasks grow with the corpus (--tasks per 1x), so each task's
share of the work stays the same size. Beside them, at 1x: the one-process path (`phikit.data.dedup.dedup` and
`decontaminate.decontaminate` in one loop, as the commands ran before) and datatrove's own MinHash pipeline
(signatures, buckets, clusters, filter) with the same shingles and bands (5-grams, 25 bands of 5 hashes), on the
same workers, with its recall of the planted items.

    python benchmarks/data_scale.py                       # 2M documents (~1 GB) at 1x and 4x, 1 and 2 workers
    python benchmarks/data_scale.py --docs 100000 --scales 1,4
    python benchmarks/data_scale.py --smoke               # a tiny run (CI)

The last line printed is the JSON result.
"""
from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

WRAPPER = ("import json,resource,subprocess,sys,time\n"
           "t=time.perf_counter()\n"
           "p=subprocess.run(sys.argv[1:],capture_output=True,text=True)\n"
           "dt=time.perf_counter()-t\n"
           "r=resource.getrusage(resource.RUSAGE_CHILDREN)\n"
           "print(json.dumps([p.returncode,dt,r.ru_maxrss/1024,r.ru_utime+r.ru_stime,p.stderr[-3000:]]))\n")


def measure(argv: list[str]) -> tuple[float, float, float]:
    """Run a command in a fresh process; (wall seconds, peak RSS in MB of its largest single process, CPU seconds
    of it and its workers: unlike wall time, not stretched by other load on the machine)."""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1] / "src")}
    out = subprocess.run([sys.executable, "-c", WRAPPER, *argv], capture_output=True, text=True, env=env)
    rc, seconds, rss, cpu, err = json.loads(out.stdout.strip().splitlines()[-1])
    if rc:
        sys.exit(f"{' '.join(argv[:6])} ... failed:\n{err}")
    return seconds, rss, cpu


def humaneval_prompts() -> list[str]:
    from phikit.data.decontaminate import humaneval_path
    with gzip.open(humaneval_path(), "rt") as f:
        return [json.loads(line)["prompt"] for line in f]


def make_corpus(folder: Path, docs: int, files: int, seed: int) -> dict[str, set[str]]:
    """Write the corpus; returns the ids of each kind of planted item."""
    from phikit.data.dedup import jaccard

    rng = np.random.default_rng(seed)
    pyrng = random.Random(seed)
    vocab = np.array([f"{w}{i}" for i, w in enumerate(["alpha", "beta", "gamma", "delta", "omega"] * 8000)])
    lengths = rng.integers(60, 100, docs)
    texts = []
    for start in range(0, docs, 1_000_000):  # the words of 8M documents at once would take 24 GB
        part = lengths[start:start + 1_000_000]
        words = vocab[rng.integers(0, len(vocab), int(part.sum()))]  # the same draws as one call for all
        ends = np.cumsum(part)
        texts += [" ".join(words[e - n:e]) for e, n in zip(ends, part)]
    # near_low: the near copies just above the threshold (exact Jaccard in [0.8, 0.85)), the hardest to find
    kinds = {"exact": set(), "near": set(), "near_low": set(), "nondup": set(), "bench": set()}
    plants = max(4, docs // 50)  # 2% of each kind (bench: at most 100)
    prompts = humaneval_prompts()
    # Plants copy documents of the first tenth, which no plant replaces.
    chosen = pyrng.sample(range(docs // 10, docs), 3 * plants + min(plants, 100))
    for n, i in enumerate(chosen):
        src = texts[pyrng.randrange(docs // 10)]
        kind = ("exact", "near", "nondup", "bench")[min(n // plants, 3)]
        if kind == "exact":
            texts[i] = "  " + src.upper().replace(" ", "  ") + " !"
        elif kind == "near":
            w = src.split()
            for _ in range(pyrng.randrange(1, 4)):
                w[pyrng.randrange(len(w))] = str(vocab[pyrng.randrange(len(vocab))])
            texts[i] = " ".join(w)
            similarity = jaccard(texts[i], src)
            kind = kind if similarity >= 0.8 else "other"
            if 0.8 <= similarity < 0.85:
                kinds["near_low"].add(f"d{i}")
        elif kind == "nondup":
            w = src.split()
            texts[i] = " ".join(w[:len(w) // 2] + texts[i].split()[len(w) // 2:])
            kind = kind if jaccard(texts[i], src) < 0.5 else "other"
        else:
            texts[i] = f"Exercise {i}.\n" + prompts[len(kinds["bench"]) % len(prompts)]
        if kind != "other":
            kinds[kind].add(f"d{i}")
    folder.mkdir(parents=True, exist_ok=True)
    cut = np.linspace(0, docs, files + 1).astype(int)
    for f, (lo, hi) in enumerate(zip(cut, cut[1:])):
        with open(folder / f"part-{f:03d}.jsonl", "w") as out:
            out.writelines(json.dumps({"id": f"d{i}", "text": texts[i]}) + "\n" for i in range(lo, hi))
    return kinds


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    if path.is_dir():  # a shard directory: the token streams, in index order
        index = json.loads((path / "index.json").read_text())
        for split in ("train", "val"):
            for entry in index["splits"][split]:
                h.update((path / entry["file"]).read_bytes())
        return h.hexdigest()
    with open(path, "rb") as f:
        while buf := f.read(1 << 24):
            h.update(buf)
    return h.hexdigest()


def ids(path: Path) -> set[str]:
    with open(path) as f:
        return {json.loads(line)["id"] for line in f}


def recall(kept: set[str], kinds: dict[str, set[str]]) -> dict[str, float]:
    """Shares of the planted items handled right; near copies are those whose exact Jaccard similarity with
    their source is >= 0.8 (all of them, and those in [0.8, 0.85))."""
    def share(s: set[str], removed: bool) -> float:
        return round(len({i for i in s if (i not in kept) == removed}) / max(1, len(s)), 4)
    return {"exact_removed": share(kinds["exact"], True), "near_removed": share(kinds["near"], True),
            "near_0.80_to_0.85_removed": share(kinds["near_low"], True), "near_planted": len(kinds["near"]),
            "nondup_kept": share(kinds["nondup"], False)}


def near_removals_below(report: Path, corpus: Path, threshold: float = 0.8) -> int:
    """How many near-duplicate removals in a dedup report are of pairs whose exact Jaccard similarity (Python
    sets, recomputed from the corpus) is under the threshold: false positives by the definition."""
    from phikit.data.dedup import jaccard

    pairs = [(r["index"], r["duplicate_of"]) for r in json.loads(report.read_text())["removed"]
             if r["reason"] == "near"]
    wanted, texts = {i for p in pairs for i in p}, {}
    position = 0
    for path in sorted(corpus.iterdir()):
        with open(path) as f:
            for line in f:
                if position in wanted:
                    texts[position] = json.loads(line)["text"]
                position += 1
    return sum(jaccard(texts[i], texts[j]) < threshold for i, j in pairs)


ONE_PROCESS = """
import sys
from phikit.data.io import read_records, RecordWriter
from phikit.data.dedup import dedup
from phikit.data.decontaminate import build_index, decontaminate
src, mid, out = sys.argv[1], sys.argv[2], sys.argv[3]
with RecordWriter(mid) as w:
    w.write_all(dedup(read_records([src])))
with RecordWriter(out) as w:
    w.write_all(decontaminate(read_records([mid]), build_index(["humaneval"])))
"""

DATATROVE_MINHASH = """
import sys
from loguru import logger
logger.disable("datatrove")
from datatrove.executor import LocalPipelineExecutor
from datatrove.pipeline.readers import JsonlReader
from datatrove.pipeline.writers import JsonlWriter
from datatrove.pipeline.dedup.minhash import (MinhashConfig, MinhashDedupSignature, MinhashDedupBuckets,
                                               MinhashDedupCluster, MinhashDedupFilter)
from datatrove.utils.word_tokenizers import WordTokenizer
class Words(WordTokenizer):  # words split at spaces (its English tokenizer needs spaCy, not installed here)
    def word_tokenize(self, text): return text.split()
    def sent_tokenize(self, text): return [text]
    def span_tokenize(self, text): return [(0, len(text))]
src, work, files, workers = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
from datatrove.utils.hashing import HashConfig
# sha1 shingle hashes: its default, xxhash, refuses str with the installed xxhash 4
config = MinhashConfig(n_grams=5, num_buckets=25, hashes_per_bucket=5, hash_config=HashConfig(64, "sha1"))
def run(pipeline, tasks, name):
    LocalPipelineExecutor(pipeline, tasks=tasks, workers=min(workers, tasks), logging_dir=f"{work}/logs/{name}").run()
run([JsonlReader(src), MinhashDedupSignature(f"{work}/sigs", config=config, language=Words())], files, "sigs")
run([MinhashDedupBuckets(f"{work}/sigs", f"{work}/buckets", config=config)], config.num_buckets, "buckets")
run([MinhashDedupCluster(f"{work}/buckets", f"{work}/remove", config=config)], 1, "clusters")
run([JsonlReader(src), MinhashDedupFilter(f"{work}/remove"), JsonlWriter(f"{work}/out", compression=None)], files,
    "filter")
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--docs", type=int, default=2_000_000, help="documents in the 1x corpus (~500 bytes each)")
    ap.add_argument("--scales", default="1,4", help="corpus sizes, as multiples of --docs")
    ap.add_argument("--workers", default="1,2", help="worker counts to compare")
    ap.add_argument("--tasks", type=int, default=16, help="tasks per step at 1x (grows with the corpus)")
    ap.add_argument("--files", type=int, default=16, help="input files at 1x")
    ap.add_argument("--no-baselines", action="store_true", help="skip the one-process path and datatrove's MinHash")
    ap.add_argument("--smoke", action="store_true", help="a tiny run that checks everything works (CI)")
    args = ap.parse_args()
    if args.smoke:
        args.docs, args.scales, args.workers, args.tasks, args.files = 1000, "1", "2", 2, 2
    scales = [int(s) for s in args.scales.split(",")]
    worker_counts = [int(w) for w in args.workers.split(",")]
    if min([args.docs, args.tasks, args.files, *scales, *worker_counts]) < 1:
        ap.error("every count must be at least 1")
    phikit = [sys.executable, "-m", "phikit", "data"]
    result = {"benchmark": "data_scale", "cpus": os.cpu_count(), "docs_1x": args.docs, "runs": []}
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for scale in scales:
            docs, tasks, files = args.docs * scale, args.tasks * scale, args.files * scale
            corpus = tmp / f"corpus-{scale}x"
            t = time.perf_counter()
            kinds = make_corpus(corpus, docs, files, seed=scale)
            size = sum(p.stat().st_size for p in corpus.iterdir())
            print(f"{scale}x: {docs:,} documents, {size / 1e9:.2f} GB, made in {time.perf_counter() - t:.0f} s",
                  file=sys.stderr)
            for workers in worker_counts:
                run = {"scale": scale, "documents": docs, "bytes": size, "tasks": tasks, "workers": workers}
                common = ["--tasks", str(tasks), "--workers", str(workers)]
                d, c, s = tmp / f"d-{scale}-{workers}.jsonl", tmp / f"c-{scale}-{workers}.jsonl", tmp / "shards"
                steps = [("dedup", [str(corpus), "--output", str(d)], d, docs),
                         ("decontaminate", [str(d), "--benchmarks", "humaneval", "--output", str(c)], c, None),
                         ("pack", [str(c), "--output", str(s)], s, None)]
                for name, argv, out, n in steps:
                    n = n if n is not None else sum(1 for _ in open(argv[0]))
                    seconds, rss, cpu = measure([*phikit, name, *argv, *common])
                    run[name] = {"seconds": round(seconds, 2), "docs_per_s": round(n / seconds),
                                 "docs_per_cpu_s": round(n / cpu), "peak_rss_mb": round(rss),
                                 "sha256": sha256(out)[:16]}
                    print(f"  {scale}x {workers} workers {name}: {seconds:.1f} s, {n / seconds:,.0f} docs/s, "
                          f"peak {rss:.0f} MB", file=sys.stderr)
                kept = ids(d)
                run["dedup"]["recall"] = recall(kept, kinds)
                run["dedup"]["recall"]["near_removals_below_0.8"] = near_removals_below(
                    Path(f"{d}.report.json"), corpus)
                clean = ids(c)
                run["decontaminate"]["bench_removed"] = round(len(kinds["bench"] - clean) / len(kinds["bench"]), 4)
                run["decontaminate"]["false_positives"] = len(kept - clean - kinds["bench"])
                subprocess.run(["rm", "-rf", str(s), str(d), str(c), f"{d}.report.json", f"{c}.report.json"],
                               check=True)
                result["runs"].append(run)
            if scale == scales[0] and not args.no_baselines:
                mid, out = tmp / "one-mid.jsonl", tmp / "one-out.jsonl"
                merged = tmp / "all.jsonl"
                with open(merged, "wb") as f:
                    for p in sorted(corpus.iterdir()):
                        f.write(p.read_bytes())
                seconds, rss, _ = measure([sys.executable, "-c", ONE_PROCESS, str(merged), str(mid), str(out)])
                result["one_process"] = {"scale": scale, "seconds_dedup_and_decontaminate": round(seconds, 2),
                                         "docs_per_s": round(docs / seconds), "peak_rss_mb": round(rss),
                                         "recall": recall(ids(mid), kinds)}
                print(f"  one process: {seconds:.1f} s, peak {rss:.0f} MB", file=sys.stderr)
                workers = max(worker_counts)
                seconds, rss, _ = measure([sys.executable, "-c", DATATROVE_MINHASH, str(corpus), str(tmp / "dt"),
                                           str(files), str(workers)])
                kept = set().union(*(ids(p) for p in (tmp / "dt" / "out").iterdir()))
                ours = next(r for r in result["runs"] if r["scale"] == scale and r["workers"] == workers)
                result["datatrove_minhash"] = {"scale": scale, "workers": workers, "seconds": round(seconds, 2),
                                               "docs_per_s": round(docs / seconds), "peak_rss_mb": round(rss),
                                               "recall": recall(kept, kinds)}
                result["dedup_vs_datatrove_minhash"] = round(ours["dedup"]["docs_per_s"] / (docs / seconds), 2)
                print(f"  datatrove MinHash ({workers} workers): {seconds:.1f} s, peak {rss:.0f} MB", file=sys.stderr)
                subprocess.run(["rm", "-rf", str(tmp / "dt"), str(mid), str(out), str(merged)], check=True)
            subprocess.run(["rm", "-rf", str(corpus)], check=True)

    def run_of(scale, workers):
        return next((r for r in result["runs"] if r["scale"] == scale and r["workers"] == workers), None)

    lo, hi = min(worker_counts), max(worker_counts)
    for scale in scales:
        a, b = run_of(scale, lo), run_of(scale, hi)
        if hi > lo:
            result[f"speedup_{hi}_vs_{lo}_workers_{scale}x"] = {
                step: round(b[step]["docs_per_s"] / a[step]["docs_per_s"], 2) for step in ("dedup", "decontaminate",
                                                                                       "pack")}
            result[f"identical_outputs_{scale}x"] = all(a[s]["sha256"] == b[s]["sha256"]
                                                        for s in ("dedup", "decontaminate", "pack"))
    if len(scales) > 1:
        for workers in worker_counts:
            a, b = run_of(scales[0], workers), run_of(scales[-1], workers)
            result[f"peak_rss_growth_{scales[-1]}x_vs_{scales[0]}x_{workers}_workers"] = {
                step: round(b[step]["peak_rss_mb"] / a[step]["peak_rss_mb"], 3)
                for step in ("dedup", "decontaminate", "pack")}
    result["load_average_1min_before_after"] = [round(load_before, 2), round(os.getloadavg()[0], 2)]
    print(json.dumps(result))


if __name__ == "__main__":
    main()
