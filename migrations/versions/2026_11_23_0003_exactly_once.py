"""exactly once: submit intents, cancel intents, per-job errors, failed alerts, 64-bit log offsets

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-23 15:00:00
"""
from alembic import op  # noqa: I001
import sqlalchemy as sa


revision = '0003'
down_revision = '0002'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('attempts', schema=None) as batch_op:
        batch_op.add_column(sa.Column('submitting_at', sa.Float(), nullable=True))
        batch_op.alter_column('log_offset', existing_type=sa.Integer(), type_=sa.BigInteger())
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.add_column(sa.Column('cancel_requested_at', sa.Float(), nullable=True))
        batch_op.add_column(sa.Column('cancel_reason', sa.Text(), nullable=False, server_default=''))
        batch_op.add_column(sa.Column('error_count', sa.Integer(), nullable=False, server_default='0'))
    with op.batch_alter_table('alerts', schema=None) as batch_op:
        batch_op.add_column(sa.Column('failed_at', sa.Float(), nullable=True))
    with op.batch_alter_table('metrics', schema=None) as batch_op:
        batch_op.alter_column('offset', existing_type=sa.Integer(), type_=sa.BigInteger())
    with op.batch_alter_table('keys_reports', schema=None) as batch_op:
        batch_op.alter_column('offset', existing_type=sa.Integer(), type_=sa.BigInteger())


def downgrade() -> None:
    with op.batch_alter_table('keys_reports', schema=None) as batch_op:
        batch_op.alter_column('offset', existing_type=sa.BigInteger(), type_=sa.Integer())
    with op.batch_alter_table('metrics', schema=None) as batch_op:
        batch_op.alter_column('offset', existing_type=sa.BigInteger(), type_=sa.Integer())
    with op.batch_alter_table('alerts', schema=None) as batch_op:
        batch_op.drop_column('failed_at')
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.drop_column('error_count')
        batch_op.drop_column('cancel_reason')
        batch_op.drop_column('cancel_requested_at')
    with op.batch_alter_table('attempts', schema=None) as batch_op:
        batch_op.alter_column('log_offset', existing_type=sa.BigInteger(), type_=sa.Integer())
        batch_op.drop_column('submitting_at')
