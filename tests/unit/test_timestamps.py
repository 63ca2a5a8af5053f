"""protobuf Timestamps from datetimes: the shared conversion gives exactly protobuf's own answer."""

from __future__ import annotations

import datetime

import pytest
from google.protobuf.timestamp_pb2 import Timestamp
from hypothesis import given
from hypothesis import strategies as st

from services.shared.timestamps import to_datetime, to_timestamp

_ZONES = st.one_of(
    st.none(),
    st.just(datetime.UTC),
    st.integers(min_value=-1439, max_value=1439).map(lambda m: datetime.timezone(datetime.timedelta(minutes=m))),
)


def _protobuf(value: datetime.datetime) -> tuple[int, int] | type[BaseException]:
    stamp = Timestamp()
    try:
        stamp.FromDatetime(value)
    except (OverflowError, ValueError) as exc:
        return type(exc)
    return stamp.seconds, stamp.nanos


def _ours(value: datetime.datetime) -> tuple[int, int] | type[BaseException]:
    try:
        stamp = to_timestamp(value)
    except (OverflowError, ValueError) as exc:
        return type(exc)
    return stamp.seconds, stamp.nanos


@given(st.datetimes(timezones=_ZONES))
def test_the_same_seconds_and_nanos_as_protobufs_from_datetime(value: datetime.datetime) -> None:
    assert _ours(value) == _protobuf(value)


@pytest.mark.parametrize(
    "value",
    [
        datetime.datetime(1, 1, 1, tzinfo=datetime.UTC),
        datetime.datetime(9999, 12, 31, 23, 59, 59, 999_999, tzinfo=datetime.UTC),
        datetime.datetime(1969, 12, 31, 23, 59, 59, 1, tzinfo=datetime.UTC),
        datetime.datetime(1970, 1, 1),
        datetime.datetime(2026, 12, 6, 18, 30, 0, 5, tzinfo=datetime.timezone(datetime.timedelta(hours=8))),
        # An offset that moves the moment past the end of a Timestamp's range.
        datetime.datetime(9999, 12, 31, 23, tzinfo=datetime.timezone(datetime.timedelta(hours=-5))),
    ],
)
def test_edges_of_the_range_and_zones(value: datetime.datetime) -> None:
    assert _ours(value) == _protobuf(value)


def test_a_moment_comes_back_the_same_and_in_utc() -> None:
    moment = datetime.datetime(2026, 12, 6, 18, 30, 0, 123_456, tzinfo=datetime.timezone(datetime.timedelta(hours=8)))
    back = to_datetime(to_timestamp(moment))
    assert back == moment
    assert back.tzinfo == datetime.UTC


def test_anything_but_a_datetime_is_refused() -> None:
    with pytest.raises(TypeError):
        to_timestamp("2026-12-06")  # type: ignore[arg-type]
