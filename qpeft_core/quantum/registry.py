"""Executors by name: one spec string picks where the circuits run.

exact                    the torch statevector simulator (options: device, dtype, seed)
aer                      Aer statevector, exact; shots allowed (option: seed)
aer-noisy:<fake device>  Aer sampler with the fake device's noise (options: noise, seed, optimization_level)
ibm:<backend name>       a real IBM QPU through IBM Runtime; needs an account (options: mode, ...)
fake-ibm:<fake device>   IBM Runtime in local testing mode on a fake device (options: mode, noise, ...)
"""

from __future__ import annotations

import logging

from .ansatz import Ansatz
from .backend import QuantumBackend, TorchBackend

log = logging.getLogger(__name__)

SPEC_FORMS = ("exact", "aer", "aer-noisy:<fake device>", "ibm:<backend name>", "fake-ibm:<fake device>")


def make_backend(spec: str, ansatz: Ansatz, **options) -> QuantumBackend:
    if spec == "exact":
        return TorchBackend(ansatz, **options)
    # Qiskit takes ~1.5 s to import: only the Qiskit executors pay for it.
    from . import qiskit_backends as qb

    kind, _, arg = str(spec).partition(":")
    arg = arg.strip()
    if spec == "aer":
        return qb.AerStatevectorBackend(ansatz, **options)
    if kind == "ibm" and arg:
        return qb.IBMRuntimeBackend(ansatz, arg, **options)
    if kind in ("aer-noisy", "fake-ibm") and arg:
        try:
            device = qb.fake_device(arg)
        except ValueError as e:
            raise ValueError(f"backend spec {spec!r}: {e}") from None
        if kind == "aer-noisy":
            return qb.AerSamplerBackend(ansatz, device, **options)
        return qb.IBMRuntimeBackend(ansatz, device, **options)
    raise ValueError(
        f"unknown backend spec {spec!r}; allowed forms: {', '.join(SPEC_FORMS)}; "
        f"fake devices: {', '.join(qb.fake_devices())}"
    )


def available_backends(include_ibm: bool = True) -> list[dict]:
    """Every spec make_backend accepts here, with qubit counts. Real IBM devices are listed only when an
    account is configured (that lookup needs the network); otherwise nothing leaves the machine."""
    from . import qiskit_backends as qb

    out = [
        {"spec": "exact", "kind": "simulator", "qubits": TorchBackend.max_qubits, "exact": True},
        {"spec": "aer", "kind": "simulator", "qubits": qb.AER_MAX_QUBITS, "exact": True},
    ]
    for name, qubits in qb.fake_devices().items():
        for prefix in ("aer-noisy", "fake-ibm"):
            out.append({"spec": f"{prefix}:{name}", "kind": "fake", "qubits": qubits, "exact": False})
    if include_ibm and qb.ibm_account_configured():
        try:
            for b in qb.ibm_service().backends():
                out.append({"spec": f"ibm:{b.name}", "kind": "ibm", "qubits": b.num_qubits, "exact": False})
        except Exception as e:  # an unreachable cloud must not hide the local executors
            log.warning("could not list IBM backends (%s)", type(e).__name__)
    return out
