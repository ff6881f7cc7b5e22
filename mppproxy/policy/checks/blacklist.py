"""The shared auto-blacklist, written by spam traps and thresholds."""
from __future__ import annotations

from mppproxy.policy.base import Check, Facts, Scope
from mppproxy.results import MISS, CheckResult, HardAction


class BlacklistCheck(Check):
    name = "blacklist"
    scope = Scope.TRANSACTION

    async def check(self, facts: Facts) -> CheckResult:
        store = self.services.blacklist
        if store is None:
            raise RuntimeError("no blacklist store configured")
        entry = await store.lookup(facts.client_ip)
        if entry is None:
            return MISS
        return CheckResult(reasons=(f"auto-blacklisted ({entry.reason})",), action=HardAction.REJECT,
                           template="blacklist",
                           template_vars=(("reason", _public_reason(entry.reason)),))


def _public_reason(reason: str) -> str:
    # Never tell a spammer which address was the trap.
    if reason.startswith("spamtrap"):
        return "policy violation"
    if reason.startswith("threshold"):
        return "too much mail"
    return "policy violation"
