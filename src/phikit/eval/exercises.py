"""Scoring a model on held-out exercises with known answers (the records of phikit.data.procedural).

Questions with an integer answer are decoded greedily and read back after "Answer:"; functions are completed and
run against their tests in the sandbox (pass@1); a 4-way multiple choice among the answer and near misses is
scored by log-likelihood; perplexity is that of the whole exercises. A base model is prompted with the exercise's
own text; a chat model (`chat_format=True`) is asked in its chat format, as it was tuned.
"""
from __future__ import annotations

import math
import random
import re
from typing import Any

import torch

from ..data.conversations import complete_request, python_parts
from ..data.procedural import parse_answer
from .scoring import LogLikelihoodScorer, document_logprob, encode_pair

ANSWER_KINDS = ("arithmetic_easy", "arithmetic", "word_problem", "word_problem_new_phrasing")
PERPLEXITY_KINDS = ("arithmetic_easy", "arithmetic", "word_problem", "python")


def final_answer(completion: str) -> int | None:
    """The number a completion gives as its answer: after its last 'Answer:', or the whole completion when that is
    a bare number. A solution cut off before its answer gives None, never a number picked from its steps."""
    if "Answer:" in completion:
        return parse_answer(completion)
    bare = completion.strip().rstrip(".")
    return int(bare) if re.fullmatch(r"-?\d+", bare) else None


def solution_tokens(tokenizer, texts: list[str]) -> int:
    """A generation budget that fits the longest of these reference answers, with room to spare."""
    return max(len(tokenizer.encode(t)) for t in texts) + 32


def chat_batch(model, tokenizer, user_texts: list[str], max_new_tokens: int, batch_size: int = 32) -> list[str]:
    """Single-turn chats decoded together (one batched generate call per batch_size prompts)."""
    from ..inference.decoding import chat_prompt, generate
    outs: list[str] = []
    for i in range(0, len(user_texts), batch_size):
        rendered = [chat_prompt(tokenizer, [{"role": "user", "content": t}]) for t in user_texts[i:i + batch_size]]
        fmt, stops = rendered[0][1], rendered[0][2]
        texts = generate(model, tokenizer, [r[0] for r in rendered], max_new_tokens=max_new_tokens, **stops)
        outs += [fmt.cut(t) for t in texts]
    return outs


def answer_accuracy(model, tokenizer, records: list[dict], chat_format: bool) -> dict[str, Any]:
    """Exact-answer accuracy on questions with an integer answer, with its counts (for an exact test)."""
    from ..inference.decoding import generate
    # Word problems take up to ~200 tokens of steps: a fixed short budget would cut most of them off before
    # their answer and score them wrong whatever the model knows.
    budget = solution_tokens(tokenizer, [r["text"][len(r["prompt"]):] for r in records])
    if chat_format:
        outs = chat_batch(model, tokenizer, [r["question"] for r in records], budget)
    else:
        outs = generate(model, tokenizer, [r["prompt"] for r in records], max_new_tokens=budget,
                        stop=["\n\n", "Question:"])
    correct = [final_answer(o) == r["answer"] for o, r in zip(outs, records)]
    return {"accuracy": sum(correct) / len(correct), "counts": [sum(correct), len(correct)], "correct": correct}


def code_pass_at_1(model, tokenizer, records: list[dict], chat_format: bool) -> float:
    """Greedy pass@1 of held-out functions: the model completes each signature and docstring (a chat model is
    asked to, and answers with the function from its signature line), and the result runs against the exercise's
    tests."""
    from ..inference.decoding import generate
    from ..sandbox import run_many
    parts = [python_parts(r["text"]) for r in records]
    if chat_format:
        budget = solution_tokens(tokenizer, [p + b for p, b, _ in parts])
        outs = chat_batch(model, tokenizer, [complete_request(p) for p, _, _ in parts], budget)
    else:
        outs = generate(model, tokenizer, [p for p, _, _ in parts], max_new_tokens=128,
                        stop=["\ndef ", "\nassert", "\n\n\n"])
    programs = []
    for r, (prompt, _, tests), out in zip(records, parts, outs):
        head = f"def {r['entry_point']}("
        function = out[out.index(head):] if chat_format and head in out else prompt + out
        asserts = "\n".join(line for line in tests.splitlines() if line.startswith("assert"))
        programs.append(function.split("\nassert")[0] + "\n\n" + asserts + "\n")
    verdicts = run_many(programs, timeout=5.0)
    return sum(v.passed for v in verdicts) / len(verdicts)


def answer_multiple_choice(model, tokenizer, records: list[dict]) -> float:
    """4-way choice among the true answer and near misses, scored by log-likelihood (lm-eval style)."""
    rng = random.Random(0)
    requests = []
    for r in records:
        a = r["answer"]
        options = [a] + rng.sample([a + d for d in (-10, -2, -1, 1, 2, 10)], 3)
        requests += [encode_pair(tokenizer, f"Question: {r['question']}\nAnswer:", f" {o}") for o in options]
    scores = [s.logprob for s in LogLikelihoodScorer(model).score(requests)]
    picks = [max(range(4), key=lambda j: scores[4 * i + j]) for i in range(len(records))]
    return sum(p == 0 for p in picks) / len(records)


def text_perplexity(model, tokenizer, texts: list[str]) -> float:
    """Perplexity over whole texts, each scored on its own after <|endoftext|> (rolling windows when long)."""
    docs = [t for t in tokenizer.encode_batch(texts) if t]
    logprobs = document_logprob(LogLikelihoodScorer(model), docs, tokenizer.eos_token_id)
    return math.exp(-sum(logprobs) / max(1, sum(map(len, docs))))


@torch.no_grad()
def evaluate_exercises(model, tokenizer, heldout: dict[str, list[dict]], chat_format: bool,
                       perplexity: bool = True) -> dict[str, Any]:
    """Every score above on held-out exercises grouped by kind: `{kind}_accuracy` and `{kind}_counts` (arithmetic
    also by number of operations), `code_pass@1`, `mc_accuracy`, `heldout_perplexity` (of the PERPLEXITY_KINDS)."""
    result: dict[str, Any] = {}
    for kind in ANSWER_KINDS:
        records = heldout.get(kind, [])
        if not records:
            continue
        scored = answer_accuracy(model, tokenizer, records, chat_format)
        result[f"{kind}_accuracy"], result[f"{kind}_counts"] = scored["accuracy"], scored["counts"]
        if kind.startswith("arithmetic"):  # also by difficulty: one operation, or several
            ops = [sum(r["question"].count(f" {c} ") for c in "+-*") for r in records]
            for label, keep in (("1op", lambda n: n == 1), ("multi_op", lambda n: n > 1)):
                picked = [c for c, n in zip(scored["correct"], ops) if keep(n)]
                if picked:
                    result[f"{kind}_{label}_accuracy"] = sum(picked) / len(picked)
    code = heldout.get("python", [])[:30]
    if code:
        result["code_pass@1"] = code_pass_at_1(model, tokenizer, code, chat_format)
    mc = (heldout.get("arithmetic_easy") or heldout.get("arithmetic", []))[:60]
    if mc:
        result["mc_accuracy"] = answer_multiple_choice(model, tokenizer, mc)
    if perplexity:
        texts = [r["text"] for kind in PERPLEXITY_KINDS for r in heldout.get(kind, [])[:30]]
        result["heldout_perplexity"] = text_perplexity(model, tokenizer, texts)
    return result
