"""The OpenAI-compatible HTTP API over the continuous-batching engine.

GET /v1/models, POST /v1/completions, POST /v1/chat/completions (streamed as server-sent events or not),
GET /health, GET /metrics (Prometheus text), GET / (a chat page). Every error is OpenAI's JSON error shape.
"""
from __future__ import annotations

import asyncio
import hmac
import json
import logging
import re
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass
from importlib import resources
from typing import AsyncIterator

from fastapi import FastAPI, Request, Security
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from fastapi.security import HTTPBearer
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

from .. import __version__
from ..formats import default_format, get_format
from ..model import PhiForCausalLM
from ..sampling import SamplingParams
from ..tokenizer import Tokenizer
from . import responses as R
from .engine import Engine, Event, Group, QueueFull
from .protocol import APIError, ChatCompletionRequest, CompletionRequest, SamplingFields

log = logging.getLogger("phikit.serve")

DEFAULT_COMPLETION_TOKENS = 16  # OpenAI's default max_tokens for /v1/completions
MIN_TEMPERATURE = 1e-5
# Paths with a metrics label of their own; everything else is counted as "other".
LABELLED_PATHS = ("/v1/completions", "/v1/chat/completions", "/v1/models", "/health", "/metrics", "/")


@dataclass
class ServerState:
    """What the shutdown logic and the guard share: drain mode and the requests still being answered."""

    draining: bool = False
    in_flight: int = 0


class Metrics:
    """Prometheus metrics in a registry of their own (several apps can live in one process)."""

    def __init__(self, engine: Engine) -> None:
        self.registry = r = CollectorRegistry()
        self.requests = Counter("phikit_requests", "HTTP requests answered", ["endpoint", "status"], registry=r)
        self.prompt_tokens = Counter("phikit_prompt_tokens", "prompt tokens processed", registry=r)
        self.generation_tokens = Counter("phikit_generation_tokens", "tokens generated", registry=r)
        self.latency = Histogram("phikit_request_latency_seconds", "time from request to last byte", ["endpoint"],
                                 buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300), registry=r)
        self.ttft = Histogram("phikit_time_to_first_token_seconds", "time from request to its first token",
                              buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30), registry=r)
        Gauge("phikit_queue_depth", "prompts waiting for a batch slot", registry=r).set_function(
            lambda: engine.num_waiting)
        Gauge("phikit_running_sequences", "sequences decoding in the batch", registry=r).set_function(
            lambda: engine.num_running)
        Gauge("phikit_decode_steps", "decoding steps run since start", registry=r).set_function(
            lambda: engine.steps)


def _error_response(status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                    code: str | None = None, headers: dict | None = None) -> JSONResponse:
    return JSONResponse(APIError(status, message, type, param, code).body(), status_code=status, headers=headers)


class Guard:
    """ASGI middleware in front of everything: drain mode (503), API key (401), body size (413), metrics."""

    def __init__(self, app, state: ServerState, metrics: Metrics, api_key: str | None, max_body_bytes: int):
        self.app, self.state, self.metrics = app, state, metrics
        self.api_key, self.max_body_bytes = api_key, max_body_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"]
        endpoint = path if path in LABELLED_PATHS else "other"
        status = {"code": 500}

        async def send_status(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        start = time.monotonic()
        self.state.in_flight += 1
        try:
            early = self._refuse(scope, path)
            if early is None:
                receive, early = await self._read_body(scope, receive)
            if early is not None:
                await early(scope, receive, send_status)
            else:
                await self.app(scope, receive, send_status)
        finally:
            self.state.in_flight -= 1
            self.metrics.requests.labels(endpoint, str(status["code"])).inc()
            self.metrics.latency.labels(endpoint).observe(time.monotonic() - start)

    def _refuse(self, scope, path: str) -> Response | None:
        if self.state.draining:
            return _error_response(503, "the server is shutting down: retry on another instance",
                                   type="server_shutting_down", headers={"Retry-After": "5"})
        if self.api_key and path.startswith("/v1/"):
            auth = dict(scope["headers"]).get(b"authorization", b"").decode("latin-1")
            scheme, _, token = auth.partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), self.api_key.encode()):
                return _error_response(401, "invalid or missing API key: send 'Authorization: Bearer KEY' with "
                                       "the server's --api-key", type="authentication_error", code="invalid_api_key")
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_body_bytes):
            return self._too_large()
        return None

    def _too_large(self) -> Response:
        return _error_response(413, f"request body is larger than {self.max_body_bytes} bytes: send a smaller "
                               "request", code="request_too_large")

    async def _read_body(self, scope, receive):
        """Read the whole body up front (bounded), then replay it; later receives wait for the disconnect."""
        if scope["method"] not in ("POST", "PUT", "PATCH"):
            return receive, None
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return receive, Response(status_code=400)
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_body_bytes:
                return receive, self._too_large()
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        return replay, None


