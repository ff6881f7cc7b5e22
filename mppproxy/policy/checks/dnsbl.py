"""DNS block lists (RBL and RHSBL), each listing worth its score."""
from __future__ import annotations

from mppproxy.logsetup import Logger
from mppproxy.policy.dnsbl import lookup_all
from mppproxy.policy.base import Check, Facts, Scope
from mppproxy.results import MISS, CheckResult
from mppproxy.match import parse_ip

log = Logger()


class DnsblCheck(Check):
    """All lists are asked at once (``policy/dnsbl.py``: ``lookup_all``); a list
    that times out or fails scores nothing and is logged, never blocking
    mail by itself.  The score goes to the engine's sum; rejecting is the
    scoring thresholds' job."""

    name = "dnsbl"
    scope = Scope.TRANSACTION

    async def check(self, facts: Facts) -> CheckResult:
        resolver = self.services.resolver
        if resolver is None:
            raise RuntimeError("no DNS resolver configured")
        s = self.settings
        domains = []
        if s.check_sender_domain and facts.sender_domain:
            domains.append(facts.sender_domain)
        if s.check_helo and facts.helo:
            domains.append(facts.helo)
        ip = parse_ip(facts.client_ip)
        # A list that lists everything or stopped answering is left out
        # until its canaries pass again (policy/dnsguard.py).
        guard = self.services.dns_guard
        lists = guard.active(s.lists) if guard is not None else list(s.lists)
        if not lists:
            return MISS
        results = await lookup_all(resolver, lists, ip, domains)
        score = 0.0
        reasons = []
        health = self.services.dns_health
        for r in results:
            health.note(r.name, r.error)
            if guard is not None:
                guard.note(r)
            if r.error is not None:
                log.warn("DNS list {dnsbl} could not answer for {client}: {error}",
                         dnsbl=r.name, client=facts.client_ip, error=r.error,
                         session_id=facts.session_id, queue_id=facts.queue_id)
            if r.listed:
                score += r.score
                reasons.append(f"listed in {r.name}")
        if not reasons:
            return MISS
        return CheckResult(score=score, reasons=tuple(reasons))
