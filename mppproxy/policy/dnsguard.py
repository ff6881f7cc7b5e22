"""The DNS-list health guard: a list that starts answering "listed" for
everything, or stops answering, stops contributing to the score, loudly,
until it answers sanely again (issue 14, "What no peer has").

Stage: policy, beside the ``dnsbl`` check (``checks/dnsbl.py`` asks
``active`` which lists to use and ``note``s each result).  Lists have died
this way before: when a list shuts down, its operators have made the zone
answer 127.0.0.2 for every name (every client "listed", all mail refused
by sites that reject on it), or let it time out (every session waiting
``dns.timeout`` for nothing).

Two signals, per list and per process:

* Canaries (RFC 5782 section 5): every ``dns.list_check_interval`` seconds
  the guard asks each list it has seen used about the entries every list
  must answer the same way: an IP list must not list 127.0.0.1 and must
  list 127.0.0.2 (its ``test_entry`` when it uses another); a domain list
  must not list ``invalid`` and must list ``test``.  127.0.0.1 listed: the
  list lists everything, suspended.  The test entry not listed: the list
  no longer answers, suspended.  A canary that gets no answer: suspended
  until one comes.
* Traffic: ``DOWN_AFTER`` lookups in a row that got no answer (timeouts,
  SERVFAIL) suspend the list at once, without waiting for the next canary
  round; a long run of listings in a row only brings the canary round
  forward (a spam wave is not a broken list).

A suspended list is not asked (no wait, no score) and is checked every
``SUSPENDED_RETRY`` seconds; when its canaries are sane again it is used
again.  Each change is one log line: error when a list is suspended,
warning when it is back.  ``states`` gives the dashboard and metrics each
list's state.
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Optional

from twisted.internet import defer, task

from mppproxy._async import as_deferred
from mppproxy.config.dnsbl import DnsblList
from mppproxy.logsetup import Logger
from mppproxy.policy.dnsbl import DnsblResult, check_subject_raw
from mppproxy.policy.dnshealth import DOWN_AFTER

log = Logger()

# RFC 5782 section 5: the entries every IP and domain list must (not) list.
IP_MUST_NOT = "1.0.0.127"    # 127.0.0.1, reversed
IP_MUST = "127.0.0.2"
DOMAIN_MUST_NOT = "invalid"
DOMAIN_MUST = "test"
# Seconds between checks of a suspended list.
SUSPENDED_RETRY = 60.0
# Listings in a row that bring the next canary round forward.
LISTED_STREAK = 100


@dataclass
class ListState:
    """What the guard knows of one list."""

    dnsbl: DnsblList
    suspended: Optional[str] = None
    since: float = 0.0
    failures: int = 0
    listed_streak: int = 0
    # When its last canary round began (reactor time); never: -inf.
    checked: float = float("-inf")


def _reverse(ip: str) -> str:
    return ".".join(reversed(ip.split(".")))


class DnsListGuard:
    """The lists' health in one process.  ``resolver`` is called for the
    resolver of the moment (a reload may replace it)."""

    def __init__(self, reactor: Any, resolver: Callable[[], Any], interval: float = 300.0):
        self.reactor = reactor
        self.resolver = resolver
        self.interval = interval
        self._lists: dict[tuple[str, str], ListState] = {}
        self._loop: Optional[task.LoopingCall] = None
        self._running: Any = None
        self._waiters: list[defer.Deferred[None]] = []

    # -- the check's side ---------------------------------------------------------------

    def active(self, lists: Iterable[DnsblList]) -> list[DnsblList]:
        """The lists to ask now: the suspended ones left out.  Also makes
        the guard watch every list it is shown (the first call starts the
        canary rounds)."""
        out = []
        new = False
        for dnsbl in lists:
            state = self._lists.get((dnsbl.zone, dnsbl.kind))
            if state is None:
                state = self._lists[(dnsbl.zone, dnsbl.kind)] = ListState(dnsbl)
                new = True
            if state.suspended is None:
                out.append(dnsbl)
        if new:
            if self._loop is None:
                self._ensure_running()
            else:
                self._tick()  # a list seen for the first time is checked now
        return out

    def note(self, result: DnsblResult) -> None:
        """One lookup's outcome, from the live traffic."""
        state = self._lists.get((result.dnsbl.zone, result.dnsbl.kind))
        if state is None or state.suspended is not None:
            return
        if result.error in ("timeout", "servfail", "refused", "network", "closed"):
            state.failures += 1
            if state.failures >= DOWN_AFTER:
                self._suspend(state, f"{state.failures} lookups in a row got no answer "
                              f"({result.error})")
            return
        state.failures = 0
        if result.listed:
            state.listed_streak += 1
            if state.listed_streak >= LISTED_STREAK:
                state.listed_streak = 0
                self._check_soon()
        else:
            state.listed_streak = 0

    def suspended(self, dnsbl: DnsblList) -> Optional[str]:
        state = self._lists.get((dnsbl.zone, dnsbl.kind))
        return state.suspended if state is not None else None

    def states(self) -> list[ListState]:
        return [self._lists[k] for k in sorted(self._lists)]

    # -- canary rounds --------------------------------------------------------------------

    def _ensure_running(self) -> None:
        if self._loop is not None or self.interval <= 0:
            return
        self._loop = task.LoopingCall(self._tick)
        self._loop.clock = self.reactor
        # Every few seconds: each list is due on its own clock (interval, or
        # SUSPENDED_RETRY while suspended); the first round runs at once.
        self._loop.start(min(5.0, self.interval, SUSPENDED_RETRY), now=True)

    def _check_soon(self) -> None:
        for state in self._lists.values():
            state.checked = float("-inf")

    def _tick(self) -> None:
        if self._running is not None:
            return  # the last round is still waiting for answers
        now = float(self.reactor.seconds())
        due = [s for s in self._lists.values()
               if now - s.checked >= (SUSPENDED_RETRY if s.suspended else self.interval)]
        if not due:
            return
        for state in due:
            state.checked = now
        self._running = as_deferred(self.check(due))
        self._running.addErrback(lambda f: log.failure("DNS list canary round failed", f))
        self._running.addBoth(self._round_done)

    def _round_done(self, _: object) -> None:
        self._running = None
        waiters, self._waiters = self._waiters, []
        for d in waiters:
            d.callback(None)

    def idle(self) -> "defer.Deferred[None]":
        """Fires once no canary round is running (at once when none is)."""
        if self._running is None:
            return defer.succeed(None)
        d: defer.Deferred[None] = defer.Deferred()
        self._waiters.append(d)
        return d

    async def check(self, states: Iterable[ListState]) -> None:
        """One canary round over ``states``: suspend or restore each."""
        for state in states:
            problem = await self.canary_problem(state.dnsbl)
            if problem is None:
                state.failures = 0
                if state.suspended is not None:
                    log.warn("DNS list {dnsbl} answers sanely again (its canaries pass); "
                             "used again after {seconds:.0f} s suspended: {why}",
                             dnsbl=state.dnsbl.name, why=state.suspended,
                             seconds=time.time() - state.since)
                    state.suspended = None
            elif state.suspended is None:
                self._suspend(state, problem)

    async def canary_problem(self, dnsbl: DnsblList) -> Optional[str]:
        """Why ``dnsbl`` fails its canaries, or None when it passes them."""
        resolver = self.resolver()
        if resolver is None:
            return None
        # Every answer in 127.0.0.0/8 counts for the canaries, whatever the
        # codes the policy keeps (a test entry may answer another code).
        plain = dataclasses.replace(dnsbl, codes=())
        if dnsbl.kind == "ip":
            must_not, must = IP_MUST_NOT, _reverse(dnsbl.test_entry or IP_MUST)
            shown_not, shown = "127.0.0.1", dnsbl.test_entry or IP_MUST
        else:
            must_not, must = DOMAIN_MUST_NOT, dnsbl.test_entry or DOMAIN_MUST
            shown_not, shown = DOMAIN_MUST_NOT, must
        codes, error = await check_subject_raw(resolver, plain, must_not)
        if error is not None:
            return f"its canary {shown_not} got no answer ({error})"
        if codes:
            return (f"it lists {shown_not}, which no list may list (RFC 5782 section 5): it "
                    f"answers 'listed' for everything ({', '.join(codes)})")
        if not dnsbl.check_test_entry:
            return None
        codes, error = await check_subject_raw(resolver, plain, must)
        if error is not None:
            return f"its test entry {shown} got no answer ({error})"
        if not codes:
            return (f"its test entry {shown} is not listed (RFC 5782 section 5): the list no "
                    "longer answers")
        return None

    def _suspend(self, state: ListState, why: str) -> None:
        state.suspended = why
        state.since = time.time()
        state.failures = 0
        state.checked = float(self.reactor.seconds())
        log.error("DNS list {dnsbl} suspended: {why}; it scores nothing until its canaries "
                  "pass again (checked every {retry:.0f} s)", dnsbl=state.dnsbl.name, why=why,
                  retry=SUSPENDED_RETRY)

    def stop(self) -> None:
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        self._loop = None
