"""Greylisting (RFC 6647) of (client network, sender, recipient)."""
from __future__ import annotations

from mppproxy.policy.base import Action, Check, CheckResult, Facts, MISS, Scope
from mppproxy.policy.counters import client_key


class GreylistCheck(Check):
    """The store (``mppproxy.db.greylist``) keeps the triplets in SQL with
    an in-process cache; a client network that passed often enough is
    auto-whitelisted there.  First sight or too early: 451 4.7.1."""

    name = "greylisting"
    scope = Scope.RECIPIENT

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
        return CheckResult(reasons=(f"greylisted, retry in {seconds}s",), action=Action.TEMPFAIL,
                           template="greylist", template_vars=(("retry_seconds", seconds),))
