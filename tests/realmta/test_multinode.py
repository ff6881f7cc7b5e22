"""The worked multi-node deployment of docs/deployment.md ("Several edges, one
archive node, MariaDB"), the part that runs on one machine (issue 16): two
edges on loopback (their own ports and data_dirs) whose configuration is the
shared file plus a per-node file, joined by ``--config-command "cat NODE
COMMON"`` as the document does, on one MariaDB (``start-mariadb.sh``'s):

- a triplet greylisted at edge A and passed there after the delay is passed
  at edge B at once;
- a client blacklisted at A (a spam trap) is refused at B within
  ``database.cache_seconds`` (B's blacklist mirror reloads twice per period);
- the thresholds counted at A blacklist the client, refused at B.

- each edge's metrics ([metrics] on, a port per edge): its scrape counts
  exactly the sessions the test opened to that edge.

Each run uses a scratch database (made through the server's root socket when
the test runs as root beside it), else the shared one with fresh client
addresses.  MariaDB missing: skipped, or failed with
``MPP_REQUIRE_SERVICES=1``.
"""
from __future__ import annotations

import os
import smtplib
import time
import uuid
from pathlib import Path
from typing import Iterator

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.exc import SQLAlchemyError

from helpers import free_port

from .conftest import service_unavailable

MARIADB_URL = os.environ.get("MPP_MARIADB_URL", "mysql+pymysql://test:test@127.0.0.1:3306/test")
ROOT_SOCKET = os.environ.get("MPP_MARIADB_SOCKET", "/tmp/mariadb/mysqld.sock")
CACHE_SECONDS = 2.0


def _root_engine() -> Engine:
    return create_engine("mysql+pymysql://root@localhost/",
                         connect_args={"unix_socket": ROOT_SOCKET, "connect_timeout": 3})


@pytest.fixture
def shared_database() -> Iterator[str]:
    """A URL both edges use: a scratch database when we may make one."""
    probe = create_engine(MARIADB_URL, connect_args={"connect_timeout": 3})
    try:
        with probe.connect() as conn:
            conn.execute(text("SELECT 1"))
    except SQLAlchemyError as e:
        service_unavailable(f"MariaDB at {MARIADB_URL} unreachable: {e}")
    finally:
        probe.dispose()
    name = f"mpp_multinode_{uuid.uuid4().hex[:8]}"
    user = make_url(MARIADB_URL).username
    root = _root_engine()
    try:
        with root.begin() as conn:
            conn.execute(text(f"CREATE DATABASE `{name}` CHARACTER SET utf8mb4"))
            conn.execute(text(f"GRANT ALL PRIVILEGES ON `{name}`.* TO '{user}'@'%'"))
    except (SQLAlchemyError, OSError):
        root.dispose()
        yield MARIADB_URL  # not ours to extend: the shared database, fresh addresses
        return
    try:
        yield make_url(MARIADB_URL).set(database=name).render_as_string(hide_password=False)
    finally:
        with root.begin() as conn:
            conn.execute(text(f"DROP DATABASE IF EXISTS `{name}`"))
        root.dispose()


def common_config(url: str) -> str:
    """What every edge shares (docs/deployment.md, common.toml): read after the node
    file, so its own top-level keys come before its tables."""
    return f"""
relay_domains = ["example.com", "limited.example.com"]
# loopback is the clients here: only this network is exempt from the checks
trusted_networks = ["10.255.255.0/24"]

[database]
url = "{url}"
cache_seconds = {CACHE_SECONDS}

[policies.default.spamtrap]
enabled = true
patterns = ['^trap@example\\.com$']
blacklist_seconds = 600

[policies.default.greylisting]
enabled = true
delay = 1

[policies.limited]
domains = ["limited.example.com"]

[policies.limited.greylisting]
enabled = false

[policies.limited.thresholds]
enabled = true
max_messages = 2
period = 60
blacklist_seconds = 600
"""


def node_config(tmp: Path, name: str, port: int, metrics_port: int = 0) -> str:
    """What differs per edge (docs/deployment.md, node.toml): top-level and dotted
    keys only, no table headers, so the common file's top-level keys stay top-level."""
    return f"""
listen = ["tcp:{port}:interface=127.0.0.1"]
data_dir = "{tmp / name / 'data'}"
smtp.hostname = "{name}.example.com"
archive.node_name = "{name}"
""" + (f"""metrics.enabled = true
metrics.listen = ["tcp:{metrics_port}:interface=127.0.0.1"]
""" if metrics_port else "")


