"""DATA framing (``mppproxy.smtp.framing``): end detection, dot-unstuffing,
bare CR/LF, line and size limits, streaming in any chunking.

Table tests first, then Hypothesis properties (Klein's ``test_headers.py``
style): dot-stuffing any content and framing it gives the content back,
however the bytes are cut into reads.
"""
from __future__ import annotations

from typing import Iterable, Optional

from hypothesis import given, settings, strategies as st
from twisted.trial.unittest import SynchronousTestCase

from mppproxy.smtp.framing import DataError, DataReader, dot_stuff


class _Run:
    """The outcome of feeding a DataReader as the session does."""

    def __init__(self, content: bytes, leftover: bytes, reader: DataReader, sink_calls: int):
        self.content = content
        self.leftover = leftover
        self.reader = reader
        self.sink_calls = sink_calls

    @property
    def done(self) -> bool:
        return self.reader.done

    @property
    def error(self) -> Optional[DataError]:
        return self.reader.error


def feed(chunks: Iterable[bytes], max_size: int = 10 ** 7, max_line: int = 1000,
         normalise: bool = False) -> _Run:
    """Feed ``chunks`` the way ``SMTPServerProtocol._process`` does: append
    each read to a buffer, let the reader take what it uses, stop at done.
    Whatever is left (in the buffer and in unread chunks) is returned as the
    bytes not consumed."""
    out: list[bytes] = []
    reader = DataReader(out.append, max_size, max_line, normalise=normalise)
    buf = bytearray()
    it = iter(chunks)
    for chunk in it:
        buf += chunk
        used = reader.feed(buf)
        assert 0 <= used <= len(buf)
        del buf[:used]
        if reader.done:
            break
    return _Run(b"".join(out), bytes(buf) + b"".join(it), reader, len(out))


def by_size(data: bytes, size: int) -> list[bytes]:
    return [data[i:i + size] for i in range(0, len(data), size)]


def chunkings(data: bytes) -> list[list[bytes]]:
    """Every interesting way of cutting ``data`` into reads: whole, one byte
    at a time, odd fixed sizes, and every two-piece split."""
    ways = [[data]] + [by_size(data, n) for n in (1, 2, 3, 5, 7, 13)]
    ways += [[data[:i], data[i:]] for i in range(1, len(data))]
    return ways


# (wire bytes after 354, content handed on, bytes left for the command parser)
GOOD_CASES = [
    (b"Hello\r\n.\r\n", b"Hello\r\n", b""),
    (b".\r\n", b"", b""),
    (b"\r\n.\r\n", b"\r\n", b""),
    (b"..dot first\r\n.\r\n", b".dot first\r\n", b""),
    (b"a\r\n..\r\n.\r\n", b"a\r\n.\r\n", b""),
    (b"a\r\n...\r\n.\r\n", b"a\r\n..\r\n", b""),
    (b"a\r\n.b\r\n.\r\n", b"a\r\nb\r\n", b""),
    (b"a.\r\n.\r\n", b"a.\r\n", b""),
    (b"a\r\n .\r\n.\r\n", b"a\r\n .\r\n", b""),
    (b"a\r\n.\r\nQUIT\r\n", b"a\r\n", b"QUIT\r\n"),
    (b"a\r\n.\r\nMAIL FROM:<x@y.z>\r\nRCPT TO:<q@r.s>\r\n", b"a\r\n",
     b"MAIL FROM:<x@y.z>\r\nRCPT TO:<q@r.s>\r\n"),
    (b"Subject: x\r\n\r\nbody\r\n..\r\n.\r\n.\r\n", b"Subject: x\r\n\r\nbody\r\n.\r\n", b".\r\n"),
    (b"\xff\x01\x7f\r\n.\r\n", b"\xff\x01\x7f\r\n", b""),
]


class TransparencyDotTests(SynchronousTestCase):
    def test_stuffing_dot_does_not_count_toward_line_length(self) -> None:
        """A 998-octet text line that starts with a dot is 999 on the wire and is accepted
        (RFC 5321 4.5.3.1.6 does not count the transparency dot)."""
        out: list[bytes] = []
        reader = DataReader(out.append, 10**6)
        reader.feed(b".." + b"z" * 997 + b"\r\n.\r\n")
        self.assertTrue(reader.done)
        self.assertIsNone(reader.error)
        self.assertEqual(b"".join(out), b"." + b"z" * 997 + b"\r\n")


