"""The message as it leaves the proxy: our Received: header on top, X-MPP-*
headers from outside removed, the rest of the spool untouched.

Stage: between DATA and the action.  docs/design.md promise 7: ``X-MPP-*`` headers
carry scan state to the archive node, so none may arrive from the internet.
The same holds for the other verdicts downstream trusts (``HeaderRules``):
``X-Spam-*`` fields and ``Authentication-Results`` claiming our authserv-id
(RFC 8601 section 5) are removed too, and a message that has looped (more
Received: fields than limits.max_hop_count, RFC 5321 6.3) is refused before
anything of it is relayed or delivered.
"""
from __future__ import annotations

import email.header
import email.utils
import fnmatch
import functools
import re
import time
from dataclasses import dataclass
from typing import Iterable, Iterator, Optional

import authres  # no stubs: pyproject.toml [tool.mypy] overrides ignore its imports

from mppproxy.smtp import replies
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


class TooManyHops(Exception):
    """The message carries more Received: fields than the limit: a mail
    loop (RFC 5321 6.3).  Carries the refusal and the count for the log."""

    def __init__(self, hops: int, limit: int):
        super().__init__(f"{hops} Received: header fields, more than limits.max_hop_count {limit}")
        self.hops = hops
        self.limit = limit
        # The count in the reply: the sender's bounce and our text log line
        # both say why.
        self.reply = replies.TOO_MANY_HOPS.with_text(
            f"Too many hops ({hops} Received: header fields, limit {limit}): mail loop suspected")


@dataclass(frozen=True)
class HeaderRules:
    """What ``prepare`` enforces on the client's header section, besides
    removing X-MPP-* (always).  The default does nothing more; the edge
    builds the configured one with ``header_rules``."""

    # More Received: fields than this: refused (0: no limit).
    max_hops: int = 0
    # Field names to remove, as one case-insensitive regular expression
    # (from glob patterns); None removes none.
    strip: Optional[re.Pattern[bytes]] = None
    # Lower-case authserv-ids whose Authentication-Results are removed.
    authserv_ids: frozenset[str] = frozenset()
    # Lower-case byte strings, each after a b"\n", that a header section
    # must contain for any field in it to be removed (the fast path).
    markers: tuple[bytes, ...] = (b"\n" + TRUST_PREFIX,)

    def removes(self, name: bytes, field: bytes) -> bool:
        """Whether the field named ``name`` (lower case), whose lines are
        ``field``, is removed."""
        if name.startswith(TRUST_PREFIX):
            return True
        if self.strip is not None and self.strip.fullmatch(name):
            return True
        return (name == b"authentication-results" and bool(self.authserv_ids)
                and _claims_authserv_id(field, self.authserv_ids))


@functools.lru_cache(maxsize=16)
def header_rules(max_hops: int, strip: tuple[str, ...], authserv_ids: tuple[str, ...]) -> HeaderRules:
    """The rules for smtp.strip_headers, smtp.authserv_ids (with our own
    name among them) and limits.max_hop_count; built once per distinct
    configuration."""
    pattern = None
    markers = [b"\n" + TRUST_PREFIX]
    if strip:
        regex = "|".join(fnmatch.translate(p.lower()) for p in strip)
        pattern = re.compile(regex.encode("ascii"), re.IGNORECASE)
        # The literal part of each pattern before its first wildcard; a
        # pattern that starts with one makes every message take the slow path.
        markers += [b"\n" + re.split(r"[*?\[]", p.lower(), maxsplit=1)[0].encode("ascii") for p in strip]
    ids = frozenset(_normal_id(i) for i in authserv_ids if i)
    if ids:
        markers.append(b"\nauthentication-results")
    return HeaderRules(max_hops, pattern, ids, tuple(markers))


def _normal_id(authserv_id: str) -> str:
    # Host names compare without case and trailing dot (RFC 4343, RFC 1034 3.1).
    return authserv_id.strip().lower().rstrip(".")


# Characters of an Authentication-Results value looked at for its
# authserv-id, which comes first (RFC 8601 2.2).  Bounds the work a forged
# field can cause: authres needs ~3 ms per KiB of results, and recursion
# per nested comment.
_ID_SECTION = 1024
_FIRST_TOKEN = re.compile(r'\s*"?([^\s;"]+)')


