"""The HTTP face of ``--mode scan`` (twisted.web).

* ``POST /scan``: the body is the raw RFC 5322 message; optional facts as
  query arguments (or headers): ``client_ip`` (``X-Client-IP``), ``helo``
  (``X-Helo``), ``sender`` (``X-Sender``), ``rcpt``, repeatable
  (``X-Recipient``, comma-separated), ``policy`` (``X-Policy``),
  ``smtputf8=1``.  The answer is the verdict as JSON (``ScanOutcome.as_json``)
  with status 200 for every verdict; 503 when it is a tempfail (a scanner
  could not answer), so a script notices without reading the body.
* ``GET /health``: the engines as the health monitor saw them.

Errors are JSON too (``{"error": ...}``): 400 for bad input, 403 for a
client outside ``trusted_networks``, 404, 405 for another method, 413 for a
body over ``limits.max_message_size`` (counted as it arrives, so a large
upload never sits in memory or on disk), 500 for a bug (logged).
"""
from __future__ import annotations

import ipaddress
import json
from typing import Any, Callable, Optional

from twisted.web import server
from twisted.web.resource import Resource

from mppproxy._async import as_deferred
from mppproxy.logsetup import Logger
from mppproxy.results import Disposition
from mppproxy.scanservice.core import ScanRequest, ScanRuntime, UnknownPolicy

log = Logger()

JSON = b"application/json; charset=utf-8"


def _send_json(request: Any, status: int, body: dict[str, Any]) -> bytes:
    request.setResponseCode(status)
    request.setHeader(b"content-type", JSON)
    return json.dumps(body, sort_keys=True).encode("utf-8") + b"\n"


def _error(request: Any, status: int, message: str) -> bytes:
    return _send_json(request, status, {"error": message})


class BoundedRequest(server.Request):
    """A request whose body is counted as it arrives and dropped past
    ``max_body`` octets (Content-Length or chunked alike); the resource
    then answers 413.  A subclass per site sets ``max_body``."""

    max_body = 0
    too_large = False
    content: Any

    def gotLength(self, length: Optional[int]) -> None:
        self.too_large = length is not None and length > self.max_body
        super().gotLength(None if self.too_large else length)  # type: ignore[no-untyped-call]  # Twisted's is unannotated

    def handleContentChunk(self, data: bytes) -> None:
        if self.too_large:
            return
        if self.content.tell() + len(data) > self.max_body:
            self.too_large = True
            self.content.seek(0)
            self.content.truncate()
            return
        super().handleContentChunk(data)  # type: ignore[no-untyped-call]  # Twisted's is unannotated


class _JsonResource(Resource):
    isLeaf = True

    def __init__(self, is_trusted: Callable[[str], bool]):
        super().__init__()  # type: ignore[no-untyped-call]  # Twisted's is unannotated
        self.is_trusted = is_trusted

    def render(self, request: Any) -> Any:
        host = getattr(request.getClientAddress(), "host", "")
        if not self.is_trusted(host):
            return _error(request, 403, "scanning is only for trusted clients")
        method = request.method.decode("ascii", "replace")
        handler = getattr(self, f"render_{method}", None)
        if handler is None:
            allowed = [m for m in ("GET", "POST") if hasattr(self, f"render_{m}")]
            request.setHeader(b"allow", ", ".join(allowed).encode())
            return _error(request, 405, f"method {method} not allowed; use {' or '.join(allowed)}")
        return handler(request)


class HealthResource(_JsonResource):
    def __init__(self, runtime: Callable[[], ScanRuntime], is_trusted: Callable[[str], bool]):
        super().__init__(is_trusted)
        self.runtime = runtime

    def render_GET(self, request: Any) -> bytes:
        return _send_json(request, 200, self.runtime().health_status())


def _arg(request: Any, name: str, header: str) -> str:
    values: Optional[list[bytes]] = request.args.get(name.encode())
    if values:
        return values[0].decode("utf-8", "replace")
    value = request.getHeader(header)
    return value or ""


def _recipients(request: Any) -> tuple[str, ...]:
    values = [v.decode("utf-8", "replace") for v in request.args.get(b"rcpt", [])]
    if not values:
        header = request.getHeader("x-recipient") or ""
        values = [v.strip() for v in header.split(",") if v.strip()]
    return tuple(values)


