"""Quantum worker pool on Ray: actors on the custom resource "qpu", each holding one executor."""

from .ledger import BudgetExhausted, InMemoryLedger, ShotLedger
from .pool import PoolError, QuantumPool

__all__ = ["BudgetExhausted", "InMemoryLedger", "PoolError", "QuantumPool", "ShotLedger"]
