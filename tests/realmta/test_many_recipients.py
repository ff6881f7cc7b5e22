"""1,100 recipients in one transaction through a real ``twistd mppproxy`` in front of
the real Postfix backend (issue 15, RFC 5321 4.5.3.1.10).

The proxy (``proxy_process``) runs with the default limits (max_recipients 100,
max_errors 20).  The client is smtplib from 127.0.0.1, which is not a trusted
network here, so relay control and the policy engine apply.  The replies the
client saw are printed (``pytest -s`` or ``-rP`` shows them) for the record.
"""
from __future__ import annotations

import collections
import itertools
import re
import smtplib
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING

from helpers import free_port

from mppproxy.config.schema import LimitsConfig

if TYPE_CHECKING:
    from .conftest import PostfixBackend, ProxyProcess, StartProxy

RECIPIENTS = 1100
LIMIT = LimitsConfig().max_recipients
#: Postfix delivers each accepted recipient's copy into the domain's Maildir.
DELIVERY_TIMEOUT = 120.0
#: How long the test waits to be sure that no further copy arrives.
QUIET_PERIOD = 3.0


def _start(proxy_process: StartProxy, tmp_path: Path, backend: str) -> ProxyProcess:
    port = free_port()
    cfg = tmp_path / "mppproxy.toml"
    cfg.write_text('[smtp]\nhostname = "proxy.test"\n')
    return proxy_process(["--listen", f"tcp:{port}:interface=127.0.0.1",
                          "--trusted-network", "10.255.255.0/24",
                          "--data-dir", str(tmp_path / "data"), "--config", str(cfg),
                          "--relay-domain", "example.com", "--backend", backend], port)


def _summary(replies: list[tuple[int, bytes]]) -> list[str]:
    """Runs of equal replies, in order, as "count x code text"."""
    return [f"{len(list(run))} x {code} {text.decode(errors='replace')}"
            for (code, text), run in itertools.groupby(replies)]


def _delivered_to(raw: bytes) -> str:
    match = re.search(rb"^Delivered-To: (\S+)$", raw.split(b"\n\n", 1)[0], re.M)
    assert match, raw[:400]
    return match.group(1).decode()


def test_1100_recipients_in_one_transaction(postfix: PostfixBackend, proxy_process: StartProxy,
                                            tmp_path: Path) -> None:
    """1,100 RCPTs in one transaction: the first max_recipients get Postfix's 250, the rest 452 4.5.3, the session stays open, DATA gets Postfix's 250, and Postfix's Maildir gets the message once for each accepted recipient."""
    token = uuid.uuid4().hex
    rcpts = [f"r{i:04d}.{token[:8]}@example.com" for i in range(RECIPIENTS)]
    with _start(proxy_process, tmp_path, postfix.address) as proxy:
        with smtplib.SMTP(proxy.host, proxy.port, local_hostname="client.test", timeout=60) as s:
            s.ehlo("client.test")
            mail = s.mail("sender@client.test")
            answers = [s.rcpt(r) for r in rcpts]
            data = s.data(f"From: sender@client.test\r\nTo: undisclosed-recipients:;\r\n"
                          f"Subject: many recipients {token}\r\n\r\ntoken {token}\r\n".encode())
            noop = s.noop()
        print(f"MAIL: {mail[0]} {mail[1].decode()}")
        print("RCPT replies, in order:\n  " + "\n  ".join(_summary(answers)))
        print(f"DATA: {data[0]} {data[1].decode()}")
        print(f"NOOP after DATA: {noop[0]} {noop[1].decode()}")
        assert mail[0] == 250
        assert [code for code, _ in answers] == [250] * LIMIT + [452] * (RECIPIENTS - LIMIT)
        assert all(text.startswith(b"4.5.3 ") for _, text in answers[LIMIT:])
        assert data[0] == 250 and b"queued as" in data[1], data
        assert noop[0] == 250
        postfix.wait_messages("example.com", LIMIT, timeout=DELIVERY_TIMEOUT)
        time.sleep(QUIET_PERIOD)
        mine = [m for m in postfix.messages("example.com") if token.encode() in m]
    print(f"Postfix Maildir: {len(mine)} copies for {len(set(map(_delivered_to, mine)))} recipients")
    assert sorted(map(_delivered_to, mine)) == rcpts[:LIMIT]
    counts = collections.Counter(_delivered_to(m) for m in mine)
    assert set(counts.values()) == {1}
