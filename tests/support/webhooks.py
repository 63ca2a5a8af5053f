"""A hospital's notification endpoint for the tests: a real HTTP server on loopback that answers
the statuses a test scripts and keeps what it received."""

from __future__ import annotations

import asyncio
import socket
from typing import Any

import uvicorn


class Receiver:
    """A hospital's notification endpoint: a real HTTP server answering scripted statuses."""

    def __init__(self) -> None:
        self.statuses: list[int] = []
        self.received: list[tuple[dict[str, str], bytes, int]] = []
        self.url = ""
        self._server: uvicorn.Server | None = None
        self._task: asyncio.Task[None] | None = None

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        status = self.statuses.pop(0) if self.statuses else 200
        headers = {k.decode(): v.decode() for k, v in scope["headers"]}
        self.received.append((headers, body, status))
        await send({"type": "http.response.start", "status": status, "headers": [(b"content-length", b"0")]})
        await send({"type": "http.response.body", "body": b""})

    async def start(self) -> None:
        """Listen on a free loopback port; `url` is the endpoint to subscribe."""
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{sock.getsockname()[1]}/hie/notifications"
        self._server = uvicorn.Server(
            uvicorn.Config(self, log_level="warning", access_log=False, lifespan="off", timeout_graceful_shutdown=5)
        )
        self._task = asyncio.create_task(self._server.serve(sockets=[sock]))
        while not self._server.started:
            if self._task.done():
                self._task.result()
            await asyncio.sleep(0.01)

    async def stop(self) -> None:
        """Stop the server after the request in flight."""
        assert self._server is not None
        assert self._task is not None
        self._server.should_exit = True
        await self._task

    def acknowledged(self) -> list[tuple[dict[str, str], bytes, int]]:
        """The deliveries answered with a 2xx status."""
        return [r for r in self.received if 200 <= r[2] < 300]
