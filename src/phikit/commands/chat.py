"""`phikit chat`: an interactive terminal conversation, streamed, with history."""
from __future__ import annotations

import argparse
import re
import sys

from .generate import add_model_arguments, add_sampling_arguments, answer_deltas, load_model, sampling_kwargs

HELP = """commands:
  /reset           forget the conversation (keeps the system message)
  /system TEXT     set the system message (and reset)
  /exit, /quit     leave (Ctrl-D or Ctrl-C at the prompt work too; Ctrl-C during an answer stops it)
  //WORD           send the one-word message /WORD (a lone /WORD is taken for a command)
  a line ending in \\ continues on the next line; a line of three double quotes starts or ends a block
  (Ctrl-C on a continued line or in a block drops what was typed there)"""


def configure(p: argparse.ArgumentParser) -> None:
    add_model_arguments(p)
    p.add_argument("--format", choices=["chatml", "chat", "qa", "instruct"], default=None,
                   help="prompt format (default: chatml when the tokenizer has <|im_start|>, else chat)")
    p.add_argument("--system", default=None, help="system message")
    p.add_argument("--user-name", default="Alice", help="user speaker name in the chat format (default Alice)")
    p.add_argument("--assistant-name", default="Bob", help="model speaker name in the chat format (default Bob)")
    add_sampling_arguments(p, max_new_tokens=200)
    p.epilog = ("examples:\n  phikit chat --model ./my-sft-model\n"
                "  phikit chat --model ./phi-1_5 --user-name Student --assistant-name Teacher --temperature 0.7\n\n"
                + HELP)


def read_message(prompt: str) -> str | None:
    """One user message (None at end of input); continuation lines for a trailing \\ or a triple-quote block.
    Ctrl-C on a continuation line gives "" (the message is dropped, the conversation goes on), as in a shell."""
    try:
        line = input(prompt)
    except (EOFError, KeyboardInterrupt):  # Ctrl-D or Ctrl-C at the prompt: leave
        return None
    try:
        return _continue_message(line)
    except KeyboardInterrupt:
        print()
        return ""


def _continue_message(line: str) -> str:
    """The whole message that starts with `line`: a triple-quote block, or lines joined while they end in \\."""
    if line.strip() == '"""':
        lines = []
        while True:
            try:
                nxt = input("... ")
            except EOFError:
                break
            if nxt.strip() == '"""':
                break
            lines.append(nxt)
        return "\n".join(lines)
    lines = [line]
    while lines[-1].endswith("\\"):
        lines[-1] = lines[-1][:-1]
        try:
            lines.append(input("... "))
        except EOFError:
            break
    return "\n".join(lines)


def fit_history(tokenizer, fmt, messages: list[dict], budget: int) -> list[dict]:
    """Drop the oldest exchanges (never the system message or the last user turn) until the prompt fits."""
    messages = list(messages)
    while len(tokenizer.encode(fmt.render(messages))) > budget:
        first = next((i for i, m in enumerate(messages) if m["role"] != "system"), None)
        if first is None or first == len(messages) - 1:
            raise ValueError(f"the message alone is longer than the {budget} tokens the context leaves beside "
                             "--max-new-tokens: shorten it (or the system message), or lower --max-new-tokens")
        del messages[first]
        # An exchange goes whole: an answer whose question was dropped must not open the transcript.
        while first < len(messages) - 1 and messages[first]["role"] == "assistant":
            del messages[first]
    return messages


def run(args: argparse.Namespace) -> int:
    from ..inference.formats import default_format, get_format
    from ..inference.decoding import chat_prompt, stream
    model, tokenizer = load_model(args)
    name = args.format or default_format(tokenizer)
    fmt = get_format(name, user_name=args.user_name, assistant_name=args.assistant_name) if name == "chat" \
        else get_format(name)
    system = args.system
    history: list[dict] = []
    kw = dict(sampling_kwargs(args), compile=args.compile, prompt_lookup=args.prompt_lookup)
    budget = model.config.max_position_embeddings - min(args.max_new_tokens, model.config.max_position_embeddings // 2)
    you = f"{args.user_name}> " if name == "chat" else "you> "
    bot = f"{args.assistant_name}> " if name == "chat" else "model> "
    print(f"chatting in the {name} format; /help for commands", file=sys.stderr)
    while True:
        text = read_message(you)
        if text is None:
            print()
            return 0
        command = text.strip()
        if not command:
            continue
        if command in ("/exit", "/quit"):
            return 0
        if command == "/help":
            print(HELP)
            continue
        if command == "/reset":
            history = []
            print("(conversation reset)")
            continue
        if command.split(maxsplit=1)[0] == "/system":  # not "/systematic ...", which is a message
            system = command[len("/system"):].strip() or None
            history = []
            print(f"(system message {'set' if system else 'cleared'}; conversation reset)")
            continue
        if re.fullmatch(r"/[A-Za-z][\w-]*", command):  # a lone /word is a mistyped command, not a message
            print(f"unknown command {command}, see /help", file=sys.stderr)
            continue
        if text.lstrip().startswith("//"):
            text = text.lstrip()[1:]
        messages = ([{"role": "system", "content": system}] if system else []) + history
        messages.append({"role": "user", "content": text})
        try:
            fitted = fit_history(tokenizer, fmt, messages, budget)
        except ValueError as e:  # one message too long must not end the conversation
            print(f"phikit: error: {e}", file=sys.stderr)
            continue
        if len(fitted) < len(messages):
            print("(oldest turns dropped to fit the context)", file=sys.stderr)
        prompt, _, stops = chat_prompt(tokenizer, fitted, fmt, args.stop)
        print(bot, end="", flush=True)
        reply = ""
        try:
            # Trimmed as fmt.cut trims: the space after "Bob:" / "Answer:" belongs to the format, and trailing
            # blank lines are not part of the answer.
            for delta in answer_deltas(stream(model, tokenizer, prompt, **stops, **kw), fmt):
                reply += delta
                print(delta, end="", flush=True)
        except KeyboardInterrupt:  # Ctrl-C stops the answer, not the conversation (as llama.cpp does)
            print(" (stopped)", end="")
        print()
        history = [m for m in fitted if m["role"] != "system"] + [
            {"role": "assistant", "content": fmt.cut(reply)}]
