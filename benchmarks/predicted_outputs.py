"""Predicted outputs in the server's engine: greedy requests with and without OpenAI's `prediction`, in one process.

A request that sends the text it expects back (`"prediction": {"type": "content", "content": ...}`, say the file
being edited) has its greedy rows check up to 16 predicted tokens per step. The answer is the same; the gain is
the tokens kept per step times the cost of a step over several tokens against a step over one:

  plain       no prediction: one token per step
  right       the prediction is the answer itself (the most it can gain)
  edited      the answer with a word changed every ~10 words (a typical edit)
  wrong       unrelated text: what a useless prediction costs

Runs the server's Engine directly (no HTTP), on random weights of --preset or a trained --model, one request at
a time, rounds in turns, best of --repeats. The last line printed is JSON.

    python benchmarks/predicted_outputs.py                       # phi-1.5-shaped random weights, fp32
    python benchmarks/predicted_outputs.py --preset cpu-small --new-tokens 128
    python benchmarks/predicted_outputs.py --model runs/speedrun/model-chat --prompt "..."
"""
from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time

from phikit.inference.sampling import SamplingParams
from phikit.serve.engine import Engine, Group

from lm_setup import add_model_arguments, parse_and_load

DEFAULT_PROMPT = "Rename `total` to `running_sum` and return the code:\n\ndef cumulative(values):\n"


def run(engine: Engine, prompt: list[int], new_tokens: int, prediction: str) -> tuple[list[int], int, int, float]:
    """Tokens, engine steps and kept predicted tokens of one greedy request, and its seconds."""
    group = Group(list(prompt), SamplingParams(max_new_tokens=new_tokens, temperature=0.0), logprobs=0,
                  prediction=prediction)

    async def scenario():
        engine.submit([group])
        tokens = []
        while True:
            ev = await group.events.get()
            tokens += [t.token_id for t in ev.tokens]
            if ev.finish_reason:
                return tokens, ev.accepted_prediction_tokens

    steps = engine.steps
    start = time.perf_counter()
    tokens, kept = asyncio.run(scenario())
    return tokens, engine.steps - steps, kept, time.perf_counter() - start


def edit(text: str, every: int = 10) -> str:
    words = text.split(" ")
    return " ".join(w + "x" if i % every == every - 1 else w for i, w in enumerate(words))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(p, DEFAULT_PROMPT)
    args, model, tokenizer, name = parse_and_load(p)
    engine = Engine(model, tokenizer, max_batch=1)
    engine.start()
    try:
        prompt = tokenizer.encode(args.prompt)
        answer, _, _, _ = run(engine, prompt, args.new_tokens, "")  # also the warm-up
        text = tokenizer.decode(answer)
        predictions = {"plain": "", "right": text, "edited": edit(text),
                       "wrong": "An unrelated sentence about the weather in spring, " * 8}
        best = {k: float("inf") for k in predictions}
        stats = {}
        for _ in range(args.repeats):
            for label, prediction in predictions.items():
                tokens, steps, kept, seconds = run(engine, prompt, args.new_tokens, prediction)
                if tokens != answer:
                    print(f"{label}: the tokens differ from plain greedy decoding's (a near-tie rounded the other "
                          "way)", file=sys.stderr)
                best[label] = min(best[label], seconds)
                stats[label] = {"steps": steps, "kept_predicted_tokens": kept}
    finally:
        engine.stop()
    rows = []
    for label in predictions:
        row = {"engine": label, "seconds": round(best[label], 3), "tok_s": round(len(answer) / best[label], 2),
               **stats[label], "speedup": round(best["plain"] / best[label], 2)}
        print(json.dumps(row), file=sys.stderr)
        rows.append(row)
    print(json.dumps({"benchmark": "predicted_outputs", "model": name, "threads": args.threads,
                      "prompt_tokens": len(prompt), "new_tokens": len(answer), "rows": rows}))


if __name__ == "__main__":
    main()
