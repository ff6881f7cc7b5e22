"""Greylisting (RFC 6647) of (client network, sender, recipient)."""
from __future__ import annotations

from typing import Any

from mppproxy.policy.base import Check, Facts, Scope
from mppproxy.results import MISS, CheckResult, HardAction
from mppproxy.policy.counters import client_key

# Shared "retry in N s" results kept at most (a delay of hours has more Ns).
_MAX_SHARED = 4096


class GreylistCheck(Check):
    """The store (``mppproxy.db.greylist``) keeps the triplets in SQL with
    an in-process cache; a client network that passed often enough is
    auto-whitelisted there.  First sight or too early: 451 4.7.1."""

    name = "greylisting"
    scope = Scope.RECIPIENT

    def __init__(self, settings: Any, services: Any):
        super().__init__(settings, services)
        # The result for each "retry in N s": most answers are these, and a
        # CheckResult is immutable, so one per N is shared (at most
        # ``delay`` of them; a reload builds a new check).
        self._waits: dict[int, CheckResult] = {}

    async def check(self, facts: Facts) -> CheckResult:
        store = self.services.greylist
        if store is None:
            raise RuntimeError("no greylist store configured")
        s = self.settings
        network = client_key(facts.client_ip, s.ipv4_prefix, s.ipv6_prefix)
        if network is None:
            return MISS
        wait = await store.check(network, facts.sender.lower(), facts.recipient.lower(), s)
        if wait is None:
            return MISS
        seconds = max(1, int(wait + 0.999))
        result = self._waits.get(seconds)
        if result is None:
            if len(self._waits) >= _MAX_SHARED:
                self._waits.clear()
            result = self._waits[seconds] = CheckResult(
                reasons=(f"greylisted, retry in {seconds}s",), action=HardAction.TEMPFAIL,
                template="greylist", template_vars=(("retry_seconds", seconds),))
        return result
