"""The archive store's tables (SQLAlchemy Core), for the queries of
``store.py``.  Floor 1 (a leaf): the archive node's writer and the
quarantine CLI reach them only through ``ArchiveStore``.

The Alembic revisions under ``migrations/versions/`` create these tables
and are the authority for what a database holds; this module must describe
the same schema (tests/test_store.py compares a migrated database with it
on SQLite and MariaDB).  A change here goes with a new revision.

One row per (message, recipient domain) with every field the list shows,
so the administrators' hot queries need no join (issue 12): "newest 50 for
a domain", "date range + sender/recipient/subject/verdict" and "by
reference id" each have an index named after it.
"""
from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import (BigInteger, Boolean, Column, DateTime, Float, Index, Integer,
                        LargeBinary, MetaData, String, Table, Text, UniqueConstraint)
from sqlalchemy.dialects import mysql
from sqlalchemy.types import TypeEngine

# Lengths (characters) the writer cuts values to before they are stored.
NODE_LENGTH = 255
QUEUE_ID_LENGTH = 64
DOMAIN_LENGTH = 255
# RFC 5321 4.5.3.1.3 limits a path to 256 octets; 512 leaves room for
# SMTPUTF8 addresses and a proxy configured past the RFC's limit.
SENDER_LENGTH = 512
SUBJECT_LENGTH = 512
VERDICT_LENGTH = 16
REASON_LENGTH = 1000
# An IPv6 address with an embedded IPv4 one (RFC 4291 2.2) is 45 characters.
CLIENT_IP_LENGTH = 45
HELO_LENGTH = 255
STATUS_LENGTH = 16
RAW_KEY_LENGTH = 128
ACTOR_LENGTH = 255
ACTION_LENGTH = 32
# A web console account's name (store/accounts.py checks its characters).
ADMIN_NAME_LENGTH = 64
# An API token's label (store/tokens.py).
TOKEN_LABEL_LENGTH = 64

# What a row's status may be; "deleted" rows stay (hidden) until purged,
# so the audit trail keeps pointing at something.
HELD, RELEASING, RELEASED, DELETED = "held", "releasing", "released", "deleted"
STATUSES = (HELD, RELEASING, RELEASED, DELETED)

# MariaDB: utf8mb4 throughout; a case-insensitive collation, like SQLite's
# NOCASE on the sender below, so a search finds "Bob@Example.com" either way.
MYSQL_TABLE: dict[str, Any] = {"mysql_engine": "InnoDB", "mysql_charset": "utf8mb4",
               "mysql_collate": "utf8mb4_unicode_ci"}


def _id() -> TypeEngine[int]:
    # SQLite: INTEGER PRIMARY KEY is the rowid (BIGINT would not be).
    return BigInteger().with_variant(Integer(), "sqlite")


def _time() -> TypeEngine[datetime]:
    # UTC, naive, with microseconds: MariaDB's DATETIME keeps none without fsp.
    return DateTime().with_variant(mysql.DATETIME(fsp=6), "mysql", "mariadb")


def _long_text() -> TypeEngine[str]:
    # MariaDB's TEXT stops at 64 KiB; a state with many recipients and
    # check results can pass that.
    return Text().with_variant(mysql.MEDIUMTEXT(), "mysql", "mariadb")


def _sender() -> TypeEngine[str]:
    return String(SENDER_LENGTH).with_variant(String(SENDER_LENGTH, collation="NOCASE"),
                                              "sqlite")


