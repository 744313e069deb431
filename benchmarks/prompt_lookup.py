"""Prompt lookup decoding: greedy decoding against greedy decoding with `prompt_lookup=N`, in one process.

prompt_lookup guesses up to N tokens per step from earlier text that ends like the text so far, feeds them with
the last token in one forward pass, and keeps those the model's argmax agrees with. Its gain is the number of
tokens kept per pass, which depends on how much the answer repeats its context, times the cost of a pass of N+1
rows against a pass of one (what this benchmark measures with random weights):

  plain       greedy decoding, one token per pass
  ceiling     prompt_lookup with a guesser that knows the answer: every guess is kept (the most it can gain)
  floor       prompt_lookup with a guesser that is always wrong: one token per pass (what a miss costs)
  lookup      prompt_lookup as it is, on --prompt (or a prompt that quotes code, by default)

With --model DIR (a trained checkpoint) the lookup row is the real gain on that model and prompt. Timed rounds
take turns, best of --repeats. The last line printed is JSON.

    python benchmarks/prompt_lookup.py                          # phi-1.5-shaped random weights, fp32
    python benchmarks/prompt_lookup.py --preset cpu-small --draft 4,8,16
    python benchmarks/prompt_lookup.py --model runs/speedrun/model-chat --prompt "$(cat request.txt)"
"""
from __future__ import annotations

import argparse
import json
import sys
import time


import phikit.inference.decoding as generation
from phikit.inference.decoding import complete

from lm_setup import add_model_arguments, parse_and_load

DEFAULT_PROMPT = '''Rename the variable `total` to `running_sum` in this function and return the code:

def cumulative(values):
    total = 0
    out = []
    for v in values:
        total += v
        out.append(total)
    return out

Answer:
def cumulative(values):
'''


def tokens_per_pass(tokens: int, passes: int) -> float:
    """Tokens per decoding pass: the prompt's pass makes the first token, so it and that token are left out
    (plain greedy decoding is then exactly 1, a guesser that is always right N + 1)."""
    return round((tokens - 1) / max(1, passes - 1), 2)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(p, DEFAULT_PROMPT)
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--draft", default="8", help="comma list of N for prompt_lookup=N (default: 8)")
    args, model, tokenizer, name = parse_and_load(p)
    prompt = tokenizer.encode(args.prompt)
    kw = dict(max_new_tokens=args.new_tokens, stop_token_ids=[])
    answer = complete(model, tokenizer, [prompt], **kw)[0].token_ids  # also the warm-up
    real_guess = generation._lookup_draft

    def oracle(ids, max_tokens, longest_ngram=3, shortest_ngram=2):
        return answer[len(ids) - len(prompt):][:max_tokens]

    def wrong(ids, max_tokens, longest_ngram=3, shortest_ngram=2):
        return [(t + 1) % len(tokenizer) for t in oracle(ids, max_tokens)]

    passes: list[int] = []
    hook = model.register_forward_hook(lambda *_: passes.append(1))
    engines = [("plain", 0, real_guess)]
    for n in (int(d) for d in args.draft.split(",")):
        engines += [(f"ceiling-{n}", n, oracle), (f"floor-{n}", n, wrong), (f"lookup-{n}", n, real_guess)]
    best = {e[0]: float("inf") for e in engines}
    stats = {}
    for _ in range(args.repeats):
        for label, n, guesser in engines:
            generation._lookup_draft = guesser
            passes.clear()
            start = time.perf_counter()
            out = complete(model, tokenizer, [prompt], prompt_lookup=n, **kw)[0]
            best[label] = min(best[label], time.perf_counter() - start)
            if out.token_ids != answer:
                print(f"{label}: the tokens differ from greedy decoding's (a near-tie rounded the other way)",
                      file=sys.stderr)
            stats[label] = {"passes": len(passes), "tokens_per_pass": tokens_per_pass(len(answer), len(passes))}
    generation._lookup_draft = real_guess
    hook.remove()
    rows = []
    for label, _, _ in engines:
        row = {"engine": label, "seconds": round(best[label], 3), "tok_s": round(len(answer) / best[label], 2),
               **stats[label], "speedup": round(best["plain"] / best[label], 2)}
        print(json.dumps(row), file=sys.stderr)
        rows.append(row)
    print(json.dumps({"benchmark": "prompt_lookup", "model": name, "dtype": args.dtype, "threads": args.threads,
                      "prompt_tokens": len(prompt), "new_tokens": len(answer), "rows": rows}))


if __name__ == "__main__":
    main()
