"""`phikit generate`: continue a prompt, or a file of prompts as one batch, in any prompt format."""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Iterable, Iterator

from ..cli import choice_of

FORMAT_CHOICES = ["raw", "code", "qa", "instruct", "chat", "chatml"]


def add_model_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="checkpoint directory or HF repo id")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ... (default: cpu)")
    p.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default=None,
                   help="weight dtype (default: fp32 on the CPU, the checkpoint's own on a GPU)")
    p.add_argument("--quantize", type=choice_of("phikit.inference.quant", "MODES"), default=None, metavar="MODE",
                   help="int8 weights (on the CPU: fbgemm kernel, ~4x fp32 decode speed), int8-weight-only, int4")
    p.add_argument("--compile", action="store_true",
                   help="decode through torch.compile: the first call per batch size and length bucket compiles "
                        "(tens of seconds), later steps skip Python's per-step overhead (small models, GPUs)")


def add_sampling_arguments(p: argparse.ArgumentParser, max_new_tokens: int = 256) -> None:
    g = p.add_argument_group("sampling")
    g.add_argument("--max-new-tokens", type=int, default=max_new_tokens, help=f"default {max_new_tokens}")
    g.add_argument("--temperature", type=float, default=0.0, help="0 (default) is greedy")
    g.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens (0: off)")
    g.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass, in (0, 1]")
    g.add_argument("--min-p", type=float, default=0.0, help="drop tokens below min_p * the top probability")
    g.add_argument("--repetition-penalty", type=float, default=1.0, help="> 1 discourages repeats (1: off)")
    g.add_argument("--seed", type=int, default=None, help="makes sampling reproducible")
    g.add_argument("--stop", action="append", default=[], metavar="TEXT",
                   help="stop string (repeatable; cut from the output); taken as typed, so in bash write a "
                        "newline as $'\\n' ('\\n' is a backslash and an n)")
    g.add_argument("--prompt-lookup", type=int, default=0, metavar="N",
                   help="greedy only: check up to N tokens per step guessed from earlier text (the same output, "
                        "fewer steps when the answer repeats its context: code edits, extraction; 0: off)")


def sampling_kwargs(args: argparse.Namespace) -> dict:
    return dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                top_p=args.top_p, min_p=args.min_p, repetition_penalty=args.repetition_penalty, seed=args.seed)


def load_model(args: argparse.Namespace):
    from ..checkpoint import load
    from ..inference.sampling import SamplingParams
    from ..inference.decoding import check_prompt_lookup
    from ..inference.quant import prepare_cpu_linears
    # Check the sampling values before spending seconds loading weights.
    params = SamplingParams(**{k: v for k, v in sampling_kwargs(args).items()}).validate()
    check_prompt_lookup(args.prompt_lookup, params, getattr(args, "num_beams", 1), args.compile)
    start = time.perf_counter()
    model, tokenizer = load(args.model, device=args.device, dtype=args.dtype, quantize=args.quantize)
    prepare_cpu_linears(model)  # loads (or, once per machine, builds) the CPU kernels now
    # The config's count: a quantized model's packed weights are buffers, not parameters.
    print(f"loaded {args.model} ({model.config.num_parameters() / 1e6:,.1f}M parameters) in "
          f"{time.perf_counter() - start:.1f}s", file=sys.stderr)
    return model, tokenizer


