"""`phikit merge --model BASE --adapter DIR --out DIR`: fold a LoRA adapter into the base weights."""
from __future__ import annotations

import argparse


def configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="base checkpoint directory or HF repo id")
    p.add_argument("--adapter", required=True, help="adapter directory (adapter_config.json, peft format)")
    p.add_argument("--out", required=True, help="output directory for the merged model (phikit.save layout)")
    p.add_argument("--tokenizer", help="tokenizer to save with it (default: the adapter run's tokenizer.json when "
                                       "next to the adapter, else the base model's)")
    p.epilog = ("examples:\n  phikit merge --model runs/base/model --adapter runs/sft/adapter --out runs/sft/merged\n"
                "  phikit merge --model microsoft/phi-1_5 --adapter phi-1_5-dpo --out phi-1_5-dpo-merged")


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from ..checkpoint import load, save
    from ..tokenizer import Tokenizer
    from ..train.chat_data import add_chatml_tokens
    from ..files import check_output
    from ..train.lora import load_adapter, merge_adapter

    check_output(args.out, "model", inputs=[args.model, args.adapter])  # before the minutes of loading
    model, tokenizer = load(args.model)
    run_tokenizer = Path(args.tokenizer) if args.tokenizer else Path(args.adapter).parent / "tokenizer.json"
    if args.tokenizer and not run_tokenizer.exists():
        raise FileNotFoundError(f"tokenizer {run_tokenizer} does not exist: pass a tokenizer.json or its directory")
    if run_tokenizer.exists():
        trained_tokenizer = Tokenizer.from_file(run_tokenizer)
        if trained_tokenizer.has_chatml and not tokenizer.has_chatml:
            # Training added ChatML rows to the base before the adapter saw it: add the same rows here.
            add_chatml_tokens(model, tokenizer, for_adapter=True)
        if len(tokenizer) != len(trained_tokenizer):
            raise ValueError(f"the adapter's tokenizer has {len(trained_tokenizer)} tokens, the base model's "
                             f"{len(tokenizer)}: pass the base model the adapter was trained on")
        tokenizer = trained_tokenizer
    merged = merge_adapter(load_adapter(model, args.adapter))
    out = save(merged, tokenizer, args.out)
    print(f"merged {args.adapter} into {args.model} -> {out}")
    return 0
