"""digest mails: the jobs whose plots a mail carries; heartbeats (when the last tick ran)

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-23 21:30:00
"""
from alembic import op  # noqa: I001
import sqlalchemy as sa


revision = '0004'
down_revision = '0003'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('alerts', schema=None) as batch_op:
        batch_op.add_column(sa.Column('plot_jobs', sa.Text(), nullable=True))
    op.create_table('heartbeats',
                    sa.Column('name', sa.String(length=40), nullable=False),
                    sa.Column('at', sa.Float(), nullable=False),
                    sa.PrimaryKeyConstraint('name'))


def downgrade() -> None:
    op.drop_table('heartbeats')
    with op.batch_alter_table('alerts', schema=None) as batch_op:
        batch_op.drop_column('plot_jobs')
