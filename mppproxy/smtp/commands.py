"""Command lines: split one line from the client into verb and argument.

Stage: session.  RFC 5321 4.1.1: a command is a verb, optionally a space and
an argument, ended by CRLF; verbs are case-insensitive.  The framing rules for
the line itself (CRLF only, no NUL, 512 octets) are checked here too, so the
state machine only sees well-formed lines.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

from mppproxy.smtp import replies
from mppproxy.smtp.replies import Reply

# RFC 1870 section 3 lets SIZE add 26 octets to MAIL; RFC 6152, RFC 6531 and
# RFC 3461 (BODY=, SMTPUTF8, DSN) add more.  MAIL and RCPT may be this much
# longer than the basic 512-octet limit.
PARAMETER_ALLOWANCE = 512


class Command(NamedTuple):
    """One command line: the verb in upper case and its argument (a named
    tuple: five are made per relayed message, and a frozen dataclass costs
    a setattr call per field)."""

    verb: str
    arg: str


def parse_command(line: bytes, max_length: int, smtputf8: bool = True) -> tuple[Optional[Command], Optional[Reply]]:
    """Return the command, or the reply that refuses the line.

    ``line`` includes its line end.  A line that does not end in CRLF, or
    holds a CR elsewhere, is a bare newline (RFC 5321 2.3.8)."""
    if line.count(b"\r") != 1 or not line.endswith(b"\r\n"):
        return None, replies.BARE_NEWLINE_COMMAND
    if b"\x00" in line:
        return None, replies.NUL_IN_COMMAND
    verb_bytes, _, arg_bytes = line[:-2].partition(b" ")
    verb = verb_bytes.decode("ascii", "replace").upper()
    if len(line) > max_length and (len(line) > max_length + PARAMETER_ALLOWANCE
                                   or verb not in ("MAIL", "RCPT")):
        return None, replies.LINE_TOO_LONG
    if not arg_bytes:
        return Command(verb, ""), None
    try:
        # RFC 6531: with SMTPUTF8 addresses may hold UTF-8.
        arg = arg_bytes.decode("utf-8" if smtputf8 else "ascii")
    except UnicodeDecodeError:
        return None, replies.SYNTAX_ERROR
    return Command(verb, arg.strip(" ")), None
