"""protobuf Timestamp <-> datetime, the one conversion every service and the gateway make.

A datetime without a zone is taken as UTC (as protobuf's FromDatetime does); a datetime read from
a Timestamp is always aware, in UTC."""

from __future__ import annotations

import datetime

from google.protobuf.timestamp_pb2 import Timestamp


def to_timestamp(value: datetime.datetime) -> Timestamp:
    """The Timestamp of a moment (OverflowError / ValueError outside 0001..9999)."""
    stamp = Timestamp()
    stamp.FromDatetime(value)
    return stamp


def to_timestamp_or_none(value: datetime.datetime | None) -> Timestamp | None:
    """`to_timestamp`, with None for no moment (an unset message field)."""
    return None if value is None else to_timestamp(value)


def to_datetime(stamp: Timestamp) -> datetime.datetime:
    """The moment of a Timestamp, aware, in UTC."""
    return stamp.ToDatetime(tzinfo=datetime.UTC)


def to_datetime_or_none(stamp: Timestamp, present: bool) -> datetime.datetime | None:
    """`to_datetime` of a field that may be unset (`present`: the message's HasField)."""
    return to_datetime(stamp) if present else None


def isoformat(stamp: Timestamp) -> str:
    """A Timestamp as ISO 8601 with its UTC offset (+00:00)."""
    return to_datetime(stamp).isoformat()
