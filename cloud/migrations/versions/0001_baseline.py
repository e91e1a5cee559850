"""Baseline: the schema every cloud.sqlite had before migrations existed (cdcca 0.1).

Revision ID: 0001
"""
import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "devices",
        sa.Column("name", sa.String(64), primary_key=True),
        sa.Column("token_sha256", sa.String(64), nullable=False, unique=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False))
    op.create_table(
        "rounds",
        sa.Column("id", sa.String(32), primary_key=True),
        sa.Column("device", sa.String(64), sa.ForeignKey("devices.name"), nullable=False, index=True),
        sa.Column("base_model", sa.String(128), nullable=False),
        sa.Column("state", sa.String(16), nullable=False, index=True),
        sa.Column("stage", sa.String(64), nullable=False),
        sa.Column("progress", sa.Float, nullable=False),
        sa.Column("message", sa.String(1000), nullable=False),
        sa.Column("n_samples", sa.Integer, nullable=False),
        sa.Column("options", sa.JSON, nullable=False),
        sa.Column("metrics", sa.JSON, nullable=False),
        sa.Column("patch_path", sa.String(1000), nullable=True),
        sa.Column("patch_sha256", sa.String(64), nullable=True),
        sa.Column("patch_bytes", sa.Integer, nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True))
    op.create_table(
        "samples",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("device", sa.String(64), sa.ForeignKey("devices.name"), nullable=False, index=True),
        sa.Column("sample_id", sa.String(64), nullable=False),
        sa.Column("payload_sha256", sa.String(64), nullable=False),
        sa.Column("blob_path", sa.String(200), nullable=False),
        sa.Column("bytes", sa.Integer, nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("round_id", sa.String(32), sa.ForeignKey("rounds.id"), nullable=True, index=True),
        sa.UniqueConstraint("device", "sample_id", name="uq_samples_device_sample"))


def downgrade() -> None:
    for table in ("samples", "rounds", "devices"):
        op.drop_table(table)
