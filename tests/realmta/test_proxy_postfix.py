"""``twistd mppproxy`` in front of a real Postfix (the ``postfix`` fixture), and alone.

Every test runs the proxy as a subprocess (``proxy_process``) on a free loopback port
with ``--trusted-network 10.255.255.0/24``, so the test client on 127.0.0.1 is an
untrusted internet client and relay control applies.  A missing Postfix or swaks
skips these tests, or fails them with ``MPP_REQUIRE_SERVICES=1``.
"""
from __future__ import annotations

import re
import shutil
import smtplib
import subprocess
import time
import uuid
from email.message import EmailMessage
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

from helpers import free_port
from loopback import RawClient

from .conftest import service_unavailable

if TYPE_CHECKING:
    from .conftest import PostfixBackend, ProxyProcess, StartProxy

PROXY_HOSTNAME = "proxy.test"
OUR_RECEIVED = re.compile(
    rb"Received: from client\.test \(\[127\.0\.0\.1\]\)\n"
    rb"\tby proxy\.test \(mppproxy\) with ESMTP id \w+(\n\tfor <[^>]+>)?;\n")
#: How long a test waits to be sure that nothing (more) arrives.
QUIET_PERIOD = 3.0


def _swaks() -> str:
    path = shutil.which("swaks")
    if path is None:
        service_unavailable("swaks is not installed (scripts/services/start-postfix-backend.sh installs it)")
    return path  # type: ignore[return-value]


def _start(proxy_process: StartProxy, tmp_path: Path, backend: str | None,
           relay_domains: Sequence[str] = ("example.com",), config: str = "") -> ProxyProcess:
    port = free_port()
    cfg = tmp_path / "mppproxy.toml"
    cfg.write_text(f'[smtp]\nhostname = "{PROXY_HOSTNAME}"\n{config}')
    args = ["--listen", f"tcp:{port}:interface=127.0.0.1",
            "--trusted-network", "10.255.255.0/24",
            "--data-dir", str(tmp_path / "data"), "--config", str(cfg)]
    for d in relay_domains:
        args += ["--relay-domain", d]
    if backend is not None:
        args += ["--backend", backend]
    return proxy_process(args, port)


def _message(to: str, token: str, subject: str = "through the proxy") -> EmailMessage:
    msg = EmailMessage()
    msg["From"] = "sender@client.test"
    msg["To"] = to
    msg["Subject"] = f"{subject} {token}"
    msg["X-MPP-Verdict"] = "forged by the client"
    msg.set_content(f"token {token}\n.a line with a leading dot\n")
    return msg


def _client(proxy: ProxyProcess) -> smtplib.SMTP:
    return smtplib.SMTP(proxy.host, proxy.port, local_hostname="client.test", timeout=60)


def _with_token(msgs: list[bytes], token: str) -> list[bytes]:
    return [m for m in msgs if token.encode() in m]


def _settle(postfix: PostfixBackend, domain: str, count: int) -> list[bytes]:
    """Wait for ``count`` messages, then a quiet period, and return them all."""
    if count:
        postfix.wait_messages(domain, count, timeout=20)
    time.sleep(QUIET_PERIOD)
    return postfix.messages(domain)


def _headers(raw: bytes) -> bytes:
    return raw.split(b"\n\n", 1)[0]


def test_swaks_through_proxy_delivers(postfix: PostfixBackend, proxy_process: StartProxy,
                                      tmp_path: Path) -> None:
    """swaks through the proxy lands one message in Postfix's Maildir with
    X-Original-To/Delivered-To, our Received: header under Postfix's, and the
    client sees Postfix's own "queued as" reply."""
    swaks = _swaks()
    token = uuid.uuid4().hex
    with _start(proxy_process, tmp_path, postfix.address) as proxy:
        r = subprocess.run(
            [swaks, "--server", "127.0.0.1", "--port", str(proxy.port), "--helo", "client.test",
             "--from", "sender@client.test", "--to", "user@example.com",
             "--header", f"Subject: swaks {token}", "--body", f"body {token}",
             "--timeout", "30"],
            capture_output=True, text=True, timeout=90, check=False)
        assert r.returncode == 0, r.stdout + r.stderr
        assert re.search(r"<-\s+250 2\.0\.0 Ok: queued as [0-9A-Za-z]+", r.stdout), r.stdout
        [raw] = _settle(postfix, "example.com", 1)
    head = _headers(raw)
    assert token.encode() in raw
    assert b"X-Original-To: user@example.com\n" in head
    assert b"Delivered-To: user@example.com\n" in head
    assert OUR_RECEIVED.search(head), head.decode(errors="replace")
    # Postfix's Received: (from the proxy) comes first, ours after it.
    first_received = head.index(b"Received: ")
    assert head.index(b"by proxy.test (mppproxy)") > first_received
    assert b"from proxy.test" in head[first_received:head.index(b"by proxy.test (mppproxy)")]
    assert postfix.messages("example.net") == []


