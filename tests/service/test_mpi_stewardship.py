"""The mpi on a real gRPC server and database: PDQ paging with sealed page tokens, the stewards'
claim / assignment of review tasks and the claims' lease, idempotent registration."""

from __future__ import annotations

import asyncio
import base64
import datetime
import secrets
from pathlib import Path

import grpc
import pytest

from hie.common.v1 import common_pb2
from hie.mpi.v1 import mpi_pb2
from services.mpi.domain import DEFAULT_CLAIM_SECONDS
from services.mpi.review_store import ReviewAssignment
from services.mpi.service import CLAIM_ENV
from services.mpi.service import SPEC as MPI
from services.shared.errors import REASON_METADATA_KEY
from services.shared.process import RunningService, start_service
from tests.conftest import _backends, base_settings, drop_schemas
from tests.support.hospital import Hospital, birth, phone

pytestmark = pytest.mark.filterwarnings("ignore")


class Staff(Hospital):
    """A hospital whose calls name one of several practitioners (two stewards of one hospital)."""

    def as_practitioner(self, practitioner: str) -> Staff:
        other = Staff(self.running, self.keys_dir)
        other.org, other.practitioner = self.org, practitioner
        return other


async def _fails(call: object, code: grpc.StatusCode, reason: str) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call  # type: ignore[misc]
    assert caught.value.code() == code
    assert dict(caught.value.trailing_metadata() or ()).get(REASON_METADATA_KEY) == reason


# --- PDQ paging ---------------------------------------------------------------------------------

_GIVEN = ["光", "迁", "懿", "相如", "炎", "昭", "衷"]


async def test_pdq_pages_follow_the_ranking_without_gaps_or_repeats(mpi: RunningService, keys_dir: Path) -> None:
    born = birth()
    hospitals = [Staff(mpi, keys_dir) for _ in range(3)]
    registered = set()
    for i, given in enumerate(_GIVEN):
        hospital = hospitals[i % 3]
        await hospital.register(f"P-{i}", f"司马{given}", birth_date=born, phones=[phone()])
        registered.add((hospital.org, f"P-{i}"))
    a = hospitals[0]
    search = mpi_pb2.SearchPatientsRequest(family="司马", birth_date=born, limit=3)
    everything = await a.call("SearchPatients", mpi_pb2.SearchPatientsRequest(family="司马", birth_date=born))
    assert everything.total == len(_GIVEN)
    assert not everything.next_page_token

    pages, token = [], ""
    while True:
        request = mpi_pb2.SearchPatientsRequest(limit=3, page_token=token) if token else search
        page = await a.call("SearchPatients", request)
        assert page.HasField("total")
        assert page.total == len(_GIVEN)
        pages.append(page)
        token = page.next_page_token
        if not token:
            break
    assert [len(p.results) for p in pages] == [3, 3, 1]
    seen = [(r.patient.ref.domain, r.patient.ref.local_id) for p in pages for r in p.results]
    assert len(seen) == len(set(seen)) == len(_GIVEN)
    assert set(seen) == registered
    # The pages are the one-shot ranking cut in three.
    assert seen == [(r.patient.ref.domain, r.patient.ref.local_id) for r in everything.results]

    # The token is sealed: no name, birth date or pinyin inside; any change to it is refused.
    first = pages[0].next_page_token
    raw = base64.urlsafe_b64decode(first + "=" * (-len(first) % 4))
    for clear in ("司马".encode(), b"sima", born.encode()):
        assert clear not in raw
    tampered = first[:20] + ("A" if first[20] != "A" else "B") + first[21:]
    await _fails(
        a.call("SearchPatients", mpi_pb2.SearchPatientsRequest(page_token=tampered)),
        grpc.StatusCode.INVALID_ARGUMENT,
        "page-token-invalid",
    )
    # Bound to the caller's organisation and client: another hospital cannot replay it.
    await _fails(
        hospitals[1].call("SearchPatients", mpi_pb2.SearchPatientsRequest(page_token=first)),
        grpc.StatusCode.INVALID_ARGUMENT,
        "page-token-invalid",
    )
    # A page request naming another search than the token's is refused (AIP-158).
    await _fails(
        a.call("SearchPatients", mpi_pb2.SearchPatientsRequest(family="欧阳", page_token=first)),
        grpc.StatusCode.INVALID_ARGUMENT,
        "page-token-invalid",
    )
    # Repeating the same search with the token is fine.
    same = await a.call(
        "SearchPatients", mpi_pb2.SearchPatientsRequest(family="司马", birth_date=born, limit=3, page_token=first)
    )
    assert [r.patient.ref.local_id for r in same.results] == [r.patient.ref.local_id for r in pages[1].results]


