"""Training throughput: phikit's loop vs a plain transformers loop, same config, optimizer, batches, in one run.

    phikit bench train                      # cpu-small (7.3M params), seq 256, batch 8, fp32, on the CPU
    phikit bench train --preset phi-1_5 --seq-len 2048 --batch 4 --precision bf16 --device cuda

The peer is what a transformers user writes: `loss = model(input_ids, labels=input_ids).loss; loss.backward();
clip_grad_norm_; AdamW.step()` with transformers' PhiForCausalLM holding the same weights. Ours is
phikit.train.loop.Trainer.train_step (its data loader included). Variants are timed in alternating rounds so a
busy machine slows them alike; the best round of each counts. MFU = achieved matmul FLOP/s (6N + attention per
token) / the measured fp32 matmul peak (CPU) or the datasheet bf16 peak (known GPUs). Prints a JSON line last.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from phikit import build_model, get_config
from phikit.train.config import TrainConfig
from phikit.train.data import Mixture, PretrainBatches
from phikit.train.loop import Trainer
from phikit.train.report import matmul_peak_flops


def write_random_shards(directory: Path, vocab: int, tokens: int) -> Path:
    """Uniform random tokens in the phikit-shards-v1 layout (throughput does not depend on the text)."""
    rng = np.random.default_rng(0)
    data = rng.integers(1, vocab, tokens, dtype=np.uint16)
    (directory / "train-00000.bin").write_bytes(data.tobytes())
    (directory / "val-00000.bin").write_bytes(data[:4096].tobytes())
    index = {"format": "phikit-shards-v1", "dtype": "uint16", "eos_id": 0, "vocab_size": vocab,
             "tokenizer": "tokenizer.json", "documents": 1,
             "splits": {"train": [{"file": "train-00000.bin", "tokens": tokens, "sha256": ""}],
                        "val": [{"file": "val-00000.bin", "tokens": 4096, "sha256": ""}]}}
    (directory / "index.json").write_text(json.dumps(index))
    return directory


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="cpu-small")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch", type=int, default=8, help="sequences per step (one micro-batch)")
    ap.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--steps", type=int, default=3, help="steps per timed round")
    ap.add_argument("--ablation", action="store_true", help="also time phikit with the plain (unfused) loss")
    ap.add_argument("--smoke", action="store_true",
                    help="a tiny preset that finishes in seconds: checks that the benchmark runs (the tests run it)")
    args = ap.parse_args()
    if args.smoke:
        args.preset, args.seq_len, args.batch, args.rounds, args.steps = "tiny", 32, 2, 1, 1
    if min(args.rounds, args.steps, args.batch, args.seq_len) < 1:
        ap.error("--rounds, --steps, --batch and --seq-len must be >= 1")
    # The random shards and the trainer's run directory are scratch: removed however the run ends.
    with tempfile.TemporaryDirectory(prefix="phikit-bench-train-") as tmp:
        result = measure(args, Path(tmp))
    print(json.dumps(result))
    return 0


def measure(args: argparse.Namespace, work: Path) -> dict:
    """Time each variant in alternating rounds; the JSON result."""
    device = torch.device(args.device)
    config = get_config(args.preset)
    amp = torch.bfloat16 if args.precision == "bf16" else None
    shards = write_random_shards(work, min(config.vocab_size, 50000), 2_000_000)
    common = dict(model=args.preset, data=str(shards), seq_len=args.seq_len, global_batch_size=args.batch,
                  micro_batch_size=args.batch, max_steps=10**6, lr=2e-4, betas=[0.9, 0.98], eps=1e-7,
                  weight_decay=0.1, grad_clip=1.0, precision=args.precision, device=args.device, eval_every=0,
                  checkpoint_every=0, tensorboard=False, out_dir=str(work / "run"))
    batches = PretrainBatches(Mixture.from_path(shards), args.seq_len, args.batch, args.batch)

    def phikit_step(fused: bool):
        cfg = TrainConfig(**common, fused_loss=fused).validate()
        trainer = Trainer(build_model(config, seed=0), cfg, batches)
        return trainer.train_step

    def transformers_step():
        import transformers

        hf = transformers.PhiForCausalLM(transformers.PhiConfig(**config.to_hf_dict()))
        hf.load_state_dict(build_model(config, seed=0).state_dict(), strict=False)
        hf.to(device).train()
        opt = torch.optim.AdamW(hf.parameters(), lr=2e-4, betas=(0.9, 0.98), eps=1e-7, weight_decay=0.1)
        state = {"step": 0}

        def step():
            ids = batches(state["step"], 0)["input_ids"].to(device)
            with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
                loss = hf(input_ids=ids, labels=ids).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(hf.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            state["step"] += 1
            return {"loss": loss.item()}
        return step

    variants = {"phikit": phikit_step(True), "transformers": transformers_step()}
    if args.ablation:
        variants["phikit_unfused_loss"] = phikit_step(False)
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    for step in variants.values():  # warm-up: allocator, first-call costs
        step()
    sync()
    tokens_per_step = args.batch * args.seq_len
    rates: dict[str, list[float]] = {name: [] for name in variants}
    peaks = [matmul_peak_flops(device, amp or torch.float32)]
    for _ in range(args.rounds):
        for name, step in variants.items():
            start = time.perf_counter()
            for _ in range(args.steps):
                step()
            sync()
            rates[name].append(tokens_per_step * args.steps / (time.perf_counter() - start))
        peaks.append(matmul_peak_flops(device, amp or torch.float32))
    peak = max(peaks)
    flops = config.flops_per_token(args.seq_len)
    result = {"benchmark": "train", "preset": args.preset, "parameters": config.num_parameters(),
              "seq_len": args.seq_len, "batch": args.batch, "precision": args.precision, "device": str(device),
              "threads": torch.get_num_threads(), "matmul_peak_gflops": round(peak / 1e9, 1)}
    for name, r in rates.items():
        best = max(r)
        result[f"{name}_tokens_per_s"] = round(best, 1)
        result[f"{name}_tokens_per_s_median"] = round(statistics.median(r), 1)
        result[f"{name}_mfu"] = round(best * flops / peak, 4)
    result["speedup_vs_transformers"] = round(max(rates["phikit"]) / max(rates["transformers"]), 3)
    result["speedup_median"] = round(statistics.median(rates["phikit"]) / statistics.median(rates["transformers"]), 3)
    return result


if __name__ == "__main__":
    sys.exit(main())
