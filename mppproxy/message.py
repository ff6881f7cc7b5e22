"""The message as it leaves the proxy: our Received: header on top, X-MPP-*
headers from outside removed, the rest of the spool untouched.

Stage: between DATA and the action.  docs/design.md promise 7: ``X-MPP-*`` headers
carry scan state to the archive node, so none may arrive from the internet.
"""
from __future__ import annotations

import email.header
import email.utils
import re
import time
from typing import Iterable, Iterator, Optional

from mppproxy.smtp.session import Session, Transaction
from mppproxy.spool.spool import Spool

TRUST_PREFIX = b"x-mpp-"
# A header section longer than this is refused: it is an attack, not mail
# (Postfix keeps at most 100 KiB of headers, header_size_limit).
MAX_HEADER_BLOCK = 4 * 1024 * 1024
# RFC 5322 2.2: a field name is printable ASCII but ":", then ":"; WSP before
# the colon is the obsolete syntax (4.5.8) that MTAs still accept.
_FIELD = re.compile(rb"[!-9;-~]+[ \t]*:")


class HeaderBlockTooLarge(Exception):
    pass


_date_cache: list = [0, ""]


def _date_now() -> str:
    """RFC 5322 date of this second; formatting it per message showed in
    profiles, and a second is the field's resolution anyway."""
    now = int(time.time())
    if _date_cache[0] != now:
        _date_cache[0], _date_cache[1] = now, email.utils.formatdate(now, localtime=True)
    return _date_cache[1]


def received_header(session: Session, txn: Transaction, hostname: str) -> bytes:
    """RFC 5321 4.4 trace field.  The client's HELO is its own claim and is
    shown as such; the address is what we saw."""
    helo = (session.helo or "unknown").replace("\r", "").replace("\n", "")
    proto = "ESMTP" if session.esmtp else "SMTP"
    if session.tls:
        proto += "S"  # RFC 3848
    if txn.smtputf8:
        proto = "UTF8" + proto  # RFC 6531 3.7.3
    for_clause = f"\r\n\tfor <{txn.recipients[0].text}>" if len(txn.recipients) == 1 else ""
    date = _date_now()
    text = (f"Received: from {helo} ([{session.peer_host}])\r\n"
            f"\tby {hostname} (mppproxy) with {proto} id {txn.id}{for_clause};\r\n"
            f"\t{date}\r\n")
    return text.encode("utf-8", "replace")


def format_header(name: str, value: str) -> bytes:
    """One header field we add, folded at spaces to stay under 78 octets a
    line where it can (RFC 5322 2.1.1, 2.2.3).  CR, LF and other controls in
    the value (which may quote client text) become spaces, so a value can
    never start a new header."""
    clean = "".join(c if c.isprintable() else " " for c in value)
    words = clean.split(" ")
    lines: list[str] = []
    line = f"{name}:"
    for word in words:
        if not word:
            continue
        if len(line) + 1 + len(word) > 78 and line.strip() and line != f"{name}:":
            lines.append(line)
            line = "\t" + word
        else:
            line += " " + word
    lines.append(line)
    return ("\r\n".join(lines) + "\r\n").encode("utf-8", "replace")


def _header_lines(spool: Spool) -> Iterator[bytes]:
    """The lines of the header section, each with its CRLF; the empty line
    that ends it is not yielded.  The section ends at the first empty line,
    or before the first line that is neither a field nor a continuation, as
    Postfix's cleanup and Python's email parser also read it."""
    carry = b""
    length = 0
    for chunk in spool.chunks():
        data = carry + chunk
        start = 0
        while True:
            end = data.find(b"\r\n", start)
            if end < 0:
                break
            line = data[start:end + 2]
            start = end + 2
            if line == b"\r\n":
                return
            if line[:1] in (b" ", b"\t"):
                # A leading folded line is kept in the header section: under
                # our Received: header it becomes that field's continuation,
                # and the fields after it are headers downstream, so they
                # must be checked here too (docs/design.md promise 7).
                pass
            elif not _FIELD.match(line):
                return
            length += len(line)
            if length > MAX_HEADER_BLOCK:
                raise HeaderBlockTooLarge()
            yield line
        carry = data[start:]
        if len(carry) > MAX_HEADER_BLOCK:
            raise HeaderBlockTooLarge()


def _has_trust_headers(spool: Spool) -> tuple[bool, int]:
    """Whether the header section holds an X-MPP-* field, and its length
    (only needed, and only exact, when one is found)."""
    # Fast path for nearly every message: the header section ends at the
    # first empty line at the latest, so if "x-mpp-" occurs nowhere before
    # it, no field needs reading line by line.
    for first in spool.chunks():
        end = first.find(b"\r\n\r\n")
        if end >= 0 and TRUST_PREFIX not in first[:end + 2].lower():
            return False, 0
        break
    found = False
    length = 0
    for line in _header_lines(spool):
        length += len(line)
        if line[:6].lower() == TRUST_PREFIX:
            found = True
    return found, length


