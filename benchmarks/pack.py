"""Benchmark `phikit data pack` (datatrove tasks, 2 workers) against a single-threaded `tokenizers` loop.

Both read the same JSONL corpus (procedural textbook exercises), load the phi tokenizer from the same
tokenizer.json inside their timed part, and write uint16 tokens with eos after each document; imports are left
out of both timings. Reported: tokens/s of each (wall clock; with --repeat, the best round of each and the
spread), the speedup (best against best), tokens per CPU-second of each (independent of other load on the
machine), the load average, and the peak memory of pack's processes at 1x and 3x the corpus size (flat memory =
streamed, not loaded whole).

    phikit bench pack                       # ~12M tokens
    phikit bench pack --docs 20000 --workers 2 --repeat 3
    python benchmarks/pack.py --smoke        # a tiny run (CI)

The last line printed is the JSON result.
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


def peer(corpus: Path, tokenizer: Path, out: Path) -> int:
    """The baseline: one Python loop calling tokenizers' encode per document."""
    from phikit.tokenizer import Tokenizer

    tok = Tokenizer.from_file(tokenizer)
    eos, n = tok.eos_token_id, 0
    with open(corpus) as f, open(out, "wb") as w:
        for line in f:
            ids = tok.backend.encode(json.loads(line)["text"], add_special_tokens=False).ids
            ids.append(eos)
            w.write(np.array(ids, dtype=np.uint16).tobytes())
            n += len(ids)
    return n


def run_pack(corpus: Path, tokenizer: Path, out: Path, workers: int, tasks: int) -> tuple[int, float, float, float]:
    """Pack in a child process (so its own and its workers' peak RSS and CPU time can be read);
    returns tokens, wall seconds, peak MB, CPU seconds (of the pack call, like the peer's: imports left out)."""
    code = (
        "import json,resource,sys,time\n"
        "from phikit.data.pack import pack\n"
        "t,me0=time.perf_counter(),resource.getrusage(resource.RUSAGE_SELF)\n"
        f"idx=pack([{str(corpus)!r}], {str(out)!r}, tokenizer_path={str(tokenizer)!r}, workers={workers}, "
        f"tasks={tasks}, val_fraction=0.01)\n"
        "dt=time.perf_counter()-t\n"
        "n=sum(e['tokens'] for s in idx['splits'].values() for e in s)\n"
        "me,kids=resource.getrusage(resource.RUSAGE_SELF),resource.getrusage(resource.RUSAGE_CHILDREN)\n"
        "rss=max(me.ru_maxrss,kids.ru_maxrss)/1024\n"
        "cpu=me.ru_utime-me0.ru_utime+me.ru_stime-me0.ru_stime+kids.ru_utime+kids.ru_stime\n"
        "print('RESULT', json.dumps([n, dt, rss, cpu]))\n"
    )
    env = {**os.environ, "DATATROVE_COLORIZE_LOGS": "0"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
    if proc.returncode or line is None:
        sys.exit(f"pack failed:\n{proc.stderr[-3000:]}")
    return tuple(json.loads(line[7:]))


def main() -> None:
    from phikit.tokenizer import build_phi_tokenizer

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--docs", type=int, default=100_000, help="documents in the 1x corpus")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--tasks", type=int, default=4)
    ap.add_argument("--repeat", type=int, default=1,
                    help="rounds of (peer, pack); each side's best round is reported, with the spread")
    ap.add_argument("--smoke", action="store_true",
                    help="a tiny preset that finishes in seconds: checks that the benchmark runs (the tests run it)")
    args = ap.parse_args()
    if args.smoke:
        args.docs, args.workers, args.tasks = 300, 1, 1
    if min(args.docs, args.workers, args.tasks, args.repeat) < 1:
        ap.error("--docs, --workers, --tasks and --repeat must be >= 1")

    peer_runs, pack_runs = [], []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        corpus, big = tmp / "corpus.jsonl", tmp / "corpus3x.jsonl"
        make_corpus(corpus, args.docs)
        make_corpus(big, args.docs, copies=3)
        build_phi_tokenizer().save(tmp / "tokenizer")
        tokenizer = tmp / "tokenizer" / "tokenizer.json"
        for _ in range(args.repeat):  # alternate the two, so a change in machine load hits both alike
            t, c = time.perf_counter(), time.process_time()
            peer_tokens = peer(corpus, tokenizer, tmp / "peer.bin")
            peer_runs.append((peer_tokens, time.perf_counter() - t, time.process_time() - c))
            pack_runs.append(run_pack(corpus, tokenizer, tmp / "shards", args.workers, args.tasks))
            shutil.rmtree(tmp / "shards")
            assert pack_runs[-1][0] == peer_tokens, f"pack wrote {pack_runs[-1][0]} tokens, the peer {peer_tokens}"
        tokens3, pack3_s, rss3, _ = run_pack(big, tokenizer, tmp / "shards3", args.workers, args.tasks)

    tokens = peer_tokens
    peer_rates = sorted(tokens / s for _, s, _ in peer_runs)
    pack_rates = sorted(tokens / s for _, s, _, _ in pack_runs)
    rss1 = max(r for _, _, r, _ in pack_runs)
    result = {
        "benchmark": "pack",
        "cpus": os.cpu_count(),
        "workers": args.workers,
        "documents": args.docs,
        "tokens": tokens,
        "rounds": args.repeat,
        "peer": "single-threaded tokenizers encode loop",
        "pack_tokens_per_s": round(pack_rates[-1]),
        "peer_tokens_per_s": round(peer_rates[-1]),
        "speedup": round(pack_rates[-1] / peer_rates[-1], 2),  # best against best
        "pack_tokens_per_s_spread": [round(pack_rates[0]), round(pack_rates[-1])],
        "peer_tokens_per_s_spread": [round(peer_rates[0]), round(peer_rates[-1])],
        "pack_3x_tokens_per_s": round(tokens3 / pack3_s),
        # CPU time spent per token does not depend on how busy the machine is (wall time does).
        "pack_tokens_per_cpu_s": round(max(n / cpu for n, _, _, cpu in pack_runs)),
        "peer_tokens_per_cpu_s": round(max(n / cpu for n, _, cpu in peer_runs)),
        "load_average_1min": round(os.getloadavg()[0], 2),
        "peak_rss_mb_1x": round(rss1),
        "peak_rss_mb_3x": round(rss3),
    }
    print(f"pack {result['pack_tokens_per_s']:,} tok/s vs peer {result['peer_tokens_per_s']:,} tok/s "
          f"({result['speedup']}x); peak RSS {rss1:.0f} MB at 1x, {rss3:.0f} MB at 3x")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
