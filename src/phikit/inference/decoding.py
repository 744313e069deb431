"""Decoding: sampling, batches of prompts of different lengths, stop rules, streaming, beam search, chat.

One engine serves every entry point. Prompts are left-padded into one batch; a KV cache sized for the whole
generation is allocated once; each step feeds one token per row. Rows finish on a stop token (`<|endoftext|>` by
default) or a stop string (matched on the decoded text, across token boundaries, and cut from the output).

    generate(model, tok, "def fib(n):", max_new_tokens=64)              -> str (the continuation only)
    generate(model, tok, ["a", "bb"], temperature=0.8, seed=1)          -> list[str]
    for delta in stream(model, tok, prompt): print(delta, end="")
    chat(model, tok, [{"role": "user", "content": "Hi"}])               -> the answer, in the model's format
    complete(model, tok, prompts, ...)                                   -> list[Completion] (ids, logprobs, reasons)
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Iterable, Iterator, Sequence

import numpy as np
import torch

from .detokenizer import Detokenizer
from .formats import PromptFormat, default_format, get_format
from .kv_cache import KVCache
from ..model import PhiForCausalLM
from .sampling import SamplingParams, apply_repetition_penalty, mask_padding_rows, process_logits, sample_next
from ..tokenizer import IM_END, Tokenizer


@dataclass
class Completion:
    """One prompt's result. token_ids/logprobs cover the kept tokens (a stop token itself is not kept; the token
    that completed a stop string is). logprobs are the model's own log-probabilities (before temperature/filters)."""

    text: str
    token_ids: list[int]
    logprobs: list[float] | None
    finish_reason: str  # "stop": a stop token or stop string; "length": max_new_tokens or the context ran out
    prompt_tokens: int


@dataclass
class Chunk:
    """A streaming delta for row `index`; finish_reason is set on the row's last chunk."""

    index: int
    text: str
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    finish_reason: str | None = None


# --------------------------------------------------------------------------------------------------------------
# Input checks


def _sampling_params(max_new_tokens: int, temperature: float, top_k: int, top_p: float, min_p: float,
                     repetition_penalty: float, seed: int | None) -> SamplingParams:
    return SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                          min_p=min_p, repetition_penalty=repetition_penalty, seed=seed).validate()


def check_prompt_lookup(prompt_lookup: int, params: SamplingParams, num_beams: int, compile: bool) -> None:
    """One-line errors for settings prompt lookup cannot honour (the CLI checks them before loading a model)."""
    if prompt_lookup < 0:
        raise ValueError(f"prompt_lookup must be >= 0 (0 turns it off), got {prompt_lookup}")
    if prompt_lookup and not params.greedy:
        raise ValueError("prompt_lookup keeps the guesses greedy decoding would make: use temperature=0")
    if prompt_lookup and (num_beams > 1 or compile):
        raise ValueError("prompt_lookup decodes eagerly without beams: drop num_beams/compile, or prompt_lookup")


def _stop_list(stop: Sequence[str] | str | None) -> list[str]:
    """Stop strings as a list: one string is one stop string (not one per character); anything else is an error
    here rather than a puzzling one deep in decoding."""
    stop = [stop] if isinstance(stop, str) else [] if stop is None else stop
    stop = list(stop) if isinstance(stop, Iterable) else stop
    if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
        raise ValueError(f"stop must be a string or a list of strings, got {stop!r:.80}")
    return stop


