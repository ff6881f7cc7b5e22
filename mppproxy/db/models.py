"""The tables of the shared state: the auto-blacklist, the greylist, the
per-domain allow and block lists, and the dashboard's hourly traffic counts and
per-node engine health (``traffic.py``, ``nodehealth.py``).

Plain SQLAlchemy Core tables, created when missing (``create_missing``;
no migrations yet: small tables whose rows expire or that administrators
edit one row at a time).  Times are Unix seconds (``reactor.seconds()``
of the node that wrote them), so nodes sharing one database need
synchronised clocks (NTP).

Every blacklist and greylist row carries ``expires``: the purge deletes
what is past it without knowing any policy's settings.  Allow-list rows
(``allowlist.py``) have no end: an administrator adds and removes them.
Long keys (a triplet of two addresses and a
network) are hashed for the primary key (MySQL's index limit is 3072 bytes,
and utf8mb4 costs four per character); the readable columns stay for
administrators and are cut to their column width.
"""
from __future__ import annotations

import hashlib
from typing import Iterable

from sqlalchemy import (BigInteger, Boolean, Column, Double, Index, MetaData, String, Table)
from sqlalchemy.engine import Engine
from sqlalchemy.exc import OperationalError, ProgrammingError

from mppproxy.db.engine import WRITE

# "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff/128" is 43 characters.
NETWORK_LENGTH = 49
# RFC 5321 4.5.3.1.3: a path is at most 256 octets; room for a little more.
ADDRESS_LENGTH = 320
REASON_LENGTH = 255
# RFC 1035 2.3.4: a name is at most 255 octets (253 characters as text).
DOMAIN_LENGTH = 255
# Who added an allow-list entry (an administrator's login or address) and why.
ADDED_BY_LENGTH = 255
NOTE_LENGTH = 255
# A domain list entry's kind: "allow" or "block".
KIND_LENGTH = 8
# A node's name (archive.node_name or its hostname: RFC 1035's 255).
NODE_LENGTH = 255
# The traffic table's disposition word and reason key ("greylisting",
# "relay control", "clamd"): short keys, cut to this.
DISPOSITION_LENGTH = 16
REASON_KEY_LENGTH = 64
# An engine's or DNS list's name and what it said about itself.
HEALTH_NAME_LENGTH = 64
HEALTH_TEXT_LENGTH = 255


def triplet_key(client_net: str, sender: str, recipient: str) -> str:
    """The primary key of a greylist triplet: SHA-256 of its three parts."""
    raw = "\0".join((client_net, sender, recipient)).encode("utf-8", "surrogatepass")
    return hashlib.sha256(raw).hexdigest()


def clip(text: str, length: int) -> str:
    return text if len(text) <= length else text[:length]


