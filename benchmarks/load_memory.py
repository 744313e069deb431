"""Memory of a loaded model: the peak while `phikit.load` runs and the resident size after a generate call,
against the bytes of the weights in the chosen precision.

Saves random weights of a preset's shape as a bf16 checkpoint (as the released phi models ship), then, for each
precision, loads it in a fresh process (so that nothing of another precision is counted), generates a few tokens,
and reports (polling the process's resident memory every 5 ms):
  load_peak / final   the peak during load over the resident size once it returned (target <= 1.3)
  resident / weights  the resident size after a generate call over the weights' bytes (target <= 1.15)
The resident sizes are less the process's size before loading (torch and Python themselves).

    python benchmarks/load_memory.py                       # phi-1.5 shape: fp32, bf16, int8, int4
    python benchmarks/load_memory.py --preset phi-2 --precisions bf16
    python benchmarks/load_memory.py --smoke
The last line printed is JSON.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

CHILD = r"""
import json, os, sys, threading, time
import torch
import phikit

def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

path, precision = sys.argv[1], sys.argv[2]
torch.set_num_threads(2)
base, peak, running = rss(), [0], [True]
def poll():
    while running[0]:
        peak[0] = max(peak[0], rss())
        time.sleep(0.005)
thread = threading.Thread(target=poll, daemon=True)
thread.start()
kw = {"quantize": precision} if precision in ("int8", "int4") else {"dtype": precision}
model, tok = phikit.load(path, **kw)
running[0] = False
thread.join()
loaded = rss()
phikit.generate(model, tok, "def add(a, b):", max_new_tokens=8)
tensors = list(model.named_parameters()) + list(model.named_buffers())
weights = sum(t.numel() * t.element_size() for _, t in tensors)
print(json.dumps({"precision": precision, "weights_mb": round(weights / 2**20),
                  "load_peak_mb": round((max(peak[0], loaded) - base) / 2**20),
                  "loaded_mb": round((loaded - base) / 2**20), "resident_mb": round((rss() - base) / 2**20)}))
"""


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="phi-1_5")
    p.add_argument("--precisions", default="fp32,bf16,int8,int4")
    p.add_argument("--smoke", action="store_true",
                   help="a tiny preset that finishes in seconds: checks that the benchmark runs (the tests run it)")
    args = p.parse_args()
    if args.smoke:
        args.preset = "tiny"
    import torch
    import phikit
    from phikit.tokenizer import build_phi_tokenizer
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = build_phi_tokenizer()
        config = phikit.get_config(args.preset, vocab_size=51200, tokenizer_vocab_size=len(tokenizer))
        model = phikit.build_model(config, seed=0, meta=True).to(torch.bfloat16)
        model.to_empty(device="cpu")  # bf16 from the start: no fp32 copy of phi-2 in this process
        with torch.no_grad():
            for t in model.parameters():
                t.normal_(0, 0.02)
        phikit.save(model, tokenizer, Path(tmp) / "model")
        del model
        for precision in args.precisions.split(","):
            done = subprocess.run([sys.executable, "-c", CHILD, str(Path(tmp) / "model"), precision],
                                  capture_output=True, text=True, check=True)
            row = json.loads(done.stdout.strip().splitlines()[-1])
            row["load_peak_over_final"] = round(row["load_peak_mb"] / max(row["loaded_mb"], 1), 2)
            row["resident_over_weights"] = round(row["resident_mb"] / max(row["weights_mb"], 1), 2)
            print(json.dumps(row), file=sys.stderr, flush=True)
            rows.append(row)
    print(json.dumps({"benchmark": "load_memory", "preset": args.preset, "rows": rows}))


if __name__ == "__main__":
    main()
