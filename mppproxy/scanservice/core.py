"""One scan, whatever brought the message: the SMTP handler, the HTTP
resource and the command line all hand a ``ScanRequest`` to a
``ScanRuntime`` and get a ``ScanOutcome`` back.

Stage: the post-DATA step of the edge without the pre-DATA checks and
without an action: the same ``scan.postdata.scan_and_decide`` the proxy
calls (parse, MIME guard, engines, ``verdict.decide`` with the policy's
virus_action and discard_score), and the outcome says what the proxy
*would* do and why.  Nothing is relayed or stored.  The message is judged
as the edge passes it on (``message.prepare_content``): our Received: on
top, the client's trust headers removed, a loop refused, so the same
octets get the same verdict (tests/test_scan_equivalence.py).

The policy is the one named in the request, else the one of the first
recipient's domain (as in the proxy while its policy engine runs; with
``policy.enabled`` off the proxy judges every message by "default"), else
"default".  In this mode a
policy always scans: its ``scan`` section is used with ``enabled`` forced
on, since scanning is the whole point of asking.

Construction does no I/O; ``start`` begins watching the engines of
``[scanners]`` (for ``/health``), ``stop`` ends it.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Callable, Iterable, Optional


from mppproxy.config.schema import ProxyConfig, spool_directory
from mppproxy.edge.context import resolve_hostname
from mppproxy.logsetup import Logger
from mppproxy.message import (HeaderBlockTooLarge, OutboundMessage, TooManyHops, header_rules,
                              prepare_content, trace_header)
from mppproxy.spool.spool import Spool
from mppproxy.results import Disposition, TransactionRecord
from mppproxy.policy.router import PolicyRouter
from mppproxy.scan.base import ScanInput
from mppproxy.scan.factory import PolicyScanning
from mppproxy.scan.health import HealthMonitor
from mppproxy.scan.postdata import scan_and_decide
from mppproxy.scan.runtime import ScanStage
from mppproxy.smtp.replies import Reply
from mppproxy.smtp.session import new_id
from mppproxy.templates import REFUSALS, make_renderer
from mppproxy.verdict import Verdict

log = Logger()

# The template of the verdict text (templates/replies/scan_result.txt).
RESULT_TEMPLATE = "scan_result"
# RFC 5321 4.2.1 / 4.2.3: the exchange succeeded, whatever the verdict; the
# verdict is in the text.  RFC 3463 2.0.0: other or undefined success.
SCANNED = (250, "2.0.0")
# A scanner could not answer and the policy tempfails (RFC 3463 4.3.0, as
# the proxy's own tempfail template).
NOT_SCANNED = REFUSALS["tempfail"]

# The exit status of ``mppproxy scan`` for each action.
EXIT_CODES = {Disposition.RELAY: 0, Disposition.TAG: 0, Disposition.REJECT: 1,
              Disposition.QUARANTINE: 1, Disposition.DISCARD: 1, Disposition.DELETE: 1,
              Disposition.TEMPFAIL: 2}


class UnknownPolicy(ValueError):
    """The request named a policy the configuration does not have."""


@dataclass(frozen=True)
class ScanRequest:
    """One message to scan and the facts that come with it.  ``chunks``
    yields the raw RFC 5322 message; ``policy`` empty: by the first
    recipient's domain; ``queue_id`` empty: a new one."""

    chunks: Callable[[], Iterable[bytes]]
    size: int
    client_ip: str = ""
    helo: str = ""
    sender: str = ""
    recipients: tuple[str, ...] = ()
    policy: str = ""
    queue_id: str = ""
    smtputf8: bool = False
    path: Optional[str] = None

    @classmethod
    def of_bytes(cls, data: bytes, **facts: Any) -> "ScanRequest":
        return cls(chunks=lambda: (data,), size=len(data), **facts)


@dataclass(frozen=True)
class ScannerOutcome:
    """What one scanner said: its (weighted) score, its rule names or
    reasons, and why it did not run ("" when it did)."""

    score: float = 0.0
    rules: tuple[str, ...] = ()
    # "kind: reason" (scan/base.py: down, timeout, over max_size, garbage,
    # not sent...) when the scanner was not consulted.
    skipped: str = ""


