"""`phikit convert SRC DST`: any supported checkpoint layout -> HF-native (or GGUF for llama.cpp)."""
from __future__ import annotations

import argparse


def configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("src", help="checkpoint directory (HF-native, phi-msft or mixformer-sequential) or HF repo id")
    p.add_argument("dst", help="output directory (hf) or .gguf file (gguf)")
    p.add_argument("--to", choices=["hf", "gguf"], default=None,
                   help="output format (default: gguf when DST ends in .gguf, else hf)")
    p.add_argument("--dtype", choices=["fp32", "bf16", "fp16", "q8_0", "q4_0"], default=None,
                   help="weight type to write (default: as stored; gguf default fp16; q8_0/q4_0 for gguf only)")
    p.add_argument("--force", action="store_true",
                   help="replace DST when it is an earlier output (a model directory, a GGUF file); anything else "
                        "there is always refused")
    p.epilog = ("examples:\n  phikit convert ~/phi-1_5-mixformer ./phi-1_5-hf\n"
                "  phikit convert microsoft/phi-2 ./phi-2.gguf --to gguf --dtype fp16")


def run(args: argparse.Namespace) -> int:
    from ..checkpoint import DTYPES, describe, load, save
    from ..files import check_output
    to = args.to or ("gguf" if args.dst.endswith(".gguf") else "hf")
    quantized = args.dtype in ("q8_0", "q4_0")
    if quantized and to != "gguf":
        raise ValueError(f"--dtype {args.dtype} exists only in GGUF files: add --to gguf or pick fp32/bf16/fp16")
    # Checked before minutes of loading: only an earlier output of the same kind is ever replaced (with --force),
    # and the output is staged beside DST, so a failure leaves DST as it was.
    check_output(args.dst, "gguf" if to == "gguf" else "model", force=args.force, inputs=[args.src])
    info = describe(args.src)
    stored = info["dtype"].split(",")
    # As stored when the weights share one dtype; mixed ones (fp16 weights with fp32 norms) keep fp32, losing nothing.
    dtype = stored[0] if len(stored) == 1 and stored[0] in DTYPES else "fp32"
    model, tokenizer = load(args.src, dtype="fp32" if quantized else args.dtype or dtype)
    if to == "gguf":
        from ..inference.gguf_export import export_gguf
        out = export_gguf(model, tokenizer, args.dst, dtype=args.dtype or "fp16")
    else:
        out = save(model, tokenizer, args.dst)
    print(f"converted {info['layout']} checkpoint {args.src} ({info['parameters']:,} parameters) -> {out}")
    return 0