def test_smtplib_through_proxy_delivers_each_recipient(postfix: PostfixBackend,
                                                       proxy_process: StartProxy,
                                                       tmp_path: Path) -> None:
    """smtplib through the proxy with two recipients in two relay domains: each
    gets exactly one copy, with its own Delivered-To, and no X-MPP-* field."""
    token = uuid.uuid4().hex
    with _start(proxy_process, tmp_path, postfix.address, ("example.com", "example.net")) as proxy:
        with _client(proxy) as s:
            refused = s.send_message(_message("a@example.com, b@example.net", token),
                                     to_addrs=["a@example.com", "b@example.net"])
        assert refused == {}
        [com] = _settle(postfix, "example.com", 1)
        [net] = postfix.messages("example.net")
    assert b"Delivered-To: a@example.com\n" in _headers(com)
    assert b"Delivered-To: b@example.net\n" in _headers(net)
    for raw in (com, net):
        assert token.encode() in raw
        assert OUR_RECEIVED.search(_headers(raw))
        assert b"x-mpp-" not in raw.lower()
        assert b"\n.a line with a leading dot\n" in raw


def test_backend_refusal_text_reaches_client(postfix: PostfixBackend, proxy_process: StartProxy,
                                             tmp_path: Path) -> None:
    """A domain the proxy relays but Postfix does not (example.org) gets
    Postfix's own 554 5.7.1 text naming the address; a domain the proxy does not
    relay (example.net here) gets the proxy's own 554 and never reaches Postfix."""
    token = uuid.uuid4().hex[:12]
    with _start(proxy_process, tmp_path, postfix.address, ("example.com", "example.org")) as proxy:
        with _client(proxy) as s:
            s.ehlo("client.test")
            assert s.mail(f"sender-{token}@client.test")[0] == 250
            backend_code, backend_text = s.rcpt(f"x-{token}@example.org")
            own_code, own_text = s.rcpt(f"y-{token}@example.net")
            s.rset()
    assert backend_code == 554
    assert backend_text.startswith(b"5.7.1 ")
    assert f"<x-{token}@example.org>: Relay access denied".encode() in backend_text
    assert own_code == 554
    assert own_text.startswith(b"5.7.1 ")
    assert f"y-{token}".encode() not in own_text
    log = postfix.maillog.read_text(errors="replace")
    assert f"<x-{token}@example.org>: Relay access denied" in log
    assert f"y-{token}@example.net" not in log


def test_backend_stopped_mid_session_then_resend_once(postfix: PostfixBackend,
                                                      proxy_process: StartProxy,
                                                      tmp_path: Path) -> None:
    """Postfix stopping after MAIL and RCPT were accepted gives the client a 4xx
    at the end of DATA and delivers nothing; after a restart the same message,
    sent again in the same session, is delivered exactly once."""
    token = uuid.uuid4().hex
    message = _message("user@example.com", token).as_bytes().replace(b"\n", b"\r\n")
    with _start(proxy_process, tmp_path, postfix.address) as proxy:
        with _client(proxy) as s:
            s.ehlo("client.test")
            assert s.mail("sender@client.test")[0] == 250
            assert s.rcpt("user@example.com")[0] == 250
            postfix.stop()
            try:
                code, text = s.data(message)
                assert 400 <= code < 500, (code, text)
            finally:
                postfix.start()
            assert _with_token(_settle(postfix, "example.com", 0), token) == []
            assert s.mail("sender@client.test")[0] == 250
            assert s.rcpt("user@example.com")[0] == 250
            code, text = s.data(message)
            assert code == 250, (code, text)
        delivered = _with_token(_settle(postfix, "example.com", 1), token)
    assert len(delivered) == 1


# Payloads after DATA: a legitimate message, a look-alike terminator, a whole
# smuggled transaction, the real end.  (name, look-alike or None for clean framing)
_SMUGGLE_VARIANTS = {
    "lf_dot_lf": b"\n.\n",
    "lf_dot_crlf": b"\n.\r\n",
    "cr_dot_crlf": b"\r.\r\n",
    "crlf_dot_lf": b"\r\n.\n",
    "crlf_dot_cr": b"\r\n.\r",
    "dot_stuffed": b"\r\n..\r\n",
}