def strip_trust_headers(spool: Spool, length: int, out: Spool) -> int:
    """Copy the message into ``out`` without X-MPP-* fields (and their
    folded continuation lines); return how many fields went.  ``out`` is a
    spool like the client's, so memory stays bounded (docs/design.md promise 6)."""
    removed = 0
    skipping = False
    for line in _header_lines(spool):
        if line[:1] in (b" ", b"\t"):
            if not skipping:
                out.write(line)
            continue
        skipping = line[:6].lower() == TRUST_PREFIX
        if skipping:
            removed += 1
        else:
            out.write(line)
    skip = length
    for chunk in spool.chunks():
        if skip >= len(chunk):
            skip -= len(chunk)
            continue
        out.write(chunk[skip:] if skip else chunk)
        skip = 0
    return removed


class OutboundMessage:
    """What goes to the backend or the maildir: a prefix of new or cleaned
    headers, then the spool's content from ``offset`` on.

    A rewrite of the message's own header section (the Subject prefix)
    moves that section, which is bounded (MAX_HEADER_BLOCK), into
    ``header``; the body still streams from the spool.  A rewrite of the
    body (a disclaimer) replaces it with ``body`` in memory, bounded by the
    caller."""

    def __init__(self, prefix: bytes, spool: Spool, offset: int):
        self.prefix = prefix
        self.spool = spool
        self.offset = offset
        self.header = b""
        self.body: Optional[bytes] = None
        self._header_split = False

    @property
    def size(self) -> int:
        if self.body is not None:
            return len(self.prefix) + len(self.header) + len(self.body)
        return len(self.prefix) + len(self.header) + self.spool.size - self.offset

    def chunks(self) -> Iterator[bytes]:
        yield self.prefix
        if self.header:
            yield self.header
        if self.body is not None:
            yield self.body
            return
        yield from self.chunks_after_header()

    def header_section(self) -> bytes:
        """The message's own header fields (not the prefix), each line with
        its CRLF, without the empty line that ends the section."""
        if not self._header_split:
            assert self.offset == 0, "header rewrite after an offset was set"
            lines = list(_header_lines(self.spool))
            self.header = b"".join(lines)
            self.offset = len(self.header)
            self._header_split = True
        return self.header

    def body_bytes(self) -> bytes:
        """Everything after the header fields (the empty line first), in
        memory: only for messages the caller has bounded."""
        self.header_section()
        if self.body is not None:
            return self.body
        return b"".join(self.chunks_after_header())

    def chunks_after_header(self) -> Iterator[bytes]:
        """The spool's content from ``offset`` on (past the header fields
        once they were split off)."""
        skip = self.offset
        for chunk in self.spool.chunks():
            if skip >= len(chunk):
                skip -= len(chunk)
                continue
            yield chunk[skip:] if skip else chunk
            skip = 0

    def add_subject_prefix(self, prefix: str) -> None:
        """Put ``prefix`` before the Subject (a tagged message).  The
        existing value is kept octet for octet, encoded words included
        (RFC 2047 5: an encoded word must be separated from other text by
        white space, which the prefix's own trailing space gives; a prefix
        that is not ASCII is written as an encoded word of its own).  A
        message without a Subject gets one."""
        if not prefix:
            return
        if prefix.isascii():
            word = prefix.encode("ascii")
        else:
            word = email.header.Header(prefix.rstrip(" "), "utf-8").encode().encode("ascii") + (
                b" " if prefix.endswith(" ") else b"")
        header = self.header_section()
        lines = header.splitlines(keepends=True)
        for i, line in enumerate(lines):
            if line[:8].lower() == b"subject:":
                value = line[8:]
                stripped = value.lstrip(b" \t")
                if stripped.startswith(word):
                    # Tagged once already (by us upstream, or a resend).
                    return
                if stripped.startswith(b"=?") and not word.endswith(b" "):
                    word += b" "
                lines[i] = b"Subject: " + word + stripped
                break
        else:
            lines.append(format_header("Subject", "").rstrip(b"\r\n") + b" " + word.rstrip(b" ")
                         + b"\r\n")
        self.header = b"".join(lines)

    def replace_content(self, header: bytes, body: bytes) -> None:
        """Set the message's own header section and body (a rewrite done
        in memory); the spool is no longer read."""
        self.header_section()
        self.header = header
        self.body = body


def prepare(session: Session, txn: Transaction, hostname: Optional[str],
            spool_limit: int = 1048576, spool_dir: Optional[str] = None,
            extra_headers: Iterable[tuple[str, str]] = ()) -> tuple[OutboundMessage, int]:
    """The outbound message and the number of X-MPP-* headers removed.  When
    some were removed, ``txn.spool`` is replaced by the cleaned copy.
    ``extra_headers`` (Authentication-Results, X-Spam-*) go right below our
    Received:, as trace and result fields belong on top (RFC 8601 2.1)."""
    assert txn.spool is not None
    prefix = received_header(session, txn, hostname) if hostname else b""
    for name, value in extra_headers:
        prefix += format_header(name, value)
    found, length = _has_trust_headers(txn.spool)
    if not found:
        return OutboundMessage(prefix, txn.spool, 0), 0
    cleaned = Spool(spool_limit, spool_dir)
    try:
        removed = strip_trust_headers(txn.spool, length, cleaned)
    except BaseException:
        cleaned.close()
        raise
    txn.spool.close()
    txn.spool = cleaned
    return OutboundMessage(prefix, cleaned, 0), removed
