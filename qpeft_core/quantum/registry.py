"""Executors by name: one spec string picks where the circuits run, and this file is where each kind is known.

exact                    the torch statevector simulator (options: device, dtype, seed)
aer                      Aer statevector, exact; shots allowed (option: seed)
aer-noisy:<fake device>  Aer sampler with the fake device's noise (options: noise, seed, optimization_level)
ibm:<backend name>       a real IBM QPU through IBM Runtime; needs an account (options: mode, ...)
fake-ibm:<fake device>   IBM Runtime in local testing mode on a fake device (options: mode, noise, ...)

The last three also take readout_mitigation ("mthree"; default off) and readout_calibration_shots
(mitigation.py); `check_executor_options` refuses those for the kinds that have no readout error.

`ExecutorSpec.parse(text)` is what the JobSpec, the quantum pool and the forecast read: whether the kind
needs shots, which worker group runs it, how many qubits it has, its billed QPU time (timing.QPUTime),
whether it is one device (calls sent whole), and how to build it.
Adding a kind (another vendor's Qiskit BackendV2, say) is one `register_executor(ExecutorKind(...))` call,
in this file or in a module named in QPEFT_EXECUTOR_PLUGINS (imported on first lookup, in every process
that parses a spec: the control plane, the trainer and each quantum worker).
"""

from __future__ import annotations

import functools
import importlib
import logging
import os
import re
from collections.abc import Callable
from dataclasses import dataclass

from .ansatz import Ansatz
from .backend import QuantumBackend, TorchBackend
from .mitigation import READOUT_MITIGATIONS, check_readout_mitigation
from .timing import QPUTime, device_timing

log = logging.getLogger(__name__)

PLUGINS_ENV = "QPEFT_EXECUTOR_PLUGINS"  # comma-separated modules that call register_executor on import
IBM_BACKEND_NAME = re.compile(r"[a-z][a-z0-9_]{0,63}")  # IBM's device names: ibm_torino, ibmq_kolkata


@dataclass(frozen=True)
class ExecutorKind:
    """One kind of executor. `build(ansatz, arg, **options)` makes it; `check(arg)` raises ValueError for an
    argument this kind cannot take (no network); `qubits(arg)` and `qpu_time(arg, ansatz)` may answer None
    (unknown here) and raise RuntimeError when they need an account that is not configured."""

    prefix: str  # "aer-noisy"; the spec is the prefix, or "prefix:arg" when `arg` names the argument
    arg: str | None  # what follows the colon, e.g. "<fake device>"; None: the spec is the bare prefix
    build: Callable[..., QuantumBackend]
    needs_shots: bool  # only samples: a job must set shots
    worker_group: str = "qpu_aer"  # the Ray resource of the nodes that may run it (deploy/)
    differentiable: bool = False  # autograd can differentiate it in the trainer's own process
    check: Callable[[str], None] | None = None
    qubits: Callable[[str], int | None] | None = None
    qpu_time: Callable[[str, Ansatz], QPUTime | None] | None = None  # the billed time model (timing.py)
    # one device that runs jobs one after another: the pool sends its calls whole, since splitting them over
    # workers would add a job's fixed cost per share and gain no parallelism
    one_device: bool = False
    listing: Callable[[], list[dict]] | None = None  # the specs of this kind available here
    readout_mitigation: bool = False  # takes the readout_mitigation option (counts with readout error)

    @property
    def form(self) -> str:
        return self.prefix if self.arg is None else f"{self.prefix}:{self.arg}"


KINDS: dict[str, ExecutorKind] = {}


def register_executor(kind: ExecutorKind) -> None:
    KINDS[kind.prefix] = kind


def spec_forms() -> list[str]:
    _load_plugins(os.environ.get(PLUGINS_ENV, ""))
    return [k.form for k in KINDS.values()]


@functools.cache
def _load_plugins(names: str) -> None:
    for name in filter(None, (n.strip() for n in names.split(","))):
        importlib.import_module(name)


class ExecutorSpecError(ValueError):
    """A spec no registered kind takes. str() names the spec (for library users); `reason` does not repeat
    it (for an API, whose errors never echo input)."""

    def __init__(self, text: str, reason: str, detail: str = ""):
        super().__init__(f"executor {text!r}: {reason}{detail}")
        self.reason = reason


