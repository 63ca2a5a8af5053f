"""The mpi service on a real gRPC server and database: probabilistic links, the review queue,
"different people" remembered, link / unlink, merge / unmerge, history, events, PDQ."""

from __future__ import annotations

import json
from pathlib import Path

import grpc
import pytest
from sqlalchemy import select

from hie.mpi.v1 import mpi_pb2
from services.mpi.index import LINK_TOPIC
from services.mpi.service import SPEC as MPI
from services.shared.process import RunningService
from tests.support.factories import fresh_national_id
from tests.support.hospital import Hospital, birth, phone, tasks_for

pytestmark = pytest.mark.filterwarnings("ignore")


async def test_homophone_across_hospitals_links_probabilistically(mpi: RunningService, keys_dir: Path) -> None:
    a, b = Hospital(mpi, keys_dir), Hospital(mpi, keys_dir)
    shared = {"phones": [phone()], "birth_date": birth(), "line": "西城区西直门南大街2号"}
    first = await a.register("A-1", "张伟", **shared)
    second = await b.register("B-1", "章伟", **{**shared, "line": "北京市西城区西直门南大街2号院"})
    assert second.link_method == mpi_pb2.LINK_METHOD_PROBABILISTIC
    assert second.patient.enterprise_id == first.patient.enterprise_id
    pinyin = await Hospital(mpi, keys_dir).register("C-1", "Zhang Wei", **shared)
    assert pinyin.patient.enterprise_id == first.patient.enterprise_id
    history = await b.call("GetLinkHistory", mpi_pb2.GetLinkHistoryRequest(ref=b.ref("B-1")))
    assert history.enterprise_id == first.patient.enterprise_id
    by_ref = {(c.ref.local_id, c.reason): c for c in history.changes}
    assert by_ref[("B-1", "register")].method == mpi_pb2.LINK_METHOD_PROBABILISTIC
    assert by_ref[("B-1", "register")].weight >= 30


async def test_uncertain_pair_goes_to_review_and_different_people_is_remembered(
    mpi: RunningService, keys_dir: Path
) -> None:
    a, b = Hospital(mpi, keys_dir), Hospital(mpi, keys_dir)
    born = birth()
    first = await a.register("A-2", "王秀英", birth_date=born, gender=mpi_pb2.GENDER_FEMALE, phones=[phone()])
    second = await b.register("B-2", "王秀英", birth_date=born, gender=mpi_pb2.GENDER_FEMALE, phones=[phone()])
    assert second.link_method == mpi_pb2.LINK_METHOD_NEW
    assert second.patient.enterprise_id != first.patient.enterprise_id
    with pytest.raises(grpc.aio.AioRpcError) as denied:
        await b.call("ListReviewTasks", mpi_pb2.ListReviewTasksRequest())
    assert denied.value.code() == grpc.StatusCode.PERMISSION_DENIED
    [task] = await tasks_for(b, "B-2")
    assert {task.patient.ref.local_id, task.candidate.ref.local_id} == {"A-2", "B-2"}
    levels = {f.field: f.level for f in task.fields}
    assert levels["family"] == "exact"
    assert levels["birth_date"] == "exact"
    assert levels["phone"] == "disagree"
    decided = await b.call(
        "DecideReview",
        mpi_pb2.DecideReviewRequest(task_id=task.id, decision=mpi_pb2.REVIEW_DECISION_DIFFERENT),
        role="data-steward",
    )
    assert decided.task.status == "different"
    # Registered again (an update), the pair is never proposed again.
    await b.register("B-2", "王秀英", birth_date=born, gender=mpi_pb2.GENDER_FEMALE, phones=[phone()])
    assert await tasks_for(b, "B-2") == []
    with pytest.raises(grpc.aio.AioRpcError) as again:
        await b.call(
            "DecideReview",
            mpi_pb2.DecideReviewRequest(task_id=task.id, decision=mpi_pb2.REVIEW_DECISION_SAME),
            role="data-steward",
        )
    assert again.value.code() == grpc.StatusCode.FAILED_PRECONDITION


