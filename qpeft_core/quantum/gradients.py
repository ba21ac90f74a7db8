"""Gradient strategies as vector-Jacobian products against dL/dp, and the autograd bridge.

The QPU only ever sees circuit angles: the trainer sends dL/dp (2^n numbers per parameter set) and gets
dL/dtheta back. Every strategy puts all the circuits it needs for one VJP into one executor call.
"""

from __future__ import annotations

import math

import torch

from .backend import QuantumBackend, Usage


class Autograd:
    """Exact VJP by differentiating the torch simulator (adjoint method); exact backends only."""

    name = "autograd"

    def vjp(self, backend, thetas, grad_probs, shots=None):
        if shots is not None or not hasattr(backend, "exact_probabilities"):
            raise ValueError(
                f"gradient='autograd' needs the exact torch executor with shots=None (got {backend.name}, "
                f"shots={shots}); use gradient='parameter_shift' or 'spsa' for shot-based executors"
            )
        with torch.enable_grad():
            t = thetas.detach().requires_grad_(True)
            probs = backend.exact_probabilities(t)
            (grad,) = torch.autograd.grad(probs, t, grad_probs.to(probs.dtype))
        return grad.to(thetas.dtype), Usage(backend.name, circuits=thetas.shape[0])


class ParameterShift:
    """dp/dtheta_j = [p(theta + s e_j) - p(theta - s e_j)] / (2 sin s); exact for RY with any s,
    s = pi/2 by default. 2P circuits per parameter set, all in one call."""

    name = "parameter_shift"

    def __init__(self, shift: float = math.pi / 2):
        if not 0 < shift < math.pi:
            raise ValueError(f"shift must be in (0, pi), got {shift}")
        self.shift = shift

    def vjp(self, backend, thetas, grad_probs, shots=None):
        B, P = thetas.shape
        eye = torch.eye(P, dtype=thetas.dtype, device=thetas.device) * self.shift
        points = torch.cat([thetas[:, None, :] + eye, thetas[:, None, :] - eye], 1)  # [B, 2P, P]
        probs, usage = backend.probabilities(points.reshape(B * 2 * P, P), shots)
        probs = probs.to(grad_probs.device, grad_probs.dtype).view(B, 2, P, -1)
        dp = (probs[:, 0] - probs[:, 1]) / (2 * math.sin(self.shift))  # [B, P, 2^n]
        return torch.einsum("bpi,bi->bp", dp, grad_probs).to(thetas.dtype), usage


class SPSA:
    """Simultaneous-perturbation estimate: 2 * samples circuits per parameter set, seeded."""

    name = "spsa"

    def __init__(self, epsilon: float = 0.1, samples: int = 1, seed: int = 0):
        if epsilon <= 0 or samples < 1:
            raise ValueError(f"SPSA needs epsilon > 0 and samples >= 1, got {epsilon}, {samples}")
        self.epsilon, self.samples = epsilon, samples
        self.generator = torch.Generator().manual_seed(seed)

    def vjp(self, backend, thetas, grad_probs, shots=None):
        B, P = thetas.shape
        delta = torch.randint(0, 2, (B, self.samples, P), generator=self.generator).to(thetas) * 2 - 1
        points = torch.cat([thetas[:, None] + self.epsilon * delta, thetas[:, None] - self.epsilon * delta], 1)
        probs, usage = backend.probabilities(points.reshape(-1, P), shots)
        probs = probs.to(grad_probs.device, grad_probs.dtype).view(B, 2, self.samples, -1)
        slope = torch.einsum("bsi,bi->bs", probs[:, 0] - probs[:, 1], grad_probs) / (2 * self.epsilon)
        return (slope[..., None] * delta.to(slope)).mean(1).to(thetas.dtype), usage


STRATEGIES = {"autograd": Autograd, "parameter_shift": ParameterShift, "spsa": SPSA}


def make_strategy(gradient, backend: QuantumBackend, shots):
    """'auto' picks autograd for exact torch runs and parameter-shift otherwise."""
    if not isinstance(gradient, str):
        return gradient
    if gradient == "auto":
        gradient = "autograd" if shots is None and hasattr(backend, "exact_probabilities") else "parameter_shift"
    if gradient not in STRATEGIES:
        raise ValueError(f"gradient must be one of {['auto', *STRATEGIES]}, got {gradient!r}")
    return STRATEGIES[gradient]()


class _QNNFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, thetas, qnn):
        probs, usage = qnn.backend.probabilities(thetas.detach(), qnn.shots)
        qnn.usage = qnn.usage + usage
        ctx.qnn = qnn
        ctx.save_for_backward(thetas)
        return probs.to(thetas.device, thetas.dtype)

    @staticmethod
    def backward(ctx, grad_probs):
        (thetas,) = ctx.saved_tensors
        qnn = ctx.qnn
        grad, usage = qnn.strategy.vjp(qnn.backend, thetas.detach(), grad_probs, qnn.shots)
        qnn.usage = qnn.usage + usage
        return grad.to(thetas.device), None


class QNN:
    """Differentiable probabilities from any executor with any gradient strategy.

    `qnn(thetas)` returns [B, 2^n] probabilities that autograd can differentiate; `usage` sums what the
    forward and gradient calls cost. Adapter code holds one of these and never knows where circuits run.
    """

    def __init__(self, backend: QuantumBackend, gradient="auto", shots: int | None = None):
        if shots is not None and (not isinstance(shots, int) or isinstance(shots, bool) or shots <= 0):
            raise ValueError(f"shots must be a positive int or None (exact), got {shots!r}")
        self.backend, self.shots = backend, shots
        self.strategy = make_strategy(gradient, backend, shots)
        self.usage = Usage(backend.name)

    def __call__(self, thetas: torch.Tensor) -> torch.Tensor:
        squeeze = thetas.dim() == 1
        thetas = thetas.unsqueeze(0) if squeeze else thetas
        if isinstance(self.strategy, Autograd):
            if self.shots is not None:
                raise ValueError("gradient='autograd' needs shots=None; use parameter_shift or spsa with shots")
            probs = self.backend.exact_probabilities(thetas)
            self.usage = self.usage + Usage(self.backend.name, circuits=thetas.shape[0])
            probs = probs.to(thetas.device, thetas.dtype)
        else:
            probs = _QNNFunction.apply(thetas, self)
        return probs[0] if squeeze else probs
