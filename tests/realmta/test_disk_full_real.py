"""A full spool disk with real ``twistd -n mppproxy`` processes (issue #15).

The spool (edge mode, in front of the real Postfix backend) or the whole
data directory (all-in-one mode, Maildir delivery) is a tmpfs filled with a
file, so the next write gets ENOSPC.  A client sends a message bigger than
``limits.memory_spool_bytes`` and must hear ``452 4.3.1`` after its
CRLF.CRLF, not a dropped connection; in the same session RSET and a small
message follow.  Mounting needs root: without it these tests skip, or fail
with ``MPP_REQUIRE_SERVICES=1``.  Each test prints the replies it saw
(``pytest -s`` shows them).
"""
from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import TYPE_CHECKING

from helpers import free_port, wait_for
from loopback import RawClient
from test_disk_full import fill, mount_tmpfs

if TYPE_CHECKING:
    from .conftest import PostfixBackend, StartProxy

MEMORY_SPOOL = 65536


def _big(token: str) -> bytes:
    """~200 KiB of 1000-octet lines: past MEMORY_SPOOL, so it must go to disk."""
    return f"Subject: big {token}\r\n\r\n".encode() + (b"b" * 998 + b"\r\n") * 200 + b".\r\n"


class _Case:
    """Just what mount_tmpfs needs from a test: fail and addCleanup."""

    def __init__(self) -> None:
        self.cleanups: list = []

    def fail(self, why: str) -> None:
        raise AssertionError(why)

    def addCleanup(self, fn, *args) -> None:  # noqa: N802 (unittest's name)
        self.cleanups.append((fn, args))

    def run_cleanups(self) -> None:
        while self.cleanups:
            fn, args = self.cleanups.pop()
            fn(*args)


def _small(token: str) -> bytes:
    return f"Subject: small {token}\r\n\r\nbody {token}\r\n.\r\n".encode()


def _with_token(messages: list[bytes], token: str) -> list[bytes]:
    return [m for m in messages if token.encode() in m]


def _converse(client: RawClient, steps: list[bytes]) -> list[tuple[int, bytes]]:
    got = []
    for data in steps:
        client.send(data)
        got.append(client.reply())
    return got


def _warm_up(port: int) -> None:
    """One RCPT through the policy checks before the disk is filled, so the
    state database (under data_dir) has its tables: its start runs in a
    thread and may still be under way when the banner comes."""
    c = RawClient(port)
    try:
        got = [c.reply()] + _converse(c, [b"EHLO client.test\r\n", b"MAIL FROM:<s@client.test>\r\n",
                                          b"RCPT TO:<a@example.com>\r\n", b"QUIT\r\n"])
    finally:
        c.sock.close()
    assert [code for code, _ in got] == [220, 250, 250, 250, 221], got


def _show(title: str, got: list[tuple[int, bytes]]) -> None:
    print(f"\n{title}")
    for code, text in got:
        print(f"  {code} {text.decode(errors='replace')}")


def _start(proxy_process: "StartProxy", tmp_path: Path, config: str, *extra: str):
    port = free_port()
    cfg = tmp_path / "mppproxy.toml"
    cfg.write_text(config)
    return proxy_process(["--listen", f"tcp:{port}:interface=127.0.0.1",
                          "--trusted-network", "10.255.255.0/24",
                          "--relay-domain", "example.com", "--config", str(cfg), *extra], port)


