"""The ledger's tables (`budgets`, `reservations`) and the declarative Base every table of the control plane
uses: one metadata, so Alembic (services/control_plane/migrations) sees them all. The control plane's
models.py adds its own tables to this Base."""

from __future__ import annotations

from datetime import UTC, datetime

from sqlalchemy import BigInteger, Boolean, DateTime, Float, ForeignKey, String, false
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.types import TypeDecorator


def now() -> datetime:
    return datetime.now(UTC)


class UTCDateTime(TypeDecorator):
    """Timezone-aware UTC on the way out also on SQLite, which stores datetimes without a zone."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_result_value(self, value, dialect):
        return value.replace(tzinfo=UTC) if value is not None and value.tzinfo is None else value


class Base(DeclarativeBase):
    type_annotation_map = {datetime: UTCDateTime()}


class Budget(Base):
    """A ledger account: a tenant's (key = tenant name) or a job's (key = 'job:<id>', parent = tenant).

    budget NULL means unlimited (still counted). remaining = budget - spent - lost - reserved, kept >= 0
    by conditional UPDATEs (sql_ledger.py)."""

    __tablename__ = "budgets"
    key: Mapped[str] = mapped_column(String(80), primary_key=True)
    parent: Mapped[str | None] = mapped_column(ForeignKey("budgets.key", ondelete="CASCADE"))
    budget: Mapped[int | None] = mapped_column(BigInteger)
    spent: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    lost: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    reserved: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    qpu_s_budget: Mapped[float | None] = mapped_column(Float)
    qpu_s_spent: Mapped[float] = mapped_column(Float, default=0.0, server_default="0")
    qpu_s_reserved: Mapped[float] = mapped_column(Float, default=0.0, server_default="0")
    # the part of qpu_s_spent that is the time model's estimate, not a provider's report (migration 0005)
    qpu_s_estimated: Mapped[float] = mapped_column(Float, default=0.0, server_default="0")


class Reservation(Base):
    __tablename__ = "reservations"
    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    key: Mapped[str] = mapped_column(ForeignKey("budgets.key", ondelete="CASCADE"), index=True)
    parent: Mapped[str | None] = mapped_column(String(80))
    shots: Mapped[int] = mapped_column(BigInteger)
    qpu_s: Mapped[float] = mapped_column(Float, default=0.0)
    state: Mapped[str] = mapped_column(String(12), default="open")  # open | committed | released
    actual: Mapped[int] = mapped_column(BigInteger, default=0)  # committed shots, or lost ones on release
    qpu_s_actual: Mapped[float] = mapped_column(Float, default=0.0)
    qpu_s_reported: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
    created_at: Mapped[datetime] = mapped_column(default=now)
    closed_at: Mapped[datetime | None] = mapped_column()
