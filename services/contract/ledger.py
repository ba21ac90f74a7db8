"""Budget accounting: reserve before circuits run, commit what ran, release (with lost shots) on failure.

The interface is four calls so that a database can back it with one conditional UPDATE per call
(`... SET reserved = reserved + :n WHERE budget - spent - lost - reserved >= :n`; sql_ledger.SQLLedger).
`InMemoryLedger` is the in-process version: one lock around the same arithmetic, so concurrent callers
never overspend.

Per key (tenant, project or job) the shot budget splits into
    spent     shots that ran and whose results were used (committed),
    lost      shots that ran (or may have) on a worker that died or hung, results discarded,
    reserved  shots of calls in flight,
and remaining = budget - spent - lost - reserved, never below zero. QPU seconds ride along the same way:
a reservation may hold an estimate, commit charges what the executor reported (or the estimate), and a key
whose QPU seconds are used up (or cannot hold the estimate) refuses new reservations.
"""

from __future__ import annotations

import itertools
import threading
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from qpeft_core.quantum.backend import ExecutionRefused


class BudgetExhausted(ExecutionRefused):
    """A reservation was refused: running the call would take the key's shots (or, with `qpu_s` = (used,
    held, budget, requested) seconds, its QPU time) below zero."""

    def __init__(
        self, key: str, requested: int, remaining: int, qpu_s: tuple[float, float, float, float] | None = None
    ):
        if qpu_s is None:
            why = f"shot budget of {key!r} exhausted: {requested} shots requested, {remaining} remaining"
        else:
            used, held, budget, wanted = qpu_s
            why = f"QPU-time budget of {key!r} exhausted: {used:.3f} of {budget} s used"
            if used < budget:
                why += f", {held:.3f} s held by calls in flight, {wanted:.3f} s more requested"
        super().__init__(why)
        self.key, self.requested, self.remaining, self.qpu_s = key, requested, remaining, qpu_s

    def __reduce__(self):  # rebuilt from its fields where it crosses a process (Ray), not from the message
        return (BudgetExhausted, (self.key, self.requested, self.remaining, self.qpu_s))


def refusal(acc, key: str, shots: int, qpu_s: float) -> BudgetExhausted | None:
    """Why holding `shots` and `qpu_s` more on account `acc` (an Account or a sql_ledger.AccountState) would
    overspend, as SQLLedger's conditional UPDATE decides; None when it fits."""
    left = acc.remaining
    if left is not None and shots > left:
        return BudgetExhausted(key, shots, left)
    q = acc.qpu_s_budget
    if q is not None and (acc.qpu_s_spent >= q or q - acc.qpu_s_spent - acc.qpu_s_reserved < qpu_s):
        return BudgetExhausted(
            key, shots, left if left is not None else 0, qpu_s=(acc.qpu_s_spent, acc.qpu_s_reserved, q, qpu_s)
        )
    return None


@runtime_checkable
class ShotLedger(Protocol):
    def reserve(self, key: str, shots: int, qpu_s: float = 0.0) -> str:
        """Hold `shots` and an estimate of `qpu_s` QPU seconds for `key`; returns a reservation id or raises
        BudgetExhausted."""

    def commit(self, reservation: str, actual: int, qpu_s: float | None = None) -> None:
        """Charge the shots that actually ran (<= reserved) and the QPU seconds reported (None: the estimate
        held); the rest goes back to the budget."""

    def release(self, reservation: str, lost: int = 0, qpu_s: float | None = 0.0) -> None:
        """Cancel a reservation; `lost` of its shots (and `qpu_s` seconds; None: the estimate) ran without a
        usable result and stay charged."""

    def remaining(self, key: str) -> int | None:
        """Shots `key` can still reserve; None for a key without a shot budget (unlimited)."""

    def qpu_s_remaining(self, key: str) -> float | None:
        """QPU seconds `key` can still reserve; None for a key without a QPU-time budget."""


