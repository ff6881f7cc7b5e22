"""Envelope addresses: parse MAIL FROM / RCPT TO arguments and judge relay.

Stage: session (parsing) and relay control.  RFC 5321 4.1.2 gives the
grammar: ``Path = "<" [ A-d-l ":" ] Mailbox ">"``; the source route (A-d-l)
is ignored as 4.1.1.3 and appendix C say.  Parameters (``SIZE=``, ``BODY=``,
``SMTPUTF8``, DSN's ``RET``/``ENVID``/``NOTIFY``/``ORCPT``) follow the path
separated by spaces (4.1.2 Mail-parameters / Rcpt-parameters).
"""
from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from typing import Iterable, Optional

import idna

# RFC 5321 4.1.2: esmtp-keyword = (ALPHA / DIGIT) *(ALPHA / DIGIT / "-")
_KEYWORD = re.compile(r"^[A-Za-z0-9][A-Za-z0-9-]*$")
# esmtp-value: any CHAR except "=", SP and control characters.
_VALUE = re.compile(r"^[\x21-\x3c\x3e-\x7e\x80-\U0010ffff]+$")
# RFC 5321 4.1.2 sub-domain (letters, digits, inner hyphens; UTF-8 per RFC
# 6531), and a whole domain of them: one match instead of one per label.
_LABEL = r"[A-Za-z0-9\x80-\U0010ffff](?:[A-Za-z0-9\x80-\U0010ffff-]*[A-Za-z0-9\x80-\U0010ffff])?"
_DOMAIN = re.compile(rf"{_LABEL}(?:\.{_LABEL})*")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
# RFC 5321 4.1.2 atext for a Dot-string local part (plus UTF-8, RFC 6531),
# and the Dot-string itself: atoms joined by single dots.
_ATOM = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~\x80-\U0010ffff-]+"
_DOT_STRING = re.compile(rf"{_ATOM}(?:\.{_ATOM})*")


class AddressError(ValueError):
    """The argument is not a path we accept."""


@dataclass(frozen=True)
class Address:
    """A mailbox as sent (``text``) and its parts.  ``text`` is what the
    backend will see, without any source route."""

    text: str
    local: str
    domain: str  # as sent: a name, or an address literal in brackets

    @property
    def is_null(self) -> bool:
        return self.text == ""

    @property
    def ascii_only(self) -> bool:
        return self.text.isascii()


NULL_PATH = Address("", "", "")


def split_argument(arg: str, prefix: str) -> tuple[str, dict[str, Optional[str]]]:
    """Split ``FROM:<a@b> SIZE=10`` into the path text and its parameters.

    Tolerates a space after the colon (common in the wild) but nothing else
    outside the grammar."""
    if arg[:len(prefix)].upper() != prefix:
        raise AddressError(f"expected {prefix}")
    rest = arg[len(prefix):].lstrip(" ")
    if rest.startswith("<"):
        close = _find_closing_bracket(rest)
        path, params_text = rest[:close + 1], rest[close + 1:]
        if params_text and not params_text.startswith(" "):
            raise AddressError("text after the path")
    else:
        # Postfix and others accept a bare address without brackets; so do we,
        # but then it cannot contain spaces.
        path, _, params_text = rest.partition(" ")
        if not path:
            raise AddressError("missing path")
        params_text = " " + params_text if params_text else ""
    params: dict[str, Optional[str]] = {}
    for word in params_text.split(" "):
        if not word:
            continue
        key, eq, value = word.partition("=")
        if not _KEYWORD.match(key) or (eq and not _VALUE.match(value)):
            raise AddressError(f"bad parameter {word!r}")
        ukey = key.upper()
        if ukey in params:
            raise AddressError(f"parameter {ukey} given twice")
        params[ukey] = value if eq else None
    return path, params


def _find_closing_bracket(text: str) -> int:
    """Index of the ``>`` closing the path, skipping quoted local parts."""
    if '"' not in text:
        # No quoted part (nearly every path): the first ">" closes it.
        close = text.find(">", 1)
        if close < 0:
            raise AddressError("unterminated path")
        return close
    quoted = False
    i = 1
    while i < len(text):
        c = text[i]
        if quoted and c == "\\":
            i += 2
            continue
        if c == '"':
            quoted = not quoted
        elif c == ">" and not quoted:
            return i
        i += 1
    raise AddressError("unterminated path")


