"""The budget ledger in the database: the `ShotLedger` protocol (ledger.py), shared by every process
(control plane, trainers, quantum pools) that can reach the database.

Accounts are rows of `budgets`: a tenant's (key = tenant name) and, per job, 'job:<id>' whose parent is
the tenant, so a job's shots count against both. Each call is a short transaction of single statements:

- reserve: `UPDATE budgets SET reserved = reserved + :n WHERE key = :k AND (budget IS NULL OR
  budget - spent - lost - reserved >= :n) RETURNING parent` - the check and the change are one statement,
  so concurrent reservers serialise on the row lock and none can take remaining below zero. A job key
  then repeats it on the parent (always child first, then parent: one lock order, no deadlocks) and
  records the reservation; any refusal rolls the whole transaction back and raises BudgetExhausted.
- commit / release: flip the reservation from 'open' to closed with one conditional UPDATE (so a repeated
  call changes nothing: idempotent), then move its shots from reserved to spent (or lost) on its accounts.

QPU seconds ride along: a reservation may hold an estimate (qpu_s), commit charges what the executor
reported (or the estimate), and an account whose QPU seconds are used up refuses new reservations.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass

from sqlalchemy import func, insert, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from .engine import engine_for
from .ledger import BudgetExhausted, refusal
from .tables import Budget, Reservation, now

B, R = Budget.__table__, Reservation.__table__


class _Rollback(Exception):
    """Leaves an `engine.begin()` block so that it rolls back; carries what to report."""


@dataclass
class AccountState:
    key: str
    parent: str | None
    budget: int | None
    spent: int
    lost: int
    reserved: int
    qpu_s_budget: float | None
    qpu_s_spent: float
    qpu_s_reserved: float
    qpu_s_estimated: float = 0.0  # within qpu_s_spent: the time model's estimate, not a provider's report

    @classmethod
    def of(cls, row: Budget) -> AccountState:
        return cls(**{f: getattr(row, f) for f in cls.__dataclass_fields__})

    @property
    def remaining(self) -> int | None:
        return None if self.budget is None else max(0, self.budget - self.spent - self.lost - self.reserved)

    @property
    def qpu_s_remaining(self) -> float | None:
        if self.qpu_s_budget is None:
            return None
        return max(0.0, self.qpu_s_budget - self.qpu_s_spent - self.qpu_s_reserved)


def _fits(n, q):
    """The condition for holding n more shots and q more QPU seconds on an account row."""
    shots_ok = (B.c.budget.is_(None)) | (B.c.budget - B.c.spent - B.c.lost - B.c.reserved >= n)
    qpu_ok = (B.c.qpu_s_budget.is_(None)) | (
        (B.c.qpu_s_budget - B.c.qpu_s_spent - B.c.qpu_s_reserved >= q) & (B.c.qpu_s_spent < B.c.qpu_s_budget)
    )
    return shots_ok & qpu_ok


class SQLLedger:
    """ShotLedger over the control plane's database. Picklable (by URL) so Ray can ship it to workers."""

    def __init__(self, database_url: str):
        self.database_url = database_url

    def __reduce__(self):
        return (SQLLedger, (self.database_url,))

    @property
    def engine(self):
        return engine_for(self.database_url)

    # --- accounts ----------------------------------------------------------------------------------
    def set_budget(
        self, key: str, shots: int | None, qpu_s: float | None = None, parent: str | None = None
    ) -> AccountState:
        """Create the account or change its limits (never its counters)."""
        if shots is not None and shots < 0:
            raise ValueError(f"a budget must be >= 0 shots, got {shots}")
        values = {"budget": shots, "qpu_s_budget": qpu_s}
        for _ in range(2):  # a concurrent creator may win the insert: then update its row
            with self.engine.begin() as conn:
                if conn.execute(update(B).where(B.c.key == key).values(**values)).rowcount:
                    break
                try:
                    conn.execute(insert(B).values(key=key, parent=parent, **values))
                    break
                except IntegrityError:
                    continue
        return self.account(key)

    def account(self, key: str, session: Session | None = None) -> AccountState:
        """The account's limits and counters; read through `session` where the caller holds one (a request
        then uses one pooled connection), else on a connection of its own."""
        if session is not None:
            row = session.get(Budget, key, populate_existing=True)
            if row is None:
                raise KeyError(f"no ledger account {key!r}")
            return AccountState.of(row)
        with self.engine.connect() as conn:
            row = conn.execute(select(B).where(B.c.key == key)).mappings().first()
        if row is None:
            raise KeyError(f"no ledger account {key!r}")
        return AccountState(**{f: row[f] for f in AccountState.__dataclass_fields__})

    def remaining(self, key: str) -> int | None:
        """Shots `key` can still reserve: the smaller of its own and its parent's; None if both unlimited."""
        acc = self.account(key)
        values = [acc.remaining]
        if acc.parent:
            values.append(self.account(acc.parent).remaining)
        values = [v for v in values if v is not None]
        return min(values) if values else None

    def qpu_s_remaining(self, key: str) -> float | None:
        """QPU seconds `key` can still reserve: the smaller of its own and its parent's; None if both unlimited."""
        acc = self.account(key)
        values = [acc.qpu_s_remaining]
        if acc.parent:
            values.append(self.account(acc.parent).qpu_s_remaining)
        values = [v for v in values if v is not None]
        return min(values) if values else None

    # --- the protocol ------------------------------------------------------------------------------
    def reserve(self, key: str, shots: int, qpu_s: float = 0.0) -> str:
        if shots < 0 or qpu_s < 0:
            raise ValueError(f"cannot reserve a negative amount ({shots} shots, {qpu_s} QPU s)")
        rid = uuid.uuid4().hex
        hold = {"reserved": B.c.reserved + shots, "qpu_s_reserved": B.c.qpu_s_reserved + qpu_s}
        try:
            with self.engine.begin() as conn:
                stmt = update(B).where(B.c.key == key, _fits(shots, qpu_s)).values(**hold).returning(B.c.parent)
                row = conn.execute(stmt).first()
                if row is None:
                    raise _Rollback(key)
                if row.parent is not None:
                    res = conn.execute(update(B).where(B.c.key == row.parent, _fits(shots, qpu_s)).values(**hold))
                    if res.rowcount == 0:
                        raise _Rollback(row.parent)
                conn.execute(insert(R).values(id=rid, key=key, parent=row.parent, shots=shots, qpu_s=qpu_s))
        except _Rollback as refused:
            self._refuse(refused.args[0], shots, qpu_s)
        return rid

    def _refuse(self, key: str, shots: int, qpu_s: float):
        try:
            acc = self.account(key)
        except KeyError:
            raise KeyError(f"no ledger account {key!r}: create it (a tenant or a job) before reserving") from None
        # read after the rollback: a concurrent commit may have made room since; it was still full when tried
        raise refusal(acc, key, shots, qpu_s) or BudgetExhausted(key, shots, acc.remaining or 0)

    def _close(self, reservation: str, state: str, amount: int, qpu_s: float | None) -> None:
        """Close an open reservation, charging `amount` shots as spent (commit) or lost (release)."""
        with self.engine.begin() as conn:
            q = R.c.qpu_s if qpu_s is None else qpu_s
            reported = qpu_s is not None
            row = conn.execute(
                update(R)
                .where(R.c.id == reservation, R.c.state == "open", R.c.shots >= amount)
                .values(state=state, actual=amount, qpu_s_actual=q, qpu_s_reported=reported, closed_at=now())
                .returning(R.c.key, R.c.parent, R.c.shots, R.c.qpu_s, R.c.qpu_s_actual)
            ).first()
            if row is not None:
                charged = B.c.spent if state == "committed" else B.c.lost
                change = {
                    B.c.reserved: B.c.reserved - row.shots,
                    charged: charged + amount,
                    B.c.qpu_s_reserved: B.c.qpu_s_reserved - row.qpu_s,
                    B.c.qpu_s_spent: B.c.qpu_s_spent + row.qpu_s_actual,
                    B.c.qpu_s_estimated: B.c.qpu_s_estimated + (0.0 if reported else row.qpu_s_actual),
                }
                for key in (row.key, row.parent):  # child first, as reserve does: one lock order
                    if key is not None:
                        conn.execute(update(B).where(B.c.key == key).values(change))
                return
        self._why_not_open(reservation, state, amount)  # nothing changed: say why (or return if closed)

    def _why_not_open(self, reservation: str, state: str, amount: int) -> None:
        with self.engine.connect() as conn:
            row = conn.execute(select(R.c.state, R.c.shots).where(R.c.id == reservation)).first()
        if row is None:
            raise KeyError(f"unknown reservation {reservation!r}")
        if row.state == "open":  # the only other way the UPDATE misses: more than was held
            verb = "commit" if state == "committed" else "release with lost shots"
            raise ValueError(f"{verb} of {amount} shots on reservation {reservation!r} holding {row.shots}")
        # already closed: a retried commit/release is a no-op

    def commit(self, reservation: str, actual: int, qpu_s: float | None = None) -> None:
        """Charge the shots that ran (<= reserved) and the QPU seconds reported (None: the estimate held)."""
        if actual < 0:
            raise ValueError(f"commit of {actual} shots on reservation {reservation!r}")
        self._close(reservation, "committed", actual, qpu_s)

    def release(self, reservation: str, lost: int = 0, qpu_s: float | None = 0.0) -> None:
        """Cancel a reservation; `lost` shots ran without a usable result and stay charged."""
        if lost < 0:
            raise ValueError(f"release with {lost} lost shots on reservation {reservation!r}")
        self._close(reservation, "released", lost, qpu_s)

    # --- reports -----------------------------------------------------------------------------------
    def committed_total(self, key: str) -> tuple[int, int]:
        """(shots committed, shots lost) over the key's closed reservations: what executors recorded."""
        with self.engine.connect() as conn:
            rows = conn.execute(
                select(R.c.state, func.coalesce(func.sum(R.c.actual), 0))
                .where((R.c.key == key) | (R.c.parent == key))
                .group_by(R.c.state)
            ).all()
        by = dict(rows)
        return int(by.get("committed", 0)), int(by.get("released", 0))