@dataclass(frozen=True)
class ExecutorSpec:
    """A parsed executor spec string: its kind and argument."""

    kind: ExecutorKind
    arg: str = ""

    @classmethod
    def parse(cls, text: str) -> ExecutorSpec:
        """ValueError naming the spec and the forms allowed, for a spec no registered kind takes."""
        _load_plugins(os.environ.get(PLUGINS_ENV, ""))
        prefix, sep, arg = str(text).partition(":")
        kind, arg = KINDS.get(prefix.strip()), arg.strip()
        if kind is None or (kind.arg is None and sep) or (kind.arg is not None and not sep):
            devices = f"; fake devices: {', '.join(_qb().fake_devices())}"
            raise ExecutorSpecError(text, f"unknown backend spec; use one of {', '.join(spec_forms())}", devices)
        if kind.arg is not None:
            try:
                if kind.check is not None:
                    kind.check(arg)
                elif not arg:
                    raise ValueError(f"name the {kind.arg}")
            except ValueError as e:
                raise ExecutorSpecError(text, str(e)) from None
        return cls(kind, arg)

    @property
    def text(self) -> str:
        return self.kind.prefix if self.kind.arg is None else f"{self.kind.prefix}:{self.arg}"

    @property
    def needs_shots(self) -> bool:
        return self.kind.needs_shots

    @property
    def worker_group(self) -> str:
        return self.kind.worker_group

    @property
    def differentiable(self) -> bool:
        return self.kind.differentiable

    def qubits(self) -> int | None:
        return self.kind.qubits(self.arg) if self.kind.qubits else None

    def qpu_time(self, ansatz: Ansatz) -> QPUTime | None:
        return self.kind.qpu_time(self.arg, ansatz) if self.kind.qpu_time else None

    @property
    def one_device(self) -> bool:
        return self.kind.one_device

    def build(self, ansatz: Ansatz, **options) -> QuantumBackend:
        return self.kind.build(ansatz, self.arg, **options)


READOUT_OPTIONS = ("readout_mitigation", "readout_calibration_shots")


def check_executor_options(spec: str, options: dict) -> None:
    """ValueError, naming the option, for readout-mitigation options the executor cannot take or values it does
    not know. Other options are the executor constructor's to check; a spec is parsed only when readout
    options are given (parsing a fake device's spec imports Qiskit)."""
    given = [k for k in READOUT_OPTIONS if k in options]
    if not given:
        return
    parsed = ExecutorSpec.parse(spec)
    if not parsed.kind.readout_mitigation:
        takers = ", ".join(k.form for k in KINDS.values() if k.readout_mitigation)
        raise ValueError(
            f"{', '.join(given)} given, but executor {parsed.text!r} has no readout error to mitigate; "
            f"readout_mitigation ({', '.join(READOUT_MITIGATIONS)}) is for the shot-based devices: {takers}"
        )
    check_readout_mitigation(options.get("readout_mitigation"), options.get("readout_calibration_shots"))


def make_backend(spec: str, ansatz: Ansatz, **options) -> QuantumBackend:
    return ExecutorSpec.parse(spec).build(ansatz, **options)


def available_backends(include_ibm: bool = True) -> list[dict]:
    """Every spec make_backend accepts here, with qubit counts. Real IBM devices are listed only when an
    account is configured (that lookup needs the network); otherwise nothing leaves the machine."""
    _load_plugins(os.environ.get(PLUGINS_ENV, ""))
    out = []
    for kind in KINDS.values():
        if kind.listing is None or (kind.prefix == "ibm" and not include_ibm):
            continue
        try:
            out += kind.listing()
        except Exception as e:  # an unreachable cloud must not hide the local executors
            log.warning("could not list %s executors (%s)", kind.prefix, type(e).__name__)
    return out


# --- the built-in kinds. Qiskit takes ~1.5 s to import: only the Qiskit executors pay for it. ---------------
def _qb():
    from . import qiskit_backends

    return qiskit_backends


def _fake(arg: str):
    try:
        return _qb().fake_device(arg)
    except ValueError as e:
        raise ValueError(f"{e} (GET /v1/backends lists every executor)") from None


