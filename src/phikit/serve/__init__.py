"""OpenAI-compatible HTTP server with continuous batching and a small chat page.

    from phikit.serve import create_app, run_server
    app = create_app(model, tokenizer, model_name="phi-2")
    run_server(app, port=8000)
"""
from .app import create_app
from .engine import Engine, Event, Group
from .server import run_server

__all__ = ["create_app", "run_server", "Engine", "Event", "Group"]
