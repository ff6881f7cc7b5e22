"""``[archive]``, ``[archive_node]``, ``[store]`` and ``[release]``: the
quarantine and archive half of the product (issue 12; docs/design.md, "Data
that outlives a process").

A leaf of ``config/``: ``schema.py`` puts these into ``ProxyConfig``; the
edge's hold action and forwarder read ``[archive]``, the archive node
``[archive_node]``, the store (``mppproxy/store/``) ``[store]``, and
``mppproxy quarantine release`` ``[release]``.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Optional

from mppproxy.config.fields import (at_least as _at_least, choice as _choice,
                                    endpoints as _endpoints, networks as _networks, opt as _opt)

# Five days: what RFC 5321 4.5.4.1 suggests as the least time an MTA keeps
# retrying a message before it gives up ("at least 4-5 days").
DEFAULT_MAX_AGE = 5 * 86400.0
# The key file an edge without archive.key_file makes under data_dir.
LOCAL_KEY_FILE = "archive.keys"


def host_port(value: str) -> Optional[str]:
    """``HOST:PORT`` (``[v6]:PORT`` for an IPv6 literal); empty is allowed
    where the key says what empty means."""
    if not value:
        return None
    host, port = split_host_port(value, 25)
    if not host or port is None:
        return f"{value!r} is not HOST:PORT (such as 'archive.example.com:10025')"
    return None


def split_host_port(value: str, default_port: int) -> tuple[str, Optional[int]]:
    """(host, port) of ``HOST[:PORT]``; port None when it is not a TCP port."""
    value = value.strip()
    if value.startswith("["):
        host, _, rest = value[1:].partition("]")
        port_text = rest[1:] if rest.startswith(":") else ""
        if rest and not rest.startswith(":"):
            return "", None
    elif value.count(":") == 1:
        host, _, port_text = value.partition(":")
    else:
        host, port_text = value, ""
    if not port_text:
        return host, default_port
    if not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
        return host, None
    return host, int(port_text)


def _routes(values: dict[str, str]) -> Optional[str]:
    for domain, target in values.items():
        problem = host_port(target)
        if problem or not target:
            return f"{domain}: {problem or 'empty route'}"
    return None


def _retention(values: dict[str, int]) -> Optional[str]:
    for domain, days in values.items():
        if days < 0:
            return f"{domain}: must be 0 (keep forever) or more days, not {days!r}"
    return None


@dataclass(frozen=True)
class ArchiveConfig:
    """``[archive]``: what the edge keeps and where it sends it.

    Held (quarantined) messages always go through the durable queue; with
    ``node`` set the forwarder sends them to the archive node over ESMTP,
    without it the node's own writer stores them in the embedded store
    (``[store]``), which is all-in-one mode's working quarantine."""

    # The archive node, HOST:PORT; empty: store locally (no network hop).
    node: str = field(default="", metadata=_opt(host_port))
    # This node's name in X-MPP-Node (and the store's "node" column);
    # empty: smtp.hostname (or the host's FQDN).
    node_name: str = ""
    # The shared HMAC keys (mppproxy/archive/keys.py); required with node.
    key_file: str = ""
    # "quarantine": held mail only; "all": every accepted message too;
    # "domains": held mail, and every message to one of `domains`.
    copy: str = field(default="quarantine",
                      metadata=_opt(_choice("quarantine", "all", "domains")))
    domains: tuple[str, ...] = ()
    # Empty: data_dir/archive-queue.
    queue_dir: str = ""
    # STARTTLS to the node, as backend.tls; a client certificate when the
    # node asks for one (archive_node.require_client_cert).
    tls: str = field(default="none", metadata=_opt(_choice("none", "opportunistic", "required")))
    tls_verify: bool = False
    tls_ca_file: str = ""
    tls_cert_file: str = ""
    tls_key_file: str = ""
    # Connections the forwarder keeps to the node, each sending one copy at a time.
    connections: int = field(default=2, metadata=_opt(_at_least(1)))
    # A refused or failed copy is tried again after retry_base seconds,
    # doubling up to retry_max; past max_age it goes to the queue's bad/.
    retry_base: float = field(default=60.0, metadata=_opt(_at_least(0.1)))
    retry_max: float = field(default=3600.0, metadata=_opt(_at_least(0.1)))
    max_age: float = field(default=DEFAULT_MAX_AGE, metadata=_opt(_at_least(60)))
    # Seconds between the log lines with the queue's depth and oldest age.
    stats_interval: float = field(default=60.0, metadata=_opt(_at_least(1)))
    # Seconds to connect to the node and to wait for each of its replies.
    connect_timeout: float = field(default=30.0, metadata=_opt(_at_least(0.1)))
    reply_timeout: float = field(default=300.0, metadata=_opt(_at_least(0.1)))


