"""The metrics on the hot path: what every transaction, check and engine
call adds, through the hooks the stages already call.

Composition floor.  Three hooks, registered by ``install`` and removed by
``uninstall``, so a node with metrics off pays one empty-list test each:

* ``db/traffic.py``'s tallies: each counted transaction as (what, reason),
  the same classification as the dashboard's hourly counts;
* ``txlog.observers``: the refusals of the transaction (per recipient
  before DATA, per message after it);
* ``probes.py``: checks that waited and scanner calls, with their time.

The label children are bound once per label set and kept in a dict, so a
transaction costs one dict lookup and one increment of a shared-memory
value, with no label dict built.
"""
from __future__ import annotations

from typing import Any, Callable, Optional

from mppproxy import probes, txlog
from mppproxy.db import traffic
from mppproxy.metrics.registry import Metrics
from mppproxy.results import Disposition
from mppproxy.smtp.replies import Reply
from mppproxy.smtp.session import Transaction

_REJECT, _TEMPFAIL = Disposition.REJECT, Disposition.TEMPFAIL


def _reply_class(reply: Optional[Reply]) -> str:
    # RFC 5321 4.2.1: the first digit says transient (4) or permanent (5).
    return "4xx" if reply is not None and 400 <= reply.code < 500 else "5xx"


class HotPath:
    """The increments of one process, hooked into the stages."""

    def __init__(self, metrics: Metrics):
        self.metrics = metrics
        self._transactions: dict[tuple[str, str], Callable[[], None]] = {}
        self._refusals: dict[tuple[str, str, str], Callable[[], None]] = {}
        self._checks: dict[str, Callable[[float], None]] = {}
        self._engines: dict[str, Callable[[float], None]] = {}
        self._errors: dict[tuple[str, str], Callable[[], None]] = {}
        self._engine_errors: dict[tuple[str, str], Callable[[], None]] = {}

    def install(self) -> None:
        traffic.add_tally(self.tally)
        if self.observe not in txlog.observers:
            txlog.observers.append(self.observe)
        if self.check_done not in probes.check_timers:
            probes.check_timers.append(self.check_done)
        if self.engine_done not in probes.engine_timers:
            probes.engine_timers.append(self.engine_done)

    def uninstall(self) -> None:
        traffic.remove_tally(self.tally)
        for hooks, hook in ((txlog.observers, self.observe),
                            (probes.check_timers, self.check_done),
                            (probes.engine_timers, self.engine_done)):
            if hook in hooks:
                hooks.remove(hook)  # type: ignore[arg-type]  # a bound method of ours

    # -- per transaction -----------------------------------------------------------------

    def tally(self, what: traffic.Counted, reason: str) -> None:
        """One counted transaction (a ``traffic`` tally)."""
        inc = self._transactions.get((what, reason))
        if inc is None:
            inc = self._transactions[(what, reason)] = self.metrics.transactions.labels(
                what.value, reason).inc
        inc()

    def observe(self, txn: Transaction, action: Disposition, reply: Optional[Reply],
                decided_by: Optional[str], timings: dict[str, Any]) -> None:
        """The refusals of one logged transaction (a ``txlog`` observer)."""
        refusals = txn.refusals
        if refusals:
            for _, by, refusal in refusals:
                self._refusal(by, "rcpt", _reply_class(refusal))
        if action is _REJECT or action is _TEMPFAIL:
            self._refusal(traffic.reason_key(decided_by) or "-", "data", _reply_class(reply))

    def _refusal(self, check: str, stage: str, reply: str) -> None:
        key = (check, stage, reply)
        inc = self._refusals.get(key)
        if inc is None:
            inc = self._refusals[key] = self.metrics.refusals.labels(check, stage, reply).inc
        inc()

    # -- per check and engine call ---------------------------------------------------------

    def check_done(self, name: str, seconds: float, outcome: str) -> None:
        observe = self._checks.get(name)
        if observe is None:
            observe = self._checks[name] = self.metrics.check_seconds.labels(name).observe
        observe(seconds)
        if outcome != "ok":
            key = (name, outcome)
            inc = self._errors.get(key)
            if inc is None:
                inc = self._errors[key] = self.metrics.check_errors.labels(name, outcome).inc
            inc()

    def engine_done(self, name: str, seconds: float, outcome: str) -> None:
        observe = self._engines.get(name)
        if observe is None:
            observe = self._engines[name] = self.metrics.engine_seconds.labels(name).observe
        observe(seconds)
        if outcome != "ok":
            key = (name, outcome)
            inc = self._engine_errors.get(key)
            if inc is None:
                inc = self._engine_errors[key] = self.metrics.engine_errors.labels(
                    name, outcome).inc
            inc()
