"""launch leases: until when the orchd process launching an attempt vouches for the launch

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-24 12:00:00
"""
from alembic import op  # noqa: I001
import sqlalchemy as sa


revision = '0005'
down_revision = '0004'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('attempts', schema=None) as batch_op:
        batch_op.add_column(sa.Column('launch_lease_until', sa.Float(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('attempts', schema=None) as batch_op:
        batch_op.drop_column('launch_lease_until')
