"""The executor protocol: the one seam between training code and wherever circuits run.

Every executor is bound to one ansatz and answers a `CircuitCall` (parameter sets [B, P] and shots) with
the probabilities of all 2^n basis states (qubit q = bit q of the index, see ansatz.py) and a `Usage`
record of what the call cost. Swapping a real QPU for a simulator means swapping the executor, nothing
else.

As with a Qiskit primitive's PUB, a call is checked once where it enters (`check_call`, done by
`Executor.probabilities` and by the gradient strategies) and then trusted by every layer below it:
`run(call)` of a pool, a remote handle, a worker and the executor itself never checks it again.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import NamedTuple, Protocol, runtime_checkable

import torch

from . import simulator
from .ansatz import Ansatz


@dataclass
class Usage:
    """What one call (or, summed, many calls) cost."""

    backend: str
    circuits: int = 0  # parameter sets executed (one circuit each)
    shots: int = 0  # circuits x shots for shot-based calls, 0 for exact ones
    wall_s: float = 0.0
    qpu_s: float | None = None  # as reported by the provider (IBM usage); None where nothing reports it
    qpu_s_estimated: float | None = None  # from the device's timing, where known
    job_ids: list[str] = field(default_factory=list)

    def __add__(self, other: Usage) -> Usage:
        def opt_sum(a, b):
            return None if a is None and b is None else (a or 0.0) + (b or 0.0)

        return Usage(
            backend=self.backend if self.backend == other.backend else f"{self.backend}+{other.backend}",
            circuits=self.circuits + other.circuits,
            shots=self.shots + other.shots,
            wall_s=self.wall_s + other.wall_s,
            qpu_s=opt_sum(self.qpu_s, other.qpu_s),
            qpu_s_estimated=opt_sum(self.qpu_s_estimated, other.qpu_s_estimated),
            job_ids=self.job_ids + other.job_ids,
        )


class ExecutionRefused(RuntimeError):
    """An executor declined a call it could not pay for (a budget); a training loop stops cleanly at it,
    keeping its last checkpoint."""


class CircuitCall(NamedTuple):
    """One unit of work for an executor: B parameter sets of its ansatz, each run once (shots=None: exact
    probabilities) or sampled `shots` times. Build it with `check_call`; below that, it is trusted."""

    thetas: torch.Tensor  # [B, P]
    shots: int | None
    tag: str = ""  # what the call is for ("forward", "gradient"), for accounting; executors ignore it

    @property
    def circuits(self) -> int:
        return self.thetas.shape[0]

    @property
    def total_shots(self) -> int:
        return self.circuits * (self.shots or 0)

    def split(self, n: int) -> list[CircuitCall]:
        """n contiguous shares (copies: a view would ship the whole storage to another process)."""
        return [CircuitCall(t.clone(), self.shots, self.tag) for t in torch.tensor_split(self.thetas, n)]


class ExecutionResult(NamedTuple):
    probs: torch.Tensor  # [B, 2^n], float64 for shot counts, the input dtype for exact simulation
    usage: Usage


@runtime_checkable
class QuantumBackend(Protocol):
    """Runs one ansatz for many parameter sets per call."""

    ansatz: Ansatz
    name: str
    exact: bool  # True when shots=None gives exact probabilities
    max_qubits: int | None

    def run(self, call: CircuitCall) -> ExecutionResult: ...

    def probabilities(self, thetas: torch.Tensor, shots: int | None = None) -> ExecutionResult: ...


class Executor:
    """Base of the executors: `probabilities(thetas, shots)` checks the call once and hands it to `run`.
    `qpu_time` (timing.QPUTime) is set by executors whose calls a provider bills by QPU time."""

    qpu_time = None

    def run(self, call: CircuitCall) -> ExecutionResult:
        raise NotImplementedError

    def prepare_cost(self) -> tuple[int, float]:
        """(shots, estimated QPU seconds) of one-time work still to do before the first call (a readout
        calibration), so a ledger can reserve it; (0, 0.0) when there is none (left)."""
        return 0, 0.0

    def prepare(self) -> Usage | None:
        """Do that work now (else the first call does it); what it cost, or None if there was nothing to do."""
        return None

    def probabilities(self, thetas, shots: int | None = None) -> ExecutionResult:
        return self.run(check_call(self, thetas, shots))


def check_call(backend: QuantumBackend, thetas, shots, tag: str = "") -> CircuitCall:
    """Validate the arguments every executor takes, as a CircuitCall with thetas [B, P]."""
    if isinstance(thetas, CircuitCall):
        raise TypeError("check_call takes thetas and shots; a CircuitCall is already checked: pass it to run()")
    a = backend.ansatz
    if not torch.is_tensor(thetas):
        thetas = torch.as_tensor(thetas, dtype=torch.float64)
    if thetas.dim() == 1:
        thetas = thetas.unsqueeze(0)
    if thetas.dim() != 2 or thetas.shape[1] != a.n_params:
        raise ValueError(
            f"thetas must have shape [B, {a.n_params}] (the {a.family} ansatz on {a.n_qubits} qubits "
            f"has {a.n_params} angles), got {tuple(thetas.shape)}"
        )
    if shots is not None and (isinstance(shots, bool) or not isinstance(shots, int) or shots <= 0):
        raise ValueError(f"shots must be a positive int or None (exact), got {shots!r}")
    if shots is None and not backend.exact:
        raise ValueError(f"shots=None asks for exact probabilities, which {backend.name} cannot give")
    return CircuitCall(thetas, shots, tag)


def check_qubits(ansatz: Ansatz, max_qubits: int | None, where: str):
    if max_qubits is not None and ansatz.n_qubits > max_qubits:
        raise ValueError(
            f"the ansatz needs {ansatz.n_qubits} qubits but {where} has {max_qubits}: "
            "use fewer qubits (a larger n_mlp) or a larger device"
        )


def sample_counts(probs: torch.Tensor, shots: int, generator: torch.Generator) -> torch.Tensor:
    """Multinomial estimate of `probs` [B, 2^n] from `shots` samples per row, as frequencies."""
    p = probs.detach().to(torch.float64).clamp_min(0)
    idx = torch.multinomial(p, shots, replacement=True, generator=generator)
    counts = torch.zeros_like(p).scatter_add_(1, idx, torch.ones_like(idx, dtype=p.dtype))
    return counts / shots


class TorchBackend(Executor):
    """Exact statevector simulation with the fast torch simulator; with shots, sampled (seeded).

    `device` and `dtype` pick where and in what precision it simulates (CPU or CUDA, float32/float64).
    """

    exact = True
    max_qubits = 30

    def __init__(self, ansatz: Ansatz, device: str | torch.device = "cpu", dtype=torch.float32, seed=0):
        check_qubits(ansatz, self.max_qubits, "the torch simulator")
        self.ansatz, self.device, self.dtype = ansatz, torch.device(device), dtype
        self.name = "exact"
        self.generator = torch.Generator(device="cpu").manual_seed(seed)

    def exact_probabilities(self, thetas: torch.Tensor) -> torch.Tensor:
        """Differentiable exact probabilities (autograd through the adjoint simulator)."""
        return simulator.probabilities(self.ansatz, thetas.to(self.device, self.dtype))

    def run(self, call: CircuitCall) -> ExecutionResult:
        thetas, shots, _ = call
        t0 = time.perf_counter()
        with torch.no_grad():
            probs = self.exact_probabilities(thetas)
        if shots is not None:
            probs = sample_counts(probs.cpu(), shots, self.generator).to(self.device)
        usage = Usage(
            self.name,
            circuits=thetas.shape[0],
            shots=0 if shots is None else shots * thetas.shape[0],
            wall_s=time.perf_counter() - t0,
        )
        return ExecutionResult(probs, usage)
