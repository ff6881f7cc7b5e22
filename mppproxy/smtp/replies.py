"""SMTP replies: one value type and the named replies the proxy itself sends.

Every constant cites where its code comes from: RFC 5321 (basic and reply
codes, section 4.2), RFC 3463 (enhanced status codes), RFC 2034 (sending them),
RFC 1870 (SIZE), RFC 3207 (STARTTLS), RFC 2920 (PIPELINING).  Replies that
come from the backend MTA are passed on as they are; these are only the ones
the proxy decides on its own.
"""
from __future__ import annotations

import errno
import functools
import re
from dataclasses import dataclass

_ENHANCED = re.compile(r"^[245]\.\d{1,3}\.\d{1,3}$")


@dataclass(frozen=True)
class Reply:
    """One SMTP reply: a three-digit code, an optional RFC 3463 enhanced code
    and text, which may hold several lines (a multi-line reply, RFC 5321
    section 4.2.1)."""

    code: int
    enhanced: str = ""
    text: str = ""

    @property
    def is_positive(self) -> bool:
        """2yz, positive completion (RFC 5321 4.2.1); 3yz is only intermediate."""
        return 200 <= self.code < 300

    @property
    def is_transient(self) -> bool:
        return 400 <= self.code < 500

    def lines(self) -> list[str]:
        return self.text.split("\n") if self.text else [""]

    def to_bytes(self) -> bytes:
        """The reply on the wire.  Each line repeats the enhanced code, as
        RFC 2034 section 4 asks; CR and LF in the text can never break out of
        the reply because the text is split on them here.  Encoded once per
        distinct reply: most replies are the same few constants."""
        return _encode(self.code, self.enhanced, self.text)

    def __str__(self) -> str:
        return " ".join(p for p in (str(self.code), self.enhanced, self.text.replace("\n", " / ")) if p)

    def with_text(self, text: str) -> "Reply":
        return Reply(self.code, self.enhanced, text)

    def with_reference(self, queue_id: str) -> "Reply":
        """The same refusal ending with ``(ref <queue id>)``, as the reply
        templates end: the id finds the transaction's log line."""
        return Reply(self.code, self.enhanced, f"{self.text} (ref {queue_id})")


@functools.lru_cache(maxsize=4096)
def _encode(code: int, enhanced: str, text: str) -> bytes:
    lines = [line.replace("\r", "") for line in text.split("\n")] if text else [""]
    out = []
    for i, line in enumerate(lines):
        sep = "-" if i < len(lines) - 1 else " "
        words = [w for w in (enhanced, line) if w]
        out.append(f"{code}{sep}" + " ".join(words))
    return ("\r\n".join(out) + "\r\n").encode("utf-8", "replace")


def ensure_enhanced(reply: Reply) -> Reply:
    """Give a backend reply without an enhanced code the generic one of its
    class: we announce ENHANCEDSTATUSCODES, so every reply after EHLO must
    carry one (RFC 2034 section 4; X.0.0 per RFC 3463 section 3.1)."""
    if reply.enhanced or reply.code < 200 or reply.code == 354:
        return reply
    return Reply(reply.code, f"{reply.code // 100}.0.0", reply.text)


def parse_reply_lines(lines: list[bytes]) -> Reply:
    """Build a Reply from the raw lines of a (possibly multi-line) reply from
    another server, keeping its enhanced code if each line carries one."""
    code = int(lines[0][:3])
    texts = [line[4:].decode("utf-8", "replace") for line in lines]
    enhanced = ""
    first = texts[0].split(" ", 1)
    if _ENHANCED.match(first[0]) and first[0][0] == str(code)[0]:
        enhanced = first[0]
        stripped = []
        for t in texts:
            head, _, rest = t.partition(" ")
            stripped.append(rest if head == enhanced or _ENHANCED.match(head) else t)
        texts = stripped
    return Reply(code, enhanced, "\n".join(texts))


