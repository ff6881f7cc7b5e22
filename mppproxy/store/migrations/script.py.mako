"""${message}

Revision ID: ${up_revision}
Revises: ${down_revision | comma,n}
Create Date: ${create_date}

Table names carry the prefix the store was opened with: use ``_t("archive_...")``.
"""
from __future__ import annotations

from typing import Optional, Sequence, Union

import sqlalchemy as sa
from alembic import context, op
${imports if imports else ""}

revision: str = ${repr(up_revision)}
down_revision: Optional[str] = ${repr(down_revision)}
branch_labels: Union[str, Sequence[str], None] = ${repr(branch_labels)}
depends_on: Union[str, Sequence[str], None] = ${repr(depends_on)}


def _t(name: str) -> str:
    return f"{context.config.attributes.get('table_prefix', '')}{name}"


def upgrade() -> None:
    ${upgrades if upgrades else "pass"}


def downgrade() -> None:
    ${downgrades if downgrades else "pass"}
