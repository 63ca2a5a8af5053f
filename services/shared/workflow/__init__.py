"""The workflow engine referral and teleconsultation share.

- `machine`: the pure transition table (states, moves, sides, guards, consent-grant effect,
  business status, clock effects) and the decision of one move; no I/O.
- `engine`: applies a decided move once — compare-and-set on the item's version, history row,
  grant message, audit event, clocks and the other side's notification in one transaction.
- `clocks`: the deadline scanner that fires each breached clock exactly once.
- `service`: what a workflow servicer does around the engine — a write once per
  Idempotency-Key (`KeyedWrites`: moves, creates, directory writes), a move's answer built and
  kept in its transaction (`MoveAnswer`), the attached documents' check, the statistics scope,
  the one-move RPCs of the first API (`one_move_rpc`) and protobuf timestamps.

Each service keeps only its transition table and the mapping of its rows onto `engine.Subject`.
"""

from __future__ import annotations

from typing import Any

# The engine (and scanner) of each running service, so operators' tools and tests reach the one
# a service runs (e.g. to give it a controllable time source). Keyed by the runtime's identity.
_ATTACHED: dict[int, Any] = {}


def attach(runtime: object, component: Any) -> None:
    """Remember the workflow component (e.g. a service's servicer) of a runtime."""
    _ATTACHED[id(runtime)] = component


def attached(runtime: object) -> Any:
    """The workflow component attached to `runtime`."""
    return _ATTACHED[id(runtime)]
