"""The contract every post-DATA scanner keeps (STYLE.md, docs/design.md).

A scanner is a small object with a ``name`` and one ``async`` method that
takes the ``ScanInput`` of one message and returns the same frozen
``CheckResult`` the pre-DATA checks return (``mppproxy/results.py``, the
ground floor both stages stand on; docs/design.md, "Floors"): a
score, reasons (rule names, signature names), and optionally a hard action.
The scan engine runs the scanners of a policy concurrently, applies each
one's weight, timeout and failure action, and adds the scores to the
pre-DATA score; the verdict turns the sum into one action.

A scanner that cannot answer (engine down, timeout, garbage) raises
``ScannerUnavailable`` with a reason; it never returns a clean result it
did not get (docs/design.md promise 4: failures are loud and safe).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Iterator, Optional

from mppproxy.logsetup import Logger
from mppproxy.results import CheckResult

log = Logger()

__all__ = ["ScanInput", "Scanner", "ScannerUnavailable", "EngineHealth",
           "DOWN", "TIMEOUT", "GARBAGE", "ERROR", "TOO_LARGE", "NOT_SENT"]


# Why a scanner was not consulted, the first word of each entry of
# ``ScanReport.skipped`` (the X-MPP-Scan-Skipped field and the log line's
# ``scan_skipped``), so an administrator tells a dead engine from a message
# that was never meant to reach it.
DOWN = "down"                 # no connection, or closed before any answer
TIMEOUT = "timeout"           # no whole answer within the time allowed
GARBAGE = "garbage"           # an answer we cannot read
ERROR = "error"               # the engine's own error, or ours
TOO_LARGE = "over max_size"   # the message is larger than the engine takes
NOT_SENT = "not sent"         # a guard refused the message first


class ScannerUnavailable(Exception):
    """The engine could not give an answer; ``reason`` says why, for the log
    ("connection refused", "timeout after 30s", "bad reply: ..."), and
    ``kind`` which kind of failure it was (``DOWN``, ``TIMEOUT``,
    ``GARBAGE``, ``ERROR``, ``TOO_LARGE``)."""

    def __init__(self, scanner: str, reason: str, kind: str = ERROR):
        super().__init__(f"{scanner}: {reason}")
        self.scanner = scanner
        self.reason = reason
        self.kind = kind


@dataclass(frozen=True)
class ScanInput:
    """One message as the scanners see it.

    ``chunks`` yields the raw message (RFC 5322, CRLF line ends, as it
    will be relayed, our Received: on top); ``size`` its length in octets;
    ``path`` a file holding it when it was spooled to disk (command-line
    scanners need one; otherwise they write a temporary file).  ``parsed``
    is the ``mppproxy.scan.mime.ParsedMessage`` from the MIME checks, when
    they ran (its ``message`` is the ``email.message.EmailMessage``).
    ``smtputf8``: the transaction asked for SMTPUTF8 (RFC 6531), so UTF-8
    in header fields is legal (RFC 6532); without it, 8-bit octets in a
    header are a defect.  Envelope and client facts come along for header
    rules and logs.  ``spf``: what the pre-DATA SPF check found, as its
    ``CheckResult.facts`` (result, domain, identity), for DMARC; empty when
    it did not run.
    """

    chunks: Any  # Callable[[], Iterator[bytes]]
    size: int
    client_ip: str = ""
    helo: str = ""
    sender: str = ""
    recipients: tuple[str, ...] = ()
    queue_id: str = ""
    policy: str = "default"
    path: Optional[str] = None
    parsed: Any = None
    smtputf8: bool = False
    spf: tuple[tuple[str, str], ...] = ()

    def iter_chunks(self) -> Iterator[bytes]:
        return iter(self.chunks())

    def exact_chunks(self) -> Iterator[bytes]:
        """The chunks, checked to add up to ``size`` exactly: protocols
        that announce a length first (SPAMC Content-length, HTTP) must
        never send more or less than they announced."""
        sent = 0
        for chunk in self.chunks():
            sent += len(chunk)
            if sent > self.size:
                raise ValueError(f"message longer than its size {self.size}")
            yield bytes(chunk)
        if sent != self.size:
            raise ValueError(f"message of {sent} octets, not its size {self.size}")

    def as_bytes(self) -> bytes:
        return b"".join(self.chunks())


@dataclass(frozen=True)
class EngineHealth:
    """What an engine said about itself (clamd VERSION, spamd/rspamd)."""

    name: str
    up: bool
    version: str = ""
    # Unix time of the signature database, when the engine tells it.
    signatures_time: Optional[float] = None
    detail: str = ""


class Scanner:
    """Base class for scanners in ``scan/scanners/``.

    ``settings`` is the scanner's own configuration (a frozen dataclass);
    ``reactor`` provides time, TCP/Unix connections and processes.
    Construction does no I/O.
    """

    # Per class, or per instance where one class serves many named scanners
    # (the command scanner).
    name: str = ""
    # True for the engines of ``[scanners]`` (clamd, spamd, rspamd, command):
    # the message leaves this process, so a message a guard (the MIME check)
    # refused is never handed to one, and a ``max_size`` in ``settings``
    # keeps larger messages from it (the scan engine records both).
    external: ClassVar[bool] = False

    def __init__(self, settings: Any, reactor: Any):
        self.settings = settings
        self.reactor = reactor

    async def scan(self, message: ScanInput) -> CheckResult:
        raise NotImplementedError

    def over_max_size(self, message: ScanInput) -> Optional[CheckResult]:
        """For engines with a ``max_size`` setting: the "not scanned" result
        (a reason, no score, logged) of a message over it, so the engine's
        own limit is never the one that speaks; None when it fits."""
        limit = self.settings.max_size
        if message.size <= limit:
            return None
        log.info("{scanner}: message {queue_id} not scanned: {size} octets, over max_size",
                 scanner=self.name, queue_id=message.queue_id, size=message.size)
        # "unscanned": no per-engine action for "clean" may match it.
        return CheckResult(reasons=(f"{self.name}: not scanned, {message.size} octets "
                                    f"over {limit}",), facts=(("verdict", "unscanned"),))

    async def health(self) -> EngineHealth:
        """Version and signature age, for the start-up log and the periodic
        check; engines without such a notion report up with no version."""
        return EngineHealth(self.name, True)
