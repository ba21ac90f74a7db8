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

    def calls_per_vjp(self, n_params: int, shots: int | None) -> int:
        return 0

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

    def calls_per_vjp(self, n_params: int, shots: int | None) -> int:
        return 1  # executor calls (Runtime jobs) per VJP

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
    """Simultaneous-perturbation estimate: 2 * samples circuits per parameter set, seeded. `samples` > 1
    averages that many perturbations per call; `decay` > 0 shrinks the perturbation as epsilon / (k+1)^decay
    over the calls k = 0, 1, ... (Spall's schedule; 0.101 is his recommended exponent), so the O(epsilon^2)
    bias of the finite difference fades as training goes on."""

    name = "spsa"

    def __init__(self, epsilon: float = 0.1, samples: int = 1, seed: int = 0, decay: float = 0.0):
        if isinstance(samples, bool) or not isinstance(samples, int):
            raise ValueError(f"SPSA's samples must be an int, got {samples!r}")
        if epsilon <= 0 or samples < 1 or not 0 <= decay <= 1:
            raise ValueError(
                f"SPSA needs epsilon > 0, samples >= 1 and decay in [0, 1], got {epsilon}, {samples}, {decay}"
            )
        self.epsilon, self.samples, self.decay = epsilon, samples, decay
        self.generator = torch.Generator().manual_seed(seed)
        self.calls = 0

    def circuits(self, n_params: int) -> int:
        return 2 * self.samples

    def calls_per_vjp(self, n_params: int, shots: int | None) -> int:
        return 1

    def vjp(self, backend, thetas, grad_probs, shots=None):
        thetas, shots, _ = check_call(backend, thetas, shots)
        B, P = thetas.shape
        eps = self.epsilon / (self.calls + 1) ** self.decay
        self.calls += 1
        delta = torch.randint(0, 2, (B, self.samples, P), generator=self.generator).to(thetas) * 2 - 1
        points = torch.cat([thetas[:, None] + eps * delta, thetas[:, None] - eps * delta], 1)
        probs, usage = backend.run(CircuitCall(points.reshape(-1, P), shots, "gradient"))
        probs = probs.to(grad_probs.device, grad_probs.dtype).view(B, 2, self.samples, -1)
        slope = torch.einsum("bsi,bi->bs", probs[:, 0] - probs[:, 1], grad_probs) / (2 * eps)
        return (slope[..., None] * delta.to(slope)).mean(1).to(thetas.dtype), usage