async def test_steward_decides_same_person(mpi: RunningService, keys_dir: Path) -> None:
    a, b = Hospital(mpi, keys_dir), Hospital(mpi, keys_dir)
    born = birth()
    first = await a.register("A-3", "李娜", birth_date=born, gender=mpi_pb2.GENDER_FEMALE, phones=[phone()])
    await b.register("B-3", "李娜", birth_date=born, gender=mpi_pb2.GENDER_FEMALE, phones=[phone()])
    [task] = await tasks_for(b, "B-3")
    await b.call(
        "DecideReview",
        mpi_pb2.DecideReviewRequest(task_id=task.id, decision=mpi_pb2.REVIEW_DECISION_SAME),
        role="data-steward",
    )
    pix = await b.call("CrossReference", mpi_pb2.CrossReferenceRequest(ref=b.ref("B-3")))
    assert pix.enterprise_id == first.patient.enterprise_id
    assert {r.local_id for r in pix.refs} == {"A-3", "B-3"}


async def test_same_national_id_with_another_name_is_reviewed_and_masked(mpi: RunningService, keys_dir: Path) -> None:
    a, b = Hospital(mpi, keys_dir), Hospital(mpi, keys_dir)
    nid = fresh_national_id()
    first = await a.register("A-4", "赵六", national_id=nid, birth_date="")
    second = await b.register("B-4", "钱七", national_id=nid, birth_date="")
    assert second.patient.enterprise_id != first.patient.enterprise_id
    shown = [i.value for i in second.patient.identifiers if i.type == "NNCHN"]
    assert shown
    assert shown[0] != nid
    assert "*" in shown[0]
    [task] = await tasks_for(b, "B-4")
    assert task.hold == "national-id-conflict"
    assert nid in [i.value for i in task.patient.identifiers]  # the steward sees the full number


async def test_unlink_is_remembered_and_link_puts_it_back(mpi: RunningService, keys_dir: Path) -> None:
    a, b = Hospital(mpi, keys_dir), Hospital(mpi, keys_dir)
    nid = fresh_national_id()
    first = await a.register("A-5", "孙八", national_id=nid, birth_date="")
    await b.register("B-5", "孙八", national_id=nid, birth_date="")
    unlinked = await b.call("UnlinkPatient", mpi_pb2.UnlinkPatientRequest(ref=b.ref("B-5")), role="data-steward")
    assert unlinked.patient.enterprise_id != first.patient.enterprise_id
    again = await b.register("B-5", "孙八", national_id=nid, birth_date="")
    assert again.patient.enterprise_id == unlinked.patient.enterprise_id  # not linked back by the rule
    with pytest.raises(grpc.aio.AioRpcError) as denied:
        await b.call("LinkPatients", mpi_pb2.LinkPatientsRequest(ref=b.ref("B-5"), target=a.ref("A-5")))
    assert denied.value.code() == grpc.StatusCode.PERMISSION_DENIED
    linked = await b.call(
        "LinkPatients", mpi_pb2.LinkPatientsRequest(ref=b.ref("B-5"), target=a.ref("A-5")), role="data-steward"
    )
    assert linked.patient.enterprise_id == first.patient.enterprise_id
    assert linked.patient.link_method == mpi_pb2.LINK_METHOD_STEWARD
    history = await b.call("GetLinkHistory", mpi_pb2.GetLinkHistoryRequest(ref=b.ref("B-5")))
    assert [c.reason for c in history.changes if c.ref.local_id == "B-5"] == ["register", "unlink", "link"]


