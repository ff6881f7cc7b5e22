"""DNS list health: whether each DNS list answered this process's lookups
lately, for the dashboard (issue 13) and, later, the metrics (issue 16).

Stage: policy, beside the ``dnsbl`` check, which notes every list's
outcome here (``note``: a dict write per list and lookup; nothing is
asked for it).  A list is "down" once its last ``DOWN_AFTER`` lookups all
failed (a timeout, SERVFAIL, a list's error answer): one lost UDP answer
on a busy node is not an outage.  The first answer after that makes it
"up" again.  ``reports`` gives what ``db/nodehealth.py`` stores.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from mppproxy.db.nodehealth import DNS_LIST, HealthReport

# Consecutive failed lookups after which a list counts as down.
DOWN_AFTER = 3


@dataclass(slots=True)
class _ListState:
    failures: int = 0  # consecutive
    answered: int = 0
    failed: int = 0
    error: str = ""  # the last failure's


class DnsListHealth:
    """Per list name: consecutive failures, the last error, and lookups
    answered and failed since the process started."""

    def __init__(self) -> None:
        self._lists: dict[str, _ListState] = {}

    def note(self, name: str, error: Optional[str]) -> None:
        """One lookup of list ``name``: ``error`` None when it answered
        (listed or not), else why it could not."""
        state = self._lists.get(name)
        if state is None:
            state = self._lists[name] = _ListState()
        if error is None:
            state.failures = 0
            state.answered += 1
        else:
            state.failures += 1
            state.failed += 1
            state.error = error

    def is_down(self, name: str) -> bool:
        state = self._lists.get(name)
        return state is not None and state.failures >= DOWN_AFTER

    def reports(self) -> list[HealthReport]:
        """A report per list asked so far, by name."""
        out = []
        for name in sorted(self._lists):
            s = self._lists[name]
            down = s.failures >= DOWN_AFTER
            if down:
                detail = f"last {s.failures} lookups failed ({s.error})"
            else:
                detail = f"{s.answered} answered, {s.failed} failed" + (
                    f" (last failure: {s.error})" if s.error else "")
            out.append(HealthReport(DNS_LIST, name, not down, detail=detail))
        return out
