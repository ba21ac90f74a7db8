"""One description of a parameterised circuit, rendered both as a torch simulation and as Qiskit.

Bit order (the one convention used everywhere in qpeft): qubit q is bit q of the basis-state index,
i = sum_q b_q 2**q. This is Qiskit's little-endian order, so `probs[i]` here equals
`Statevector(circuit).probabilities()[i]` and the Qiskit count key for i is `format(i, f"0{n}b")`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

GateName = Literal["ry", "cx", "cz"]
PARAMETRIC = {"ry"}


@dataclass(frozen=True)
class Gate:
    name: GateName
    wires: tuple[int, ...]
    param: int | None = None  # index into the angle vector, for parametric gates


@dataclass(frozen=True)
class Ansatz:
    """A circuit on `n_qubits` qubits starting from |0..0>, with `n_params` angles.

    `blocks` groups the gates the simulator may fuse: each block is a layer of single-qubit rotations
    on distinct wires followed by entangling gates; the grouping never changes the circuit's meaning.
    """

    n_qubits: int
    n_params: int
    blocks: tuple[tuple[Gate, ...], ...]
    family: str = "custom"
    meta: dict = field(default_factory=dict, compare=False, hash=False)

    def __post_init__(self):
        if self.n_qubits < 1:
            raise ValueError(f"n_qubits must be >= 1, got {self.n_qubits}")
        used = [g.param for g in self.gates if g.param is not None]
        if sorted(used) != list(range(self.n_params)):
            # Parameter-shift and the adjoint gradient rely on every angle driving exactly one gate.
            raise ValueError("each angle index 0..n_params-1 must be used by exactly one gate")
        for g in self.gates:
            if any(not 0 <= w < self.n_qubits for w in g.wires) or len(set(g.wires)) != len(g.wires):
                raise ValueError(f"gate {g} has wires outside 0..{self.n_qubits - 1} or repeated")
            if (g.name in PARAMETRIC) != (g.param is not None):
                raise ValueError(f"gate {g}: parametric gates need a param index, others must not have one")

    @property
    def gates(self) -> list[Gate]:
        return [g for block in self.blocks for g in block]

    @property
    def dim(self) -> int:
        return 1 << self.n_qubits


def _ry_layer(wires, first_param):
    return [Gate("ry", (w,), first_param + k) for k, w in enumerate(wires)]


def qpa_ansatz(n_qubits: int, layers: int, entangler: Literal["ladder", "ring"] = "ladder") -> Ansatz:
    """QPA's QNN: `layers` blocks of [RY on every qubit, CNOT ladder 0->1 ... n-2->n-1 (+ n-1->0 for ring)]."""
    if layers < 1:
        raise ValueError(f"layers must be >= 1, got {layers}")
    if entangler not in ("ladder", "ring"):
        raise ValueError(f"entangler must be 'ladder' or 'ring', got {entangler!r}")
    blocks = []
    for layer in range(layers):
        gates = _ry_layer(range(n_qubits), layer * n_qubits)
        gates += [Gate("cx", (q, q + 1)) for q in range(n_qubits - 1)]
        if entangler == "ring" and n_qubits > 2:
            gates.append(Gate("cx", (n_qubits - 1, 0)))
        blocks.append(tuple(gates))
    return Ansatz(n_qubits, n_qubits * layers, tuple(blocks), family=f"qpa-{entangler}")


def pauli_ansatz(n_qubits: int, layers: int) -> Ansatz:
    """Quantum-PEFT's real Pauli circuit: RY on all wires, then `layers` times
    [RY on 0..n-2, CZ on (0,1),(2,3)..., RY on 1..n-1, CZ on (1,2),(3,4)...]; (2L+1)n - 2L angles."""
    if layers < 0:
        raise ValueError(f"layers must be >= 0, got {layers}")
    n = n_qubits
    blocks = [tuple(_ry_layer(range(n), 0))]
    p = n
    for _ in range(layers):
        if n == 1:
            break
        first = _ry_layer(range(n - 1), p)
        p += n - 1
        first += [Gate("cz", (q, q + 1)) for q in range(0, n - 1, 2)]
        second = _ry_layer(range(1, n), p)
        p += n - 1
        second += [Gate("cz", (q, q + 1)) for q in range(1, n - 1, 2)]
        blocks += [tuple(first), tuple(second)]
    return Ansatz(n, p, tuple(blocks), family="pauli")


def to_qiskit(ansatz: Ansatz, measure: bool = False):
    """Render as a `QuantumCircuit` whose parameters are one `ParameterVector('theta', n_params)`."""
    from qiskit import QuantumCircuit
    from qiskit.circuit import ParameterVector

    theta = ParameterVector("theta", ansatz.n_params)
    qc = QuantumCircuit(ansatz.n_qubits, name=ansatz.family)
    for g in ansatz.gates:
        if g.name == "ry":
            qc.ry(theta[g.param], g.wires[0])
        elif g.name == "cx":
            qc.cx(*g.wires)
        elif g.name == "cz":
            qc.cz(*g.wires)
        else:  # pragma: no cover - Gate's Literal type makes this unreachable
            raise ValueError(f"unknown gate {g.name}")
    if measure:
        qc.measure_all()
    return qc, theta
