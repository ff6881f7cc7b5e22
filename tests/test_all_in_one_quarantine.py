"""All-in-one mode keeps the whole quarantine on one host (issue 12): one
``twistd -n mppproxy`` process with local Maildir delivery holds a message
(the queue, then its own writer into the embedded SQLite store), ``mppproxy
quarantine list`` finds it, ``release`` re-injects it through the proxy's
own listener, where its X-MPP-Released mark keeps it from being held again,
so it lands in the Maildir once; a second release finds nothing held; and
``--allow-sender`` puts the sender on the domain's allow list.
"""
from __future__ import annotations

import json
import os
import smtplib
import subprocess
import sys
from pathlib import Path
from typing import Any, Optional

from helpers import free_port, stop_process, wait_for

ROOT = Path(__file__).resolve().parents[1]
TWISTD = [sys.executable, "-c", "from twisted.scripts.twistd import run; run()", "-n", "--pidfile="]


def _config(tmp_path: Path, port: int) -> Path:
    cfg = tmp_path / "mppproxy.toml"
    cfg.write_text(f"""
data_dir = "{tmp_path / 'data'}"
listen = ["tcp:{port}:interface=127.0.0.1"]
relay_domains = ["example.com"]
trusted_networks = ["10.255.255.0/24"]
[smtp]
hostname = "aio.test"
[timeouts]
shutdown_grace = 5
[policies.default.scoring]
tag = 5
quarantine = 6
reject = 15
[policies.default.scan]
enabled = true
[[policies.default.scan.headers.rules]]
pattern = "(?i)cheap meds"
header = "Subject"
action = "score:6"
name = "CHEAP_MEDS"
""")
    return cfg


def _quarantine(cfg: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "mppproxy", "quarantine", *args,
                           "--config", str(cfg)], capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, PYTHONPATH=str(ROOT)))


def _maildir(tmp_path: Path) -> list[bytes]:
    new = tmp_path / "data" / "maildir" / "example.com" / "user" / "new"
    return [p.read_bytes() for p in sorted(new.iterdir())] if new.is_dir() else []


def test_all_in_one_holds_lists_and_releases_once(tmp_path: Path) -> None:
    """Held, listed, released through the proxy's own listener into its Maildir once; a second release is refused as not held; the sender is allowed afterwards."""
    port = free_port()
    cfg = _config(tmp_path, port)
    log = open(tmp_path / "twistd.log", "wb")
    proc = subprocess.Popen([*TWISTD, "mppproxy", "--config", str(cfg)], stdout=log,
                            stderr=subprocess.STDOUT, cwd=tmp_path,
                            env=dict(os.environ, PYTHONPATH=str(ROOT)), start_new_session=True)
    try:
        def connected() -> Optional[smtplib.SMTP]:
            try:
                return smtplib.SMTP("127.0.0.1", port, local_hostname="client.test", timeout=10)
            except OSError:
                return None

        smtp = wait_for(lambda: proc.poll() is not None or connected(), 30, what="the proxy")
        assert proc.poll() is None, (tmp_path / "twistd.log").read_text()
        assert isinstance(smtp, smtplib.SMTP)
        with smtp:
            smtp.ehlo("client.test")
            smtp.mail("s@client.test")
            smtp.rcpt("user@example.com")
            code, text = smtp.data(b"From: <s@client.test>\r\nSubject: Cheap meds today\r\n\r\n"
                                   b"body\r\n")
            assert code == 250, text
        ref = text.split()[-1].decode()

        def listed() -> list[Any]:
            r = _quarantine(cfg, "list", "--json", "--ref", ref)
            return list(json.loads(r.stdout)) if r.returncode == 0 else []

        [row] = wait_for(listed, 30, what="the held message in the store")
        assert (row["status"], row["verdict"], row["rcpt_domain"]) == ("held", "quarantine",
                                                                      "example.com")
        assert _maildir(tmp_path) == []
        first = _quarantine(cfg, "release", "--ref", ref, "--allow-sender", "--json")
        assert first.returncode == 0, first.stdout + first.stderr
        assert json.loads(first.stdout)["results"][0]["outcome"] == "released"
        delivered = wait_for(lambda: _maildir(tmp_path), 30, what="the released message")
        assert len(delivered) == 1 and b"Cheap meds" in delivered[0]
        assert b"X-MPP-" not in delivered[0]  # the edge removed the mark
        second = _quarantine(cfg, "release", "--ref", ref, "--status", "all", "--json")
        assert second.returncode == 1, second.stdout + second.stderr
        assert json.loads(second.stdout)["results"][0]["outcome"] == "busy"
        [row] = listed()
        assert row["status"] == "released"
    finally:
        stop_process(proc)
        log.close()
    text = (tmp_path / "twistd.log").read_text()
    assert "Traceback" not in text, text
    assert f"released from the quarantine (reference {ref})" in text, text
    # The sender is on example.com's allow list in the state database.
    from mppproxy.config.database import DatabaseConfig
    from mppproxy.db.allowlist import open_allow_list
    with open_allow_list(DatabaseConfig(), str(tmp_path / "data")) as allow:
        assert [(e.domain, e.sender) for e in allow.list("example.com")] == [
            ("example.com", "s@client.test")]
    assert len(_maildir(tmp_path)) == 1
