"""A stored message's envelope and client, and how it was judged then.

Stage: the input of ``mppproxy replay``, after ``corpus``.  A message in a
mailbox has lost its SMTP envelope; the replay finds it again, in this
order, each fact on its own:

1. the ``X-MPP-*`` state an archive or quarantine copy carries
   (``archive/state.py``): the ``X-MPP-State`` blob when it decodes, else
   the readable fields (``X-MPP-Sender``, ``X-MPP-Recipients``,
   ``X-MPP-Client``, ``X-MPP-Helo``).  Not verified: replaying needs no
   key, and a forged state only misleads the one who replays it;
2. the trace fields a delivering MTA adds: ``Return-Path`` for the sender
   (RFC 5321 4.4), ``X-Original-To`` (every one; Postfix's recipient as
   given, before aliases) or else the topmost ``Delivered-To`` for the
   recipients, and for the client and its HELO the topmost ``Received``
   field whose ``from`` clause names an *external* address: not in
   ``trusted_networks``, not loopback, private (RFC 1918, RFC 6598, RFC
   4193) or link-local.  That is the hop where the message entered the
   site: the fields above it are the site's own relays;
3. the command line (``--sender``, ``--rcpt``, ``--client``, ``--helo``)
   for what neither gave; with ``--override-envelope`` it wins over both.

A message without recipients, sender or client after all three is not
judged (``EnvelopeMissing``, reported for that message).  The judgement
the message had then (``Past``) comes from the same state: the blob's
verdict, score, reasons and every engine's result (``--recorded`` replays
those), else ``X-MPP-Verdict``/``X-MPP-Score``, else the ``X-MPP-Scan``
result header a relayed message carries (score and action only).
"""
from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field
from typing import Callable, Optional

from mppproxy.archive.state import (CLIENT, HELO, RECIPIENTS, SCORE, SENDER, STATE, VERDICT,
                                    CheckState, CopyState, StateRefused, decode_state,
                                    parse_fields)
from mppproxy.results import Disposition, HardAction

# Addresses that are never the external client (see the module docstring).
_INTERNAL = tuple(ipaddress.ip_network(n) for n in (
    "127.0.0.0/8", "10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "100.64.0.0/10",
    "169.254.0.0/16", "0.0.0.0/8", "::1/128", "fc00::/7", "fe80::/10", "::/128"))
_FIELD_NAME = re.compile(rb"[!-9;-~]+[ \t]*:")
_ANGLE = re.compile(r"<([^<>]*)>")
_FROM_CLAUSE = re.compile(r"^\s*from\s+(\S+)(.*?)(?:\bby\b|;|$)", re.IGNORECASE | re.DOTALL)
_BRACKETED_IP = re.compile(r"\[(?:IPv6:)?([0-9A-Fa-f:.]+)\]", re.IGNORECASE)
_SCAN_RESULT = re.compile(r"score=(-?[0-9.]+)\s*;\s*action=([a-z]+)")

STATE_SOURCE, FIELD_SOURCE, HEADER_SOURCE, COMMAND_LINE = (
    "X-MPP-State", "X-MPP fields", "trace fields", "command line")


class EnvelopeMissing(ValueError):
    """The message cannot be judged: no header section, or an envelope
    fact found nowhere (the text says which and which option gives it)."""


@dataclass(frozen=True)
class Given:
    """The command line's envelope: defaults, or overrides with ``force``."""

    sender: Optional[str] = None
    recipients: tuple[str, ...] = ()
    client: Optional[str] = None
    helo: Optional[str] = None
    force: bool = False


@dataclass(frozen=True)
class Envelope:
    sender: str
    recipients: tuple[str, ...]
    client_ip: str
    helo: str
    smtputf8: bool = False
    # fact -> where it came from (STATE_SOURCE, ..., COMMAND_LINE).
    sources: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Past:
    """How the message was judged when it passed: from its X-MPP state."""

    disposition: Disposition
    score: float
    reasons: tuple[str, ...] = ()
    decided_by: str = ""
    policy: Optional[str] = None
    source: str = STATE_SOURCE
    # Engine name -> its recorded result (a hit), or None: it answered
    # clean.  Only engines that answered; from the X-MPP-State blob only.
    engines: dict[str, Optional[CheckState]] = field(default_factory=dict)


def header_fields(data: bytes) -> list[tuple[str, str]]:
    """The header fields of ``data`` (name, unfolded value); raises
    ``EnvelopeMissing`` when it does not start with a header field."""
    end = data.find(b"\r\n\r\n")
    section = data if end < 0 else data[:end + 2]
    if not _FIELD_NAME.match(section):
        raise EnvelopeMissing("not a message: it does not start with a header field")
    return [(name, " ".join(value.split())) for name, value in parse_fields(section)]