class ShotAdaptive:
    """Parameter shift that spends shots where the noise is: each angle's pair of shifted circuits gets
    n_j = snr * sigma_j * sum_k sigma_k / |g|^2 shots (between min_shots and the job's shots), where sigma_j^2
    is the per-shot variance of that angle's term and g the gradient, both running averages over earlier calls
    (gCANS, Gu et al. 2021, arXiv:2108.10434, refining iCANS, Kuebler et al. 2020, Quantum 4, 263). That
    allocation minimises the estimate's variance for its total shots and makes the expected squared error
    |g|^2 / snr, i.e. `snr` is the signal-to-noise ratio asked for. Shot counts are rounded up to
    min_shots * 2^k, and circuits of equal shots go out as one call, so an IBM Runtime job never mixes shot
    counts. Each call's estimate is unbiased (the allocation depends only on earlier calls); `shots` is a cap,
    so the forecast's naive figure bounds what it spends."""

    name = "shot_adaptive"

    def __init__(self, min_shots: int = 32, snr: float = 4.0, momentum: float = 0.9, shift: float = math.pi / 2):
        if isinstance(min_shots, bool) or not isinstance(min_shots, int) or min_shots < 2:
            raise ValueError(f"shot_adaptive needs min_shots >= 2 (an int), got {min_shots!r}")
        if not snr > 0 or not 0 <= momentum < 1 or not 0 < shift < math.pi:
            raise ValueError(
                f"shot_adaptive needs snr > 0, momentum in [0, 1), shift in (0, pi); got {snr}, {momentum}"
            )
        self.min_shots, self.snr, self.momentum, self.shift = min_shots, snr, momentum, shift
        self.mean_g = self.mean_var = None  # running averages [P] (bias-corrected by `weight`)
        self.weight = 0.0
        self.last_shots: list[int] = []  # per angle, of the latest call

    def circuits(self, n_params: int) -> int:
        return 2 * n_params

    def levels(self, cap: int) -> list[int]:
        """The shot counts an angle can get: min_shots x 2^k below the cap, and the cap."""
        out = [min(self.min_shots, cap)]
        while out[-1] < cap:
            out.append(min(out[-1] * 2, cap))
        return out

    def calls_per_vjp(self, n_params: int, shots: int | None) -> int:
        """At most one executor call per shot count used (the forecast's bound)."""
        return min(n_params, len(self.levels(shots))) if shots else 0

    def allocation(self, n_params: int, cap: int) -> list[int]:
        """Shots per angle for the next call: min_shots until there is a gradient to scale by."""
        low = min(self.min_shots, cap)
        if self.mean_g is None or self.mean_g.numel() != n_params:
            return [low] * n_params
        g2 = float((self.mean_g / self.weight).square().sum())
        sigma = (self.mean_var / self.weight).clamp_min(0).sqrt()
        if g2 <= 0 or float(sigma.sum()) <= 0:
            return [low] * n_params
        want = (self.snr * sigma * sigma.sum() / g2).tolist()
        levels = self.levels(cap)
        return [next((level for level in levels if level >= n), cap) for n in want]

    def vjp(self, backend, thetas, grad_probs, shots=None):
        thetas, cap, _ = check_call(backend, thetas, shots)
        if cap is None:
            raise ValueError("gradient='shot_adaptive' chooses shots per circuit up to `shots`: set shots")
        B, P = thetas.shape
        per_angle = self.allocation(P, cap)
        eye = torch.eye(P, dtype=thetas.dtype, device=thetas.device) * self.shift
        grad_probs = grad_probs.to(torch.float64)
        dp = torch.zeros(B, 2, P, grad_probs.shape[-1], dtype=torch.float64)
        usage = Usage(backend.name)
        for level in sorted(set(per_angle)):  # one call (one Runtime job) per shot count
            idx = [j for j, n in enumerate(per_angle) if n == level]
            sel = eye[idx]
            points = torch.cat([thetas[:, None, :] + sel, thetas[:, None, :] - sel], 1)  # [B, 2k, P]
            probs, u = backend.run(CircuitCall(points.reshape(-1, P), level, "gradient"))
            dp[:, :, idx] = probs.to(torch.float64).view(B, 2, len(idx), -1).cpu()
            usage = usage + u
        gp = grad_probs.cpu()
        mean = torch.einsum("bspi,bi->bsp", dp, gp)  # the term's expectation per shifted circuit
        var = torch.einsum("bspi,bi->bsp", dp, gp.square()) - mean.square()  # per shot
        scale = 2 * math.sin(self.shift)
        g = (mean[:, 0] - mean[:, 1]) / scale  # [B, P]
        var_term = (var[:, 0] + var[:, 1]).clamp_min(0) / scale**2  # per-shot variance of g_j's estimate
        m = self.momentum
        fresh_g, fresh_v = g.mean(0), var_term.mean(0)  # signed: noise averages out of the running mean
        if self.mean_g is None or self.mean_g.numel() != P:
            self.mean_g, self.mean_var, self.weight = torch.zeros_like(fresh_g), torch.zeros_like(fresh_v), 0.0
        self.mean_g = m * self.mean_g + (1 - m) * fresh_g
        self.mean_var = m * self.mean_var + (1 - m) * fresh_v
        self.weight = m * self.weight + (1 - m)
        self.last_shots = per_angle
        return g.to(thetas.device, thetas.dtype), usage


STRATEGIES = {"autograd": Autograd, "parameter_shift": ParameterShift, "spsa": SPSA, "shot_adaptive": ShotAdaptive}


def make_strategy(gradient, backend: QuantumBackend, shots, options: dict | None = None):
    """A strategy object from its name ('auto' resolved for this executor) and options, or the object itself."""
    if not isinstance(gradient, str):
        return gradient
    return build_strategy(resolve_gradient(gradient, differentiable(backend), shots), options)


def build_strategy(name: str, options: dict | None = None):
    """STRATEGIES[name](**options); a ValueError naming the option and the ones allowed for a wrong one."""
    import inspect

    cls = STRATEGIES[name]
    allowed = [p for p in inspect.signature(cls).parameters]
    unknown = sorted(set(options or {}) - set(allowed))
    if unknown:
        raise ValueError(f"gradient_options {unknown} do not apply to {name!r}; its options: {allowed or 'none'}")
    return cls(**(options or {}))


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

    def __init__(self, backend: QuantumBackend, gradient="auto", shots: int | None = None, options: dict | None = None):
        if shots is not None and (not isinstance(shots, int) or isinstance(shots, bool) or shots <= 0):
            raise ValueError(f"shots must be a positive int or None (exact), got {shots!r}")
        self.backend, self.shots = backend, shots
        self.strategy = make_strategy(gradient, backend, shots, options)
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