def configure(p: argparse.ArgumentParser) -> None:
    add_model_arguments(p)
    src = p.add_argument_group("prompts")
    src.add_argument("--prompt", action="append", default=[], help="prompt text (repeatable: one batch)")
    src.add_argument("--prompts-file", type=Path, default=None,
                     help="prompts as a batch: .jsonl with a 'prompt' field per line, or text with one per line "
                          "(write \\n for newlines inside a prompt); '-' reads stdin")
    src.add_argument("--format", choices=FORMAT_CHOICES, default="raw",
                     help="render each prompt as a user message in this format and cut the answer where it "
                          "ends (default raw: continue the text as is)")
    src.add_argument("--system", default=None, help="system message for formatted prompts")
    add_sampling_arguments(p)
    g = p.add_argument_group("decoding")
    g.add_argument("--num-beams", type=int, default=1, help="beam search width (1: sampling/greedy)")
    g.add_argument("--length-penalty", type=float, default=1.0, help="beam score = logprob / length**penalty")
    g.add_argument("--early-stopping", choices=["true", "false", "never"], default="false",
                   help="beam search stopping rule (as transformers)")
    g.add_argument("--truncate", action="store_true", help="keep the last tokens of prompts longer than the context")
    g.add_argument("--batch-size", type=int, default=8, help="prompts decoded together (default 8)")
    out = p.add_argument_group("output")
    out.add_argument("--stream", action="store_true", help="print text as it is generated (one prompt)")
    out.add_argument("--json", action="store_true",
                     help="one JSON object per prompt: text, token ids, logprobs, finish reason")
    out.add_argument("--echo", action="store_true", help="print the prompt before its continuation")
    p.epilog = ("examples:\n"
                "  phikit generate --model ./phi-1_5 --prompt 'def is_prime(n):' --format code\n"
                "  phikit generate --model ./phi-2 --prompt 'Why is the sky blue?' --format instruct --stream\n"
                "  phikit generate --model ./phi-1_5 --prompts-file prompts.jsonl --temperature 0.7 --seed 1 --json\n"
                "  phikit generate --model ./phi-1_5 --prompt 'Once upon a time' --quantize int8\n"
                "  phikit generate --model ./phi-1_5 --prompts-file prompts.txt --device cuda --dtype fp16 --compile\n"
                "  phikit generate --model ./phi-1 --prompt \"$(cat edit_request.txt)\" --prompt-lookup 10")


def answer_deltas(deltas: Iterable[str], fmt) -> Iterator[str]:
    """Streamed text as `fmt.cut` trims the whole answer: no leading blanks (prose formats) and no trailing ones.
    Blanks are held back until non-blank text follows them, so the printed stream equals the printed answer
    (a model that ends with "\n\n" or pads with newlines until max_new_tokens shows nothing of them)."""
    started, held = False, ""
    for delta in deltas:
        text = held + delta
        if not started and fmt.strip_answer:
            text = text.lstrip()
        body = text.rstrip()
        held = text[len(body):]
        if body:
            started = True
            yield body


def echo_text(prompt: str, fmt) -> str:
    """The rendered prompt as --echo prints it: a label such as "Bob:" or "Answer:" gets back the space that
    `fmt.cut` took from the start of the answer ("Bob: Hi", not "Bob:Hi")."""
    return prompt + " " if fmt is not None and fmt.strip_answer and prompt.endswith(":") else prompt


def read_prompts(args: argparse.Namespace) -> list[str]:
    prompts = list(args.prompt)
    if args.prompts_file is not None:
        path = args.prompts_file
        if str(path) == "-":
            text = sys.stdin.read().removeprefix("\ufeff")
        elif path.is_dir():
            raise ValueError(f"prompts file {path} is a directory, not a file: give a .jsonl or text file of prompts")
        elif not path.exists():
            raise FileNotFoundError(f"prompts file {path} does not exist: give a .jsonl or text file of prompts")
        else:
            try:  # utf-8-sig: a byte-order mark (Windows editors write one) is not part of the first prompt
                text = path.read_text(encoding="utf-8-sig")
            except UnicodeDecodeError as e:
                raise ValueError(f"prompts file {path} is not UTF-8 text ({e.reason} at byte {e.start}): "
                                 "save it as UTF-8") from e
        # Lines end at \n (or \r\n) only: str.splitlines would also split at U+2028, U+0085 and the like, which
        # JSON strings may hold unescaped (json.dumps(ensure_ascii=False) writes them) and which are prompt text.
        lines = [line.removesuffix("\r") for line in text.split("\n")]
        if path.suffix == ".jsonl":
            for n, line in enumerate(lines, 1):
                if line.strip():
                    try:
                        record = json.loads(line)
                    except json.JSONDecodeError as e:
                        raise ValueError(f"{path}:{n}: not valid JSON ({e.msg}, column {e.colno}): one object "
                                         "per line, as {\"prompt\": \"...\"}") from e
                    if not isinstance(record, dict) or "prompt" not in record:
                        raise ValueError(f"{path}:{n}: expected a JSON object with a 'prompt' field, as "
                                         "{\"prompt\": \"...\"}")
                    prompt = record["prompt"]
                    if not isinstance(prompt, str):  # a list would be taken for token ids, a number fails later
                        raise ValueError(f"{path}:{n}: 'prompt' must be a string, got {type(prompt).__name__}")
                    prompts.append(prompt)
        else:
            prompts += [line.replace("\\n", "\n") for line in lines if line.strip()]
        if len(prompts) == len(args.prompt):
            raise ValueError(f"prompts file {path} holds no prompts: write one per line (or, in .jsonl, one "
                             "{\"prompt\": ...} object per line)")
    if not prompts:
        raise ValueError("no prompt given: pass --prompt TEXT or --prompts-file FILE")
    return prompts