def read_envelope(data: bytes, given: Given,
                  trusted: Callable[[str], bool]) -> tuple[Envelope, Optional[Past]]:
    """The envelope of the message ``data`` and its past judgement (None
    when it carries none); see the module docstring.  ``trusted`` says
    whether an address is in the configuration's ``trusted_networks``."""
    fields = header_fields(data)
    by_name: dict[str, list[str]] = {}
    for name, value in fields:
        by_name.setdefault(name.lower(), []).append(value)
    state = _state(by_name)
    sources: dict[str, str] = {}

    def pick(fact: str, found: list[tuple[Optional[object], str]], option: Optional[object]) -> object:
        if option is not None and (given.force or all(v is None for v, _ in found)):
            sources[fact] = COMMAND_LINE
            return option
        for value, source in found:
            if value is not None:
                sources[fact] = source
                return value
        return None

    fields_rcpts = _addresses(by_name, RECIPIENTS)
    hop = _external_hop(by_name.get("received", []), trusted)
    sender = pick("sender", [
        (state.sender if state else None, STATE_SOURCE),
        (_first_address(by_name, SENDER), FIELD_SOURCE),
        (_first_address(by_name, "return-path"), HEADER_SOURCE)], given.sender)
    recipients = pick("recipients", [
        (state.recipients if state and state.recipients else None, STATE_SOURCE),
        (fields_rcpts or None, FIELD_SOURCE),
        (_header_recipients(by_name) or None, HEADER_SOURCE)], given.recipients or None)
    client = pick("client", [
        (state.client if state and state.client else None, STATE_SOURCE),
        (_first(by_name, CLIENT), FIELD_SOURCE),
        (hop[0] if hop else None, HEADER_SOURCE)], given.client)
    helo = pick("helo", [
        (state.helo if state else None, STATE_SOURCE),
        (_helo_field(by_name), FIELD_SOURCE),
        (hop[1] if hop else None, HEADER_SOURCE)], given.helo)
    if not recipients:
        raise EnvelopeMissing("no recipients: no X-MPP state, X-Original-To or Delivered-To "
                              "field (give --rcpt)")
    if sender is None:
        raise EnvelopeMissing("no envelope sender: no X-MPP state or Return-Path field "
                              "(give --sender; --sender '' is the null sender)")
    if not client:
        raise EnvelopeMissing("no client address: no X-MPP state and no Received field from "
                              "an external address (give --client)")
    assert isinstance(sender, str) and isinstance(client, str)
    rcpts = tuple(str(r) for r in recipients) if isinstance(recipients, (tuple, list)) else ()
    envelope = Envelope(sender, rcpts, client, str(helo or ""),
                        bool(state.smtputf8) if state else False, sources)
    return envelope, _past(state, by_name)


def _state(by_name: dict[str, list[str]]) -> Optional[CopyState]:
    blobs = by_name.get(STATE.lower())
    if not blobs:
        return None
    try:
        return decode_state("".join(blobs[0].split()))
    except StateRefused:
        return None  # the readable fields may still say enough


def _first(by_name: dict[str, list[str]], name: str) -> Optional[str]:
    values = by_name.get(name.lower())
    return values[0].strip() if values else None


def _first_address(by_name: dict[str, list[str]], name: str) -> Optional[str]:
    value = _first(by_name, name)
    if value is None:
        return None
    match = _ANGLE.search(value)
    return (match.group(1) if match else value).strip()


def _addresses(by_name: dict[str, list[str]], name: str) -> list[str]:
    value = _first(by_name, name)
    return [a.strip() for a in _ANGLE.findall(value)] if value else []


def _header_recipients(by_name: dict[str, list[str]]) -> list[str]:
    found: list[str] = []
    for value in by_name.get("x-original-to", []):
        for part in value.split(","):
            address = part.strip().strip("<>").strip()
            if address and address not in found:
                found.append(address)
    if not found:
        delivered = _first_address(by_name, "delivered-to")
        if delivered:
            found.append(delivered)
    return found


def _helo_field(by_name: dict[str, list[str]]) -> Optional[str]:
    value = _first(by_name, HELO)
    if value is None:
        return None
    return "" if value == "(none)" else value


def _external_hop(received: list[str], trusted: Callable[[str], bool]) -> Optional[tuple[str, str]]:
    """(client address, HELO) of the topmost Received field from an
    external address, or None."""
    for value in received:
        match = _FROM_CLAUSE.match(value)
        if match is None:
            continue
        helo, rest = match.group(1), match.group(2)
        for candidate in _BRACKETED_IP.findall(rest):
            try:
                ip = ipaddress.ip_address(candidate)
            except ValueError:
                continue
            if any(ip in net for net in _INTERNAL if net.version == ip.version):
                break
            if trusted(str(ip)):
                break
            return str(ip), helo
    return None


def _past(state: Optional[CopyState], by_name: dict[str, list[str]]) -> Optional[Past]:
    if state is not None:
        engines: dict[str, Optional[CheckState]] = {}
        for name in state.checks_passed:
            if name.startswith("scan:"):
                engines[name[5:]] = None
        for check in state.checks:
            if check.name.startswith("scan:") and not check.skipped:
                engines[check.name[5:]] = check
        return Past(state.verdict, state.score, state.reasons, decided_by(state.checks),
                    state.policy, STATE_SOURCE, engines)
    verdict, score = _first(by_name, VERDICT), _first(by_name, SCORE)
    if verdict is not None:
        try:
            return Past(Disposition(verdict), float(score or 0), source=FIELD_SOURCE)
        except ValueError:
            pass
    scan = _first(by_name, "X-MPP-Scan")
    match = _SCAN_RESULT.search(scan or "")
    if match is not None:
        try:
            return Past(Disposition(match.group(2)), float(match.group(1)), source="X-MPP-Scan")
        except ValueError:
            pass
    return None


def decided_by(checks: tuple[CheckState, ...]) -> str:
    """The check that decided a recorded judgement: the first hard
    refusal, else the first hold, else "score" when something scored."""
    for wanted in ((HardAction.REJECT, HardAction.TEMPFAIL), (HardAction.QUARANTINE,)):
        for check in checks:
            if check.action in wanted:
                return check.name
    return "score" if any(c.score for c in checks) else ""
