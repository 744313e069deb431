"""Log-likelihood scoring with lm-evaluation-harness semantics, computed fast.

A request is (context ids, continuation ids); its score is the summed log-probability of the continuation
tokens after the context, and whether greedy decoding would have produced them. Tokenization follows the harness
exactly (`encode_pair`): trailing spaces of the context move to the continuation, the whole text is encoded once
and the continuation is what follows the context's own tokens; an empty context becomes <|endoftext|>.

Speed: every distinct context runs through the model once (the question), and all of its continuations (the
answer options) then run as one batch on top of a copy of its KV cache. Contexts are grouped by length into
left-padded batches under a token budget, so padding and Python overhead stay small.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F

from ..inference.decoding import left_padded
from ..model import PhiForCausalLM
from ..progress import tqdm
from ..tokenizer import Tokenizer


@dataclass
class Score:
    logprob: float
    is_greedy: bool
    num_tokens: int


def encode_pair(tokenizer: Tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """Token ids of (context, continuation) exactly as the harness's causal-LM backends split them."""
    if context == "":
        cont = tokenizer.encode(continuation)
        prefix = tokenizer.eos_token_id
        return ([prefix], cont) if not cont or cont[0] != prefix else (cont[:1], cont[1:])
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
    whole = tokenizer.encode(context + continuation)
    ctx = tokenizer.encode(context)
    return ctx, whole[len(ctx):]


