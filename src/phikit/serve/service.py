"""The two generation endpoints: turn a validated request into engine groups, then the engine's events into an
OpenAI response (one JSON object, or server-sent events when `stream` is true)."""
from __future__ import annotations

import asyncio
import time
import uuid
from typing import AsyncIterator

from fastapi import Request
from fastapi.responses import StreamingResponse

from .. import __version__
from ..inference.decoding import stop_ids_for
from ..inference.formats import PromptFormat
from ..inference.sampling import SamplingParams
from ..tokenizer import Tokenizer
from . import responses as R
from .engine import Engine, Event, Group, QueueFull
from .guard import Metrics
from .protocol import APIError, ChatCompletionRequest, CompletionRequest, SamplingFields

DEFAULT_COMPLETION_TOKENS = 16  # OpenAI's default max_tokens for /v1/completions
MIN_TEMPERATURE = 1e-5  # below this, dividing logits by the temperature overflows: treated as greedy


class Job:
    """One submitted request: its groups, the queue their events arrive on, and when it arrived."""

    def __init__(self, groups: list[Group], metrics: Metrics) -> None:
        self.groups, self.metrics = groups, metrics
        self.events: asyncio.Queue = asyncio.Queue()
        self.start = time.monotonic()
        self.choices = sum(g.n for g in groups)
        for g in groups:
            g.events = self.events
        self.predicted = any(g.prediction for g in groups)
        self.accepted = self.rejected = 0  # predicted tokens kept and found wrong, over finished choices

    def cancel(self) -> None:
        for g in self.groups:
            g.cancel()  # no-op for finished groups; frees the batch rows of abandoned ones

    async def stream(self) -> AsyncIterator[Event]:
        """Every event until each choice has finished; an abandoned request is cancelled in the engine."""
        done, first = 0, True
        try:
            while done < self.choices:
                ev = await self.events.get()
                if ev is None:  # the client disconnected
                    return
                if first and ev.completion_tokens:
                    self.metrics.ttft.observe(time.monotonic() - self.start)
                    first = False
                if ev.finish_reason:
                    done += 1
                    self.metrics.generation_tokens.inc(ev.completion_tokens)
                    self.accepted += ev.accepted_prediction_tokens
                    self.rejected += ev.rejected_prediction_tokens
                yield ev
        finally:
            self.cancel()

    def usage(self, prompt_tokens: int, completion_tokens: int) -> dict:
        return R.usage(prompt_tokens, completion_tokens, (self.accepted, self.rejected) if self.predicted else None)

    async def collect(self, request: Request, timeout: float) -> tuple[list[str], list[list], list[str], int]:
        """Run to the end (non-streaming): texts, logprob tokens and finish reasons per choice, tokens generated."""
        texts = [[] for _ in range(self.choices)]
        tokens = [[] for _ in range(self.choices)]
        reasons, completion = [""] * self.choices, 0
        watcher = asyncio.create_task(self._watch_disconnect(request))
        try:
            async for ev in self.stream():
                error = failure(ev, timeout)
                if error:
                    raise error
                texts[ev.index].append(ev.text)
                tokens[ev.index] += ev.tokens
                if ev.finish_reason:
                    reasons[ev.index] = ev.finish_reason
                    completion += ev.completion_tokens
        finally:
            watcher.cancel()
        return ["".join(t) for t in texts], tokens, reasons, completion

    async def _watch_disconnect(self, request: Request) -> None:
        # After the body, the only message left to receive is the disconnect.
        while (await request.receive())["type"] != "http.disconnect":
            pass
        self.events.put_nowait(None)


def failure(ev: Event, timeout: float) -> APIError | None:
    if ev.finish_reason == "timeout":
        return APIError(504, f"the request took longer than the server's --request-timeout of {timeout:g} s: "
                        "ask for fewer tokens", type="timeout", code="timeout")
    if ev.finish_reason == "error":
        return APIError(500, f"generation failed: {ev.error}", type="server_error")
    return None


