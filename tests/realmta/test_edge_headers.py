"""Mail loops and forged trust headers through a real ``twistd mppproxy`` in front of
the real Postfix backend (issue 15): a message with too many Received: fields is
refused before Postfix hears DATA; X-Spam-* and our own Authentication-Results from
the client never reach Postfix's Maildir.  The replies are printed for the record.
"""
from __future__ import annotations

import smtplib
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING

from .test_many_recipients import _start

if TYPE_CHECKING:
    from .conftest import PostfixBackend, ProxyProcess, StartProxy

#: How long the test waits to be sure that nothing (more) arrives.
QUIET_PERIOD = 3.0


def _send(proxy: ProxyProcess, message: bytes) -> tuple[int, bytes]:
    with smtplib.SMTP(proxy.host, proxy.port, local_hostname="client.test", timeout=60) as s:
        s.ehlo("client.test")
        s.mail("sender@client.test")
        code, text = s.rcpt("user@example.com")
        assert code == 250, (code, text)
        s.putcmd("data")
        code, text = s.getreply()
        assert code == 354, (code, text)
        s.send(message.replace(b"\r\n.", b"\r\n..") + b".\r\n")
        reply = s.getreply()
        assert s.noop()[0] == 250  # the session goes on
    return reply


def test_sixty_hops_refused_before_postfix(postfix: PostfixBackend, proxy_process: StartProxy,
                                          tmp_path: Path) -> None:
    """A message with 60 Received: fields gets 554 5.4.6 at the end of DATA and nothing reaches Postfix's Maildir."""
    token = uuid.uuid4().hex
    received = b"".join(b"Received: from hop%d.example by hop%d.example; Mon, 1 Jan 2024 00:00:00 +0000\r\n"
                        % (i, i + 1) for i in range(60))
    message = received + f"Subject: loop {token}\r\n\r\ntoken {token}\r\n".encode()
    with _start(proxy_process, tmp_path, postfix.address) as proxy:
        code, text = _send(proxy, message)
        print(f"end of DATA with 60 Received: {code} {text.decode()}")
        assert (code, text.split(b" ", 1)[0]) == (554, b"5.4.6")
        time.sleep(QUIET_PERIOD)
        assert [m for m in postfix.messages("example.com") if token.encode() in m] == []
        # The log line says why.
        assert "554 5.4.6 Too many hops (60 Received: header fields, limit 50)" in proxy.log_text()


def test_forged_trust_headers_never_reach_postfix(postfix: PostfixBackend, proxy_process: StartProxy,
                                                  tmp_path: Path) -> None:
    """X-Spam-* fields and an Authentication-Results naming the proxy are gone from the copy in Postfix's Maildir; another authserv-id's field stays."""
    token = uuid.uuid4().hex
    message = (b"X-Spam-Flag: NO\r\nX-Spam-Status: No, score=-100\r\n"
               b"Authentication-Results: proxy.test;\r\n\tspf=pass smtp.mailfrom=sender@client.test\r\n"
               b"Authentication-Results: mx.other.example; dkim=pass header.d=client.test\r\n"
               + f"Subject: forged {token}\r\n\r\ntoken {token}\r\n".encode())
    with _start(proxy_process, tmp_path, postfix.address) as proxy:
        code, text = _send(proxy, message)
        print(f"end of DATA with forged headers: {code} {text.decode()}")
        assert code == 250
        postfix.wait_messages("example.com", 1, timeout=30)
        time.sleep(QUIET_PERIOD)
        [raw] = [m for m in postfix.messages("example.com") if token.encode() in m]
    head = raw.split(b"\n\n", 1)[0]
    assert b"X-Spam-" not in head
    assert b"Authentication-Results: proxy.test" not in head
    assert b"Authentication-Results: mx.other.example; dkim=pass header.d=client.test\n" in head
