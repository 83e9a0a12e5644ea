"""jobs carry the requester's signed mandate

Revision ID: a1c4e2d9b7f0
Revises: 3b88040b59ec
Create Date: 2026-11-27 10:05:00
"""
from typing import Sequence, Union

from alembic import op
import sqlalchemy as sa


revision: str = 'a1c4e2d9b7f0'
down_revision: Union[str, None] = '3b88040b59ec'
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.add_column(sa.Column('mandate', sa.JSON(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.drop_column('mandate')
