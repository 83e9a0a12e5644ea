"""arbiter keys: one Paillier key per agreement and size, rotated by age (sealed private half)

Revision ID: e3b9d1f4a6c2
Revises: c7e51f0a93d2
Create Date: 2026-11-27 13:10:00
"""
from typing import Sequence, Union

from alembic import op
import sqlalchemy as sa


revision: str = 'e3b9d1f4a6c2'
down_revision: Union[str, None] = 'c7e51f0a93d2'
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    op.create_table('arbiter_keys',
    sa.Column('id', sa.String(length=36), nullable=False),
    sa.Column('agreement_id', sa.String(length=64), nullable=False),
    sa.Column('key_bits', sa.Integer(), nullable=False),
    sa.Column('n', sa.Text(), nullable=False),
    sa.Column('sealed', sa.LargeBinary(), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('id')
    )
    op.create_index(op.f('ix_arbiter_keys_agreement_id'), 'arbiter_keys', ['agreement_id'], unique=False)
    op.create_index(op.f('ix_arbiter_keys_created_at'), 'arbiter_keys', ['created_at'], unique=False)


def downgrade() -> None:
    op.drop_index(op.f('ix_arbiter_keys_created_at'), table_name='arbiter_keys')
    op.drop_index(op.f('ix_arbiter_keys_agreement_id'), table_name='arbiter_keys')
    op.drop_table('arbiter_keys')
