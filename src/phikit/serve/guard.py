"""What stands in front of the API: drain mode, the API key, body size limits, metrics, and errors that are
always OpenAI's JSON shape ({"error": {"message", "type", "param", "code"}}), never a bare 500 page."""
from __future__ import annotations

import hmac
import logging
import re
import time
from dataclasses import dataclass

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from starlette.exceptions import HTTPException as StarletteHTTPException

from .engine import Engine
from .protocol import APIError

log = logging.getLogger("phikit.serve")

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


def error_response(status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
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
            return error_response(503, "the server is shutting down: retry on another instance",
                                  type="server_shutting_down", headers={"Retry-After": "5"})
        if self.api_key and path.startswith("/v1/"):
            auth = dict(scope["headers"]).get(b"authorization", b"").decode("latin-1")
            scheme, _, token = auth.partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), self.api_key.encode()):
                return error_response(401, "invalid or missing API key: send 'Authorization: Bearer KEY' with "
                                      "the server's --api-key", type="authentication_error", code="invalid_api_key")
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_body_bytes):
            return self._too_large()
        return None

    def _too_large(self) -> Response:
        return error_response(413, f"request body is larger than {self.max_body_bytes} bytes: send a smaller "
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
        try:
            body.decode("utf-8")
        except UnicodeDecodeError as e:
            return receive, error_response(400, f"request body is not UTF-8 (byte {e.start}): send JSON encoded as "
                                           "UTF-8")
        # Every body this API takes is JSON: read it as JSON whatever Content-Type says (`curl -d` sends a form
        # type), instead of refusing a valid object with a misleading "must be a JSON object".
        scope["headers"] = [(k, v) for k, v in scope["headers"] if k != b"content-type"] + \
            [(b"content-type", b"application/json")]
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
    # A union (prompt: a string or a list of strings, ...) reports every alternative; our own checks say most.
    err = next((e for e in errors if e["type"] == "value_error"), errors[0])
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
    # Our own checks raise ValueError, which pydantic prefixes with "Value error, ".
    return f"{param}: {err['msg'].removeprefix('Value error, ')}{more}", param


def openapi_with_model(app: FastAPI, model_name: str) -> dict:
    """FastAPI's schema, with the one valid model id spelled out, so generated clients and fuzzers can use it."""
    if app.openapi_schema is None:
        from fastapi.openapi.utils import get_openapi
        schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
        for name in ("CompletionRequest", "ChatCompletionRequest"):
            schema["components"]["schemas"][name]["properties"]["model"]["enum"] = [model_name]
        app.openapi_schema = schema
    return app.openapi_schema


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(_request, exc: APIError):
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_request, exc: RequestValidationError):
        message, param = validation_message(exc)
        return error_response(400, message, param=param)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        if exc.status_code == 404:
            return error_response(404, f"no route {request.url.path}: see GET /openapi.json for the API",
                                  code="not_found")
        if exc.status_code == 405:
            return error_response(405, f"{request.method} is not allowed on {request.url.path}",
                                  code="method_not_allowed")
        return error_response(exc.status_code, str(exc.detail))

    @app.exception_handler(Exception)
    async def _internal_error(_request, exc: Exception):
        log.exception("unhandled error")
        return error_response(500, f"internal error: {type(exc).__name__}", type="server_error")
