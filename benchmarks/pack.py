"""Benchmark `phikit data pack` (datatrove tasks, 2 workers) against a single-threaded `tokenizers` loop.

Both read the same JSONL corpus (procedural textbook exercises) with the real phi tokenizer and write uint16
tokens with eos after each document. Reported: tokens/s of each (wall clock), the speedup, tokens per CPU-second
of each (independent of other load on the machine), the load average, and the peak memory of pack's processes
at 1x and 3x the corpus size (flat memory = streamed, not loaded whole).

    phikit bench pack                       # ~12M tokens
    phikit bench pack --docs 20000 --workers 2
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def make_corpus(path: Path, docs: int, copies: int = 1) -> None:
    from phikit.data.procedural import generate

    records = generate(docs, seed=7)
    with open(path, "w") as f:
        for c in range(copies):
            for r in records:  # copies get a distinct header so no two documents are identical
                f.write(json.dumps({"text": f"Exercise {c}.\n" + r["text"]}) + "\n")


def peer(corpus: Path, out: Path) -> int:
    """The baseline: one Python loop calling tokenizers' encode per document."""
    from phikit.tokenizer import build_phi_tokenizer

    tok = build_phi_tokenizer()
    eos, n = tok.eos_token_id, 0
    with open(corpus) as f, open(out, "wb") as w:
        for line in f:
            ids = tok.backend.encode(json.loads(line)["text"], add_special_tokens=False).ids
            ids.append(eos)
            w.write(np.array(ids, dtype=np.uint16).tobytes())
            n += len(ids)
    return n


def run_pack(corpus: Path, out: Path, workers: int, tasks: int) -> tuple[int, float, float, float]:
    """Pack in a child process (so its own and its workers' peak RSS and CPU time can be read);
    returns tokens, wall seconds, peak MB, CPU seconds."""
    code = (
        "import json,resource,sys,time\n"
        "from phikit.data.pack import pack\n"
        "t=time.perf_counter()\n"
        f"idx=pack([{str(corpus)!r}], {str(out)!r}, workers={workers}, tasks={tasks}, val_fraction=0.01)\n"
        "dt=time.perf_counter()-t\n"
        "n=sum(e['tokens'] for s in idx['splits'].values() for e in s)\n"
        "me,kids=resource.getrusage(resource.RUSAGE_SELF),resource.getrusage(resource.RUSAGE_CHILDREN)\n"
        "rss=max(me.ru_maxrss,kids.ru_maxrss)/1024\n"
        "cpu=me.ru_utime+me.ru_stime+kids.ru_utime+kids.ru_stime\n"
        "print('RESULT', json.dumps([n, dt, rss, cpu]))\n"
    )
    env = {**os.environ, "DATATROVE_COLORIZE_LOGS": "0"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
    if proc.returncode or line is None:
        sys.exit(f"pack failed:\n{proc.stderr[-3000:]}")
    return tuple(json.loads(line[7:]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--docs", type=int, default=100_000, help="documents in the 1x corpus")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--tasks", type=int, default=4)
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        corpus, big = tmp / "corpus.jsonl", tmp / "corpus3x.jsonl"
        make_corpus(corpus, args.docs)
        make_corpus(big, args.docs, copies=3)

        t, c = time.perf_counter(), time.process_time()
        peer_tokens = peer(corpus, tmp / "peer.bin")
        peer_s, peer_cpu = time.perf_counter() - t, time.process_time() - c

        tokens, pack_s, rss1, pack_cpu = run_pack(corpus, tmp / "shards", args.workers, args.tasks)
        shutil.rmtree(tmp / "shards")
        tokens3, pack3_s, rss3, _ = run_pack(big, tmp / "shards3", args.workers, args.tasks)
        assert tokens == peer_tokens, f"pack wrote {tokens} tokens, the peer {peer_tokens}"

    result = {
        "benchmark": "pack",
        "cpus": os.cpu_count(),
        "workers": args.workers,
        "documents": args.docs,
        "tokens": tokens,
        "pack_tokens_per_s": round(tokens / pack_s),
        "peer_tokens_per_s": round(peer_tokens / peer_s),
        "peer": "single-threaded tokenizers encode loop",
        "speedup": round(peer_s / pack_s, 2),
        "pack_3x_tokens_per_s": round(tokens3 / pack3_s),
        # CPU time spent per token does not depend on how busy the machine is (wall time does).
        "pack_tokens_per_cpu_s": round(tokens / pack_cpu),
        "peer_tokens_per_cpu_s": round(peer_tokens / peer_cpu),
        "load_average_1min": round(os.getloadavg()[0], 2),
        "peak_rss_mb_1x": round(rss1),
        "peak_rss_mb_3x": round(rss3),
    }
    print(f"pack {result['pack_tokens_per_s']:,} tok/s vs peer {result['peer_tokens_per_s']:,} tok/s "
          f"({result['speedup']}x); peak RSS {rss1:.0f} MB at 1x, {rss3:.0f} MB at 3x")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
