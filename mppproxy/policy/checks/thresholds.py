"""Message and spam-verdict rates per client with auto-blacklisting."""
from __future__ import annotations

from mppproxy.logsetup import Logger
from mppproxy.policy.base import Check, Facts, Scope
from mppproxy.results import MISS, CheckResult, HardAction
from mppproxy.policy.counters import client_key

log = Logger()


class ThresholdsCheck(Check):
    """Counts one message per transaction from the client (or its /24,
    /64 ... as configured).  Going past ``max_messages`` in ``period``
    blacklists the client for ``blacklist_seconds``; spam verdicts are
    counted by ``RateCounters.add_spam`` (post-DATA) against ``max_spam``
    the same way."""

    name = "thresholds"
    scope = Scope.TRANSACTION

    async def check(self, facts: Facts) -> CheckResult:
        s = self.settings
        counters = self.services.counters
        key = client_key(facts.client_ip, s.ipv4_prefix, s.ipv6_prefix)
        if key is None or counters is None:
            return MISS
        # shared: every process's and node's counts (policy/sharedcounters.py).
        messages = counters.add_message(key, facts.policy, s.period, shared=s.shared)
        spam = counters.spam_count(key, facts.policy, s.period, shared=s.shared)
        why = None
        if s.max_messages and messages > s.max_messages:
            why = f"threshold messages {messages} in {s.period:g}s"
        elif s.max_spam and spam > s.max_spam:
            why = f"threshold spam {spam} in {s.period:g}s"
        if why is None:
            return MISS
        if self.services.blacklist is not None:
            await self.services.blacklist.add(key, s.blacklist_seconds, why)
        log.info("client {network} blacklisted for {seconds}s: {why}", network=key, why=why,
                 seconds=s.blacklist_seconds, client=facts.client_ip,
                 session_id=facts.session_id, queue_id=facts.queue_id)
        return CheckResult(reasons=(why,), action=HardAction.REJECT, template="blacklist",
                           template_vars=(("reason", "too much mail"),), blacklisted=True)
