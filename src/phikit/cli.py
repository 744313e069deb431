"""`phikit <verb>`: a thin shell over the library. Each verb lives in phikit/commands/<verb>.py and defines
`configure(parser)` (arguments, with an example in its epilog) and `run(args) -> int | None`."""
from __future__ import annotations

import argparse
import importlib
import sys

VERBS: dict[str, str] = {
    "generate": "generate text from a prompt (code, QA, Instruct, chat, ChatML formats)",
    "chat": "interactive terminal chat with a model",
    "serve": "OpenAI-compatible HTTP server with a chat page",
    "convert": "convert a checkpoint to the HF-native layout (or GGUF)",
    "info": "print a checkpoint's layout, config and parameter count",
    "tokenizer": "build the phi tokenizer offline or train a BPE",
    "data": "textbook data pipeline: synth, procedural, score, filter, dedup, decontaminate, pack",
    "train": "pretrain a phi model from a YAML config",
    "sft": "supervised fine-tuning on conversations (ChatML)",
    "dpo": "direct preference optimization on preference pairs",
    "merge": "fold a LoRA adapter into base weights",
    "eval": "benchmarks: multiple choice, HumanEval/MBPP, GSM8K, perplexity, toxicity",
    "bench": "speed benchmarks side by side with peers (decode, kernels, serve, eval, pack, train, ...)",
    "speedrun": "one command from nothing to a phi model you can talk to",
}


class CLIError(Exception):
    """A user-facing error: printed as one line, exit code 2."""


def build_parser(verb: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="phikit",
        description="phikit: run, train, fine-tune, serve and evaluate phi-style language models.",
        epilog="examples:\n  phikit speedrun\n  phikit generate --model DIR --prompt 'def fib(n):'\n"
               "  phikit <verb> --help",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="verb", metavar="<verb>")
    for name, help_text in VERBS.items():
        p = sub.add_parser(name, help=help_text, description=help_text,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        if name == verb:
            _module(name).configure(p)
    return parser


def _module(verb: str):
    try:
        return importlib.import_module(f"phikit.commands.{verb}")
    except ModuleNotFoundError as e:
        if e.name == f"phikit.commands.{verb}":
            raise CLIError(f"`phikit {verb}` is not available in this build") from e
        raise


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    verb = next((a for a in argv if not a.startswith("-")), None)
    try:
        parser = build_parser(verb if verb in VERBS else None)
        try:
            args = parser.parse_args(argv)
        except SystemExit as e:  # --help or a usage error: argparse already printed it
            return int(e.code or 0)
        if args.verb is None:
            parser.print_help()
            return 0
        return int(_module(args.verb).run(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (CLIError, ValueError, OSError) as e:
        # Bad input, or the machine refusing (a missing or unwritable path, a full disk, no network): one line
        # naming the problem, no traceback (PHIKIT_DEBUG=1 shows it).
        import os
        if os.environ.get("PHIKIT_DEBUG"):
            raise
        print(f"phikit: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
