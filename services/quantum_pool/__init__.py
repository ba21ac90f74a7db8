"""Quantum worker pool on Ray: actors on the custom resource "qpu", each holding one executor."""

from .pool import PoolError, QuantumPool

__all__ = ["PoolError", "QuantumPool"]
