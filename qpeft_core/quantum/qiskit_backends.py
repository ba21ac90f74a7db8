"""Qiskit executors: Aer (exact or sampled, optionally with a fake device's noise), IBM Runtime (a real QPU,
or a fake device in local testing mode) and any BackendV2 through BackendSamplerV2.

Each executor renders its ansatz once (transpiled once for a device) and sends all parameter sets of a
call as one job. Shot noise is reproducible: a seeded stream hands every call a fresh simulator seed.
Frequencies come back over the ansatz's logical qubits, little-endian (the `meas` register that
`measure_all` adds follows the logical qubits whatever the layout).
"""

from __future__ import annotations

import functools
import time
import warnings

import numpy as np
import torch

from .ansatz import Ansatz, to_qiskit
from .backend import CircuitCall, ExecutionResult, Executor, Usage, check_qubits
from .mitigation import ReadoutMitigator, check_readout_mitigation
from .timing import QPUTime, device_timing

AER_MAX_QUBITS = 28  # the dense [B, 2^n] result stops being practical well before Aer's own limit
MODES = ("job", "session", "batch")


# ---------------------------------------------------------------- fake devices


@functools.cache
def _fake_backends() -> dict[str, object]:
    """One instance of every fake device, by class name (instances only serve names and qubit counts)."""
    from qiskit_ibm_runtime.fake_provider import FakeProviderForBackendV2

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # FakeNighthawk warns that its numbers are made up
        return {type(b).__name__: b for b in FakeProviderForBackendV2().backends()}


def fake_devices() -> dict[str, int]:
    """Fake IBM devices available offline: class name -> qubit count."""
    return {name: b.configuration().n_qubits for name, b in _fake_backends().items()}


def _find_fake(name: str):
    """The catalogue's instance of a fake device by class name ('FakeManilaV2') or backend name
    ('fake_manila'), any case; None for no such device."""
    key = str(name).strip().lower()
    return next((b for cls_name, b in _fake_backends().items() if key in (cls_name.lower(), b.name.lower())), None)


def fake_device_qubits(name: str) -> int | None:
    """Qubits of a fake device named as fake_device takes; None for no such device."""
    b = _find_fake(name)
    return None if b is None else b.configuration().n_qubits


def ansatz_seconds_per_shot(ansatz: Ansatz, device) -> float | None:
    """seconds_per_shot of the ansatz as transpiled for `device` (seed 0, optimization level 1)."""
    return seconds_per_shot(_transpile(to_qiskit(ansatz, measure=True)[0], device, 0, 1), device)


