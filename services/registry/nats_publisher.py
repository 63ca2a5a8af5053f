"""Registry events published to NATS JetStream (when HIE_NATS_URL is set), from the outbox:
de-duplicated by event id on retries."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Sequence
from typing import Any

NATS_TOPIC = "nats"
NATS_STREAM = "HIE_EVENTS"


class NatsPublisher:
    """One connection to the broker, opened on first use, closed when the service stops."""

    def __init__(self, url: str) -> None:
        self.url = url
        self._nats: Any = None

    async def publish(self, payloads: Sequence[bytes]) -> None:
        """JetStream publish, de-duplicated by the event id (Nats-Msg-Id) on retries."""
        import nats  # optional: only when HIE_NATS_URL is set

        if self._nats is None or self._nats.is_closed:
            self._nats = await nats.connect(self.url, connect_timeout=2, max_reconnect_attempts=1)
            js = self._nats.jetstream()
            try:
                await js.find_stream_name_by_subject("hie.registry.>")
            except nats.js.errors.NotFoundError:
                await js.add_stream(name=NATS_STREAM, subjects=["hie.registry.>"])
        js = self._nats.jetstream()
        for payload in payloads:
            event = json.loads(payload)
            await js.publish(f"hie.registry.{event['event_type']}", payload, headers={"Nats-Msg-Id": event["event_id"]})

    async def close_on_exit(self) -> None:
        """Wait until cancelled (the service stopping), then close the connection."""
        try:
            await asyncio.Event().wait()
        finally:
            if self._nats is not None and not self._nats.is_closed:
                await self._nats.close()
