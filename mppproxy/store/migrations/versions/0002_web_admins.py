"""The web console's accounts (issue 13): superadmins and per-domain
administrators.

Revision ID: 0002
Revises: 0001
Create Date: 2025-01-02

Written out in full (a revision is frozen; ``schema.py`` is today's
schema).  ``domains`` is a JSON array of lower-case domain names: an
administrator's scope, empty for a superadmin.  ``must_change``: the
password was set by someone else (the first start's one-time password,
``mppproxy admin passwd``) and the console asks for a new one at login.
"""
from __future__ import annotations

from datetime import datetime
from typing import Any, Optional, Sequence, Union

import sqlalchemy as sa
from alembic import context, op
from sqlalchemy.dialects import mysql

revision: str = "0002"
down_revision: Optional[str] = "0001"
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
    t = _t("web_admins")
    op.create_table(
        t,
        sa.Column("id", _id(), primary_key=True, autoincrement=True),
        sa.Column("name", sa.String(64), nullable=False),
        sa.Column("password_hash", sa.String(255), nullable=False),
        sa.Column("superadmin", sa.Boolean(create_constraint=False), nullable=False),
        sa.Column("domains", sa.Text(), nullable=False),
        sa.Column("created", _time(), nullable=False),
        sa.Column("last_login", _time(), nullable=True),
        sa.Column("disabled", sa.Boolean(create_constraint=False), nullable=False),
        sa.Column("must_change", sa.Boolean(create_constraint=False), nullable=False),
        sa.UniqueConstraint("name", name=f"{t}_by_name"),
        sqlite_autoincrement=True,
        **_MYSQL)


def downgrade() -> None:
    op.drop_table(_t("web_admins"))
