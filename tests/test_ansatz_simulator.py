import numpy as np
import pytest
import torch
from qiskit.quantum_info import Statevector

from qpeft_core.quantum.ansatz import Ansatz, Gate, pauli_ansatz, qpa_ansatz, to_qiskit
from qpeft_core.quantum.naive import naive_amplitudes, naive_probabilities
from qpeft_core.quantum.simulator import amplitudes, evolve, probabilities

FAMILIES = {
    "qpa-ladder": lambda n, L: qpa_ansatz(n, L),
    "qpa-ring": lambda n, L: qpa_ansatz(n, L, "ring"),
    "pauli": pauli_ansatz,
}


def test_parameter_counts():
    assert qpa_ansatz(7, 8).n_params == 56
    for n in range(1, 10):
        for L in range(4):
            expected = n if n == 1 else (2 * L + 1) * n - 2 * L
            assert pauli_ansatz(n, L).n_params == expected


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("n", range(1, 13))
def test_torch_matches_qiskit_statevector(family, n):
    ansatz = FAMILIES[family](n, 3)
    gen = torch.Generator().manual_seed(n)
    thetas = torch.rand(3, ansatz.n_params, generator=gen, dtype=torch.float64) * 4 * np.pi - 2 * np.pi
    ours = amplitudes(ansatz, thetas)
    circuit, _ = to_qiskit(ansatz)
    for b in range(3):
        ref = Statevector(circuit.assign_parameters(thetas[b].numpy())).data
        assert np.abs(ref.imag).max() < 1e-12
        np.testing.assert_allclose(ours[b].numpy(), ref.real, atol=1e-10, rtol=0)


def test_bit_order_is_little_endian():
    # RY(pi) on qubit 0 only flips qubit 0: |0..01> is index 1, Qiskit's key '0001'
    ansatz = Ansatz(4, 1, ((Gate("ry", (0,), 0),),))
    probs = probabilities(ansatz, torch.tensor([[np.pi]], dtype=torch.float64))
    assert probs[0, 1].item() == pytest.approx(1.0)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("fuse", [1, 2, 4, 6])
def test_gradient_matches_naive_autograd(family, fuse):
    ansatz = FAMILIES[family](7, 4)
    gen = torch.Generator().manual_seed(1)
    thetas = torch.randn(3, ansatz.n_params, generator=gen, dtype=torch.float64, requires_grad=True)
    v = torch.randn(ansatz.dim, generator=gen, dtype=torch.float64)
    (grad_fast,) = torch.autograd.grad((probabilities(ansatz, thetas, fuse) @ v).sum(), thetas)
    (grad_naive,) = torch.autograd.grad((naive_probabilities(ansatz, thetas) @ v).sum(), thetas)
    torch.testing.assert_close(grad_fast, grad_naive, atol=1e-12, rtol=0)


def test_gradient_matches_finite_differences():
    ansatz = qpa_ansatz(5, 3)
    thetas = torch.randn(1, ansatz.n_params, dtype=torch.float64, requires_grad=True)
    v = torch.randn(ansatz.dim, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda t: probabilities(ansatz, t) @ v, (thetas,), eps=1e-6, atol=1e-7)


def test_evolve_many_vectors_and_input_gradient():
    ansatz = pauli_ansatz(5, 2)
    thetas = torch.randn(2, ansatz.n_params, dtype=torch.float64, requires_grad=True)
    states = torch.randn(2, 3, ansatz.dim, dtype=torch.float64, requires_grad=True)
    out = evolve(ansatz, thetas, states)
    for b in range(2):
        for m in range(3):
            ref = naive_amplitudes(ansatz, thetas[b : b + 1], states[b, m : m + 1])[0]
            torch.testing.assert_close(out[b, m], ref, atol=1e-12, rtol=0)
    assert torch.autograd.gradcheck(lambda t, s: evolve(ansatz, t, s), (thetas, states), eps=1e-6, atol=1e-7)


def test_float32_default_and_accuracy():
    ansatz = qpa_ansatz(10, 8)
    thetas = torch.randn(4, ansatz.n_params)
    p32 = probabilities(ansatz, thetas)
    assert p32.dtype == torch.float32
    p64 = naive_probabilities(ansatz, thetas.double())
    assert (p32.double() - p64).abs().max() < 1e-6
    torch.testing.assert_close(p32.sum(1), torch.ones(4), atol=1e-5, rtol=0)


def test_adjoint_memory_does_not_grow_with_depth():
    # The autograd graph keeps only O(state) tensors, whatever the number of layers.
    def saved_bytes(layers):
        ansatz = qpa_ansatz(12, layers)
        thetas = torch.randn(2, ansatz.n_params, requires_grad=True)
        total = []

        def pack(t):
            total.append(t.numel() * t.element_size())
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            probabilities(ansatz, thetas)
        return sum(total)

    state_bytes = 2 * (1 << 12) * 4
    # only the angles themselves grow with depth (14 more layers x 12 angles x 2 sets x 4 bytes)
    assert saved_bytes(16) - saved_bytes(2) == 14 * 12 * 2 * 4
    assert saved_bytes(16) <= 3 * state_bytes


@pytest.mark.parametrize(
    "bad, match",
    [
        (lambda a: amplitudes(a, torch.zeros(2, a.n_params + 1)), r"shape \[B, 12\]"),
        (lambda a: amplitudes(a, torch.zeros(2, 12, dtype=torch.long)), "floating-point"),
    ],
)
def test_bad_thetas_name_the_argument(bad, match):
    with pytest.raises((ValueError, TypeError), match=match):
        bad(qpa_ansatz(4, 3))


def test_bad_ansatz_arguments():
    with pytest.raises(ValueError, match="layers"):
        qpa_ansatz(3, 0)
    with pytest.raises(ValueError, match="entangler"):
        qpa_ansatz(3, 1, "star")
    with pytest.raises(ValueError, match="exactly one gate"):
        Ansatz(2, 1, ((Gate("ry", (0,), 0), Gate("ry", (1,), 0)),))
