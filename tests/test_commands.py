"""Command lines (``mppproxy.smtp.commands.parse_command``): line framing,
NUL, the 512-octet limit with its MAIL/RCPT allowance, verbs."""
from __future__ import annotations

from hypothesis import given, settings, strategies as st
from twisted.trial.unittest import SynchronousTestCase

from mppproxy.smtp import replies
from mppproxy.smtp.commands import PARAMETER_ALLOWANCE, Command, parse_command


def parse(line: bytes, max_length: int = 512, smtputf8: bool = True):
    return parse_command(line, max_length, smtputf8)


class ParseCommandTests(SynchronousTestCase):
    """Table tests for ``parse_command``."""

    GOOD = [
        (b"NOOP\r\n", Command("NOOP", "")),
        (b"noop\r\n", Command("NOOP", "")),
        (b"NoOp\r\n", Command("NOOP", "")),
        (b"EHLO client.example\r\n", Command("EHLO", "client.example")),
        (b"ehlo Client.Example\r\n", Command("EHLO", "Client.Example")),
        (b"MAIL FROM:<a@b.example> SIZE=10\r\n", Command("MAIL", "FROM:<a@b.example> SIZE=10")),
        (b"mail from:<a@b.example>\r\n", Command("MAIL", "from:<a@b.example>")),
        (b"RCPT TO:<c@d.example>  \r\n", Command("RCPT", "TO:<c@d.example>")),
        (b"DATA\r\n", Command("DATA", "")),
        (b"QUIT \r\n", Command("QUIT", "")),
        (b"XYZZY plugh\r\n", Command("XYZZY", "plugh")),
        (b"RCPT TO:<j\xc3\xbcrgen@b\xc3\xbccher.example>\r\n", Command("RCPT", "TO:<jürgen@bücher.example>")),
        (b"\r\n", Command("", "")),
    ]

    def test_good_lines(self) -> None:
        """Well-formed lines give the upper-cased verb and the argument with its case kept."""
        for line, cmd in self.GOOD:
            self.assertEqual(parse(line), (cmd, None), line)

    def test_bare_lf(self) -> None:
        """A line ended by a bare LF is refused as a bare newline (RFC 5321 2.3.8)."""
        for line in (b"NOOP\n", b"\n", b"MAIL FROM:<a@b.example>\n"):
            self.assertEqual(parse(line), (None, replies.BARE_NEWLINE_COMMAND), line)

    def test_bare_cr_inside(self) -> None:
        """A CR anywhere but before the final LF is refused as a bare newline."""
        for line in (b"NO\rOP\r\n", b"NOOP\r\r\n", b"\rNOOP\r\n", b"MAIL FROM:<a@b>\rDATA\r\n", b"NOOP\r"):
            self.assertEqual(parse(line), (None, replies.BARE_NEWLINE_COMMAND), line)

    def test_lf_inside(self) -> None:
        """A line that ends in LF but not CRLF while holding a CRLF earlier is refused."""
        self.assertEqual(parse(b"NOOP\r\nNOOP\n"), (None, replies.BARE_NEWLINE_COMMAND))

    def test_nul(self) -> None:
        """A NUL anywhere in the line is refused with 500 5.5.2."""
        for line in (b"NO\x00OP\r\n", b"\x00\r\n", b"MAIL FROM:<a\x00@b.example>\r\n"):
            cmd, reply = parse(line)
            self.assertIsNone(cmd)
            self.assertEqual(reply, replies.NUL_IN_COMMAND)
            self.assertEqual((reply.code, reply.enhanced), (500, "5.5.2"))

    def test_512_octets(self) -> None:
        """A command line of exactly 512 octets with its CRLF is accepted; 513 is refused with 500 5.5.2."""
        line = b"NOOP " + b"x" * (512 - 7) + b"\r\n"
        self.assertEqual(len(line), 512)
        self.assertEqual(parse(line)[1], None)
        line = b"NOOP " + b"x" * (513 - 7) + b"\r\n"
        cmd, reply = parse(line)
        self.assertIsNone(cmd)
        self.assertEqual(reply, replies.LINE_TOO_LONG)
        self.assertEqual((reply.code, reply.enhanced), (500, "5.5.2"))

    def test_mail_rcpt_allowance(self) -> None:
        """MAIL and RCPT may exceed 512 octets by the parameter allowance (RFC 1870 3, RFC 3461), and no further."""
        for verb in (b"MAIL", b"RCPT", b"mail", b"Rcpt"):
            limit = 512 + PARAMETER_ALLOWANCE
            fill = limit - len(verb) - 3
            ok = verb + b" " + b"x" * fill + b"\r\n"
            self.assertEqual(len(ok), limit)
            self.assertIsNone(parse(ok)[1], verb)
            long = verb + b" " + b"x" * (fill + 1) + b"\r\n"
            self.assertEqual(parse(long), (None, replies.LINE_TOO_LONG), verb)

    def test_allowance_only_for_mail_rcpt(self) -> None:
        """Other verbs get no allowance: a 600-octet EHLO or VRFY is too long."""
        for verb in (b"EHLO", b"VRFY", b"NOOP", b"MAILX", b"RCPTTO:"):
            line = verb + b" " + b"x" * (600 - len(verb) - 3) + b"\r\n"
            self.assertEqual(parse(line), (None, replies.LINE_TOO_LONG), verb)

    def test_configured_limit(self) -> None:
        """``max_length`` raises the basic limit."""
        line = b"NOOP " + b"x" * 993 + b"\r\n"
        self.assertEqual(parse(line, 512)[1], replies.LINE_TOO_LONG)
        self.assertIsNone(parse(line, 1000)[1])

    def test_bad_utf8(self) -> None:
        """An argument that is not UTF-8 gets 501 syntax error."""
        self.assertEqual(parse(b"RCPT TO:<\xff@b.example>\r\n"), (None, replies.SYNTAX_ERROR))

    def test_utf8_without_smtputf8(self) -> None:
        """Without SMTPUTF8 a non-ASCII argument is a syntax error."""
        line = "RCPT TO:<jürgen@b.example>\r\n".encode()
        self.assertEqual(parse(line, smtputf8=False), (None, replies.SYNTAX_ERROR))
        self.assertEqual(parse(line, smtputf8=True)[1], None)

    def test_refusal_order(self) -> None:
        """Line framing is judged before NUL, and NUL before length."""
        self.assertEqual(parse(b"NO\x00OP\n")[1], replies.BARE_NEWLINE_COMMAND)
        self.assertEqual(parse(b"NOOP \x00" + b"x" * 600 + b"\r\n")[1], replies.NUL_IN_COMMAND)