async def test_merge_and_unmerge_of_a_hospitals_own_records(mpi: RunningService, keys_dir: Path) -> None:
    a, b = Hospital(mpi, keys_dir), Hospital(mpi, keys_dir)
    nid = fresh_national_id()
    survivor = await a.register("A-6", "周九", birth_date=birth(), phones=[phone()])
    duplicate = await a.register("A-6-dup", "周九", national_id=nid, birth_date="")
    other = await b.register("B-6", "周九", national_id=nid, birth_date="")
    assert other.patient.enterprise_id == duplicate.patient.enterprise_id != survivor.patient.enterprise_id
    merged = await a.call(
        "MergePatients",
        mpi_pb2.MergePatientsRequest(survivor_local_id="A-6", subsumed_local_id="A-6-dup"),
        role="admin",
    )
    assert merged.survivor.enterprise_id == survivor.patient.enterprise_id
    assert merged.subsumed.ref.local_id == "A-6-dup"
    assert merged.subsumed.record_id == duplicate.patient.record_id
    # The same merge again (a retried message) answers the same and changes nothing.
    again = await a.call(
        "MergePatients",
        mpi_pb2.MergePatientsRequest(survivor_local_id="A-6", subsumed_local_id="A-6-dup"),
        role="admin",
    )
    assert again.subsumed.record_id == merged.subsumed.record_id
    assert again.survivor.enterprise_id == merged.survivor.enterprise_id
    history = await b.call("GetLinkHistory", mpi_pb2.GetLinkHistoryRequest(ref=b.ref("B-6")))
    assert [c.reason for c in history.changes if c.ref.local_id == "B-6"] == ["register", "merge"]
    pix = await b.call("CrossReference", mpi_pb2.CrossReferenceRequest(ref=b.ref("B-6")))
    assert pix.enterprise_id == survivor.patient.enterprise_id
    assert {r.local_id for r in pix.refs} == {"A-6", "B-6"}  # the retired record is gone from PIX
    with pytest.raises(grpc.aio.AioRpcError) as retired:
        await a.register("A-6-dup", "周九")
    assert retired.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    await a.call("UnmergePatient", mpi_pb2.UnmergePatientRequest(subsumed_local_id="A-6-dup"), role="admin")
    pix = await b.call("CrossReference", mpi_pb2.CrossReferenceRequest(ref=b.ref("B-6")))
    assert pix.enterprise_id == duplicate.patient.enterprise_id
    assert {r.local_id for r in pix.refs} == {"A-6-dup", "B-6"}


async def test_update_re_evaluates_the_link(mpi: RunningService, keys_dir: Path) -> None:
    a, b = Hospital(mpi, keys_dir), Hospital(mpi, keys_dir)
    nid = fresh_national_id()
    first = await a.register("A-7", "吴十", national_id=nid, birth_date="")
    typo = await b.register("B-7", "吴十", birth_date="1901-01-01")
    assert typo.patient.enterprise_id != first.patient.enterprise_id
    fixed = await b.register("B-7", "吴十", national_id=nid, birth_date="")
    assert fixed.created is False
    assert fixed.patient.enterprise_id == first.patient.enterprise_id


async def test_link_changes_are_events_with_ids_only(mpi: RunningService, keys_dir: Path) -> None:
    a = Hospital(mpi, keys_dir)
    await a.register("A-8", "欧阳娜娜", phones=["13912345678"])
    table = MPI.metadata.tables["outbox"]
    async with mpi.runtime.sessions() as session:
        payloads = (await session.scalars(select(table.c.payload).where(table.c.topic == LINK_TOPIC))).all()
    events = [json.loads(p) for p in payloads]
    mine = [e for e in events if e["domain"] == a.org]
    assert mine
    assert mine[0]["change"] == "register"
    assert mine[0]["enterprise_id"]
    raw = b"".join(payloads).decode()
    assert "欧阳" not in raw
    assert "13912345678" not in raw


async def test_pdq_search_ranks_chinese_and_pinyin(mpi: RunningService, keys_dir: Path) -> None:
    a, b = Hospital(mpi, keys_dir), Hospital(mpi, keys_dir)
    born = "1966-06-06"
    await a.register("A-9", "诸葛亮", birth_date=born)
    await b.register("B-9", "诸葛良", birth_date=born)
    found = await a.call("SearchPatients", mpi_pb2.SearchPatientsRequest(name="Zhuge Liang", birth_date=born))
    refs = [(r.patient.ref.local_id, r.fields[0].level) for r in found.results]
    assert ("A-9", "pinyin") in refs
    assert ("B-9", "pinyin") in refs
    assert all(0 < r.probability <= 1 for r in found.results)
    exact = await a.call("SearchPatients", mpi_pb2.SearchPatientsRequest(family="诸葛", given="亮", birth_date=born))
    assert exact.results[0].patient.ref.local_id == "A-9"
    assert exact.results[0].weight > exact.results[1].weight
    with pytest.raises(grpc.aio.AioRpcError) as broad:
        await a.call("SearchPatients", mpi_pb2.SearchPatientsRequest())
    assert broad.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert dict(broad.value.trailing_metadata())["hie-error-reason"] == "search-too-broad"