class LogLikelihoodScorer:
    """Scores (context, continuation) token requests on one model; `batch_tokens` bounds each forward pass."""

    def __init__(self, model: PhiForCausalLM, batch_tokens: int = 8192, max_length: int | None = None) -> None:
        from ..inference.quant import prepare_cpu_linears
        self.model = prepare_cpu_linears(model.eval())  # the layers generate and the server decode with
        self.batch_tokens = batch_tokens
        self.max_length = max_length or model.config.max_position_embeddings

    @torch.inference_mode()
    def score(self, requests: Sequence[tuple[Sequence[int], Sequence[int]]], progress: bool = False) -> list[Score]:
        results: list[Score | None] = [None] * len(requests)
        by_context: dict[tuple[int, ...], list[int]] = {}
        conts: list[list[int]] = []
        for i, (ctx, cont) in enumerate(requests):
            ctx, cont = list(ctx), list(cont)
            if not cont:
                raise ValueError(f"request {i} has an empty continuation: nothing to score")
            if len(cont) > self.max_length:
                raise ValueError(f"request {i}: continuation of {len(cont)} tokens exceeds the context window "
                                 f"({self.max_length}); shorten it")
            keep = self.max_length + 1 - len(cont)  # the harness keeps the last max_length+1 tokens
            ctx = ctx[-keep:] if keep > 0 else []
            if not ctx:
                ctx, cont = cont[:1], cont[1:]
            by_context.setdefault(tuple(ctx), []).append(i)
            conts.append(cont)
        contexts = sorted(by_context, key=len, reverse=True)
        positions = self.model.config.max_position_embeddings
        bar = tqdm(total=len(requests), desc="scoring", unit="req", disable=not progress)
        start = 0
        while start < len(contexts):
            # Grow the batch while (rows x longest context) fits the budget. Every option is fed after the batch's
            # full (left-padded) context width, so the longest context plus the longest option of any row must also
            # fit the model's positions: a long context beside another question's long option would not.
            width, longest, end = len(contexts[start]), 0, start
            while end < len(contexts):
                tail = max([longest] + [len(conts[i]) - 1 for i in by_context[contexts[end]]])
                if end > start and ((end - start + 1) * width > self.batch_tokens or width + tail > positions):
                    break
                longest, end = tail, end + 1
            self._score_batch(contexts[start:end], by_context, conts, results)
            bar.update(sum(len(by_context[c]) for c in contexts[start:end]))
            start = end
        bar.close()
        return results  # type: ignore[return-value]

    def _score_batch(self, contexts, by_context, conts, results) -> None:
        device = self.model.device
        ids, mask = left_padded(contexts, 0)
        ids, mask = ids.to(device), mask.long().to(device)
        width = ids.shape[1]
        padded = bool((mask == 0).any())
        out = self.model(ids, attention_mask=mask if padded else None, use_cache=True, logits_to_keep=1)
        first_logprobs = F.log_softmax(out.logits[:, -1].float(), dim=-1)
        cache = out.past_key_values
        # Every option of every context in this batch: (request index, context row).
        pairs = [(i, row) for row, ctx in enumerate(contexts) for i in by_context[ctx]]
        longest = max(len(conts[i]) for i, _ in pairs)
        chunk = max(1, self.batch_tokens // max(1, width + longest))
        for s in range(0, len(pairs), chunk):
            self._score_options(pairs[s:s + chunk], conts, cache, mask, first_logprobs, results)

    def _score_options(self, pairs, conts, cache, ctx_mask, first_logprobs, results) -> None:
        device = self.model.device
        rows = torch.tensor([row for _, row in pairs], device=device)
        first = [conts[i][0] for i, _ in pairs]
        lp0 = first_logprobs[rows, torch.tensor(first, device=device)]
        greedy0 = first_logprobs[rows].argmax(-1) == torch.tensor(first, device=device)
        tails = [conts[i][1:] for i, _ in pairs]
        length = max(len(t) for t in tails)
        if length == 0:
            for n, (i, _) in enumerate(pairs):
                results[i] = Score(float(lp0[n]), bool(greedy0[n]), 1)
            return
        # Feed each option's tokens but the last (right-padded) on top of its context's cache.
        inp = torch.zeros(len(pairs), length, dtype=torch.long)
        tgt = torch.zeros(len(pairs), length, dtype=torch.long)
        valid = torch.zeros(len(pairs), length, dtype=torch.bool)
        for n, i in enumerate(i for i, _ in pairs):
            c = conts[i]
            inp[n, :len(c) - 1] = torch.tensor(c[:-1])
            tgt[n, :len(c) - 1] = torch.tensor(c[1:])
            valid[n, :len(c) - 1] = True
        inp, tgt, valid = inp.to(device), tgt.to(device), valid.to(device)
        attn = torch.cat([ctx_mask[rows], valid.long()], dim=1)
        out = self.model(inp, attention_mask=attn, past_key_values=cache.select_rows(rows))
        logprobs = F.log_softmax(out.logits.float(), dim=-1)
        token_lp = logprobs.gather(-1, tgt[..., None])[..., 0].masked_fill(~valid, 0.0)
        greedy = (logprobs.argmax(-1) == tgt) | ~valid
        total = lp0 + token_lp.sum(-1)
        all_greedy = greedy0 & greedy.all(-1)
        for n, (i, _) in enumerate(pairs):
            results[i] = Score(float(total[n]), bool(all_greedy[n]), len(conts[i]))


def rolling_windows(tokens: Sequence[int], prefix_id: int, max_length: int) -> list[tuple[list[int], list[int]]]:
    """Split a document for full-context perplexity, as the harness does: windows of up to max_length predicted
    tokens, the first conditioned on `prefix_id`, each later one on as many preceding tokens as fit."""
    windows = []
    start = 0
    while start < len(tokens):
        end = min(start + max_length, len(tokens))
        context = [prefix_id] if start == 0 else list(tokens[max(0, end - max_length - 1):start])
        windows.append((context, list(tokens[start:end])))
        start = end
    return windows


def document_logprob(scorer: LogLikelihoodScorer, docs: Sequence[Sequence[int]], prefix_id: int,
                     progress: bool = False) -> list[float]:
    """Summed log-probability of each whole token document (rolling windows over the context length)."""
    requests, owner = [], []
    for d, tokens in enumerate(docs):
        for ctx, cont in rolling_windows(tokens, prefix_id, scorer.max_length):
            requests.append((ctx, cont))
            owner.append(d)
    totals = [0.0] * len(docs)
    for d, s in zip(owner, scorer.score(requests, progress=progress)):
        totals[d] += s.logprob
    return totals


def bits_per_byte(logprob: float, num_bytes: int) -> float:
    return -logprob / (math.log(2) * max(1, num_bytes))
