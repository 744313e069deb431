"""`phikit serve --model M`: the OpenAI-compatible server with continuous batching and a chat page at /."""
from __future__ import annotations

import argparse
import logging
import os
import socket
from pathlib import Path

from .generate import add_model_arguments


def configure(p: argparse.ArgumentParser) -> None:
    add_model_arguments(p)
    p.add_argument("--host", default="127.0.0.1", help="interface to listen on (default: 127.0.0.1; 0.0.0.0 for all)")
    p.add_argument("--port", type=int, default=8000, help="TCP port (default: 8000)")
    p.add_argument("--api-key", default=os.environ.get("PHIKIT_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on /v1/* (default: $PHIKIT_API_KEY, else open)")
    p.add_argument("--max-batch", type=int, default=16, help="sequences decoded together (default: 16)")
    p.add_argument("--max-queue", type=int, default=64,
                   help="prompts waiting for a batch slot before new requests get 429 (default: 64)")
    p.add_argument("--request-timeout", type=float, default=600.0,
                   help="seconds a request may take, queueing included, before it gets 504 (default: 600)")
    p.add_argument("--format", choices=["code", "qa", "instruct", "chat", "chatml"], default=None,
                   help="how chat messages become a prompt (default: chatml if the tokenizer has it, else chat)")
    p.add_argument("--served-model-name", default=None,
                   help="model id clients send and /v1/models lists (default: the checkpoint's directory name)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: torch's choice; 1 can be faster on a busy machine)")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"],
                   help="the server's and uvicorn's log messages shown (default: info)")
    p.epilog = ("examples:\n"
                "  phikit serve --model ./phi-2 --port 8000\n"
                "  phikit serve --model ./my-sft --api-key secret --max-batch 32\n"
                "  phikit serve --model ./phi-1_5 --device cuda --dtype fp16 --compile\n"
                "  curl localhost:8000/v1/chat/completions -H 'Content-Type: application/json' \\\n"
                "    -d '{\"model\": \"phi-2\", \"messages\": [{\"role\": \"user\", \"content\": \"Hi\"}]}'\n"
                "  open http://127.0.0.1:8000/ for the chat page")


def check_can_listen(host: str, port: int) -> None:
    """Fail in one line before loading the model (minutes for a large one), not after, when the port is taken."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does: a closing socket is no conflict
        try:
            s.bind((host, port))
        except OSError as e:
            raise ValueError(f"cannot listen on {host}:{port} ({e.strerror}): pick another --port or --host") from e


def run(args: argparse.Namespace) -> int:
    if args.max_batch < 1:
        raise ValueError(f"--max-batch must be at least 1, got {args.max_batch}")
    if args.max_queue < 0:
        raise ValueError(f"--max-queue must be 0 or more, got {args.max_queue}")
    if args.request_timeout <= 0:
        raise ValueError(f"--request-timeout must be positive, got {args.request_timeout}")
    if not 0 <= args.port < 65536:
        raise ValueError(f"--port must be in 0..65535, got {args.port}")
    if args.threads is not None and args.threads < 1:
        raise ValueError(f"--threads must be at least 1, got {args.threads}")
    check_can_listen(args.host, args.port)
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    import torch

    from ..checkpoint import load
    from ..serve import create_app, run_server
    if args.threads:
        torch.set_num_threads(args.threads)

    model, tokenizer = load(args.model, device=args.device, dtype=args.dtype, quantize=args.quantize)
    name = args.served_model_name or Path(str(args.model).rstrip("/")).name
    app = create_app(model, tokenizer, model_name=name, api_key=args.api_key, max_batch=args.max_batch,
                     max_queue=args.max_queue, request_timeout=args.request_timeout, format_name=args.format,
                     compile=args.compile)
    fmt = app.state.format.name
    print(f"serving {name} ({model.num_parameters():,} parameters, {fmt} chat format) on "
          f"http://{args.host}:{args.port}  (chat page at /, API at /v1, Ctrl-C to stop)", flush=True)
    run_server(app, host=args.host, port=args.port, drain_timeout=args.request_timeout, log_level=args.log_level)
    return 0
