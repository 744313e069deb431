"""The OpenAI-compatible HTTP API over the continuous-batching engine.

GET /v1/models, POST /v1/completions, POST /v1/chat/completions (streamed as server-sent events or not),
GET /health, GET /metrics (Prometheus text), GET / (a chat page). Every error is OpenAI's JSON error shape.
"""
from __future__ import annotations

import json
from contextlib import asynccontextmanager
from importlib import resources

from fastapi import FastAPI, Request, Security
from fastapi.responses import HTMLResponse, Response
from fastapi.security import HTTPBearer
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from .. import __version__
from ..inference.formats import default_format, get_format
from ..model import PhiForCausalLM
from ..tokenizer import Tokenizer
from .engine import Engine
from .guard import Guard, Metrics, ServerState, install_error_handlers, openapi_with_model
from .protocol import ChatCompletionRequest, CompletionRequest
from .service import OpenAIService


def create_app(model: PhiForCausalLM, tokenizer: Tokenizer, *, model_name: str = "phi", api_key: str | None = None,
               max_batch: int = 16, max_queue: int = 64, request_timeout: float = 600.0,
               format_name: str | None = None, max_body_bytes: int = 2 * 2**20, compile: bool = False) -> FastAPI:
    """The server as an ASGI app; the engine thread starts and stops with the app's lifespan.

    format_name picks how chat messages become a prompt (default: ChatML when the tokenizer has its tokens, else
    the chat transcript). max_queue bounds the prompts waiting for a batch slot (429 beyond it). compile runs the
    decoding steps through torch.compile (see Engine).
    """
    engine = Engine(model, tokenizer, max_batch=max_batch, max_queue=max_queue, compile=compile)
    fmt = get_format(format_name or default_format(tokenizer))
    metrics = Metrics(engine)
    service = OpenAIService(engine, tokenizer, fmt, model_name, metrics, request_timeout)
    state = ServerState()

    @asynccontextmanager
    async def lifespan(_app):
        engine.start()
        try:
            yield
        finally:
            engine.stop()

    app = FastAPI(title="phikit", version=__version__, lifespan=lifespan,
                  description="OpenAI-compatible API for phi models, with continuous batching.")
    app.state.engine, app.state.server_state, app.state.metrics, app.state.format = engine, state, metrics, fmt
    app.openapi = lambda: openapi_with_model(app, model_name)
    app.add_middleware(Guard, state=state, metrics=metrics, api_key=api_key, max_body_bytes=max_body_bytes)
    install_error_handlers(app)
    # Documents the scheme in the OpenAPI schema; the check itself is in Guard, before the body is parsed.
    bearer = Security(HTTPBearer(auto_error=False, description="the server's --api-key, when it has one"))

    @app.get("/v1/models", dependencies=[bearer])
    async def list_models():
        return {"object": "list", "data": [service.model_card()]}

    @app.get("/v1/models/{model_id:path}", dependencies=[bearer])
    async def get_model(model_id: str):
        service.check_model(model_id)
        return service.model_card()

    @app.post("/v1/completions", dependencies=[bearer])
    async def completions(body: CompletionRequest, request: Request):
        return await service.completions(body, request)

    @app.post("/v1/chat/completions", dependencies=[bearer])
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        return await service.chat_completions(body, request)

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": model_name, "running": engine.num_running, "waiting": engine.num_waiting}

    @app.get("/metrics")
    async def prometheus_metrics():
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    page = resources.files("phikit.serve").joinpath("static/index.html").read_text(encoding="utf-8")
    # "<" escaped so no value can close the <script> element the settings are written into.
    settings = json.dumps({"model": model_name, "needsKey": bool(api_key), "format": fmt.name})
    page = page.replace("/*SERVER_CONFIG*/{}", settings.replace("<", "\\u003c"))

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def chat_page():
        return HTMLResponse(page)

    return app