_FIELD = re.compile(r"^[a-z_][a-z0-9_]*$")
_TYPE_TAGS = {"str", "int", "float", "bool", "list", "dict", "none"}


def validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    """One line naming the first bad field and what it should be, and the field as OpenAI's `param`."""
    errors = exc.errors()
    err = errors[0]
    loc = list(err.get("loc", ()))
    if loc and loc[0] == "body":
        loc = loc[1:]
    if err["type"] == "json_invalid":
        detail = (err.get("ctx") or {}).get("error", "")
        return f"request body is not valid JSON ({detail}): send a JSON object", None
    # Union alternatives and constraint wrappers appear in loc as type names: keep the field path only.
    path = [str(x) for x in loc if isinstance(x, int) or (_FIELD.match(str(x)) and str(x) not in _TYPE_TAGS)]
    if not path:
        if err["type"] == "missing":
            return "request body is missing: send a JSON object", None
        return f"request body must be a JSON object ({err['msg']})", None
    param = ".".join(path)
    if err["type"] == "missing":
        return f"{param} is required", param
    others = {".".join(str(x) for x in e.get("loc", ())[1:2]) for e in errors} - {path[0]}
    more = f" (and {len(others)} more invalid field{'s' * (len(others) > 1)})" if others else ""
    return f"{param}: {err['msg']}{more}", param


def _openapi_with_model(app: FastAPI, model_name: str) -> dict:
    """FastAPI's schema, with the one valid model id spelled out, so generated clients and fuzzers can use it."""
    if app.openapi_schema is None:
        from fastapi.openapi.utils import get_openapi
        schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
        for name in ("CompletionRequest", "ChatCompletionRequest"):
            schema["components"]["schemas"][name]["properties"]["model"]["enum"] = [model_name]
        app.openapi_schema = schema
    return app.openapi_schema


