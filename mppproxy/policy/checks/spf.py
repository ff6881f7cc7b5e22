"""SPF (RFC 7208) of the MAIL FROM domain, or of the HELO for bounces."""
from __future__ import annotations

from typing import Any

from mppproxy.logsetup import Logger
from mppproxy.policy.base import Check, Facts, Scope
from mppproxy.results import CheckResult, HardAction

log = Logger()


class SpfCheck(Check):
    """Scores each SPF result as the policy says and adds an
    Authentication-Results header (RFC 8601 section 2.7.2) to relayed mail.
    ``reject_fail`` refuses a fail with 550 5.7.23 (RFC 7372 section 3.2)."""

    name = "spf"
    scope = Scope.TRANSACTION

    async def check(self, facts: Facts) -> CheckResult:
        evaluator = self.services.spf
        if evaluator is None:
            raise RuntimeError("no SPF evaluator configured")
        s = self.settings
        # RFC 7208 2.4: the null sender is checked as postmaster@HELO.
        domain = facts.sender_domain or facts.helo
        identity = "mailfrom" if facts.sender_domain else "helo"
        sender = facts.sender or f"postmaster@{facts.helo}"
        result = await evaluator.check_host(facts.client_ip, domain, sender, facts.helo)
        if result.result in ("permerror", "temperror"):
            # The reason is for the operator, not the score: the engine's
            # summary line has only "SPF permerror".
            log.info("SPF {result} for {domain} from {client}: {problem}", result=result.result,
                     domain=domain, client=facts.client_ip,
                     problem=getattr(result, "problem", ""), session_id=facts.session_id,
                     queue_id=facts.queue_id)
        score = float(getattr(s, f"score_{result.result}", 0.0))
        reasons = (f"SPF {result.result}",)
        headers: tuple[tuple[str, str], ...] = ()
        if s.add_header:
            headers = (("Authentication-Results", authentication_results(
                self.services.hostname, result.result, identity, sender, facts.client_ip,
                facts.helo)),)
        action = None
        template = ""
        vars_: tuple[tuple[str, Any], ...] = ()
        if result.result == "fail" and s.reject_fail:
            action, template = HardAction.REJECT, "spf"
            # RFC 7208 8.4: the reply may carry the domain's explanation;
            # the domain checked is the HELO name for the null sender.
            vars_ = (("sender_domain", domain), ("explanation", result.explanation))
        elif result.result == "temperror" and s.tempfail_on_temperror:
            action, template = HardAction.TEMPFAIL, "spf_temperror"
        # DMARC (after DATA) aligns the domain SPF checked with From:'s and
        # writes SPF into its one Authentication-Results field.
        found = (("result", result.result), ("domain", domain), ("identity", identity),
                 ("sender", sender), ("client_ip", facts.client_ip), ("helo", facts.helo))
        return CheckResult(score=score, reasons=reasons, action=action, template=template,
                           template_vars=vars_, headers=headers, facts=found)


def authentication_results(authserv_id: str, result: str, identity: str, sender: str,
                           client_ip: str, helo: str) -> str:
    """RFC 8601 section 2.2 / RFC 7208 section 9.1: method spf, property
    smtp.mailfrom (or smtp.helo for the null sender)."""
    prop = f"smtp.mailfrom={_value(sender)}" if identity == "mailfrom" else f"smtp.helo={_value(helo)}"
    return f"{authserv_id}; spf={result} ({_comment(client_ip)}) {prop}"


def _value(text: str) -> str:
    # RFC 8601 "value" is a token or a quoted-string; addresses with
    # specials are quoted, quotes and backslashes escaped.
    safe = "".join(c for c in text if c.isprintable())
    if safe and all(c.isalnum() or c in "@.-_+=" for c in safe):
        return safe
    return '"' + safe.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _comment(client_ip: str) -> str:
    return "client " + "".join(c for c in client_ip if c.isalnum() or c in ".:")
