"""SIGTERM to a real ``twistd mppproxy`` in front of the real Postfix while 20
clients send, with the proxy's stdout a full pipe nobody reads (issue 15).

What a stop must keep: every message the backend received was answered 250
to its client (so no client's retry delivers it twice); every message a
client sent got an answer, 250 or 4xx, never a dropped connection; and the
process exits within ``timeouts.shutdown_grace``.  The proxy is started here
rather than with ``proxy_process`` because its stdout must be a pipe.
"""
from __future__ import annotations

import collections
import os
import re
import select
import signal
import smtplib
import socket
import subprocess
import threading
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Optional

from helpers import free_port, wait_for

from .conftest import TWISTD, _subprocess_env

if TYPE_CHECKING:
    from .conftest import PostfixBackend

CLIENTS = 20
MESSAGES_PER_CLIENT = 40
MESSAGES_PER_SESSION = 4
GRACE = 10.0
EXIT_SLACK = 3.0
# Replies counted before the SIGTERM: the burst is well under way.
ANSWERED_BEFORE_STOP = 40
BODY = ("x" * 76 + "\r\n") * 1500  # ~117 KB: DATA takes a moment on the wire
TOKEN = re.compile(rb"stop-token-([0-9a-f]{32})")


class Outcomes:
    """Per message token: the last reply code its client heard (None: the
    connection ended without one) and whether DATA's content was sent."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.code: dict[str, Optional[int]] = {}
        self.data_sent: set[str] = set()
        # token -> (content sent from, reply heard at), monotonic seconds
        self.data_times: dict[str, tuple[float, float]] = {}
        self.stop_refused = 0  # connections refused once the listener closed

    def set(self, token: str, code: Optional[int]) -> None:
        with self.lock:
            self.code[token] = code

    def answered_250(self) -> set[str]:
        with self.lock:
            return {t for t, c in self.code.items() if c == 250}


def _client(port: int, out: Outcomes, deadline: float) -> None:
    """Send up to MESSAGES_PER_CLIENT messages, MESSAGES_PER_SESSION per
    connection, until the proxy refuses or closes; bounded in count and time."""
    sent = 0
    while sent < MESSAGES_PER_CLIENT and time.monotonic() < deadline:
        try:
            smtp = smtplib.SMTP("127.0.0.1", port, local_hostname="client.test", timeout=30)
            smtp.ehlo()
        except (OSError, smtplib.SMTPException):
            with out.lock:
                out.stop_refused += 1
            return
        try:
            for _ in range(MESSAGES_PER_SESSION):
                if sent >= MESSAGES_PER_CLIENT:
                    break
                sent += 1
                token = uuid.uuid4().hex
                if not _one_message(smtp, token, out):
                    return
            smtp.quit()
        except (OSError, smtplib.SMTPException):
            return
        finally:
            smtp.close()


def _one_message(smtp: smtplib.SMTP, token: str, out: Outcomes) -> bool:
    """One transaction; records the outcome; False when the session is over."""
    out.set(token, None)
    try:
        code, _ = smtp.mail("sender@client.test")
        if code != 250:
            out.set(token, code)
            return False
        code, _ = smtp.rcpt("someone@example.com")
        if code != 250:
            out.set(token, code)
            return False
        code, _ = smtp.docmd("DATA")
        if code != 354:
            out.set(token, code)
            return False
        started = time.monotonic()
        with out.lock:
            out.data_sent.add(token)
            out.data_times[token] = (started, float("inf"))
        msg = (f"From: sender@client.test\r\nTo: someone@example.com\r\n"
               f"Subject: stop-token-{token}\r\n\r\n{BODY}.\r\n")
        smtp.send(msg.encode())
        code, _ = smtp.getreply()
        out.set(token, code)
        with out.lock:
            out.data_times[token] = (started, time.monotonic())
        return code == 250
    except smtplib.SMTPServerDisconnected:
        return False  # recorded as None: no reply heard


def _fill_pipe(w: int) -> None:
    def fill() -> None:
        try:
            while True:
                os.write(w, b"f" * 4096)
        except OSError:
            pass

    threading.Thread(target=fill, daemon=True).start()
    wait_for(lambda: not select.select([], [w], [], 0)[1], 10, what="a full stdout pipe")


def _delivered_tokens(postfix: "PostfixBackend") -> list[str]:
    tokens = []
    for raw in postfix.messages("example.com"):
        m = TOKEN.search(raw)
        if m:
            tokens.append(m.group(1).decode())
    return tokens


def test_sigterm_under_load_answers_every_message_at_the_backend(postfix: "PostfixBackend",
                                                                tmp_path: Path) -> None:
    """A SIGTERM mid-burst with a stalled log pipe: each message the backend got was answered 250, none was cut without a reply, and the proxy exits within the grace."""
    port = free_port()
    cfg = tmp_path / "mpp.toml"
    cfg.write_text(f'[smtp]\nhostname = "proxy.test"\n[timeouts]\nshutdown_grace = {GRACE}\n')
    args = ["--listen", f"tcp:{port}:interface=127.0.0.1", "--trusted-network", "10.255.255.0/24",
            "--relay-domain", "example.com", "--backend", postfix.address,
            "--data-dir", str(tmp_path / "data"), "--config", str(cfg)]
    r, w = os.pipe()
    proc = subprocess.Popen([*TWISTD, "-n", "--pidfile=", "mppproxy", *args],
                            stdin=subprocess.DEVNULL, stdout=w, stderr=subprocess.STDOUT,
                            cwd=tmp_path, env=_subprocess_env(None), start_new_session=True)
    out = Outcomes()
    threads: list[threading.Thread] = []
    try:
        def greets() -> bool:
            if proc.poll() is not None:
                raise AssertionError(f"proxy exited with {proc.returncode}")
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=2) as s:
                    return s.recv(512).startswith(b"220")
            except OSError:
                return False

        wait_for(greets, 30, what="proxy greeting")
        _fill_pipe(w)
        deadline = time.monotonic() + 120
        threads = [threading.Thread(target=_client, args=(port, out, deadline), daemon=True)
                   for _ in range(CLIENTS)]
        for t in threads:
            t.start()
        try:
            wait_for(lambda: len(out.answered_250()) >= ANSWERED_BEFORE_STOP, 60,
                     what=f"{ANSWERED_BEFORE_STOP} messages answered 250")
        except TimeoutError as e:
            raise AssertionError(f"{e}; replies so far: {collections.Counter(out.code.values())}")
        stopped_at = time.monotonic()
        os.kill(proc.pid, signal.SIGTERM)
        proc.wait(GRACE + EXIT_SLACK + 20)
        took = time.monotonic() - stopped_at
        for t in threads:
            t.join(60)
        assert not any(t.is_alive() for t in threads), "a client never finished"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
        os.close(r)
        os.close(w)

    codes = collections.Counter(out.code.values())
    accepted = out.answered_250()
    postfix.wait_messages("example.com", len(accepted), timeout=60)
    time.sleep(3)  # a quiet period: anything delivered late shows up too
    delivered = _delivered_tokens(postfix)
    in_flight = {t: out.code[t] for t, (sent, heard) in out.data_times.items()
                 if sent < stopped_at < heard}
    print(f"\nstop under load: replies {dict(codes)}, DATA sent {len(out.data_sent)}, "
          f"in flight at SIGTERM {len(in_flight)} -> {dict(collections.Counter(in_flight.values()))}, "
          f"refused connections {out.stop_refused}, delivered {len(delivered)}, "
          f"exit after {took:.2f} s, status {proc.returncode}")

    assert took < GRACE + EXIT_SLACK, took
    assert proc.returncode == -signal.SIGTERM
    # Nothing at the backend without its client's 250: no duplicate on retry.
    assert set(delivered) <= accepted, set(delivered) - accepted
    assert len(delivered) == len(set(delivered))
    # Nothing accepted lost.
    assert accepted <= set(delivered), accepted - set(delivered)
    # Each message whose content was sent heard 250 or a 4xx, never silence.
    for token in out.data_sent:
        code = out.code[token]
        assert code is not None and (code == 250 or 400 <= code < 500), (token, code)
    # No transaction was refused for good.
    assert not [c for c in codes if c is not None and c >= 500], codes
