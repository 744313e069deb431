"""Continuous batching: one decoding loop in a background thread serves every request at once.

All running sequences share one batched KV cache. Rows are right-aligned: each row's tokens are a contiguous
suffix of the cache and the columns in front of them are left padding, hidden by a per-row attention mask, so the
model derives every row's positions from the mask (cumsum). Between two decoding steps:

- new requests are prefilled together (left-padded) and their cache rows are merged into the batch, padding
  whichever side is shorter;
- finished, cancelled (client gone) and timed-out rows are dropped at once, and padding columns that no remaining
  row needs are cut away, so the cache is never longer than the longest live sequence.

Predicted outputs (OpenAI's `prediction`): a greedy row whose request sent the text it expects checks up to
PREDICTION_DRAFT_TOKENS tokens of it per step, fed after the row's last token in one pass, and keeps those the
model's own argmax agrees with, plus the model's token after them. Columns of guesses it did not keep stay in the
cache as holes that the row's mask hides (positions come from the mask, so they do not count); the cache is
compacted when holes take too much of it. The tokens are the ones plain greedy decoding gives, in fewer steps
when the prediction is right.

The HTTP layer talks to the engine through `Group` objects (one prompt, `n` sampled continuations) and receives
`Event`s on an asyncio queue: text deltas that are safe to show (never part of a stop string, never half a UTF-8
character), per-token logprobs when asked, and the finish reason.
"""
from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections import deque
from dataclasses import dataclass, field

import torch

from ..inference.decoding import DraftSize, _lookup_draft, accept_guesses, left_padded
from ..inference.kv_cache import KVCache
from ..model import PhiForCausalLM
from ..inference.quant import prepare_cpu_linears
from ..inference.detokenizer import Detokenizer
from ..inference.sampling import SamplingParams, process_logits, sample_next
from ..tokenizer import Tokenizer

log = logging.getLogger("phikit.serve")

# Extra cache columns allocated when rows are merged, so the next steps append without reallocating.
CACHE_HEADROOM = 128
# Most predicted tokens a row checks in one step (DraftSize adapts the number to how many it keeps).
PREDICTION_DRAFT_TOKENS = 16


class QueueFull(Exception):
    """More prompts are waiting than the server's --max-queue allows."""


@dataclass
class TokenLogprob:
    token_id: int
    logprob: float
    top: list[tuple[int, float]]  # the most likely alternatives, best first
    offset: int = 0  # character offset of the token's text in the choice's text


@dataclass
class Event:
    index: int  # choice index within the request
    text: str = ""  # newly released text
    tokens: list[TokenLogprob] = field(default_factory=list)  # logprobs of the tokens behind `text`
    finish_reason: str | None = None  # stop | length | timeout | cancelled | error
    completion_tokens: int = 0  # tokens generated so far for this choice
    error: str | None = None
    accepted_prediction_tokens: int = 0  # predicted tokens the model agreed with (so far)
    rejected_prediction_tokens: int = 0  # predicted tokens checked and found wrong (so far)


@dataclass(eq=False)
class Group:
    """One prompt and `n` continuations sampled from it; the unit the engine admits into the batch."""

    prompt_ids: list[int]
    params: SamplingParams
    n: int = 1
    first_index: int = 0  # choice index of the first continuation
    stop: list[str] = field(default_factory=list)
    stop_token_ids: frozenset[int] = frozenset()
    logprobs: int | None = None  # None: none; k: the chosen token's logprob plus the k best alternatives
    strip: str = ""  # "": keep the text as generated; "right": drop trailing whitespace; "both": also leading
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[int, float] = field(default_factory=dict)
    deadline: float | None = None  # time.monotonic() after which the request times out
    prediction: str = ""  # the text the client expects (greedy rows check it)
    events: asyncio.Queue | None = None  # where events go (filled from the engine thread)
    loop: asyncio.AbstractEventLoop | None = None
    cancelled: bool = False  # set from the event loop when the client is gone

    def cancel(self) -> None:
        self.cancelled = True


