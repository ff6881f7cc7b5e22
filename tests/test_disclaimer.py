"""Disclaimers (disclaimer.py) and header rewrites of the outbound message
(message.py): many MIME shapes, each checked by reading the result back with
the standard ``email`` package."""
from __future__ import annotations

import base64
import email
import email.policy

import pytest

from mppproxy import disclaimer
from mppproxy.config.errors import ConfigError
from mppproxy.config.load import from_mapping
from mppproxy.message import OutboundMessage
from mppproxy.config.policy import DisclaimerText, charset_key
from mppproxy.spool.spool import Spool

TEXTS = (DisclaimerText("utf-8", "-- \nACME GmbH, Grüße aus Berlin", "<p>ACME GmbH</p>"),
         DisclaimerText("us-ascii", "-- \nACME Inc."),
         DisclaimerText("iso-8859-1", "-- \nACME, Köln"))


def _split(raw: bytes) -> tuple[bytes, bytes]:
    end = raw.index(b"\r\n\r\n")
    return raw[:end + 2], raw[end + 2:]


def _apply(raw: bytes, texts=TEXTS) -> tuple[bytes | None, str]:
    header, body = _split(raw)
    new, why = disclaimer.apply(header, body, texts)
    return (None if new is None else new[0] + new[1]), why


def _parse(raw: bytes) -> email.message.EmailMessage:
    msg = email.message_from_bytes(raw, policy=email.policy.default)
    assert not msg.defects, msg.defects
    for part in msg.walk():
        assert not part.defects, part.defects
    return msg


def _text(part) -> str:
    """Decoded text with LF line ends, without the final line end (inside a
    multipart the CRLF before a boundary belongs to the boundary)."""
    content = part.get_content()
    if isinstance(content, bytes):
        return content
    return content.replace("\r\n", "\n").rstrip("\n")


def _texts_of(msg) -> dict[str, str]:
    return {p.get_content_type(): _text(p) for p in msg.walk()
            if p.get_content_maintype() == "text"}


def test_single_text_plain_7bit():
    """A us-ascii text/plain body gets the us-ascii text, still 7bit."""
    raw = b"From: a@example.com\r\nSubject: hi\r\n\r\nHello\r\nBob\r\n"
    out, _ = _apply(raw)
    assert out == b"From: a@example.com\r\nSubject: hi\r\n\r\nHello\r\nBob\r\n-- \r\nACME Inc.\r\n"


def test_single_text_plain_utf8_8bit_becomes_qp_only_when_7bit():
    """An 8bit UTF-8 body stays 8bit; a 7bit one that gains umlauts becomes quoted-printable."""
    raw = (b"Content-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n\r\n"
           b"Hall\xc3\xb6\r\n")
    out, _ = _apply(raw)
    assert b"Content-Transfer-Encoding: 8bit" in out
    assert _text(_parse(out)) == "Hallö\n-- \nACME GmbH, Grüße aus Berlin"
    raw = b"Content-Type: text/plain; charset=UTF-8\r\n\r\nHello\r\n"
    out, _ = _apply(raw)
    assert b"Content-Transfer-Encoding: quoted-printable\r\n" in out
    assert _text(_parse(out)) == "Hello\n-- \nACME GmbH, Grüße aus Berlin"


def test_single_part_base64_and_qp():
    """Base64 and quoted-printable bodies are decoded, appended to and encoded the same way."""
    body = base64.encodebytes("Grüß dich\r\n".encode("utf-8")).replace(b"\n", b"\r\n")
    raw = (b"Content-Type: text/plain; charset=\"utf-8\"\r\nContent-Transfer-Encoding: base64\r\n\r\n"
           + body)
    out, _ = _apply(raw)
    msg = _parse(out)
    assert msg["Content-Transfer-Encoding"] == "base64"
    assert _text(msg) == "Grüß dich\n-- \nACME GmbH, Grüße aus Berlin"
    raw = (b"Content-Type: text/plain; charset=iso-8859-1\r\n"
           b"Content-Transfer-Encoding: quoted-printable\r\n\r\nK=F6ln ist sch=F6n=\r\n und gro=DF\r\n")
    out, _ = _apply(raw)
    msg = _parse(out)
    assert _text(msg) == "Köln ist schön und groß\n-- \nACME, Köln"
    assert b"=F6" in out and b"\xf6" not in out


