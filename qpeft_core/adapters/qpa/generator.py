"""QPA's classical half: post-processing of the QNN's probabilities and the mapping MLP.

Given the probabilities p of all 2^N basis states, basis state i (i < B) contributes the feature row
[N bits of i as +-1 (and, by bit_features, their products of two or three), p~_i]; the MLP turns each
row into n_mlp numbers; the B x n_mlp block, flattened, truncated to m and mean-subtracted, is the generated
parameter vector.
"""

from __future__ import annotations

import itertools
import math

import torch
from torch import nn

ACTIVATION_MODULES = {"gelu": nn.GELU, "relu": nn.ReLU, "silu": nn.SiLU, "tanh": nn.Tanh, "none": None}
# x^alpha has an infinite slope at 0; states a shot-based executor never saw (p = 0) get a zero gradient instead
POW_FLOOR = 1e-12


# bit_features -> the largest product of bits fed to the MLP ("pairs": each bit and each product of two)
BIT_ORDER = {"index": 1, "random": 1, "pairs": 2, "triples": 3}
REFERENCE_WIDTHS = [32, 64, 128, 128, 64, 32, 32]  # the reference code's mapping MLP


def n_inputs(n_qubits: int, bit_features: str, p_mode: str = "feature") -> int:
    """The MLP's inputs per state: its bit features, and p~ where p_mode="feature"."""
    return sum(math.comb(n_qubits, k) for k in range(1, BIT_ORDER[bit_features] + 1)) + (p_mode == "feature")


def budget_width(
    m: int, n_mlp: int, layers: int, extra: int, budget: float, bit_features: str = "index", p_mode: str = "feature"
) -> int:
    """The width of one hidden layer that keeps all trainable numbers (N L angles, the MLP
    inputs -> w -> n_mlp, `extra` others) within budget * m. ValueError if not even width 1 fits."""
    n = plan(m, n_mlp)[1]
    k = n_inputs(n, bit_features, p_mode)
    w = math.floor((budget * m - n * layers - extra - n_mlp) / (k + 1 + n_mlp))
    if w < 1:
        need = (n * layers + extra + n_mlp + k + 1 + n_mlp) / m
        raise ValueError(
            f"QPAConfig.param_budget={budget:g} leaves no room for a mapping MLP ({m} generated numbers, n_mlp "
            f"{n_mlp}): raise param_budget to at least {need:.3g}, lower n_mlp, or set mapping_widths"
        )
    return w


def n_gates(config, n_targets: int) -> int:
    """mapping="default" has one learnable gate per target on B; the reference has none."""
    return n_targets if config.mapping == "default" else 0


def resolve_widths(config, m: int, n_targets: int) -> list[int]:
    """QPAConfig.mapping_widths as built: given ones as they are; None: the reference's seven layers for
    mapping="reference", else one layer as wide as param_budget allows (next to the gates)."""
    if config.mapping_widths is not None:
        return list(config.mapping_widths)
    if config.mapping == "reference":
        return list(REFERENCE_WIDTHS)
    extra = n_gates(config, n_targets)
    return [
        budget_width(m, config.n_mlp, config.qnn_depth, extra, config.param_budget, config.bit_features, config.p_mode)
    ]


def plan(m: int, n_mlp: int) -> tuple[int, int]:
    """(B basis states, N qubits) to generate m parameters, n_mlp per state."""
    n_states = math.ceil(m / n_mlp)
    return n_states, max(1, math.ceil(math.log2(n_states)))


class QPAGenerator(nn.Module):
    """The QNN angles (`theta`, N * L of them) and the mapping MLP; `forward(p)` -> [m] parameters."""

    def __init__(
        self,
        m: int,
        n_mlp: int,
        layers: int,
        widths: list[int],
        activation: str = "gelu",
        bit_features: str = "index",
        gamma: float = 0.1,
        beta: float = 0.6,
        alpha: float = 0.15,
        last_layer_scale: float = 1.0,
        seed: int = 0,
        p_mode: str = "feature",
    ):
        super().__init__()
        self.m, self.n_mlp = m, n_mlp
        self.n_states, self.n_qubits = plan(m, n_mlp)
        self.gamma, self.beta, self.alpha, self.bit_features = gamma, beta, alpha, bit_features
        self.p_mode = p_mode
        n = self.n_qubits
        with torch.random.fork_rng(devices=[]):  # seeded init that leaves the caller's RNG alone
            torch.manual_seed(seed)
            self.theta = nn.Parameter(torch.rand(n * layers) * 2 * math.pi)
            sizes = [n_inputs(n, bit_features, p_mode), *widths, n_mlp]
            mods = []
            for k, (a, b) in enumerate(zip(sizes, sizes[1:], strict=False)):
                mods.append(nn.Linear(a, b))
                if ACTIVATION_MODULES[activation] is not None and k < len(sizes) - 2:
                    mods.append(ACTIVATION_MODULES[activation]())
            self.mlp = nn.Sequential(*mods)
        with torch.no_grad():
            self.mlp[-1].weight.mul_(last_layer_scale)
            self.mlp[-1].bias.mul_(last_layer_scale)
        index = torch.arange(self.n_states)[:, None] >> torch.arange(n)  # qubit q = bit q of the index
        self.register_buffer("bits", (index & 1).float() * 2 - 1, persistent=False)
        subsets = [c for k in range(2, BIT_ORDER[bit_features] + 1) for c in itertools.combinations(range(n), k)]
        products = [self.bits[:, list(c)].prod(1) for c in subsets]
        self.register_buffer("products", torch.stack(products, 1) if products else None, persistent=False)
        self.rng = torch.Generator().manual_seed(seed)  # for bit_features="random"

    def p_tilde(self, probs: torch.Tensor) -> torch.Tensor:
        """[B] post-processed probabilities of the first B basis states."""
        x = self.beta * torch.tanh(self.gamma * 2 ** (self.n_qubits - 1) * probs)
        x = x.clamp_min(POW_FLOOR) ** self.alpha
        return (x - x.mean())[: self.n_states]

    def features(self, probs: torch.Tensor) -> torch.Tensor:
        """[B, k] MLP inputs from the probabilities [2^N] of every basis state: the bit features, then p~
        where p_mode="feature"."""
        if self.bit_features == "random":
            bits = torch.randint(0, 2, self.bits.shape, generator=self.rng).to(probs) * 2 - 1
        elif self.products is not None:
            bits = torch.cat([self.bits, self.products], 1).to(probs)
        else:
            bits = self.bits.to(probs)
        if self.p_mode == "scale":
            return bits
        return torch.cat([bits, self.p_tilde(probs)[:, None]], 1)

    def forward(self, probs: torch.Tensor) -> torch.Tensor:
        rows = self.mlp(self.features(probs).to(self.mlp[0].weight.dtype))
        if self.p_mode == "scale":
            rows = rows * (1 + self.p_tilde(probs).to(rows.dtype))[:, None]
        out = rows.flatten()[: self.m]
        return out - out.mean()
