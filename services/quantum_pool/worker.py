"""A quantum worker: one Ray actor holding one executor, placed on the custom resource `qpu`.

The executor is built inside the actor from (spec, ansatz, options), so only a short spec string and
the small ansatz description cross the wire, never a simulator or a Runtime session.
"""

from __future__ import annotations

import os

import ray

from qpeft_core.quantum.backend import CircuitCall
from qpeft_core.quantum.registry import make_backend


def build_executor(spec, ansatz, options: dict | None = None):
    """`spec` is a registry string ("exact", "aer", "aer-noisy:<fake>", "fake-ibm:<fake>", "ibm:<name>") or a
    callable `spec(ansatz, **options)` returning an executor (for wrappers such as simulated latency)."""
    if callable(spec):
        return spec(ansatz, **(options or {}))
    return make_backend(spec, ansatz, **(options or {}))


class QuantumWorker:
    def __init__(self, spec, ansatz, options: dict | None = None):
        self.executor = build_executor(spec, ansatz, options)

    def info(self) -> dict:
        e = self.executor
        timing = getattr(e, "qpu_time", None)
        return {"name": e.name, "exact": e.exact, "max_qubits": e.max_qubits, "pid": os.getpid(), "qpu_time": timing}

    def prepare_cost(self) -> tuple[int, float]:
        return self.executor.prepare_cost() if hasattr(self.executor, "prepare_cost") else (0, 0.0)

    def prepare(self):
        return self.executor.prepare() if hasattr(self.executor, "prepare") else None

    def run(self, call: CircuitCall):
        probs, usage = self.executor.run(call)  # checked where it entered: not here again
        return probs, usage


def remote_worker(resources: dict[str, float], num_cpus: float, max_restarts: int):
    # max_task_retries=0: the pool, not Ray, retries a failed share, so it can charge the lost shots.
    return ray.remote(QuantumWorker).options(
        resources=resources, num_cpus=num_cpus, max_restarts=max_restarts, max_task_retries=0
    )