def test_html_before_closing_body():
    """In HTML the text goes before </body>."""
    raw = (b"Content-Type: text/html; charset=utf-8\r\n\r\n"
           b"<html><body><p>Hi</p></BODY></html>\r\n")
    out, _ = _apply(raw)
    assert "<p>Hi</p><p>ACME GmbH</p>\n</BODY></html>" in _text(_parse(out))


def test_html_without_html_text_gets_escaped_plain():
    """Without an html text the plain text is used, escaped in a <pre>."""
    texts = (DisclaimerText("us-ascii", "a < b"),)
    raw = b"Content-Type: text/html\r\n\r\n<p>x</p>\r\n"
    out, _ = _apply(raw, texts)
    assert "<pre>a &lt; b</pre>" in _text(_parse(out))


def test_multipart_mixed_gets_a_new_part():
    """multipart/mixed gets a new inline text/plain part before the closing boundary."""
    raw = (b"From: a@example.com\r\nMIME-Version: 1.0\r\n"
           b"Content-Type: multipart/mixed; boundary=\"b1\"\r\n\r\npreamble\r\n"
           b"--b1\r\nContent-Type: text/plain; charset=utf-8\r\n\r\nsee attached\r\n"
           b"--b1\r\nContent-Type: application/pdf\r\nContent-Transfer-Encoding: base64\r\n\r\n"
           b"JVBERi0=\r\n--b1--\r\nepilogue\r\n")
    out, _ = _apply(raw)
    msg = _parse(out)
    parts = list(msg.iter_parts())
    assert [p.get_content_type() for p in parts] == ["text/plain", "application/pdf", "text/plain"]
    assert _text(parts[0]) == "see attached"
    assert _text(parts[1]) == b"%PDF-"
    assert _text(parts[2]) == "-- \nACME GmbH, Grüße aus Berlin"
    assert out.endswith(b"--b1--\r\nepilogue\r\n")


def test_multipart_alternative_both_alternatives():
    """multipart/alternative gets the text in the plain and the HTML alternative."""
    html = base64.encodebytes(b"<html><body>hi</body></html>").replace(b"\n", b"\r\n")
    raw = (b"Content-Type: multipart/alternative; boundary=alt\r\n\r\n"
           b"--alt\r\nContent-Type: text/plain; charset=utf-8\r\n"
           b"Content-Transfer-Encoding: quoted-printable\r\n\r\nhi=\r\n there\r\n"
           b"--alt\r\nContent-Type: text/html; charset=utf-8\r\nContent-Transfer-Encoding: base64\r\n"
           b"\r\n" + html + b"--alt--\r\n")
    out, _ = _apply(raw)
    texts = _texts_of(_parse(out))
    assert texts["text/plain"] == "hi there\n-- \nACME GmbH, Grüße aus Berlin"
    assert texts["text/html"] == "<html><body>hi<p>ACME GmbH</p>\n</body></html>"


def test_nested_mixed_with_alternative_and_related():
    """Mixed holding an alternative gets a new part; the alternative's related root gets the text."""
    inner = (b"--alt\r\nContent-Type: text/plain\r\n\r\nplain\r\n"
             b"--alt\r\nContent-Type: multipart/related; boundary=rel\r\n\r\n"
             b"--rel\r\nContent-Type: text/html\r\n\r\n<b>x</b>\r\n"
             b"--rel\r\nContent-Type: image/png\r\nContent-ID: <i1>\r\n\r\nPNG\r\n--rel--\r\n"
             b"--alt--\r\n")
    raw = b"Content-Type: multipart/alternative; boundary=alt\r\n\r\n" + inner
    out, _ = _apply(raw)
    texts = _texts_of(_parse(out))
    assert texts["text/plain"].endswith("ACME Inc.")
    assert "ACME Inc." in texts["text/html"]
    raw = (b"Content-Type: multipart/mixed; boundary=mix\r\n\r\n--mix\r\n"
           b"Content-Type: multipart/alternative; boundary=alt\r\n\r\n" + inner
           + b"\r\n--mix--\r\n")
    out, _ = _apply(raw)
    msg = _parse(out)
    parts = list(msg.iter_parts())
    assert [p.get_content_type() for p in parts] == ["multipart/alternative", "text/plain"]
    assert _text(parts[1]) == "-- \nACME Inc."
    assert b"--alt--" in out and out.count(b"ACME") == 1


