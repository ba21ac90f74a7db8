import math

import pytest
import torch

from qpeft_core.quantum.ansatz import pauli_ansatz, qpa_ansatz
from qpeft_core.quantum.backend import TorchBackend
from qpeft_core.quantum.gradients import QNN, SPSA, Autograd, ParameterShift


def _setup(n=4, layers=3, batch=2, seed=0):
    ansatz = qpa_ansatz(n, layers)
    gen = torch.Generator().manual_seed(seed)
    thetas = torch.randn(batch, ansatz.n_params, generator=gen, dtype=torch.float64)
    grad_p = torch.randn(batch, ansatz.dim, generator=gen, dtype=torch.float64)
    return ansatz, thetas, grad_p


@pytest.mark.parametrize("make", [lambda n, L: qpa_ansatz(n, L), pauli_ansatz])
def test_parameter_shift_equals_autograd_exact(make):
    ansatz = make(5, 2)
    thetas = torch.randn(3, ansatz.n_params, dtype=torch.float64)
    grad_p = torch.randn(3, ansatz.dim, dtype=torch.float64)
    backend = TorchBackend(ansatz, dtype=torch.float64)
    exact, _ = Autograd().vjp(backend, thetas, grad_p)
    for shift in (math.pi / 2, 0.3):
        shifted, usage = ParameterShift(shift).vjp(backend, thetas, grad_p)
        torch.testing.assert_close(shifted, exact, atol=1e-8, rtol=0)
        assert usage.circuits == 3 * 2 * ansatz.n_params


def test_parameter_shift_with_shots_is_unbiased_and_counts_shots():
    ansatz, thetas, grad_p = _setup(batch=1)
    backend = TorchBackend(ansatz, dtype=torch.float64, seed=123)
    exact, _ = Autograd().vjp(backend, thetas, grad_p)
    shots, runs = 256, 200
    estimates, total_shots = [], 0
    for _ in range(runs):
        est, usage = ParameterShift().vjp(backend, thetas, grad_p, shots=shots)
        estimates.append(est)
        total_shots += usage.shots
        assert usage.shots == usage.circuits * shots
    est = torch.stack(estimates)
    stderr = est.std(0) / math.sqrt(runs)
    assert ((est.mean(0) - exact).abs() <= 4 * stderr + 1e-12).all()
    assert total_shots == runs * 2 * ansatz.n_params * shots


def test_spsa_is_seeded_and_points_along_gradient():
    ansatz, thetas, grad_p = _setup(batch=1)
    backend = TorchBackend(ansatz, dtype=torch.float64)
    a, _ = SPSA(epsilon=1e-3, samples=400, seed=7).vjp(backend, thetas, grad_p)
    b, _ = SPSA(epsilon=1e-3, samples=400, seed=7).vjp(backend, thetas, grad_p)
    torch.testing.assert_close(a, b)
    exact, _ = Autograd().vjp(backend, thetas, grad_p)
    cosine = torch.nn.functional.cosine_similarity(a, exact).item()
    assert cosine > 0.8


def test_qnn_backward_through_any_strategy():
    ansatz, thetas, grad_p = _setup()
    backend = TorchBackend(ansatz, dtype=torch.float64)
    grads = {}
    for strategy in ("autograd", "parameter_shift"):
        t = thetas.clone().requires_grad_(True)
        qnn = QNN(backend, strategy)
        (qnn(t) * grad_p).sum().backward()
        grads[strategy] = t.grad
    torch.testing.assert_close(grads["autograd"], grads["parameter_shift"], atol=1e-10, rtol=0)


def test_qnn_records_usage_and_rejects_bad_input():
    ansatz, thetas, _ = _setup()
    qnn = QNN(TorchBackend(ansatz), "parameter_shift", shots=100)
    t = thetas.float().requires_grad_(True)
    (qnn(t) * torch.randn(2, 16)).sum().backward()
    # forward: 2 parameter sets; backward: 2 x 2P shifted sets, each with 100 shots
    assert qnn.usage.shots == (2 + 2 * 2 * 12) * 100
    assert qnn.usage.circuits == 2 + 2 * 2 * 12 and t.grad.shape == t.shape
    with pytest.raises(ValueError, match="shots"):
        QNN(TorchBackend(ansatz), shots=0)
    with pytest.raises(ValueError, match="gradient must be one of"):
        QNN(TorchBackend(ansatz), gradient="finite")
    with pytest.raises(ValueError, match="autograd"):
        Autograd().vjp(TorchBackend(ansatz), thetas, torch.zeros(2, 16), shots=10)
    with pytest.raises(ValueError, match=r"thetas must have shape \[B, 12\]"):
        TorchBackend(ansatz).probabilities(torch.zeros(2, 3))
    with pytest.raises(ValueError, match="qubits"):
        TorchBackend(qpa_ansatz(31, 1))
