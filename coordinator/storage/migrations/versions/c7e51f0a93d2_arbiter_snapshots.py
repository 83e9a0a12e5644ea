"""arbiter snapshots: sealed per-epoch state of the vertical-training arbiter (resume)

Revision ID: c7e51f0a93d2
Revises: a1c4e2d9b7f0
Create Date: 2026-11-27 10:20:00
"""
from typing import Sequence, Union

from alembic import op
import sqlalchemy as sa


revision: str = 'c7e51f0a93d2'
down_revision: Union[str, None] = 'a1c4e2d9b7f0'
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    op.create_table('arbiter_snapshots',
    sa.Column('job_id', sa.String(length=36), nullable=False),
    sa.Column('epoch', sa.Integer(), nullable=False),
    sa.Column('rows', sa.Integer(), nullable=False),
    sa.Column('sealed', sa.LargeBinary(), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['job_id'], ['jobs.id'], ),
    sa.PrimaryKeyConstraint('job_id', 'epoch')
    )


def downgrade() -> None:
    op.drop_table('arbiter_snapshots')