class StateTables:
    """The tables, their names starting with ``prefix`` (so one
    database can hold several independent sets: tests, or two clusters)."""

    def __init__(self, prefix: str = "mpp_"):
        self.prefix = prefix
        self.metadata = MetaData()
        # One auto-blacklisted client network (spam traps, thresholds).
        self.blacklist = Table(
            f"{prefix}blacklist", self.metadata,
            Column("network", String(NETWORK_LENGTH), primary_key=True),  # CIDR
            Column("reason", String(REASON_LENGTH), nullable=False, default=""),
            Column("created", Double, nullable=False),
            Column("expires", Double, nullable=False),
            Index(f"{prefix}blacklist_expires", "expires"),
        )
        # One greylist triplet (RFC 6647 section 2.2).
        self.greylist = Table(
            f"{prefix}greylist", self.metadata,
            Column("id", String(64), primary_key=True),  # triplet_key()
            Column("client_net", String(NETWORK_LENGTH), nullable=False),
            Column("sender", String(ADDRESS_LENGTH), nullable=False),
            Column("recipient", String(ADDRESS_LENGTH), nullable=False),
            # First attempt of the current round (a late retry starts a new one).
            Column("first_seen", Double, nullable=False),
            # Last attempt that reached the database (not every cached hit).
            Column("last_seen", Double, nullable=False),
            Column("passed", Boolean, nullable=False, default=False),
            # first_seen + retry_window while waiting; last_seen + lifetime once passed.
            Column("expires", Double, nullable=False),
            Index(f"{prefix}greylist_client_net", "client_net"),
            Index(f"{prefix}greylist_expires", "expires"),
        )
        # Client networks that passed enough triplets to skip greylisting.
        self.greylist_whitelist = Table(
            f"{prefix}greylist_whitelist", self.metadata,
            Column("client_net", String(NETWORK_LENGTH), primary_key=True),
            Column("created", Double, nullable=False),
            Column("last_seen", Double, nullable=False),
            Column("expires", Double, nullable=False),  # last_seen + lifetime
            Index(f"{prefix}greylist_whitelist_expires", "expires"),
        )
        # A sender allowed for a recipient domain (allowlist.py): an address,
        # "@domain" or ".parent" (its subdomains).  The key is 575
        # characters, 2300 bytes in utf8mb4: under InnoDB's 3072.
        self.allow_senders = Table(
            f"{prefix}allow_senders", self.metadata,
            Column("domain", String(DOMAIN_LENGTH), primary_key=True),
            Column("sender", String(ADDRESS_LENGTH), primary_key=True),
            Column("added", Double, nullable=False),
            Column("added_by", String(ADDED_BY_LENGTH), nullable=False, default=""),
            Column("note", String(NOTE_LENGTH), nullable=False, default=""),
        )
        # Each recipient domain's own allow and block lists (allowlist.py):
        # kind "allow" or "block"; entry a sender ("user@example.org",
        # "@example.org", ".example.org") or a client network
        # ("192.0.2.0/24").  The key is 580 characters, 2320 bytes in
        # utf8mb4: under InnoDB's 3072.  Rows of allow_senders (the older
        # allow list, kept so an older node's writes are not lost) are moved
        # here when the tables are made (allowlist.move_legacy).
        self.domain_lists = Table(
            f"{prefix}domain_lists", self.metadata,
            Column("domain", String(DOMAIN_LENGTH), primary_key=True),
            Column("kind", String(KIND_LENGTH), primary_key=True),
            Column("entry", String(ADDRESS_LENGTH), primary_key=True),
            Column("added", Double, nullable=False),
            Column("added_by", String(ADDED_BY_LENGTH), nullable=False, default=""),
            Column("note", String(NOTE_LENGTH), nullable=False, default=""),
        )
        # Transactions per UTC hour, node, disposition and reason
        # (traffic.py): each process adds its counts with one upsert per
        # flush.  The key leads with the hour, so the dashboard's range
        # queries over a year of rows read only the hours asked for; 335
        # characters, 1340 bytes in utf8mb4.
        self.traffic = Table(
            f"{prefix}traffic", self.metadata,
            # Unix seconds of the hour's start (a multiple of 3600: UTC).
            Column("hour", BigInteger, primary_key=True, autoincrement=False),
            Column("node", String(NODE_LENGTH), primary_key=True),
            Column("disposition", String(DISPOSITION_LENGTH), primary_key=True),
            Column("reason", String(REASON_KEY_LENGTH), primary_key=True),
            Column("n", BigInteger, nullable=False, default=0),
        )
        # Each node's last report of its scan engines and DNS lists
        # (nodehealth.py), so a console in another process can show them.
        self.node_health = Table(
            f"{prefix}node_health", self.metadata,
            Column("node", String(NODE_LENGTH), primary_key=True),
            Column("kind", String(16), primary_key=True),  # "engine" or "dns_list"
            Column("name", String(HEALTH_NAME_LENGTH), primary_key=True),
            Column("up", Boolean, nullable=False),
            Column("version", String(HEALTH_TEXT_LENGTH), nullable=False, default=""),
            # Unix time of the engine's signatures, when it tells.
            Column("signatures_time", Double, nullable=True),
            Column("detail", String(HEALTH_TEXT_LENGTH), nullable=False, default=""),
            # When the node wrote this row (its clock).
            Column("reported", Double, nullable=False),
            Index(f"{prefix}node_health_reported", "reported"),
        )


def create_missing(engine: Engine, tables: Iterable[Table]) -> None:
    """Create each of ``tables`` that does not exist yet (blocking).

    SQLite: one IMMEDIATE transaction per table, so two processes creating
    them at once take turns.  MySQL commits each CREATE on its own: a
    table another node created between our look and our CREATE ("already
    exists") is taken as it is."""
    with engine.connect().execution_options(**WRITE) as conn:
        for table in tables:
            try:
                with conn.begin():
                    table.create(conn, checkfirst=True)
            except (OperationalError, ProgrammingError) as e:
                if "already exists" not in str(e.orig):
                    raise