def _smuggle(proxy: ProxyProcess, token: str, look_alike: bytes, victim: str) -> list[tuple[int, bytes]]:
    payload = (b"From: <legit@client.test>\r\nSubject: legit " + token.encode() + b"\r\n\r\nlegit body"
               + look_alike
               + b"MAIL FROM:<smuggled-" + token.encode() + b"@evil.test>\r\n"
               + b"RCPT TO:<" + victim.encode() + b">\r\n"
               + b"DATA\r\n"
               + b"From: <smuggled@evil.test>\r\nSubject: smuggled " + token.encode() + b"\r\n\r\n"
               + b"smuggled body\r\n.\r\nQUIT\r\n")
    with RawClient(proxy.port, timeout=60) as c:
        c.reply()
        c.expect(b"EHLO client.test", 250)
        c.expect(b"MAIL FROM:<legit-" + token.encode() + b"@client.test>", 250)
        c.expect(b"RCPT TO:<user@example.com>", 250)
        c.expect(b"DATA", 354)
        try:
            c.send(payload)
        except (BrokenPipeError, ConnectionResetError):
            pass
        return c.replies_until_close(limit=50)


def _smuggled_deliveries(msgs: list[bytes], token: str) -> list[bytes]:
    """Messages Postfix delivered as their own message for the smuggled sender
    (the smuggled text may legitimately be inside a legit message's body)."""
    return [m for m in msgs if f"Return-Path: <smuggled-{token}@evil.test>".encode() in _headers(m)
            or f"Subject: smuggled {token}".encode() in _headers(m)]


def test_smuggling_into_postfix_strict(postfix: PostfixBackend, proxy_process: StartProxy,
                                       tmp_path: Path) -> None:
    """Through the proxy in its default strict mode, no look-alike terminator
    smuggles a message into Postfix: bare CR/LF variants are refused with 5xx and
    deliver nothing, a dot-stuffed line delivers exactly the one legit message."""
    token = uuid.uuid4().hex[:12]
    accepted = 0
    with _start(proxy_process, tmp_path, postfix.address) as proxy:
        for name, look_alike in _SMUGGLE_VARIANTS.items():
            replies = _smuggle(proxy, token, look_alike, "victim@example.com")
            codes = [code for code, _ in replies]
            if name == "dot_stuffed":
                assert codes == [250, 221], (name, replies)
                accepted += 1
            else:
                assert codes == [550], (name, replies)
        msgs = _with_token(_settle(postfix, "example.com", accepted), token)
    assert len(msgs) == accepted
    assert _smuggled_deliveries(msgs, token) == []
    assert f"smuggled-{token}@evil.test" not in postfix.maillog.read_text(errors="replace")


def test_smuggling_into_postfix_normalise(postfix: PostfixBackend, proxy_process: StartProxy,
                                          tmp_path: Path) -> None:
    """With smtp.bare_newline = "normalise" the proxy ends the message where
    Postfix would, so the smuggled part is the client's own next transaction and
    meets relay control: its foreign recipient is refused by the proxy and only
    the legit message is delivered, once per variant."""
    token = uuid.uuid4().hex[:12]
    variants = [v for k, v in _SMUGGLE_VARIANTS.items() if k != "dot_stuffed"]
    with _start(proxy_process, tmp_path, postfix.address,
                config='bare_newline = "normalise"\n') as proxy:
        for look_alike in variants:
            replies = _smuggle(proxy, token, look_alike, "victim@elsewhere.test")
            codes = [code for code, _ in replies]
            # legit 250, smuggled MAIL 250 (relayed, answered to the client),
            # foreign RCPT 554, DATA 554: nothing of it reaches Postfix as mail.
            assert codes[:4] == [250, 250, 554, 554], (look_alike, replies)
            assert codes[-1] == 221, (look_alike, replies)
        msgs = _with_token(_settle(postfix, "example.com", len(variants)), token)
    assert len(msgs) == len(variants)
    assert _smuggled_deliveries(msgs, token) == []
    for raw in msgs:
        assert b"\r" not in raw  # Postfix stores LF; a stray CR would have come from us


def test_all_in_one_swaks_lands_in_maildir(proxy_process: StartProxy, tmp_path: Path) -> None:
    """With no backend, swaks through the proxy lands exactly one message in
    DATA_DIR/maildir/example.com/user/new, with Delivered-To and our Received:."""
    swaks = _swaks()
    token = uuid.uuid4().hex
    with _start(proxy_process, tmp_path, None) as proxy:
        r = subprocess.run(
            [swaks, "--server", "127.0.0.1", "--port", str(proxy.port), "--helo", "client.test",
             "--from", "sender@client.test", "--to", "user@example.com",
             "--header", f"Subject: all-in-one {token}", "--body", f"body {token}",
             "--timeout", "30"],
            capture_output=True, text=True, timeout=90, check=False)
        assert r.returncode == 0, r.stdout + r.stderr
    new = tmp_path / "data" / "maildir" / "example.com" / "user" / "new"
    files = sorted(new.iterdir())
    assert len(files) == 1, files
    raw = files[0].read_bytes()
    assert token.encode() in raw
    assert b"\r\n" not in raw
    head = _headers(raw)
    assert b"Delivered-To: user@example.com\n" in head
    assert b"Return-Path: <sender@client.test>\n" in head
    assert OUR_RECEIVED.search(head), head
