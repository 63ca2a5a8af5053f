"""Registry events published to NATS JetStream (when HIE_NATS_URL is set), from the outbox, by the
shared `JetStreamPublisher`: subject `hie.registry.<event type>`, de-duplicated by event id on
retries."""

from __future__ import annotations

from services.shared.nats_publisher import JetStreamPublisher

NATS_TOPIC = "nats"
NATS_STREAM = "HIE_EVENTS"
NATS_SUBJECTS = "hie.registry.>"


def nats_publisher(url: str) -> JetStreamPublisher:
    """The registry's publisher: the stream made on first connect if missing, and a broker that
    does not answer within 2 s fails the batch (the relay retries it) instead of holding the lane."""
    return JetStreamPublisher(
        url,
        subject=lambda event: f"hie.registry.{event['event_type']}",
        stream=NATS_STREAM,
        stream_subjects=[NATS_SUBJECTS],
        connect_options={"connect_timeout": 2, "max_reconnect_attempts": 1},
    )
