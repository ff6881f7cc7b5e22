"""The Subject a stored copy is listed with (floor 1, for ``store.py``):
taken from the raw message's header section, RFC 2047 encoded-words
decoded, whitespace folded, cut to the column's length.

A copy is stored whatever its header holds: this never raises.  A message
without a header section, 8-bit bytes in an unencoded Subject, a broken
encoded-word or an unknown charset give the best text that can be read
(undecodable bytes become U+FFFD) or an empty subject.
"""
from __future__ import annotations

import re
from email.errors import HeaderParseError
from email.header import decode_header, make_header

from mppproxy.store.schema import SUBJECT_LENGTH

# The header section ends at the first empty line (RFC 5322 2.1); a
# Subject past this many bytes of header is not looked for.
HEADER_SCAN_LIMIT = 256 * 1024
_END = re.compile(rb"\r?\n\r?\n")
_SUBJECT = re.compile(rb"^subject[ \t]*:(.*(?:\r?\n[ \t].*)*)", re.IGNORECASE | re.MULTILINE)
_SPACE = re.compile(r"\s+")


def header_section(message: bytes) -> bytes:
    """The bytes before the first empty line (all of them if there is
    none; nothing if the message starts with one)."""
    head = message[:HEADER_SCAN_LIMIT]
    if head.startswith((b"\r\n", b"\n")):
        return b""
    end = _END.search(head)
    return head[:end.start()] if end else head


def subject_of(message: bytes, limit: int = SUBJECT_LENGTH) -> str:
    """The decoded, folded Subject of ``message``, at most ``limit``
    characters; "" when it has none."""
    found = _SUBJECT.search(header_section(message))
    if found is None:
        return ""
    # Unfold (RFC 5322 2.2.3); 8-bit bytes (RFC 6532 allows UTF-8 here)
    # read as UTF-8 where they are, replaced where they are not.
    value = found.group(1).replace(b"\r", b"").replace(b"\n", b"")
    text = decode_words(value.decode("utf-8", "replace"))
    return _SPACE.sub(" ", text).strip()[:limit]


def decode_words(value: str) -> str:
    """``value`` with its RFC 2047 encoded-words decoded; the raw text
    when they cannot be (a bad charset, broken base64)."""
    if "=?" not in value:
        return value
    try:
        return str(make_header(decode_header(value)))
    except (HeaderParseError, LookupError, UnicodeError, ValueError, AssertionError):
        # LookupError: an unknown charset; UnicodeError: bytes not in the
        # named one; ValueError/AssertionError: what email.header raises
        # on some malformed words.  Decode word by word instead, each
        # part on its own terms.
        return _decode_loose(value)


def _decode_loose(value: str) -> str:
    parts: list[str] = []
    try:
        pieces = decode_header(value)
    except (HeaderParseError, ValueError, AssertionError):
        return value
    for data, charset in pieces:
        if isinstance(data, str):
            parts.append(data)
            continue
        try:
            parts.append(data.decode(charset or "ascii", "replace"))
        except LookupError:
            parts.append(data.decode("utf-8", "replace"))
    return "".join(parts)
