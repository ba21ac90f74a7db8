"""Quantum-PEFT as an adapter method: per target, Delta W = s U diag(lambda) V^T.

Each target owns three parameters: `u` (angles of the d_out-dimensional map), `v` (of the d_in map) and
`lam` (r numbers, zero at init). The maps are shared structures from orthogonal.py; every U and V of the
same dimension in the model is computed in one batched call (BERT's 24 query/value matrices of 768: one
call), since per-map calls would cost more in Python overhead than in arithmetic.
"""

from __future__ import annotations

import torch
from torch import nn

from ..model import AdapterMethod
from .orthogonal import CayleyColumns, build_circuit, quantize


def _map(config, dim: int):
    if config.mapping == "taylor":
        return CayleyColumns(dim, config.r)
    return build_circuit(dim, config.layers, config.construction, config.max_radix)


def param_count(config, d_out: int, d_in: int) -> int:
    """Trainable numbers for one d_out x d_in target: n(d_out) + n(d_in) + r
    (Pauli, powers of two: [(2L+1) log2 d_out - 2L] + [(2L+1) log2 d_in - 2L] + r)."""
    return _map(config, d_out).n_params + _map(config, d_in).n_params + config.r


class _Target(nn.Module):
    def __init__(self, n_u: int, n_v: int, r: int, std_u: float, std_v: float):
        super().__init__()
        self.u = nn.Parameter(torch.randn(n_u) * std_u)
        self.v = nn.Parameter(torch.randn(n_v) * std_v)
        self.lam = nn.Parameter(torch.zeros(r))


class QuantumPEFTMethod(AdapterMethod):
    def __init__(self, config, targets):
        super().__init__(config, targets)
        r = config.r
        for t in targets.values():
            if r > min(t.d_in, t.d_out):
                raise ValueError(
                    f"QuantumPEFTConfig.r = {r} exceeds min(d_in, d_out) = {min(t.d_in, t.d_out)} of {t.name}"
                )
        self.maps = {d: _map(config, d) for t in targets.values() for d in (t.d_out, t.d_in)}
        # taylor generators: entries ~ init_std / sqrt(d), so a column's leakage has norm ~ init_std at any d
        # stored parameters are angles / angle_scale, so the angles' distribution at init is the same for any scale
        std = {
            d: config.init_std / (d**0.5 if config.mapping == "taylor" else 1.0) / config.angle_scale for d in self.maps
        }
        self.keys = {name: name.replace(".", "__") for name in targets}  # module names cannot hold dots
        with torch.random.fork_rng(devices=[]):  # seeded init that leaves the caller's RNG alone
            torch.manual_seed(config.seed)
            self.adapters = nn.ModuleDict(
                {
                    self.keys[n]: _Target(
                        self.maps[t.d_out].n_params, self.maps[t.d_in].n_params, r, std[t.d_out], std[t.d_in]
                    )
                    for n, t in targets.items()
                }
            )
        mask = torch.ones(r) if config.rank_mask is None else torch.tensor(config.rank_mask, dtype=torch.float32)
        self.register_buffer("rank_mask", mask, persistent=False)  # derived from the config, not saved

    def orthonormal_factors(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """{target: (U [d_out, r], V [d_in, r])}, every map of one dimension in one batched call."""
        jobs: dict[int, list] = {}  # dim -> [(target, side, angles)]
        for name, t in self.targets.items():
            a = self.adapters[self.keys[name]]
            jobs.setdefault(t.d_out, []).append((name, 0, a.u))
            jobs.setdefault(t.d_in, []).append((name, 1, a.v))
        out = {name: [None, None] for name in self.targets}
        for dim, items in jobs.items():
            angles = torch.stack([p for _, _, p in items])
            if self.config.angle_scale != 1.0:
                angles = angles * self.config.angle_scale
            if angles.dtype in (torch.float16, torch.bfloat16):  # half precision would break orthonormality
                angles = angles.float()
            cols = self.maps[dim].columns(quantize(angles, self.config.quantize_bits), self.config.r)
            for (name, side, _), c in zip(items, cols, strict=True):
                out[name][side] = c
        return {name: tuple(uv) for name, uv in out.items()}

    def _weights(self, name):
        lam = self.adapters[self.keys[name]].lam
        return self.config.scaling * lam.to(torch.promote_types(lam.dtype, torch.float32)) * self.rank_mask

    def factors(self):
        return {name: (v.T, u * self._weights(name)) for name, (u, v) in self.orthonormal_factors().items()}

    def export_factors(self):
        # LoRA wants B @ A: split s * lambda as sign * sqrt | sqrt between the two sides, balancing their norms
        out = {}
        for name, (u, v) in self.orthonormal_factors().items():
            w = self._weights(name)
            root = w.abs().sqrt()
            out[name] = (root[:, None] * v.T, u * (torch.sign(w) * root))
        return out

    def num_parameters_formula(self) -> int:
        return sum(param_count(self.config, t.d_out, t.d_in) for t in self.targets.values())
