"""`phikit tokenizer build-phi|train|encode`."""
from __future__ import annotations

import argparse
import json
from typing import Iterator, Sequence


def configure(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="action", metavar="<action>", required=True)
    fmt = argparse.RawDescriptionHelpFormatter
    b = sub.add_parser("build-phi", help="rebuild the phi (codegen-mono) tokenizer offline", formatter_class=fmt,
                       epilog="examples:\n  phikit tokenizer build-phi ./phi-tok\n"
                              "  phikit tokenizer build-phi ./phi-chat-tok --chatml")
    b.add_argument("dst", help="output directory for tokenizer.json + tokenizer_config.json")
    b.add_argument("--chatml", action="store_true", help="add <|im_start|>/<|im_end|> and the ChatML template")
    t = sub.add_parser("train", help="train a byte-level BPE on text files (.txt, .jsonl, .jsonl.gz, .parquet)",
                       formatter_class=fmt,
                       epilog="examples:\n  phikit tokenizer train corpus.jsonl --vocab-size 8192 --output ./my-tok\n"
                              "  phikit tokenizer train data/ --vocab-size 1024 --split-digits --output ./tok")
    t.add_argument("files", nargs="+", help="training text: .txt files, record files (.jsonl, .jsonl.gz, .parquet) "
                                            "with a text field, or directories of record files")
    t.add_argument("--vocab-size", type=int, default=8192, help="tokens in all (default 8192)")
    t.add_argument("--text-field", default="text")
    t.add_argument("--on-error", choices=["fail", "skip"], default="fail",
                   help="malformed input lines: stop (default) or skip them, reporting file:line")
    t.add_argument("--min-frequency", type=int, default=2)
    t.add_argument("--split-digits", action="store_true", help="one token per digit (helps small models at arithmetic)")
    t.add_argument("--output", required=True, help="output directory")
    e = sub.add_parser("encode", help="print the token ids of a text", formatter_class=fmt,
                       epilog="examples:\n  phikit tokenizer encode 'def f(x):'\n"
                              "  phikit tokenizer encode 'Hello' --tokenizer ./my-tok")
    e.add_argument("text")
    e.add_argument("--tokenizer", default=None, help="directory with tokenizer.json (default: the phi tokenizer)")
    p.epilog = ("examples:\n  phikit tokenizer build-phi ./phi-tok\n"
                "  phikit tokenizer train corpus.jsonl --vocab-size 8192 --output ./my-tok\n"
                "  phikit tokenizer encode 'def f(x):'")


def _texts(files: Sequence[str], text_field: str, on_error: str, seen: list[int]) -> Iterator[str]:
    """Documents of the training files, read like every data step (bad lines named with file:line);
    `seen[0]` counts those with text (an empty .txt file is one blank document, and teaches nothing)."""
    from ..data.io import read_records

    for rec in read_records(files, text_field, on_error):
        seen[0] += bool(rec[text_field].strip())
        yield rec[text_field]


def run(args: argparse.Namespace) -> int:
    from ..files import check_output
    from ..tokenizer import Tokenizer, build_phi_tokenizer, train_bpe
    if args.action == "build-phi":
        check_output(args.dst, "tokenizer")  # new, empty, or a tokenizer directory: nothing else is written over
        tok = build_phi_tokenizer()
        if args.chatml:
            tok.add_chatml()
        tok.save(args.dst)
        print(f"wrote the phi tokenizer ({len(tok)} tokens) to {args.dst}")
    elif args.action == "train":
        check_output(args.output, "tokenizer", inputs=args.files)
        seen = [0]
        tok = train_bpe(_texts(args.files, args.text_field, args.on_error, seen), args.vocab_size, args.min_frequency,
                        split_digits=args.split_digits)
        if not seen[0]:  # a tokenizer of bare bytes is never what was meant
            raise ValueError(f"no documents in {' '.join(args.files)}: give files with text in them")
        tok.save(args.output)
        print(f"trained a byte-level BPE of {len(tok)} tokens -> {args.output}")
    else:
        tok = Tokenizer.from_file(args.tokenizer) if args.tokenizer else build_phi_tokenizer()
        ids = tok.encode(args.text)
        print(json.dumps({"ids": ids, "tokens": [tok.id_to_token(i) for i in ids]}, ensure_ascii=False))
    return 0