def parse_path(path: str, allow_null: bool) -> Address:
    """Parse ``<local@domain>`` (or ``<>`` where allowed)."""
    if path.startswith("<"):
        if not path.endswith(">"):
            raise AddressError("unterminated path")
        inner = path[1:-1]
    else:
        inner = path
    if _CONTROL.search(inner):
        raise AddressError("control character in address")
    if inner == "":
        if allow_null:
            return NULL_PATH
        raise AddressError("empty path")
    # RFC 5321 4.1.2 A-d-l: "@one,@two:" before the mailbox; ignored (4.1.1.3).
    if inner.startswith("@"):
        route, colon, inner = inner.partition(":")
        if not colon:
            raise AddressError("source route without mailbox")
        for hop in route.split(","):
            if not hop.startswith("@") or not _valid_domain(hop[1:]):
                raise AddressError("bad source route")
    local, domain = _split_mailbox(inner)
    if domain and not (_valid_domain(domain) or _valid_literal(domain)):
        raise AddressError("bad domain")
    if not _valid_local(local):
        raise AddressError("bad local part")
    return Address(inner, local, domain)


def _split_mailbox(mailbox: str) -> tuple[str, str]:
    if mailbox.startswith('"'):
        i = 1
        while i < len(mailbox):
            if mailbox[i] == "\\":
                i += 2
                continue
            if mailbox[i] == '"':
                break
            i += 1
        else:
            raise AddressError("unterminated quoted local part")
        local, rest = mailbox[:i + 1], mailbox[i + 1:]
        if rest == "":
            return local, ""
        if rest == "@":
            raise AddressError("missing domain")
        if not rest.startswith("@"):
            raise AddressError("text after quoted local part")
        return local, rest[1:]
    local, at, domain = mailbox.rpartition("@")
    if at and not domain:
        raise AddressError("missing domain")
    if not at:
        # RFC 5321 4.1.1.3: "Postmaster" without a domain must be accepted.
        return mailbox, ""
    return local, domain


def _valid_local(local: str) -> bool:
    if local.startswith('"'):
        return len(local) >= 2 and local.endswith('"')
    return _DOT_STRING.fullmatch(local) is not None


def _valid_domain(domain: str) -> bool:
    d = domain[:-1] if domain.endswith(".") else domain
    if not d or len(d) > 255:
        return False
    return _DOMAIN.fullmatch(d) is not None


def _valid_literal(domain: str) -> bool:
    # RFC 5321 4.1.3 address literals: [192.0.2.1] or [IPv6:2001:db8::1].
    if not (domain.startswith("[") and domain.endswith("]")):
        return False
    inner = domain[1:-1]
    if inner[:5].lower() == "ipv6:":
        inner = inner[5:]
        version = 6
    else:
        version = 4
    try:
        return ipaddress.ip_address(inner).version == version
    except ValueError:
        return False


def normalise_domain(domain: str) -> str:
    """Lower case, no trailing dot, IDNA A-labels: the form relay control
    compares, so ``Example.COM.`` and ``example.com`` are one domain."""
    d = domain.strip().rstrip(".").lower()
    if not d.isascii():
        try:
            # IDNA 2008 (UTS 46, non-transitional): Python's own "idna"
            # codec is IDNA 2003 and maps straße.de to strasse.de.
            d = idna.encode(d, uts46=True, transitional=False).decode("ascii")
        except (UnicodeError, idna.IDNAError):
            return d
    return d


class RelayDomains:
    """The domains the proxy accepts mail for from anyone.

    ``example.com`` matches that domain only; ``.example.com`` matches its
    subdomains (Postfix's ``relay_domains`` notation)."""

    def __init__(self, domains: Iterable[str]):
        self._exact: set[str] = set()
        self._parents: set[str] = set()
        for d in domains:
            if d.startswith("."):
                self._parents.add(normalise_domain(d[1:]))
            else:
                self._exact.add(normalise_domain(d))

    def __contains__(self, domain: str) -> bool:
        d = normalise_domain(domain)
        if d in self._exact:
            return True
        labels = d.split(".")
        return any(".".join(labels[i:]) in self._parents for i in range(1, len(labels)))


# Characters that make some MTA route on the local part: the percent hack
# (user%host@relay), UUCP bang paths (host!user@relay), and a quoted "@".
_ROUTING_CHARS = ("%", "!", "@")


def relay_refusal_reason(address: Address, domains: RelayDomains) -> Optional[str]:
    """Why an untrusted client may not send to ``address``, or None.

    docs/design.md promise 3: whatever the address form, a recipient outside the
    relay domains is refused before the backend hears of it."""
    if not address.domain:
        if address.local.lower() == "postmaster":
            return None
        return "no domain"
    if address.domain.startswith("["):
        return "address literal"
    if any(c in address.local for c in _ROUTING_CHARS):
        return "routing characters in the local part"
    if address.domain not in domains:
        return "domain not relayed"
    return None