class Sequence:
    """One continuation being decoded: its tokens, its text, and how much of it was released."""

    def __init__(self, group: Group, index: int, context: int, tokenizer: Tokenizer) -> None:
        self.group = group
        self.index = index
        self.output_ids: list[int] = []  # generated tokens that are part of the text (stop tokens excluded)
        self.generated = 0  # all generated tokens, stop token included (usage counts it)
        self.detokenizer = Detokenizer(tokenizer, group.stop)
        self.skipped = 0  # leading whitespace dropped (strip "both")
        self.sent = 0  # characters of the text sent, skipped ones included: where the held-back part begins
        self.trailing = ""  # whitespace held back while it may turn out to be the end (strip)
        self.pending: list[tuple[int, TokenLogprob]] = []  # (raw text offset, logprob) not yet sent
        self.finish_reason: str | None = None
        self.max_new = min(group.params.max_new_tokens, context - len(group.prompt_ids))
        seed = group.params.seed
        self.generator = None
        if seed is not None:
            self.generator = torch.Generator().manual_seed(seed + index - group.first_index)
        self.counts: dict[int, int] = {}  # generated token counts, for presence/frequency penalties
        self.failure: str | None = None  # why sampling this row failed (its request gets an error)
        self.guesses = DraftSize(PREDICTION_DRAFT_TOKENS)  # predicted tokens to check next step
        self.accepted = self.rejected = 0  # predicted tokens kept and thrown away
        self.prediction_ids: list[int] | None = None  # the prediction's tokens, encoded at the first draft

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def simple_sampling(self) -> bool:
        """True when the row can be sampled together with others that share its parameters."""
        g = self.group
        return (self.generator is None and g.params.repetition_penalty == 1.0 and not g.presence_penalty
                and not g.frequency_penalty and not g.logit_bias)


def prediction_draft(prediction_ids: list[int], prediction_text: str, generated_ids: list[int], generated_text: str,
                     encode, max_tokens: int) -> list[int]:
    """Up to max_tokens tokens of the prediction that should come next:
    - its tokens after the output's, while the output still equals its start;
    - else what followed the latest place in its tokens that ends like the output (3, then 2 tokens), as after an
      edit the output goes back to quoting the prediction;
    - else its text after the latest place that ends like the output's text (32, 16 or 8 characters), encoded
      afresh: the output may split the same text into other tokens (a stripped chat answer, say)."""
    if max_tokens < 1 or not prediction_ids:
        return []
    n = len(generated_ids)
    if prediction_ids[:n] == generated_ids:
        return prediction_ids[n:n + max_tokens]
    draft = _lookup_draft(prediction_ids + generated_ids[-3:], max_tokens) if n >= 2 else []
    if draft:
        return draft
    for chars in (32, 16, 8):
        if len(generated_text) >= chars:
            at = prediction_text.rfind(generated_text[-chars:])
            if at >= 0:
                at += chars
                return encode(prediction_text[at:at + 8 * max_tokens])[:max_tokens]
    return []


