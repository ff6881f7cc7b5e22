"""``twistd mppproxy`` as Postfix's content filter, before and after its queue
(issue 14; docs/postfix.md has the same main.cf/master.cf lines).

Each test runs a Postfix of its own (``start-postfix-backend.sh`` with
``PFX_FILTER``) whose smtpd hands mail to the proxy, either in lockstep
(``smtpd_proxy_filter``) or from the queue (``content_filter`` with
``smtp_send_xforward_command = yes``); the proxy relays to that Postfix's
return smtpd, which delivers into a Maildir.  The test client connects from
127.0.0.5; the proxy trusts only 127.0.0.1 (Postfix) and takes XFORWARD
from it, so the proxy's checks must see 127.0.0.5 and its HELO: a spam trap
recipient, which a trusted client would pass, is refused, and the proxy's
Received: header names the real client.
"""
from __future__ import annotations

import re
import shutil
import smtplib
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

import pytest

from helpers import free_port, wait_for

from .conftest import PostfixBackend, service_unavailable

if TYPE_CHECKING:
    from .conftest import ProxyProcess, StartProxy

CLIENT_ADDRESS = "127.0.0.5"
PROXY_CONFIG = """
[smtp]
hostname = "proxy.test"
xforward_hosts = ["127.0.0.1/32"]

[policies.default.spamtrap]
enabled = true
patterns = ['^trap@']
"""


@pytest.fixture(params=["before-queue", "after-queue"])
def filtered(request: pytest.FixtureRequest, proxy_process: StartProxy, tmp_path: Path
             ) -> Iterator[tuple[str, PostfixBackend, ProxyProcess]]:
    """(mode, the Postfix in front, the proxy between its two smtpd)."""
    mode = request.param
    front_port, return_port, proxy_port = free_port(), free_port(), free_port()
    cfg = tmp_path / "mppproxy.toml"
    cfg.write_text(PROXY_CONFIG)
    proxy = proxy_process(["--listen", f"tcp:{proxy_port}:interface=127.0.0.1",
                           "--backend", f"127.0.0.1:{return_port}", "--relay-domain", "example.com",
                           "--trusted-network", "127.0.0.1/32", "--data-dir", str(tmp_path / "data"),
                           "--config", str(cfg)], proxy_port, name=f"proxy-{mode}")
    # A root of its own per run (under /tmp: the postfix user must reach it), removed
    # after: nothing of an earlier instance (a pid file, a queue) is taken for this one.
    root = Path(f"/tmp/pfx-{mode}-{uuid.uuid4().hex[:8]}")
    front = PostfixBackend("127.0.0.1", front_port, root,
                           domains=("example.com",),
                           env_extra={"PFX_FILTER": mode, "PFX_NAME": f"pfx-{mode}",
                                      "PFX_FILTER_ADDR": f"127.0.0.1:{proxy_port}",
                                      "PFX_RETURN_PORT": str(return_port)})
    r = front.run_script()
    if r.returncode != 0:
        proxy.stop()
        service_unavailable(f"the {mode} Postfix did not start:\n{r.stdout}{r.stderr}")
    front.clear()
    try:
        yield mode, front, proxy
    finally:
        front.stop(abort=True)
        proxy.stop()
        shutil.rmtree(root, ignore_errors=True)


def _send(front: PostfixBackend, rcpts: list[str], token: str) -> dict[str, tuple[int, bytes]]:
    """Send one message from 127.0.0.5 as client.test; the refused recipients."""
    body = (f"From: sender@client.test\r\nTo: {', '.join(rcpts)}\r\nSubject: filter {token}\r\n"
            f"Message-ID: <{token}@client.test>\r\n\r\ntoken {token}\r\n")
    with smtplib.SMTP(front.host, front.port, local_hostname="client.test", timeout=60,
                      source_address=(CLIENT_ADDRESS, 0)) as smtp:
        return smtp.sendmail("sender@client.test", rcpts, body)


def test_checks_see_the_real_client(filtered: tuple[str, PostfixBackend, ProxyProcess]) -> None:
    """Mail from 127.0.0.5 through Postfix and the proxy arrives with the proxy's Received: naming 127.0.0.5 and its HELO; a spam-trap recipient is refused for it (a trusted client would pass), to the client itself before the queue and in Postfix's log after it."""
    mode, front, proxy = filtered
    token = uuid.uuid4().hex
    assert _send(front, ["user@example.com"], token) == {}
    # A spam trap hit also blocks the client for a while (the auto-blacklist):
    # it goes last.
    if mode == "before-queue":
        # The proxy's own reply, through Postfix's smtpd, in the session.
        with pytest.raises(smtplib.SMTPRecipientsRefused) as caught:
            _send(front, ["trap@example.com"], token + "-trap")
        code, text = caught.value.recipients["trap@example.com"]
        assert code == 550, (code, text)
    else:
        # Queued by Postfix first; the proxy refuses it when the queue sends it.
        assert _send(front, ["trap@example.com"], token + "-trap") == {}
        wait_for(lambda: re.search(r"trap@example\.com>.*said: 550", front.maillog.read_text(
            errors="replace")) is not None, 30, what="the proxy's 550 for trap@ in Postfix's log")
    delivered = [m for m in front.wait_messages("example.com", 1, timeout=30)
                 if token.encode() in m]
    assert len(delivered) == 1
    message = delivered[0]
    assert re.search(rb"Received: from client\.test \(\[127\.0\.0\.5\]\)\r?\n"
                     rb"\tby proxy\.test \(mppproxy\)", message), message[:1500]
    time.sleep(1.0)
    assert front.messages("example.com") == delivered, "nothing else (no trap copy) arrived"
    log = proxy.log_text()
    assert "127.0.0.5" in log
    assert "spam trap" in log.lower() or "spamtrap" in log.lower()


def test_forged_xforward_from_the_client_is_refused(
        filtered: tuple[str, PostfixBackend, ProxyProcess]) -> None:
    """The client cannot speak XFORWARD to the proxy itself: it is not in smtp.xforward_hosts."""
    _, _, proxy = filtered
    with smtplib.SMTP(proxy.host, proxy.port, local_hostname="client.test", timeout=30,
                      source_address=(CLIENT_ADDRESS, 0)) as smtp:
        smtp.ehlo()
        assert not smtp.has_extn("xforward")
        code, text = smtp.docmd("XFORWARD", "ADDR=192.0.2.1")
        assert code == 550 and b"5.7.0" in text
