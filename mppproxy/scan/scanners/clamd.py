"""ClamAV through clamd: the virus scanner of the post-DATA stage.

Stage: post-DATA scanning.  Hands the scan engine a ``CheckResult``: clean
(score 0), or a hard ``HardAction.REJECT`` naming the signature (reason
``"virus <Signature>"``, template ``virus``); the policy may turn the
reject into a quarantine.  No answer raises ``ScannerUnavailable``.

The protocol is clamd(8)'s, with null-terminated commands (the ``z``
prefix), one command per connection:

* ``zINSTREAM\\0``, then the message in chunks, each a 4-octet big-endian
  length and that many octets, then a zero length.  The reply is
  ``stream: OK\\0``, ``stream: <Signature> FOUND\\0`` or ``... ERROR\\0``;
  past clamd's StreamMaxLength it stops reading and answers
  ``INSTREAM size limit exceeded. ERROR``.
* ``zVERSION\\0`` answers ``ClamAV 1.4.6/27480/Mon Dec  9 09:35:33 2024``:
  engine version, signature database version and date (clamd's local
  time), or just ``ClamAV 1.4.6`` when only local signatures are loaded.
"""
from __future__ import annotations

import re
import struct
import time
from typing import Any, ClassVar, Iterator, Optional

from mppproxy.logsetup import Logger
from mppproxy.results import CheckResult, HardAction
from mppproxy.scan.base import (GARBAGE, TOO_LARGE, EngineHealth, ScanInput, Scanner,
                                ScannerUnavailable)
from mppproxy.config.scanners import ClamdConfig
from mppproxy.scan.scanners._client import BadReply, StreamClient, printable

log = Logger()

# Replies are one short line; anything longer is not clamd.
MAX_REPLY = 4096
_FOUND = re.compile(r"stream: (?P<name>.+?)(?:\((?:[0-9a-f]{32,64}):\d+\))? FOUND")
_VERSION = re.compile(r"ClamAV (?P<engine>[^/\s]+)(?:/(?P<db>\d+)/(?P<date>.+))?")


def _parse_line(data: bytes, eof: bool) -> Optional[str]:
    """The reply up to its NUL, as text; None while it has not come."""
    end = data.find(b"\0")
    if end < 0:
        return None
    try:
        return data[:end].decode("ascii").strip()
    except UnicodeDecodeError:
        raise BadReply(f"not ASCII: {printable(data[:end])}") from None


def parse_version(line: str) -> tuple[str, Optional[int], Optional[float]]:
    """``(version, database version, signature time)`` from a VERSION
    reply; ValueError when it is not one.  The date is clamd's local time
    (ctime format), turned into Unix time with this host's zone."""
    m = _VERSION.fullmatch(line)
    if not m:
        raise ValueError(f"not a VERSION reply: {line[:80]!r}")
    engine, db, date = m.group("engine"), m.group("db"), m.group("date")
    when = None
    if date is not None:
        try:
            when = time.mktime(time.strptime(" ".join(date.split()), "%a %b %d %H:%M:%S %Y"))
        except (ValueError, OverflowError):
            raise ValueError(f"bad signature date in {line[:80]!r}") from None
    return engine, int(db) if db is not None else None, when


class ClamdScanner(Scanner):
    """Asks clamd about each message with INSTREAM.

    ``settings`` is a ``ClamdConfig``; ``reactor`` gives connections and
    time.  Messages over ``max_size`` are not sent (a "not scanned" reason,
    no score), so clamd's own limit is never the one that speaks.
    """

    name = "clamd"
    external: ClassVar[bool] = True

    def __init__(self, settings: ClamdConfig, reactor: Any):
        super().__init__(settings, reactor)
        self.client = StreamClient.for_settings(self.name, reactor, settings.address, settings)

    async def scan(self, message: ScanInput) -> CheckResult:
        too_big = self.over_max_size(message)
        if too_big is not None:
            return too_big
        reply = await self.client.request(lambda: self._instream(message), _parse_line, MAX_REPLY)
        if reply == "stream: OK":
            return CheckResult()
        found = _FOUND.fullmatch(reply)
        if found:
            signature = found.group("name")
            return CheckResult(reasons=(f"virus {signature}",), action=HardAction.REJECT,
                               template="virus", template_vars=(("virus", signature),))
        if "size limit exceeded" in reply:
            raise ScannerUnavailable(self.name, f"clamd refused the message as too large "
                                     f"({message.size} octets; raise StreamMaxLength or lower "
                                     f"max_size): {printable(reply.encode())}", TOO_LARGE)
        if reply.endswith("ERROR"):
            raise ScannerUnavailable(self.name, f"clamd error: {printable(reply.encode())}")
        raise ScannerUnavailable(self.name, f"bad reply: {printable(reply.encode())}", GARBAGE)

    def _instream(self, message: ScanInput) -> Iterator[bytes]:
        yield b"zINSTREAM\0"
        step = self.settings.chunk_size
        sent = 0
        for chunk in message.iter_chunks():
            for start in range(0, len(chunk), step):
                piece = chunk[start:start + step]
                sent += len(piece)
                if sent > self.settings.max_size:
                    # The spool grew past what it said; never feed clamd more.
                    raise ValueError(f"message longer than its size {message.size}")
                yield struct.pack(">I", len(piece))
                yield bytes(piece)
        yield b"\0\0\0\0"

    async def health(self) -> EngineHealth:
        reply = await self.client.request(lambda: iter((b"zVERSION\0",)), _parse_line, MAX_REPLY)
        try:
            version, db, when = parse_version(reply)
        except ValueError as e:
            raise ScannerUnavailable(self.name, f"bad reply: {e}", GARBAGE) from None
        detail = f"database {db}" if db is not None else "no official database"
        return EngineHealth(self.name, True, version=f"ClamAV {version}",
                            signatures_time=when, detail=detail)
