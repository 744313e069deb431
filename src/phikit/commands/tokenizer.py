"""`phikit tokenizer build-phi|train|encode`."""
from __future__ import annotations

import argparse
import json


def configure(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="action", metavar="<action>", required=True)
    b = sub.add_parser("build-phi", help="rebuild the phi (codegen-mono) tokenizer offline")
    b.add_argument("dst", help="output directory for tokenizer.json + tokenizer_config.json")
    b.add_argument("--chatml", action="store_true", help="add <|im_start|>/<|im_end|> and the ChatML template")
    t = sub.add_parser("train", help="train a byte-level BPE on text files (.txt or .jsonl)")
    t.add_argument("files", nargs="+", help="training text: .txt files, or .jsonl with a text field")
    t.add_argument("--vocab-size", type=int, default=8192)
    t.add_argument("--text-field", default="text")
    t.add_argument("--min-frequency", type=int, default=2)
    t.add_argument("--split-digits", action="store_true", help="one token per digit (helps small models at arithmetic)")
    t.add_argument("--output", required=True, help="output directory")
    e = sub.add_parser("encode", help="print the token ids of a text")
    e.add_argument("text")
    e.add_argument("--tokenizer", default=None, help="directory with tokenizer.json (default: the phi tokenizer)")
    p.epilog = ("examples:\n  phikit tokenizer build-phi ./phi-tok\n"
                "  phikit tokenizer train corpus.jsonl --vocab-size 8192 --output ./my-tok\n"
                "  phikit tokenizer encode 'def f(x):'")


def run(args: argparse.Namespace) -> int:
    from ..tokenizer import Tokenizer, build_phi_tokenizer, iter_text_files, train_bpe
    if args.action == "build-phi":
        tok = build_phi_tokenizer()
        if args.chatml:
            tok.add_chatml()
        tok.save(args.dst)
        print(f"wrote the phi tokenizer ({len(tok)} tokens) to {args.dst}")
    elif args.action == "train":
        tok = train_bpe(iter_text_files(args.files, args.text_field), args.vocab_size, args.min_frequency,
                        split_digits=args.split_digits)
        tok.save(args.output)
        print(f"trained a byte-level BPE of {len(tok)} tokens -> {args.output}")
    else:
        tok = Tokenizer.from_file(args.tokenizer) if args.tokenizer else build_phi_tokenizer()
        ids = tok.encode(args.text)
        print(json.dumps({"ids": ids, "tokens": [tok.id_to_token(i) for i in ids]}, ensure_ascii=False))
    return 0
