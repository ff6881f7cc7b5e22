"""User digests (issue 13): the spent one-shot release tokens of digest
links, and the digests sent per day and recipient.

Revision ID: 0004
Revises: 0003
Create Date: 2025-01-04

Written out in full (a revision is frozen; ``schema.py`` is today's
schema).  ``archive_digest_tokens`` keeps only the SHA-256 of a spent
token (its MAC), until the token's own expiry, when it could not be used
anyway.  ``archive_digest_sent``: one row per (UTC day, recipient) sent,
and one with an empty recipient once the day's run is done, so a restart
sends nobody a second digest that day.
"""
from __future__ import annotations

from datetime import datetime
from typing import Any, Optional, Sequence, Union

import sqlalchemy as sa
from alembic import context, op
from sqlalchemy.dialects import mysql

revision: str = "0004"
down_revision: Optional[str] = "0003"
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None

_MYSQL: dict[str, Any] = {"mysql_engine": "InnoDB", "mysql_charset": "utf8mb4",
                          "mysql_collate": "utf8mb4_unicode_ci"}


def _t(name: str) -> str:
    return f"{context.config.attributes.get('table_prefix', '')}{name}"


def _time() -> sa.types.TypeEngine[datetime]:
    return sa.DateTime().with_variant(mysql.DATETIME(fsp=6), "mysql", "mariadb")


def upgrade() -> None:
    t = _t("archive_digest_tokens")
    op.create_table(
        t,
        sa.Column("token_hash", sa.String(64), primary_key=True),
        sa.Column("row_id", sa.BigInteger(), nullable=False),
        sa.Column("recipient", sa.String(512), nullable=False),
        sa.Column("used", _time(), nullable=False),
        sa.Column("expires", _time(), nullable=False),
        sa.Column("origin", sa.String(255), nullable=False),
        **_MYSQL)
    op.create_index(f"{t}_expires", t, ["expires"])
    op.create_table(
        _t("archive_digest_sent"),
        sa.Column("day", sa.String(10), primary_key=True),
        sa.Column("recipient", sa.String(512), primary_key=True),
        sa.Column("at", _time(), nullable=False),
        **_MYSQL)


def downgrade() -> None:
    op.drop_table(_t("archive_digest_sent"))
    t = _t("archive_digest_tokens")
    op.drop_index(f"{t}_expires", table_name=t)
    op.drop_table(t)