# Sessions the test opened, by edge port (each edge's metrics must say the same).
SESSIONS: dict[int, int] = {}


def sessions_scraped(metrics_port: int) -> float:
    """mppproxy_sessions_total of one edge's /metrics."""
    import urllib.request
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as r:
        for line in r.read().decode().splitlines():
            if line.startswith("mppproxy_sessions_total "):
                return float(line.split()[1])
    raise AssertionError("no mppproxy_sessions_total in the scrape")


def rcpt_code(port: int, source: str, rcpt: str, sender: str) -> int:
    SESSIONS[port] = SESSIONS.get(port, 0) + 1
    with smtplib.SMTP("127.0.0.1", port, timeout=15, source_address=(source, 0)) as s:
        s.ehlo("client.test")
        s.mail(sender)
        code, _ = s.rcpt(rcpt)
        return code


def test_two_edges_one_mariadb_share_greylist_blacklist_thresholds(
        shared_database, proxy_process, tmp_path):
    """Two edges (own ports, own data_dirs, config = node file + common file) on one
    MariaDB: a triplet passed at A passes at B, a spam-trap blacklisting at A refuses at
    B within cache_seconds, and thresholds counted at A refuse the client at B; each
    edge's metrics count exactly the sessions it served."""
    common = tmp_path / "common.toml"
    common.write_text(common_config(shared_database))
    ports = {"edge1": free_port(), "edge2": free_port()}
    metrics = {"edge1": free_port(), "edge2": free_port()}
    edges = []
    for name, port in ports.items():
        node = tmp_path / f"{name}.toml"
        node.write_text(node_config(tmp_path, name, port, metrics[name]))
        edges.append(proxy_process(["--config-command", f"cat {node} {common}"], port, name=name))
    a, b = ports["edge1"], ports["edge2"]
    try:
        octet = 100 + uuid.uuid4().int % 100  # fresh addresses if the database is shared
        sender = f"s-{uuid.uuid4().hex[:8]}@client.test"
        client = f"127.0.{octet}.9"
        assert rcpt_code(a, client, "good@example.com", sender) == 451
        time.sleep(1.2)
        assert rcpt_code(a, client, "good@example.com", sender) == 250
        assert rcpt_code(b, client, "good@example.com", sender) == 250

        trapper = f"127.0.{octet}.7"
        assert rcpt_code(b, trapper, "good@example.com", "x@client.test") == 451  # B saw it clean
        assert rcpt_code(a, trapper, "trap@example.com", "x@client.test") == 550
        started = time.monotonic()
        while rcpt_code(b, trapper, "good@example.com", "x@client.test") != 554:
            assert time.monotonic() - started < CACHE_SECONDS + 1.0, "B never refused"
            time.sleep(0.2)

        busy = f"127.0.{octet}.11"
        codes = [rcpt_code(a, busy, "a@limited.example.com", sender) for _ in range(3)]
        assert codes == [250, 250, 554]
        started = time.monotonic()
        while rcpt_code(b, busy, "a@limited.example.com", sender) != 554:
            assert time.monotonic() - started < CACHE_SECONDS + 1.0, "B never refused"
            time.sleep(0.2)
        # Metrics from both edges: each counts its own sessions (the
        # proxy_process fixture's banner probe opened one more each).
        for name, port in ports.items():
            assert sessions_scraped(metrics[name]) == SESSIONS[port] + 1, name
    finally:
        for edge in edges:
            edge.stop()


def test_deployment_doc_configs_load():
    """The worked example's files in docs/deployment.md load: node.toml + common.toml
    as ``cat`` joins them (an edge), the archive node's, and the Galera server list."""
    import re
    import tomllib

    from mppproxy.config.load import from_mapping

    doc = (Path(__file__).resolve().parents[2] / "docs" / "deployment.md").read_text()
    section = doc[doc.index("## Several edges"):doc.index("## Postfix policy server")]
    node, common, archive, galera = re.findall(r"```toml\n(.*?)```", section, re.S)
    edge = from_mapping(tomllib.loads(node + common))
    assert (edge.mode, edge.archive.node_name, edge.smtp.hostname) == ("edge", "mx1",
                                                                      "mx1.example.com")
    assert edge.archive.node == "archive.example.com:10025"
    assert from_mapping(tomllib.loads(archive)).mode == "archive"
    assert len(from_mapping(tomllib.loads(galera)).database.url) == 2
