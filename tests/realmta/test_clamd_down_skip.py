"""Issue #15 end to end: a real ``twistd -n mppproxy`` (edge mode, real Postfix
behind it) whose clamd engine has ``on_failure = "skip"`` and points at a
loopback port where nothing listens.  The message is accepted with Postfix's
own reply, the delivered copy carries ``X-MPP-Scan-Skipped`` naming clamd
and why, and the transaction's JSON log line lists it in ``scan_skipped``.

A missing Postfix skips this test, or fails it with ``MPP_REQUIRE_SERVICES=1``.
"""
from __future__ import annotations

import email
import email.policy
import json
import re
import smtplib
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any

from helpers import free_port, wait_for

if TYPE_CHECKING:
    from .conftest import PostfixBackend, StartProxy


def _config(tmp_path: Path, clamd_port: int) -> Path:
    cfg = tmp_path / "mppproxy.toml"
    cfg.write_text(f"""
[smtp]
hostname = "proxy.test"

[logging]
json_file = "{tmp_path / 'events.json'}"

[scanners.clamd]
address = "tcp:127.0.0.1:{clamd_port}"
retries = 0
connect_timeout = 2.0

[policies.default.scan]
enabled = true
result_headers = true

[policies.default.scan.engines.clamd]
on_failure = "skip"
""")
    return cfg


def _transactions(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    events = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [e for e in events if e.get("mpp_event") == "transaction"]


def _unfolded(raw: bytes, name: str) -> list[str]:
    msg = email.message_from_bytes(raw, policy=email.policy.default)
    return [" ".join(str(v).split()) for v in msg.get_all(name, [])]


def test_clamd_down_with_skip_accepts_and_marks(postfix: PostfixBackend, proxy_process: StartProxy,
                                                tmp_path: Path) -> None:
    """clamd down and on_failure skip: 250 from Postfix, X-MPP-Scan-Skipped on the delivered copy, scan_skipped in the log."""
    clamd_port = free_port()  # bound and released: nothing listens there
    port = free_port()
    args = ["--listen", f"tcp:{port}:interface=127.0.0.1",
            "--trusted-network", "10.255.255.0/24", "--relay-domain", "example.com",
            "--backend", postfix.address, "--data-dir", str(tmp_path / "data"),
            "--config", str(_config(tmp_path, clamd_port))]
    token = uuid.uuid4().hex
    with proxy_process(args, port) as proxy:
        with smtplib.SMTP("127.0.0.1", proxy.port, local_hostname="client.test",
                          timeout=60) as client:
            client.ehlo("client.test")
            client.mail("sender@client.test")
            client.rcpt("user@example.com")
            code, text = client.data(b"From: sender@client.test\r\nTo: user@example.com\r\n"
                                     b"Subject: clamd is down " + token.encode() + b"\r\n\r\n"
                                     b"body " + token.encode() + b"\r\n")
        reply = f"{code} {text.decode()}"
        print(f"observed reply to the end of DATA: {reply}")
        assert code == 250 and re.fullmatch(r"2\.0\.0 Ok: queued as \w+", text.decode()), reply
        # Postfix delivers a moment after its 250; other tests' mail may share
        # the Maildir, so the message is found by its token.
        [raw] = wait_for(lambda: [m for m in postfix.messages("example.com")
                                  if token.encode() in m], 20, what=f"the message {token}")
        events = tmp_path / "events.json"
        wait_for(lambda: len(_transactions(events)) >= 1, 10, what="the transaction log line")
        [event] = _transactions(events)
    why = f"down: cannot connect to tcp:127.0.0.1:{clamd_port}: connection refused"
    print(f"X-MPP-Scan-Skipped: {_unfolded(raw, 'X-MPP-Scan-Skipped')}")
    assert _unfolded(raw, "X-MPP-Scan-Skipped") == [f"clamd ({why})"]
    assert _unfolded(raw, "X-MPP-Scan") == ["score=0; action=relay"]
    assert event["scan_skipped"] == {"clamd": why}
    assert (event["action"], event["reply_code"]) == ("relay", 250)