@pytest.mark.parametrize("ctype", [
    b"multipart/signed; protocol=\"application/pgp-signature\"; micalg=pgp-sha256; boundary=s",
    b"multipart/encrypted; protocol=\"application/pgp-encrypted\"; boundary=s",
    b"application/pkcs7-mime; smime-type=enveloped-data",
    b"application/x-pkcs7-mime; smime-type=signed-data",
])
def test_signed_and_encrypted_left_alone(ctype):
    """Signed or encrypted messages are never changed."""
    raw = (b"Content-Type: " + ctype + b"\r\n\r\n--s\r\nContent-Type: text/plain\r\n\r\nx\r\n"
           b"--s\r\nContent-Type: application/pgp-signature\r\n\r\nsig\r\n--s--\r\n")
    out, why = _apply(raw)
    assert out is None and "signed or encrypted" in why


def test_charset_without_text_left_alone():
    """A message whose charset has no text is left alone, and says so."""
    raw = b"Content-Type: text/plain; charset=koi8-r\r\n\r\nx\r\n"
    out, why = _apply(raw)
    assert out is None and "koi8-r" in why


def test_other_shapes_left_alone():
    """Images, text attachments, unknown encodings and broken multiparts are left alone."""
    for raw in (b"Content-Type: image/png\r\n\r\nPNG\r\n",
                b"Content-Type: text/plain\r\nContent-Disposition: attachment\r\n\r\nx\r\n",
                b"Content-Type: text/plain\r\nContent-Transfer-Encoding: x-uuencode\r\n\r\nx\r\n",
                b"Content-Type: multipart/mixed; boundary=b\r\n\r\n--b\r\n\r\nx\r\n",
                b"Content-Type: multipart/mixed\r\n\r\nx\r\n"):
        out, why = _apply(raw)
        assert out is None and why, raw


def test_charset_names_normalised():
    """utf8, UTF-8 and utf-8 are one charset."""
    assert charset_key("UTF8") == charset_key("utf-8")
    out, _ = _apply(b"Content-Type: text/plain; charset=UTF8\r\nContent-Transfer-Encoding: 8bit"
                    b"\r\n\r\nx\r\n")
    assert out is not None and "Grüße".encode() in out


def _outbound(raw: bytes) -> OutboundMessage:
    spool = Spool(1 << 20)
    spool.write(raw)
    return OutboundMessage(b"Received: by us\r\n", spool, 0)


def _bytes(msg: OutboundMessage) -> bytes:
    data = b"".join(msg.chunks())
    assert len(data) == msg.size
    return data


@pytest.mark.parametrize("subject, expected", [
    (b"Subject: hello\r\n", b"Subject: [SPAM] hello\r\n"),
    (b"Subject:hello\r\n", b"Subject: [SPAM] hello\r\n"),
    (b"subject: =?utf-8?q?Gr=C3=BC=C3=9Fe?=\r\n more\r\n",
     b"Subject: [SPAM] =?utf-8?q?Gr=C3=BC=C3=9Fe?=\r\n more\r\n"),
])
def test_subject_prefix(subject, expected):
    """The prefix goes before the existing value, kept octet for octet; the body is untouched."""
    msg = _outbound(b"From: a@b\r\n" + subject + b"To: c@d\r\n\r\nbody\r\n")
    msg.add_subject_prefix("[SPAM] ")
    out = _bytes(msg)
    assert out == b"Received: by us\r\nFrom: a@b\r\n" + expected + b"To: c@d\r\n\r\nbody\r\n"
    assert str(email.message_from_bytes(out, policy=email.policy.default)["Subject"]).startswith(
        "[SPAM] ")


