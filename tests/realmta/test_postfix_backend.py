"""The Postfix backend fixture itself: delivery, refusal, STARTTLS, XFORWARD, restart.

These talk to Postfix directly (no proxy), so a failure here points at the test
environment rather than at mppproxy.
"""
from __future__ import annotations

import smtplib
import ssl
import uuid
from email.message import EmailMessage

from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from .conftest import PostfixBackend


def _message(to: str) -> tuple[EmailMessage, str]:
    token = uuid.uuid4().hex
    msg = EmailMessage()
    msg["From"] = "sender@client.test"
    msg["To"] = to
    msg["Subject"] = f"fixture check {token}"
    msg.set_content("hello\n")
    return msg, token


def test_delivers_to_maildir(postfix: PostfixBackend) -> None:
    """A message sent to Postfix for example.com shows up once in messages("example.com")."""
    msg, token = _message("x@example.com")
    with smtplib.SMTP(postfix.host, postfix.port, timeout=30) as s:
        refused = s.send_message(msg)
    assert refused == {}
    [raw] = postfix.wait_messages("example.com", 1)
    assert token.encode() in raw
    assert b"Delivered-To: x@example.com" in raw
    assert postfix.messages("example.net") == []


def test_unknown_domain_is_refused(postfix: PostfixBackend) -> None:
    """A recipient outside example.com/example.net gets 554 5.7.1 at RCPT."""
    with smtplib.SMTP(postfix.host, postfix.port, timeout=30) as s:
        s.ehlo("client.test")
        s.mail("sender@client.test")
        code, text = s.rcpt("x@example.org")
    assert code == 554
    assert text.startswith(b"5.7.1 ")
    assert b"Relay access denied" in text


def test_starttls_xforward_xclient_offered(postfix: PostfixBackend) -> None:
    """The backend offers STARTTLS (with the script's certificate), XFORWARD and XCLIENT."""
    ctx = ssl.create_default_context(cafile=str(postfix.tls_cert))
    msg, token = _message("tls@example.com")
    with smtplib.SMTP(postfix.host, postfix.port, timeout=30) as s:
        s.ehlo("client.test")
        assert s.has_extn("xforward")
        assert s.has_extn("xclient")
        assert s.has_extn("starttls")
        s.starttls(context=ctx)  # verifies the certificate for 127.0.0.1
        s.ehlo("client.test")
        assert s.send_message(msg) == {}
    [raw] = postfix.wait_messages("example.com", 1)
    assert token.encode() in raw
    assert b"(using TLSv1" in raw  # smtpd_tls_received_header


def test_stop_and_start(postfix: PostfixBackend) -> None:
    """stop() closes the port and drops open sessions; start() brings delivery back."""
    open_session = smtplib.SMTP(postfix.host, postfix.port, timeout=30)
    open_session.ehlo("client.test")
    postfix.stop()
    try:
        assert not postfix.is_running()
        with pytest.raises(smtplib.SMTPServerDisconnected):
            open_session.noop()
        with pytest.raises(OSError):
            smtplib.SMTP(postfix.host, postfix.port, timeout=5)
    finally:
        open_session.close()
        postfix.start()
    assert postfix.is_running()
    msg, token = _message("after-restart@example.net")
    with smtplib.SMTP(postfix.host, postfix.port, timeout=30) as s:
        assert s.send_message(msg) == {}
    [raw] = postfix.wait_messages("example.net", 1)
    assert token.encode() in raw
