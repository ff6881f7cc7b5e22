"""DATA framing: find the end of the message, undo dot-stuffing, refuse
smuggling, count size and line length, all while streaming.

Stage: between the session (which hands over the raw bytes after ``354``) and
the spool (which gets the message as it will be relayed: CRLF line ends,
dot-stuffing removed).  Promise 2 of docs/design.md lives here: the end of data is
``CRLF . CRLF`` and nothing else (RFC 5321 4.1.1.4 and 2.3.8), so a bare CR or
LF can never make the proxy and the backend disagree on where a message ends.

The reader works on whole chunks with bytes methods implemented in C
(``find``, ``count``, ``replace``, ``split``) instead of a Python call per line,
so a 1 MiB message costs a handful of calls per 64 KiB received.
"""
from __future__ import annotations

import enum
import re
from typing import Callable, Optional

# Strict: only CRLF.CRLF ends DATA.  Normalising: any line break (CRLF, LF
# or CR) around the dot, because those line breaks become CRLF before the
# message is relayed, so the backend sees the same end as we do.
_STRICT_END = re.compile(rb"(\r\n)\.\r\n")
_LOOSE_END = re.compile(rb"(\r\n|\n|\r)\.(?:\r\n|\n|\r)")
# Bytes held back at the end of each chunk: a terminator may straddle two
# reads, and so may a CR LF pair.
_HOLD = 4


class DataError(enum.Enum):
    """Why a message was refused by the framing rules (the reply is chosen
    by the session from ``smtp/replies.py``)."""

    BARE_NEWLINE = "bare CR or LF in data"
    LINE_TOO_LONG = "text line too long"
    TOO_BIG = "message too big"
    NUL = "NUL in data"
    # Not the client's doing: the sink (the spool) could not store the
    # content (a full disk); ``DataReader.storage_error`` says why.
    STORAGE = "message could not be stored"


class DataReader:
    """Consumes message data from the wire for one DATA command.

    ``feed(buffer)`` returns how many bytes of ``buffer`` it took; once
    ``done`` is true the rest of the buffer is the next pipelined command.
    Content goes to ``sink(bytes)`` unstuffed, with CRLF line ends, the final
    CRLF before the dot included (RFC 5321 4.5.2).

    ``error`` is set on the first framing problem.  A ``BARE_NEWLINE`` (strict
    mode) ends reading at once with ``done``: from then on nobody can say
    where the client thinks the message ends, so the session must refuse it
    and close.  After ``LINE_TOO_LONG``, ``TOO_BIG`` or ``STORAGE`` (the sink
    raised an ``OSError``, kept in ``storage_error``) reading goes on to the
    real terminator and content is dropped, so memory stays bounded and the
    session can answer at the end of data and go on.
    """

    def __init__(self, sink: Callable[[bytes], None], max_size: int,
                 max_line: int = 1000, normalise: bool = False):
        self._sink = sink
        self._max_size = max_size
        # max_line counts the CRLF (RFC 5321 4.5.3.1.6); we measure without it.
        self._max_text = max_line - 2
        self._normalise = normalise
        self._end = _LOOSE_END if normalise else _STRICT_END
        # The data begins as if after a CRLF, so ".\r\n" at once is an empty
        # message and a leading ".." is unstuffed.
        self._prev = b"\r\n"
        self._carry = b""
        self._line_len = 0
        self.size = 0
        self.done = False
        self.error: Optional[DataError] = None
        self.storage_error: Optional[OSError] = None

    def feed(self, buffer: bytes | bytearray) -> int:
        if self.done:
            return 0
        carry = self._carry
        data = carry + bytes(buffer)
        search = self._prev + data
        base = len(self._prev)
        m = self._end.search(search)
        if m is not None and self._normalise and m.end() == len(search) and search.endswith(b"\r"):
            m = None  # the CR may be half of a CRLF still in flight
        if m is not None:
            self._take(search[base:max(base, m.end(1))])
            self.done = True
            self._carry = b""
            return m.end() - base - len(carry)
        cut = max(0, len(data) - _HOLD)
        # Never cut between CR and LF: the pair must be judged together.
        if cut > 0 and data[cut - 1] == 13:
            cut -= 1
        self._take(data[:cut])
        self._carry = data[cut:]
        return len(buffer)

    def _take(self, raw: bytes) -> None:
        """Check and pass on one run of message content as received."""
        if not raw:
            return
        at_line_start = self._prev.endswith(b"\r\n") or (
            self._normalise and self._prev[-1:] in (b"\n", b"\r"))
        self._prev = (self._prev + raw)[-2:]
        body = raw
        if self._normalise:
            body = body.replace(b"\r\n", b"\n").replace(b"\r", b"\n").replace(b"\n", b"\r\n")
        else:
            crlf = body.count(b"\r\n")
            if body.count(b"\n") != crlf or body.count(b"\r") != crlf:
                self.error = DataError.BARE_NEWLINE
                self.done = True
                return
        unstuffed = body[1:] if at_line_start and body[:1] == b"." else body
        unstuffed = unstuffed.replace(b"\r\n.", b"\r\n")
        if b"\x00" in body and self.error is None:
            # RFC 5322 2.3 and RFC 6152 3 forbid NUL in a message; an MTA that
            # strips it would read "CRLF NUL . CRLF" as the end of data.
            self.error = DataError.NUL
        self.size += len(unstuffed)
        if self.size > self._max_size and self.error is None:
            self.error = DataError.TOO_BIG
        # RFC 5321 4.5.3.1.6: the 1000 octets do not count the dot added for
        # transparency, so lines are measured after unstuffing.
        if self._too_long(unstuffed) and self.error is None:
            self.error = DataError.LINE_TOO_LONG
        if self.error is not None:
            return
        # Undo dot-stuffing (RFC 5321 4.5.2): a line that starts with a dot
        # had one added by the client.
        try:
            self._sink(unstuffed)
        except OSError as e:
            # A full disk must not drop the connection (the client would
            # hear nothing and retry into the same wall): read on to the
            # end of data, then the session refuses the message with 4xx.
            self.error = DataError.STORAGE
            self.storage_error = e


    def _too_long(self, content: bytes) -> bool:
        """Whether a line of ``content`` (CRLF line ends, its first line
        continuing the chunk before) is longer than max_line allows, and
        the length of its last, unfinished line for the next chunk."""
        first_break = content.find(b"\r\n")
        if first_break < 0:
            self._line_len += len(content)
            return self._line_len > self._max_text
        first = self._line_len + first_break
        last_break = content.rfind(b"\r\n")
        self._line_len = len(content) - last_break - 2
        if first > self._max_text or self._line_len > self._max_text:
            return True
        # The lines between.  A line longer than max_text would hold, whole,
        # one of the stretches of `window` = (max_text + 2) // 2 octets laid
        # end to end from `start` (a run of 2 * window - 1 octets without LF
        # covers one), so if every stretch holds an LF no line is too long:
        # a find in C per stretch instead of a list of every line.  The
        # exact count runs only when a stretch has no LF.
        start, end = first_break + 2, last_break
        window = (self._max_text + 2) // 2
        if all(content.find(b"\n", i, i + window) >= 0
               for i in range(start, end - window + 1, window)):
            return False
        return max(map(len, content[start:end].split(b"\r\n"))) > self._max_text


def dot_stuff(chunk: bytes, at_line_start: bool) -> bytes:
    """Add the dot that RFC 5321 4.5.2 asks for before each line that starts
    with one.  ``chunk`` must not end between CR and LF."""
    out = chunk.replace(b"\r\n.", b"\r\n..")
    if at_line_start and out[:1] == b".":
        out = b"." + out
    return out
