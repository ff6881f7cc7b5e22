"""Enumerated states with a transition table (docs/design.md, "Floors": ground).

The backend client, the lockstep relay, the backend pool and the state
database each name their states in a ``StateEnum`` and list the moves they
allow in a table, ``{state: frozenset of next states}``, checked by one
``_move_to`` method per class.  A move the table does not allow raises
``TransitionError``: an event in an unexpected state is a loud error
(a 451 and a log line on the session's path), never a silent no-op.
"""
from __future__ import annotations

import enum
from typing import Mapping, TypeVar

_S = TypeVar("_S", bound="StateEnum")


class StateEnum(enum.Enum):
    """An ``Enum`` whose members hash by identity.  ``Enum.__hash__`` is
    Python code (the hash of the member's name); a table lookup per move
    would pay a Python call for it.  Members compare by identity anyway."""

    __hash__ = object.__hash__


class TransitionError(RuntimeError):
    """A move its object's transition table does not allow."""

    def __init__(self, owner: object, old: StateEnum, new: StateEnum):
        super().__init__(f"{type(owner).__name__}: {old.name} -> {new.name} is not allowed")
        self.old = old
        self.new = new


def unreachable(table: Mapping[_S, frozenset[_S]], start: _S) -> set[_S]:
    """The states ``table`` cannot reach from ``start`` (tests: a table with
    a state nothing leads to has a mistake in it)."""
    seen = {start}
    todo = [start]
    while todo:
        for nxt in table[todo.pop()]:
            if nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    return set(type(start)) - seen