class ScanResource(_JsonResource):
    def __init__(self, runtime: Callable[[], ScanRuntime], is_trusted: Callable[[str], bool]):
        super().__init__(is_trusted)
        self.runtime = runtime

    def render_POST(self, request: Any) -> Any:
        if getattr(request, "too_large", False):
            return _error(request, 413, "message larger than limits.max_message_size")
        try:
            scan_request = self._parse(request)
        except ValueError as e:
            return _error(request, 400, str(e))
        finished = [False]
        request.notifyFinish().addBoth(lambda _: finished.__setitem__(0, True))
        d = as_deferred(self._answer(request, scan_request, finished))
        d.addErrback(lambda f: log.failure("answering a scan request failed", f))
        return server.NOT_DONE_YET

    async def _answer(self, request: Any, scan_request: ScanRequest, finished: list[bool]) -> None:
        try:
            outcome = await self.runtime().scan(scan_request)
        except UnknownPolicy as e:
            body = _error(request, 400, str(e))
        except Exception:
            # A bug: logged with its traceback, a 500 without it (STYLE.md).
            log.failure("scan over HTTP failed")
            body = _error(request, 500, "internal error; see the log")
        else:
            status = 503 if outcome.action is Disposition.TEMPFAIL else 200
            body = _send_json(request, status, outcome.as_json())
        if not finished[0]:  # the client may have gone meanwhile
            request.write(body)
            request.finish()

    def _parse(self, request: Any) -> ScanRequest:
        request.content.seek(0)
        body = request.content.read()
        if not body:
            raise ValueError("empty body: POST the raw RFC 5322 message")
        client_ip = _arg(request, "client_ip", "x-client-ip")
        if client_ip:
            try:
                ipaddress.ip_address(client_ip)
            except ValueError:
                raise ValueError(f"client_ip {client_ip!r} is not an IP address") from None
        smtputf8 = _arg(request, "smtputf8", "x-smtputf8").lower()
        if smtputf8 not in ("", "0", "1", "true", "false", "yes", "no"):
            raise ValueError(f"smtputf8 must be 1 or 0, not {smtputf8!r}")
        return ScanRequest.of_bytes(
            body, client_ip=client_ip, helo=_arg(request, "helo", "x-helo"),
            sender=_arg(request, "sender", "x-sender"), recipients=_recipients(request),
            policy=_arg(request, "policy", "x-policy"),
            smtputf8=smtputf8 in ("1", "true", "yes"))


class _NotFound(_JsonResource):
    def render(self, request: Any) -> bytes:
        return _error(request, 404, "not found; use POST /scan or GET /health")


class _Root(Resource):
    def __init__(self, children: dict[bytes, Resource]):
        super().__init__()  # type: ignore[no-untyped-call]  # Twisted's is unannotated
        self.children_by_name = children

    def getChild(self, path: bytes, request: Any) -> Resource:
        # Exactly /scan and /health: no trailing parts.
        if request.postpath:
            return _NotFound(lambda host: True)
        return self.children_by_name.get(path, _NotFound(lambda host: True))

    def render(self, request: Any) -> bytes:
        return _error(request, 404, "not found; use POST /scan or GET /health")


def make_site(runtime: Callable[[], ScanRuntime], is_trusted: Callable[[str], bool],
              max_body: int, idle_timeout: float = 300.0) -> server.Site:
    """The site of ``scanservice.http_listen``; ``runtime`` gives the
    runtime of the moment, ``max_body`` bounds a message (octets),
    ``idle_timeout`` closes a silent connection (seconds; twisted.web's own
    default is 12 hours)."""
    root = _Root({b"scan": ScanResource(runtime, is_trusted),
                  b"health": HealthResource(runtime, is_trusted)})
    request_class = type("ScanSiteRequest", (BoundedRequest,), {"max_body": max_body})
    site = server.Site(root, requestFactory=request_class, timeout=idle_timeout)  # type: ignore[no-untyped-call]  # Twisted's is unannotated
    site.noisy = False
    site.displayTracebacks = False
    return site


__all__ = ["make_site", "ScanResource", "HealthResource", "BoundedRequest"]
