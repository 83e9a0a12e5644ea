"""parties: an operator-approved next certificate (keys are pinned at first registration), revocation

Revision ID: f1a8c3e5b7d9
Revises: e3b9d1f4a6c2
Create Date: 2026-11-27 14:20:00
"""
from typing import Sequence, Union

from alembic import op
import sqlalchemy as sa


revision: str = 'f1a8c3e5b7d9'
down_revision: Union[str, None] = 'e3b9d1f4a6c2'
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    with op.batch_alter_table('parties') as batch:
        batch.add_column(sa.Column('rekey_fingerprint', sa.String(length=64), nullable=True))
        batch.add_column(sa.Column('revoked_at', sa.DateTime(timezone=True), nullable=True))
        batch.add_column(sa.Column('revoked_reason', sa.String(length=200), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('parties') as batch:
        batch.drop_column('revoked_reason')
        batch.drop_column('revoked_at')
        batch.drop_column('rekey_fingerprint')