class Engine:
    """The decoding loop. `submit` from the event loop; events come back on each group's queue."""

    def __init__(self, model: PhiForCausalLM, tokenizer: Tokenizer, max_batch: int = 16, max_queue: int = 64,
                 prefill_tokens: int = 4096, compile: bool = False) -> None:
        if max_batch < 1 or max_queue < 0:
            raise ValueError(f"max_batch must be >= 1 and max_queue >= 0, got {max_batch} and {max_queue}")
        # The CPU's fast linear paths (packed weights for batches, kernels measured for this CPU), as generate uses.
        self.model = prepare_cpu_linears(model.eval())
        self.tokenizer = tokenizer
        self.max_batch = max_batch
        self.max_queue = max_queue
        self.prefill_tokens = prefill_tokens  # prompt tokens prefilled in one go before decoding resumes
        self.context = model.config.max_position_embeddings
        self.vocab_limit = min(len(tokenizer), model.config.vocab_size)
        self._inbox: queue.SimpleQueue[Group] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._queued = 0  # groups submitted and not yet admitted (inbox + waiting)
        self._active = 0  # rows admitted and not yet removed (prefilling or decoding)
        self._waiting: deque[Group] = deque()
        self._running: list[Sequence] = []
        self._cache: KVCache | None = None
        self._mask: torch.Tensor | None = None  # [B, cache.length] bool: which cache columns are real
        self._last: torch.Tensor | None = None  # [B] the token each row feeds next
        self._outbox: list[tuple[Group, Event]] = []
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        # torch.compile of the fixed-shape decoding step (PhiForCausalLM.forward_static). Batch size and cache
        # capacity change as requests come and go, so both are symbolic: one graph serves every batch (torch
        # specializes a batch of one, which gets a second).
        self._compiled_step = model.compile_forward_static(dynamic=True) if compile else None
        self.steps = 0  # decoding steps run (observability and tests)
        self.max_rows_seen = 0  # largest batch decoded together
        self.compactions = 0  # times the cache was compacted (holes left by predicted outputs)
        self._holes_possible = False  # a predicted step ran since the last compaction (else nothing to check)

    # --- the event-loop side ---
    @property
    def num_running(self) -> int:
        return len(self._running)

    @property
    def num_waiting(self) -> int:
        return self._queued

    def start(self) -> None:
        if self._thread is None or not self._thread.is_alive():
            self._stopping.clear()
            self._thread = threading.Thread(target=self._run, name="phikit-engine", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        self._stopping.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
            self._thread = None

    def submit(self, groups: list[Group]) -> None:
        """Queue one request's prompts (all or none). Raises QueueFull when the waiting line is full."""
        loop = asyncio.get_running_loop()
        for g in groups:
            if g.n > self.max_batch:
                raise ValueError(f"n={g.n} exceeds the server's batch size of {self.max_batch}: lower n")
            if len(g.prompt_ids) + 1 > self.context:
                raise ValueError(f"prompt of {len(g.prompt_ids)} tokens leaves no room in the context of "
                                 f"{self.context}: shorten the prompt")
            g.loop = loop
            if g.events is None:
                g.events = asyncio.Queue()
        with self._lock:
            if self._queued + len(groups) > self.max_queue + max(0, self.max_batch - self._active):
                raise QueueFull(f"{self._queued} prompts are already waiting (--max-queue {self.max_queue})")
            self._queued += len(groups)
        for g in groups:
            self._inbox.put(g)

    # --- the engine thread ---
    def _run(self) -> None:
        with torch.inference_mode():
            while not self._stopping.is_set():
                self._take_inbox(block=not self._running and not self._waiting)
                try:
                    self._drop_cancelled()
                    self._admit()
                    if self._running:
                        self._step()
                    self._remove_finished()
                except Exception as e:  # a failing step must not kill the server: fail its requests only
                    log.exception("decoding step failed")
                    self._fail_all(f"{type(e).__name__}: {e}")
                self._flush()

    def _take_inbox(self, block: bool) -> None:
        try:
            if block:
                self._waiting.append(self._inbox.get(timeout=0.1))
            while True:
                self._waiting.append(self._inbox.get_nowait())
        except queue.Empty:
            pass

    def _emit(self, seq_or_group, event: Event) -> None:
        group = seq_or_group.group if isinstance(seq_or_group, Sequence) else seq_or_group
        self._outbox.append((group, event))

    def _flush(self) -> None:
        """Hand this iteration's events to the event loop in one call (one wake-up, not one per token)."""
        if not self._outbox:
            return
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[Group, Event]]] = {}
        for g, ev in self._outbox:
            by_loop.setdefault(g.loop, []).append((g, ev))
        self._outbox = []
        for loop, items in by_loop.items():
            try:
                loop.call_soon_threadsafe(_deliver, items)
            except RuntimeError:  # the event loop is closed: nobody is listening any more
                pass

    def _finish_waiting(self, g: Group, reason: str) -> None:
        for i in range(g.n):
            self._emit(g, Event(index=g.first_index + i, finish_reason=reason))

    def _drop_cancelled(self) -> None:
        now = time.monotonic()
        kept = deque()
        for g in self._waiting:
            if g.cancelled or (g.deadline is not None and now > g.deadline):
                self._finish_waiting(g, "cancelled" if g.cancelled else "timeout")
                with self._lock:
                    self._queued -= 1
            else:
                kept.append(g)
        self._waiting = kept
        for s in self._running:
            if s.group.cancelled:
                s.finish_reason = "cancelled"
            elif s.group.deadline is not None and now > s.group.deadline:
                s.finish_reason = "timeout"
                self._emit(s, self._release(s))
        self._remove_finished()

    def _admit(self) -> None:
        """Prefill waiting groups that fit in the batch and merge them into it."""
        free = self.max_batch - len(self._running)
        admitted: list[Group] = []
        tokens = 0
        while self._waiting and self._waiting[0].n <= free:
            g = self._waiting[0]
            if admitted and tokens + len(g.prompt_ids) > self.prefill_tokens:
                break
            admitted.append(self._waiting.popleft())
            free -= g.n
            tokens += len(g.prompt_ids)
        if not admitted:
            return
        seqs = [Sequence(g, g.first_index + j, self.context, self.tokenizer) for g in admitted for j in range(g.n)]
        with self._lock:
            self._queued -= len(admitted)
            self._active += len(seqs)
        ids, mask = left_padded([g.prompt_ids for g in admitted], self.tokenizer.eos_token_id)
        try:
            out = self.model(ids.to(self.model.device), attention_mask=None if mask.all() else mask.to(ids.device),
                             use_cache=True, logits_to_keep=1)
        except Exception as e:  # a prompt the model cannot take fails its own requests, not the running batch
            log.exception("prefill failed")
            for s in seqs:
                s.finish_reason = "error"
                self._emit(s, Event(index=s.index, finish_reason="error", error=f"{type(e).__name__}: {e}"))
            with self._lock:
                self._active -= len(seqs)
            return
        cache, logits = out.past_key_values, out.logits[:, -1]
        if len(seqs) > len(admitted):  # n > 1: every continuation starts from its prompt's cache row
            index = torch.repeat_interleave(torch.arange(len(admitted)), torch.tensor([g.n for g in admitted]))
            cache = cache.select_rows(index.to(logits.device))
            mask, logits = mask[index], logits[index.to(logits.device)]
        tokens_next = self._sample(logits, seqs)
        self._merge(cache, mask, seqs, tokens_next)
        self._advance(seqs, tokens_next, logits)

    def _step(self) -> None:
        """One decoding step for every running row."""
        self.max_rows_seen = max(self.max_rows_seen, len(self._running))
        if self._holes_possible and (self._cache.length >= self.context
                                     or self._holes() > max(CACHE_HEADROOM, self._cache.length // 2)):
            self._compact()  # only predicted steps leave holes
        drafts = [self._draft(s) for s in self._running]
        if any(drafts):
            self._predicted_step(drafts)
            return
        self._mask = torch.cat([self._mask, torch.ones((len(self._running), 1), dtype=torch.bool)], dim=1)
        padded = not bool(self._mask.all())
        device = self.model.device
        if self._compiled_step is not None:
            logits = self._static_step()
        else:
            out = self.model(self._last[:, None].to(device), past_key_values=self._cache, use_cache=True,
                             attention_mask=self._mask.to(device) if padded else None)
            logits = out.logits[:, -1]
        self.steps += 1
        tokens_next = self._sample(logits, self._running)
        self._last = tokens_next
        self._advance(self._running, tokens_next, logits)

    def _draft(self, s: Sequence) -> list[int]:
        """The predicted tokens row `s` checks this step ([] for rows without a prediction, or not greedy).
        Penalties and biases are fine: _predicted_step samples each column after recording the ones before it."""
        g = s.group
        if not g.prediction or not g.params.greedy or s.finished:
            return []
        room = min(s.guesses.next, s.max_new - s.generated - 1, self.context - 1 - self._cache.length)
        if s.prediction_ids is None:
            s.prediction_ids = self.tokenizer.encode(g.prediction)[:self.context]
        # output_ids lacks only a stop token, after which the row has finished and drafts no more
        return prediction_draft(s.prediction_ids, g.prediction, s.output_ids, s.detokenizer.text,
                                self.tokenizer.encode, room)

    def _predicted_step(self, drafts: list[list[int]]) -> None:
        """One pass over each row's last token and its predicted tokens (rows without any feed padding after the
        last token); every row keeps its last token, the guesses its argmax agreed with, and the hidden columns
        of the rest, and gets the model's next token after them."""
        batch, width = len(self._running), 1 + max(map(len, drafts))
        ids = torch.full((batch, width), self.tokenizer.eos_token_id, dtype=torch.long)
        fed = torch.zeros((batch, width), dtype=torch.bool)
        ids[:, 0], fed[:, 0] = self._last, True
        for i, d in enumerate(drafts):
            ids[i, 1:1 + len(d)] = torch.tensor(d, dtype=torch.long)
            fed[i, 1:1 + len(d)] = True
        mask = torch.cat([self._mask, fed], dim=1)
        device = self.model.device
        logits = self.model(ids.to(device), past_key_values=self._cache, use_cache=True,
                            attention_mask=mask.to(device)).logits
        self.steps += 1
        last = self._last.clone()

        def choose(j: int, rows: list[int]) -> tuple[list[int], list[bool]]:  # column j: after the first j guesses
            seqs = [self._running[i] for i in rows]
            tokens = self._sample(logits[rows, j], seqs)
            for i, s, token in zip(rows, seqs, tokens.tolist()):  # counted before _advance, whose events report them
                d = drafts[i]
                if j < len(d) and token == d[j]:
                    s.accepted += 1
                elif j < len(d):
                    s.rejected += len(d) - j
                last[i] = token
            self._advance(seqs, tokens, logits[rows, j])
            return tokens.tolist(), [s.finished for s in seqs]

        kept = torch.zeros((batch, width), dtype=torch.bool)
        kept[:, 0] = True  # every row keeps its last token, and the guesses taken after it
        for i, (s, d, taken) in enumerate(zip(self._running, drafts, accept_guesses(drafts, choose))):
            kept[i, 1:1 + taken] = True
            s.guesses.update(len(d), taken)
        self._mask = torch.cat([self._mask, kept], dim=1)
        self._last = last
        self._holes_possible = True

    def _holes(self) -> int:
        """Cache columns the longest row does not use (holes and padding)."""
        return self._cache.length - int(self._mask.sum(-1).max())

    def _compact(self) -> None:
        """Right-align each row's real columns, dropping holes: the cache becomes as long as its longest row."""
        length = int(self._mask.sum(-1).max())
        order = torch.sort(self._mask.to(torch.int8), dim=1, stable=True).indices[:, -length:]  # real last
        self._cache = self._cache.compact(order.to(self.model.device), CACHE_HEADROOM)
        self._mask = self._mask.gather(1, order)
        self.compactions += 1
        self._holes_possible = False

    def _static_step(self) -> torch.Tensor:
        """The compiled step: writes the new keys/values at column `length` of the cache and attends over the whole
        buffer under the mask (self._mask already has the new column). Returns [B, vocab] logits."""
        cache, device = self._cache, self.model.device
        length = cache.length
        if cache.capacity <= length:  # full: reallocate at the next power of two
            cache.grow(1 << length.bit_length())
        key_mask = torch.zeros((self._mask.shape[0], 1, cache.capacity), dtype=torch.bool)
        key_mask[:, 0, :length + 1] = self._mask
        positions = self._mask.sum(-1, keepdim=True) - 1  # real tokens before the new one, as in forward()
        cache.write_at(length)
        try:
            return self._compiled_step(self._last[:, None].to(device), positions.to(device), key_mask.to(device),
                                       cache)
        finally:
            cache.write_at(None)

    def _merge(self, cache: KVCache, mask: torch.Tensor, seqs: list[Sequence], last: torch.Tensor) -> None:
        """Append prefilled rows to the batch, right-aligning both caches on a common length."""
        if not self._running:
            self._cache, self._mask, self._running, self._last = cache, mask, list(seqs), last
            return
        old_len, new_len = self._cache.length, cache.length
        length = max(old_len, new_len)
        b_old = len(self._running)
        full = torch.zeros((b_old + mask.shape[0], length), dtype=torch.bool)
        full[:b_old, length - old_len:] = self._mask
        full[b_old:, length - new_len:] = mask
        self._cache, self._mask = self._cache.merge(cache, CACHE_HEADROOM), full
        self._running += seqs
        self._last = torch.cat([self._last, last])

    def _remove_finished(self) -> None:
        keep = [i for i, s in enumerate(self._running) if not s.finished]
        if len(keep) == len(self._running):
            return
        with self._lock:
            self._active -= len(self._running) - len(keep)
        if not keep:
            self._running, self._cache, self._mask, self._last = [], None, None, None
            self._holes_possible = False
            return
        index = torch.tensor(keep)
        mask = self._mask[index]
        lead = int(mask.any(0).to(torch.int8).argmax())  # padding columns no remaining row needs
        self._cache = self._cache.select_rows(index.to(self.model.device), drop_front=lead)
        self._mask = mask[:, lead:]
        self._running = [self._running[i] for i in keep]
        self._last = self._last[index.to(self._last.device)]

    def _fail_all(self, message: str) -> None:
        for s in self._running:
            if not s.finished:
                s.finish_reason = "error"
                self._emit(s, Event(index=s.index, finish_reason="error", error=message,
                                    completion_tokens=s.generated))
        with self._lock:
            self._active = 0
        self._running, self._cache, self._mask, self._last = [], None, None, None
        self._holes_possible = False

    # --- sampling and text ---
    def _sample(self, logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
        """[B, V] raw logits -> [B] next tokens, each row with its own request's sampling parameters."""
        logits = logits.float()
        out = torch.empty(len(seqs), dtype=torch.long, device=logits.device)
        # Rows with the same plain parameters are processed together (the common case: one call per step).
        batches: dict[tuple, list[int]] = {}
        for i, s in enumerate(seqs):
            p = s.group.params
            key = ("shared", p.temperature, p.top_k, p.top_p, p.min_p) if s.simple_sampling else ("own", i)
            batches.setdefault(key, []).append(i)
        for key, rows in batches.items():
            try:
                if key[0] == "own":
                    out[rows[0]] = self._sample_row(logits[rows[0]:rows[0] + 1], seqs[rows[0]])[0]
                else:
                    params = seqs[rows[0]].group.params
                    idx = torch.tensor(rows, device=logits.device)
                    out[idx] = sample_next(process_logits(logits[idx], params, vocab_limit=self.vocab_limit), params)
            except RuntimeError as e:  # e.g. parameters that overflow to NaN: fail those requests, not the batch
                for i in rows:
                    seqs[i].failure = f"sampling failed: {e}"
                    out[i] = self.tokenizer.eos_token_id
        return out.cpu()

    def _sample_row(self, row: torch.Tensor, s: Sequence) -> torch.Tensor:
        g = s.group
        if g.logit_bias:
            row = row.clone()
            for tok, bias in g.logit_bias.items():
                row[0, tok] += bias
        if (g.presence_penalty or g.frequency_penalty) and s.counts:
            toks = torch.tensor(list(s.counts), device=row.device)
            counts = torch.tensor(list(s.counts.values()), dtype=row.dtype, device=row.device)
            row = row.clone()
            row[0, toks] -= g.presence_penalty + g.frequency_penalty * counts
        seen = None
        if g.params.repetition_penalty != 1.0:
            seen = torch.tensor([g.prompt_ids + s.output_ids], device=row.device)
        processed = process_logits(row, g.params, seen, vocab_limit=self.vocab_limit)
        return sample_next(processed, g.params, s.generator)

    def _logprob(self, logits_row: torch.Tensor, token: int, k: int) -> TokenLogprob:
        """Log-probability under the model's own distribution (padding rows excluded)."""
        lp = torch.log_softmax(logits_row[:self.vocab_limit].float(), dim=-1)
        top = []
        if k:
            values, ids = lp.topk(k)
            top = list(zip(ids.tolist(), values.tolist()))
        return TokenLogprob(token, float(lp[token]), top)

    def _advance(self, seqs: list[Sequence], tokens: torch.Tensor, logits: torch.Tensor) -> None:
        """Record each row's new token, apply stop rules, and release the text that is safe to show."""
        for i, (s, tok) in enumerate(zip(seqs, tokens.tolist())):
            if s.finished:
                continue
            g = s.group
            s.generated += 1
            s.counts[tok] = s.counts.get(tok, 0) + 1
            if s.failure:
                s.finish_reason = "error"
                self._emit(s, Event(index=s.index, finish_reason="error", error=s.failure,
                                    completion_tokens=s.generated))
                continue
            if g.logprobs is not None:
                s.pending.append((s.detokenizer.length, self._logprob(logits[i], tok, g.logprobs)))
            text = ""
            if tok in g.stop_token_ids:
                s.finish_reason = "stop"
            else:
                s.output_ids.append(tok)
                text = s.detokenizer.push(tok)
                if s.detokenizer.stopped:
                    s.finish_reason = "stop"
            if not s.finished and s.generated >= s.max_new:
                s.finish_reason = "length"
            event = self._release(s, text)
            if event.text or event.tokens or event.finish_reason:
                self._emit(s, event)

    def _release(self, s: Sequence, text: str = "") -> Event:
        """An event with the final text the detokenizer released, less (when stripping) leading whitespace and
        trailing whitespace that may turn out to be the end, and the logprobs of the tokens behind it."""
        g = s.group
        if s.finished:
            text += s.detokenizer.finish()
        if g.strip == "both" and s.sent == s.skipped:  # nothing shown yet: leading whitespace goes
            lead = len(text) - len(text.lstrip())
            s.skipped, s.sent, text = s.skipped + lead, s.sent + lead, text[lead:]
        if g.strip:
            text = s.trailing + text
            visible = text.rstrip()
            s.trailing, text = "" if s.finished else text[len(visible):], visible
        s.sent += len(text)
        tokens = []
        if s.pending:
            ready = [(off, t) for off, t in s.pending if off < s.sent]
            s.pending = [] if s.finished else [(off, t) for off, t in s.pending if off >= s.sent]
            for off, t in ready:
                t.offset = max(0, off - s.skipped)
                tokens.append(t)
        return Event(index=s.index, text=text, tokens=tokens, finish_reason=s.finish_reason,
                     completion_tokens=s.generated, accepted_prediction_tokens=s.accepted,
                     rejected_prediction_tokens=s.rejected)


def _deliver(items: list[tuple[Group, Event]]) -> None:
    for g, ev in items:
        g.events.put_nowait(ev)
