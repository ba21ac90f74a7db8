"""Code paths of the fast simulator that tests/test_ansatz_simulator.py does not reach: the product-state
first layer against the general path, one-block circuits, the batched-GEMM path for many vectors, and the
buffers the backward must leave alone."""

import torch

from qpeft_core.quantum.ansatz import Ansatz, Gate, pauli_ansatz, qpa_ansatz
from qpeft_core.quantum.naive import naive_amplitudes
from qpeft_core.quantum.simulator import amplitudes, evolve, probabilities


def _zero(B, dim):
    z = torch.zeros(B, 1, dim, dtype=torch.float64)
    z[:, :, 0] = 1.0
    return z


def test_product_start_equals_general_path():
    ansatz = qpa_ansatz(9, 4, "ring")
    v = torch.randn(ansatz.dim, dtype=torch.float64)
    thetas = torch.randn(2, ansatz.n_params, dtype=torch.float64, requires_grad=True)
    amp = amplitudes(ansatz, thetas)  # starts from the product state of the first layer
    ref = evolve(ansatz, thetas, _zero(2, ansatz.dim))[:, 0]  # applies the first layer as GEMMs
    torch.testing.assert_close(amp, ref, atol=1e-12, rtol=0)
    (g_amp,) = torch.autograd.grad((amp.square() @ v).sum(), thetas)
    (g_ref,) = torch.autograd.grad((ref.square() @ v).sum(), thetas)
    torch.testing.assert_close(g_amp, g_ref, atol=1e-12, rtol=0)


def test_single_block_circuits():
    # one block: the backward walks no block at all; partial RY layer, CX and CZ in the same block
    gates = (Gate("ry", (0,), 0), Gate("ry", (2,), 1), Gate("ry", (1,), 2), Gate("cx", (0, 2)), Gate("cz", (1, 2)))
    for ansatz in (Ansatz(3, 3, (gates,)), pauli_ansatz(1, 2)):
        thetas = torch.randn(2, ansatz.n_params, dtype=torch.float64, requires_grad=True)
        states = torch.randn(2, 3, ansatz.dim, dtype=torch.float64, requires_grad=True)
        assert torch.autograd.gradcheck(lambda t, a=ansatz: probabilities(a, t), (thetas,))
        assert torch.autograd.gradcheck(lambda t, s, a=ansatz: evolve(a, t, s), (thetas, states))
        fixed = thetas.detach()
        assert torch.autograd.gradcheck(lambda s, a=ansatz, t=fixed: evolve(a, t, s), (states,))


def test_many_vectors_batched_gemm_path():
    # 2^10 / 2^4 = 64 rows per vector: each vector gets its own GEMM (the wide path is for <= 16 rows)
    ansatz = qpa_ansatz(10, 3)
    thetas = torch.randn(2, ansatz.n_params, dtype=torch.float64, requires_grad=True)
    states = torch.randn(2, 3, ansatz.dim, dtype=torch.float64, requires_grad=True)
    w = torch.randn(2, 3, ansatz.dim, dtype=torch.float64)
    out = evolve(ansatz, thetas, states)
    ref = torch.stack([naive_amplitudes(ansatz, thetas[b : b + 1].expand(3, -1), states[b]) for b in range(2)])
    torch.testing.assert_close(out, ref, atol=1e-12, rtol=0)
    grads = torch.autograd.grad((out * w).sum(), (thetas, states))
    refs = torch.autograd.grad((ref * w).sum(), (thetas, states))
    for g, r in zip(grads, refs, strict=True):
        torch.testing.assert_close(g, r, atol=1e-11, rtol=0)


def test_backward_leaves_inputs_and_outputs_alone():
    # the forward and backward write into their own buffers only: not the output, the cotangent, the input
    ansatz = qpa_ansatz(6, 3)
    thetas = torch.randn(1, ansatz.n_params, requires_grad=True)
    states = torch.randn(1, 1, ansatz.dim, requires_grad=True)
    out = evolve(ansatz, thetas, states)
    grad = torch.randn_like(out)
    kept = (out.detach().clone(), grad.clone(), states.detach().clone())
    out.backward(grad)
    for now, before in zip((out.detach(), grad, states.detach()), kept, strict=True):
        assert torch.equal(now, before)
    p1 = probabilities(ansatz, thetas.detach())
    p2 = probabilities(ansatz, thetas.detach() + 1)
    assert p1.untyped_storage().data_ptr() != p2.untyped_storage().data_ptr()
