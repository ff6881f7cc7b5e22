"""A real Postfix asks the mppproxy policy server (``check_policy_service``)
about every recipient and acts on the answers.

Postfix runs privately under ``/tmp/pfx-policyd`` (``MPP_PFX_POLICYD_ROOT``)
on a free port, started by ``scripts/services/start-postfix-backend.sh`` with
``PFX_POLICY_SERVICE`` set.  The policy server is ``twistd -n mppproxy``
with ``mode = "policy"`` and its SQLite state database, as deployed.

Policies: example.com (default) has a spam trap ``trap@`` and an access
blacklist; example.net is greylisted with a 2 s delay.
"""
from __future__ import annotations

import os
import shutil
import smtplib
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Iterator

import pytest

from helpers import free_port, stop_process, wait_for

from .conftest import (TWISTD, PostfixBackend, service_unavailable, _port_open,
                       _subprocess_env, _tail)

HERE = Path(__file__).resolve().parent
GREY_DELAY = 2
# How long a spam-trap hit blacklists the client (Postfix's 127.0.0.1): short,
# so the tests after the trap test are not refused.
TRAP_SECONDS = 2

CONFIG = """\
mode = "policy"
data_dir = "{data}"
workers = {workers}
# loopback is not trusted here: Postfix's clients are 127.0.0.1
trusted_networks = ["10.255.255.0/24"]
[policyd]
listen = ["tcp:{port}:interface=127.0.0.1"]
[policies.default.spamtrap]
enabled = true
patterns = ["^trap@"]
blacklist_seconds = {trap_seconds}
[policies.default.access]
blacklist_senders = ["spammer@bad.example"]
[policies.grey]
domains = ["example.net"]
[policies.grey.greylisting]
enabled = true
delay = {delay}
auto_whitelist_after = 0
"""


class PolicyPostfix(PostfixBackend):
    policy_service: str = ""

    def _env(self) -> dict[str, str]:
        env = super()._env()
        env["PFX_POLICY_SERVICE"] = self.policy_service
        return env


