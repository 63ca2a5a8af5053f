"""The shared workflow engine's pure part: a transition table's decisions (sides, states,
guards, grant effects, business status, clock effects, retries)."""

from __future__ import annotations

from collections.abc import Mapping

import pytest

from services.shared.consent_grants import GrantEffect
from services.shared.errors import FailedPrecondition, InvalidArgument, PermissionDenied
from services.shared.workflow.machine import ClockEffect, Machine, Transition

NEW, OPEN, NOTED, DONE, GONE = 1, 2, 3, 4, 5
_NAMES = {NEW: "new", OPEN: "open", NOTED: "noted", DONE: "done", GONE: "gone"}


def _needs_outcome(facts: Mapping[str, object]) -> None:
    if not facts.get("outcome"):
        raise InvalidArgument("an outcome document is required", reason="outcome-missing")


MACHINE = Machine(
    kind="errand",
    transitions={
        "open": Transition(
            "open",
            frozenset({NEW}),
            OPEN,
            "target",
            grant=GrantEffect.GRANT,
            business_status="accepted",
            clocks=ClockEffect(start=("outcome",), stop=("accept",)),
        ),
        "note": Transition("note", frozenset({OPEN}), OPEN, "target", self_loop=True),
        "finish": Transition(
            "finish", frozenset({OPEN}), DONE, "target", grant=GrantEffect.CLOSE, guard=_needs_outcome
        ),
        "drop": Transition("drop", frozenset({NEW, OPEN}), GONE, "origin", grant=GrantEffect.REVOKE),
    },
    state_name=_NAMES.__getitem__,
    granted=frozenset({OPEN}),
    side_labels={"origin": "asking", "target": "answering"},
)


def test_a_move_carries_its_effects() -> None:
    d = MACHINE.decide("open", state=NEW, side="target")
    assert (d.to_state, d.grant, d.business_status, d.repeated) == (OPEN, GrantEffect.GRANT, "accepted", False)
    assert d.clocks == ClockEffect(start=("outcome",), stop=("accept",))


def test_wrong_side_is_refused_before_anything_else() -> None:
    with pytest.raises(PermissionDenied) as refused:
        MACHINE.decide("open", state=DONE, side="origin")
    assert refused.value.reason == "errand-party"
    assert "answering" in refused.value.message


def test_wrong_state_names_the_current_state() -> None:
    with pytest.raises(FailedPrecondition) as refused:
        MACHINE.decide("finish", state=GONE, side="target", facts={"outcome": "doc"})
    assert refused.value.reason == "errand-state"
    assert "state gone" in refused.value.message


def test_the_same_move_again_is_a_retry_but_a_self_loop_is_not() -> None:
    assert MACHINE.decide("open", state=OPEN, side="target").repeated
    note = MACHINE.decide("note", state=OPEN, side="target")
    assert (note.repeated, note.to_state) == (False, OPEN)


def test_a_guard_decides_on_the_facts() -> None:
    with pytest.raises(InvalidArgument) as refused:
        MACHINE.decide("finish", state=OPEN, side="target", facts={})
    assert refused.value.reason == "outcome-missing"
    assert MACHINE.decide("finish", state=OPEN, side="target", facts={"outcome": "d"}).grant is GrantEffect.CLOSE


def test_revoke_only_where_a_grant_is_held() -> None:
    assert MACHINE.decide("drop", state=NEW, side="origin").grant is GrantEffect.NONE
    assert MACHINE.decide("drop", state=OPEN, side="origin").grant is GrantEffect.REVOKE


def test_moves_from_lists_a_sides_moves() -> None:
    assert MACHINE.moves_from(OPEN, "target") == ["note", "finish"]
    assert MACHINE.moves_from(OPEN, "origin") == ["drop"]
