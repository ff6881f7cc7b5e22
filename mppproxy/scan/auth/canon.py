"""DKIM canonicalisation (RFC 6376 3.4) and the two hashes a signature
covers (3.7): the header fields it names and its body, on the octets the
proxy already holds.

Stage: scanning, a building block of DKIM (``scan/auth/dkim.py``), which
runs dkimpy instead whenever ``split`` says the message is not plain
(dkimpy is the reference; tests/test_dkim_lean.py checks that both agree).

``split`` takes a message only when its header section is plain RFC 5322:
every line ends in CRLF, no bare CR or LF, each field starts with a name of
printable characters and a colon, continuation lines start with WSP, and
the body has no bare LF.  That is what dkimpy's own parse gives back
unchanged; for anything else (an mbox "From " line, "Name :" with a space,
bare LF) dkimpy's rewriting of the message is what the answer must follow,
so it gets the message.  A plain message costs two regular-expression
passes here instead of dkimpy's per-line Python loop.
"""
from __future__ import annotations

import re
from typing import NamedTuple, Optional, Sequence

# One plain field (see the module docstring) with its CRLFs; the name is
# dkimpy's: up to the first colon.
_FIELD = re.compile(rb"([\x21-\x39\x3b-\x7e]+):([^\r\n]*\r\n(?:[ \t][^\r\n]*\r\n)*)")
# RFC 6376 3.4.2 and 3.4.4.  dkimpy replaces every run of WSP, single
# spaces too; only the runs that change (two or more, or a tab) are
# matched here: the same text, without a Python-level replacement per word
# (a 1 KiB body cost 29 us that way, 2 us this way).
_WSP_RUN = re.compile(rb"[\t ]{2,}|\t")
_TRAILING_WSP = re.compile(rb"[\t ]+\r\n")
# The b= value to empty in the signature field (3.7).  dkimpy's pattern is
# ``([;\s]b FWS =)(?: FWS [a-zA-Z0-9+/=])*(?:\r?\n\Z)?`` with FWS
# ``(?:(?:\s*\r?\n)?\s+)?``, which matches exactly the runs ``\s*`` matches;
# so each repetition is "white space, then one base64 character", and the
# longest such prefix is the longest run of base64 characters and white
# space that ends on a base64 character: the same matches, found in 5 us
# instead of 39 (tests/test_dkim_lean.py compares the two patterns).
DKIMPY_B_TAG = re.compile(rb"([;\s]b(?:(?:\s*\r?\n)?\s+)?=)(?:(?:(?:\s*\r?\n)?\s+)?"
                          rb"[a-zA-Z0-9+/=])*(?:\r?\n\Z)?")
B_TAG = re.compile(rb"([;\s]b\s*=)(?:[a-zA-Z0-9+/=\s]*[a-zA-Z0-9+/=])?(?:\r?\n\Z)?")


class Message(NamedTuple):
    """A plain message split: ``fields`` (name as written, value after the
    colon with its CRLFs), ``names`` (lower case), ``body`` (after the
    empty line; b"" when there is none)."""

    fields: list[tuple[bytes, bytes]]
    names: list[bytes]
    body: bytes


def split(message: bytes) -> Optional[Message]:
    """The message split into fields and body, or None when it is not
    plain (dkimpy decides then)."""
    if message.startswith(b"\r\n"):
        header, body = b"", message[2:]
    else:
        end = message.find(b"\r\n\r\n")
        if end < 0:
            header, body = message, b""
        else:
            header, body = message[:end + 2], message[end + 4:]
    if body.count(b"\n") != body.count(b"\r\n"):
        # dkimpy reads a bare LF as a line end and hashes CRLF for it.
        return None
    fields = _FIELD.findall(header)
    # The fields found tile the whole section (nothing skipped between
    # them) exactly when it is plain: one pass instead of a match first.
    if sum(len(name) + len(value) + 1 for name, value in fields) != len(header):
        return None
    return Message(fields, [name.lower() for name, _ in fields], body)


def _strip_trailing_lines(body: bytes) -> bytes:
    """3.4.3/3.4.4: empty lines at the end removed, one CRLF at the end
    (added when missing); the same loop as dkimpy's."""
    end: Optional[int] = None
    while body.endswith(b"\r\n", 0, end):
        end = -2 if end is None else end - 2
    if end is None:
        return body + b"\r\n"
    end += 2
    return body if end == 0 else body[:end]


def canonical_body(body: bytes, relaxed: bool) -> bytes:
    """The body by "simple" (3.4.3) or "relaxed" (3.4.4)."""
    if not relaxed:
        return _strip_trailing_lines(body)
    # The searches first: most bodies have nothing to change, and a scan
    # for two octets is far cheaper than a regular expression's.
    if b" \r\n" in body or b"\t\r\n" in body:
        body = _TRAILING_WSP.sub(b"\r\n", body)
    if b"\t" in body or b"  " in body:
        body = _WSP_RUN.sub(b" ", body)
    body = _strip_trailing_lines(body)
    # 3.4.4: an empty body stays empty (dkimpy: CRLF becomes nothing).
    return b"" if body == b"\r\n" else body


def _relaxed_field(name: bytes, value: bytes) -> bytes:
    # 3.4.2: name lower case, unfolded (a plain field has CRLF and no bare
    # CR or LF), WSP runs one space, white space at the ends removed
    # (bytes.strip, as dkimpy), CRLF after.
    value = value.replace(b"\r\n", b"")
    if b"\t" in value or b"  " in value:
        value = _WSP_RUN.sub(b" ", value)
    return name.lower() + b":" + value.strip() + b"\r\n"


def header_data(msg: Message, signed: Sequence[bytes], sig_position: int,
                relaxed: bool) -> bytes:
    """What the header hash covers (3.7): the fields h= names, each taken
    from the bottom up (5.4.2; a name listed more often than it occurs
    adds nothing), canonicalised, then the DKIM-Signature field at
    ``sig_position`` with b= emptied and without its final CRLF.

    As dkimpy (its bug 644046), "from" in h= counts one more time, so a
    second From: field above the signed one breaks the signature."""
    names = msg.names
    fields = msg.fields
    include = list(signed)
    if b"from" in include:
        include.append(b"from")
    parts: list[bytes] = []
    last: dict[bytes, int] = {}
    count = len(fields)
    for h in include:
        i = last.get(h, count)
        while i > 0:
            i -= 1
            if names[i] == h:
                name, value = fields[i]
                parts.append(_relaxed_field(name, value) if relaxed else name + b":" + value)
                break
        last[h] = i
    name, value = fields[sig_position]
    value = B_TAG.sub(b"\\1", value)
    if relaxed:
        parts.append(_relaxed_field(name, value).rstrip())
    else:
        # dkimpy strips all trailing white space, not just the CRLF.
        parts.append(name + b":" + value.rstrip())
    return b"".join(parts)
