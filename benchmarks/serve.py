"""Serving benchmark: N concurrent streaming clients against the same N requests sent one at a time.

Starts `phikit serve` as its own process (a random cpu-small model with the phi tokenizer unless --model is
given), then measures, for both ways of sending the requests: generated tokens per second (from the usage the
server reports), time to first token (p50/p99), and errors. Target: 0 errors and concurrent tokens/s >= 4x the
one-at-a-time tokens/s, which is what continuous batching is for. Prints a JSON line last.

    python benchmarks/serve.py                 # or: phikit bench serve
    python benchmarks/serve.py --clients 32 --max-tokens 64 --model ./phi-1_5
    python benchmarks/serve.py --compile       # the server decodes through torch.compile (compiled in warm-up)
"""
from __future__ import annotations

import argparse
import asyncio
import json
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

PROMPTS = [
    "def quicksort(arr):", "Write a short story about a robot learning to paint.", "The capital of France is",
    "Alice: How do magnets work?\nBob:", "import numpy as np\n", "Once upon a time, in a small village,",
    "Explain photosynthesis to a child.", "class Stack:\n    def __init__(self):",
]


def make_checkpoint(directory: Path) -> Path:
    """A random cpu-small model with the real phi tokenizer: the speed of a small phi-shaped model."""
    import phikit
    from phikit import build_model, get_config
    from phikit.tokenizer import build_phi_tokenizer
    tokenizer = build_phi_tokenizer()
    model = build_model(get_config("cpu-small", vocab_size=50304, tokenizer_vocab_size=len(tokenizer)), seed=0)
    return phikit.save(model, tokenizer, directory / "cpu-small-phi")


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


async def one_request(client: httpx.AsyncClient, model: str, prompt: str, max_tokens: int, seed: int) -> dict:
    """One streaming completion: time to first token, completion tokens (from usage), error if any."""
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.8, "seed": seed,
            "stream": True, "stream_options": {"include_usage": True}}
    start = time.perf_counter()
    ttft, tokens = None, 0
    try:
        async with client.stream("POST", "/v1/completions", json=body) as response:
            if response.status_code != 200:
                return {"error": f"HTTP {response.status_code}: {(await response.aread())[:200]!r}"}
            async for line in response.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    return {"error": chunk["error"]["message"]}
                if ttft is None and chunk["choices"] and chunk["choices"][0]["text"]:
                    ttft = time.perf_counter() - start
                if chunk.get("usage"):
                    tokens = chunk["usage"]["completion_tokens"]
    except httpx.HTTPError as e:
        return {"error": f"{type(e).__name__}: {e}"}
    return {"ttft": ttft if ttft is not None else time.perf_counter() - start, "tokens": tokens,
            "seconds": time.perf_counter() - start}


async def run_batch(url: str, model: str, clients: int, max_tokens: int, concurrent: bool) -> dict:
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=httpx.Limits(max_connections=clients + 4)) as c:
        jobs = [(PROMPTS[i % len(PROMPTS)], i) for i in range(clients)]
        start = time.perf_counter()
        if concurrent:
            results = await asyncio.gather(*(one_request(c, model, p, max_tokens, s) for p, s in jobs))
        else:
            results = [await one_request(c, model, p, max_tokens, s) for p, s in jobs]
        wall = time.perf_counter() - start
    ok = [r for r in results if "error" not in r]
    tokens = sum(r["tokens"] for r in ok)
    ttfts = [r["ttft"] * 1000 for r in ok]
    return {
        "requests": clients, "errors": len(results) - len(ok),
        "error_messages": sorted({r["error"] for r in results if "error" in r})[:3],
        "tokens": tokens, "seconds": round(wall, 3), "tokens_per_s": round(tokens / wall, 1),
        "ttft_p50_ms": round(percentile(ttfts, 0.5), 1) if ttfts else None,
        "ttft_p99_ms": round(percentile(ttfts, 0.99), 1) if ttfts else None,
    }


def wait_until_up(url: str, proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with code {proc.returncode}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.3)
    raise RuntimeError("the server did not come up")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="checkpoint to serve (default: a random cpu-small model with the phi tokenizer)")
    ap.add_argument("--clients", type=int, default=16, help="concurrent streaming clients (default: 16)")
    ap.add_argument("--max-tokens", type=int, default=128, help="tokens per request (default: 128)")
    # One torch thread by default: on a 2-core machine the server's event loop and this script's clients need the
    # other core, and oversubscribed OpenMP threads slow every step (0 means torch's own default).
    ap.add_argument("--threads", type=int, default=1, help="torch threads in the server (default: 1; 0: torch's)")
    ap.add_argument("--compile", action="store_true", help="start the server with --compile")
    ap.add_argument("--smoke", action="store_true",
                    help="a tiny preset that finishes in seconds: checks that the benchmark runs (the tests run it)")
    args = ap.parse_args()
    if args.smoke:
        args.clients, args.max_tokens = 2, 8
    if args.clients < 1 or args.max_tokens < 1:
        ap.error("--clients and --max-tokens must be >= 1")

    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(args.model) if args.model else make_checkpoint(Path(tmp))
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        cmd = [sys.executable, "-m", "phikit", "serve", "--model", str(model_dir), "--port", str(port),
               "--max-batch", str(max(args.clients, 1)), "--max-queue", str(args.clients), "--log-level", "warning"]
        if args.threads:
            cmd += ["--threads", str(args.threads)]
        if args.compile:
            cmd.append("--compile")
        server_log = open(Path(tmp) / "server.log", "w+")  # a file, not a pipe nobody reads, which could fill
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=server_log, text=True)
        url = f"http://127.0.0.1:{port}"
        try:
            try:
                wait_until_up(url, proc)
            except RuntimeError:
                server_log.seek(0)
                print(server_log.read()[-3000:], file=sys.stderr)
                raise
            model = httpx.get(url + "/v1/models").json()["data"][0]["id"]
            # warm-up, one request and a batch: first-call costs (and compiling, with --compile) are excluded
            asyncio.run(run_batch(url, model, 1, 8, concurrent=False))
            asyncio.run(run_batch(url, model, 2, 8, concurrent=True))
            sequential = asyncio.run(run_batch(url, model, args.clients, args.max_tokens, concurrent=False))
            print(f"one at a time: {sequential['tokens_per_s']} tok/s", file=sys.stderr)
            concurrent = asyncio.run(run_batch(url, model, args.clients, args.max_tokens, concurrent=True))
            print(f"{args.clients} concurrent: {concurrent['tokens_per_s']} tok/s", file=sys.stderr)
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
            server_log.close()
    speedup = concurrent["tokens_per_s"] / max(sequential["tokens_per_s"], 1e-9)
    result = {
        "benchmark": "serve", "model": str(args.model or "random cpu-small (phi tokenizer)"),
        "clients": args.clients, "max_tokens": args.max_tokens, "torch_threads": args.threads or "default",
        "compile": args.compile,
        "concurrent": concurrent, "one_at_a_time": sequential, "speedup": round(speedup, 2), "target_speedup": 4.0,
        "errors": concurrent["errors"] + sequential["errors"],
        "pass": concurrent["errors"] + sequential["errors"] == 0 and speedup >= 4.0,
    }
    print(json.dumps(result))
    return 0 if result["pass"] or args.smoke else 1  # a smoke run checks that it runs, not the speed


if __name__ == "__main__":
    sys.exit(main())
