"""What the greedy-decoding benchmarks (predicted_outputs, prompt_lookup) share: their model arguments and the
model they time, a trained checkpoint or random weights of a preset's shape with phi's vocabulary."""
from __future__ import annotations

import argparse

import torch

from phikit import build_model, get_config
from phikit.tokenizer import build_phi_tokenizer


def add_model_arguments(p: argparse.ArgumentParser, default_prompt: str) -> None:
    p.add_argument("--preset", default="phi-1_5", help="random weights of this shape (default: phi-1_5)")
    p.add_argument("--model", default=None, help="a trained checkpoint instead of random weights")
    p.add_argument("--prompt", default=default_prompt)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--smoke", action="store_true",
                   help="a tiny preset that finishes in seconds: checks that the benchmark runs (the tests run it)")


def parse_and_load(p: argparse.ArgumentParser):
    """(args, model in eval mode, tokenizer, a name for the JSON line); bad counts are usage errors. A --dtype
    argument, where the benchmark has one, sets the weights' type (else a checkpoint keeps its own, random
    weights are fp32)."""
    args = p.parse_args()
    if args.smoke:
        args.preset, args.new_tokens, args.repeats = "tiny", 8, 1
    if args.repeats < 1 or args.new_tokens < 1:
        p.error("--repeats and --new-tokens must be >= 1")
    torch.set_num_threads(args.threads)
    dtype = getattr(args, "dtype", None)
    if args.model:
        import phikit
        model, tokenizer = phikit.load(args.model, dtype=dtype)
        return args, model.eval(), tokenizer, args.model
    tokenizer = build_phi_tokenizer()
    config = get_config(args.preset, vocab_size=51200, tokenizer_vocab_size=len(tokenizer))  # phi's vocabulary
    model = build_model(config, seed=0).to(torch.bfloat16 if dtype == "bf16" else torch.float32)
    return args, model.eval(), tokenizer, f"random {args.preset}"
