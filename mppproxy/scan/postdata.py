"""The post-DATA step, one for every mode that scans: parse, guard,
engines, decide, result headers.

Stage: after the spool, before the action.  The edge and all-in-one
proxy (``edge/handler.py``) and scan mode (``scanservice/core.py``) both call
``scan_and_decide``, so a message gets the same verdict whichever of them
judged it; what differs is only what follows (relay, hold, refuse, or the
verdict as text).  Both scan the same octets: the message as the edge
passes it on (our Received: on top, the client's trust headers removed;
``message.prepare_content``), and ``tests/test_scan_equivalence.py``
shows one verdict for each message of the mixed and hostile corpora.  The
pre-DATA results come in ``record`` (scan mode has none) and the scanners'
results are added to it.

1. The message is parsed once, within bounds (``scan/mime.py``); every
   scanner reads that parse.
2. The MIME check runs first and guards the engines: a message it refuses
   never reaches clamd, spamd, rspamd or a command (``scan/engine.py``).
3. The engines and the message rules run at once; each one that was not
   consulted is listed, with why, in ``report.skipped``.
4. ``verdict.decide`` turns the sum and the hard hits into one action, with
   the policy's ``virus_action``, ``discard_score`` and per-engine
   actions (``engine_actions``).
   The pre-DATA SPF check's findings go along (``ScanInput.spf``) for
   DMARC, and when the authentication scanner (DKIM, DMARC) wrote an
   Authentication-Results field, the SPF check's own field is dropped: the
   one field carries SPF, DKIM and DMARC.
5. An accepted message gets the result headers: ``X-MPP-Scan`` and
   ``X-MPP-Scan-Rules`` when ``result_headers`` is on, and
   ``X-MPP-Scan-Skipped`` whenever a scanner was not consulted.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from mppproxy.config.policy import ScoringConfig
from mppproxy.results import Disposition, TransactionRecord
from mppproxy.scan.base import ScanInput
from mppproxy.scan.engine import ScanReport
from mppproxy.scan.factory import PolicyScanning
from mppproxy.verdict import Verdict, decide, result_headers, skipped_headers

AUTH_RESULTS = "Authentication-Results"

# The actions under which the message goes on (or is kept), so the result
# headers travel with it.
ACCEPTED = (Disposition.RELAY, Disposition.TAG, Disposition.QUARANTINE, Disposition.DISCARD,
            Disposition.DELETE)


@dataclass(frozen=True)
class PostData:
    """The verdict on one message and the scan report it came from."""

    verdict: Verdict
    report: ScanReport

    @property
    def skipped(self) -> dict[str, str]:
        """Scanner -> "kind: reason", for the transaction log's ``scan_skipped``."""
        return dict(self.report.skipped)


async def scan_and_decide(scanning: PolicyScanning, message: ScanInput, record: TransactionRecord,
                          scoring: ScoringConfig) -> PostData:
    """Scan ``message`` with ``scanning`` (a ``scan.factory.PolicyScanning``)
    and decide on it against ``scoring``; see the module docstring."""
    spf = record.once.get("spf")
    message = replace(message, parsed=await scanning.mime.parse(message),
                      spf=spf.facts if spf is not None else ())
    report = await scanning.engine.scan(message, record)
    if any(name == AUTH_RESULTS for name, _ in report.headers):
        # The authentication scanner wrote the one Authentication-Results
        # field, SPF in it: the SPF check's own field goes (RFC 8601 allows
        # several, but one per authserv-id is what readers expect).
        record.headers[:] = [h for h in record.headers if h[0] != AUTH_RESULTS]
    config = scanning.config
    verdict = decide(record, scoring, report, config.virus_action, config.discard_score,
                     config.engine_actions)
    if verdict.action in ACCEPTED:
        extra = result_headers(verdict, report) if config.result_headers else skipped_headers(report)
        verdict = replace(verdict, headers=verdict.headers + extra)
    return PostData(verdict, report)