def test_subject_prefix_added_and_non_ascii():
    """A message without a Subject gets one; a non-ASCII prefix is an encoded word."""
    msg = _outbound(b"From: a@b\r\n\r\nbody\r\n")
    msg.add_subject_prefix("[SPAM] ")
    assert _bytes(msg).endswith(b"From: a@b\r\nSubject: [SPAM]\r\n\r\nbody\r\n")
    msg = _outbound(b"Subject: hi\r\n\r\nbody\r\n")
    msg.add_subject_prefix("[Verdächtig] ")
    parsed = email.message_from_bytes(_bytes(msg), policy=email.policy.default)
    assert str(parsed["Subject"]) == "[Verdächtig] hi"
    assert _bytes(msg).isascii()


def test_subject_prefix_streams_a_large_body_from_disk(tmp_path):
    """The header rewrite leaves a spooled body on disk and reads it in chunks."""
    spool = Spool(1024, str(tmp_path))
    spool.write(b"Subject: big\r\n\r\n")
    for _ in range(200):
        spool.write(b"x" * 998 + b"\r\n")
    assert spool.on_disk
    msg = OutboundMessage(b"", spool, 0)
    msg.add_subject_prefix("[SPAM] ")
    assert msg.body is None
    chunks = list(msg.chunks())
    assert max(len(c) for c in chunks) < 200 * 1000
    assert b"".join(chunks).startswith(b"Subject: [SPAM] big\r\n\r\nxxx")
    assert msg.size == spool.size + len(b"[SPAM] ")


def test_replace_content():
    """A disclaimer rewrite replaces header and body; the prefix stays on top."""
    msg = _outbound(b"Content-Type: text/plain\r\n\r\nhello\r\n")
    new, _ = disclaimer.apply(msg.header_section(), msg.body_bytes(), TEXTS)
    msg.replace_content(*new)
    assert _bytes(msg) == (b"Received: by us\r\nContent-Type: text/plain\r\n\r\nhello\r\n"
                           b"-- \r\nACME Inc.\r\n")


def test_config_disclaimers():
    """[[policies.NAME.disclaimers]] load, with charsets and texts checked."""
    config = from_mapping({"policies": {"default": {"disclaimers": [
        {"senders": ["example.com"], "texts": [{"charset": "utf-8", "plain": "x"}]}]}}})
    [d] = config.policies["default"].disclaimers
    assert d.senders == ("example.com",) and d.texts[0].plain == "x"
    for bad in ({"charset": "nope"}, {"charset": "us-ascii", "plain": "ü"}):
        with pytest.raises(ConfigError):
            from_mapping({"policies": {"default": {"disclaimers": [{"texts": [bad]}]}}})
    with pytest.raises(ConfigError):
        from_mapping({"policies": {"default": {"disclaimers": [{"texts": [
            {"charset": "utf8"}, {"charset": "UTF-8"}]}]}}})


def test_long_disclaimer_line_goes_out_quoted_printable():
    """An 8bit body whose new text has a line over 998 octets is re-encoded quoted-printable."""
    texts = (DisclaimerText("utf-8", "ü" * 600),)
    raw = b"Content-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n\r\nx\r\n"
    out, _ = _apply(raw, texts)
    assert b"Content-Transfer-Encoding: quoted-printable\r\n" in out
    assert b"Content-Transfer-Encoding: 8bit" not in out
    assert max(len(line) for line in out.split(b"\r\n")) <= 78
    assert _text(_parse(out)) == "x\n" + "ü" * 600


def test_subject_prefix_not_doubled():
    """A Subject that already starts with the prefix is left as it is."""
    msg = _outbound(b"Subject: [SPAM] hello\r\n\r\nbody\r\n")
    msg.add_subject_prefix("[SPAM] ")
    assert b"Subject: [SPAM] hello\r\n" in _bytes(msg)
    assert b"[SPAM] [SPAM]" not in _bytes(msg)


def test_subject_prefix_then_disclaimer():
    """A tagged message from a listed sender gets both the prefix and the text."""
    msg = _outbound(b"Subject: hi\r\nContent-Type: text/plain\r\n\r\nhello\r\n")
    msg.add_subject_prefix("[SPAM] ")
    new, _ = disclaimer.apply(msg.header_section(), msg.body_bytes(), TEXTS)
    msg.replace_content(*new)
    assert _bytes(msg) == (b"Received: by us\r\nSubject: [SPAM] hi\r\nContent-Type: text/plain\r\n"
                           b"\r\nhello\r\n-- \r\nACME Inc.\r\n")
