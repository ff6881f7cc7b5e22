"""The mark a released message carries, so the edge does not hold it again
(issue 12, "Release done right").

Stage: beside the archive copy.  ``mppproxy quarantine release`` adds one
``X-MPP-Released`` field to the message it re-injects; when that message
passes an edge on its way (the release route of all-in-one mode is the
proxy's own listener, and a site may route released mail through its
edges), the edge finds the field, verifies it, and relays a message its
verdict would hold.  Everything else still applies: a message that is now
refused (a virus found since) is refused, and the field is removed with
every other ``X-MPP-*`` field (docs/design.md promise 7), so nothing after
the edge sees it.

The field::

    X-MPP-Released: v=1; ref=<queue id>; at=<unix time>; k=<key id>; b=<base64 HMAC>

The HMAC-SHA256 (the archive keys, ``keys.py``) covers::

    mppproxy-released/1
    ref:<queue id>
    at:<unix time>
    body:sha256=<hex>;octets=<n>

so a mark is bound to one message body and cannot be moved to another; it
is honoured for ``MARK_LIFETIME`` seconds after ``at``, so a released
message copied later into new mail gains nothing.  Without the keys a
sender cannot make one: a forged or stale mark is ignored (the message is
judged as any other) and logged.
"""
from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import re
from dataclasses import dataclass
from typing import Iterable, Optional

from mppproxy.archive.keys import KEY_ID, KeyRing
from mppproxy.archive.state import BodyDigest, parse_fields
from mppproxy.message import OutboundMessage, format_header

FIELD = "X-MPP-Released"
VERSION = 1
# A release is re-injected at once; a day covers a route that queues it
# (a backend that defers, a retry the next morning) and no more.
MARK_LIFETIME = 86400.0
# A clock a little ahead on the releasing host must not void the mark.
CLOCK_SKEW = 300.0

_PARAM = re.compile(r"\s*([a-z]+)=([^;\s]*)\s*")


@dataclass(frozen=True)
class Mark:
    """A verified mark: the reference of the held copy it released."""

    ref: str
    at: float


def _canonical(ref: str, at: int, body: BodyDigest) -> bytes:
    return (f"mppproxy-released/{VERSION}\nref:{ref}\nat:{at}\n"
            f"body:sha256={body.sha256.hex()};octets={body.octets}\n").encode("ascii")


def mark(ref: str, at: float, body: BodyDigest, keys: KeyRing) -> bytes:
    """The header line that marks a released message whose body is ``body``."""
    key = keys.signing
    when = int(at)
    mac = hmac.new(key.secret, _canonical(ref, when, body), hashlib.sha256).digest()
    value = (f"v={VERSION}; ref={ref}; at={when}; k={key.id}; "
             f"b={base64.b64encode(mac).decode('ascii')}")
    return format_header(FIELD, value)


def verify_mark(value: str, body: BodyDigest, keys: KeyRing, now: float) -> Optional[Mark]:
    """The mark in ``value`` (the field's unfolded value) if it verifies
    for ``body`` and is still fresh, else None."""
    params: dict[str, str] = {}
    for part in value.split(";"):
        match = _PARAM.fullmatch(part)
        if match is None:
            return None
        params[match.group(1)] = match.group(2)
    ref, at_text, key_id, given = (params.get(n, "") for n in ("ref", "at", "k", "b"))
    if params.get("v") != str(VERSION) or not ref or len(ref) > 64 or not at_text.isdigit():
        return None
    if not KEY_ID.fullmatch(key_id) or not all(c.isalnum() or c in "-._" for c in ref):
        return None
    key = keys.get(key_id)
    if key is None:
        return None
    try:
        mac = base64.b64decode(given, validate=True)
    except (binascii.Error, ValueError):
        return None
    at = int(at_text)
    expected = hmac.new(key.secret, _canonical(ref, at, body), hashlib.sha256).digest()
    if not hmac.compare_digest(mac, expected):
        return None
    if not at - CLOCK_SKEW <= now <= at + MARK_LIFETIME:
        return None
    return Mark(ref, float(at))


def find_field(fields: Iterable[tuple[str, str]]) -> Optional[str]:
    """The value of the one ``X-MPP-Released`` field among ``fields``; None
    when there is none or more than one (a second one is not ours)."""
    values = [value for name, value in fields if name.strip().lower() == FIELD.lower()]
    return values[0].replace("\r", "").replace("\n", "") if len(values) == 1 else None


def split_message(data: bytes) -> tuple[bytes, bytes]:
    """(header section with its empty line, body) of a message in CRLF
    form; a message without an empty line is all header, no body."""
    end = data.find(b"\r\n\r\n")
    if end < 0:
        return data, b""
    return data[:end + 4], data[end + 4:]


def released_mark(message: OutboundMessage, keys: KeyRing, now: float) -> Optional[Mark]:
    """The verified mark of a message at the edge, or None: the one
    ``X-MPP-Released`` field the client sent (removed from the message with
    every X-MPP-* field; ``OutboundMessage.released_fields``), checked
    against the message's body as it arrived (before any disclaimer)."""
    if not message.released_fields:
        return None
    value = find_field(parse_fields(b"".join(message.released_fields) + b"\r\n"))
    if value is None:
        return None
    message.header_section()
    digest = hashlib.sha256()
    octets = 0
    skip = 2  # the empty line that ends the header section
    for chunk in message.chunks_after_header():
        if skip:
            taken = min(skip, len(chunk))
            chunk, skip = chunk[taken:], skip - taken
        digest.update(chunk)
        octets += len(chunk)
    return verify_mark(value, BodyDigest(digest.digest(), octets), keys, now)
