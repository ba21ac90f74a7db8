"""Readout-error mitigation for the shot-based Qiskit executors (executor option `readout_mitigation`).

Why mthree (M3, Qiskit's matrix-free measurement mitigation) and not a hand-written inversion of the
assignment matrix: the full matrix is 2^n x 2^n, so inverting it costs 4^n memory and calibrating it 2^n
circuits; M3 calibrates per qubit (the 'balanced' method: a handful of circuits whatever n, 2 x the
calibration shots in all), solves only in the subspace of bitstrings that were observed (directly or by
GMRES), and its `nearest_probability_distribution` is the L2-nearest probability vector to the corrected
quasi-probabilities (Smolin, Gambetta and Smith, PRL 108, 070502), which a plain inverse does not give. It
is kept by IBM's Qiskit team and runs its calibration through the same backend (and, on IBM hardware,
the same Runtime Session or Batch) as the circuits it corrects. mitiq's REM would need the full confusion
matrix, built by us, which is the thing to avoid.
"""

from __future__ import annotations

import time

import numpy as np
import torch

from .backend import Usage

READOUT_MITIGATIONS = ("mthree",)
DEFAULT_CALIBRATION_SHOTS = 10_000  # mthree's own default; the balanced method runs twice that in all


def calibration_size(n_qubits: int, shots: int) -> tuple[int, int]:
    """(circuits, shots in all) of one calibration of n_qubits: mthree's balanced method runs L circuits (L from
    its Hadamard generator for the qubit count) of ceil(2 x shots / L) shots each, in one job."""
    from mthree.generators import HadamardGenerator

    length = HadamardGenerator(n_qubits).length
    return length, length * -(-2 * shots // length)


def check_readout_mitigation(value, calibration_shots=None) -> None:
    """ValueError naming the option and the allowed values for anything but None/'none' or a known method."""
    if value not in (None, "none", *READOUT_MITIGATIONS):
        raise ValueError(
            f"executor option readout_mitigation must be one of {('none', *READOUT_MITIGATIONS)}, got {value!r}"
        )
    if calibration_shots is not None and (
        isinstance(calibration_shots, bool) or not isinstance(calibration_shots, int) or calibration_shots < 1
    ):
        raise ValueError(f"executor option readout_calibration_shots must be a positive int, got {calibration_shots!r}")


def _calibration_timing(device, physical: list[int]):
    """The device's time model (timing.py) for a calibration circuit: an X then a measurement on each
    calibrated qubit, plus the repetition delay per shot; None where the device reports no durations."""
    from qiskit import QuantumCircuit

    from .qiskit_backends import seconds_per_shot
    from .timing import device_timing

    circuit = QuantumCircuit(device.num_qubits, len(physical))
    for c, q in enumerate(physical):
        circuit.x(q)
        circuit.measure(q, c)
    return device_timing(device.name, seconds_per_shot(circuit, device))


class ReadoutMitigator:
    """M3 for one executor: calibrates once, on its first call (an executor's layout is fixed, so one
    calibration serves all its calls), then corrects each call's frequencies.

    system: the backend the calibration circuits run on, the one the executor's circuits run on (for the
    local simulators, the same noisy Aer simulator, seeded from the executor's seed stream).
    qubits: qubits[c] is the system's qubit whose measurement is bit c of the result index (logical qubit c).
    device and physical: the device (None for a simulator, which costs no QPU time) and its physical qubits,
    for the calibration's estimated QPU seconds.
    reports_qpu_s: the calibration jobs report QPU seconds (IBM hardware).
    """

    def __init__(
        self, name: str, system, qubits: list[int], shots: int | None, device=None, physical=None, reports_qpu_s=False
    ):
        import mthree

        self.name, self.qubits = name, list(qubits)
        self.shots = DEFAULT_CALIBRATION_SHOTS if shots is None else shots
        self._mit = mthree.M3Mitigation(system)
        self._timing = None if device is None else _calibration_timing(device, list(physical))
        self._reports_qpu_s = reports_qpu_s
        self.calibration: Usage | None = None  # what the calibration cost, once it ran

    def cost(self) -> tuple[int, float]:
        """(shots, estimated QPU seconds) the calibration will take (calibration_size), known before it runs
        so a ledger can reserve them first; (0, 0.0) once it has run."""
        if self.calibration is not None:
            return 0, 0.0
        circuits, shots = calibration_size(len(self.qubits), self.shots)
        return shots, 0.0 if self._timing is None else self._timing.seconds(circuits, shots)

    def calibrate(self, runtime_mode=None) -> Usage | None:
        """Run the calibration if it has not run yet (in `runtime_mode`, an open Runtime Session or Batch, on
        IBM hardware); its Usage then, None on later calls."""
        if self.calibration is not None:
            return None
        from .qiskit_backends import _reported_seconds

        t0 = time.perf_counter()
        # 'balanced' also on simulators (mthree's default there is 'independent', 2 circuits per qubit at full
        # shots): a fake device should cost what the QPU would.
        jobs = self._mit.cals_from_system(
            self.qubits, shots=self.shots, method="balanced", async_cal=False, runtime_mode=runtime_mode
        )
        circuits = shots = 0
        estimate = None if self._timing is None else 0.0
        for job in jobs:
            counts = job.result().get_counts()
            counts = counts if isinstance(counts, list) else [counts]
            job_shots = sum(sum(c.values()) for c in counts)
            circuits, shots = circuits + len(counts), shots + job_shots
            if self._timing is not None:
                estimate += self._timing.seconds(len(counts), job_shots)
        seconds = [_reported_seconds(job) for job in jobs] if self._reports_qpu_s else []
        self.calibration = Usage(
            self.name,
            circuits=circuits,
            shots=shots,
            wall_s=time.perf_counter() - t0,
            qpu_s=sum(seconds) if seconds and None not in seconds else None,
            qpu_s_estimated=estimate,
            job_ids=[job.job_id() for job in jobs],
        )
        return self.calibration

    def correct(self, freqs: torch.Tensor, shots: int) -> torch.Tensor:
        """Measured frequencies [B, 2^n] (from `shots` shots each) -> mitigated probabilities [B, 2^n], float64,
        each row the probability vector nearest to M3's quasi-probabilities; same bit order as the input."""
        n = len(self.qubits)
        counts = []
        for row in freqs.detach().cpu().numpy():
            seen = np.flatnonzero(row)
            hits = np.rint(row[seen] * shots).astype(np.int64)
            counts.append({format(int(i), f"0{n}b"): int(h) for i, h in zip(seen, hits, strict=True) if h})
        quasi = self._mit.apply_correction(counts, self.qubits)
        out = np.zeros((len(counts), 1 << n))
        for row, dist in zip(out, quasi.nearest_probability_distribution(), strict=True):
            row[[int(k, 2) for k in dist]] = np.fromiter(dist.values(), dtype=np.float64, count=len(dist))
        # M3 works in float32: renormalise in float64 so each row sums to 1 to the last bit
        return torch.from_numpy(out / out.sum(1, keepdims=True))