# One process, and two sharing the listener and the SQLite file (the setting
# for a busy node): Postfix's connections then land on either.
@pytest.fixture(scope="module", params=[1, 2], ids=["one-process", "workers-2"])
def policy_server(request: pytest.FixtureRequest,
                  tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    port = free_port()
    workdir = tmp_path_factory.mktemp("policyd")
    conf = workdir / "policyd.toml"
    conf.write_text(CONFIG.format(data=workdir / "data", port=port, delay=GREY_DELAY,
                                  trap_seconds=TRAP_SECONDS, workers=request.param))
    log = workdir / "policyd.log"
    # The real thing: twistd --mode policy with its SQLite state database.
    proc = subprocess.Popen([*TWISTD, "-n", "--pidfile=", "mppproxy", "--config", str(conf)],
                            stdin=subprocess.DEVNULL, stdout=log.open("wb"),
                            stderr=subprocess.STDOUT, env=_subprocess_env(None), cwd=workdir)
    try:
        wait_for(lambda: proc.poll() is not None or _port_open("127.0.0.1", port), 20,
                 what="policy server")
        if proc.poll() is not None:
            pytest.fail(f"policy server exited:\n{_tail(log.read_text())}")
        yield port
    finally:
        stop_process(proc)
        print(_tail(log.read_text(errors="replace"), 40))


@pytest.fixture(scope="module")
def pfx(policy_server: int) -> Iterator[PolicyPostfix]:
    """A private Postfix whose recipients are checked by our policy server."""
    if not sys.platform.startswith("linux") or os.geteuid() != 0:
        service_unavailable("the Postfix script needs Linux and root")
    if shutil.which("bash") is None:
        service_unavailable("bash missing")
    backend = PolicyPostfix(host="127.0.0.1",
                            port=int(os.environ.get("MPP_PFX_POLICYD_PORT", "0")) or free_port(),
                            root=Path(os.environ.get("MPP_PFX_POLICYD_ROOT", "/tmp/pfx-policyd")))
    backend.policy_service = f"inet:127.0.0.1:{policy_server}"
    try:
        r = backend.run_script()
    except subprocess.TimeoutExpired:
        service_unavailable("start-postfix-backend.sh did not finish in time")
    if r.returncode != 0:
        service_unavailable(f"start-postfix-backend.sh exited {r.returncode}:\n"
                            f"{_tail(r.stdout + r.stderr)}")
    if not _port_open(backend.host, backend.port):
        service_unavailable(f"postfix does not answer on {backend.address}")
    backend.clear()
    try:
        yield backend
    finally:
        backend.stop()


def _message(sender: str, to: str) -> tuple[bytes, str]:
    token = uuid.uuid4().hex
    return (f"From: {sender}\r\nTo: {to}\r\nSubject: policy {token}\r\n\r\nhello\r\n").encode(), token


def _delivered(pfx: PostfixBackend, domain: str, token: str) -> None:
    wait_for(lambda: any(token.encode() in m for m in pfx.messages(domain)), 15,
             what=f"message {token} for {domain}")


def _rcpt(pfx: PostfixBackend, sender: str, recipient: str) -> tuple[int, bytes]:
    with smtplib.SMTP(pfx.host, pfx.port, timeout=30) as s:
        s.ehlo("client.test")
        code, _ = s.mail(sender)
        assert code == 250
        return s.rcpt(recipient)


def test_normal_recipient_delivered(pfx: PolicyPostfix) -> None:
    """A recipient the policy has nothing against is delivered by Postfix."""
    msg, token = _message("alice@sender.example", "bob@example.com")
    with smtplib.SMTP(pfx.host, pfx.port, timeout=30) as s:
        assert s.sendmail("alice@sender.example", ["bob@example.com"], msg) == {}
    _delivered(pfx, "example.com", token)


def test_spamtrap_recipient_rejected(pfx: PolicyPostfix) -> None:
    """Postfix refuses a spam-trap recipient with our 550 5.7.1, and then the
    client's other recipients with 554 5.7.1 (it is blacklisted) until the
    entry expires."""
    msg, token = _message("alice@sender.example", "bob@example.com")
    with smtplib.SMTP(pfx.host, pfx.port, timeout=30) as s:
        with pytest.raises(smtplib.SMTPRecipientsRefused) as info:
            s.sendmail("alice@sender.example", ["trap@example.com", "bob@example.com"], msg)
    refused = info.value.recipients
    code, text = refused["trap@example.com"]
    assert code == 550 and text.startswith(b"5.7.1 <trap@example.com>: Recipient address rejected:"), text
    assert b"access denied" in text
    code, text = refused["bob@example.com"]
    assert code == 554 and b"temporarily blocked" in text, text
    time.sleep(TRAP_SECONDS + 0.5)
    with smtplib.SMTP(pfx.host, pfx.port, timeout=30) as s:
        assert s.sendmail("alice@sender.example", ["bob@example.com"], msg) == {}
    _delivered(pfx, "example.com", token)


def test_blacklisted_sender_rejected(pfx: PolicyPostfix) -> None:
    """Postfix refuses the recipients of an access-list-blacklisted sender with our 554 5.7.1."""
    code, text = _rcpt(pfx, "spammer@bad.example", "bob@example.com")
    assert code == 554, text
    assert text.startswith(b"5.7.1 ") and b"sender <spammer@bad.example> is not accepted here" in text


def test_greylisting_defers_then_delivers(pfx: PolicyPostfix) -> None:
    """A new triplet is deferred (DEFER_IF_PERMIT -> 450 4.7.1); the retry after the delay is delivered."""
    sender = f"grey-{uuid.uuid4().hex[:8]}@sender.example"
    code, text = _rcpt(pfx, sender, "carol@example.net")
    assert code == 450 and text.startswith(b"4.7.1 "), text
    assert b"Greylisted" in text
    time.sleep(GREY_DELAY + 0.5)
    msg, token = _message(sender, "carol@example.net")
    with smtplib.SMTP(pfx.host, pfx.port, timeout=30) as s:
        assert s.sendmail(sender, ["carol@example.net"], msg) == {}
    _delivered(pfx, "example.net", token)


def test_policy_server_is_asked(pfx: PolicyPostfix) -> None:
    """Postfix's log shows the policy answer as the reason for a refusal."""
    _rcpt(pfx, "alice@sender.example", "trap@example.com")
    wait_for(lambda: b"trap@example.com" in pfx.maillog.read_bytes(), 10, what="maillog line")
    log = pfx.maillog.read_bytes()
    assert b"Recipient address rejected: access denied" in log
