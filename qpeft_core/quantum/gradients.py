"""Gradient strategies as vector-Jacobian products against dL/dp, and the autograd bridge.

The QPU only ever sees circuit angles: the trainer sends dL/dp (2^n numbers per parameter set) and gets
dL/dtheta back. Every strategy has one signature, `vjp(executor, thetas, grad_probs, shots)`: it checks the
call once and puts all the circuits it needs for one VJP into one `executor.run` (so a pool can spread them
over its workers). "auto" is resolved here and only here (`resolve_gradient`).
"""

from __future__ import annotations

import math

import torch

from .backend import CircuitCall, QuantumBackend, Usage, check_call


def differentiable(executor) -> bool:
    """Whether autograd can differentiate the executor in this process (the torch simulator)."""
    return hasattr(executor, "exact_probabilities")


def resolve_gradient(gradient: str, differentiable: bool, shots: int | None) -> str:
    """The strategy 'auto' stands for: autograd where the executor is differentiable here and exact
    (shots=None), else parameter shift. Other names are returned as they are, once checked."""
    if gradient == "auto":
        return "autograd" if differentiable and shots is None else "parameter_shift"
    if gradient not in STRATEGIES:
        raise ValueError(f"gradient must be one of {['auto', *STRATEGIES]}, got {gradient!r}")
    return gradient


class Autograd:
    """Exact VJP by differentiating the torch simulator (adjoint method); exact backends only."""

    name = "autograd"

    def circuits(self, n_params: int) -> int:
        return 0  # no circuit runs: the simulator is differentiated

    def vjp(self, backend, thetas, grad_probs, shots=None):
        if shots is not None or not differentiable(backend):
            raise ValueError(
                f"gradient='autograd' needs the exact torch executor with shots=None (got {backend.name}, "
                f"shots={shots}); use gradient='parameter_shift' or 'spsa' for shot-based executors"
            )
        thetas = check_call(backend, thetas, shots).thetas
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

    def circuits(self, n_params: int) -> int:
        return 2 * n_params

    def vjp(self, backend, thetas, grad_probs, shots=None):
        thetas, shots, _ = check_call(backend, thetas, shots)
        B, P = thetas.shape
        eye = torch.eye(P, dtype=thetas.dtype, device=thetas.device) * self.shift
        points = torch.cat([thetas[:, None, :] + eye, thetas[:, None, :] - eye], 1)  # [B, 2P, P]
        probs, usage = backend.run(CircuitCall(points.reshape(B * 2 * P, P), shots, "gradient"))
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

    def circuits(self, n_params: int) -> int:
        return 2 * self.samples

    def vjp(self, backend, thetas, grad_probs, shots=None):
        thetas, shots, _ = check_call(backend, thetas, shots)
        B, P = thetas.shape
        delta = torch.randint(0, 2, (B, self.samples, P), generator=self.generator).to(thetas) * 2 - 1
        points = torch.cat([thetas[:, None] + self.epsilon * delta, thetas[:, None] - self.epsilon * delta], 1)
        probs, usage = backend.run(CircuitCall(points.reshape(-1, P), shots, "gradient"))
        probs = probs.to(grad_probs.device, grad_probs.dtype).view(B, 2, self.samples, -1)
        slope = torch.einsum("bsi,bi->bs", probs[:, 0] - probs[:, 1], grad_probs) / (2 * self.epsilon)
        return (slope[..., None] * delta.to(slope)).mean(1).to(thetas.dtype), usage


STRATEGIES = {"autograd": Autograd, "parameter_shift": ParameterShift, "spsa": SPSA}


def make_strategy(gradient, backend: QuantumBackend, shots):
    """A strategy object from its name ('auto' resolved for this executor), or the object itself."""
    if not isinstance(gradient, str):
        return gradient
    return STRATEGIES[resolve_gradient(gradient, differentiable(backend), shots)]()


class _QNNFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, thetas, qnn):
        probs, _ = qnn.forward(thetas.detach())
        ctx.qnn = qnn
        ctx.save_for_backward(thetas)
        return probs.to(thetas.device, thetas.dtype)

    @staticmethod
    def backward(ctx, grad_probs):
        (thetas,) = ctx.saved_tensors
        grad, _ = ctx.qnn.vjp(thetas.detach(), grad_probs)
        return grad.to(thetas.device), None


class QNN:
    """Probabilities from any executor and their gradient with any strategy: the one object through which
    adapter code runs circuits, and never knows where they run.

    `forward(thetas)` and `vjp(thetas, grad_probs)` are the two calls (QPA uses them directly, to take the
    gradient once per optimizer step); `qnn(thetas)` wraps them as a function autograd can differentiate.
    `usage` sums what every call cost, `calls` counts them.
    """

    def __init__(self, backend: QuantumBackend, gradient="auto", shots: int | None = None):
        if shots is not None and (not isinstance(shots, int) or isinstance(shots, bool) or shots <= 0):
            raise ValueError(f"shots must be a positive int or None (exact), got {shots!r}")
        self.backend, self.shots = backend, shots
        self.strategy = make_strategy(gradient, backend, shots)
        self.usage = Usage(backend.name)
        self.calls = {"forward": 0, "gradient": 0}

    def _count(self, kind: str, usage: Usage) -> None:
        self.usage = self.usage + usage
        self.calls[kind] += 1

    def forward(self, thetas: torch.Tensor):
        """(probabilities [B, 2^n], usage) for thetas [B, P], without a graph."""
        with torch.no_grad():
            probs, usage = self.backend.run(check_call(self.backend, thetas.detach(), self.shots, "forward"))
        self._count("forward", usage)
        return probs, usage

    def vjp(self, thetas: torch.Tensor, grad_probs: torch.Tensor):
        """(dL/dtheta [B, P], usage) for dL/dp = grad_probs [B, 2^n]."""
        grad, usage = self.strategy.vjp(self.backend, thetas.detach(), grad_probs.detach(), self.shots)
        self._count("gradient", usage)
        return grad, usage

    def __call__(self, thetas: torch.Tensor) -> torch.Tensor:
        squeeze = thetas.dim() == 1
        thetas = thetas.unsqueeze(0) if squeeze else thetas
        if isinstance(self.strategy, Autograd):
            if self.shots is not None:
                raise ValueError("gradient='autograd' needs shots=None; use parameter_shift or spsa with shots")
            probs = self.backend.exact_probabilities(thetas)
            self._count("forward", Usage(self.backend.name, circuits=thetas.shape[0]))
            probs = probs.to(thetas.device, thetas.dtype)
        else:
            probs = _QNNFunction.apply(thetas, self)
        return probs[0] if squeeze else probs
