"""rspamd through its HTTP scan endpoint: a scoring scanner of the post-DATA
stage.

Stage: post-DATA scanning.  Hands the scan engine a ``CheckResult`` whose
score is rspamd's score times ``score_factor`` and whose reasons are the
symbols that carried weight (all of them when rspamd skipped its rules for
a pre-result such as GTUBE); rspamd's action, score, required score and
every symbol's weight travel in ``template_vars``.  It never decides
alone.  No answer raises ``ScannerUnavailable``.

The request is ``POST /checkv2`` (rspamd's "protocol" documentation) with
the message as the body and the envelope in headers: ``IP``, ``Helo``,
``From``, ``Rcpt`` (one per recipient), ``Queue-Id``, and ``Password`` when
configured.  The reply is JSON::

    {"is_skipped": false, "score": 5.2, "required_score": 15.0,
     "action": "add header", "symbols": {"NAME": {"score": 1.5, ...}, ...}}

A small HTTP/1.1 client, one request per connection (``Connection:
close``), so the shared connection bound, timeout and retry rules apply
as for clamd and spamd.  ``GET /ping`` answers ``pong``; its ``Server:``
header (``rspamd/3.4``) gives the version for the health check.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any, ClassVar, Iterator, Optional
from urllib.parse import urlsplit

from mppproxy.logsetup import Logger
from mppproxy.policy.base import CheckResult
from mppproxy.scan.base import GARBAGE, EngineHealth, ScanInput, Scanner, ScannerUnavailable
from mppproxy.scan.engines_config import RspamdConfig
from mppproxy.scan.scanners._client import BadReply, StreamClient, printable

log = Logger()

# The JSON of a message with many URLs and symbol options can reach a few
# hundred KiB; more is not rspamd.
MAX_REPLY = 4 * 1024 * 1024
MAX_HEAD = 16 * 1024
MAX_SYMBOLS = 100


@dataclass(frozen=True)
class HttpReply:
    status: int
    reason: str
    headers: tuple[tuple[str, str], ...]
    body: bytes

    def header(self, name: str) -> Optional[str]:
        for key, value in self.headers:
            if key.lower() == name.lower():
                return value
        return None


def _dechunk(data: bytes, eof: bool) -> Optional[bytes]:
    """The body of a chunked transfer coding (RFC 9112 7.1), None while incomplete."""
    out = bytearray()
    pos = 0
    while True:
        line_end = data.find(b"\r\n", pos)
        if line_end < 0:
            break
        size_text = data[pos:line_end].split(b";", 1)[0].strip()
        try:
            size = int(size_text, 16)
        except ValueError:
            raise BadReply(f"bad chunk size: {printable(size_text)}") from None
        if size == 0:
            # The last chunk, then trailers (ignored) up to an empty line.
            if data.find(b"\r\n\r\n", line_end) < 0:
                break
            return bytes(out)
        start = line_end + 2
        if len(data) < start + size + 2:
            break
        out += data[start:start + size]
        pos = start + size + 2
    if eof:
        raise BadReply("chunked body cut short")
    return None


def parse_http(data: bytes, eof: bool) -> Optional[HttpReply]:
    """A complete HTTP/1.x response from ``data``, None while more is due;
    BadReply for one that is not HTTP."""
    head_end = data.find(b"\r\n\r\n")
    if head_end < 0:
        if len(data) > MAX_HEAD or (eof and data):
            raise BadReply(f"no HTTP response head: {printable(data)}")
        # Garbage shows in its first five octets; no need to wait for more.
        if not (data.startswith(b"HTTP/") or b"HTTP/".startswith(data)):
            raise BadReply(f"not HTTP: {printable(data)}")
        return None
    lines = data[:head_end].split(b"\r\n")
    parts = lines[0].split(b" ", 2)
    if len(parts) < 2 or not parts[0].startswith(b"HTTP/1.") or not parts[1].isdigit():
        raise BadReply(f"not an HTTP status line: {printable(lines[0])}")
    status = int(parts[1])
    reason = parts[2].decode("latin-1") if len(parts) > 2 else ""
    headers = []
    for raw in lines[1:]:
        name, colon, value = raw.partition(b":")
        if not colon or not name.strip():
            raise BadReply(f"bad header line: {printable(raw)}")
        headers.append((name.strip().decode("latin-1"), value.strip().decode("latin-1")))
    head = HttpReply(status, reason, tuple(headers), b"")
    rest = data[head_end + 4:]
    if (head.header("Transfer-Encoding") or "").lower() == "chunked":
        body = _dechunk(rest, eof)
        if body is None:
            return None
    elif head.header("Content-Length") is not None:
        length_text = head.header("Content-Length") or ""
        if not length_text.isdigit():
            raise BadReply(f"bad Content-Length: {printable(length_text.encode())}")
        length = int(length_text)
        if len(rest) < length:
            if eof:
                raise BadReply(f"body cut short: {len(rest)} of {length} octets")
            return None
        body = rest[:length]
    else:
        if not eof:
            return None
        body = rest
    return HttpReply(status, reason, tuple(headers), body)


def _header_safe(value: str) -> Optional[str]:
    """``value`` fit for a request header, or None: envelope text comes from
    the client, and a CR or LF would let it add headers of its own."""
    if not value or any(c in value for c in "\r\n\0") or not value.isprintable():
        return None
    return value


def _number(value: Any, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise BadReply(f"{what} is not a number: {printable(repr(value).encode())}")
    return float(value)


def interpret(reply: Any) -> tuple[float, float, str, bool, tuple[tuple[str, float], ...]]:
    """(score, required score, action, skipped, ((symbol, weight), ...))
    from the parsed JSON; BadReply when it is not a scan result."""
    if not isinstance(reply, dict):
        raise BadReply("the JSON is not an object")
    if "error" in reply:
        raise BadReply(f"rspamd error: {printable(str(reply['error']).encode())}")
    score = _number(reply.get("score"), "score")
    required = _number(reply.get("required_score", 0.0), "required_score")
    action = reply.get("action")
    if not isinstance(action, str):
        raise BadReply("no action")
    symbols = reply.get("symbols", {})
    if not isinstance(symbols, dict):
        raise BadReply("symbols is not an object")
    weights = []
    for name, info in symbols.items():
        if not isinstance(info, dict):
            raise BadReply(f"symbol {printable(str(name).encode())} is not an object")
        weights.append((str(name), _number(info.get("score", 0.0), f"{name}.score")))
    weights.sort(key=lambda item: (-abs(item[1]), item[0]))
    return score, required, action, bool(reply.get("is_skipped", False)), tuple(weights)


class RspamdScanner(Scanner):
    """Asks rspamd's normal worker about each message (POST /checkv2).

    ``settings`` is an ``RspamdConfig``.  Messages over ``max_size`` are not
    sent: a "not scanned" reason, no score.
    """

    name: ClassVar[str] = "rspamd"
    external: ClassVar[bool] = True

    def __init__(self, settings: RspamdConfig, reactor: Any):
        super().__init__(settings, reactor)
        url = urlsplit(settings.url)
        host = url.hostname or "127.0.0.1"
        port = url.port or 80
        self._host_header = url.netloc
        self._base = url.path.rstrip("/")
        address = f"tcp:[{host}]:{port}" if ":" in host else f"tcp:{host}:{port}"
        self.client = StreamClient.for_settings(self.name, reactor, address, settings)

    def _head(self, method: str, path: str, extra: list[tuple[str, str]]) -> bytes:
        lines = [f"{method} {self._base}{path} HTTP/1.1", f"Host: {self._host_header}",
                 "Connection: close"]
        lines += [f"{k}: {v}" for k, v in extra]
        if self.settings.password:
            lines.append(f"Password: {self.settings.password}")
        return ("\r\n".join(lines) + "\r\n\r\n").encode("utf-8")

    def _request(self, message: ScanInput) -> Iterator[bytes]:
        extra = [("Content-Length", str(message.size))]
        for key, value in (("IP", message.client_ip), ("Helo", message.helo),
                           ("From", message.sender), ("Queue-Id", message.queue_id)):
            safe = _header_safe(value)
            if safe is not None:
                extra.append((key, safe))
        for rcpt in message.recipients:
            safe = _header_safe(rcpt)
            if safe is not None:
                extra.append(("Rcpt", safe))
        yield self._head("POST", "/checkv2", extra)
        yield from message.exact_chunks()

    async def scan(self, message: ScanInput) -> CheckResult:
        settings = self.settings
        too_big = self.over_max_size(message)
        if too_big is not None:
            return too_big
        reply: HttpReply = await self.client.request(lambda: self._request(message),
                                                     parse_http, MAX_REPLY)
        if reply.status != 200:
            raise ScannerUnavailable(self.name, f"HTTP {reply.status} {reply.reason}: "
                                     f"{printable(reply.body)}")
        try:
            try:
                data = json.loads(reply.body)
            except ValueError as e:
                raise BadReply(f"not JSON ({e}): {printable(reply.body)}") from None
            score, required, action, skipped, weights = interpret(data)
        except BadReply as e:
            raise ScannerUnavailable(self.name, f"bad reply: {e}", GARBAGE) from None
        # The symbols that carried weight; with a pre-result (GTUBE, a
        # settings rule) rspamd skips the rules and the symbol that stopped
        # them has none, so then every symbol is a reason.
        reasons = tuple(n for n, w in weights if w != 0.0 or skipped)[:MAX_SYMBOLS]
        return CheckResult(score=score * settings.score_factor, reasons=reasons,
                           template_vars=(("rspamd_action", action), ("rspamd_score", score),
                                          ("rspamd_required_score", required),
                                          ("rspamd_symbols", weights[:MAX_SYMBOLS])))

    async def health(self) -> EngineHealth:
        reply: HttpReply = await self.client.request(
            lambda: iter((self._head("GET", "/ping", []),)), parse_http, 64 * 1024)
        if reply.status != 200 or reply.body.strip() != b"pong":
            raise ScannerUnavailable(self.name, f"/ping answered HTTP {reply.status}: "
                                     f"{printable(reply.body)}")
        return EngineHealth(self.name, True, version=reply.header("Server") or "")
