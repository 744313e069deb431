"""Run the app under uvicorn with a graceful shutdown: on SIGTERM (or Ctrl-C) the server answers new requests
with 503, lets the requests it is answering finish, then exits. A second signal exits at once."""
from __future__ import annotations

import logging
import time

import uvicorn
from fastapi import FastAPI

log = logging.getLogger("phikit.serve")


class DrainingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, drain_timeout: float) -> None:
        super().__init__(config)
        self.state = config.app.state.server_state
        self.drain_timeout = drain_timeout
        self.drain_deadline: float | None = None

    def handle_exit(self, sig, frame) -> None:
        if self.state.draining:  # asked twice: stop waiting for in-flight requests
            self.should_exit = self.force_exit = True
            return
        log.info("shutting down: finishing %d in-flight requests, refusing new ones (signal again to force)",
                 self.state.in_flight)
        self.state.draining = True
        self.drain_deadline = time.monotonic() + self.drain_timeout

    async def on_tick(self, counter: int) -> bool:
        if self.state.draining and not self.should_exit:
            if self.state.in_flight == 0 or time.monotonic() > self.drain_deadline:
                self.should_exit = True
        return await super().on_tick(counter)


def run_server(app: FastAPI, host: str = "127.0.0.1", port: int = 8000, drain_timeout: float = 600.0,
               log_level: str = "info") -> None:
    """Serve until SIGTERM/SIGINT, then drain (see module docstring)."""
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=5,
                            timeout_keep_alive=5)
    DrainingServer(config, drain_timeout).run()