def _id_section(value: str) -> tuple[str, str]:
    """The value up to its first ";" outside comments and quoted strings
    ("authserv-id [version]", RFC 8601 2.2), as it is and with its RFC 5322
    comments (3.2.2, nested, with quoted pairs) blanked out."""
    depth, quoted, escaped = 0, False, False
    bare: list[str] = []
    for i, c in enumerate(value):
        if escaped:
            escaped = False
        elif c == "\\":
            escaped = True
        elif quoted:
            quoted = c != '"'
        elif c == "(":
            depth += 1
        elif c == ")" and depth:
            depth -= 1
            c = " "
        elif depth == 0 and c == '"':
            quoted = True
        elif depth == 0 and c == ";":
            return value[:i], "".join(bare)
        bare.append(" " if depth else c)
    return value, "".join(bare)


def _claims_authserv_id(field: bytes, ids: frozenset[str]) -> bool:
    """Whether an Authentication-Results field (its lines, name included)
    names one of ``ids`` as its authserv-id, parsed by authres.  Only the
    id section goes to it (with "; none" for the results, which do not
    matter here).  A section authres cannot parse (a quoted id, say) is
    read as its first token after comments, and one that hides its id
    past _ID_SECTION behind comments is taken as ours: a forgery need not
    be well formed to fool a filter downstream (the safe side)."""
    value = field.partition(b":")[2]
    section, bare = _id_section(value[:_ID_SECTION].decode("utf-8", "replace"))
    try:
        found: Optional[str] = authres.AuthenticationResultsHeader.parse(
            f"Authentication-Results:{section}; none").authserv_id
    except (authres.AuthResError, RecursionError):
        # RecursionError: authres recurses per nested comment.
        match = _FIRST_TOKEN.match(bare)
        found = match.group(1) if match else None
    if found is None:
        return len(value) > _ID_SECTION
    return _normal_id(found) in ids


# (second, its RFC 5322 date): one tuple, swapped whole.
_date_cache: tuple[int, str] = (0, "")


def _date_now() -> str:
    """RFC 5322 date of this second; formatting it per message showed in
    profiles, and a second is the field's resolution anyway."""
    global _date_cache
    now = int(time.time())
    cached = _date_cache
    if cached[0] != now:
        cached = _date_cache = (now, email.utils.formatdate(now, localtime=True))
    return cached[1]


def received_header(session: Session, txn: Transaction, hostname: str) -> bytes:
    """RFC 5321 4.4 trace field.  The client's HELO is its own claim and is
    shown as such; the address is what we saw."""
    proto = "ESMTP" if session.esmtp else "SMTP"
    if session.tls:
        proto += "S"  # RFC 3848
    if txn.smtputf8:
        proto = "UTF8" + proto  # RFC 6531 3.7.3
    only = txn.recipients[0].text if len(txn.recipients) == 1 else None
    return trace_header(hostname, session.helo or "unknown", session.peer_host, proto, txn.id,
                        only)


def trace_header(hostname: str, helo: str, client_ip: str, proto: str, queue_id: str,
                 only_recipient: Optional[str] = None) -> bytes:
    """Our Received: field (RFC 5321 4.4) from its parts: the edge's for a
    session, scan mode's for a message it judges as the edge would."""
    helo = helo.replace("\r", "").replace("\n", "")
    for_clause = f"\r\n\tfor <{only_recipient}>" if only_recipient is not None else ""
    date = _date_now()
    text = (f"Received: from {helo} ([{client_ip}])\r\n"
            f"\tby {hostname} (mppproxy) with {proto} id {queue_id}{for_clause};\r\n"
            f"\t{date}\r\n")
    return text.encode("utf-8", "replace")


def format_header(name: str, value: str) -> bytes:
    """One header field we add, folded at spaces to stay under 78 octets a
    line where it can (RFC 5322 2.1.1, 2.2.3).  CR, LF and other controls in
    the value (which may quote client text) become spaces, so a value can
    never start a new header."""
    # Checked whole first (the usual case, in C): a character loop over
    # every value cost ~7 us a header.
    clean = value if value.isprintable() else "".join(
        c if c.isprintable() else " " for c in value)
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


def _fields(spool: Spool) -> Iterator[tuple[bytes, list[bytes]]]:
    """The header section's fields: each one's name (lower case, without
    the colon) and its lines (the first and its folded continuations, each
    with CRLF).  Continuation lines before the first field come with the
    name b"" (they are no field of their own)."""
    name = b""
    lines: list[bytes] = []
    for line in _header_lines(spool):
        if line[:1] in (b" ", b"\t"):
            lines.append(line)
            continue
        if lines:
            yield name, lines
        name = line[:line.index(b":")].rstrip(b" \t").lower()
        lines = [line]
    if lines:
        yield name, lines