def _check_fake(arg: str) -> None:
    if _qb().fake_device_qubits(arg) is None:
        raise ValueError(
            f"unknown fake device; use one of {', '.join(sorted(_qb().fake_devices()))} "
            "(GET /v1/backends lists every executor)"
        )


def _check_ibm(arg: str) -> None:
    if not IBM_BACKEND_NAME.fullmatch(arg):
        raise ValueError("not an IBM backend name (like ibm_torino); GET /v1/backends lists the executors")


def _ibm_device(arg: str):
    return _qb().ibm_service().backend(arg)


def _device_time(device, ansatz: Ansatz) -> QPUTime | None:
    if ansatz.n_qubits > device.num_qubits:
        raise ValueError(f"the QNN needs {ansatz.n_qubits} qubits; {device.name} has {device.num_qubits}")
    return device_timing(device.name, _qb().ansatz_seconds_per_shot(ansatz, device))


def _ibm_time(arg: str, ansatz: Ansatz) -> QPUTime | None:
    """IBM's own estimate where the service gives one (two dry runs, nothing executed), else the device's
    model from its timings (timing.py). The dry runs are sized as a QPA gradient call: 2P circuits, 1,024 shots."""
    device = _ibm_device(arg)
    model = _device_time(device, ansatz)
    fitted = _qb().dry_run_timing(_qb().IBMRuntimeBackend(ansatz, device), 2 * ansatz.n_params, 1024)
    return fitted or model


def _listing(prefix: str, kind: str):
    def listing() -> list[dict]:
        if prefix == "ibm":
            qb = _qb()
            if not qb.ibm_account_configured():
                return []
            return [
                {"spec": f"ibm:{b.name}", "kind": "ibm", "qubits": b.num_qubits, "exact": False}
                for b in qb.ibm_service().backends()
            ]
        return [
            {"spec": f"{prefix}:{name}", "kind": kind, "qubits": qubits, "exact": False}
            for name, qubits in _qb().fake_devices().items()
        ]

    return listing


register_executor(
    ExecutorKind(
        "exact",
        None,
        build=lambda ansatz, _arg, **options: TorchBackend(ansatz, **options),
        needs_shots=False,
        differentiable=True,
        qubits=lambda _arg: TorchBackend.max_qubits,
        listing=lambda: [{"spec": "exact", "kind": "simulator", "qubits": TorchBackend.max_qubits, "exact": True}],
    )
)
register_executor(
    ExecutorKind(
        "aer",
        None,
        build=lambda ansatz, _arg, **options: _qb().AerStatevectorBackend(ansatz, **options),
        needs_shots=False,
        qubits=lambda _arg: _qb().AER_MAX_QUBITS,
        listing=lambda: [{"spec": "aer", "kind": "simulator", "qubits": _qb().AER_MAX_QUBITS, "exact": True}],
    )
)
register_executor(
    ExecutorKind(
        "aer-noisy",
        "<fake device>",
        build=lambda ansatz, arg, **options: _qb().AerSamplerBackend(ansatz, _fake(arg), **options),
        needs_shots=True,
        check=_check_fake,
        qubits=lambda arg: _qb().fake_device_qubits(arg),
        listing=_listing("aer-noisy", "fake"),
        readout_mitigation=True,
    )
)
register_executor(
    ExecutorKind(
        "fake-ibm",
        "<fake device>",
        build=lambda ansatz, arg, **options: _qb().IBMRuntimeBackend(ansatz, _fake(arg), **options),
        needs_shots=True,
        check=_check_fake,
        qubits=lambda arg: _qb().fake_device_qubits(arg),
        qpu_time=lambda arg, ansatz: _device_time(_fake(arg), ansatz),
        one_device=True,
        listing=_listing("fake-ibm", "fake"),
        readout_mitigation=True,
    )
)
register_executor(
    ExecutorKind(
        "ibm",
        "<backend name>",
        build=lambda ansatz, arg, **options: _qb().IBMRuntimeBackend(ansatz, arg, **options),
        needs_shots=True,
        worker_group="qpu_ibm",
        check=_check_ibm,
        qpu_time=lambda arg, ansatz: _ibm_time(arg, ansatz),
        one_device=True,
        listing=_listing("ibm", "ibm"),
        readout_mitigation=True,
    )
)
