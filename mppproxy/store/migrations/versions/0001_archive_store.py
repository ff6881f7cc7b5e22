"""The archive store's first tables: messages (one row per message and
recipient domain), raw messages, audit.

Revision ID: 0001
Revises:
Create Date: 2025-01-01

Written out in full rather than built from ``schema.py``: a revision is
frozen, the module describing today's schema is not.  Table names carry
the prefix the store was opened with (``_t``).
"""
from __future__ import annotations

from datetime import datetime
from typing import Any, Optional, Sequence, Union

import sqlalchemy as sa
from alembic import context, op
from sqlalchemy.dialects import mysql

revision: str = "0001"
down_revision: Optional[str] = None
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None

_MYSQL: dict[str, Any] = {"mysql_engine": "InnoDB", "mysql_charset": "utf8mb4",
          "mysql_collate": "utf8mb4_unicode_ci"}


def _t(name: str) -> str:
    return f"{context.config.attributes.get('table_prefix', '')}{name}"


def _id() -> sa.types.TypeEngine[int]:
    return sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def _time() -> sa.types.TypeEngine[datetime]:
    return sa.DateTime().with_variant(mysql.DATETIME(fsp=6), "mysql", "mariadb")


def _long_text() -> sa.types.TypeEngine[str]:
    return sa.Text().with_variant(mysql.MEDIUMTEXT(), "mysql", "mariadb")


def upgrade() -> None:
    m = _t("archive_messages")
    op.create_table(
        m,
        sa.Column("id", _id(), primary_key=True, autoincrement=True),
        sa.Column("node", sa.String(255), nullable=False),
        sa.Column("queue_id", sa.String(64), nullable=False),
        sa.Column("rcpt_domain", sa.String(255), nullable=False),
        sa.Column("received", _time(), nullable=False),
        sa.Column("sender", sa.String(512).with_variant(sa.String(512, collation="NOCASE"),
                                                        "sqlite"), nullable=False),
        sa.Column("recipients", _long_text(), nullable=False),
        sa.Column("subject", sa.String(512), nullable=False),
        sa.Column("verdict", sa.String(16), nullable=False),
        sa.Column("disposition", sa.String(16), nullable=False),
        sa.Column("score", sa.Float(), nullable=False),
        sa.Column("reason", sa.String(1000), nullable=False),
        sa.Column("client_ip", sa.String(45), nullable=False),
        sa.Column("helo", sa.String(255), nullable=True),
        sa.Column("size", sa.Integer(), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("legal_hold", sa.Boolean(create_constraint=False), nullable=False),
        sa.Column("released_at", _time(), nullable=True),
        sa.Column("state", _long_text(), nullable=False),
        sa.Column("raw_key", sa.String(128), nullable=False),
        sa.UniqueConstraint("queue_id", "node", "rcpt_domain", name=f"{m}_by_ref"),
        sqlite_autoincrement=True,
        **_MYSQL)
    op.create_index(f"{m}_domain_newest", m, ["rcpt_domain", "received"])
    op.create_index(f"{m}_received", m, ["received"])
    op.create_index(f"{m}_sender", m, ["sender", "received"])
    op.create_index(f"{m}_domain_sender", m, ["rcpt_domain", "sender", "received"],
                    mysql_length={"sender": 255})
    op.create_table(
        _t("archive_raw"),
        sa.Column("raw_key", sa.String(128), primary_key=True),
        sa.Column("data", sa.LargeBinary().with_variant(mysql.LONGBLOB(), "mysql", "mariadb"),
                  nullable=True),
        sa.Column("size", sa.Integer(), nullable=False),
        **_MYSQL)
    a = _t("archive_audit")
    op.create_table(
        a,
        sa.Column("id", _id(), primary_key=True, autoincrement=True),
        sa.Column("at", _time(), nullable=False),
        sa.Column("actor", sa.String(255), nullable=False),
        sa.Column("origin", sa.String(255), nullable=False),
        sa.Column("action", sa.String(32), nullable=False),
        sa.Column("row_id", sa.BigInteger(), nullable=True),
        sa.Column("node", sa.String(255), nullable=True),
        sa.Column("queue_id", sa.String(64), nullable=True),
        sa.Column("rcpt_domain", sa.String(255), nullable=True),
        sa.Column("detail", _long_text(), nullable=False),
        sqlite_autoincrement=True,
        **_MYSQL)
    op.create_index(f"{a}_newest", a, ["at"])
    op.create_index(f"{a}_by_ref", a, ["queue_id"])


def downgrade() -> None:
    op.drop_table(_t("archive_audit"))
    op.drop_table(_t("archive_raw"))
    op.drop_table(_t("archive_messages"))