# --- review task assignment ---------------------------------------------------------------------


async def _review_task(mpi: RunningService, keys_dir: Path, name: str) -> tuple[Staff, mpi_pb2.ReviewTask]:
    a, b = Staff(mpi, keys_dir), Staff(mpi, keys_dir)
    born = birth()
    await a.register("A-R", name, birth_date=born, gender=mpi_pb2.GENDER_FEMALE, phones=[phone()])
    await b.register("B-R", name, birth_date=born, gender=mpi_pb2.GENDER_FEMALE, phones=[phone()])
    listed = await b.call("ListReviewTasks", mpi_pb2.ListReviewTasksRequest(page_size=200), role="data-steward")
    # The platform's stewards see the whole region's queue: this pair's task is the one with B's record.
    [task] = [
        t for t in listed.tasks if (b.org, "B-R") in {(r.ref.domain, r.ref.local_id) for r in (t.patient, t.candidate)}
    ]
    return b, task


async def _listed(steward: Staff, assignment: int) -> set[str]:
    listed = await steward.call(
        "ListReviewTasks",
        mpi_pb2.ListReviewTasksRequest(page_size=200, assignment=assignment),
        role="data-steward",
    )
    return {t.id for t in listed.tasks}


async def test_a_claimed_task_is_decided_by_its_steward_only(mpi: RunningService, keys_dir: Path) -> None:
    first, task = await _review_task(mpi, keys_dir, "王秀兰")
    second = first.as_practitioner("S02")
    assert not task.assignee
    assert task.id in await _listed(first, mpi_pb2.REVIEW_ASSIGNMENT_FILTER_UNASSIGNED)

    claimed = await first.call(
        "AssignReviewTask", mpi_pb2.AssignReviewTaskRequest(task_id=task.id), role="data-steward"
    )
    assert (claimed.task.assignee, claimed.task.assignee_organization_id) == ("S01", first.org)
    assert claimed.task.assigned.seconds > 0
    assert task.id in await _listed(first, mpi_pb2.REVIEW_ASSIGNMENT_FILTER_MINE)
    assert task.id not in await _listed(second, mpi_pb2.REVIEW_ASSIGNMENT_FILTER_MINE)
    assert task.id not in await _listed(first, mpi_pb2.REVIEW_ASSIGNMENT_FILTER_UNASSIGNED)
    assert task.id in await _listed(second, mpi_pb2.REVIEW_ASSIGNMENT_FILTER_ANY)

    # The other steward can neither claim nor decide it.
    await _fails(
        second.call("AssignReviewTask", mpi_pb2.AssignReviewTaskRequest(task_id=task.id), role="data-steward"),
        grpc.StatusCode.FAILED_PRECONDITION,
        "review-task-assigned",
    )
    await _fails(
        second.call(
            "DecideReview",
            mpi_pb2.DecideReviewRequest(task_id=task.id, decision=mpi_pb2.REVIEW_DECISION_SAME),
            role="data-steward",
        ),
        grpc.StatusCode.FAILED_PRECONDITION,
        "review-task-assigned",
    )
    await _fails(
        second.call("ReleaseReviewTask", mpi_pb2.ReleaseReviewTaskRequest(task_id=task.id), role="data-steward"),
        grpc.StatusCode.FAILED_PRECONDITION,
        "review-task-assigned",
    )
    # Not a steward: no claim at all.
    await _fails(
        first.call("AssignReviewTask", mpi_pb2.AssignReviewTaskRequest(task_id=task.id), role="doctor"),
        grpc.StatusCode.PERMISSION_DENIED,
        "role",
    )

    # The holder hands it over; the new holder decides.
    handed = await first.call(
        "AssignReviewTask", mpi_pb2.AssignReviewTaskRequest(task_id=task.id, assignee="S02"), role="data-steward"
    )
    assert handed.task.assignee == "S02"
    decided = await second.call(
        "DecideReview",
        mpi_pb2.DecideReviewRequest(task_id=task.id, decision=mpi_pb2.REVIEW_DECISION_DIFFERENT),
        role="data-steward",
    )
    assert decided.task.status == "different"
    assert decided.task.assignee == "S02"
    await _fails(
        first.call("AssignReviewTask", mpi_pb2.AssignReviewTaskRequest(task_id=task.id), role="data-steward"),
        grpc.StatusCode.FAILED_PRECONDITION,
        "review-task-closed",
    )


