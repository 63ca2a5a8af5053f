"""Referral protobuf messages of the rows that need no unsealing (slots, bed counts)."""

from __future__ import annotations

from hie.referral.v1 import referral_pb2
from services.referral.store import BedCountRecord, SlotRecord
from services.shared.timestamps import to_timestamp_or_none as timestamp


def slot(record: SlotRecord) -> referral_pb2.Slot:
    return referral_pb2.Slot(
        slot_id=record.id,
        organization_id=record.organization_id,
        department=record.department,
        start=timestamp(record.start_at),
        end=timestamp(record.end_at),
        status="busy" if record.referral_id else "free",
    )


def bed_count(record: BedCountRecord) -> referral_pb2.BedCount:
    return referral_pb2.BedCount(
        organization_id=record.organization_id,
        department=record.department,
        total=record.total,
        reserved=record.reserved,
    )
