"""gemma-search's own tables: study specs, workers, checkpoints, per-evaluation metrics.

Revision ID: 0001
Revises:
Create Date: 2025-01-01 00:00:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

# revision identifiers, used by Alembic.
revision: str = "0001"
down_revision: str | Sequence[str] | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# Written out, not imported from gemma_search.db: a migration is the schema as it was then.
_NAME = sa.String(512)  # Optuna's study_name length
_TIME = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "gs_studies",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("study_name", _NAME, nullable=False),
        sa.Column("spec_text", sa.Text(), nullable=False),
        sa.Column("spec_hash", sa.String(64), nullable=False),
        sa.Column("created_at", _TIME, nullable=False),
        sa.UniqueConstraint("study_name", name="uq_gs_studies_study_name"),
    )
    op.create_table(
        "gs_workers",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("study_name", _NAME, nullable=False),
        sa.Column("host", sa.String(255), nullable=False),
        sa.Column("gpu_name", sa.String(255), nullable=True),
        sa.Column("gpu_index", sa.Integer(), nullable=True),
        sa.Column("pid", sa.Integer(), nullable=False),
        sa.Column("started_at", _TIME, nullable=False),
        sa.Column("last_seen", _TIME, nullable=False),
        sa.Column("current_trial", sa.Integer(), nullable=True),
        sa.Column("current_step", sa.Integer(), nullable=True),
        sa.Column("tokens_per_second", sa.Float(), nullable=True),
        sa.Column("state", sa.String(16), nullable=False),
        sa.CheckConstraint("state IN ('running', 'exited', 'failed')",
                           name="ck_gs_workers_state"),
    )
    op.create_index("ix_gs_workers_study_name", "gs_workers", ["study_name"])
    op.create_table(
        "gs_checkpoints",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("study_name", _NAME, nullable=False),
        sa.Column("trial_number", sa.Integer(), nullable=False),
        sa.Column("step", sa.Integer(), nullable=False),
        sa.Column("tokens", sa.BigInteger(), nullable=False),
        sa.Column("path", sa.Text(), nullable=False),
        sa.Column("created_at", _TIME, nullable=False),
    )
    op.create_index("ix_gs_checkpoints_study_trial", "gs_checkpoints",
                    ["study_name", "trial_number"])
    op.create_table(
        "gs_eval_metrics",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("study_name", _NAME, nullable=False),
        sa.Column("trial_number", sa.Integer(), nullable=False),
        sa.Column("eval_index", sa.Integer(), nullable=False),
        sa.Column("step", sa.Integer(), nullable=False),
        sa.Column("tokens", sa.BigInteger(), nullable=False),
        sa.Column("metrics", sa.Text(), nullable=False),
        sa.Column("created_at", _TIME, nullable=False),
        sa.UniqueConstraint("study_name", "trial_number", "eval_index",
                            name="uq_gs_eval_metrics_study_trial_eval"),
    )


def downgrade() -> None:
    op.drop_table("gs_eval_metrics")
    op.drop_index("ix_gs_checkpoints_study_trial", table_name="gs_checkpoints")
    op.drop_table("gs_checkpoints")
    op.drop_index("ix_gs_workers_study_name", table_name="gs_workers")
    op.drop_table("gs_workers")
    op.drop_table("gs_studies")
