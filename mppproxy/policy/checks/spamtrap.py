"""Spam traps: recipients no honest sender writes to."""
from __future__ import annotations

import re
from typing import Any

from mppproxy.logsetup import Logger
from mppproxy.policy.base import Check, Facts, Scope
from mppproxy.results import MISS, CheckResult, HardAction
from mppproxy.match import parse_ip

log = Logger()


class SpamtrapCheck(Check):
    """A recipient matching a trap pattern is refused and the client is put
    on the shared blacklist for ``blacklist_seconds``: the ``blacklist``
    check then refuses its other recipients, and the edge refuses a
    message whose client was listed while its transaction was open."""

    name = "spamtrap"
    scope = Scope.RECIPIENT

    def __init__(self, settings: Any, services: Any):
        super().__init__(settings, services)
        self._patterns = [re.compile(p, re.IGNORECASE) for p in settings.patterns]

    async def check(self, facts: Facts) -> CheckResult:
        if not facts.recipient:
            return MISS
        for pattern in self._patterns:
            if pattern.search(facts.recipient):
                break
        else:
            return MISS
        ip = parse_ip(facts.client_ip)
        if ip is not None and self.services.blacklist is not None:
            network = f"{ip}/{ip.max_prefixlen}"
            await self.services.blacklist.add(network, self.settings.blacklist_seconds,
                                              f"spamtrap {facts.recipient}")
            log.info("spam trap {recipient} hit by {client}: blacklisted for {seconds}s",
                     recipient=facts.recipient, client=facts.client_ip,
                     seconds=self.settings.blacklist_seconds, session_id=facts.session_id,
                     queue_id=facts.queue_id)
        return CheckResult(reasons=("spam trap",), action=HardAction.REJECT, template="spamtrap",
                           blacklisted=True)