class NulTests(SynchronousTestCase):
    """NUL is not allowed in message content (RFC 5322 2.3)."""

    def test_nul_refuses_the_message_but_reads_to_the_end(self) -> None:
        """A NUL anywhere sets NUL, drops the content and still stops at the real CRLF.CRLF."""
        for payload in (b"a\r\n\x00.\r\nb\r\n.\r\nQUIT\r\n", b"\x00\r\n.\r\nQUIT\r\n"):
            out: list[bytes] = []
            reader = DataReader(out.append, 10**6)
            used = reader.feed(payload)
            self.assertTrue(reader.done)
            self.assertIs(reader.error, DataError.NUL)
            self.assertEqual(payload[used:], b"QUIT\r\n")
            self.assertEqual(b"".join(out), b"")


class EndOfDataTests(SynchronousTestCase):
    """Strict mode: only CRLF . CRLF ends the data."""

    def test_table_in_one_chunk(self) -> None:
        """Each table case, fed in one read, gives the unstuffed content and leaves the rest unread."""
        for wire, content, leftover in GOOD_CASES:
            run = feed([wire])
            self.assertTrue(run.done, wire)
            self.assertIsNone(run.error, wire)
            self.assertEqual((run.content, run.leftover), (content, leftover), wire)

    def test_table_in_every_chunking(self) -> None:
        """Each table case gives the same content and leftover however the bytes are cut into reads."""
        for wire, content, leftover in GOOD_CASES:
            for chunks in chunkings(wire):
                run = feed(chunks)
                self.assertTrue(run.done, (wire, chunks))
                self.assertIsNone(run.error, (wire, chunks))
                self.assertEqual((run.content, run.leftover), (content, leftover), (wire, chunks))

    def test_empty_message(self) -> None:
        """A lone ``.`` line right after 354 is an empty message."""
        run = feed([b".\r\n"])
        self.assertTrue(run.done)
        self.assertEqual(run.content, b"")
        self.assertEqual(run.reader.size, 0)

    def test_not_done_without_terminator(self) -> None:
        """Data without CRLF . CRLF is never finished, and everything given is consumed."""
        for wire in (b"abc\r\n", b"abc\r\n.", b"abc\r\n.\r", b"abc\r\n..\r\n", b"abc.\r\n"):
            for chunks in chunkings(wire):
                run = feed(chunks)
                self.assertFalse(run.done, (wire, chunks))
                self.assertEqual(run.leftover, b"", (wire, chunks))

    def test_crlf_split_across_chunks(self) -> None:
        """A CRLF split between two reads is one line end, not a bare CR and a bare LF."""
        run = feed([b"line one\r", b"\nline two\r", b"\n.\r", b"\n"])
        self.assertTrue(run.done)
        self.assertIsNone(run.error)
        self.assertEqual(run.content, b"line one\r\nline two\r\n")

    def test_terminator_split_everywhere(self) -> None:
        """The terminator is found wherever the reads cut it, with a following command left unread."""
        wire = b"x" * 100 + b"\r\n.\r\nNOOP\r\n"
        for chunks in chunkings(wire):
            run = feed(chunks)
            self.assertEqual((run.content, run.leftover), (b"x" * 100 + b"\r\n", b"NOOP\r\n"), chunks)

    def test_feed_after_done_takes_nothing(self) -> None:
        """Once done, feed consumes nothing more."""
        reader = DataReader(lambda b: None, 1000)
        self.assertEqual(reader.feed(b".\r\n"), 3)
        self.assertTrue(reader.done)
        self.assertEqual(reader.feed(b"NOOP\r\n"), 0)

    def test_size_counts_content(self) -> None:
        """``size`` counts the content handed on, CRLFs included."""
        run = feed([b"abc\r\ndef\r\n.\r\n"])
        self.assertEqual(run.reader.size, 10)


BARE_CASES = [
    b"a\nb\r\n.\r\n",
    b"a\rb\r\n.\r\n",
    b"a\n.\r\n",
    b"a\r\n.\n",
    b"a\r\n\n.\r\n",
    b"a\r\r\n.\r\n",
    b"a\n.\nMAIL FROM:<evil@example.net>\r\n",
    b"a\r\n.\rMAIL FROM:<evil@example.net>\r\n",
    b"a\r\n\r.\r\nMAIL FROM:<evil@example.net>\r\n",
]


