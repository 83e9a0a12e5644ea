"""consent contact history (frequency caps of activation jobs)

Revision ID: 5c0a7e91d2b4
Revises: 377ba8b9a9ac
Create Date: 2026-11-27 10:10:00.000000
"""
from typing import Sequence, Union

from alembic import op
import sqlalchemy as sa

revision: str = '5c0a7e91d2b4'
down_revision: Union[str, None] = '377ba8b9a9ac'
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    op.create_table('consent_contacts',
    sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), autoincrement=True, nullable=False),
    sa.Column('subject_ref', sa.String(length=32), nullable=False),
    sa.Column('at', sa.DateTime(), nullable=False),
    sa.Column('channel', sa.String(length=16), nullable=False),
    sa.Column('topic', sa.String(length=64), nullable=False),
    sa.Column('purpose', sa.String(length=128), nullable=False),
    sa.Column('job_ref', sa.String(length=128), nullable=False),
    sa.PrimaryKeyConstraint('id')
    )
    with op.batch_alter_table('consent_contacts', schema=None) as batch_op:
        batch_op.create_index('ix_consent_contacts_subject_at', ['subject_ref', 'at'], unique=False)


def downgrade() -> None:
    with op.batch_alter_table('consent_contacts', schema=None) as batch_op:
        batch_op.drop_index('ix_consent_contacts_subject_at')
    op.drop_table('consent_contacts')
