"""The pure part of the workflow engine: a transition table and the decision of one move.

A workflow item (a referral, a consultation) is in one state; a *move* takes it to another. The
table says, per move, from which states it may start, where it goes, which side may make it
(the origin or the target organisation — each service names its sides), a guard over facts the
caller collects, what it does to the receiving side's consent grant, the business status it sets
(FHIR Task.businessStatus) and what it does to the item's named deadline clocks.

No I/O here: `Machine.decide` is a function of the table, the item's state, the caller's side and
the facts; the effectful part (services/shared/workflow/engine.py) applies the decision once.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from services.shared.consent_grants import GrantEffect
from services.shared.errors import FailedPrecondition, PermissionDenied

# A guard raises a domain error (InvalidArgument / FailedPrecondition) when the facts forbid the move.
Guard = Callable[[Mapping[str, object]], None]


@dataclass(frozen=True)
class ClockEffect:
    """What a move does to the item's named deadline clocks."""

    start: tuple[str, ...] = ()
    pause: tuple[str, ...] = ()
    resume: tuple[str, ...] = ()
    stop: tuple[str, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.start or self.pause or self.resume or self.stop)


NO_CLOCKS = ClockEffect()


@dataclass(frozen=True)
class Transition:
    """One row of a transition table."""

    name: str
    sources: frozenset[int]
    target: int
    side: str
    # GRANT / CLOSE always; REVOKE only from a state in which the receiver holds a grant.
    grant: GrantEffect = GrantEffect.NONE
    business_status: str = ""
    clocks: ClockEffect = NO_CLOCKS
    guard: Guard | None = None
    # A move that stays in the state it starts from (an interim note; `target` is then ignored):
    # a retry is recognised by its request key only.
    self_loop: bool = False


@dataclass(frozen=True)
class Decision:
    """What a move does: the new state (or nothing, when it repeats the last move)."""

    name: str
    from_state: int
    to_state: int
    repeated: bool
    grant: GrantEffect = GrantEffect.NONE
    business_status: str = ""
    clocks: ClockEffect = NO_CLOCKS


@dataclass(frozen=True)
class Machine:
    """A workflow kind's transition table (`kind` names its audit events and error reasons:
    `<kind>.<move>`, `<kind>-party`, `<kind>-state`)."""

    kind: str
    transitions: Mapping[str, Transition]
    state_name: Callable[[int], str]
    # States in which the target side holds a consent grant (a REVOKE applies only from these).
    granted: frozenset[int] = frozenset()
    # How the error messages name each side ("referring", "receiving").
    side_labels: Mapping[str, str] = field(default_factory=dict)

    def transition(self, name: str) -> Transition:
        return self.transitions[name]

    def decide(self, name: str, *, state: int, side: str, facts: Mapping[str, object] | None = None) -> Decision:
        """The move `name` by `side` from `state`: PermissionDenied (`<kind>-party`) for the wrong
        side, FailedPrecondition (`<kind>-state`, naming the current state) when the state does not
        allow it, whatever the guard raises when the facts (plus `state`) do not."""
        transition = self.transitions[name]
        if side != transition.side:
            label = self.side_labels.get(transition.side, transition.side)
            raise PermissionDenied(
                f"only the {label} organisation may {name} a {self.kind}", reason=f"{self.kind}-party"
            )
        if state == transition.target and not transition.self_loop:
            # The same move again (a retry): the item is already where it asked to go.
            return Decision(name, state, state, repeated=True)
        if state not in transition.sources:
            raise FailedPrecondition(
                f"a {self.kind} in state {self.state_name(state)} cannot be moved by {name}",
                reason=f"{self.kind}-state",
            )
        if transition.guard is not None:
            transition.guard({**(facts or {}), "state": state})
        grant = transition.grant
        if grant is GrantEffect.REVOKE and state not in self.granted:
            grant = GrantEffect.NONE
        return Decision(
            name,
            state,
            state if transition.self_loop else transition.target,
            repeated=False,
            grant=grant,
            business_status=transition.business_status,
            clocks=transition.clocks,
        )

    def moves_from(self, state: int, side: str) -> list[str]:
        """The moves `side` may make from `state` (worklists show them)."""
        return [t.name for t in self.transitions.values() if t.side == side and state in t.sources]