_VERBS = st.sampled_from(["EHLO", "HELO", "MAIL", "RCPT", "DATA", "RSET", "NOOP", "QUIT", "VRFY", "HELP"])
_CASE = st.lists(st.booleans(), min_size=4, max_size=4)
_ARG = st.text(alphabet=st.characters(min_codepoint=0x21, max_codepoint=0x7e), max_size=400)


class ParseCommandPropertyTests(SynchronousTestCase):
    """Properties of ``parse_command``."""

    @settings(max_examples=300, deadline=None)
    @given(_VERBS, _CASE, _ARG)
    def test_any_case_any_arg(self, verb: str, case: list[bool], arg: str) -> None:
        """Any verb in any letter case with a printable argument parses to the upper-case verb and the argument unchanged."""
        mixed = "".join(c.lower() if low else c for c, low in zip(verb, case))
        cmd, reply = parse(f"{mixed} {arg}\r\n".encode())
        self.assertIsNone(reply)
        self.assertEqual(cmd, Command(verb, arg))

    @settings(max_examples=300, deadline=None)
    @given(st.binary(max_size=700))
    def test_any_bytes(self, line: bytes) -> None:
        """Any bytes give exactly one of a command or a refusal, and every refusal is a 5xx."""
        cmd, reply = parse(line)
        self.assertTrue((cmd is None) != (reply is None))
        if reply is not None:
            self.assertGreaterEqual(reply.code, 500)
        else:
            self.assertTrue(line.endswith(b"\r\n"))
            self.assertNotIn(b"\x00", line)
            self.assertLessEqual(len(line), 512 + PARAMETER_ALLOWANCE)
