"""Two ``twistd mppproxy`` processes sharing one real MariaDB (issue #4): a
client blacklisted by a spam trap at one node is refused by the other, and a
greylisted triplet that one node saw passes at the other after the delay.

MariaDB is the one ``scripts/services/start-mariadb.sh`` starts (``.ci/run``
does); ``MPP_MARIADB_URL`` points elsewhere.  Missing: skipped, or failed
with ``MPP_REQUIRE_SERVICES=1``.
"""
from __future__ import annotations

import os
import smtplib
import time
import uuid
from pathlib import Path

import pytest

from .conftest import service_unavailable
from helpers import free_port

MARIADB_URL = os.environ.get("MPP_MARIADB_URL", "mysql+pymysql://test:test@127.0.0.1:3306/test")


@pytest.fixture
def mariadb_url() -> str:
    from sqlalchemy import create_engine, text
    from sqlalchemy.exc import SQLAlchemyError

    engine = create_engine(MARIADB_URL, connect_args={"connect_timeout": 3})
    try:
        with engine.connect() as conn:
            conn.execute(text("SELECT 1"))
    except SQLAlchemyError as e:
        service_unavailable(f"MariaDB at {MARIADB_URL} unreachable: {e}")
    finally:
        engine.dispose()
    return MARIADB_URL


def node_config(tmp: Path, name: str, url: str, port: int) -> Path:
    path = tmp / f"{name}.toml"
    path.write_text(f"""
listen = ["tcp:{port}:interface=127.0.0.1"]
data_dir = "{tmp / name}"
relay_domains = ["example.com", "limited.example.com"]
trusted_networks = ["10.255.255.0/24"]

[smtp]
hostname = "{name}.test"

[database]
url = "{url}"
cache_seconds = 0

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
""")
    return path


def rcpt_code(port: int, source: str, rcpt: str, sender: str) -> int:
    with smtplib.SMTP("127.0.0.1", port, timeout=15, source_address=(source, 0)) as s:
        s.ehlo("client.test")
        s.mail(sender)
        code, _ = s.rcpt(rcpt)
        return code


def test_two_nodes_share_blacklist_greylist_and_thresholds(mariadb_url, proxy_process, tmp_path):
    """Two proxy nodes on one MariaDB share state: a client trapped at one is refused at the
    other, a triplet greylisted at one passes at the other after the delay, and messages counted
    at one blacklist the client at the other."""
    ports = [free_port(), free_port()]
    nodes = [proxy_process(["--config", str(node_config(tmp_path, f"node{i}", mariadb_url, p))], p,
                           name=f"node{i}") for i, p in enumerate(ports)]
    try:
        # A fresh client address per run: the database outlives the test.
        octet = 100 + uuid.uuid4().int % 100
        trapper = f"127.0.{octet}.7"
        assert rcpt_code(ports[0], trapper, "trap@example.com", "x@client.test") == 550
        assert rcpt_code(ports[1], trapper, "good@example.com", "x@client.test") == 554

        sender = f"s-{uuid.uuid4().hex[:8]}@client.test"
        client = f"127.0.{octet}.9"
        # same /24 as the trapper, but greylisting is per triplet; the trapper
        # is listed as /32 only
        assert rcpt_code(ports[0], client, "good@example.com", sender) == 451
        time.sleep(1.3)
        assert rcpt_code(ports[1], client, "good@example.com", sender) == 250

        # Thresholds: counted at node 0, the blacklist entry refuses at node 1.
        busy = f"127.0.{octet}.11"
        codes = [rcpt_code(ports[0], busy, "a@limited.example.com", sender) for _ in range(3)]
        assert codes == [250, 250, 554]
        assert rcpt_code(ports[1], busy, "a@limited.example.com", sender) == 554
    finally:
        for node in nodes:
            node.stop()
