"""A new executor kind registered from outside qpeft_core, the way another vendor's Qiskit BackendV2 would be
added: one `register_executor` call, in a module that QPEFT_EXECUTOR_PLUGINS names (tests/test_executor_plugin.py).

TEST ONLY, NOT A DEVICE: `DummyQPU` is the exact simulator sampled with shots under a vendor-like name, with
a made-up time per shot, so the test can see that the JobSpec, the forecast, /v1/backends, the quantum pool
and its workers all take the kind from the registry.
"""

from __future__ import annotations

from qpeft_core.quantum.backend import CircuitCall, ExecutionResult, Executor, TorchBackend
from qpeft_core.quantum.registry import ExecutorKind, register_executor
from qpeft_core.quantum.timing import QPUTime

TIMING = QPUTime(per_shot_s=2e-4, per_job_s=0.5)  # made up: what the forecast and the ledger charge
QUBITS = 8


class DummyQPU(Executor):
    exact = False  # samples only: a job must set shots
    max_qubits = QUBITS
    qpu_time = TIMING

    def __init__(self, ansatz, device: str, seed: int = 0):
        self.inner = TorchBackend(ansatz, seed=seed)
        self.ansatz, self.name = ansatz, f"dummy:{device}"

    def run(self, call: CircuitCall) -> ExecutionResult:
        probs, usage = self.inner.run(call)
        usage.backend, usage.qpu_s_estimated = self.name, TIMING.seconds(usage.circuits, usage.shots)
        return ExecutionResult(probs, usage)


register_executor(
    ExecutorKind(
        "dummy",
        "<device>",
        build=lambda ansatz, arg, **options: DummyQPU(ansatz, arg, **options),
        needs_shots=True,
        qubits=lambda arg: QUBITS,
        qpu_time=lambda arg, ansatz: TIMING,
        one_device=True,
        listing=lambda: [{"spec": "dummy:one", "kind": "dummy", "qubits": QUBITS, "exact": False}],
    )
)