class BareNewlineTests(SynchronousTestCase):
    """Strict mode refuses bare CR and LF (RFC 5321 2.3.8, docs/design.md promise 2)."""

    def test_bare_newline_is_an_error(self) -> None:
        """A bare CR or LF anywhere in the data ends reading at once with BARE_NEWLINE."""
        for wire in BARE_CASES:
            # Pad so the bad bytes are never only in the held-back tail.
            padded = wire + b"x" * 16 + b"\r\n.\r\n"
            for chunks in chunkings(padded):
                run = feed(chunks)
                self.assertTrue(run.done, (wire, chunks))
                self.assertIs(run.error, DataError.BARE_NEWLINE, (wire, chunks))

    def test_bare_newline_content_not_handed_on(self) -> None:
        """No bytes that hold a bare newline reach the sink."""
        for wire in BARE_CASES:
            padded = wire + b"x" * 16 + b"\r\n.\r\n"
            for chunks in chunkings(padded):
                run = feed(chunks)
                self.assertNotIn(b"\n", run.content.replace(b"\r\n", b""), (wire, chunks))
                self.assertNotIn(b"\r", run.content.replace(b"\r\n", b""), (wire, chunks))


NORMALISE_CASES = [
    (b"a\nb\n.\n", b"a\r\nb\r\n", b""),
    # (A final ".\r" with nothing after it is left out: whether the CR is
    # half of a CRLF is only known from the next byte.)
    (b"a\rb\r.\rQUIT\r\n", b"a\r\nb\r\n", b"QUIT\r\n"),
    (b"a\r\nb\r\n.\r\n", b"a\r\nb\r\n", b""),
    (b"a\nb\r\n.\r\nQUIT\r\n", b"a\r\nb\r\n", b"QUIT\r\n"),
    (b"a\r\n.\nQUIT\r\n", b"a\r\n", b"QUIT\r\n"),
    (b"..x\n.\n", b".x\r\n", b""),
    (b"a\n..\n.\n", b"a\r\n.\r\n", b""),
    (b"hi\r\n.\r\nQUIT\r\n", b"hi\r\n", b"QUIT\r\n"),
]


class NormaliseTests(SynchronousTestCase):
    """``normalise`` mode: every line break becomes CRLF before the end-of-data search."""

    def test_normalise_table_in_one_chunk(self) -> None:
        """In normalise mode bare CR and LF become CRLF and also end the data around a dot."""
        for wire, content, leftover in NORMALISE_CASES:
            run = feed([wire], normalise=True)
            self.assertTrue(run.done, wire)
            self.assertIsNone(run.error, wire)
            self.assertEqual((run.content, run.leftover), (content, leftover), wire)

    def test_normalise_terminator_split_between_cr_and_lf(self) -> None:
        """In normalise mode a CRLF . CRLF whose last CR and LF arrive in different reads is one terminator, and the LF is not left over as a stray command line."""
        run = feed([b"hi\r\n.\r", b"\nQUIT\r\n"], normalise=True)
        self.assertTrue(run.done)
        self.assertEqual((run.content, run.leftover), (b"hi\r\n", b"QUIT\r\n"))

    def test_normalise_table_in_every_chunking(self) -> None:
        """In normalise mode each case gives the same content and leftover however the bytes are cut."""
        for wire, content, leftover in NORMALISE_CASES:
            for chunks in chunkings(wire):
                run = feed(chunks, normalise=True)
                self.assertTrue(run.done, (wire, chunks))
                self.assertEqual((run.content, run.leftover), (content, leftover), (wire, chunks))