def encode_prompts(model: PhiForCausalLM, tokenizer: Tokenizer, prompts: Sequence[str | list[int] | torch.Tensor],
                   max_new_tokens: int, truncate: bool = False) -> list[list[int]] | list[torch.Tensor]:
    """Token ids per prompt, or each prompt's input embeddings [T, hidden] as given (soft prompts, a prefix from
    another model), checked against the context (truncate=True keeps each prompt's last tokens)."""
    context = model.config.max_position_embeddings
    embedded = [isinstance(p, torch.Tensor) for p in prompts]
    if any(embedded) and not all(embedded):
        raise ValueError("prompts mix text and input embeddings: pass all as text (or token ids) or all as "
                         "[tokens, hidden] embedding tensors")
    out = []
    for i, p in enumerate(prompts):
        if isinstance(p, str):
            ids = tokenizer.encode(p)
        elif isinstance(p, torch.Tensor):
            if p.dim() != 2 or p.shape[1] != model.config.hidden_size or not p.is_floating_point():
                raise ValueError(f"prompt {i} is a {str(p.dtype).removeprefix('torch.')} tensor of shape "
                                 f"{tuple(p.shape)}: input embeddings must be float [tokens, "
                                 f"{model.config.hidden_size}] (model.get_input_embeddings()(ids) has that shape)")
            ids = p
        elif isinstance(p, (list, tuple)) and all(isinstance(t, (int, np.integer)) for t in p):
            ids = [int(t) for t in p]
        else:
            raise ValueError(f"prompt {i} must be a string, a list of token ids or an embedding tensor, got {p!r:.80}")
        if not len(ids):
            raise ValueError(f"prompt {i} is empty: give at least one token of text to continue")
        if len(ids) >= context:
            if not truncate:
                raise ValueError(f"prompt {i} has {len(ids)} tokens but the context is {context}: shorten it, "
                                 "or pass truncate=True (--truncate) to keep its last tokens")
            ids = ids[-(context - max(1, min(max_new_tokens, context // 2))):]
        out.append(ids)
    return out


def left_padded(rows: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token rows as one left-padded batch: ids [B, longest] and the mask of real tokens (bool), on the CPU."""
    width = max(map(len, rows))
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.bool)
    for i, row in enumerate(rows):
        ids[i, width - len(row):] = torch.tensor(row, dtype=torch.long)
        mask[i, width - len(row):] = True
    return ids, mask


def _vocab_limit(model: PhiForCausalLM, tokenizer: Tokenizer) -> int | None:
    """Rows of the embedding past the tokenizer's vocabulary are padding: never produce them. The tokenizer is
    the authority (fine-tuning may have added tokens, such as ChatML's, after the config was written)."""
    return len(tokenizer) if len(tokenizer) < model.config.vocab_size else None


def stop_ids_for(tokenizer: Tokenizer, given: Sequence[int] | None = None) -> set[int]:
    """The ids given, else the default stop tokens: <|endoftext|>, and <|im_end|> where the tokenizer has ChatML."""
    if given is not None:
        return set(int(i) for i in given)
    ids = {tokenizer.eos_token_id}
    if tokenizer.has_chatml:
        ids.add(tokenizer.token_to_id(IM_END))
    return ids


# --------------------------------------------------------------------------------------------------------------
# The batch decoder


def _compiled_step(model: PhiForCausalLM):
    """torch.compile of the model's fixed-shape decoding step, made once per model and device type (shapes: one
    graph per batch size and cache capacity, which _cache_capacity rounds to a power of two). On CUDA the graph is
    also captured as a CUDA graph ("reduce-overhead"): a phi-1.5 step launches some 300 kernels, whose launch
    cost would otherwise exceed the GPU's time to read the weights."""
    steps = model.__dict__.setdefault("_compiled_decode_steps", {})
    device_type = model.device.type
    if device_type not in steps:
        steps[device_type] = model.compile_forward_static(
            dynamic=False, mode="reduce-overhead" if device_type == "cuda" else None)
    return steps[device_type]


def _keeps_static_caches(device: torch.device) -> bool:
    """Whether compiled decoding keeps its caches on the model between calls: CUDA graphs replay fixed addresses,
    so a cache kept per batch size and capacity is recorded once; elsewhere a new cache costs nothing to trace."""
    return device.type == "cuda"


@contextlib.contextmanager
def _static_cache(model: PhiForCausalLM, batch_size: int, capacity: int) -> Iterator[KVCache]:
    """A zeroed cache of this shape for compiled decoding: the model's kept one (taken out while in use, so a
    second thread decoding the same shape gets its own) where _keeps_static_caches, else a new one."""
    dtype, device = model.dtype, model.device
    if not _keeps_static_caches(device):
        yield KVCache.allocate(model.config, batch_size, capacity, device, dtype)
        return
    kept = model.__dict__.setdefault("_static_decode_caches", {})
    key = (batch_size, capacity, dtype, str(device))
    cache = kept.pop(key, None)
    if cache is None:
        cache = KVCache.allocate(model.config, batch_size, capacity, device, dtype)
        cache.mark_static_addresses()
    else:
        cache.reset()
    try:
        yield cache
    finally:
        kept[key] = cache


def free_decode_caches(model: PhiForCausalLM) -> None:
    """Drop the KV caches that compiled decoding on CUDA keeps on the model (one per batch size and length
    bucket), to give their memory back."""
    model.__dict__.pop("_static_decode_caches", None)


def _cache_capacity(total: int, context: int) -> int:
    return min(context, max(64, 1 << (total - 1).bit_length()))


@torch.inference_mode()
def _decode_tokens(model: PhiForCausalLM, rows: list[list[int]], params: SamplingParams, stop_ids: set[int],
                   vocab_limit: int | None, finished: torch.Tensor,
                   compile: bool = False) -> Iterator[tuple[list[int], list[float]]]:
    """Yield (next token per row, its logprob per row) each step; rows in `finished` (set by the caller or by a
    stop token) keep computing padding but are ignored. Ends when every row is finished or tokens run out.
    compile=True runs the steps after the prompt through torch.compile (fixed shapes over the whole cache)."""
    device = model.device
    b, longest = len(rows), max(len(r) for r in rows)
    steps = min(params.max_new_tokens, model.config.max_position_embeddings - longest)
    total = longest + steps
    embedded = isinstance(rows[0], torch.Tensor)  # input embeddings [T, hidden] per row, not token ids
    pad_id = 0 if embedded else rows[0][0]
    ids = torch.full((b, total), pad_id, dtype=torch.long, device=device)
    mask = torch.zeros((b, total), dtype=torch.long, device=device)
    if embedded:  # left-padded with zeros, which the mask hides
        dtype = model.dtype
        prompt_embeds = torch.zeros((b, longest, model.config.hidden_size), dtype=dtype, device=device)
    for i, r in enumerate(rows):
        if embedded:
            prompt_embeds[i, longest - len(r):] = r.to(device=device, dtype=dtype)
        else:
            ids[i, longest - len(r):longest] = torch.tensor(r, device=device)
        mask[i, longest - len(r):] = 1
        if params.repetition_penalty != 1.0 and not embedded:  # padding must not count as seen: repeat a real token
            ids[i, :longest - len(r)] = r[0]
    padded = any(len(r) != longest for r in rows)
    if compile:
        capacity = _cache_capacity(total, model.config.max_position_embeddings)
        cache_scope = _static_cache(model, b, capacity)
    else:
        cache_scope = contextlib.nullcontext(KVCache.allocate(model.config, b, total, device, model.cache_dtype))
    generator = None
    if params.seed is not None:
        generator = torch.Generator(device=device).manual_seed(params.seed)
    stop_tensor = torch.tensor(sorted(stop_ids), dtype=torch.long, device=device)

    with cache_scope as cache:
        prompt = dict(inputs_embeds=prompt_embeds) if embedded else dict(input_ids=ids[:, :longest])
        next_logits = model(**prompt, attention_mask=mask[:, :longest] if padded else None,
                            past_key_values=cache, use_cache=True, logits_to_keep=1).logits[:, -1]
        if compile:
            step_fn = _compiled_step(model)
            key_mask = torch.zeros((b, 1, capacity), dtype=torch.bool, device=device)
            key_mask[:, 0, :longest] = mask[:, :longest].bool()
            positions = mask[:, :longest].sum(-1, keepdim=True)  # the next token's position in each row
        for step in range(steps):
            cur = longest + step
            raw = next_logits.float()
            # With embeddings there are no prompt ids: only generated tokens count as seen (as in transformers).
            seen = ids[:, longest if embedded else 0:cur] if params.repetition_penalty != 1.0 else None
            logits = process_logits(raw, params, seen, vocab_limit)
            token = sample_next(logits, params, generator)
            logprob = torch.log_softmax(mask_padding_rows(raw, vocab_limit), -1).gather(-1, token[:, None])[:, 0]
            token = token.masked_fill(finished, pad_id)
            finished |= torch.isin(token, stop_tensor)
            ids[:, cur] = token
            yield token.tolist(), logprob.tolist()
            if bool(finished.all()) or step == steps - 1:
                return
            if compile:
                key_mask[:, 0, cur] = True
                cache.write_at(cur)
                if device.type == "cuda":  # the last step's logits are used up: the graph may reuse their memory
                    torch.compiler.cudagraph_mark_step_begin()
                next_logits = step_fn(token[:, None], positions + step, key_mask, cache)
            else:
                next_logits = model(token[:, None], attention_mask=mask[:, :cur + 1] if padded else None,
                                    past_key_values=cache, use_cache=True).logits[:, -1]


def _lookup_draft(ids: list[int], max_tokens: int, longest_ngram: int = 3, shortest_ngram: int = 2) -> list[int]:
    """Up to max_tokens ids that followed the latest earlier occurrence of the text's last n ids (n from
    longest_ngram down to shortest_ngram): the guess of prompt lookup decoding, free to make and often right when
    the answer quotes its context (code edits, summaries, extraction). A single matching token guesses wrong too
    often to pay for the longer pass, so at least two must match."""
    if max_tokens < 1:
        return []
    arr = np.asarray(ids)
    for n in range(min(longest_ngram, len(ids) - 1), shortest_ngram - 1, -1):
        windows = np.lib.stride_tricks.sliding_window_view(arr[:-1], n)  # starts 0 .. len-n-1: not the tail itself
        hits = np.flatnonzero((windows == arr[-n:]).all(1))
        if len(hits):
            start = int(hits[-1]) + n
            return ids[start:start + max_tokens]
    return []


class DraftSize:
    """How many guessed tokens the next pass checks (prompt lookup, predicted outputs). A wrong guess costs a longer
    pass for nothing, so the number halves after a pass that kept none of its guesses and doubles back (up to
    `most`) after one that kept all."""

    def __init__(self, most: int) -> None:
        self.most = self.next = most

    def update(self, guessed: int, kept: int) -> None:
        if guessed and not kept:
            self.next = max(1, self.next // 2)
        elif guessed and kept == guessed:
            self.next = min(self.most, 2 * self.next)


def accept_guesses(drafts: list[list[int]], choose) -> list[int]:
    """How many guessed tokens each row keeps from one pass that fed its last token and then its guesses
    (drafts[i]): column j of the pass follows the last token and the first j guesses. choose(j, rows) picks and
    records the token after column j of each of `rows` (those still going) and returns (tokens, finished); a row
    goes on to column j + 1 while its token is its guess j and it has not finished. The same rule serves prompt
    lookup and the server's predicted outputs."""
    kept = [0] * len(drafts)
    going = list(range(len(drafts)))
    for j in range(1 + max(map(len, drafts))):
        tokens, finished = choose(j, going)
        going = [i for i, token, done in zip(going, tokens, finished)
                 if not done and j < len(drafts[i]) and token == drafts[i][j]]
        if not going:
            break
        for i in going:
            kept[i] += 1
    return kept


@torch.inference_mode()
def _decode_prompt_lookup(model: PhiForCausalLM, row: list[int], params: SamplingParams, stop_ids: set[int],
                          vocab_limit: int | None, stop_now, draft_tokens: int) -> Iterator[tuple[int, float]]:
    """Greedy decoding of one prompt that checks several tokens per forward pass: each pass feeds the last token
    and up to draft_tokens guessed by _lookup_draft, keeps the guesses the model's own argmax agrees with, plus
    the model's token after them, and drops the rest from the cache. The tokens are greedy decoding's (a pass over
    several rows rounds differently from one over a single row, which can only flip exact near-ties), in fewer
    passes when the guesses are right; DraftSize sets how many to guess.
    Yields (token, logprob); stops after a stop token or when stop_now()."""
    steps = min(params.max_new_tokens, model.config.max_position_embeddings - len(row))
    cache = KVCache.allocate(model.config, 1, len(row) + steps + draft_tokens, model.device, model.cache_dtype)
    ids, end = list(row), len(row) + steps
    logits = model(torch.tensor([row], device=model.device), past_key_values=cache, use_cache=True,
                   logits_to_keep=1).logits[0]
    draft: list[int] = []
    guesses = DraftSize(draft_tokens)
    while True:
        picked: list[tuple[int, float]] = []

        def choose(j: int, rows: list[int]) -> tuple[list[int], list[bool]]:
            raw = logits[j:j + 1].float()
            seen = torch.tensor([ids], device=model.device) if params.repetition_penalty != 1.0 else None
            token = int(process_logits(raw, params, seen, vocab_limit).argmax(-1))
            picked.append((token, float(torch.log_softmax(mask_padding_rows(raw, vocab_limit), -1)[0, token])))
            ids.append(token)
            return [token], [token in stop_ids or len(ids) == end]

        kept = accept_guesses([draft], choose)[0]
        yield from picked
        if picked[-1][0] in stop_ids or len(ids) == end or stop_now():
            return
        cache.crop(cache.length - len(draft) + kept)  # keep the fed tokens up to the last guess taken
        guesses.update(len(draft), kept)
        draft = _lookup_draft(ids, min(guesses.next, end - len(ids) - 1))
        logits = model(torch.tensor([[picked[-1][0]] + draft], device=model.device), past_key_values=cache,
                       use_cache=True).logits[0]


def _stream_rows(model: PhiForCausalLM, tokenizer: Tokenizer, rows: list[list[int]], params: SamplingParams,
                 stop: Sequence[str], stop_ids: set[int], return_logprobs: bool,
                 compile: bool = False, prompt_lookup: int = 0) -> Iterator[Chunk]:
    detokenizers = [Detokenizer(tokenizer, stop) for _ in rows]
    finished = torch.zeros(len(rows), dtype=torch.bool, device=model.device)
    reasons: list[str | None] = [None] * len(rows)
    vocab_limit = _vocab_limit(model, tokenizer)

    def row_tokens() -> Iterator[tuple[int, int, float]]:  # (row, token, logprob)
        if prompt_lookup:  # one prompt after the other: rows accept different numbers of guesses per pass
            for i, row in enumerate(rows):
                for tok, lp in _decode_prompt_lookup(model, row, params, stop_ids, vocab_limit,
                                                     lambda i=i: bool(finished[i]), prompt_lookup):
                    yield i, tok, lp
            return
        for tokens, logprobs in _decode_tokens(model, rows, params, stop_ids, vocab_limit, finished, compile):
            yield from ((i, tok, lp) for i, (tok, lp) in enumerate(zip(tokens, logprobs)))

    for i, tok, lp in row_tokens():
        if reasons[i] is not None:
            continue
        detokenizer = detokenizers[i]
        if tok in stop_ids:
            reasons[i] = "stop"
            yield Chunk(i, detokenizer.finish(), finish_reason="stop")
            continue
        delta = detokenizer.push(tok)
        if detokenizer.stopped:
            reasons[i] = "stop"
            finished[i] = True
        yield Chunk(i, delta, [tok], [lp] if return_logprobs else [], reasons[i])
    for i, detokenizer in enumerate(detokenizers):
        if reasons[i] is None:  # ran out of new tokens (or context)
            yield Chunk(i, detokenizer.finish(), finish_reason="length")


# --------------------------------------------------------------------------------------------------------------
# Beam search


@torch.inference_mode()
def _beam_search(model: PhiForCausalLM, tokenizer: Tokenizer, prompt: list[int], params: SamplingParams,
                 num_beams: int, stop: Sequence[str], stop_ids: set[int], length_penalty: float,
                 early_stopping: bool | str, return_logprobs: bool) -> Completion:
    """Beam search with the scoring rules of transformers' generate (so results match it token for token):
    a hypothesis that ends (a stop token, or the length limit) scores sum(logprob) / length**length_penalty;
    each step keeps the best `num_beams` of 2*num_beams candidates; early_stopping True stops once num_beams
    hypotheses are done, False when no running beam can still beat them, "never" with an optimistic bound."""
    if not params.greedy:
        raise ValueError("beam search is deterministic: use temperature=0 with num_beams > 1")
    if early_stopping not in (True, False, "never"):
        raise ValueError(f"early_stopping must be True, False or 'never', got {early_stopping!r}")
    n, device = num_beams, model.device
    vocab_limit = _vocab_limit(model, tokenizer)
    steps = min(params.max_new_tokens, model.config.max_position_embeddings - len(prompt))
    keep = max(2, 1 + len(stop_ids)) * n  # enough candidates that n can go on even if the best n all end here
    stop_tensor = torch.tensor(sorted(stop_ids), dtype=torch.long, device=device)
    first_n = torch.arange(keep, device=device) < n

    cache = KVCache.allocate(model.config, 1, len(prompt) + steps, device, model.cache_dtype)
    prompt_ids = torch.tensor([prompt], device=device)
    logits = model(prompt_ids, past_key_values=cache, use_cache=True, logits_to_keep=1).logits[:, -1]
    cache = cache.select_rows(torch.zeros(n, dtype=torch.long, device=device))
    logits = logits.expand(n, -1)

    running = torch.zeros((n, steps), dtype=torch.long, device=device)  # generated tokens per beam
    running_lp = torch.zeros((n, steps), device=device)  # each token's logprob
    running_scores = torch.full((n,), -1e9, device=device)
    running_scores[0] = 0.0  # all beams start equal: only the first may expand, or they would duplicate
    done = running.clone()
    done_lp = running_lp.clone()
    done_scores = torch.full((n,), -1e9, device=device)
    done_len = torch.zeros(n, dtype=torch.long, device=device)
    done_flag = torch.zeros(n, dtype=torch.bool, device=device)
    can_improve = True
    for step in range(steps):
        logp = torch.log_softmax(mask_padding_rows(logits.float(), vocab_limit), -1)
        if params.repetition_penalty != 1.0:
            seen = torch.cat([prompt_ids.expand(n, -1), running[:, :step]], 1)
            logp = apply_repetition_penalty(logp, seen, params.repetition_penalty)
        vocab = logp.shape[-1]
        top_scores, top_index = (logp + running_scores[:, None]).view(-1).topk(keep)
        parent, token = top_index // vocab, top_index % vocab
        cand = running[parent].clone()
        cand[:, step] = token
        cand_lp = running_lp[parent].clone()
        cand_lp[:, step] = logp[parent, token]
        ends = torch.isin(token, stop_tensor) | (step == steps - 1)

        # Beams that go on: the best n candidates that did not end.
        go_on = (top_scores - 1e9 * ends.float()).topk(n).indices
        running, running_lp, running_scores = cand[go_on], cand_lp[go_on], (top_scores - 1e9 * ends.float())[go_on]

        # Finished hypotheses: merge those that ended among the best n candidates, if they still may enter.
        scores = top_scores / ((step + 1) ** length_penalty)
        full = bool(done_flag.all()) and early_stopping is True
        admissible = ends & first_n & (can_improve and not full)
        scores = scores - 1e9 * (~admissible).float()
        best = torch.cat([done_scores, scores]).topk(n).indices
        done = torch.cat([done, cand])[best]
        done_lp = torch.cat([done_lp, cand_lp])[best]
        done_scores = torch.cat([done_scores, scores])[best]
        done_len = torch.cat([done_len, torch.full((keep,), step + 1, device=device)])[best]
        done_flag = torch.cat([done_flag, admissible])[best]

        # Could a running beam still beat the worst finished one? (transformers' heuristic, per early_stopping)
        horizon = steps if early_stopping == "never" and length_penalty > 0 else step + 1
        best_running = running_scores[0] / (horizon ** length_penalty)
        can_improve = can_improve and (not bool(done_flag.all()) or bool(best_running > done_scores.min()))
        if not can_improve or (bool(done_flag.all()) and early_stopping is True) or bool(ends.all()):
            break
        cache = cache.select_rows(parent[go_on])
        logits = model(running[:, step:step + 1], past_key_values=cache, use_cache=True).logits[:, -1]

    length = int(done_len[0])
    tokens, lps = done[0, :length].tolist(), done_lp[0, :length].tolist()
    reason = "length"
    if tokens and tokens[-1] in stop_ids:
        tokens, lps, reason = tokens[:-1], lps[:-1], "stop"
    detokenizer = Detokenizer(tokenizer, stop)
    kept = 0
    for tok in tokens:
        detokenizer.push(tok)
        kept += 1
        if detokenizer.stopped:
            reason = "stop"
            break
    detokenizer.finish()
    return Completion(detokenizer.text, tokens[:kept], lps[:kept] if return_logprobs else None, reason, len(prompt))


# --------------------------------------------------------------------------------------------------------------
# Public API


def _prepare(model: PhiForCausalLM, tokenizer: Tokenizer, prompts, params: SamplingParams,
             stop: Sequence[str] | str | None, stop_token_ids: Sequence[int] | None, num_beams: int, truncate: bool,
             compile: bool, prompt_lookup: int) -> tuple[list, list[str], set[int]]:
    """What complete() and stream_chunks() do before decoding: check the settings, encode the prompts, put the model
    in inference mode. Returns (rows, stop strings, stop token ids)."""
    check_prompt_lookup(prompt_lookup, params, num_beams, compile)
    stop = _stop_list(stop)
    prompts = [prompts] if isinstance(prompts, (str, torch.Tensor)) else prompts  # one prompt, not one per row
    if not prompts:
        raise ValueError("no prompts given: pass a string or a non-empty list of strings")
    rows = encode_prompts(model, tokenizer, prompts, params.max_new_tokens, truncate)
    if isinstance(rows[0], torch.Tensor) and (num_beams > 1 or prompt_lookup):
        raise ValueError("prompts given as input embeddings decode without beams or prompt lookup (both need the "
                         "prompt's token ids): drop num_beams/prompt_lookup, or pass text")
    _prepare_model(model)
    return rows, stop, stop_ids_for(tokenizer, stop_token_ids)


def complete(model: PhiForCausalLM, tokenizer: Tokenizer, prompts: Sequence[str | list[int] | torch.Tensor],
             max_new_tokens: int = 256, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
             min_p: float = 0.0, repetition_penalty: float = 1.0, seed: int | None = None,
             stop: Sequence[str] | str | None = None, num_beams: int = 1, stop_token_ids: Sequence[int] | None = None,
             return_logprobs: bool = False, length_penalty: float = 1.0, early_stopping: bool | str = False,
             truncate: bool = False, compile: bool = False, prompt_lookup: int = 0) -> list[Completion]:
    """Generate for a batch of prompts (text, token ids, or input embeddings [tokens, hidden] each); one Completion
    (text, ids, logprobs, finish reason) per prompt.
    compile=True decodes through torch.compile: the first call per batch size and length bucket compiles
    (tens of seconds), later ones skip the Python overhead of each step (beam search stays eager).
    prompt_lookup=N (greedy only) guesses up to N tokens per step from earlier text that ends like the text so
    far and checks them in one pass: the same tokens, in fewer passes when the answer repeats its context."""
    params = _sampling_params(max_new_tokens, temperature, top_k, top_p, min_p, repetition_penalty, seed)
    rows, stop, stop_ids = _prepare(model, tokenizer, prompts, params, stop, stop_token_ids, num_beams, truncate,
                                    compile, prompt_lookup)
    if num_beams > 1:
        return [_beam_search(model, tokenizer, r, params, num_beams, stop, stop_ids, length_penalty, early_stopping,
                            return_logprobs) for r in rows]
    if num_beams < 1:
        raise ValueError(f"num_beams must be >= 1, got {num_beams}")
    texts = [""] * len(rows)
    ids: list[list[int]] = [[] for _ in rows]
    lps: list[list[float]] = [[] for _ in rows]
    reasons = ["length"] * len(rows)
    for c in _stream_rows(model, tokenizer, rows, params, stop, stop_ids, return_logprobs, compile, prompt_lookup):
        texts[c.index] += c.text
        ids[c.index] += c.token_ids
        lps[c.index] += c.logprobs
        if c.finish_reason:
            reasons[c.index] = c.finish_reason
    return [Completion(t, i, lp if return_logprobs else None, r, len(row))
            for t, i, lp, r, row in zip(texts, ids, lps, reasons, rows)]


def generate(model: PhiForCausalLM, tokenizer: Tokenizer, prompt_or_prompts: str | Sequence[str],
             max_new_tokens: int = 256, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
             min_p: float = 0.0, repetition_penalty: float = 1.0, seed: int | None = None,
             stop: Sequence[str] | str | None = None, num_beams: int = 1, stop_token_ids: Sequence[int] | None = None,
             return_logprobs: bool = False, **options) -> str | list[str] | Completion | list[Completion]:
    """The continuation of a prompt (str) or of each prompt (list). return_logprobs=True returns Completion objects
    instead (text, token_ids, logprobs, finish_reason). Options: length_penalty, early_stopping (beam search),
    truncate (keep the last tokens of an over-long prompt), compile (decode through torch.compile),
    prompt_lookup (check up to N guessed tokens per pass, greedy only)."""
    single = isinstance(prompt_or_prompts, (str, torch.Tensor))  # a tensor: one prompt's input embeddings
    if not single and not isinstance(prompt_or_prompts, Iterable):  # None, a number: say so, not "not iterable"
        raise ValueError(f"prompt must be a string or a list of strings, got {prompt_or_prompts!r:.80}")
    prompts = [prompt_or_prompts] if single else list(prompt_or_prompts)
    results = complete(model, tokenizer, prompts, max_new_tokens, temperature, top_k, top_p, min_p,
                       repetition_penalty, seed, stop, num_beams, stop_token_ids, return_logprobs, **options)
    out = results if return_logprobs else [r.text for r in results]
    return out[0] if single else out


def stream_chunks(model: PhiForCausalLM, tokenizer: Tokenizer, prompts: Sequence[str | list[int] | torch.Tensor],
                  max_new_tokens: int = 256, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
                  min_p: float = 0.0, repetition_penalty: float = 1.0, seed: int | None = None,
                  stop: Sequence[str] | str | None = None, num_beams: int = 1,
                  stop_token_ids: Sequence[int] | None = None, return_logprobs: bool = False,
                  truncate: bool = False, compile: bool = False, prompt_lookup: int = 0) -> Iterator[Chunk]:
    """Chunks (row index, text delta, token ids, logprobs, finish reason) as they become final, for servers."""
    if num_beams != 1:
        raise ValueError("beam search cannot stream (the best beam is known only at the end): use num_beams=1")
    params = _sampling_params(max_new_tokens, temperature, top_k, top_p, min_p, repetition_penalty, seed)
    rows, stop, stop_ids = _prepare(model, tokenizer, prompts, params, stop, stop_token_ids, num_beams, truncate,
                                    compile, prompt_lookup)
    yield from _stream_rows(model, tokenizer, rows, params, stop, stop_ids, return_logprobs, compile, prompt_lookup)


def stream(model: PhiForCausalLM, tokenizer: Tokenizer, prompt: str, **sampling) -> Iterator[str]:
    """Text deltas of one prompt's continuation as they become printable; they join to generate()'s result."""
    if isinstance(prompt, (list, tuple)) and any(isinstance(p, str) for p in prompt):
        raise ValueError("stream() continues one prompt: pass a string (stream_chunks takes a batch)")
    for chunk in stream_chunks(model, tokenizer, [prompt], **sampling):
        if chunk.text:
            yield chunk.text


def chat_prompt(tokenizer: Tokenizer, messages: list[dict], format: str | PromptFormat | None = None,
                stop: Sequence[str] | str | None = None) -> tuple[str, PromptFormat, dict]:
    """Render messages in a format; returns (prompt, format, stop keywords for generate/stream)."""
    fmt = format if isinstance(format, PromptFormat) else get_format(format or default_format(tokenizer))
    stop = _stop_list(stop)
    # The default stop tokens (<|endoftext|>, and <|im_end|> where the tokenizer has it: a ChatML-tuned model ends
    # its turn with it whatever format the prompt is in), plus the format's own.
    stop_ids = stop_ids_for(tokenizer)
    stop_ids |= {i for i in (tokenizer.token_to_id(n) for n in fmt.stop_token_names) if i is not None}
    return fmt.render(messages), fmt, dict(stop=fmt.stop_strings + stop, stop_token_ids=sorted(stop_ids))


def chat(model: PhiForCausalLM, tokenizer: Tokenizer, messages: list[dict], format: str | PromptFormat | None = None,
         **sampling) -> str:
    """The model's answer to OpenAI-style messages, rendered in `format` (default: ChatML when the tokenizer has
    it, else the Alice/Bob transcript), cut where the answer ends."""
    prompt, fmt, stops = chat_prompt(tokenizer, messages, format, sampling.pop("stop", None))
    sampling.setdefault("stop_token_ids", stops["stop_token_ids"])
    return fmt.cut(generate(model, tokenizer, prompt, stop=stops["stop"], **sampling))


def _prepare_model(model: PhiForCausalLM) -> None:
    """Inference mode, and the CPU's fast nn.Linear paths (see quant.prepare_cpu_linears)."""
    if model.training:
        model.eval()
    from .quant import prepare_cpu_linears
    prepare_cpu_linears(model)
