"""Issue 12 end to end: an edge (``twistd mppproxy``, real Postfix behind it)
and an archive node (``twistd mppproxy --mode archive``) as two processes on
loopback, and ``mppproxy quarantine`` run on the node's configuration.

* a virus (EICAR, the real clamd of start-clamd.sh, ``virus_action =
  "quarantine"``) is held at the edge and listed on the node with its state;
  released, it reaches Postfix once; two releases at the same moment deliver
  it once;
* the node stopped while 1,000 messages are relayed with copy-all: started
  again, it holds every copy exactly once; the same with its MariaDB
  stopped instead;
* the edge SIGKILLed in the middle of a burst: every message the edge
  acknowledged is stored on the node after its restart.

Missing Postfix, clamd or MariaDB skip these tests, or fail them with
``MPP_REQUIRE_SERVICES=1``.
"""
from __future__ import annotations

import base64
import json
import os
import signal
import smtplib
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

import pytest
from sqlalchemy import create_engine, inspect, text

from helpers import free_port, wait_for

if TYPE_CHECKING:
    from .conftest import PostfixBackend, ProxyProcess, StartProxy

REPO = Path(__file__).resolve().parents[2]
EICAR = (b"X5O!P%@AP[4\\PZX54(P^)7CC)7}$EICAR-STANDARD-ANTIVIRUS-TEST-FILE!$H+H*")
SERVICES = REPO / "scripts" / "services"


def _keys(tmp_path: Path) -> Path:
    path = tmp_path / "archive.keys"
    path.write_text("e2e = " + base64.b64encode(os.urandom(32)).decode() + "\n")
    path.chmod(0o600)
    return path