class LineLengthTests(SynchronousTestCase):
    """RFC 5321 4.5.3.1.6: a text line is at most 1000 octets with its CRLF."""

    def test_line_of_1000_octets_is_fine(self) -> None:
        """A 998-octet line plus CRLF (1000 octets) is accepted."""
        line = b"x" * 998 + b"\r\n"
        for size in (1, 7, 64, 4096):
            run = feed(by_size(line + b".\r\n", size))
            self.assertIsNone(run.error, size)
            self.assertEqual(run.content, line)

    def test_line_over_1000_octets(self) -> None:
        """A 1001-octet line sets LINE_TOO_LONG but reading goes on to the real terminator and the rest is left unread."""
        wire = b"ok\r\n" + b"x" * 999 + b"\r\nmore\r\n.\r\nQUIT\r\n"
        for size in (1, 3, 7, 64, 1000, 4096):
            run = feed(by_size(wire, size))
            self.assertTrue(run.done, size)
            self.assertIs(run.error, DataError.LINE_TOO_LONG, size)
            self.assertEqual(run.leftover, b"QUIT\r\n", size)

    def test_long_line_without_crlf_across_reads(self) -> None:
        """A long line is measured across reads, even when no CRLF arrives in between."""
        reader = DataReader(lambda b: None, 10 ** 7)
        for _ in range(20):
            reader.feed(b"y" * 100)
        self.assertIs(reader.error, DataError.LINE_TOO_LONG)
        self.assertFalse(reader.done)

    def test_line_length_verdict_matches_a_line_by_line_count(self) -> None:
        """Random messages (lines around the limit, dot lines, any chunking):
        LINE_TOO_LONG exactly when some line, unstuffed, passes max_line - 2."""
        import random

        rng = random.Random(5321)
        for _ in range(300):
            max_line = rng.choice((20, 100, 1000))
            lines = []
            for _ in range(rng.randrange(1, 12)):
                n = rng.choice((0, 1, max_line - 3, max_line - 2, max_line - 1, rng.randrange(max_line * 2)))
                lines.append(("." if rng.random() < 0.2 else "") + "x" * n)
            # the client's dot-stuffing: a line starting with "." gets another
            wire = b"".join(b"." + line.encode() + b"\r\n" if line.startswith(".") else
                            line.encode() + b"\r\n" for line in lines) + b".\r\n"
            expected = max(len(line) for line in lines) > max_line - 2
            size = rng.choice((1, 2, 3, 5, 17, 64, 999, 4096))
            run = feed(by_size(wire, size), max_line=max_line)
            got = run.error is DataError.LINE_TOO_LONG
            self.assertEqual(got, expected, (max_line, size, [len(x) for x in lines]))

    def test_max_line_is_configurable(self) -> None:
        """The limit follows ``max_line``."""
        wire = b"x" * 1500 + b"\r\n.\r\n"
        self.assertIs(feed([wire]).error, DataError.LINE_TOO_LONG)
        self.assertIsNone(feed([wire], max_line=2000).error)

    def test_content_dropped_after_line_error(self) -> None:
        """After LINE_TOO_LONG nothing more reaches the sink."""
        out: list[bytes] = []
        reader = DataReader(out.append, 10 ** 7)
        reader.feed(b"fine\r\n" * 10 + b"x" * 1200)
        self.assertIs(reader.error, DataError.LINE_TOO_LONG)
        before = b"".join(out)
        for _ in range(50):
            reader.feed(b"more content\r\n")
        reader.feed(b".\r\n")
        self.assertTrue(reader.done)
        self.assertEqual(b"".join(out), before)
        self.assertNotIn(b"more content", before)


class SizeLimitTests(SynchronousTestCase):
    """The message size limit (RFC 1870)."""

    def test_exactly_at_limit(self) -> None:
        """A message of exactly ``max_size`` bytes is accepted."""
        content = b"a" * 98 + b"\r\n"
        run = feed([content + b".\r\n"], max_size=100)
        self.assertIsNone(run.error)
        self.assertEqual(run.content, content)

    def test_over_limit(self) -> None:
        """A message one byte over ``max_size`` gets TOO_BIG, and reading goes on to the terminator."""
        wire = b"a" * 99 + b"\r\n" + b"b" * 50 + b"\r\n.\r\nQUIT\r\n"
        for size in (1, 5, 64, 4096):
            run = feed(by_size(wire, size), max_size=100)
            self.assertTrue(run.done, size)
            self.assertIs(run.error, DataError.TOO_BIG, size)
            self.assertEqual(run.leftover, b"QUIT\r\n", size)

    def test_stuffing_dots_do_not_count(self) -> None:
        """RFC 1870 section 3: the size excludes the dots added for transparency, so a message of exactly ``max_size`` bytes is accepted even when its lines start with dots."""
        content = b".\r\n" * 25 + b"a" * 48 + b"\r\n"
        self.assertEqual(len(content), 125)
        run = feed([dot_stuff(content, True) + b".\r\n"], max_size=125)
        self.assertEqual(run.content, content)
        self.assertEqual(run.reader.size, 125)
        self.assertIsNone(run.error)

    def test_content_dropped_after_too_big(self) -> None:
        """After TOO_BIG nothing more reaches the sink, so memory stays bounded."""
        out: list[bytes] = []
        reader = DataReader(out.append, 1000)
        for _ in range(1000):
            reader.feed(b"0123456789" * 10 + b"\r\n")
        reader.feed(b".\r\n")
        self.assertTrue(reader.done)
        self.assertIs(reader.error, DataError.TOO_BIG)
        self.assertLessEqual(sum(map(len, out)), 1000 + 102 + 8)