@dataclass(frozen=True)
class ArchiveNodeConfig:
    """``[archive_node]``: the receiver of ``--mode archive``."""

    listen: tuple[str, ...] = field(default=("tcp:10025:interface=127.0.0.1",),
                                    metadata=_opt(_endpoints))
    # Edges allowed to send copies; any other client hears 554 at connect.
    edges: tuple[str, ...] = field(default=("127.0.0.0/8", "::1/128"), metadata=_opt(_networks))
    # The keys that verify the copies' state (the edges' archive.key_file).
    key_file: str = ""
    # Ask edges for a TLS client certificate signed by client_ca_file and
    # refuse MAIL from a client that did not present one.
    require_client_cert: bool = False
    client_ca_file: str = ""
    # Empty: data_dir/archive-node-queue.
    queue_dir: str = ""
    # Copies the writer stores in one database transaction: fewer commits
    # (each an fsync on the database server) for a queue that has grown;
    # benchmarks/archive_bench.py measured 0.29 -> 0.35 of a raw bulk
    # INSERT's rate on MariaDB going from 100 to 500.
    writer_batch: int = field(default=500, metadata=_opt(_at_least(1)))
    # Seconds the writer waits before trying a database that failed again.
    writer_retry: float = field(default=5.0, metadata=_opt(_at_least(0.1)))


@dataclass(frozen=True)
class StoreConfig:
    """``[store]``: the quarantine and archive store (mppproxy/store/)."""

    # SQLAlchemy URL; empty: SQLite at data_dir/archive.sqlite.  MariaDB:
    # "mysql+pymysql://user:password@host/dbname", or a list of such URLs
    # (a Galera cluster's nodes, tried in order: config/database.py's
    # ServerUrls, db/engine.py's failover).
    url: str | tuple[str, ...] = ""
    # "database": the raw message compressed in a table; "files": one
    # compressed file per message under raw_dir, named by the row.
    raw: str = field(default="database", metadata=_opt(_choice("database", "files")))
    # Empty: data_dir/archive-raw.
    raw_dir: str = ""
    # Bring the schema to the newest version at start (``mppproxy db
    # upgrade`` does it by hand); off where several nodes share a database
    # and one administrator upgrades it.
    auto_upgrade: bool = True
    # Days a stored copy is kept; 0 keeps it for ever.  Per recipient
    # domain in retention_domains.  Items on legal hold are never purged.
    retention_days: int = field(default=30, metadata=_opt(_at_least(0)))
    retention_domains: dict[str, int] = field(default_factory=dict,
                                              metadata=_opt(_retention))
    # Seconds between purges, and rows deleted per database transaction.
    purge_interval: float = field(default=3600.0, metadata=_opt(_at_least(10)))
    purge_batch: int = field(default=1000, metadata=_opt(_at_least(1)))


@dataclass(frozen=True)
class ReleaseConfig:
    """``[release]``: where released messages are re-injected."""

    # Recipient domain -> HOST:PORT of the MTA that takes its mail.
    routes: dict[str, str] = field(default_factory=dict, metadata=_opt(_routes))
    # For the other domains; empty: [backend] (or the edge in all-in-one mode).
    default_route: str = field(default="", metadata=_opt(host_port))
    # Scan again with the current engines before re-injecting (a policy's
    # scanning); a message that is now refused is not released.  Per policy
    # in rescan_policies (policy name -> true/false).
    rescan: bool = True
    rescan_policies: dict[str, bool] = field(default_factory=dict)


def key_file_path(mode: str, archive: ArchiveConfig, node: ArchiveNodeConfig,
                  data_dir: str) -> str:
    """The archive key file a node uses: the archive node's
    archive_node.key_file; an edge's archive.key_file, or, where none is
    set (no archive node: the copies stay on this host), a key file of its
    own under data_dir, made at first start, which signs and checks the
    X-MPP-Released mark of mppproxy quarantine release."""
    if mode == "archive":
        return node.key_file
    return archive.key_file or os.path.join(data_dir, LOCAL_KEY_FILE)