async def test_take_over_release_and_unknown_task(mpi: RunningService, keys_dir: Path) -> None:
    first, task = await _review_task(mpi, keys_dir, "张桂英")
    second = first.as_practitioner("S02")
    await first.call("AssignReviewTask", mpi_pb2.AssignReviewTaskRequest(task_id=task.id), role="data-steward")
    taken = await second.call(
        "AssignReviewTask", mpi_pb2.AssignReviewTaskRequest(task_id=task.id, reassign=True), role="data-steward"
    )
    assert taken.task.assignee == "S02"
    released = await second.call(
        "ReleaseReviewTask", mpi_pb2.ReleaseReviewTaskRequest(task_id=task.id), role="data-steward"
    )
    assert not released.task.assignee
    assert task.id in await _listed(first, mpi_pb2.REVIEW_ASSIGNMENT_FILTER_UNASSIGNED)
    # An unclaimed task may still be decided by any steward who sees it.
    decided = await first.call(
        "DecideReview",
        mpi_pb2.DecideReviewRequest(task_id=task.id, decision=mpi_pb2.REVIEW_DECISION_SAME),
        role="data-steward",
    )
    assert decided.task.status == "same"
    await _fails(
        first.call("AssignReviewTask", mpi_pb2.AssignReviewTaskRequest(task_id="no-such-task"), role="data-steward"),
        grpc.StatusCode.NOT_FOUND,
        "review-task-not-found",
    )
    await _fails(
        first.call(
            "AssignReviewTask", mpi_pb2.AssignReviewTaskRequest(task_id=task.id, assignee=" x"), role="data-steward"
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
        "assignee-invalid",
    )
    # A hospital's staff are not stewards: the exchange refuses the role to a member hospital.
    outsider = Hospital(mpi, keys_dir)
    await _fails(
        outsider.call("AssignReviewTask", mpi_pb2.AssignReviewTaskRequest(task_id=task.id), role="admin"),
        grpc.StatusCode.PERMISSION_DENIED,
        "role",
    )


async def test_two_stewards_claiming_at_once_one_wins(mpi: RunningService, keys_dir: Path) -> None:
    first, task = await _review_task(mpi, keys_dir, "刘玉兰")
    stewards = [first.as_practitioner(f"S{i:02d}") for i in range(1, 5)]
    outcomes = await asyncio.gather(
        *(
            s.call("AssignReviewTask", mpi_pb2.AssignReviewTaskRequest(task_id=task.id), role="data-steward")
            for s in stewards
        ),
        return_exceptions=True,
    )
    won = [o for o in outcomes if isinstance(o, mpi_pb2.AssignReviewTaskResponse)]
    lost = [o for o in outcomes if isinstance(o, grpc.aio.AioRpcError)]
    assert len(won) == 1
    assert len(lost) == 3
    assert all(e.code() == grpc.StatusCode.FAILED_PRECONDITION for e in lost)
    listed = await first.call("ListReviewTasks", mpi_pb2.ListReviewTasksRequest(page_size=200), role="data-steward")
    [now] = [t for t in listed.tasks if t.id == task.id]
    assert now.assignee == won[0].task.assignee


# --- claims are leases ---------------------------------------------------------------------------


async def _lapse(mpi: RunningService, task_id: str) -> None:
    """Let the task's claim lapse: the lease runs from the stored claim time, so moving that back
    past the lease is the clock moving on (no sleeping through half an hour)."""
    async with mpi.runtime.sessions() as session, session.begin():
        held = await session.get(ReviewAssignment, task_id)
        assert held is not None
        held.assigned_at -= datetime.timedelta(seconds=DEFAULT_CLAIM_SECONDS + 1)


async def _task(steward: Staff, task_id: str, assignment: int = mpi_pb2.REVIEW_ASSIGNMENT_FILTER_ANY) -> object:
    listed = await steward.call(
        "ListReviewTasks",
        mpi_pb2.ListReviewTasksRequest(page_size=200, assignment=assignment),
        role="data-steward",
    )
    [task] = [t for t in listed.tasks if t.id == task_id]
    return task


def _decide(steward: Staff, task_id: str, decision: int = mpi_pb2.REVIEW_DECISION_SAME) -> object:
    return steward.call(
        "DecideReview", mpi_pb2.DecideReviewRequest(task_id=task_id, decision=decision), role="data-steward"
    )


def _claim(steward: Staff, task_id: str) -> object:
    return steward.call("AssignReviewTask", mpi_pb2.AssignReviewTaskRequest(task_id=task_id), role="data-steward")


async def test_a_lapsed_claim_is_taken_and_its_steward_is_refused(mpi: RunningService, keys_dir: Path) -> None:
    first, task = await _review_task(mpi, keys_dir, "李秀英")
    second, third = first.as_practitioner("S02"), first.as_practitioner("S03")
    claimed = (await _claim(first, task.id)).task
    # The listing shows when the claim lapses: the claim time plus the lease (30 minutes by default).
    listed = await _task(first, task.id)
    assert listed.assignment_expires.seconds - listed.assigned.seconds == DEFAULT_CLAIM_SECONDS
    assert listed.assignment_expires == claimed.assignment_expires
    assert not listed.assignment_expired
    await _fails(_claim(second, task.id), grpc.StatusCode.FAILED_PRECONDITION, "review-task-assigned")

    await _lapse(mpi, task.id)
    lapsed = await _task(first, task.id)
    assert lapsed.assignee == "S01"
    assert lapsed.assignment_expired
    # Lapsed: still the first steward's own (nobody took it), and free for everyone else.
    assert task.id in await _listed(first, mpi_pb2.REVIEW_ASSIGNMENT_FILTER_MINE)
    assert task.id in await _listed(second, mpi_pb2.REVIEW_ASSIGNMENT_FILTER_UNASSIGNED)

    # Another steward takes it without `reassign`.
    taken = (await _claim(second, task.id)).task
    assert (taken.assignee, taken.assignment_expired) == ("S02", False)
    assert taken.assignment_expires.seconds - taken.assigned.seconds == DEFAULT_CLAIM_SECONDS
    assert task.id not in await _listed(second, mpi_pb2.REVIEW_ASSIGNMENT_FILTER_UNASSIGNED)
    assert task.id not in await _listed(first, mpi_pb2.REVIEW_ASSIGNMENT_FILTER_MINE)
    # The steward who walked away is told their claim lapsed and went to someone else; others are
    # told it is held.
    await _fails(_decide(first, task.id), grpc.StatusCode.FAILED_PRECONDITION, "review-claim-expired")
    await _fails(_claim(first, task.id), grpc.StatusCode.FAILED_PRECONDITION, "review-claim-expired")
    await _fails(
        first.call("ReleaseReviewTask", mpi_pb2.ReleaseReviewTaskRequest(task_id=task.id), role="data-steward"),
        grpc.StatusCode.FAILED_PRECONDITION,
        "review-claim-expired",
    )
    await _fails(_decide(third, task.id), grpc.StatusCode.FAILED_PRECONDITION, "review-task-assigned")
    # Renewing the claim (claiming it again) keeps that answer for the first steward.
    await _claim(second, task.id)
    await _fails(_decide(first, task.id), grpc.StatusCode.FAILED_PRECONDITION, "review-claim-expired")
    decided = (await _decide(second, task.id, mpi_pb2.REVIEW_DECISION_DIFFERENT)).task
    assert (decided.status, decided.assignee) == ("different", "S02")


async def test_a_lapsed_claim_nobody_took_may_still_be_decided(mpi: RunningService, keys_dir: Path) -> None:
    # By its own steward: allowed, and the task keeps who held it.
    first, task = await _review_task(mpi, keys_dir, "王桂英")
    await _claim(first, task.id)
    await _lapse(mpi, task.id)
    decided = (await _decide(first, task.id)).task
    assert (decided.status, decided.assignee, decided.assignment_expired) == ("same", "S01", True)

    # By another steward: a lapsed claim holds nothing, as an unclaimed task (the stale claim goes).
    first, task = await _review_task(mpi, keys_dir, "张秀珍")
    second = first.as_practitioner("S02")
    await _claim(first, task.id)
    await _lapse(mpi, task.id)
    # Releasing another's lapsed claim is nothing to refuse and nothing to do.
    released = await second.call(
        "ReleaseReviewTask", mpi_pb2.ReleaseReviewTaskRequest(task_id=task.id), role="data-steward"
    )
    assert not released.task.assignee
    decided = (await _decide(second, task.id, mpi_pb2.REVIEW_DECISION_DIFFERENT)).task
    assert (decided.status, decided.assignee) == ("different", "")

    # Claiming a task one holds renews the lease.
    first, task = await _review_task(mpi, keys_dir, "陈秀兰")
    await _claim(first, task.id)
    await _lapse(mpi, task.id)
    assert (await _task(first, task.id)).assignment_expired
    renewed = (await _claim(first, task.id)).task
    assert (renewed.assignee, renewed.assignment_expired) == ("S01", False)
    assert task.id not in await _listed(first.as_practitioner("S02"), mpi_pb2.REVIEW_ASSIGNMENT_FILTER_UNASSIGNED)


@pytest.mark.parametrize("backend", _backends())
async def test_the_lease_is_configured_by_its_setting(
    backend: str, tmp_path: Path, keys_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # (A value that is not whole seconds stops the service at start: tests/unit/test_mpi_domain.py.)
    settings = base_settings(tmp_path, keys_dir, backend)
    monkeypatch.setenv(CLAIM_ENV, "90")
    running = await start_service(MPI, settings, listen="127.0.0.1:0")
    running.runtime.outbox.poll_interval = 3600
    try:
        first, task = await _review_task(running, keys_dir, "刘秀珍")
        claimed = (await _claim(first, task.id)).task
        assert claimed.assignment_expires.seconds - claimed.assigned.seconds == 90
    finally:
        await running.stop(grace=None)
        await drop_schemas(settings)


# --- idempotent registration --------------------------------------------------------------------


def _registration(local_id: str, name: str, born: str, key: str) -> mpi_pb2.RegisterPatientRequest:
    return mpi_pb2.RegisterPatientRequest(
        patient=mpi_pb2.Patient(
            ref=common_pb2.PatientRef(local_id=local_id),
            name=mpi_pb2.HumanName(text=name),
            gender=mpi_pb2.GENDER_MALE,
            birth_date=born,
        ),
        idempotency_key=key,
    )


async def test_a_retried_registration_gets_its_first_answer(mpi: RunningService, keys_dir: Path) -> None:
    a, b = Staff(mpi, keys_dir), Staff(mpi, keys_dir)
    born, key = birth(), secrets.token_hex(8)
    first = await a.call("RegisterPatient", _registration("K-1", "东方明", born, key))
    assert first.created
    retry = await a.call("RegisterPatient", _registration("K-1", "东方明", born, key))
    assert retry.created is True  # the first answer, not "updated"
    assert list(retry.audit_event_ids) == list(first.audit_event_ids)
    assert retry.patient.record_id == first.patient.record_id
    # Without the key the same request is an update, with its own audit event.
    update = await a.call("RegisterPatient", _registration("K-1", "东方明", born, ""))
    assert update.created is False
    assert list(update.audit_event_ids) != list(first.audit_event_ids)
    # The key with another request is a conflict, not a silent change.
    await _fails(
        a.call("RegisterPatient", _registration("K-2", "东方明", born, key)),
        grpc.StatusCode.ALREADY_EXISTS,
        "idempotency-key-reused",
    )
    # Keys are per organisation.
    other = await b.call("RegisterPatient", _registration("K-1", "东方明", born, key))
    assert other.created
    await _fails(
        a.call("RegisterPatient", _registration("K-3", "东方明", born, "x" * 129)),
        grpc.StatusCode.INVALID_ARGUMENT,
        "idempotency-key-invalid",
    )
    # Concurrent retries of one new registration: one record, one answer.
    key = secrets.token_hex(8)
    answers = await asyncio.gather(
        *(a.call("RegisterPatient", _registration("K-4", "东方亮", born, key)) for _ in range(4))
    )
    assert {r.patient.record_id for r in answers} == {answers[0].patient.record_id}
    assert all(r.created for r in answers)
    assert len({tuple(r.audit_event_ids) for r in answers}) == 1