# --- properties ---------------------------------------------------------------

_PIECES = st.sampled_from([b".", b"..", b"a", b" ", b"\x01", b"\xff", b"x" * 40, b"\t"])
_SHORT_LINE = st.lists(_PIECES, max_size=12).map(b"".join).map(lambda b: b[:997])
# 997 octets: the longest line that stays within 1000 octets once stuffed.
_LONG_LINE = st.sampled_from([b"z" * 997, b"." + b"z" * 996, b"." * 997])
_CONTENT = st.lists(st.one_of(_SHORT_LINE, _SHORT_LINE, _SHORT_LINE, _LONG_LINE), max_size=30).map(
    lambda lines: b"".join(line + b"\r\n" for line in lines))


def _cuts(data: st.DataObject, wire: bytes) -> list[bytes]:
    points = sorted(set(data.draw(st.lists(st.integers(0, len(wire)), max_size=12), label="cuts")))
    pieces, start = [], 0
    for p in points + [len(wire)]:
        pieces.append(wire[start:p])
        start = p
    return pieces


class FramingPropertyTests(SynchronousTestCase):
    """Dot-stuffing then framing is the identity, in any chunking."""

    @settings(max_examples=300, deadline=None)
    @given(_CONTENT, st.data())
    def test_stuff_then_read_is_identity(self, content: bytes, data: st.DataObject) -> None:
        """Any content of CRLF-terminated lines, dot-stuffed and ended with ``.\\r\\n``, reads back exactly, however it is cut."""
        wire = dot_stuff(content, True) + b".\r\n"
        run = feed(_cuts(data, wire))
        self.assertTrue(run.done)
        self.assertIsNone(run.error)
        self.assertEqual(run.content, content)
        self.assertEqual(run.leftover, b"")

    @settings(max_examples=300, deadline=None)
    @given(_CONTENT, st.sampled_from([b"", b"QUIT\r\n", b"MAIL FROM:<a@b.c>\r\n", b".\r\n"]), st.data())
    def test_pipelined_rest_is_left_unread(self, content: bytes, rest: bytes, data: st.DataObject) -> None:
        """Whatever follows the terminator is returned as not consumed, byte for byte."""
        wire = dot_stuff(content, True) + b".\r\n" + rest
        run = feed(_cuts(data, wire))
        self.assertEqual((run.content, run.leftover), (content, rest))

    @settings(max_examples=300, deadline=None)
    @given(_CONTENT, st.data())
    def test_stuffing_in_pieces(self, content: bytes, data: st.DataObject) -> None:
        """Stuffing the content in whole-line pieces, as the backend client does, gives the same wire bytes as stuffing it at once."""
        lines = content.split(b"\r\n")[:-1]
        out, at_start = b"", True
        for i in range(0, len(lines), 3):
            piece = b"".join(line + b"\r\n" for line in lines[i:i + 3])
            out += dot_stuff(piece, at_start)
            at_start = True
        self.assertEqual(out, dot_stuff(content, True))

    @settings(max_examples=300, deadline=None)
    @given(_CONTENT, st.sampled_from([b"", b"QUIT\r\n"]), st.data())
    def test_normalise_mode_agrees_on_crlf_content(self, content: bytes, rest: bytes,
                                                   data: st.DataObject) -> None:
        """For content with CRLF line ends only, normalise mode frames exactly as strict mode does, in any chunking."""
        wire = dot_stuff(content, True) + b".\r\n" + rest
        run = feed(_cuts(data, wire), normalise=True)
        self.assertTrue(run.done)
        self.assertIsNone(run.error)
        self.assertEqual((run.content, run.leftover), (content, rest))