@dataclass(frozen=True)
class ScanOutcome:
    verdict: Verdict
    policy: str
    queue_id: str
    scanners: dict[str, ScannerOutcome] = field(default_factory=dict)
    # The engine's record (every result), for the transaction log line.
    record: Optional[TransactionRecord] = None

    @property
    def action(self) -> Disposition:
        return self.verdict.action

    @property
    def skipped(self) -> dict[str, str]:
        """Scanner -> "kind: reason" of each scanner not consulted."""
        return {name: s.skipped for name, s in self.scanners.items() if s.skipped}

    @property
    def refusal(self) -> str:
        """The reply template the proxy would refuse with ("malformed",
        "virus", "score"...); "" unless the action is reject or tempfail."""
        return self.verdict.template if self.verdict.action.refuses else ""

    def as_json(self) -> dict[str, Any]:
        """The verdict as the HTTP endpoint and ``--json`` give it."""
        return {
            "action": self.verdict.action,
            "score": _number(self.verdict.score),
            "reasons": list(self.verdict.reasons),
            "refusal": self.refusal,
            "policy": self.policy,
            "queue_id": self.queue_id,
            "scanners": {name: {"score": s.score, "rules": list(s.rules), "skipped": s.skipped}
                         for name, s in self.scanners.items()},
        }

    def as_text(self) -> str:
        """Plain text for the command line: one line for the verdict, one
        per scanner."""
        lines = [f"action: {self.verdict.action}", f"score: {_number(self.verdict.score):g}",
                 f"policy: {self.policy}", f"queue_id: {self.queue_id}"]
        if self.refusal:
            lines.append(f"refusal: {self.refusal}")
        if self.verdict.reasons:
            lines.append("reasons: " + "; ".join(self.verdict.reasons))
        for name, s in self.scanners.items():
            line = f"scanner {name}: score {_number(s.score):g}"
            if s.rules:
                line += ", rules " + ", ".join(s.rules)
            if s.skipped:
                line += f", skipped ({s.skipped})"
            lines.append(line)
        return "\n".join(lines)


def _number(score: float) -> float:
    """A score as shown: 2 places, and 0 rather than -0 (a negative weight
    or engine score that rounds to zero)."""
    return round(score, 2) + 0.0


def _printable(text: str) -> str:
    # Rules and reasons may quote the message (an attachment's file name):
    # no control character may reach a reply line or a terminal.
    return "".join(c if c.isprintable() else "?" for c in text)


