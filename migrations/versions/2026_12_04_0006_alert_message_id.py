"""alert message ids: an alert's message is claimed (its Message-ID committed) before it is sent

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-04 20:40:00
"""
from alembic import op  # noqa: I001
import sqlalchemy as sa


revision = '0006'
down_revision = '0005'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('alerts', schema=None) as batch_op:
        batch_op.add_column(sa.Column('message_id', sa.String(length=250), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('alerts', schema=None) as batch_op:
        batch_op.drop_column('message_id')
