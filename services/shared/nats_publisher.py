"""Outbox messages published to NATS JetStream: one publisher for every service that has events
for a broker (the mpi's link changes, the registry's workflow notifications).

Each message carries its event id as `Nats-Msg-Id`, so JetStream drops the copy a relay retry
publishes again. nats-py is imported on first use: it is needed only where a NATS URL is set."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Callable, Sequence
from typing import Any

# How long closing the connection may take when a service stops.
_CLOSE_SECONDS = 2.0


class JetStreamPublisher:
    """An outbox `Sender` publishing each JSON payload to the subject `subject(event)` names.

    `stream` / `stream_subjects`: the stream to make sure of on connecting (created if missing);
    None leaves streams to the operator. `connect_options` go to `nats.connect`. A connection
    found closed is opened again on the next batch."""

    def __init__(
        self,
        url: str,
        *,
        subject: Callable[[dict[str, Any]], str],
        stream: str | None = None,
        stream_subjects: Sequence[str] = (),
        connect_options: dict[str, Any] | None = None,
    ) -> None:
        self._url = url
        self._subject = subject
        self._stream = stream
        self._stream_subjects = list(stream_subjects)
        self._connect_options = connect_options or {}
        self._client: Any = None

    async def __call__(self, payloads: Sequence[bytes]) -> None:
        """Publish one outbox batch (the relay retries the batch if this raises)."""
        js = await self._jetstream()
        for payload in payloads:
            event = json.loads(payload)
            await js.publish(self._subject(event), payload, headers={"Nats-Msg-Id": event["event_id"]})

    async def _jetstream(self) -> Any:
        import nats  # optional: only when a NATS URL is configured

        if self._client is None or self._client.is_closed:
            self._client = await nats.connect(self._url, **self._connect_options)
            if self._stream is not None:
                js = self._client.jetstream()
                try:
                    await js.find_stream_name_by_subject(self._stream_subjects[0])
                except nats.js.errors.NotFoundError:
                    await js.add_stream(name=self._stream, subjects=self._stream_subjects)
        return self._client.jetstream()

    async def close(self) -> None:
        """Close the connection, if one is open, within a bound: nats-py's close flushes and
        waits for its reader, which can wait without end on a connection in a bad state, and a
        service that is stopping must not hang on its broker (seen: a registry's stop in the
        tests waiting until the 300 s timeout)."""
        if self._client is not None and not self._client.is_closed:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._client.close(), _CLOSE_SECONDS)

    async def close_on_exit(self) -> None:
        """Wait until cancelled (the service stopping), then close the connection: run it as a
        background task of the service."""
        try:
            await asyncio.Event().wait()
        finally:
            await self.close()