class ScanRuntime:
    """The scanners of every policy of one configuration, for scanning on
    request.  A reload builds a new one."""

    def __init__(self, config: ProxyConfig, reactor: Any):
        self.config = config
        self.reactor = reactor
        # The proxy's scan stage with every policy's scanning forced on.
        self.stage = ScanStage(config, reactor, always=True)
        self.engines = self.stage.engines
        self.scanning: dict[str, PolicyScanning] = {}
        for name, built in self.stage.scanning.items():
            assert built is not None  # enabled is forced on
            self.scanning[name] = built
        # The one policy-by-domain routing, the pre-DATA engine's too.
        self.router = PolicyRouter(config.policies)
        self.renderer = make_renderer(config)
        # The name in our Received: and among the authserv-ids whose
        # Authentication-Results are removed, as at the edge.
        self.hostname = resolve_hostname(config)
        self.header_rules = header_rules(config.limits.max_hop_count, config.smtp.strip_headers,
                                         (self.hostname, *config.smtp.authserv_ids))

    # -- lifetime

    def start(self) -> None:
        """Watch the engines of ``[scanners]`` (their state for /health)."""
        self.stage.start()

    def stop(self) -> None:
        self.stage.stop()

    @property
    def health(self) -> Optional[HealthMonitor]:
        return self.stage.health

    # -- scanning

    def policy_for(self, recipients: Iterable[str]) -> str:
        """The policy of the first recipient's domain (the proxy's rule), else default."""
        return self.router.policy_for_recipients(recipients)

    async def scan(self, request: ScanRequest) -> ScanOutcome:
        """Scan one message; raises ``UnknownPolicy`` for a policy name the
        configuration lacks.  A scanner that fails is in the outcome (a
        tempfail verdict, or skipped), not an exception."""
        name = request.policy or self.policy_for(request.recipients)
        scanning = self.scanning.get(name)
        if scanning is None:
            raise UnknownPolicy(f"no policy {name!r} (known: {', '.join(sorted(self.scanning))})")
        queue_id = request.queue_id or new_id()
        record = TransactionRecord(policy=name)
        spool = Spool(self.config.limits.memory_spool_bytes, spool_directory(self.config))
        message: Optional[OutboundMessage] = None
        try:
            message = self._as_the_edge_passes_it(request, queue_id, spool)
            scan_input = ScanInput(
                chunks=message.chunks, size=message.size, client_ip=request.client_ip,
                helo=request.helo, sender=request.sender, recipients=request.recipients,
                queue_id=queue_id, policy=name, path=request.path, smtputf8=request.smtputf8)
            # The proxy's own post-DATA step (edge/handler.py calls it too).
            scanned = await scan_and_decide(scanning, scan_input, record,
                                            self.config.policies[name].scoring)
        except (TooManyHops, HeaderBlockTooLarge) as refused:
            # The edge refuses these before any scanner sees them.
            why = (f"mail loop: {refused}" if isinstance(refused, TooManyHops)
                   else "message header block too large")
            verdict = Verdict(Disposition.REJECT, reasons=(why,))
            log.info("scanned {queue_id} with policy {policy}: {action} ({why})",
                     queue_id=queue_id, policy=name, action=verdict.action, why=why)
            return ScanOutcome(verdict, name, queue_id, {}, record)
        finally:
            spool.close()
            if message is not None and message.spool is not spool:
                message.spool.close()
        verdict = replace(scanned.verdict,
                          reasons=tuple(_printable(r) for r in scanned.verdict.reasons))
        skipped = scanned.skipped
        scanners = {}
        for rec in record.recorded:
            if rec.check.startswith("scan:"):
                scanner = rec.check[5:]
                scanners[scanner] = ScannerOutcome(
                    _number(rec.result.score), tuple(_printable(r) for r in rec.result.reasons),
                    _printable(skipped.get(scanner, rec.skipped)))
        log.info("scanned {queue_id} with policy {policy}: {action}, score {score}",
                 queue_id=queue_id, policy=name, action=verdict.action, score=verdict.score,
                 reasons=list(verdict.reasons), scan_skipped=skipped)
        return ScanOutcome(verdict, name, queue_id, scanners, record)

    def _as_the_edge_passes_it(self, request: ScanRequest, queue_id: str,
                               spool: Spool) -> OutboundMessage:
        """The message as the edge would scan and relay it: copied into
        ``spool`` (memory, then a file past limits.memory_spool_bytes), our
        Received: on top, the fields the edge removes removed.  Raises
        ``TooManyHops`` and ``HeaderBlockTooLarge`` as the edge meets them."""
        for chunk in request.chunks():
            spool.write(chunk)
        proto = "UTF8ESMTP" if request.smtputf8 else "ESMTP"  # RFC 6531 3.7.3
        only = request.recipients[0] if len(request.recipients) == 1 else None
        prefix = trace_header(self.hostname, request.helo or "unknown",
                              request.client_ip or "unknown", proto, queue_id, only)
        message, _ = prepare_content(spool, prefix, self.header_rules,
                                     self.config.limits.memory_spool_bytes,
                                     spool_directory(self.config))
        return message

    # -- the SMTP reply

    def reply(self, outcome: ScanOutcome) -> Reply:
        """The reply to the end of DATA: 250 with the verdict rendered by
        ``scan_result.txt``, or 451 4.3.0 with it when the verdict is a
        tempfail (the client should try again, as with the proxy)."""
        v = outcome.verdict
        context = {
            "action": v.action, "score": _number(v.score), "policy": outcome.policy,
            "queue_id": outcome.queue_id, "reasons": list(v.reasons),
            "refusal": outcome.refusal,
            "scanners": [{"name": n, "score": s.score, "rules": list(s.rules),
                          "skipped": s.skipped} for n, s in outcome.scanners.items()],
            # "name (kind: reason)" of each scanner not consulted.
            "skipped": [f"{n} ({why})" for n, why in outcome.skipped.items()],
        }
        text = self.renderer.render_text(RESULT_TEMPLATE, context, outcome.policy)
        code, enhanced = NOT_SCANNED if v.action is Disposition.TEMPFAIL else SCANNED
        return Reply(code, enhanced, text)

    def health_status(self) -> dict[str, Any]:
        """The engines as the health monitor last saw them, for GET /health."""
        engines = {}
        status = self.health.status if self.health is not None else {}
        for name in self.engines:
            h = status.get(name)
            engines[name] = ({"up": None, "detail": "not checked yet"} if h is None else
                             {"up": h.up, "version": h.version,
                              "signatures_time": h.signatures_time, "detail": h.detail})
        down = [n for n, e in engines.items() if e["up"] is False]
        return {"status": "degraded" if down else "ok", "engines": engines,
                "policies": sorted(self.scanning)}