@dataclass
class Account:
    budget: int | None  # None: unlimited, but still counted
    spent: int = 0
    lost: int = 0
    reserved: int = 0
    qpu_s_budget: float | None = None  # None: unlimited, but still counted
    qpu_s_spent: float = 0.0
    qpu_s_reserved: float = 0.0
    qpu_s_estimated: float = 0.0  # the part of qpu_s_spent that is an estimate, not a provider's report

    @property
    def remaining(self) -> int | None:
        return None if self.budget is None else self.budget - self.spent - self.lost - self.reserved

    @property
    def qpu_s_remaining(self) -> float | None:
        if self.qpu_s_budget is None:
            return None
        return max(0.0, self.qpu_s_budget - self.qpu_s_spent - self.qpu_s_reserved)


@dataclass
class _Held:
    key: str
    shots: int
    qpu_s: float


class InMemoryLedger:
    """Thread-safe in-process ledger. Keys not in `budgets` get `default` shots (None: unlimited); QPU-time
    budgets are set per key with set_budget (none: unlimited)."""

    def __init__(self, budgets: dict[str, int] | None = None, default: int | None = None):
        self.default = default
        self.accounts: dict[str, Account] = {}
        self.open: dict[str, _Held] = {}  # reservation id -> what it holds
        self.ids = itertools.count(1)
        self.lock = threading.Lock()
        for key, shots in (budgets or {}).items():
            self.set_budget(key, shots)

    def set_budget(self, key: str, shots: int | None, qpu_s: float | None = None):
        """The key's limits (never its counters), as SQLLedger.set_budget."""
        if shots is not None and shots < 0:
            raise ValueError(f"a budget must be >= 0 shots, got {shots}")
        if qpu_s is not None and qpu_s < 0:
            raise ValueError(f"a QPU-time budget must be >= 0 s, got {qpu_s}")
        with self.lock:
            acc = self._account(key)
            acc.budget, acc.qpu_s_budget = shots, qpu_s

    def _account(self, key: str) -> Account:
        if key not in self.accounts:
            self.accounts[key] = Account(self.default)
        return self.accounts[key]

    def reserve(self, key: str, shots: int, qpu_s: float = 0.0) -> str:
        if shots < 0 or qpu_s < 0:
            raise ValueError(f"cannot reserve a negative amount ({shots} shots, {qpu_s} QPU s)")
        with self.lock:
            acc = self._account(key)
            refused = refusal(acc, key, shots, qpu_s)
            if refused is not None:
                raise refused
            acc.reserved += shots
            acc.qpu_s_reserved += qpu_s
            rid = f"r{next(self.ids)}"
            self.open[rid] = _Held(key, shots, qpu_s)
            return rid

    def _close(self, reservation: str, amount: int, what: str) -> tuple[Account, _Held]:
        held = self.open.get(reservation)
        if held is None:
            raise KeyError(f"unknown or already closed reservation {reservation!r}")
        if not 0 <= amount <= held.shots:
            # Charging more than was held could take the budget below zero; that is a caller bug.
            raise ValueError(f"{what} of {amount} shots on reservation {reservation!r} holding {held.shots}")
        del self.open[reservation]
        acc = self.accounts[held.key]
        acc.reserved -= held.shots
        acc.qpu_s_reserved -= held.qpu_s
        return acc, held

    def commit(self, reservation: str, actual: int, qpu_s: float | None = None) -> None:
        with self.lock:
            acc, held = self._close(reservation, actual, "commit")
            acc.spent += actual
            acc.qpu_s_spent += held.qpu_s if qpu_s is None else qpu_s
            acc.qpu_s_estimated += held.qpu_s if qpu_s is None else 0.0

    def release(self, reservation: str, lost: int = 0, qpu_s: float | None = 0.0) -> None:
        with self.lock:
            acc, held = self._close(reservation, lost, "release with lost shots")
            acc.lost += lost
            acc.qpu_s_spent += held.qpu_s if qpu_s is None else qpu_s
            acc.qpu_s_estimated += held.qpu_s if qpu_s is None else 0.0

    def remaining(self, key: str) -> int | None:
        with self.lock:
            return self._account(key).remaining

    def qpu_s_remaining(self, key: str) -> float | None:
        with self.lock:
            return self._account(key).qpu_s_remaining

    def account(self, key: str) -> Account:
        """A copy of the key's counters (shots and QPU seconds: budget, spent, lost, reserved)."""
        with self.lock:
            a = self._account(key)
            return Account(**vars(a))