def test_edge_full_spool_452_then_rset_and_small_message_250(
        postfix: "PostfixBackend", proxy_process: "StartProxy", tmp_path: Path) -> None:
    """Edge mode, spool on a full tmpfs: the big message gets 452 4.3.1 and never reaches Postfix; RSET and a small message in the same session get 250 and arrive."""
    case = _Case()
    try:
        spool = mount_tmpfs(case)
        config = (f'spool_dir = "{spool}"\n[smtp]\nhostname = "proxy.test"\n'
                  f"[limits]\nmemory_spool_bytes = {MEMORY_SPOOL}\n")
        token = uuid.uuid4().hex
        with _start(proxy_process, tmp_path, config, "--data-dir", str(tmp_path / "data"),
                    "--backend", postfix.address) as proxy:
            fill(spool)
            c = RawClient(proxy.port)
            try:
                got = [c.reply()] + _converse(c, [
                    b"EHLO client.test\r\n", b"MAIL FROM:<s@client.test>\r\n",
                    b"RCPT TO:<a@example.com>\r\n", b"DATA\r\n", _big(token),
                    b"RSET\r\n", b"MAIL FROM:<s@client.test>\r\n", b"RCPT TO:<a@example.com>\r\n",
                    b"DATA\r\n", _small(token), b"QUIT\r\n"])
            finally:
                c.sock.close()
            _show("edge mode, full spool:", got)
            assert [code for code, _ in got] == [220, 250, 250, 250, 354, 452,
                                                 250, 250, 250, 354, 250, 221], got
            assert got[5][1].startswith(b"4.3.1 "), got[5]
            # Other tests may share this Postfix: only our token's messages count.
            wait_for(lambda: _with_token(postfix.messages("example.com"), token), 20,
                     what="the small message at Postfix")
            log = wait_for(lambda: "not stored" in proxy.log_text() and proxy.log_text(), 10,
                           what="the spool error in the proxy's log")
            assert "spool write failed" in log and "errno 28" in log, log[-3000:]
            assert "client disconnected during DATA" not in log
        [raw] = _with_token(postfix.messages("example.com"), token)
        assert f"Subject: small {token}".encode() in raw
    finally:
        case.run_cleanups()


def test_all_in_one_full_disk_452_session_answers_then_delivers(
        proxy_process: "StartProxy", tmp_path: Path) -> None:
    """All-in-one mode, data directory on a full tmpfs: the big message gets 452 4.3.1, a small one (Maildir) 452 4.3.1 too, the session still answers; with space back it gets 250."""
    case = _Case()
    try:
        data_dir = mount_tmpfs(case, size="4m")
        config = (f'[smtp]\nhostname = "proxy.test"\n'
                  f"[limits]\nmemory_spool_bytes = {MEMORY_SPOOL}\n")
        token = uuid.uuid4().hex
        with _start(proxy_process, tmp_path, config, "--data-dir", data_dir) as proxy:
            _warm_up(proxy.port)
            # The node's own archive store is made under data_dir at start
            # (archivenode/keeper.py): filled before it is open, its SQLite
            # journal could give space back under the test.
            wait_for(lambda: "archive store open" in proxy.log_text(), 30,
                     what="the archive store open")
            filler = fill(data_dir)
            c = RawClient(proxy.port)
            try:
                got = [c.reply()] + _converse(c, [
                    b"EHLO client.test\r\n", b"MAIL FROM:<s@client.test>\r\n",
                    b"RCPT TO:<a@example.com>\r\n", b"DATA\r\n", _big(token),
                    b"RSET\r\n", b"MAIL FROM:<s@client.test>\r\n", b"RCPT TO:<a@example.com>\r\n",
                    b"DATA\r\n", _small(token), b"NOOP\r\n"])
                _show("all-in-one mode, full disk:", got)
                assert [code for code, _ in got] == [220, 250, 250, 250, 354, 452,
                                                     250, 250, 250, 354, 452, 250], got
                assert got[5][1].startswith(b"4.3.1 ") and got[10][1].startswith(b"4.3.1 "), got
                os.unlink(filler)
                more = _converse(c, [b"MAIL FROM:<s@client.test>\r\n",
                                     b"RCPT TO:<a@example.com>\r\n", b"DATA\r\n", _small(token),
                                     b"QUIT\r\n"])
                _show("all-in-one mode, space back, same session:", more)
                assert [code for code, _ in more] == [250, 250, 354, 250, 221], more
            finally:
                c.sock.close()
            delivered = [p for p in Path(data_dir).rglob("new/*") if p.is_file()]
            assert len(delivered) == 1, delivered
            assert token.encode() in delivered[0].read_bytes()
            assert not [p for p in Path(data_dir).rglob("tmp/*") if p.is_file()]
            log = proxy.log_text()
            assert "spool write failed" in log and "maildir delivery failed" in log, log[-3000:]
            assert "client disconnected during DATA" not in log
    finally:
        case.run_cleanups()
