"""SpamAssassin through spamd: a scoring scanner of the post-DATA stage.

Stage: post-DATA scanning.  Hands the scan engine a ``CheckResult`` whose
score is SpamAssassin's score times ``score_factor`` and whose reasons are
the names of the rules that hit; SpamAssassin's own verdict, score and
threshold travel in ``template_vars``.  It never decides alone: the
policy's threshold does.  No answer raises ``ScannerUnavailable``.

The protocol is SPAMC/1.5 (SpamAssassin's ``spamd/PROTOCOL``), one
request per connection::

    SYMBOLS SPAMC/1.5\\r\\n
    Content-length: 1234\\r\\n
    User: someone\\r\\n          (optional)
    \\r\\n
    <the message>

    SPAMD/1.1 0 EX_OK\\r\\n
    Content-length: 68\\r\\n
    Spam: True ; 1003.3 / 5.0\\r\\n
    \\r\\n
    GTUBE,MISSING_DATE,...

REPORT answers the same headers and a text report whose table gives each
rule's points.  An error is one line, ``SPAMD/1.0 76 Bad header line: ...``.
``PING SPAMC/1.5`` answers ``SPAMD/1.5 0 PONG``: the health check (spamd
tells no version or rule date over the protocol, only its protocol
version).
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any, ClassVar, Iterator, Optional

from mppproxy.logsetup import Logger
from mppproxy.results import CheckResult
from mppproxy.scan.base import GARBAGE, EngineHealth, ScanInput, Scanner, ScannerUnavailable
from mppproxy.config.scanners import SpamdConfig
from mppproxy.scan.scanners._client import BadReply, StreamClient, printable

log = Logger()

# A REPORT with every rule of a big ruleset is a few KiB.
MAX_REPLY = 256 * 1024
# Rule names kept as reasons; a message hitting more is rare and the rest
# would only lengthen the log line.
MAX_RULES = 100
_STATUS = re.compile(rb"SPAMD/(?P<version>\d+\.\d+) (?P<code>\d+) (?P<text>[^\r\n]*)")
_SPAM = re.compile(r"(?P<flag>True|False|Yes|No) ; (?P<score>-?\d+(?:\.\d+)?) / "
                   r"(?P<threshold>-?\d+(?:\.\d+)?)", re.I)
_RULE = re.compile(r"[A-Za-z0-9_]{1,128}")
_REPORT_LINE = re.compile(r"\s*(?P<points>-?\d+(?:\.\d+)?)\s+(?P<rule>[A-Za-z0-9_]+)(?:\s|$)")
# sysexits.h names of spamd's status codes.
_EX_NAMES = {64: "EX_USAGE", 65: "EX_DATAERR", 66: "EX_NOINPUT", 67: "EX_NOUSER",
             68: "EX_NOHOST", 69: "EX_UNAVAILABLE", 70: "EX_SOFTWARE", 71: "EX_OSERR",
             72: "EX_OSFILE", 73: "EX_CANTCREAT", 74: "EX_IOERR", 75: "EX_TEMPFAIL",
             76: "EX_PROTOCOL", 77: "EX_NOPERM", 78: "EX_CONFIG", 79: "EX_TIMEOUT"}


@dataclass(frozen=True)
class SpamdReply:
    version: str
    code: int
    text: str
    headers: tuple[tuple[str, str], ...] = ()
    body: bytes = b""

    def header(self, name: str) -> Optional[str]:
        for key, value in self.headers:
            if key.lower() == name.lower():
                return value
        return None


def parse_reply(data: bytes, eof: bool, status_only: bool = False) -> Optional[SpamdReply]:
    """A complete spamd reply from ``data``, None while more is due; BadReply
    for what spamd would never send.  ``status_only``: the reply is one
    line (PING)."""
    line_end = data.find(b"\r\n")
    if line_end < 0:
        if len(data) > 512 or (eof and data):
            raise BadReply(f"no status line: {printable(data)}")
        return None
    m = _STATUS.fullmatch(data[:line_end])
    if not m:
        raise BadReply(f"not a SPAMD status line: {printable(data[:line_end])}")
    version, code = m.group("version").decode(), int(m.group("code"))
    text = m.group("text").decode("ascii", "replace")
    if code != 0 or status_only:
        return SpamdReply(version, code, text)
    head_end = data.find(b"\r\n\r\n")
    if head_end < 0:
        if eof:
            raise BadReply("headers cut short")
        return None
    headers = []
    for raw in data[line_end + 2:head_end].split(b"\r\n"):
        name, colon, value = raw.partition(b":")
        if not colon or not name.strip():
            raise BadReply(f"bad header line: {printable(raw)}")
        headers.append((name.strip().decode("ascii", "replace"),
                        value.strip().decode("ascii", "replace")))
    reply = SpamdReply(version, code, text, tuple(headers))
    body = data[head_end + 4:]
    length_text = reply.header("Content-length")
    if length_text is None:
        # CHECK has no body; anything else ends with the connection.
        return SpamdReply(version, code, text, tuple(headers), body) if eof else None
    if not length_text.isdigit():
        raise BadReply(f"bad Content-length: {printable(length_text.encode())}")
    length = int(length_text)
    if len(body) < length:
        if eof:
            raise BadReply(f"body cut short: {len(body)} of {length} octets")
        return None
    return SpamdReply(version, code, text, tuple(headers), body[:length])


def _parse_spam_header(value: Optional[str]) -> tuple[bool, float, float]:
    if value is None:
        raise BadReply("no Spam: header")
    m = _SPAM.fullmatch(value.strip())
    if not m:
        raise BadReply(f"bad Spam: header: {printable(value.encode())}")
    score, threshold = float(m.group("score")), float(m.group("threshold"))
    if not (math.isfinite(score) and math.isfinite(threshold)):
        raise BadReply(f"bad Spam: header: {printable(value.encode())}")
    return m.group("flag").lower() in ("true", "yes"), score, threshold


def parse_symbols(body: bytes) -> tuple[str, ...]:
    """Rule names of a SYMBOLS body (``GTUBE,MISSING_DATE``)."""
    text = body.decode("ascii", "replace").strip()
    if not text:
        return ()
    names = tuple(n.strip() for n in text.split(","))
    for n in names:
        if not _RULE.fullmatch(n):
            raise BadReply(f"bad rule name in SYMBOLS: {printable(n.encode())}")
    return names


def parse_report(body: bytes) -> tuple[tuple[str, float], ...]:
    """(rule, points) from the table of a REPORT body: the lines after the
    ``---- ----`` line that start with points and a rule name; wrapped
    description lines are skipped."""
    lines = body.decode("utf-8", "replace").splitlines()
    rules: list[tuple[str, float]] = []
    in_table = False
    for line in lines:
        if not in_table:
            in_table = line.startswith("----")
            continue
        # Points sit in the first four columns; a wrapped description is
        # indented far past them.
        m = _REPORT_LINE.match(line)
        if m and len(line) - len(line.lstrip()) < 4:
            rules.append((m.group("rule"), float(m.group("points"))))
    if not in_table:
        raise BadReply("REPORT without its table")
    return tuple(rules)


class SpamdScanner(Scanner):
    """Asks spamd about each message with SYMBOLS (or REPORT).

    ``settings`` is a ``SpamdConfig``.  Messages over ``max_size`` are not
    sent (like spamc's ``--max-size``): a "not scanned" reason, no score.
    """

    name = "spamd"
    external: ClassVar[bool] = True

    def __init__(self, settings: SpamdConfig, reactor: Any):
        super().__init__(settings, reactor)
        self.client = StreamClient.for_settings(self.name, reactor, settings.address, settings)

    async def scan(self, message: ScanInput) -> CheckResult:
        settings = self.settings
        too_big = self.over_max_size(message)
        if too_big is not None:
            return too_big
        # Half-closed like spamc: spamd reads lines and would wait for the
        # end of a last line that has none.
        reply: SpamdReply = await self.client.request(lambda: self._request(message),
                                                      parse_reply, MAX_REPLY, half_close=True)
        if reply.code != 0:
            raise ScannerUnavailable(self.name, f"spamd error {reply.code} "
                                     f"{_EX_NAMES.get(reply.code, '')}: "
                                     f"{printable(reply.text.encode())}".replace("  ", " "))
        try:
            is_spam, score, threshold = _parse_spam_header(reply.header("Spam"))
            if settings.command == "REPORT":
                points = parse_report(reply.body)
                rules = tuple(name for name, _ in points)
            else:
                points = ()
                rules = parse_symbols(reply.body)
        except BadReply as e:
            raise ScannerUnavailable(self.name, f"bad reply: {e}", GARBAGE) from None
        variables: tuple[tuple[str, Any], ...] = (
            ("spamd_spam", is_spam), ("spamd_score", score), ("spamd_threshold", threshold))
        if points:
            variables += (("spamd_points", points),)
        # spamd's own verdict (its "Spam: True"), for the per-engine actions.
        return CheckResult(score=score * settings.score_factor, reasons=rules[:MAX_RULES],
                           template_vars=variables,
                           facts=(("verdict", "spam" if is_spam else "clean"),))

    def _request(self, message: ScanInput) -> Iterator[bytes]:
        head = [f"{self.settings.command} SPAMC/1.5", f"Content-length: {message.size}"]
        if self.settings.user:
            head.append(f"User: {self.settings.user}")
        yield ("\r\n".join(head) + "\r\n\r\n").encode("ascii")
        yield from message.exact_chunks()

    async def health(self) -> EngineHealth:
        reply: SpamdReply = await self.client.request(
            lambda: iter((b"PING SPAMC/1.5\r\n\r\n",)),
            lambda data, eof: parse_reply(data, eof, status_only=True), MAX_REPLY)
        if reply.code != 0 or reply.text != "PONG":
            raise ScannerUnavailable(self.name, f"PING answered {reply.code} "
                                     f"{printable(reply.text.encode())}")
        return EngineHealth(self.name, True, version=f"SPAMD/{reply.version}")