def _needs_reading(spool: Spool, rules: HeaderRules) -> bool:
    """Whether the header section must be read field by field.  False for
    nearly every message: its first chunk holds the whole section, and
    that shows no field name that may be removed and too few Received:
    fields to matter.  Looked for at line starts up to the first empty
    line, a superset of the header section, so False is always exact."""
    for first in spool.chunks():
        end = first.find(b"\r\n\r\n")
        if end < 0:
            return True
        head = b"\n" + first[:end + 2].lower()
        if rules.max_hops and head.count(b"\nreceived") > rules.max_hops:
            return True
        return any(marker in head for marker in rules.markers)
    return False


def _survey(spool: Spool, rules: HeaderRules) -> tuple[int, int, int]:
    """How many fields ``rules`` remove, how many Received: fields there
    are, and the header section's length."""
    removed = hops = length = 0
    for name, lines in _fields(spool):
        field = b"".join(lines)
        length += len(field)
        if name == b"received":
            hops += 1
        if name and rules.removes(name, field):
            removed += 1
    return removed, hops, length


# The one removed field the edge still reads: the mark of a message
# released from the quarantine (archive/released.py), which must not be
# held again on its way.
RELEASED_FIELD = b"x-mpp-released"


def strip_trust_headers(spool: Spool, length: int, out: Spool,
                        rules: HeaderRules = HeaderRules(),
                        released: Optional[list[bytes]] = None) -> int:
    """Copy the message into ``out`` without the fields ``rules`` remove
    (X-MPP-* always), folded lines included; return how many went.
    ``out`` is a spool like the client's, so memory stays bounded
    (docs/design.md promise 6).  Removed ``X-MPP-Released`` fields are
    appended to ``released`` when given (bounded: the header section is)."""
    removed = 0
    for name, lines in _fields(spool):
        field = b"".join(lines)
        if name and rules.removes(name, field):
            removed += 1
            if released is not None and name == RELEASED_FIELD:
                released.append(field)
        else:
            out.write(field)
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
        # X-MPP-Released fields the client sent, removed from the message
        # (strip_trust_headers): the edge verifies one before holding.
        self.released_fields: tuple[bytes, ...] = ()

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
            extra_headers: Iterable[tuple[str, str]] = (),
            rules: HeaderRules = HeaderRules()) -> tuple[OutboundMessage, int]:
    """The outbound message and the number of header fields removed (X-MPP-*
    and what ``rules`` name).  When some were removed, ``txn.spool`` is
    replaced by the cleaned copy.  ``extra_headers`` (Authentication-Results,
    X-Spam-*) go right below our Received:, as trace and result fields
    belong on top (RFC 8601 2.1); added after the removal, they stay.
    Raises ``TooManyHops`` for a looping message, before anything is
    written, ``HeaderBlockTooLarge``, and the ``OSError`` of a cleaned copy
    the disk cannot take (a full spool disk): that copy is then closed and
    ``txn.spool`` left as it was, and the edge answers 452 4.3.1."""
    assert txn.spool is not None
    prefix = received_header(session, txn, hostname) if hostname else b""
    for name, value in extra_headers:
        prefix += format_header(name, value)
    message, removed = prepare_content(txn.spool, prefix, rules, spool_limit, spool_dir)
    if message.spool is not txn.spool:
        txn.spool.close()
        txn.spool = message.spool
    return message, removed


def prepare_content(spool: Spool, prefix: bytes, rules: HeaderRules,
                    spool_limit: int = 1048576, spool_dir: Optional[str] = None
                    ) -> tuple[OutboundMessage, int]:
    """``prefix``, then ``spool`` without the fields ``rules`` remove, and
    how many went: the message as the edge passes it on, and as scan mode
    judges it (the same octets, so the same verdict).  When fields are
    removed the message reads a new spool, which the caller then owns.
    Raises as ``prepare`` does."""
    if not _needs_reading(spool, rules):
        return OutboundMessage(prefix, spool, 0), 0
    found, hops, length = _survey(spool, rules)
    if rules.max_hops and hops > rules.max_hops:
        raise TooManyHops(hops, rules.max_hops)
    if not found:
        return OutboundMessage(prefix, spool, 0), 0
    cleaned = Spool(spool_limit, spool_dir)
    released: list[bytes] = []
    try:
        removed = strip_trust_headers(spool, length, cleaned, rules, released)
    except BaseException:
        cleaned.close()
        raise
    message = OutboundMessage(prefix, cleaned, 0)
    message.released_fields = tuple(released)
    return message, removed
