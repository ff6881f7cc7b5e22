"""XFORWARD and XCLIENT from an upstream MTA: the real client's facts when
the proxy runs behind Postfix (issue 14, "Postfix after-queue content
filter"), before the queue (``smtpd_proxy_filter``) or after it
(``content_filter`` with ``smtp_send_xforward_command = yes``).

Ground floor (smtp/).  There the proxy's SMTP client is Postfix on
127.0.0.1; without these commands every check would see 127.0.0.1 (a
trusted network: no DNS lists, no greylisting, maybe no scanning) and
Postfix's own HELO.  The commands are accepted only from the networks of
``smtp.xforward_hosts`` / ``smtp.xclient_hosts`` (Postfix's
``smtpd_authorized_xforward_hosts``): from anyone else they would let a
client pick the address our checks and logs see (XFORWARD_README,
"Security").

The two differ as in Postfix:

* XFORWARD (Postfix XFORWARD_README) sets attributes for the next mail
  transaction only; they reset to the real client's at its end (RSET or the
  end of DATA).  ``ADDR=[UNAVAILABLE]`` announces a local submission on the
  upstream host: the real client's facts stay.  The upstream MTA has done
  relay control already, so the proxy's relay check is not repeated for it
  (``Session.relay_checked``); the policy checks and scanning see the real
  client, as its trust (``trusted_networks``) decides.
* XCLIENT (Postfix XCLIENT_README) replaces the client for the rest of the
  connection, relay control included, and restarts the session: the
  server answers 220 and the client says EHLO again.

This module parses and checks the attributes; ``smtp/server.py`` applies
them to the ``Session``.
"""
from __future__ import annotations

import ipaddress
import re
from typing import Optional

from mppproxy.smtp import replies
from mppproxy.smtp.replies import Reply

# XFORWARD_README, "XFORWARD Command syntax" (IDENT since Postfix 2.8).
XFORWARD_ATTRIBUTES = ("NAME", "ADDR", "PORT", "PROTO", "HELO", "IDENT", "SOURCE")
# XCLIENT_README, "XCLIENT Command syntax".
XCLIENT_ATTRIBUTES = ("NAME", "ADDR", "PORT", "PROTO", "HELO", "LOGIN", "DESTADDR", "DESTPORT")
# XFORWARD_README note 1: a value is at most 255 characters.
MAX_VALUE = 255
# XFORWARD_README note 3 / XCLIENT_README: any case.
_UNAVAILABLE = ("[UNAVAILABLE]", "[TEMPUNAVAIL]")

# XFORWARD_README reply table: 550 "insufficient authorization",
# 503 "mail transaction in progress", 501 "bad command parameter syntax".
NOT_AUTHORISED = Reply(550, "5.7.0", "Insufficient authorization")
IN_TRANSACTION = Reply(503, "5.5.1", "Mail transaction in progress")
FORWARD_OK = Reply(250, "2.0.0", "Ok")

_HOSTNAME = re.compile(r"^(?:[A-Za-z0-9_-]+(?:\.[A-Za-z0-9_-]+)*\.?|\[[A-Za-z0-9:.]+\])$")
_PROTO = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
_XTEXT_ESCAPE = re.compile(r"\+([0-9A-F]{2})")


class ForwardedSyntaxError(ValueError):
    """An attribute the server refuses; ``reply`` is the 501 to send."""

    def __init__(self, why: str):
        super().__init__(why)
        self.reply = replies.SYNTAX_ERROR.with_text(f"Bad XFORWARD/XCLIENT attribute: {why}")


def parse_attributes(arg: str, allowed: tuple[str, ...]) -> dict[str, Optional[str]]:
    """The ``NAME=value`` pairs of an XFORWARD or XCLIENT argument, names
    upper-cased, values xtext-decoded (RFC 3461 4) and checked; None for
    ``[UNAVAILABLE]``.  ``ForwardedSyntaxError`` for anything else."""
    pairs = arg.split()
    if not pairs:
        raise ForwardedSyntaxError("no attributes")
    out: dict[str, Optional[str]] = {}
    for pair in pairs:
        name, eq, raw = pair.partition("=")
        name = name.upper()
        if not eq or name not in allowed:
            raise ForwardedSyntaxError(f"unknown attribute {name[:32]!r}")
        if len(raw) > MAX_VALUE:
            raise ForwardedSyntaxError(f"{name} longer than {MAX_VALUE} characters")
        value = _xtext_decode(raw, name)
        out[name] = None if value.upper() in _UNAVAILABLE else _checked(name, value)
    return out


def _xtext_decode(raw: str, name: str) -> str:
    """RFC 3461 section 4: "+" and two upper-case hex digits stand for one
    octet.  Postfix before 2.3 sent values unencoded (XFORWARD_README note
    5): a value without "+" reads the same either way."""
    if "+" in _XTEXT_ESCAPE.sub("", raw):
        raise ForwardedSyntaxError(f"{name} is not xtext")
    return _XTEXT_ESCAPE.sub(lambda m: chr(int(m.group(1), 16)), raw)


def _checked(name: str, value: str) -> str:
    """XFORWARD_README note 1: no control characters, no whitespace, no
    non-ASCII; then what each attribute must look like, since the values go
    into our checks, logs and Received: header."""
    if not value or any(not 33 <= ord(c) <= 126 for c in value):
        raise ForwardedSyntaxError(f"{name} has an empty value or characters it must not have")
    if name in ("ADDR", "DESTADDR"):
        return client_address(value, name)
    if name in ("PORT", "DESTPORT"):
        if not value.isdigit() or int(value) > 65535:
            raise ForwardedSyntaxError(f"{name} is not a port number")
        return value
    if name in ("NAME", "HELO"):
        if not _HOSTNAME.match(value):
            raise ForwardedSyntaxError(f"{name} is not a host name or address literal")
        return value
    if name == "PROTO":
        if not _PROTO.match(value):
            raise ForwardedSyntaxError("PROTO is not a protocol name")
        return value.upper()
    if name == "SOURCE":
        if value.upper() not in ("LOCAL", "REMOTE"):
            raise ForwardedSyntaxError("SOURCE must be LOCAL or REMOTE")
        return value.upper()
    return value  # IDENT, LOGIN: logged only


def client_address(value: str, name: str = "ADDR") -> str:
    """An IPv4 or IPv6 address as the checks compare them; Postfix writes
    IPv6 addresses with an ``IPV6:`` prefix (XCLIENT_README)."""
    text = value[5:] if value[:5].upper() == "IPV6:" else value
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        raise ForwardedSyntaxError(f"{name} is not an IP address") from None