class Nodes:
    """The edge and the node of one test, their configurations and ports."""

    def __init__(self, tmp_path: Path, postfix: "PostfixBackend", proxy_process: "StartProxy",
                 store_url: str = "", copy: str = "quarantine", clamd: str = ""):
        self.tmp = tmp_path
        self.postfix = postfix
        self.start_proxy = proxy_process
        self.keys = _keys(tmp_path)
        self.node_port, self.edge_port = free_port(), free_port()
        self.store_url = store_url or f"sqlite:///{tmp_path / 'node' / 'archive.sqlite'}"
        self.node_cfg = tmp_path / "node.toml"
        self.node_cfg.write_text(f"""
mode = "archive"
data_dir = "{tmp_path / 'node'}"
[archive_node]
listen = ["tcp:{self.node_port}:interface=127.0.0.1"]
key_file = "{self.keys}"
writer_retry = 0.5
[store]
url = "{self.store_url}"
[release]
default_route = "{postfix.address}"
""")
        scan = ""
        if clamd:
            scan = f"""
[scanners.clamd]
address = "{clamd}"
[policies.default.scan]
enabled = true
virus_action = "quarantine"
[policies.default.scan.engines.clamd]
on_failure = "tempfail"
"""
        self.edge_cfg = tmp_path / "edge.toml"
        self.edge_cfg.write_text(f"""
mode = "edge"
data_dir = "{tmp_path / 'edge'}"
listen = ["tcp:{self.edge_port}:interface=127.0.0.1"]
relay_domains = ["example.com", "example.net"]
trusted_networks = ["10.255.255.0/24"]
[smtp]
hostname = "edge.test"
[backend]
host = "{postfix.host}"
port = {postfix.port}
[archive]
node = "127.0.0.1:{self.node_port}"
node_name = "edge.test"
key_file = "{self.keys}"
copy = "{copy}"
retry_base = 0.5
retry_max = 1.0
stats_interval = 5
{scan}""")
        self.edge: Optional["ProxyProcess"] = None
        self.node: Optional["ProxyProcess"] = None

    def start_node(self) -> "ProxyProcess":
        self.node = self.start_proxy(["--config", str(self.node_cfg)], self.node_port,
                                     name="node", timeout=60)
        return self.node

    def start_edge(self) -> "ProxyProcess":
        self.edge = self.start_proxy(["--config", str(self.edge_cfg)], self.edge_port,
                                     name="edge", timeout=60)
        return self.edge

    def stop(self) -> None:
        for proc in (self.edge, self.node):
            if proc is not None:
                proc.stop(timeout=30)

    def quarantine(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
        return subprocess.run([sys.executable, "-m", "mppproxy", "quarantine", *args,
                               "--config", str(self.node_cfg)],
                              capture_output=True, text=True, timeout=timeout, env=env, check=False)

    def listed(self, *filters: str) -> list[dict[str, Any]]:
        r = self.quarantine("list", "--json", "--limit", "5000", *filters)
        assert r.returncode in (0, 1), r.stderr
        return list(json.loads(r.stdout)) if r.stdout.strip() else []

    def stored_refs(self) -> list[str]:
        engine = create_engine(self.store_url)
        try:
            with engine.connect() as conn:
                return [row[0] for row in conn.execute(text("SELECT queue_id FROM archive_messages"))]
        finally:
            engine.dispose()


def _send(port: int, subject: str, body: bytes = b"hello\r\n", rcpt: str = "user@example.com"
          ) -> tuple[int, bytes]:
    with smtplib.SMTP("127.0.0.1", port, local_hostname="client.test", timeout=60) as client:
        client.ehlo("client.test")
        client.mail("sender@client.test")
        client.rcpt(rcpt)
        return client.data(b"From: sender@client.test\r\nTo: " + rcpt.encode() + b"\r\n"
                           b"Subject: " + subject.encode() + b"\r\n\r\n" + body)


def _ref(reply: bytes) -> str:
    """The queue id the edge names in its 250 (the last word in brackets or
    after 'id'/'as')."""
    words = reply.decode().replace("(", " ").replace(")", " ").replace("[", " ").replace("]", " ").split()
    return words[-1]


@pytest.fixture
def clamd_address() -> str:
    from .test_scanners_real import _engine
    gen = _engine("clamd", "start-clamd.sh", "MPP_CLAMD_ADDRESS", "tcp:127.0.0.1:3310")
    engine = next(gen)
    return engine.address


def test_virus_held_listed_released_once(postfix: "PostfixBackend", proxy_process: "StartProxy",
                                         tmp_path: Path, clamd_address: str) -> None:
    """EICAR is held at the edge, listed on the node with its state, and a
    release (two at the same moment) delivers it to Postfix once."""
    nodes = Nodes(tmp_path, postfix, proxy_process, clamd=clamd_address)
    try:
        nodes.start_node()
        nodes.start_edge()
        token = uuid.uuid4().hex
        code, reply = _send(nodes.edge_port, f"virus {token}",
                            b"see attached\r\n" + EICAR + b"\r\n")
        assert code == 250, reply
        wait_for(lambda: nodes.listed("--subject", token), 30, what="the held copy on the node")
        rows = nodes.listed("--subject", token)
        assert len(rows) == 1
        row = rows[0]
        assert row["rcpt_domain"] == "example.com" and row["sender"] == "sender@client.test"
        assert row["verdict"] == "quarantine" and row["status"] == "held"
        assert "Eicar" in row["reason"] or "EICAR" in row["reason"].upper()
        shown = nodes.quarantine("show", "--json", "--ref", row["queue_id"])
        assert shown.returncode == 0, shown.stderr
        state = json.loads(shown.stdout)
        assert "edge.test" in json.dumps(state)
        assert postfix.messages("example.com") == []
        # Two administrators release at the same moment, without re-scan
        # (the re-scan would refuse a virus: that is its own test below).
        results: list[subprocess.CompletedProcess[str]] = []

        def release() -> None:
            results.append(nodes.quarantine("release", "--ref", row["queue_id"], "--no-rescan",
                                            "--json"))

        threads = [threading.Thread(target=release) for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        assert sorted(r.returncode for r in results) == [0, 1], [r.stderr for r in results]
        delivered = postfix.wait_messages("example.com", 1, timeout=30)
        time.sleep(2)
        delivered = postfix.messages("example.com")
        assert len(delivered) == 1 and token.encode() in delivered[0]
        # The route is Postfix itself: the release mark stays (it says when
        # and from which held copy), the copy's state fields do not.
        fields = [line.split(b":")[0] for line in delivered[0].split(b"\n\n")[0].split(b"\n")
                  if line.startswith(b"X-MPP-")]
        assert fields == [b"X-MPP-Released"], fields
    finally:
        nodes.stop()


def test_release_rescan_refuses_a_virus(postfix: "PostfixBackend", proxy_process: "StartProxy",
                                        tmp_path: Path, clamd_address: str) -> None:
    """With the re-scan (the default), a held virus is not released: the
    command says why, the row stays held, nothing reaches Postfix."""
    nodes = Nodes(tmp_path, postfix, proxy_process, clamd=clamd_address)
    # The node re-scans with its own scanners: the same clamd.
    nodes.node_cfg.write_text(nodes.node_cfg.read_text() + f"""
[scanners.clamd]
address = "{clamd_address}"
[policies.default.scan]
enabled = true
[policies.default.scan.engines.clamd]
on_failure = "tempfail"
""")
    try:
        nodes.start_node()
        nodes.start_edge()
        token = uuid.uuid4().hex
        code, _ = _send(nodes.edge_port, f"virus {token}", EICAR + b"\r\n")
        assert code == 250
        wait_for(lambda: nodes.listed("--subject", token), 30, what="the held copy")
        ref = nodes.listed("--subject", token)[0]["queue_id"]
        r = nodes.quarantine("release", "--ref", ref, "--json")
        assert r.returncode != 0
        assert "refuse" in r.stdout + r.stderr
        assert nodes.listed("--ref", ref)[0]["status"] == "held"
        time.sleep(1)
        assert postfix.messages("example.com") == []
    finally:
        nodes.stop()


def _burst(port: int, count: int, prefix: str, acknowledged: list[str],
           stop_at: Optional[threading.Event] = None) -> None:
    """Send ``count`` messages in sessions of 20; the subjects of those the
    edge answered 250 go into ``acknowledged``."""
    sent = 0
    while sent < count and not (stop_at is not None and stop_at.is_set()):
        try:
            with smtplib.SMTP("127.0.0.1", port, local_hostname="client.test", timeout=60) as c:
                c.ehlo("client.test")
                for _ in range(min(20, count - sent)):
                    subject = f"{prefix}-{sent:05d}"
                    sent += 1
                    c.mail("sender@client.test")
                    c.rcpt("user@example.com")
                    code, _ = c.data(f"Subject: {subject}\r\n\r\nbody\r\n".encode())
                    if code == 250:
                        acknowledged.append(subject)
                    c.rset()
        except (OSError, smtplib.SMTPException):
            if stop_at is not None:
                return
            raise


def _stored_subjects(nodes: Nodes, prefix: str) -> list[str]:
    """The subjects stored on the node ([] while its tables do not exist yet)."""
    engine = create_engine(nodes.store_url)
    try:
        with engine.connect() as conn:
            if not inspect(conn).has_table("archive_messages"):
                return []
            return [r[0] for r in conn.execute(
                text("SELECT subject FROM archive_messages WHERE subject LIKE :p"),
                {"p": prefix + "-%"})]
    finally:
        engine.dispose()


def test_node_down_then_up_stores_every_copy_once(postfix: "PostfixBackend",
                                                  proxy_process: "StartProxy",
                                                  tmp_path: Path) -> None:
    """The node stopped while 1,000 messages pass with copy-all: mail keeps
    flowing (Postfix has them all), and once the node is back every copy is
    stored exactly once."""
    nodes = Nodes(tmp_path, postfix, proxy_process, copy="all")
    try:
        nodes.start_edge()
        prefix = uuid.uuid4().hex[:12]
        acknowledged: list[str] = []
        _burst(nodes.edge_port, 1000, prefix, acknowledged)
        assert len(acknowledged) == 1000
        nodes.start_node()
        wait_for(lambda: len(_stored_subjects(nodes, prefix)) >= 1000, 180,
                 what="1000 copies stored")
        time.sleep(2)
        stored = _stored_subjects(nodes, prefix)
        assert sorted(stored) == sorted(acknowledged)
        postfix.wait_messages("example.com", 1000, timeout=180)
    finally:
        nodes.stop()


def test_database_down_then_up_stores_every_copy_once(postfix: "PostfixBackend",
                                                      proxy_process: "StartProxy",
                                                      tmp_path: Path) -> None:
    """The node's MariaDB stopped while 1,000 messages pass with copy-all: the
    node keeps taking copies into its queue; once MariaDB is back every copy
    is stored exactly once."""
    from test_db_stores import require_mariadb
    url = require_mariadb()
    script = str(SERVICES / "start-mariadb.sh")
    # Every table of the unprefixed store (the console's too: a table left
    # by an earlier run without its Alembic version would fail the upgrade).
    from mppproxy.config.archive import StoreConfig
    from mppproxy.store.store import ArchiveStore
    ArchiveStore(StoreConfig(url=url), str(tmp_path)).drop_all()
    nodes = Nodes(tmp_path, postfix, proxy_process, store_url=url, copy="all")
    try:
        nodes.start_node()
        nodes.start_edge()
        subprocess.run(["bash", script, "stop"], check=True, capture_output=True, timeout=120)
        try:
            prefix = uuid.uuid4().hex[:12]
            acknowledged: list[str] = []
            _burst(nodes.edge_port, 1000, prefix, acknowledged)
            assert len(acknowledged) == 1000
            time.sleep(3)
        finally:
            subprocess.run(["bash", script], check=True, capture_output=True, timeout=300)
        wait_for(lambda: len(_stored_subjects(nodes, prefix)) >= 1000, 180,
                 what="1000 copies stored after MariaDB came back")
        time.sleep(2)
        assert sorted(_stored_subjects(nodes, prefix)) == sorted(acknowledged)
        assert nodes.node is not None and "store" in nodes.node.log_text().lower()
    finally:
        nodes.stop()


def test_edge_killed_mid_burst_loses_no_acknowledged_copy(postfix: "PostfixBackend",
                                                          proxy_process: "StartProxy",
                                                          tmp_path: Path) -> None:
    """SIGKILL the edge while a burst runs with copy-all; after its restart
    every message it acknowledged is stored on the node (a copy of a
    message it did not acknowledge may be there too: the client sends it
    again, under a new queue id)."""
    nodes = Nodes(tmp_path, postfix, proxy_process, copy="all")
    try:
        nodes.start_node()
        edge = nodes.start_edge()
        prefix = uuid.uuid4().hex[:12]
        acknowledged: list[str] = []
        stop_at = threading.Event()
        sender = threading.Thread(target=_burst, args=(nodes.edge_port, 400, prefix,
                                                       acknowledged, stop_at))
        sender.start()
        wait_for(lambda: len(acknowledged) >= 60, 60, what="60 messages acknowledged")
        os.kill(edge.pid, signal.SIGKILL)
        stop_at.set()
        sender.join(timeout=60)
        edge.wait(timeout=10)
        nodes.start_edge()
        wait_for(lambda: set(acknowledged) <= set(_stored_subjects(nodes, prefix)), 120,
                 what="every acknowledged copy stored")
        stored = _stored_subjects(nodes, prefix)
        assert len(stored) == len(set(stored)), "a copy stored twice"
    finally:
        nodes.stop()
