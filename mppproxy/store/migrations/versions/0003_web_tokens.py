"""The web console's API tokens (issue 13): per-administrator bearer
tokens for ``/api/v1/``.

Revision ID: 0003
Revises: 0002
Create Date: 2025-01-03

Written out in full (a revision is frozen; ``schema.py`` is today's
schema).  Only the SHA-256 of a token is kept (``token_hash``, 64 hex
digits, unique: a request finds its token by it); ``prefix`` is the
token's first characters, shown in listings so an administrator can tell
tokens apart.  ``expires`` NULL: no end.  A revoked token's row is
deleted.
"""
from __future__ import annotations

from datetime import datetime
from typing import Any, Optional, Sequence, Union

import sqlalchemy as sa
from alembic import context, op
from sqlalchemy.dialects import mysql

revision: str = "0003"
down_revision: Optional[str] = "0002"
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


def upgrade() -> None:
    t = _t("web_tokens")
    op.create_table(
        t,
        sa.Column("id", _id(), primary_key=True, autoincrement=True),
        sa.Column("admin_id", sa.BigInteger(), nullable=False),
        sa.Column("label", sa.String(64), nullable=False),
        sa.Column("prefix", sa.String(16), nullable=False),
        sa.Column("token_hash", sa.String(64), nullable=False),
        sa.Column("created", _time(), nullable=False),
        sa.Column("expires", _time(), nullable=True),
        sa.Column("last_used", _time(), nullable=True),
        sa.UniqueConstraint("token_hash", name=f"{t}_by_hash"),
        sa.Index(f"{t}_by_admin", "admin_id"),
        sqlite_autoincrement=True,
        **_MYSQL)


def downgrade() -> None:
    op.drop_table(_t("web_tokens"))