class ArchiveTables:
    """The store's tables, their names prefixed by ``prefix`` (tests share
    one MariaDB database; a site may put the store beside other tables)."""

    def __init__(self, prefix: str = "") -> None:
        self.prefix = prefix
        self.metadata = MetaData()
        m = f"{prefix}archive_messages"
        self.messages = Table(
            m, self.metadata,
            Column("id", _id(), primary_key=True, autoincrement=True),
            Column("node", String(NODE_LENGTH), nullable=False),
            Column("queue_id", String(QUEUE_ID_LENGTH), nullable=False),
            Column("rcpt_domain", String(DOMAIN_LENGTH), nullable=False),
            Column("received", _time(), nullable=False),
            Column("sender", _sender(), nullable=False),
            Column("recipients", _long_text(), nullable=False),
            Column("subject", String(SUBJECT_LENGTH), nullable=False),
            Column("verdict", String(VERDICT_LENGTH), nullable=False),
            Column("disposition", String(VERDICT_LENGTH), nullable=False),
            Column("score", Float(), nullable=False),
            Column("reason", String(REASON_LENGTH), nullable=False),
            Column("client_ip", String(CLIENT_IP_LENGTH), nullable=False),
            Column("helo", String(HELO_LENGTH), nullable=True),
            Column("size", Integer(), nullable=False),
            Column("status", String(STATUS_LENGTH), nullable=False),
            Column("legal_hold", Boolean(create_constraint=False), nullable=False),
            Column("released_at", _time(), nullable=True),
            Column("state", _long_text(), nullable=False),
            Column("raw_key", String(RAW_KEY_LENGTH), nullable=False),
            # Idempotent writes: a copy stored again is skipped.  queue_id
            # first, so this key also serves "by reference id" (the id every
            # refusal and log line names) without an index of its own.
            UniqueConstraint("queue_id", "node", "rcpt_domain", name=f"{m}_by_ref"),
            # "Newest 50 for a domain" (ORDER BY received DESC, id DESC: the
            # id is in every index, InnoDB's primary key and SQLite's rowid).
            Index(f"{m}_domain_newest", "rcpt_domain", "received"),
            # Date range (and the purge of whatever is older than retention).
            Index(f"{m}_received", "received"),
            # Date range + sender, over all domains and within the admin's.
            Index(f"{m}_sender", "sender", "received"),
            # MariaDB: (255 + 255) utf8mb4 characters of 4 bytes and the
            # DATETIME keep the key under InnoDB's 3072 bytes; the whole
            # sender would pass it.
            Index(f"{m}_domain_sender", "rcpt_domain", "sender", "received",
                  mysql_length={"sender": 255}),
            sqlite_autoincrement=True,  # ids never reused: audit rows name them
            **MYSQL_TABLE)
        self.raw = Table(
            f"{prefix}archive_raw", self.metadata,
            Column("raw_key", String(RAW_KEY_LENGTH), primary_key=True),
            # zlib-compressed message; NULL when it lives in a file (raw = "files").
            Column("data", LargeBinary().with_variant(mysql.LONGBLOB(), "mysql", "mariadb"),
                   nullable=True),
            # The message's size before compression.
            Column("size", Integer(), nullable=False),
            **MYSQL_TABLE)
        a = f"{prefix}archive_audit"
        self.audit = Table(
            a, self.metadata,
            Column("id", _id(), primary_key=True, autoincrement=True),
            Column("at", _time(), nullable=False),
            Column("actor", String(ACTOR_LENGTH), nullable=False),
            Column("origin", String(ACTOR_LENGTH), nullable=False),
            Column("action", String(ACTION_LENGTH), nullable=False),
            Column("row_id", BigInteger(), nullable=True),
            Column("node", String(NODE_LENGTH), nullable=True),
            Column("queue_id", String(QUEUE_ID_LENGTH), nullable=True),
            Column("rcpt_domain", String(DOMAIN_LENGTH), nullable=True),
            Column("detail", _long_text(), nullable=False),
            Index(f"{a}_newest", "at"),
            Index(f"{a}_by_ref", "queue_id"),
            sqlite_autoincrement=True,
            **MYSQL_TABLE)

        w = f"{prefix}web_admins"
        # The web console's accounts (revision 0002; store/accounts.py).
        self.web_admins = Table(
            w, self.metadata,
            Column("id", _id(), primary_key=True, autoincrement=True),
            Column("name", String(ADMIN_NAME_LENGTH), nullable=False),
            Column("password_hash", String(255), nullable=False),
            Column("superadmin", Boolean(create_constraint=False), nullable=False),
            # A JSON array of lower-case domains: the administrator's scope.
            Column("domains", Text(), nullable=False),
            Column("created", _time(), nullable=False),
            Column("last_login", _time(), nullable=True),
            Column("disabled", Boolean(create_constraint=False), nullable=False),
            # Set by someone else (one-time password): change it at login.
            Column("must_change", Boolean(create_constraint=False), nullable=False),
            UniqueConstraint("name", name=f"{w}_by_name"),
            sqlite_autoincrement=True,
            **MYSQL_TABLE)
        k = f"{prefix}web_tokens"
        # The console's API tokens (revision 0003; store/tokens.py): only
        # each token's SHA-256 is kept.
        self.web_tokens = Table(
            k, self.metadata,
            Column("id", _id(), primary_key=True, autoincrement=True),
            Column("admin_id", BigInteger(), nullable=False),
            Column("label", String(TOKEN_LABEL_LENGTH), nullable=False),
            # The token's first characters, to tell tokens apart in a list.
            Column("prefix", String(16), nullable=False),
            Column("token_hash", String(64), nullable=False),
            Column("created", _time(), nullable=False),
            Column("expires", _time(), nullable=True),
            Column("last_used", _time(), nullable=True),
            UniqueConstraint("token_hash", name=f"{k}_by_hash"),
            Index(f"{k}_by_admin", "admin_id"),
            sqlite_autoincrement=True,
            **MYSQL_TABLE)
        # User digests (revision 0004; store/digests.py).  A digest link's
        # token spent: its SHA-256 (the one-shot rule, kept until expiry).
        t = f"{prefix}archive_digest_tokens"
        self.digest_tokens = Table(
            t, self.metadata,
            Column("token_hash", String(64), primary_key=True),
            Column("row_id", BigInteger(), nullable=False),
            Column("recipient", String(SENDER_LENGTH), nullable=False),
            Column("used", _time(), nullable=False),
            Column("expires", _time(), nullable=False),
            Column("origin", String(ACTOR_LENGTH), nullable=False),
            Index(f"{t}_expires", "expires"),
            **MYSQL_TABLE)
        # Digests sent, per day (UTC) and recipient; recipient "" marks the
        # day's whole run done.  A restart does not send twice.
        d = f"{prefix}archive_digest_sent"
        self.digest_sent = Table(
            d, self.metadata,
            Column("day", String(10), primary_key=True),
            Column("recipient", String(SENDER_LENGTH), primary_key=True),
            Column("at", _time(), nullable=False),
            **MYSQL_TABLE)

    @property
    def version_table(self) -> str:
        """Alembic's version table for these tables (never the default
        ``alembic_version``, which another application in a shared
        database may own)."""
        return f"{self.prefix}archive_alembic_version"


# The unprefixed tables (a site's store; benchmarks/archive_bench.py).
TABLES = ArchiveTables()
metadata = TABLES.metadata
messages = TABLES.messages
raw = TABLES.raw
audit = TABLES.audit