# --- connection level -------------------------------------------------------
# RFC 5321 4.2.3: 421 service not available, closing transmission channel.
SHUTTING_DOWN = Reply(421, "4.3.2", "Service shutting down, try again later")
# RFC 3463 4.7.0: other security or policy status; used for connection limits.
TOO_MANY_CONNECTIONS = Reply(421, "4.7.0", "Too many connections, try again later")
TOO_MANY_FROM_HOST = Reply(421, "4.7.0", "Too many connections from your address, try again later")
# RFC 5321 4.5.3.2.7 server timeout; 421 because we close (4.2.3).
TIMEOUT = Reply(421, "4.4.2", "Timeout exceeded, closing connection")
TOO_MANY_ERRORS = Reply(421, "4.7.0", "Too many errors, closing connection")
# RFC 5321 4.3.2 / 3.1: a client that talks before the greeting breaks the
# command-reply lockstep (postscreen's "pregreet").
EARLY_TALKER = Reply(554, "5.5.1", "Protocol error: you talked before the greeting")

# --- positive ---------------------------------------------------------------
OK = Reply(250, "2.0.0", "OK")
SENDER_OK = Reply(250, "2.1.0", "Sender OK")
RECIPIENT_OK = Reply(250, "2.1.5", "Recipient OK")
RESET_OK = Reply(250, "2.0.0", "Reset OK")
NOOP_OK = Reply(250, "2.0.0", "OK")
# RFC 5321 3.5.3: VRFY may answer 252 when it will not verify.
CANNOT_VRFY = Reply(252, "2.5.2", "Cannot VRFY user, but will accept message and attempt delivery")
START_DATA = Reply(354, "", "End data with <CR><LF>.<CR><LF>")
# RFC 3207 section 4.
READY_TLS = Reply(220, "2.0.0", "Ready to start TLS")
HELP = Reply(214, "2.0.0", "Commands: EHLO HELO MAIL RCPT DATA RSET NOOP QUIT VRFY HELP STARTTLS\nSee RFC 5321")

# --- syntax and sequence (RFC 5321 4.2.2, 4.3.2; RFC 3463 5.5.x) ---------------
UNKNOWN_COMMAND = Reply(500, "5.5.2", "Command not recognized")
# RFC 5321 4.5.3.1.4: a command line is at most 512 octets with CRLF.
LINE_TOO_LONG = Reply(500, "5.5.2", "Line too long (RFC 5321 4.5.3.1.4: 512 octets)")
BARE_NEWLINE_COMMAND = Reply(500, "5.5.2", "Bare CR or LF in command (RFC 5321 2.3.8: lines end with CRLF)")
NUL_IN_COMMAND = Reply(500, "5.5.2", "NUL character in command not allowed")
SYNTAX_ERROR = Reply(501, "5.5.4", "Syntax error in parameters or arguments")
BAD_SENDER_SYNTAX = Reply(501, "5.1.7", "Bad sender address syntax")
BAD_RECIPIENT_SYNTAX = Reply(501, "5.1.3", "Bad recipient address syntax")
UNKNOWN_PARAMETER = Reply(555, "5.5.4", "Unsupported MAIL/RCPT parameter")
NOT_IMPLEMENTED = Reply(502, "5.5.1", "Command not implemented")
BAD_SEQUENCE = Reply(503, "5.5.1", "Bad sequence of commands")
NEED_HELO = Reply(503, "5.5.1", "Send EHLO/HELO first")
NEED_MAIL = Reply(503, "5.5.1", "Send MAIL first")
# RFC 5321 3.3: DATA after every RCPT failed may be answered with 554.
NO_VALID_RECIPIENTS = Reply(554, "5.5.1", "No valid recipients")
NESTED_MAIL = Reply(503, "5.5.1", "Sender already specified")
TLS_ALREADY = Reply(503, "5.5.1", "TLS already active")
TLS_NOT_AVAILABLE = Reply(454, "4.7.0", "TLS not available")
# RFC 6531 3.4: SMTPUTF8 addresses need the SMTPUTF8 parameter.
UTF8_NEEDS_SMTPUTF8 = Reply(553, "5.6.7", "Non-ASCII address needs SMTPUTF8")
BAD_BODY_PARAMETER = Reply(501, "5.5.4", "BODY must be 7BIT or 8BITMIME")

