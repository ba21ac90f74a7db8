"""Qiskit executors against the exact torch simulator: real Aer runs and IBM Runtime in local testing mode."""

import math
import time

import pytest
import torch

pytest.importorskip("qiskit_aer")
pytest.importorskip("qiskit_ibm_runtime")

from qiskit.providers.basic_provider import BasicSimulator  # noqa: E402
from qiskit_ibm_runtime import Batch, Session  # noqa: E402

from qpeft_core.quantum import qiskit_backends as qb  # noqa: E402
from qpeft_core.quantum import registry  # noqa: E402
from qpeft_core.quantum.ansatz import pauli_ansatz, qpa_ansatz  # noqa: E402
from qpeft_core.quantum.backend import QuantumBackend, TorchBackend  # noqa: E402
from qpeft_core.quantum.gradients import QNN, Autograd, ParameterShift  # noqa: E402
from qpeft_core.quantum.registry import available_backends, make_backend  # noqa: E402
from qpeft_core.quantum.timing import PER_JOB_S  # noqa: E402


def _thetas(ansatz, batch, seed=0):
    return torch.randn(batch, ansatz.n_params, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _exact(ansatz, thetas):
    return TorchBackend(ansatz, dtype=torch.float64).probabilities(thetas).probs


def _tvd(p, q):
    return 0.5 * (p - q).abs().sum(-1)


@pytest.mark.parametrize("ansatz", [qpa_ansatz(4, 3), pauli_ansatz(5, 2)], ids=["qpa", "pauli"])
def test_aer_statevector_equals_torch(ansatz):
    thetas = _thetas(ansatz, 4)
    backend = qb.AerStatevectorBackend(ansatz)
    assert isinstance(backend, QuantumBackend) and backend.exact
    probs, usage = backend.probabilities(thetas)
    assert probs.dtype == torch.float64 and probs.shape == (4, ansatz.dim)
    torch.testing.assert_close(probs, _exact(ansatz, thetas), atol=1e-10, rtol=0)
    assert (usage.circuits, usage.shots, len(usage.job_ids)) == (4, 0, 1)


def test_bitarray_frequencies_are_little_endian_across_bytes():
    import numpy as np
    from qiskit.primitives.containers import BitArray

    bits = np.random.default_rng(0).integers(0, 2, size=(3, 40, 11)).astype(bool)
    freqs = qb._bitarray_freqs(BitArray.from_bool_array(bits, order="little"), 11)
    index = torch.from_numpy((bits.astype(np.int64) << np.arange(11)).sum(-1))
    expected = torch.zeros(3, 2**11, dtype=torch.float64).scatter_add_(1, index, torch.ones(3, 40, dtype=torch.float64))
    torch.testing.assert_close(freqs, expected / 40)


IDEAL = {
    "aer-statevector": lambda a: qb.AerStatevectorBackend(a, seed=1),
    "aer-sampler": lambda a: qb.AerSamplerBackend(a, seed=2),
    "aer-manila-layout": lambda a: qb.AerSamplerBackend(a, "FakeManilaV2", noise=False, seed=3),
    "fake-ibm-ideal": lambda a: qb.IBMRuntimeBackend(a, qb.fake_device("fake_manila"), noise=False, seed=4),
    "basic-simulator": lambda a: qb.BackendSamplerV2Backend(a, BasicSimulator(), seed=5),
}


@pytest.mark.parametrize("kind", list(IDEAL))
def test_ideal_shots_within_binomial_error(kind):
    ansatz = qpa_ansatz(3, 2)
    thetas, shots = _thetas(ansatz, 3, seed=1), 4000
    backend = IDEAL[kind](ansatz)
    probs, usage = backend.probabilities(thetas, shots=shots)
    exact = _exact(ansatz, thetas)
    stderr = (exact * (1 - exact) / shots).sqrt()
    assert ((probs - exact).abs() <= 5 * stderr + 1 / shots).all()
    torch.testing.assert_close(probs.sum(1), torch.ones(3, dtype=torch.float64))
    assert usage.shots == usage.circuits * shots == 3 * shots
    assert len(usage.job_ids) == 1 and usage.backend == backend.name


@pytest.mark.parametrize("spec", ["aer-noisy:FakeManilaV2", "fake-ibm:FakeManilaV2"])
def test_noisy_fake_device(spec):
    ansatz = qpa_ansatz(3, 2)
    backend = make_backend(spec, ansatz)
    thetas = torch.cat([torch.zeros(1, ansatz.n_params, dtype=torch.float64), _thetas(ansatz, 2)])
    probs, usage = backend.probabilities(thetas, shots=4000)
    assert (_tvd(probs, _exact(ansatz, thetas)) < 0.2).all()
    assert probs[0, 0] < 0.99  # |000> is certain without noise: readout and gate errors are really there
    assert usage.shots == 3 * 4000 and usage.job_ids
    assert usage.qpu_s is None  # local mode reports no QPU time
    if spec.startswith("aer-noisy"):
        assert usage.qpu_s_estimated is None  # a simulator of the device: no QPU time is billed
    else:  # one job: the documented fixed cost plus at least the repetition delay of every shot
        assert usage.qpu_s_estimated > PER_JOB_S + 3 * 4000 * 250e-6


def test_restricted_noise_matches_full_device_noise():
    # The fake device's own simulator carries its full noise model; ours keeps only the qubits in use.
    ansatz = qpa_ansatz(3, 1)
    thetas = _thetas(ansatz, 2, seed=3)
    full, _ = qb.BackendSamplerV2Backend(ansatz, qb.fake_device("FakeLagosV2")).probabilities(thetas, 20000)
    ours, _ = qb.IBMRuntimeBackend(ansatz, "fake_lagos").probabilities(thetas, 20000)
    # Same transpiler and simulator seeds: the samples even coincide; the bound leaves room for Aer changes.
    assert (_tvd(full, ours) < 0.02).all()


def test_large_fake_device_simulates_only_the_qubits_in_use():
    ansatz = qpa_ansatz(5, 2)
    thetas = _thetas(ansatz, 4)
    t0 = time.perf_counter()
    backend = make_backend("fake-ibm:FakeSherbrooke", ansatz)
    probs, usage = backend.probabilities(thetas, shots=2000)
    assert time.perf_counter() - t0 < 20  # the full 127-qubit noise model takes ~10 s per parameter set
    assert backend.max_qubits == 127 and usage.shots == 4 * 2000
    assert (_tvd(probs, _exact(ansatz, thetas)) < 0.3).all()


def test_shot_noise_is_seeded_and_fresh_per_call():
    ansatz = qpa_ansatz(2, 1)
    thetas = _thetas(ansatz, 2)
    for make in (
        lambda s: qb.AerSamplerBackend(ansatz, seed=s),
        lambda s: make_backend("fake-ibm:fake_lima", ansatz, seed=s),
    ):
        a, b = make(7), make(7)
        first = a.probabilities(thetas, 500).probs
        assert torch.equal(first, b.probabilities(thetas, 500).probs)
        assert not torch.equal(first, a.probabilities(thetas, 500).probs)


@pytest.mark.parametrize("ansatz", [qpa_ansatz(3, 2), pauli_ansatz(3, 1)], ids=["qpa", "pauli"])
def test_parameter_shift_on_aer_equals_autograd(ansatz):
    thetas = _thetas(ansatz, 2)
    grad_p = torch.randn(2, ansatz.dim, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    exact, _ = Autograd().vjp(TorchBackend(ansatz, dtype=torch.float64), thetas, grad_p)
    shifted, usage = ParameterShift().vjp(qb.AerStatevectorBackend(ansatz), thetas, grad_p)
    torch.testing.assert_close(shifted, exact, atol=1e-8, rtol=0)
    assert usage.circuits == 2 * 2 * ansatz.n_params and len(usage.job_ids) == 1


@pytest.mark.parametrize("spec", ["aer", "fake-ibm:FakeManilaV2"])
def test_parameter_shift_with_shots_is_unbiased(spec):
    ansatz = qpa_ansatz(2, 2)
    theta = _thetas(ansatz, 1, seed=4)
    grad_p = torch.tensor([[0.3, -1.0, 0.5, 1.2]], dtype=torch.float64)
    exact, _ = Autograd().vjp(TorchBackend(ansatz, dtype=torch.float64), theta, grad_p)
    copies, shots, estimates = 8, 400, []
    for seed in range(4):  # each call draws `copies` independent estimates at the same point
        options = {"noise": False} if spec.startswith("fake-ibm") else {}
        backend = make_backend(spec, ansatz, seed=seed, **options)
        est, usage = ParameterShift().vjp(backend, theta.repeat(copies, 1), grad_p.repeat(copies, 1), shots=shots)
        assert usage.shots == copies * 2 * ansatz.n_params * shots
        estimates.append(est)
    est = torch.cat(estimates)
    stderr = est.std(0) / math.sqrt(len(est))
    assert ((est.mean(0) - exact[0]).abs() <= 4 * stderr).all()
    assert (stderr > 0).all()


@pytest.mark.parametrize("mode,kind", [("session", Session), ("batch", Batch)])
def test_session_and_batch_modes_run_and_close(mode, kind):
    ansatz = qpa_ansatz(2, 1)
    with make_backend("fake-ibm:FakeManilaV2", ansatz, mode=mode) as backend:
        assert backend.session is None  # opened lazily
        _, u1 = backend.probabilities(_thetas(ansatz, 2), shots=100)
        context = backend.session
        assert isinstance(context, kind)
        _, u2 = backend.probabilities(_thetas(ansatz, 2), shots=100)
        assert backend.session is context and u1.job_ids != u2.job_ids
    assert backend.session is None
    backend.close()  # idempotent


def test_bad_inputs_name_the_argument_and_allowed_values():
    ansatz = qpa_ansatz(3, 1)
    backend = make_backend("fake-ibm:FakeManilaV2", ansatz)
    with pytest.raises(ValueError, match=r"thetas must have shape \[B, 3\]"):
        backend.probabilities(torch.zeros(2, 4), shots=10)
    for shots in (0, -5):
        with pytest.raises(ValueError, match="shots must be a positive int"):
            backend.probabilities(torch.zeros(1, 3), shots=shots)
    with pytest.raises(ValueError, match="cannot give"):
        backend.probabilities(torch.zeros(1, 3))  # shot-only executor asked for exact probabilities
    with pytest.raises(ValueError, match="needs 6 qubits but device fake_manila has 5"):
        make_backend("aer-noisy:FakeManilaV2", qpa_ansatz(6, 1))
    with pytest.raises(ValueError, match="needs 6 qubits but device fake_lima has 5"):
        make_backend("fake-ibm:fake_lima", qpa_ansatz(6, 1))
    with pytest.raises(ValueError, match=r"'qpu': unknown backend spec.*aer-noisy:<fake device>.*FakeManilaV2"):
        make_backend("qpu", ansatz)
    with pytest.raises(ValueError, match=r"'fake-ibm:FakeNowhere'.*unknown fake device.*FakeSherbrooke"):
        make_backend("fake-ibm:FakeNowhere", ansatz)
    with pytest.raises(ValueError, match=r"mode must be one of \('job', 'session', 'batch'\)"):
        make_backend("fake-ibm:FakeManilaV2", ansatz, mode="dedicated")


def test_ibm_without_account_fails_clearly(monkeypatch):
    monkeypatch.delenv("QISKIT_IBM_TOKEN", raising=False)
    if qb.ibm_account_configured():
        pytest.skip("an IBM account is configured here; this test must not reach the cloud")
    with pytest.raises(RuntimeError, match="needs an account"):
        make_backend("ibm:ibm_nowhere", qpa_ansatz(2, 1))


def test_registry_specs_and_listing(monkeypatch):
    ansatz = qpa_ansatz(2, 1)
    assert isinstance(make_backend("exact", ansatz, dtype=torch.float64), TorchBackend)
    assert isinstance(make_backend("aer", ansatz), qb.AerStatevectorBackend)
    noisy = make_backend("aer-noisy:fake_manila", ansatz)
    assert isinstance(noisy, qb.AerSamplerBackend) and noisy.name == "aer-noisy:fake_manila" and not noisy.exact
    monkeypatch.setattr(qb, "ibm_account_configured", lambda: False)
    listing = {b["spec"]: b for b in available_backends()}
    assert listing["exact"]["exact"] and listing["aer"]["exact"]
    assert listing["fake-ibm:FakeManilaV2"]["qubits"] == 5 and listing["aer-noisy:FakeSherbrooke"]["qubits"] == 127
    assert not any(spec.startswith("ibm:") for spec in listing)

    def unreachable(**_):
        raise RuntimeError("no network")

    monkeypatch.setattr(qb, "ibm_account_configured", lambda: True)
    monkeypatch.setattr(qb, "ibm_service", unreachable)
    assert {b["spec"] for b in available_backends()} == set(listing)
    assert registry.spec_forms()[0] == "exact"


def test_qnn_trains_on_fake_ibm():
    ansatz = qpa_ansatz(2, 2)
    qnn = QNN(make_backend("fake-ibm:FakeManilaV2", ansatz, seed=0), "parameter_shift", shots=2000)
    target = torch.tensor([0.0, 0.0, 0.0, 1.0], dtype=torch.float64)  # maximise P(|11>)
    theta = torch.full((ansatz.n_params,), 0.3, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.Adam([theta], lr=0.3)

    def exact_loss():
        return 1 - (_exact(ansatz, theta.detach()[None]) * target).sum().item()

    before = exact_loss()
    for _ in range(6):
        opt.zero_grad()
        loss = 1 - (qnn(theta) * target).sum()
        loss.backward()
        opt.step()
    assert exact_loss() < before - 0.2
    assert qnn.usage.shots == 6 * (1 + 2 * ansatz.n_params) * 2000 and len(qnn.usage.job_ids) == 12


def test_dry_run_timing_fits_ibm_estimates():
    """IBM's dry-run estimates fitted into the time model. The IBM cloud is mocked (a sampler whose dry runs
    answer quantum_seconds = 2.5 s per job + 300 us per shot), as the only thing these tests mock."""
    from types import SimpleNamespace

    asked = []

    def run(pubs, shots, dry_run):
        ((_, values),) = pubs
        asked.append((values.shape[0], shots, dry_run))
        return SimpleNamespace(usage_estimation={"quantum_seconds": 2.5 + values.shape[0] * shots * 3e-4})

    ansatz = qpa_ansatz(3, 2)
    cloud = SimpleNamespace(local=False, ansatz=ansatz, _isa=None, _sampler=lambda: SimpleNamespace(run=run))
    timing = qb.dry_run_timing(cloud, 2 * ansatz.n_params, 1024)
    assert timing.per_job_s == pytest.approx(2.5) and timing.per_shot_s == pytest.approx(3e-4)
    assert asked == [(1, 1024, True), (12, 1024, True)]  # dry runs only: nothing executed

    def unsupported(pubs, shots, dry_run):
        raise TypeError("this service has no dry run")

    cloud._sampler = lambda: SimpleNamespace(run=unsupported)
    assert qb.dry_run_timing(cloud, 12, 1024) is None  # the caller keeps the device's own model
    assert qb.dry_run_timing(SimpleNamespace(local=True), 12, 1024) is None  # local mode has no estimates