def create_app(model: PhiForCausalLM, tokenizer: Tokenizer, *, model_name: str = "phi", api_key: str | None = None,
               max_batch: int = 16, max_queue: int = 64, request_timeout: float = 600.0,
               format_name: str | None = None, max_body_bytes: int = 2 * 2**20) -> FastAPI:
    """The server as an ASGI app; the engine thread starts and stops with the app's lifespan."""
    engine = Engine(model, tokenizer, max_batch=max_batch, max_queue=max_queue)
    fmt = get_format(format_name or default_format(tokenizer))
    context = engine.context
    state = ServerState()
    metrics = Metrics(engine)
    created = int(time.time())
    eos = tokenizer.eos_token_id
    # Raw completions stop where the model ends its document; ChatML models also end their turn with <|im_end|>.
    completion_stop_ids = frozenset(
        [eos] + ([tokenizer.token_to_id("<|im_end|>")] if tokenizer.has_chatml else []))
    chat_stop_ids = frozenset(i for i in (tokenizer.token_to_id(t) for t in fmt.stop_token_names) if i is not None)

    @asynccontextmanager
    async def lifespan(_app):
        engine.start()
        try:
            yield
        finally:
            engine.stop()

    app = FastAPI(title="phikit", version=__version__, lifespan=lifespan,
                  description="OpenAI-compatible API for phi models, with continuous batching.")
    app.state.engine, app.state.server_state, app.state.metrics = engine, state, metrics
    app.state.format = fmt
    app.openapi = lambda: _openapi_with_model(app, model_name)
    app.add_middleware(Guard, state=state, metrics=metrics, api_key=api_key, max_body_bytes=max_body_bytes)
    bearer = HTTPBearer(auto_error=False, description="the server's --api-key, when it has one")

    # --- errors, always in OpenAI's shape ---
    @app.exception_handler(APIError)
    async def _api_error(_request, exc: APIError):
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_request, exc: RequestValidationError):
        message, param = validation_message(exc)
        return _error_response(400, message, param=param)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        if exc.status_code == 404:
            return _error_response(404, f"no route {request.url.path}: see GET /openapi.json for the API",
                                   code="not_found")
        if exc.status_code == 405:
            return _error_response(405, f"{request.method} is not allowed on {request.url.path}",
                                   code="method_not_allowed")
        return _error_response(exc.status_code, str(exc.detail))

    @app.exception_handler(Exception)
    async def _internal_error(_request, exc: Exception):
        log.exception("unhandled error")
        return _error_response(500, f"internal error: {type(exc).__name__}", type="server_error")

    # --- helpers ---
    def check_model(name: str) -> None:
        if name != model_name:
            raise APIError(404, f"model {name!r} does not exist: this server serves {model_name!r}",
                           param="model", code="model_not_found")

    def token_budget(requested: int | None, prompt_len: int, default: int | None, param: str) -> int:
        room = context - prompt_len
        if room < 1:
            raise APIError(400, f"the prompt has {prompt_len} tokens, which fills the model's context of "
                           f"{context} tokens: shorten it", param=param, code="context_length_exceeded")
        if requested is None:
            return min(default, room) if default else room
        if requested > room:
            raise APIError(400, f"prompt ({prompt_len} tokens) + max_tokens ({requested}) = {prompt_len + requested}"
                           f" tokens exceeds the model's context of {context}: set max_tokens to at most {room}",
                           param="max_tokens", code="context_length_exceeded")
        return requested

    def make_groups(body: SamplingFields, prompts: list[list[int]], max_tokens: int | None, default: int | None,
                    prompt_param: str, stops: list[str], stop_ids: frozenset[int], logprobs: int | None,
                    strip: str) -> list[Group]:
        bias = {}
        for key, value in (body.logit_bias or {}).items():
            if not key.isdigit() or int(key) >= engine.vocab_limit:
                raise APIError(400, f"logit_bias key {key!r} is not a token id below {engine.vocab_limit}",
                               param="logit_bias")
            bias[int(key)] = value
        if len(prompts) * body.n > max_batch + max_queue:
            raise APIError(400, f"{len(prompts)} prompts x n={body.n} exceeds what the server holds at once "
                           f"({max_batch + max_queue}): send fewer", param="n")
        deadline = time.monotonic() + request_timeout
        groups = []
        for i, ids in enumerate(prompts):
            params = SamplingParams(max_new_tokens=token_budget(max_tokens, len(ids), default, prompt_param),
                                    # Dividing by a vanishing temperature overflows: it means greedy anyway.
                                    temperature=body.temperature if body.temperature >= MIN_TEMPERATURE else 0.0,
                                    top_k=max(body.top_k, 0), top_p=body.top_p,
                                    min_p=body.min_p, repetition_penalty=body.repetition_penalty, seed=body.seed)
            groups.append(Group(ids, params, n=body.n, first_index=i * body.n, stop=stops, stop_token_ids=stop_ids,
                                logprobs=logprobs, strip=strip, presence_penalty=body.presence_penalty,
                                frequency_penalty=body.frequency_penalty, logit_bias=bias, deadline=deadline))
        return groups

    def submit(groups: list[Group]) -> asyncio.Queue:
        events: asyncio.Queue = asyncio.Queue()
        for g in groups:
            g.events = events
        try:
            engine.submit(groups)
        except QueueFull as e:
            raise APIError(429, f"server busy: {e}; retry shortly", type="rate_limit_error",
                           code="queue_full") from e
        except ValueError as e:
            raise APIError(400, str(e)) from e
        metrics.prompt_tokens.inc(sum(len(g.prompt_ids) for g in groups))
        return events

    async def events_of(groups: list[Group], events: asyncio.Queue, start: float) -> AsyncIterator[Event]:
        """Every event of a request until each choice has finished; the request is cancelled if abandoned."""
        total = sum(g.n for g in groups)
        done, first = 0, True
        try:
            while done < total:
                ev = await events.get()
                if ev is None:  # the client disconnected
                    return
                if first and ev.completion_tokens:
                    metrics.ttft.observe(time.monotonic() - start)
                    first = False
                if ev.finish_reason:
                    done += 1
                    metrics.generation_tokens.inc(ev.completion_tokens)
                yield ev
        finally:
            for g in groups:
                g.cancel()  # no-op for finished groups; frees the batch rows of abandoned ones

    def failure(ev: Event) -> APIError | None:
        if ev.finish_reason == "timeout":
            return APIError(504, f"the request took longer than the server's --request-timeout of "
                            f"{request_timeout:g} s: ask for fewer tokens", type="timeout", code="timeout")
        if ev.finish_reason == "error":
            return APIError(500, f"generation failed: {ev.error}", type="server_error")
        return None

    async def watch_disconnect(request: Request, events: asyncio.Queue) -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass
        events.put_nowait(None)

    async def collect(request: Request, groups: list[Group], events: asyncio.Queue,
                      start: float) -> tuple[list[str], list[list], list[str], int]:
        """Run a non-streaming request to the end: texts, logprob tokens, finish reasons, completion tokens."""
        total = sum(g.n for g in groups)
        texts, tokens = [[] for _ in range(total)], [[] for _ in range(total)]
        reasons, completion = [""] * total, 0
        watcher = asyncio.create_task(watch_disconnect(request, events))
        try:
            async for ev in events_of(groups, events, start):
                err = failure(ev)
                if err:
                    raise err
                texts[ev.index].append(ev.text)
                tokens[ev.index] += ev.tokens
                if ev.finish_reason:
                    reasons[ev.index] = ev.finish_reason
                    completion += ev.completion_tokens
        finally:
            watcher.cancel()
        return ["".join(t) for t in texts], tokens, reasons, completion

    def streaming(body: AsyncIterator[str]) -> StreamingResponse:
        return StreamingResponse(body, media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    # --- routes ---
    @app.get("/v1/models", dependencies=[Security(bearer)])
    async def list_models():
        return {"object": "list", "data": [model_card()]}

    def model_card() -> dict:
        return {"id": model_name, "object": "model", "created": created, "owned_by": "phikit",
                "max_model_len": context}

    @app.get("/v1/models/{model_id:path}", dependencies=[Security(bearer)])
    async def get_model(model_id: str):
        check_model(model_id)
        return model_card()

    @app.post("/v1/completions", dependencies=[Security(bearer)])
    async def completions(body: CompletionRequest, request: Request):
        start = time.monotonic()
        check_model(body.model)
        if body.suffix:
            raise APIError(400, "suffix (fill-in-the-middle) is not supported: put all the text in prompt",
                           param="suffix")
        if body.best_of is not None and body.best_of != body.n:
            raise APIError(400, "best_of other than n is not supported: use n", param="best_of")
        if body.echo and body.logprobs is not None:
            raise APIError(400, "echo together with logprobs is not supported: drop one of them", param="echo")
        prompts = prompt_ids(body.prompt)
        prompt_texts = [p if isinstance(p, str) else tokenizer.decode(ids)
                        for p, ids in zip(prompt_list(body.prompt), prompts)]
        groups = make_groups(body, prompts, body.max_tokens, DEFAULT_COMPLETION_TOKENS, "prompt",
                             body.stop_list(), completion_stop_ids, body.logprobs, strip="")
        events = submit(groups)
        rid, n = f"cmpl-{uuid.uuid4().hex}", body.n
        prompt_tokens = sum(len(p) for p in prompts)

        def echo(index: int) -> str:
            return prompt_texts[index // n] if body.echo else ""

        def logprobs(index: int, toks) -> dict | None:
            return None if body.logprobs is None else R.completion_logprobs(tokenizer, toks, len(echo(index)))

        def envelope(choices: list[dict], **extra) -> dict:
            return {"id": rid, "object": "text_completion", "created": int(time.time()), "model": model_name,
                    "system_fingerprint": f"phikit-{__version__}", "choices": choices, **extra}

        if not body.stream:
            texts, toks, reasons, completion = await collect(request, groups, events, start)
            choices = [{"index": i, "text": echo(i) + texts[i], "logprobs": logprobs(i, toks[i]),
                        "finish_reason": reasons[i]} for i in range(len(texts))]
            return envelope(choices, usage=R.usage(prompt_tokens, completion))

        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        extra = {"usage": None} if include_usage else {}

        async def stream():
            completion, echoed = 0, set()
            async for ev in events_of(groups, events, start):
                err = failure(ev)
                if err:
                    yield R.sse(err.body())
                    break
                text = ev.text
                if ev.index not in echoed:
                    echoed.add(ev.index)
                    text = echo(ev.index) + text
                if text or ev.tokens or ev.finish_reason:
                    yield R.sse(envelope([{"index": ev.index, "text": text, "logprobs": logprobs(ev.index, ev.tokens),
                                           "finish_reason": ev.finish_reason}], **extra))
                if ev.finish_reason:
                    completion += ev.completion_tokens
            else:
                if include_usage:
                    yield R.sse(envelope([], usage=R.usage(prompt_tokens, completion)))
            yield R.sse("[DONE]")

        return streaming(stream())

    @app.post("/v1/chat/completions", dependencies=[Security(bearer)])
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        start = time.monotonic()
        check_model(body.model)
        messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()}
                    for m in body.messages]
        try:
            prompt = fmt.render(messages, add_generation_prompt=True)
        except ValueError as e:
            raise APIError(400, str(e), param="messages") from e
        ids = tokenizer.encode(prompt)
        k = (body.top_logprobs or 0) if body.logprobs else None
        if body.top_logprobs and not body.logprobs:
            raise APIError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
        groups = make_groups(body, [ids], body.max_completion_tokens or body.max_tokens, None, "messages",
                             fmt.stop_strings + body.stop_list(), chat_stop_ids, k,
                             strip="both" if fmt.strip_answer else "right")
        events = submit(groups)
        rid = f"chatcmpl-{uuid.uuid4().hex}"

        def logprobs(toks) -> dict | None:
            return R.chat_logprobs(tokenizer, toks) if body.logprobs else None

        def envelope(object: str, choices: list[dict], **extra) -> dict:
            return {"id": rid, "object": object, "created": int(time.time()), "model": model_name,
                    "system_fingerprint": f"phikit-{__version__}", "choices": choices, **extra}

        if not body.stream:
            texts, toks, reasons, completion = await collect(request, groups, events, start)
            choices = [{"index": i, "message": {"role": "assistant", "content": texts[i]},
                        "logprobs": logprobs(toks[i]), "finish_reason": reasons[i]} for i in range(len(texts))]
            return envelope("chat.completion", choices, usage=R.usage(len(ids), completion))

        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        extra = {"usage": None} if include_usage else {}

        async def stream():
            chunk = "chat.completion.chunk"
            for i in range(body.n):
                yield R.sse(envelope(chunk, [{"index": i, "delta": {"role": "assistant", "content": ""},
                                              "logprobs": None, "finish_reason": None}], **extra))
            completion = 0
            async for ev in events_of(groups, events, start):
                err = failure(ev)
                if err:
                    yield R.sse(err.body())
                    break
                if ev.text or ev.tokens:
                    yield R.sse(envelope(chunk, [{"index": ev.index, "delta": {"content": ev.text},
                                                  "logprobs": logprobs(ev.tokens), "finish_reason": None}], **extra))
                if ev.finish_reason:
                    completion += ev.completion_tokens
                    yield R.sse(envelope(chunk, [{"index": ev.index, "delta": {}, "logprobs": None,
                                                  "finish_reason": ev.finish_reason}], **extra))
            else:
                if include_usage:
                    yield R.sse(envelope(chunk, [], usage=R.usage(len(ids), completion)))
            yield R.sse("[DONE]")

        return streaming(stream())

    def prompt_list(prompt) -> list:
        if isinstance(prompt, str):
            return [prompt]
        if prompt and isinstance(prompt[0], int):
            return [prompt]
        return list(prompt)

    def prompt_ids(prompt) -> list[list[int]]:
        out = []
        for p in prompt_list(prompt):
            ids = tokenizer.encode(p) if isinstance(p, str) else list(p)
            bad = [t for t in ids if t >= engine.vocab_limit]
            if bad:
                raise APIError(400, f"token id {bad[0]} is outside the vocabulary of {engine.vocab_limit} tokens",
                               param="prompt")
            out.append(ids or [eos])  # an empty prompt starts from <|endoftext|>, as a new document would
        return out

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": model_name, "running": engine.num_running, "waiting": engine.num_waiting}

    @app.get("/metrics")
    async def prometheus_metrics():
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def chat_page():
        page = resources.files("phikit.serve").joinpath("static/index.html").read_text(encoding="utf-8")
        # "<" escaped so no value can close the <script> element it is written into.
        config = json.dumps({"model": model_name, "needsKey": bool(api_key), "format": fmt.name}).replace("<", "\\u003c")
        return HTMLResponse(page.replace("/*SERVER_CONFIG*/{}", config))

    return app
