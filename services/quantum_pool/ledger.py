"""Shot accounting: reserve before circuits run, commit what ran, release (with lost shots) on failure.

The interface is four calls so that a database can back it later with one conditional UPDATE per call
(`... SET reserved = reserved + :n WHERE budget - spent - lost - reserved >= :n`). `InMemoryLedger` is
the in-process version: one lock around the same arithmetic, so concurrent callers never overspend.

Per key (tenant, project or job) the budget splits into
    spent     shots that ran and whose results were used (committed),
    lost      shots that ran (or may have) on a worker that died or hung, results discarded,
    reserved  shots of calls in flight,
and remaining = budget - spent - lost - reserved, never below zero.
"""

from __future__ import annotations

import itertools
import threading
from dataclasses import dataclass
from typing import Protocol, runtime_checkable


class BudgetExhausted(RuntimeError):
    """A reservation was refused: running the call would take the key's shots below zero."""

    def __init__(self, key: str, requested: int, remaining: int):
        super().__init__(f"shot budget of {key!r} exhausted: {requested} shots requested, {remaining} remaining")
        self.key, self.requested, self.remaining = key, requested, remaining


@runtime_checkable
class ShotLedger(Protocol):
    def reserve(self, key: str, shots: int) -> str:
        """Hold `shots` for `key`; returns a reservation id or raises BudgetExhausted."""

    def commit(self, reservation: str, actual: int) -> None:
        """Charge the shots that actually ran (<= reserved); the rest goes back to the budget."""

    def release(self, reservation: str, lost: int = 0) -> None:
        """Cancel a reservation; `lost` of its shots ran without a usable result and stay charged."""

    def remaining(self, key: str) -> int | None:
        """Shots `key` can still reserve; None for a key without a budget (unlimited)."""


@dataclass
class Account:
    budget: int | None  # None: unlimited, but still counted
    spent: int = 0
    lost: int = 0
    reserved: int = 0

    @property
    def remaining(self) -> int | None:
        return None if self.budget is None else self.budget - self.spent - self.lost - self.reserved


class InMemoryLedger:
    """Thread-safe in-process ledger. Keys not in `budgets` get `default` (None: unlimited)."""

    def __init__(self, budgets: dict[str, int] | None = None, default: int | None = None):
        self.default = default
        self.accounts: dict[str, Account] = {}
        self.open: dict[str, tuple[str, int]] = {}  # reservation id -> (key, shots)
        self.ids = itertools.count(1)
        self.lock = threading.Lock()
        for key, shots in (budgets or {}).items():
            self.set_budget(key, shots)

    def set_budget(self, key: str, shots: int | None):
        if shots is not None and shots < 0:
            raise ValueError(f"a budget must be >= 0 shots, got {shots}")
        with self.lock:
            self._account(key).budget = shots

    def _account(self, key: str) -> Account:
        if key not in self.accounts:
            self.accounts[key] = Account(self.default)
        return self.accounts[key]

    def reserve(self, key: str, shots: int) -> str:
        if shots < 0:
            raise ValueError(f"cannot reserve a negative number of shots ({shots})")
        with self.lock:
            acc = self._account(key)
            left = acc.remaining
            if left is not None and shots > left:
                raise BudgetExhausted(key, shots, left)
            acc.reserved += shots
            rid = f"r{next(self.ids)}"
            self.open[rid] = (key, shots)
            return rid

    def _close(self, reservation: str) -> tuple[Account, int]:
        if reservation not in self.open:
            raise KeyError(f"unknown or already closed reservation {reservation!r}")
        key, shots = self.open.pop(reservation)
        acc = self.accounts[key]
        acc.reserved -= shots
        return acc, shots

    def commit(self, reservation: str, actual: int) -> None:
        with self.lock:
            key, held = self.open.get(reservation, (None, 0))
            if not 0 <= actual <= held:
                # Charging more than was held could take the budget below zero; that is a caller bug.
                raise ValueError(f"commit of {actual} shots on reservation {reservation!r} holding {held}")
            acc, _ = self._close(reservation)
            acc.spent += actual

    def release(self, reservation: str, lost: int = 0) -> None:
        with self.lock:
            key, held = self.open.get(reservation, (None, 0))
            if not 0 <= lost <= held:
                raise ValueError(f"release with {lost} lost shots on reservation {reservation!r} holding {held}")
            acc, _ = self._close(reservation)
            acc.lost += lost

    def remaining(self, key: str) -> int | None:
        with self.lock:
            return self._account(key).remaining

    def account(self, key: str) -> Account:
        """A copy of the key's counters (spent, lost, reserved, budget)."""
        with self.lock:
            acc = self._account(key)
            return Account(acc.budget, acc.spent, acc.lost, acc.reserved)