class OpenAIService:
    """Request validation that needs the model (context, vocabulary), and the completion endpoints."""

    def __init__(self, engine: Engine, tokenizer: Tokenizer, fmt: PromptFormat, model_name: str, metrics: Metrics,
                 request_timeout: float) -> None:
        self.engine, self.tokenizer, self.fmt = engine, tokenizer, fmt
        self.model_name, self.metrics, self.request_timeout = model_name, metrics, request_timeout
        self.created = int(time.time())
        self.fingerprint = f"phikit-{__version__}"
        # Raw completions stop where the model ends its document; ChatML models also end a turn with <|im_end|>.
        self.completion_stop_ids = frozenset(stop_ids_for(tokenizer))
        self.chat_stop_ids = frozenset(i for i in map(tokenizer.token_to_id, fmt.stop_token_names) if i is not None)

    # --- checks ---
    def check_model(self, name: str) -> None:
        if name != self.model_name:
            raise APIError(404, f"model {name!r} does not exist: this server serves {self.model_name!r}",
                           param="model", code="model_not_found")

    def model_card(self) -> dict:
        return {"id": self.model_name, "object": "model", "created": self.created, "owned_by": "phikit",
                "max_model_len": self.engine.context}

    def token_budget(self, requested: int | None, prompt_len: int, default: int | None, param: str,
                     budget_param: str = "max_tokens") -> int:
        context = self.engine.context
        room = context - prompt_len
        if room < 1:
            raise APIError(400, f"the prompt has {prompt_len} tokens, which fills the model's context of "
                           f"{context} tokens: shorten it", param=param, code="context_length_exceeded")
        if requested is None:
            return min(default, room) if default else room
        if requested > room:
            raise APIError(400, f"prompt ({prompt_len} tokens) + {budget_param} ({requested}) = "
                           f"{prompt_len + requested} tokens exceeds the model's context of {context}: set "
                           f"{budget_param} to at most {room}", param=budget_param, code="context_length_exceeded")
        return requested

    def prompt_ids(self, prompts: list) -> list[list[int]]:
        out = []
        limit = self.engine.vocab_limit
        for p in prompts:
            ids = self.tokenizer.encode(p) if isinstance(p, str) else list(p)
            bad = [t for t in ids if t >= limit]
            if bad:
                raise APIError(400, f"token id {bad[0]} is outside the vocabulary of {limit} tokens", param="prompt")
            out.append(ids or [self.tokenizer.eos_token_id])  # an empty prompt starts a new document
        return out

    def groups(self, body: SamplingFields, prompts: list[list[int]], max_tokens: int | None, default: int | None,
               prompt_param: str, stops: list[str], stop_ids: frozenset[int], logprobs: int | None,
               strip: str, budget_param: str = "max_tokens") -> list[Group]:
        limit = self.engine.vocab_limit
        bias = {}
        for key, value in (body.logit_bias or {}).items():
            if not (key.isascii() and key.isdigit()) or int(key) >= limit:  # "²".isdigit(), but int("²") fails
                raise APIError(400, f"logit_bias key {key!r} is not a token id below {limit}", param="logit_bias")
            bias[int(key)] = value
        if body.n > self.engine.max_batch:  # a prompt's n choices decode together, in one batch
            raise APIError(400, f"n={body.n} exceeds the server's batch size of {self.engine.max_batch}: lower n",
                           param="n")
        capacity = self.engine.max_batch + self.engine.max_queue
        if len(prompts) * body.n > capacity:
            raise APIError(400, f"{len(prompts)} prompts x n={body.n} exceeds what the server holds at once "
                           f"({capacity}): send fewer", param="n")
        deadline = time.monotonic() + self.request_timeout
        temperature = body.temperature if body.temperature >= MIN_TEMPERATURE else 0.0
        prediction = body.prediction.text() if body.prediction else ""
        out = []
        for i, ids in enumerate(prompts):
            budget = self.token_budget(max_tokens, len(ids), default, prompt_param, budget_param)
            params = SamplingParams(max_new_tokens=budget, temperature=temperature, top_k=max(body.top_k, 0),
                                    top_p=body.top_p, min_p=body.min_p, repetition_penalty=body.repetition_penalty,
                                    seed=body.seed)
            out.append(Group(ids, params, n=body.n, first_index=i * body.n, stop=stops, stop_token_ids=stop_ids,
                             logprobs=logprobs, strip=strip, presence_penalty=body.presence_penalty,
                             frequency_penalty=body.frequency_penalty, logit_bias=bias, deadline=deadline,
                             prediction=prediction))
        return out

    def submit(self, groups: list[Group]) -> Job:
        job = Job(groups, self.metrics)
        try:
            self.engine.submit(groups)
        except QueueFull as e:
            raise APIError(429, f"server busy: {e}; retry shortly", type="rate_limit_error", code="queue_full") from e
        except ValueError as e:
            raise APIError(400, str(e)) from e
        self.metrics.prompt_tokens.inc(sum(len(g.prompt_ids) for g in groups))
        return job

    def envelope(self, rid: str, created: int, object: str, choices: list[dict], **extra) -> dict:
        # `created` is the request's: OpenAI gives every chunk of a stream the same id and the same timestamp.
        return {"id": rid, "object": object, "created": created, "model": self.model_name,
                "system_fingerprint": self.fingerprint, "choices": choices, **extra}

    def stream(self, job: Job, body: SamplingFields, rid: str, created: int, object: str, prompt_tokens: int,
               choices, first: list[dict] | None = None) -> StreamingResponse:
        """Server-sent events: the `first` choices, then those choices(event) makes of each event (an error ends the
        stream as an error event), the usage when stream_options asks for it, and [DONE]."""
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        extra = {"usage": None} if include_usage else {}

        async def chunks():
            for c in first or []:
                yield R.sse(self.envelope(rid, created, object, [c], **extra))
            completion = 0
            async for ev in job.stream():
                error = failure(ev, self.request_timeout)
                if error:
                    yield R.sse(error.body())
                    break
                for c in choices(ev):
                    yield R.sse(self.envelope(rid, created, object, [c], **extra))
                completion += ev.completion_tokens if ev.finish_reason else 0
            else:
                if include_usage:
                    usage = job.usage(prompt_tokens, completion)
                    yield R.sse(self.envelope(rid, created, object, [], usage=usage))
            yield R.sse("[DONE]")

        return StreamingResponse(chunks(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    # --- POST /v1/completions ---
    async def completions(self, body: CompletionRequest, request: Request):
        self.check_model(body.model)
        if body.suffix:
            raise APIError(400, "suffix (fill-in-the-middle) is not supported: put all the text in prompt",
                           param="suffix")
        if body.best_of is not None and body.best_of != body.n:
            raise APIError(400, "best_of other than n is not supported: use n", param="best_of")
        if body.echo and body.logprobs is not None:
            raise APIError(400, "echo together with logprobs is not supported: drop one of them", param="echo")
        prompts = prompt_list(body.prompt)
        ids = self.prompt_ids(prompts)
        texts = [p if isinstance(p, str) else self.tokenizer.decode(i) for p, i in zip(prompts, ids)]
        job = self.submit(self.groups(body, ids, body.max_tokens, DEFAULT_COMPLETION_TOKENS, "prompt",
                                      body.stop_list(), self.completion_stop_ids, body.logprobs, strip=""))
        rid, n, prompt_tokens = f"cmpl-{uuid.uuid4().hex}", body.n, sum(map(len, ids))
        created = int(time.time())

        def echo(index: int) -> str:
            return texts[index // n] if body.echo else ""

        def logprobs(index: int, tokens) -> dict | None:
            if body.logprobs is None:
                return None
            return R.completion_logprobs(self.tokenizer, tokens, len(echo(index)))

        if not body.stream:
            out, tokens, reasons, completion = await job.collect(request, self.request_timeout)
            choices = [{"index": i, "text": echo(i) + out[i], "logprobs": logprobs(i, tokens[i]),
                        "finish_reason": reasons[i]} for i in range(len(out))]
            return self.envelope(rid, created, "text_completion", choices, usage=job.usage(prompt_tokens, completion))

        echoed = set()

        def choices(ev: Event):
            text = ev.text if ev.index in echoed else echo(ev.index) + ev.text
            echoed.add(ev.index)
            if text or ev.tokens or ev.finish_reason:
                yield {"index": ev.index, "text": text, "logprobs": logprobs(ev.index, ev.tokens),
                       "finish_reason": ev.finish_reason}

        return self.stream(job, body, rid, created, "text_completion", prompt_tokens, choices)

    # --- POST /v1/chat/completions ---
    async def chat_completions(self, body: ChatCompletionRequest, request: Request):
        self.check_model(body.model)
        if body.top_logprobs and not body.logprobs:
            raise APIError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
        # A client asking for JSON or a tool call must not silently get free text instead.
        if body.response_format and body.response_format.type != "text":
            raise APIError(400, f"response_format {body.response_format.type!r} is not supported (the server cannot "
                           "constrain output): ask for JSON in the messages, or send {\"type\": \"text\"}",
                           param="response_format")
        if body.tool_choice not in (None, "none", "auto"):
            raise APIError(400, "tool_choice that forces a tool call is not supported (the server does not call "
                           "tools): send \"auto\" or \"none\"", param="tool_choice")
        messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()}
                    for m in body.messages]
        try:  # rendered here, once, in the model's own format: clients send plain messages
            ids = self.tokenizer.encode(self.fmt.render(messages, add_generation_prompt=True))
        except ValueError as e:
            raise APIError(400, str(e), param="messages") from e
        top = (body.top_logprobs or 0) if body.logprobs else None
        # The error names the field the client sent (max_completion_tokens wins, as its newer name).
        budget_param = "max_completion_tokens" if body.max_completion_tokens else "max_tokens"
        job = self.submit(self.groups(body, [ids], body.max_completion_tokens or body.max_tokens, None, "messages",
                                      self.fmt.stop_strings + body.stop_list(), self.chat_stop_ids, top,
                                      strip="both" if self.fmt.strip_answer else "right", budget_param=budget_param))
        rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())

        def logprobs(tokens) -> dict | None:
            return R.chat_logprobs(self.tokenizer, tokens) if body.logprobs else None

        if not body.stream:
            out, tokens, reasons, completion = await job.collect(request, self.request_timeout)
            choices = [{"index": i, "message": {"role": "assistant", "content": out[i]},
                        "logprobs": logprobs(tokens[i]), "finish_reason": reasons[i]} for i in range(len(out))]
            return self.envelope(rid, created, "chat.completion", choices, usage=job.usage(len(ids), completion))

        def choice(index: int, delta: dict, lp=None, finish_reason=None) -> dict:
            return {"index": index, "delta": delta, "logprobs": lp, "finish_reason": finish_reason}

        def choices(ev: Event):
            if ev.text or ev.tokens:
                yield choice(ev.index, {"content": ev.text}, logprobs(ev.tokens))
            if ev.finish_reason:
                yield choice(ev.index, {}, finish_reason=ev.finish_reason)

        first = [choice(i, {"role": "assistant", "content": ""}) for i in range(body.n)]
        return self.stream(job, body, rid, created, "chat.completion.chunk", len(ids), choices, first)


def prompt_list(prompt) -> list:
    """The prompt field as a list of prompts (each a string or a list of token ids)."""
    if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)):
        return [prompt]
    return list(prompt)
