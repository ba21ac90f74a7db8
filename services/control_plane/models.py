"""Tables. Every change here (and in services/contract/tables.py, the ledger's) needs an Alembic revision in
migrations/versions (a test compares them)."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import JSON, BigInteger, Boolean, Float, ForeignKey, Index, Integer, String, Text, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column

from services.contract import events
from services.contract.tables import Base, Budget, Reservation, UTCDateTime, now

__all__ = ["Base", "Budget", "Reservation", "UTCDateTime", "now"]  # the ledger's tables, on the same metadata

ACTIVE_STATES = ("QUEUED", "RUNNING")
FINAL_STATES = events.RESULTS  # a job ends in what its trainer's result event may say
STATES = ACTIVE_STATES + FINAL_STATES
SUB_STATES = events.SUB_STATES


class Tenant(Base):
    __tablename__ = "tenants"
    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    created_at: Mapped[datetime] = mapped_column(default=now)


class ApiKey(Base):
    """Only a peppered hash of each key is stored; `prefix` lets a human tell keys apart."""

    __tablename__ = "api_keys"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    tenant: Mapped[str | None] = mapped_column(ForeignKey("tenants.name", ondelete="CASCADE"), index=True)
    is_admin: Mapped[bool] = mapped_column(Boolean, default=False)
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)
    prefix: Mapped[str] = mapped_column(String(16))
    created_at: Mapped[datetime] = mapped_column(default=now)
    revoked_at: Mapped[datetime | None] = mapped_column()


class Job(Base):
    __tablename__ = "jobs"
    __table_args__ = (
        UniqueConstraint("tenant", "idempotency_key", name="uq_jobs_tenant_idempotency"),
        Index("ix_jobs_tenant_created", "tenant", "created_at"),
    )
    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    tenant: Mapped[str] = mapped_column(ForeignKey("tenants.name", ondelete="CASCADE"))
    name: Mapped[str | None] = mapped_column(String(120))
    spec: Mapped[dict] = mapped_column(JSON)
    spec_hash: Mapped[str] = mapped_column(String(64))
    idempotency_key: Mapped[str | None] = mapped_column(String(200))
    state: Mapped[str] = mapped_column(String(20), default="QUEUED", index=True)
    sub_state: Mapped[str | None] = mapped_column(String(20))
    reason: Mapped[str | None] = mapped_column(Text)
    result_state: Mapped[str | None] = mapped_column(String(20))  # what the trainer's result event said
    result_reason: Mapped[str | None] = mapped_column(Text)
    ray_submission_id: Mapped[str] = mapped_column(String(64), unique=True)
    submitted_at: Mapped[datetime | None] = mapped_column()  # Ray accepted it
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[datetime] = mapped_column(default=now)
    started_at: Mapped[datetime | None] = mapped_column()
    finished_at: Mapped[datetime | None] = mapped_column()
    updated_at: Mapped[datetime] = mapped_column(default=now, onupdate=now)
    log_offset: Mapped[int] = mapped_column(Integer, default=0)  # this attempt's Ray log lines already ingested
    # Ray submissions of this job: a driver that died is resubmitted (ray_jobs.Reconciler) as qpeft-<id>-<attempt>
    attempt: Mapped[int] = mapped_column(Integer, default=1, server_default="1")
    log_base: Mapped[int] = mapped_column(Integer, default=0, server_default="0")  # log lines of earlier attempts
    step: Mapped[int] = mapped_column(Integer, default=0)
    max_steps: Mapped[int] = mapped_column(Integer, default=0)
    loss: Mapped[float | None] = mapped_column(Float)
    shots_spent: Mapped[int] = mapped_column(BigInteger, default=0)
    qpu_s: Mapped[float] = mapped_column(Float, default=0.0)
    pool_calls: Mapped[int] = mapped_column(Integer, default=0)
    forecast_shots: Mapped[int | None] = mapped_column(BigInteger)
    forecast_qpu_s: Mapped[float | None] = mapped_column(Float)
    trainable_params: Mapped[int | None] = mapped_column(BigInteger)  # the trainer's `params` event
    total_params: Mapped[int | None] = mapped_column(BigInteger)


class JobMetric(Base):
    __tablename__ = "job_metrics"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    step: Mapped[int] = mapped_column(Integer)
    time: Mapped[float] = mapped_column(Float)
    loss: Mapped[float | None] = mapped_column(Float)
    eval: Mapped[dict | None] = mapped_column(JSON)
    shots_spent: Mapped[int] = mapped_column(BigInteger, default=0)
    qpu_s: Mapped[float | None] = mapped_column(Float)
    tokens_per_s: Mapped[float | None] = mapped_column(Float)


class JobLog(Base):
    __tablename__ = "job_logs"
    __table_args__ = (UniqueConstraint("job_id", "seq", name="uq_job_logs_seq"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    seq: Mapped[int] = mapped_column(Integer)  # 1-based line number in the job's log
    time: Mapped[float] = mapped_column(Float)
    line: Mapped[str] = mapped_column(Text)


class JobArtifact(Base):
    __tablename__ = "job_artifacts"
    __table_args__ = (UniqueConstraint("job_id", "name", name="uq_job_artifacts_name"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    name: Mapped[str] = mapped_column(String(200))
    path: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(default=now)


class Dataset(Base):
    """A tenant's uploaded data set; its file is `path` (under the data dir), written whole before the row."""

    __tablename__ = "datasets"
    __table_args__ = (Index("ix_datasets_tenant_created", "tenant", "created_at"),)
    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    tenant: Mapped[str] = mapped_column(ForeignKey("tenants.name", ondelete="CASCADE"))
    name: Mapped[str] = mapped_column(String(200))  # the uploader's file name, for lists
    format: Mapped[str] = mapped_column(String(8))  # text | tsv | csv | jsonl
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str] = mapped_column(String(64))
    rows: Mapped[int] = mapped_column(BigInteger)
    columns: Mapped[list | None] = mapped_column(JSON)  # per-column statistics (tabular formats)
    stats: Mapped[dict] = mapped_column(JSON)
    path: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(default=now)
