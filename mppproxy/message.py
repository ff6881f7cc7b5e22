"""The message as it leaves the proxy: our Received: header on top, X-MPP-*
headers from outside removed, the rest of the spool untouched.

Stage: between DATA and the action.  DESIGN.md promise 7: ``X-MPP-*`` headers
carry scan state to the archive node, so none may arrive from the internet.
"""
from __future__ import annotations

import email.utils
import time
from typing import Iterator, Optional

from mppproxy.smtp.session import Session, Transaction
from mppproxy.spool.spool import Spool

TRUST_PREFIX = b"x-mpp-"
# The header block is read into memory to strip headers; past this bound the
# message is refused (a header block this big is an attack, not mail).
MAX_HEADER_BLOCK = 4 * 1024 * 1024


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


def _header_block(spool: Spool) -> tuple[bytes, int]:
    """The header block (ending with its blank line, if any) and its length
    in the spool."""
    head = b""
    for chunk in spool.chunks():
        head += chunk
        if head.startswith(b"\r\n"):
            return b"", 0  # no headers at all: the message starts with the body
        end = head.find(b"\r\n\r\n")
        if end >= 0:
            return head[:end + 2], end + 2
        if len(head) > MAX_HEADER_BLOCK:
            raise HeaderBlockTooLarge()
    return head, len(head)


def strip_trust_headers(block: bytes) -> tuple[bytes, int]:
    """Remove every field whose name starts with X-MPP- (case-insensitive),
    with its folded continuation lines.  Returns the block and how many went."""
    if TRUST_PREFIX not in block.lower():
        return block, 0
    out = []
    removed = 0
    skipping = False
    for line in block.split(b"\r\n"):
        if line[:1] in (b" ", b"\t") and line:
            if not skipping:
                out.append(line)
            continue
        skipping = line.lower().startswith(TRUST_PREFIX)
        if skipping:
            removed += 1
        else:
            out.append(line)
    return b"\r\n".join(out), removed


class OutboundMessage:
    """What goes to the backend or the maildir: a prefix of new or cleaned
    headers, then the spool's content from ``offset`` on."""

    def __init__(self, prefix: bytes, spool: Spool, offset: int):
        self.prefix = prefix
        self.spool = spool
        self.offset = offset

    @property
    def size(self) -> int:
        return len(self.prefix) + self.spool.size - self.offset

    def chunks(self) -> Iterator[bytes]:
        yield self.prefix
        skip = self.offset
        for chunk in self.spool.chunks():
            if skip >= len(chunk):
                skip -= len(chunk)
                continue
            yield chunk[skip:] if skip else chunk
            skip = 0


def prepare(session: Session, txn: Transaction, hostname: Optional[str]) -> tuple[OutboundMessage, int]:
    """The outbound message and the number of X-MPP-* headers removed."""
    assert txn.spool is not None
    block, length = _header_block(txn.spool)
    cleaned, removed = strip_trust_headers(block)
    prefix = received_header(session, txn, hostname) if hostname else b""
    if removed:
        return OutboundMessage(prefix + cleaned, txn.spool, length), removed
    return OutboundMessage(prefix, txn.spool, 0), 0