def fake_device(name: str):
    """A fresh fake device by class name ('FakeManilaV2') or backend name ('fake_manila'), any case."""
    b = _find_fake(name)
    if b is None:
        raise ValueError(f"unknown fake device {name!r}; available fake devices: {', '.join(_fake_backends())}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return type(b)()


# ---------------------------------------------------------------- circuits, noise and timing


def _seeds(seed: int | None) -> np.random.Generator:
    return np.random.default_rng(seed)


def _next_seed(rng: np.random.Generator) -> int:
    return int(rng.integers(2**31 - 1))


def _values(thetas: torch.Tensor) -> np.ndarray:
    return thetas.detach().to("cpu", torch.float64).numpy()


def _binds(theta, values: np.ndarray) -> list[dict]:
    """Aer's parameter_binds for one circuit and B parameter sets (one experiment each)."""
    return [{theta[j]: values[:, j] for j in range(values.shape[1])}]


def _transpile(circuit, device, seed: int | None, optimization_level: int):
    from qiskit.transpiler import generate_preset_pass_manager

    pm = generate_preset_pass_manager(optimization_level=optimization_level, backend=device, seed_transpiler=seed)
    return pm.run(circuit)


def _active_qubits(circuit) -> list[int]:
    return sorted(
        {circuit.find_bit(q).index for inst in circuit.data if inst.operation.name != "barrier" for q in inst.qubits}
    )


def _compact(circuit, qubits: list[int]):
    """The same circuit on only `qubits` (renumbered 0..k-1); classical bits unchanged."""
    from qiskit import QuantumCircuit, QuantumRegister

    index = {q: i for i, q in enumerate(qubits)}
    out = QuantumCircuit(QuantumRegister(len(qubits), "q"), *circuit.cregs, name=circuit.name)
    for inst in circuit.data:
        qs = [index[i] for i in (circuit.find_bit(q).index for q in inst.qubits) if i in index]
        if not qs:
            continue
        cs = [circuit.find_bit(c).index for c in inst.clbits]
        out.append(inst.operation, [out.qubits[i] for i in qs], [out.clbits[i] for i in cs])
    return out


def device_noise_model(device, qubits: list[int], compact: bool = True):
    """The device's basic noise (depolarising + thermal relaxation per gate, readout) on `qubits` only.

    Gate errors come from a sub-target of just those qubits, so a 127-qubit device costs what a 5-qubit
    one does. Readout errors come from the calibration properties where the device has them (they keep
    P(1|0) != P(0|1), which the target's single `error` loses). With compact=True the model acts on
    qubits 0..k-1 (for a compacted circuit), otherwise on the device's own indices.
    """
    from qiskit.circuit import Instruction
    from qiskit.transpiler import Target
    from qiskit_aer.noise import NoiseModel, ReadoutError
    from qiskit_aer.noise.device import basic_device_gate_errors, basic_device_readout_errors, readout_error_values

    target = device.target
    index = {q: i for i, q in enumerate(qubits)}
    props = target.qubit_properties
    sub = Target(num_qubits=len(qubits), dt=target.dt, qubit_properties=[props[q] for q in qubits] if props else None)
    for name in target.operation_names:
        op, inst_props = target.operation_from_name(name), target[name]
        if not isinstance(op, Instruction) or not inst_props:
            continue
        kept = {
            tuple(index[q] for q in qargs): p
            for qargs, p in inst_props.items()
            if qargs is not None and all(q in index for q in qargs)
        }
        if kept:
            sub.add_instruction(op, kept, name=name)
    relabel = (lambda qs: list(qs)) if compact else (lambda qs: [qubits[q] for q in qs])
    model = NoiseModel()
    # Relaxation needs T1/T2, which targets without qubit properties (plain simulators) lack.
    for name, qs, error in basic_device_gate_errors(target=sub, thermal_relaxation=bool(props)):
        model.add_quantum_error(error, name, relabel(qs))
    calibration = device.properties() if callable(getattr(device, "properties", None)) else None
    if calibration is not None:
        values = readout_error_values(calibration)
        readout = [
            ([i], ReadoutError([[1 - values[q][0], values[q][0]], [values[q][1], 1 - values[q][1]]]))
            for i, q in enumerate(qubits)
            if values[q] is not None
        ]
    else:
        readout = basic_device_readout_errors(target=sub)
    for qs, error in readout:
        model.add_readout_error(error, relabel(qs))
    return model


def _noisy_simulator(noise_model, active_qubits: int):
    from qiskit_aer import AerSimulator

    # A density matrix costs 4^n once and then samples every shot for free; Aer's automatic choice runs
    # noisy trajectories shot by shot from 10 qubits on, about twice as slow at 1k shots.
    method = "density_matrix" if active_qubits <= 10 else "automatic"
    return AerSimulator(noise_model=noise_model, method=method)


def _rep_delay(device) -> float:
    try:
        return float(device.configuration().default_rep_delay or 0.0)
    except AttributeError:  # not every BackendV2 has an IBM-style configuration
        return 0.0


def seconds_per_shot(isa_circuit, device) -> float | None:
    """Estimated QPU time of one shot: the critical path of the ISA circuit with the device's gate and
    measurement durations, plus the repetition delay. None where the device reports no durations."""
    target = device.target
    ends = [0.0] * isa_circuit.num_qubits
    for inst in isa_circuit.data:
        qs = tuple(isa_circuit.find_bit(q).index for q in inst.qubits)
        start = max((ends[q] for q in qs), default=0.0)
        name, duration = inst.operation.name, 0.0
        if name != "barrier" and name in target.operation_names:
            p = (target[name] or {}).get(qs)
            duration = (p.duration or 0.0) if p is not None else 0.0
        for q in qs:
            ends[q] = start + duration
    circuit_s = max(ends, default=0.0)
    return circuit_s + _rep_delay(device) if circuit_s > 0 else None


def _count_freqs(counts: list[dict], n: int, shots: int) -> torch.Tensor:
    """Aer hex-keyed counts (one dict per experiment) as [B, 2^n] float64 frequencies."""
    out = np.zeros((len(counts), 1 << n))
    for row, c in zip(out, counts, strict=True):
        row[[int(k, 16) for k in c]] = list(c.values())
    return torch.from_numpy(out / shots)


def _bitarray_freqs(bits, n: int) -> torch.Tensor:
    """A BitArray of shape [B] over n bits as [B, 2^n] float64 frequencies."""
    packed = bits.array.reshape(-1, bits.num_shots, bits.array.shape[-1]).astype(np.int64)
    # Bytes are big-endian: the last one holds bits 0..7.
    idx = (packed << (8 * np.arange(packed.shape[-1] - 1, -1, -1))).sum(-1)
    rows = idx.shape[0]
    flat = (idx + (np.arange(rows)[:, None] << n)).ravel()
    counts = np.bincount(flat, minlength=rows << n).reshape(rows, 1 << n)
    return torch.from_numpy(counts / bits.num_shots)


def _estimate(timing: QPUTime | None, circuits: int, shots: int) -> float | None:
    return None if timing is None else timing.seconds(circuits, shots)


def _measured_qubits(circuit, n: int) -> list[int]:
    """The qubit last measured into each of the circuit's n classical bits, in bit order. (mthree's
    final_measurement_mapping does the same through CircuitInstruction iteration, deprecated since Qiskit 1.2.)"""
    read = {}
    for inst in circuit.data:
        if inst.operation.name == "measure":
            read[circuit.find_bit(inst.clbits[0]).index] = circuit.find_bit(inst.qubits[0]).index
    return [read[c] for c in range(n)]


def _with_calibration(usage: Usage, calibration: Usage | None) -> Usage:
    """A call's Usage with the readout calibration that ran for it, if one did (its shots cost the same)."""
    return usage if calibration is None else usage + calibration


# ---------------------------------------------------------------- executors


class AerSamplerBackend(Executor):
    """Shots on Aer: ideal, or on a device (fake name or BackendV2) with that device's noise restricted to
    the physical qubits the transpiled circuit uses (noise=False keeps the device's layout and basis only).
    readout_mitigation="mthree" corrects the counts (see mitigation.py); its calibration, on the same noisy
    simulator, runs on the first call and is counted in that call's Usage.
    """

    exact = False

    def __init__(
        self,
        ansatz: Ansatz,
        device=None,
        noise: bool = True,
        seed: int | None = 0,
        optimization_level=1,
        readout_mitigation: str | None = None,
        readout_calibration_shots: int | None = None,
    ):
        from qiskit_aer import AerSimulator

        check_readout_mitigation(readout_mitigation, readout_calibration_shots)
        self.ansatz = ansatz
        circuit, self._theta = to_qiskit(ansatz, measure=True)
        noise_model, physical = None, None
        if device is None:
            self.max_qubits, self.name, self.device = AER_MAX_QUBITS, "aer-sampler", None
            check_qubits(ansatz, self.max_qubits, "the Aer simulator")
            self._circuit, self._sim = circuit, AerSimulator()
        else:
            device = fake_device(device) if isinstance(device, str) else device
            self.device, self.max_qubits = device, device.num_qubits
            self.name = f"aer-noisy:{device.name}" if noise else f"aer:{device.name}"
            check_qubits(ansatz, self.max_qubits, f"device {device.name}")
            isa = _transpile(circuit, device, seed, optimization_level)
            physical = _active_qubits(isa)
            self._circuit = _compact(isa, physical)
            noise_model = device_noise_model(device, physical) if noise else None
            self._sim = _noisy_simulator(noise_model, len(physical)) if noise else AerSimulator()
        self._rng = _seeds(seed)
        self._mitigator = None
        if readout_mitigation not in (None, "none"):
            # the circuit runs on qubits 0..k-1 of the simulator; measured[c] is the one read into bit c
            measured = _measured_qubits(self._circuit, ansatz.n_qubits)
            system = _noisy_simulator(noise_model, len(physical)) if noise_model is not None else AerSimulator()
            system.set_options(seed_simulator=_next_seed(self._rng))
            # a simulator: no QPU time, for the calibration as for the circuits
            self._mitigator = ReadoutMitigator(self.name, system, measured, readout_calibration_shots)

    def prepare_cost(self) -> tuple[int, float]:
        return self._mitigator.cost() if self._mitigator is not None else (0, 0.0)

    def prepare(self) -> Usage | None:
        return self._mitigator.calibrate() if self._mitigator is not None else None

    def run(self, call: CircuitCall) -> ExecutionResult:
        thetas, shots, _ = call
        calibration = self._mitigator.calibrate() if self._mitigator is not None else None
        t0 = time.perf_counter()
        values = _values(thetas)
        job = self._sim.run(
            self._circuit,
            shots=shots,
            seed_simulator=_next_seed(self._rng),
            parameter_binds=_binds(self._theta, values),
        )
        result = job.result()
        counts = [result.results[i].data.counts for i in range(len(values))]
        probs = _count_freqs(counts, self.ansatz.n_qubits, shots)
        if self._mitigator is not None:
            probs = self._mitigator.correct(probs, shots)
        usage = Usage(
            self.name,
            circuits=len(values),
            shots=len(values) * shots,
            wall_s=time.perf_counter() - t0,
            job_ids=[job.job_id()],
        )
        return ExecutionResult(probs, _with_calibration(usage, calibration))


class AerStatevectorBackend(Executor):
    """Exact probabilities from Aer's statevector method (all parameter sets in one run); with shots, the
    ideal Aer sampler."""

    exact = True
    max_qubits = AER_MAX_QUBITS

    def __init__(self, ansatz: Ansatz, seed: int | None = 0):
        from qiskit_aer import AerSimulator

        check_qubits(ansatz, self.max_qubits, "the Aer statevector simulator")
        self.ansatz, self.name = ansatz, "aer"
        self._circuit, self._theta = to_qiskit(ansatz)
        self._circuit.save_probabilities()
        self._sim = AerSimulator(method="statevector", precision="double")
        self._sampler = AerSamplerBackend(ansatz, seed=seed)

    def run(self, call: CircuitCall) -> ExecutionResult:
        thetas, shots, _ = call
        if shots is not None:
            probs, usage = self._sampler.run(call)
            usage.backend = self.name
            return ExecutionResult(probs, usage)
        t0 = time.perf_counter()
        values = _values(thetas)
        job = self._sim.run(self._circuit, parameter_binds=_binds(self._theta, values))
        result = job.result()
        probs = np.stack([result.data(i)["probabilities"] for i in range(len(values))])
        usage = Usage(self.name, circuits=len(values), wall_s=time.perf_counter() - t0, job_ids=[job.job_id()])
        return ExecutionResult(torch.from_numpy(probs), usage)


class BackendSamplerV2Backend(Executor):
    """Any Qiskit BackendV2 through `qiskit.primitives.BackendSamplerV2`; the ansatz is transpiled once."""

    exact = False

    def __init__(self, ansatz: Ansatz, backend, seed: int | None = 0, optimization_level=1, simulator_seed=True):
        from qiskit.primitives import BackendSamplerV2

        check_qubits(ansatz, backend.num_qubits, f"backend {backend.name}")
        self.ansatz, self.device, self.max_qubits = ansatz, backend, backend.num_qubits
        self.name = f"qiskit:{backend.name}"
        self._isa = _transpile(to_qiskit(ansatz, measure=True)[0], backend, seed, optimization_level)
        self._sampler = BackendSamplerV2(backend=backend)
        self.qpu_time = device_timing(backend.name, seconds_per_shot(self._isa, backend))
        # Hardware backends may refuse a seed_simulator run option.
        self._rng = _seeds(seed) if simulator_seed else None

    def run(self, call: CircuitCall) -> ExecutionResult:
        thetas, shots, _ = call
        t0 = time.perf_counter()
        values = _values(thetas)
        if self._rng is not None:
            self._sampler.options.seed_simulator = _next_seed(self._rng)
        job = self._sampler.run([(self._isa, values)], shots=shots)
        bits = job.result()[0].data.meas
        usage = Usage(
            self.name,
            circuits=len(values),
            shots=len(values) * bits.num_shots,
            wall_s=time.perf_counter() - t0,
            qpu_s_estimated=_estimate(self.qpu_time, len(values), len(values) * bits.num_shots),
            job_ids=[job.job_id()],
        )
        return ExecutionResult(_bitarray_freqs(bits, self.ansatz.n_qubits), usage)


def ibm_account_configured() -> bool:
    """Whether QiskitRuntimeService() can find credentials (env vars or a saved account); no network."""
    import os

    if os.environ.get("QISKIT_IBM_TOKEN"):
        return True
    from qiskit_ibm_runtime import QiskitRuntimeService

    try:
        return bool(QiskitRuntimeService.saved_accounts())
    except Exception:  # an unreadable account file means no usable account
        return False


def ibm_service(**service_options):
    """QiskitRuntimeService from the saved account or QISKIT_IBM_* env vars; errors never echo secrets."""
    from qiskit_ibm_runtime import QiskitRuntimeService

    try:
        return QiskitRuntimeService(**service_options)
    except Exception as e:
        raise RuntimeError(
            "IBM Quantum needs an account: save one with QiskitRuntimeService.save_account(...) or set "
            f"QISKIT_IBM_TOKEN (and QISKIT_IBM_INSTANCE); the service said: {type(e).__name__}"
        ) from None


class IBMRuntimeBackend(Executor):
    """IBM Runtime's sampler (`qiskit_ibm_runtime.executor_sampler.Sampler`) on a real backend (an
    IBMBackend, or its name via QiskitRuntimeService) or on a fake device (an instance, or a name starting
    with 'fake') in local testing mode.

    mode: 'job' (each call its own job), 'session' or 'batch' (opened on the first call, closed by
    `close()` or on leaving a `with` block). In local mode the fake device is simulated by Aer with its
    noise restricted to the qubits in use (noise=False: ideal), so large fake devices stay fast.
    `sampler_options` go to the Sampler (e.g. dynamical decoupling on hardware).
    """

    exact = False

    def __init__(
        self,
        ansatz: Ansatz,
        backend,
        mode: str = "job",
        seed: int | None = 0,
        optimization_level: int = 1,
        noise: bool = True,
        sampler_options: dict | None = None,
        service_options: dict | None = None,
        readout_mitigation: str | None = None,
        readout_calibration_shots: int | None = None,
    ):
        from qiskit_aer import AerSimulator
        from qiskit_ibm_runtime import IBMBackend

        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        check_readout_mitigation(readout_mitigation, readout_calibration_shots)
        if isinstance(backend, str):
            is_fake = backend.strip().lower().startswith("fake")
            backend = fake_device(backend) if is_fake else ibm_service(**(service_options or {})).backend(backend)
        self.ansatz, self.device, self.mode = ansatz, backend, mode
        self.local = not isinstance(backend, IBMBackend)
        self.max_qubits = backend.num_qubits
        self.name = f"fake-ibm:{backend.name}" if self.local else f"ibm:{backend.name}"
        check_qubits(ansatz, self.max_qubits, f"device {backend.name}")
        self._isa = _transpile(to_qiskit(ansatz, measure=True)[0], backend, seed, optimization_level)
        self.qpu_time = device_timing(backend.name, seconds_per_shot(self._isa, backend))
        self._options = dict(sampler_options or {})
        self._target = backend
        if self.local:
            qubits = _active_qubits(self._isa)
            noise_model = device_noise_model(backend, qubits, compact=False)
            self._target = _noisy_simulator(noise_model, len(qubits)) if noise else AerSimulator()
        self._rng = _seeds(seed)
        self._context = None  # the open Session or Batch
        self._mitigator = None
        if readout_mitigation not in (None, "none"):
            physical = _measured_qubits(self._isa, ansatz.n_qubits)
            if self.local:
                # calibrated on the same noise, restricted to the qubits in use and compacted to 0..k-1 (the
                # device's own indices can exceed what a local simulator holds)
                system = _noisy_simulator(device_noise_model(backend, qubits), len(qubits)) if noise else AerSimulator()
                system.set_options(seed_simulator=_next_seed(self._rng))
                measured = [qubits.index(q) for q in physical]
            else:
                system, measured = backend, physical
            self._mitigator = ReadoutMitigator(
                self.name, system, measured, readout_calibration_shots, backend, physical, reports_qpu_s=not self.local
            )

    def _mode(self):
        from qiskit_ibm_runtime import Batch, Session

        if self.mode == "job":
            return self._target
        if self._context is None:
            self._context = (Session if self.mode == "session" else Batch)(backend=self._target)
        return self._context

    @property
    def session(self):
        """The open Session or Batch; None in job mode or once closed."""
        return self._context

    def close(self):
        if self._context is not None:
            self._context.close()
            self._context = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _sampler(self):
        from qiskit_ibm_runtime.executor_sampler import Sampler

        sampler = Sampler(mode=self._mode(), options=self._options)
        if self.local:
            sampler.options.simulator.seed_simulator = _next_seed(self._rng)
            # The local simulator rounds angles to 5 decimals by default, which would bias gradients.
            sampler.options.simulator.angle_decimals = 12
        return sampler

    def prepare_cost(self) -> tuple[int, float]:
        return self._mitigator.cost() if self._mitigator is not None else (0, 0.0)

    def prepare(self) -> Usage | None:
        if self._mitigator is None:
            return None
        return self._mitigator.calibrate(None if self.mode == "job" or self.local else self._mode())

    def run(self, call: CircuitCall) -> ExecutionResult:
        thetas, shots, _ = call
        calibration = self.prepare()
        t0 = time.perf_counter()
        values = _values(thetas)
        job = self._sampler().run([(self._isa, values)], shots=shots)
        bits = job.result()[0].data.meas
        total = len(values) * bits.num_shots
        probs = _bitarray_freqs(bits, self.ansatz.n_qubits)
        if self._mitigator is not None:
            probs = self._mitigator.correct(probs, bits.num_shots)
        usage = Usage(
            self.name,
            circuits=len(values),
            shots=total,
            wall_s=time.perf_counter() - t0,
            qpu_s=None if self.local else _reported_seconds(job),
            qpu_s_estimated=_estimate(self.qpu_time, len(values), total),
            job_ids=[job.job_id()],
        )
        return ExecutionResult(probs, _with_calibration(usage, calibration))


def dry_run_timing(backend: IBMRuntimeBackend, circuits: int, shots: int) -> QPUTime | None:
    """The time model fitted to IBM's own estimate: two dry runs (Sampler.run(dry_run=True), qiskit-ibm-runtime
    >= 0.50; nothing executes on the QPU) of 1 and `circuits` parameter sets at `shots`, whose estimated quantum
    seconds give the fixed time per job and the time per shot. None where the service offers no dry run or no
    estimate (local mode, older plans): the caller keeps the device model of timing.py."""
    if backend.local or circuits < 2:
        return None
    times = []
    for n in (1, circuits):
        values = np.zeros((n, backend.ansatz.n_params))
        try:
            job = backend._sampler().run([(backend._isa, values)], shots=shots, dry_run=True)
            seconds = (job.usage_estimation or {}).get("quantum_seconds")
        except Exception:  # an estimate is a nicety: a service that cannot give one must not fail the forecast
            return None
        if seconds is None:
            return None
        times.append(float(seconds))
    per_shot = (times[1] - times[0]) / ((circuits - 1) * shots)
    if per_shot <= 0:
        return None
    return QPUTime(per_shot_s=per_shot, per_circuit_s=0.0, per_job_s=max(0.0, times[0] - shots * per_shot))


def _reported_seconds(job) -> float | None:
    try:
        return float(job.usage())
    except Exception:  # usage is bookkeeping: a missing metric must not lose the results
        return None