def run(args: argparse.Namespace) -> int:
    from ..inference.formats import get_format
    from ..inference.decoding import chat_prompt, complete, stream
    prompts = read_prompts(args)
    if args.stream and (len(prompts) > 1 or args.num_beams > 1 or args.json):
        raise ValueError("--stream prints one prompt's text as it comes: use a single --prompt, "
                         "without --num-beams or --json")
    if args.system and args.format == "raw":  # raw text has no place for a system message: say so, not drop it
        raise ValueError("--system needs a prompt format: add --format chat (or qa, instruct, chatml, code)")
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
    model, tokenizer = load_model(args)
    kw = dict(sampling_kwargs(args), compile=args.compile, prompt_lookup=args.prompt_lookup)
    stop_token_ids = None
    fmt = None
    texts = prompts
    if args.format != "raw":
        fmt = get_format(args.format)
        system = [{"role": "system", "content": args.system}] if args.system else []
        rendered = [chat_prompt(tokenizer, system + [{"role": "user", "content": p}], fmt, args.stop) for p in prompts]
        texts = [r[0] for r in rendered]
        kw["stop"], stop_token_ids = rendered[0][2]["stop"], rendered[0][2]["stop_token_ids"]
    else:
        kw["stop"] = args.stop

    if args.stream:
        if args.echo:
            print(echo_text(texts[0], fmt), end="", flush=True)
        start = time.perf_counter()
        deltas = stream(model, tokenizer, texts[0], stop_token_ids=stop_token_ids, truncate=args.truncate, **kw)
        for delta in answer_deltas(deltas, fmt) if fmt is not None else deltas:
            print(delta, end="", flush=True)
        print()
        print(f"[{time.perf_counter() - start:.1f}s]", file=sys.stderr)
        return 0

    early = {"true": True, "false": False, "never": "never"}[args.early_stopping]
    for lo in range(0, len(texts), args.batch_size):
        batch = texts[lo:lo + args.batch_size]
        start = time.perf_counter()
        results = complete(model, tokenizer, batch, num_beams=args.num_beams, length_penalty=args.length_penalty,
                           early_stopping=early, truncate=args.truncate, stop_token_ids=stop_token_ids,
                           return_logprobs=args.json, **kw)
        elapsed = time.perf_counter() - start
        new_tokens = sum(len(r.token_ids) for r in results)
        print(f"[{len(batch)} prompt(s), {new_tokens} new tokens in {elapsed:.1f}s, "
              f"{new_tokens / max(elapsed, 1e-9):.1f} tok/s]", file=sys.stderr)
        for prompt, text, r in zip(prompts[lo:lo + args.batch_size], batch, results):
            answer = fmt.cut(r.text) if fmt is not None else r.text
            if args.json:
                print(json.dumps({"prompt": prompt, "text": answer, "token_ids": r.token_ids,
                                  "logprobs": r.logprobs, "finish_reason": r.finish_reason,
                                  "prompt_tokens": r.prompt_tokens}, ensure_ascii=False))
            else:
                print((echo_text(text, fmt) if args.echo else "") + answer)
                if len(prompts) > 1:
                    print("-" * 40)
    return 0
