"""TLS and XFORWARD between a real client, the proxy and a real Postfix."""
from __future__ import annotations

import re
import smtplib
import ssl
import subprocess
import uuid
from pathlib import Path
from typing import TYPE_CHECKING

from .test_proxy_postfix import _headers, _message, _start, _swaks

if TYPE_CHECKING:
    from .conftest import PostfixBackend, StartProxy


def _postfix_received(raw: bytes) -> bytes:
    """Postfix's own Received: field (the first one, unfolded)."""
    head = _headers(raw)
    start = head.index(b"Received: ")
    end = head.index(b"\nReceived: ", start + 1)
    return head[start:end].replace(b"\n\t", b" ").replace(b"\n ", b" ")


def _relay_one(postfix: PostfixBackend, proxy_process: StartProxy, tmp_path: Path, config: str,
               rcpt: str, helo: str = "client.test") -> bytes:
    """One message through a proxy started with ``config``; what Postfix delivered."""
    with _start(proxy_process, tmp_path, postfix.address, config=config) as proxy:
        with smtplib.SMTP(proxy.host, proxy.port, local_hostname=helo, timeout=60) as s:
            assert s.send_message(_message(rcpt, uuid.uuid4().hex)) == {}
        [raw] = postfix.wait_messages("example.com", 1, timeout=20)
    return raw


def test_starttls_to_postfix_when_required(postfix: PostfixBackend, proxy_process: StartProxy,
                                           tmp_path: Path) -> None:
    """With backend.tls = "required" the proxy speaks STARTTLS to Postfix, which records TLS."""
    raw = _relay_one(postfix, proxy_process, tmp_path, '[backend]\nhost = "127.0.0.1"\ntls = "required"\n',
                     "tls@example.com")
    received = _postfix_received(raw)
    # smtpd_tls_received_header = yes: "(using TLSv1.3 with cipher ...)"
    assert re.search(rb"\(using TLSv1\.[23] with cipher", received), received
    assert b"with ESMTPS" in received


def test_client_starttls_through_proxy(postfix: PostfixBackend, proxy_process: StartProxy,
                                       tmp_path: Path) -> None:
    """A client that uses STARTTLS with the proxy's generated certificate gets its mail
    delivered, and our Received: header says ESMTPS (RFC 3848)."""
    swaks = _swaks()
    token = uuid.uuid4().hex
    with _start(proxy_process, tmp_path, postfix.address) as proxy:
        r = subprocess.run(
            [swaks, "--server", "127.0.0.1", "--port", str(proxy.port), "--helo", "client.test",
             "--tls", "--from", "sender@client.test", "--to", "user@example.com",
             "--header", f"Subject: tls {token}", "--timeout", "30"],
            capture_output=True, text=True, timeout=90, check=False)
        assert r.returncode == 0, r.stdout + r.stderr
        assert "TLS started" in r.stdout, r.stdout
        [raw] = postfix.wait_messages("example.com", 1, timeout=20)
    assert re.search(rb"by proxy\.test \(mppproxy\) with ESMTPS id", _headers(raw)), raw


def test_starttls_with_python_client_verifies_generated_cert(postfix: PostfixBackend,
                                                             proxy_process: StartProxy,
                                                             tmp_path: Path) -> None:
    """The certificate generated into the data directory is the one the proxy presents."""
    with _start(proxy_process, tmp_path, postfix.address) as proxy:
        cert = tmp_path / "data" / "tls" / "selfsigned.crt"
        ctx = ssl.create_default_context(cafile=str(cert))
        ctx.check_hostname = False
        with smtplib.SMTP(proxy.host, proxy.port, local_hostname="client.test", timeout=60) as s:
            s.starttls(context=ctx)
            code, _ = s.ehlo("client.test")
            assert code == 250
            assert not s.has_extn("starttls")


def test_xforward_is_accepted_by_postfix(postfix: PostfixBackend, proxy_process: StartProxy,
                                         tmp_path: Path) -> None:
    """With backend.xforward Postfix logs the forwarded client as orig_client."""
    raw = _relay_one(postfix, proxy_process, tmp_path, '[backend]\nhost = "127.0.0.1"\nxforward = true\n',
                     "xf@example.com", helo="real-client.test")
    queue_id = re.search(rb"with ESMTP id (\w+)", _postfix_received(raw)).group(1).decode()
    log = postfix.maillog.read_text(errors="replace")
    assert re.search(rf"{queue_id}: client=unknown\[127\.0\.0\.1\], orig_client=unknown\[127\.0\.0\.1\]",
                     log), log[-2000:]


def test_xclient_makes_postfix_see_the_real_client(postfix: PostfixBackend, proxy_process: StartProxy,
                                                   tmp_path: Path) -> None:
    """With backend.xclient Postfix's own Received: names the client's HELO, not the proxy."""
    raw = _relay_one(postfix, proxy_process, tmp_path, '[backend]\nhost = "127.0.0.1"\nxclient = true\n',
                     "xc@example.com", helo="real-client.test")
    received = _postfix_received(raw)
    assert received.startswith(b"Received: from real-client.test"), received
