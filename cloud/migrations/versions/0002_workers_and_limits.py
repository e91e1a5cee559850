"""Workers and limits (issues 11 and 13): revocable tokens, skipped samples, round leases, one
active round per device.

Revision ID: 0002
Revises: 0001
"""
import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

ACTIVE = sa.text("state IN ('queued', 'running')")


def upgrade() -> None:
    # Rounds left active by a cdcca 0.1 server could never resume (it ran them in threads);
    # that server failed them on start, and so do we, before the one-active index needs it.
    op.execute("UPDATE rounds SET state = 'failed', "
               "message = 'interrupted: the server was upgraded before this round finished' "
               "WHERE state IN ('queued', 'running')")
    with op.batch_alter_table("devices") as batch:
        batch.alter_column("token_sha256", existing_type=sa.String(64), nullable=True)
    with op.batch_alter_table("samples") as batch:
        batch.add_column(sa.Column("skipped", sa.String(200), nullable=True))
    with op.batch_alter_table("rounds") as batch:
        batch.add_column(sa.Column("worker", sa.String(100), nullable=True))
        batch.add_column(sa.Column("lease_until", sa.DateTime(timezone=True), nullable=True))
        batch.add_column(sa.Column("attempts", sa.Integer, nullable=False, server_default="0"))
        batch.add_column(sa.Column("cancel_requested", sa.Boolean, nullable=False,
                                   server_default="0"))
    op.create_index("uq_rounds_one_active", "rounds", ["device"], unique=True,
                    sqlite_where=ACTIVE, postgresql_where=ACTIVE)
    op.create_index("ix_rounds_queue", "rounds", ["state", "created_at"])


def downgrade() -> None:
    op.drop_index("ix_rounds_queue", "rounds")
    op.drop_index("uq_rounds_one_active", "rounds")
    with op.batch_alter_table("rounds") as batch:
        for col in ("cancel_requested", "attempts", "lease_until", "worker"):
            batch.drop_column(col)
    with op.batch_alter_table("samples") as batch:
        batch.drop_column("skipped")