# --- data -------------------------------------------------------------------
# RFC 5321 2.3.8 and 4.1.1.4: only CRLF ends a line and CRLF.CRLF the data;
# a bare CR or LF is how SMTP smuggling starts, so the message is refused.
BARE_NEWLINE_DATA = Reply(550, "5.5.2", "Message refused: bare CR or LF in message data (RFC 5321 2.3.8)")
# RFC 5321 4.5.3.1.6: a text line is at most 1000 octets with CRLF.
DATA_LINE_TOO_LONG = Reply(550, "5.5.2", "Message refused: text line longer than 1000 octets (RFC 5321 4.5.3.1.6)")
# RFC 5322 2.3 / RFC 6152 3: no NUL in message content (RFC 3463 5.6.0).
NUL_IN_DATA = Reply(550, "5.6.0", "Message refused: NUL character in message data")
# RFC 1870 section 6.3 / RFC 3463 5.3.4: message too big for system.
MESSAGE_TOO_BIG = Reply(552, "5.3.4", "Message size exceeds fixed maximum message size")
# RFC 5321 4.5.3.1.8 (at least 100 recipients must be accepted; past our limit
# the client is asked to send the rest later: 452 4.5.3, RFC 3463).
TOO_MANY_RECIPIENTS = Reply(452, "4.5.3", "Too many recipients")
# RFC 5321 6.3: a server MUST stop trivial loops, and counting Received:
# fields is the usual way; RFC 3463 5.4.6: routing loop detected.  554: the
# same message will loop again, so the refusal is permanent.
# RFC 5321 4.5.3.1.7 (header lines) / RFC 3463 5.3.4: message too big for
# the system; the header section must fit our bound to be checked at all.
HEADER_BLOCK_TOO_LARGE = Reply(552, "5.3.4", "Message header block too large")
TOO_MANY_HOPS = Reply(554, "5.4.6", "Too many hops: mail loop suspected")
# RFC 5321 4.2.5 / RFC 3463 5.3.4 at MAIL time when SIZE= exceeds the limit.
SIZE_PARAM_TOO_BIG = Reply(552, "5.3.4", "Message size exceeds fixed maximum message size")

# --- relay control ----------------------------------------------------------
# RFC 5321 3.6.2 / RFC 3463 5.7.1: delivery not authorized.
RELAY_DENIED = Reply(554, "5.7.1", "Relay access denied")

# --- local failures: never 250 on an error path (STYLE.md) -------------------
# RFC 3463 4.3.0: other or undefined mail system status.
LOCAL_ERROR = Reply(451, "4.3.0", "Local error in processing, try again later")
# RFC 3463 4.4.1: no answer from host; 4.4.2 bad connection.
BACKEND_UNAVAILABLE = Reply(451, "4.4.1", "Next-hop mail server unavailable, try again later")
BACKEND_LOST = Reply(451, "4.4.2", "Connection to next-hop mail server lost, try again later")
BACKEND_TIMEOUT = Reply(451, "4.4.2", "Next-hop mail server timed out, try again later")
# RFC 5321 4.2.2: 452 "Requested action not taken: insufficient system
# storage"; RFC 3463 4.3.1 "Mail system full".  A full disk (or quota) is
# our fault, not the client's: it keeps the message and tries again.
STORAGE_ERROR = Reply(452, "4.3.1", "Insufficient system storage, try again later")

# The errors of a write that mean "no room" (or a device that cannot take
# the write): a full file system, a full quota, a failing disk.
STORAGE_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EIO})


def storage_failure(error: OSError) -> Reply:
    """The reply for a message that could not be written wholly to disk:
    452 4.3.1 when the disk is full (STORAGE_FULL_ERRNOS), else 451 4.3.0
    (RFC 3463 4.3.0, other mail system status).  Never a 250: the message
    is not on disk (docs/design.md promise 1)."""
    if error.errno in STORAGE_FULL_ERRNOS:
        return STORAGE_ERROR
    return LOCAL_ERROR
