"""A straightforward gate-by-gate torch simulator with plain autograd.

It is the reference the fast simulator is checked against, and the "plain torch" anchor of
benchmarks/qnn_sim.py: one tensor op per gate, complex-free, nothing fused, autograd keeps every
intermediate state.
"""

from __future__ import annotations

import torch

from .ansatz import Ansatz


def _axis(n: int, q: int) -> int:
    # state viewed as [B, 2, ..., 2] with the most significant bit first: qubit q is axis n - q
    return n - q


def naive_amplitudes(ansatz: Ansatz, thetas: torch.Tensor, initial: torch.Tensor | None = None) -> torch.Tensor:
    """Amplitudes [B, 2^n] of the circuit applied to `initial` [B, 2^n] (default |0..0>)."""
    thetas = thetas.unsqueeze(0) if thetas.dim() == 1 else thetas
    n, B = ansatz.n_qubits, thetas.shape[0]
    if initial is None:
        initial = torch.zeros(B, 1 << n, dtype=thetas.dtype, device=thetas.device)
        initial[:, 0] = 1.0
    state = initial.reshape(B, *([2] * n))
    for g in ansatz.gates:
        if g.name == "ry":
            ax = _axis(n, g.wires[0])
            half = thetas[:, g.param] * 0.5
            shape = (B,) + (1,) * (n - 1)
            c, s = torch.cos(half).view(shape), torch.sin(half).view(shape)
            a0, a1 = state.select(ax, 0), state.select(ax, 1)
            state = torch.stack([c * a0 - s * a1, s * a0 + c * a1], ax)
        elif g.name == "cx":
            ctl, tgt = (_axis(n, w) for w in g.wires)
            on = state.select(ctl, 1)
            flipped = on.flip(tgt - (1 if tgt > ctl else 0))
            state = torch.stack([state.select(ctl, 0), flipped], ctl)
        elif g.name == "cz":
            a, b = (_axis(n, w) for w in g.wires)
            sign = torch.ones(2, 2, dtype=state.dtype, device=state.device)
            sign[1, 1] = -1
            shape = [1] * (n + 1)
            shape[a], shape[b] = 2, 2
            state = state * sign.view(shape) if a < b else state * sign.T.reshape(shape)
        else:
            raise ValueError(f"unknown gate {g.name}")
    return state.reshape(B, 1 << n)


def naive_probabilities(ansatz: Ansatz, thetas: torch.Tensor) -> torch.Tensor:
    return naive_amplitudes(ansatz, thetas).square()
