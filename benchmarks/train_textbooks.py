"""Does pretraining learn? A small phi on the procedural textbook corpus, a few CPU minutes.

    phikit bench train_textbooks                 # tiny preset, 600 steps of 16 x 256 tokens
    phikit bench train_textbooks --steps 1500 --preset cpu-small

Reports the held-out loss against the unigram baseline (what a model that ignores context scores), bits per byte,
and greedy accuracy on held-out arithmetic exercises (never in the training split) for the trained model and
for the same model untrained. Prints a JSON line last.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from phikit import build_model
from phikit.inference.decoding import generate
from phikit.data import procedural
from phikit.tokenizer import Tokenizer, train_bpe
from phikit.train.config import TrainConfig
from phikit.train.pretrain import run_pretraining


def write_shards(directory: Path, tok: Tokenizer, train: list[str], val: list[str]) -> Path:
    """Encode and write the phikit-shards-v1 layout (one file per split)."""
    directory.mkdir(parents=True, exist_ok=True)
    splits = {}
    for split, texts in (("train", train), ("val", val)):
        ids = np.array([t for doc in tok.encode_batch(texts) for t in [*doc, tok.eos_token_id]], dtype="<u2")
        name = f"{split}-00000.bin"
        (directory / name).write_bytes(ids.tobytes())
        splits[split] = [{"file": name, "tokens": len(ids), "sha256": hashlib.sha256(ids.tobytes()).hexdigest()}]
    tok.save(directory)
    index = {"format": "phikit-shards-v1", "dtype": "uint16", "eos_id": tok.eos_token_id, "vocab_size": len(tok),
             "tokenizer": "tokenizer.json", "splits": splits, "documents": len(train) + len(val)}
    (directory / "index.json").write_text(json.dumps(index, indent=2))
    return directory


def arithmetic_accuracy(model, tok, problems: list[dict]) -> float:
    model.eval()
    completions = generate(model, tok, [p["prompt"] for p in problems], max_new_tokens=80, stop=["Question:"])
    return float(np.mean([procedural.parse_answer(c) == p["answer"] for c, p in zip(completions, problems)]))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--documents", type=int, default=12000)
    ap.add_argument("--vocab", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--kinds", default=",".join(k for k in procedural.KINDS if k not in procedural.HELDOUT_ONLY),
                    help="exercise kinds in the corpus")
    ap.add_argument("--layers", type=int, default=None, help="override the preset's number of layers")
    ap.add_argument("--problems", type=int, default=200, help="held-out arithmetic problems to score")
    ap.add_argument("--out", default=None, help="run directory (default: a temporary one)")
    ap.add_argument("--smoke", action="store_true",
                    help="a tiny preset that finishes in seconds: checks that the benchmark runs (the tests run it)")
    args = ap.parse_args()
    if args.smoke:
        args.documents, args.steps, args.problems, args.vocab, args.layers = 200, 2, 4, 300, 1

    work = Path(args.out or tempfile.mkdtemp(prefix="phikit-bench-textbooks-"))
    kinds = tuple(args.kinds.split(","))
    train = [r["text"] for r in procedural.generate(args.documents, "train", seed=0, kinds=kinds)]
    val = [r["text"] for r in procedural.generate(args.documents // 20, "heldout", seed=0, kinds=kinds)]
    tok = train_bpe(train, args.vocab)
    shards = write_shards(work / "shards", tok, train, val)
    vocab = -(-len(tok) // 64) * 64
    overrides = {"vocab_size": vocab, **({"num_hidden_layers": args.layers} if args.layers else {})}
    cfg = TrainConfig(model=args.preset, model_config=overrides, data=str(shards), seq_len=256,
                      global_batch_size=16, micro_batch_size=16, max_steps=args.steps, lr=3e-3, schedule="cosine",
                      warmup_steps=min(50, args.steps // 10), min_lr_ratio=0.1, eval_every=max(1, args.steps // 4),
                      eval_sequences=64, checkpoint_every=0, out_dir=str(work / "run")).validate()
    start = time.perf_counter()
    summary = run_pretraining(cfg)
    train_s = time.perf_counter() - start

    from phikit.checkpoint import load

    problems = procedural.generate(args.problems, "heldout", seed=1, kinds=("arithmetic",))
    trained, trained_tok = load(summary["model_dir"])
    untrained = build_model(cfg.model_preset().replace(tokenizer_vocab_size=len(tok)), seed=0)
    acc_trained = arithmetic_accuracy(trained, trained_tok, problems)
    acc_untrained = arithmetic_accuracy(untrained, tok, problems)
    sample = generate(trained, trained_tok, problems[0]["prompt"], max_new_tokens=80, stop=["Question:"])
    result = {"benchmark": "train_textbooks", "preset": args.preset, "parameters": summary["parameters"],
              "tokens": summary["tokens"], "train_seconds": round(train_s, 1),
              "val_loss": round(summary["val_loss"], 4), "unigram_loss": round(summary["unigram_loss"], 4),
              "val_bpb": round(summary["val_bpb"], 4), "arithmetic_accuracy": acc_trained,
              "arithmetic_accuracy_untrained": acc_untrained, "problems": len(problems),
              "sample": problems[0]["prompt"] + sample, "run_dir": str(work / "run")}
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
