"""Exactly orthogonal d x d maps for any d, used through their first K columns.

Every map here is a structure (no parameters of its own) with `n_params` angles, batched over B
parameter sets: `apply(thetas [B, P], x [B, M, d])` returns Q(theta_b) x_bm for each of the M row
vectors. The first K columns of Q are `columns(thetas, K)` = Q [e_0 .. e_{K-1}], so a d x d matrix is
never built. Batching lets one call serve every adapted matrix of the same size in a model.

- `PauliQubits` (d = 2^n): the Quantum-PEFT Pauli circuit, run by the adjoint simulator.
- `MixedRadix` (d = p_0 p_1 ... with small primes p_i): the same circuit layout on qudit wires; a
  p-level "RY" is a ladder of p-1 Givens rotations, a "CZ" is the +-1 diagonal (-1)^(a_i a_j).
- `DirectSum` (any d, e.g. with a large prime factor): Q = G(psi) (Q_a + Q_b) G(phi) on a split
  d = d_a + d_b with d_a the largest power of two below d, where G mixes the blocks pairwise.
- `CayleyColumns` (the "taylor" mapping): first K columns of the Cayley transform of a skew generator
  confined to the first K rows/columns, in O(d K^2).

Products, Kronecker products and direct sums of orthogonal factors are orthogonal, so every map is
orthogonal up to rounding, never by padding and cropping.
"""

from __future__ import annotations

import math
from functools import lru_cache, reduce

import numpy as np
import torch

from qpeft_core.quantum.ansatz import pauli_ansatz
from qpeft_core.quantum.simulator import evolve

CONSTRUCTIONS = ("auto", "mixed_radix", "direct_sum")
MAX_RADIX = 7  # "auto" uses qudit wires only for primes up to this; larger primes go to a direct sum
_HARD_MAX_RADIX = 64  # a Givens ladder is built level by level: beyond this, a direct sum is the way
_FUSE_DIM = 64  # consecutive wires are fused into one Kronecker matmul up to this size


class Orthogonal:
    dim: int
    n_params: int

    def apply(self, thetas: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def columns(self, thetas: torch.Tensor, k: int) -> torch.Tensor:
        """Q(theta)[:, :k]: [dim, k] for thetas [P], [B, dim, k] for thetas [B, P]; dtype/device of thetas."""
        if not 0 < k <= self.dim:
            raise ValueError(f"need 0 < k <= dim = {self.dim}, got k = {k}")
        if thetas.shape[-1:] != (self.n_params,) or thetas.dim() > 2:
            raise ValueError(f"{self} takes [B, {self.n_params}] angles, got shape {tuple(thetas.shape)}")
        batch = thetas.reshape(-1, self.n_params)
        basis = torch.eye(k, self.dim, dtype=thetas.dtype, device=thetas.device).expand(batch.shape[0], k, self.dim)
        cols = self.apply(batch, basis).transpose(1, 2)
        return cols if thetas.dim() == 2 else cols[0]


class Identity(Orthogonal):
    """The 1 x 1 block left over by a direct-sum split; no angles."""

    def __init__(self, dim: int = 1):
        self.dim, self.n_params = dim, 0

    def apply(self, thetas, x):
        return x

    def __repr__(self):
        return f"identity({self.dim})"


class PauliQubits(Orthogonal):
    """The qubit Pauli circuit `pauli_ansatz(n, L)`: (2L+1) n - 2L angles (n for n = 1)."""

    def __init__(self, n_qubits: int, layers: int):
        self.ansatz = pauli_ansatz(n_qubits, layers)
        self.dim, self.n_params = 1 << n_qubits, self.ansatz.n_params

    def apply(self, thetas, x):
        return evolve(self.ansatz, thetas, x.to(thetas.dtype))

    def __repr__(self):
        return f"qubits({self.ansatz.n_qubits})"


def givens_ladder(angles: torch.Tensor, p: int) -> torch.Tensor:
    """[..., p, p] products G_{p-2} ... G_0 for angles [..., p-1], G_k rotating levels (k, k+1) by angle/2.

    For p = 2 this is exactly RY(angle) = [[cos a/2, -sin a/2], [sin a/2, cos a/2]]. Applied to |0>, the
    ladder reaches every level, which is what makes it a p-level analogue of RY.
    """
    eye = torch.eye(p, dtype=angles.dtype, device=angles.device)
    rows = [eye[i].expand(*angles.shape[:-1], p) for i in range(p)]
    cos, sin = torch.cos(angles * 0.5)[..., None], torch.sin(angles * 0.5)[..., None]
    for k in range(p - 1):
        c, s = cos[..., k, :], sin[..., k, :]
        rows[k], rows[k + 1] = c * rows[k] - s * rows[k + 1], s * rows[k] + c * rows[k + 1]
    return torch.stack(rows, -2)


def _kron(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Batched Kronecker product [B, p, p] x [B, q, q] -> [B, pq, pq]."""
    B, p, q = a.shape[0], a.shape[-1], b.shape[-1]
    return (a[:, :, None, :, None] * b[:, None, :, None, :]).reshape(B, p * q, p * q)


class MixedRadix(Orthogonal):
    """The Pauli circuit layout on wires of sizes `sizes` (wire 0 = least significant digit).

    RY on all wires, then L times [RY on 0..m-2, CZ (0,1),(2,3).., RY on 1..m-1, CZ (1,2),(3,4)..], with a
    p-level RY taking p-1 angles. With S = sum(p_i - 1): S + L (2S - (p_0 - 1) - (p_{m-1} - 1)) angles
    (S for a single wire), which for all-qubit wires is (2L+1) n - 2L, the qubit circuit itself.
    """

    def __init__(self, sizes: tuple[int, ...], layers: int):
        if not sizes or min(sizes) < 2 or max(sizes) > _HARD_MAX_RADIX:
            raise ValueError(f"wire sizes must lie in 2..{_HARD_MAX_RADIX}, got {sizes}")
        self.sizes, self.layers = tuple(sizes), layers
        self.dim = math.prod(sizes)
        m = len(sizes)
        plan = [(range(m), ())]
        if m > 1:
            even = tuple((i, i + 1) for i in range(0, m - 1, 2))
            odd = tuple((i, i + 1) for i in range(1, m - 1, 2))
            plan += [(range(m - 1), even), (range(1, m), odd)] * layers
        self.blocks, p = [], 0  # block: ([(wire, first angle)], entangling pairs)
        for wires, pairs in plan:
            starts = []
            for w in wires:
                starts.append((w, p))
                p += sizes[w] - 1
            self.blocks.append((starts, pairs))
        self.n_params = p
        # fuse consecutive wires into chunks of <= _FUSE_DIM levels: one GEMM per chunk and layer
        self.chunks, lo = [], 0
        while lo < m:
            hi, size = lo + 1, sizes[lo]
            while hi < m and size * sizes[hi] <= _FUSE_DIM:
                size, hi = size * sizes[hi], hi + 1
            self.chunks.append((lo, hi, size))
            lo = hi
        self._signs: dict = {}

    def _sign(self, pairs, like):
        key = (pairs, like.dtype, like.device)
        if key not in self._signs:
            idx = np.arange(self.dim)
            strides = np.cumprod((1,) + self.sizes[:-1])
            digit = [(idx // s) % p for s, p in zip(strides, self.sizes, strict=True)]
            parity = sum(digit[i] * digit[j] for i, j in pairs) % 2
            self._signs[key] = torch.as_tensor(1 - 2 * parity, dtype=like.dtype, device=like.device)
        return self._signs[key]

    def _rotate(self, x, mats: dict):
        """Apply the Kronecker product of per-wire matrices [B, p, p] (identity where absent) to x [B, M, dim]."""
        B, M, post = x.shape[0], x.shape[1], 1  # post = number of digit values below the chunk
        for lo, hi, size in self.chunks:
            if any(w in mats for w in range(lo, hi)):
                eyes = [torch.eye(p, dtype=x.dtype, device=x.device).expand(B, p, p) for p in self.sizes[lo:hi]]
                # higher wire = slower digit = left Kronecker factor
                mat = reduce(_kron, [mats.get(w, eyes[w - lo]) for w in reversed(range(lo, hi))])
                # bring the chunk's digit to the front: one [size, size] @ [size, rest] GEMM per map
                y = x.reshape(B, -1, size, post).transpose(1, 2).reshape(B, size, -1)
                x = torch.bmm(mat, y).reshape(B, size, -1, post).transpose(1, 2).reshape(B, M, self.dim)
            post *= size
        return x

    def apply(self, thetas, x):
        x = x.to(thetas.dtype)
        for starts, pairs in self.blocks:
            mats = {w: givens_ladder(thetas[:, s : s + self.sizes[w] - 1], self.sizes[w]) for w, s in starts}
            x = self._rotate(x, mats)
            if pairs:
                x = x * self._sign(pairs, x)
        return x

    def __repr__(self):
        twos = self.sizes.count(2)
        parts = ([f"2^{twos}"] if twos > 1 else ["2"] * twos) + [str(p) for p in self.sizes if p != 2]
        return f"radix({' x '.join(parts)})"


class DirectSum(Orthogonal):
    """Q = G(psi) (Q_a (+) Q_b) G(phi) on d = d_a + d_b, d_a >= d_b.

    G(t) rotates each pair of coordinates (i, d_a + i), i < d_b, by t/2: the direct-sum counterpart of an
    RY on a "which block" qubit (for d_a = d_b it is exactly that). Mixing before the blocks sends every
    column into both blocks, so both circuits shape U_K; mixing after couples their outputs.
    n_params = n_a + n_b + 2.
    """

    def __init__(self, a: Orthogonal, b: Orthogonal):
        if a.dim < b.dim:
            raise ValueError("the first block must be the larger one")
        self.a, self.b = a, b
        self.dim, self.n_params = a.dim + b.dim, a.n_params + b.n_params + 2

    def _mix(self, x, angle):
        da, db = self.a.dim, self.b.dim
        c, s = torch.cos(angle * 0.5)[:, None, None], torch.sin(angle * 0.5)[:, None, None]
        top, mid, bot = x[..., :db], x[..., db:da], x[..., da:]
        return torch.cat([c * top - s * bot, mid, s * top + c * bot], -1)

    def apply(self, thetas, x):
        na, nb, da = self.a.n_params, self.b.n_params, self.a.dim
        x = self._mix(x.to(thetas.dtype), thetas[:, na + nb])
        x = torch.cat(
            [self.a.apply(thetas[:, :na], x[..., :da]), self.b.apply(thetas[:, na : na + nb], x[..., da:])], -1
        )
        return self._mix(x, thetas[:, na + nb + 1])

    def __repr__(self):
        return f"sum({self.a!r}, {self.b!r})"


def prime_factors(d: int) -> list[int]:
    out, p = [], 2
    while p * p <= d:
        while d % p == 0:
            out.append(p)
            d //= p
        p += 1
    return out + ([d] if d > 1 else [])


@lru_cache(maxsize=256)
def build_circuit(dim: int, layers: int, construction: str = "auto", max_radix: int = MAX_RADIX) -> Orthogonal:
    """The orthogonal circuit for `dim`: qubits for powers of two; otherwise qudit wires ("mixed_radix"),
    a binary direct sum down to powers of two ("direct_sum"), or "auto": qudits when every prime factor
    is <= max_radix, else a direct-sum split whose blocks are built by "auto" again."""
    if construction not in CONSTRUCTIONS:
        raise ValueError(f"construction must be one of {CONSTRUCTIONS}, got {construction!r}")
    if dim < 1 or layers < 0:
        raise ValueError(f"need dim >= 1 and layers >= 0, got dim={dim}, layers={layers}")
    if dim == 1:
        return Identity()
    if dim & (dim - 1) == 0:
        return PauliQubits(dim.bit_length() - 1, layers)
    primes = prime_factors(dim)
    if construction == "mixed_radix" or (construction == "auto" and primes[-1] <= max_radix):
        if primes[-1] > _HARD_MAX_RADIX:
            raise ValueError(f"{dim} has the prime factor {primes[-1]}; use construction='direct_sum' or 'auto'")
        return MixedRadix(tuple(primes), layers)
    da = 1 << (dim.bit_length() - 1)
    return DirectSum(
        build_circuit(da, layers, construction, max_radix), build_circuit(dim - da, layers, construction, max_radix)
    )


def pauli_param_count(dim: int, layers: int, construction: str = "auto", max_radix: int = MAX_RADIX) -> int:
    return build_circuit(dim, layers, construction, max_radix).n_params


class CayleyColumns:
    """First k columns of Q = (I - A/2)^-1 (I + A/2), A = [[S, -B^T], [B, 0]] skew (S k x k, B (d-k) x k).

    The Cayley transform is the [1/1] Pade approximant of exp(A): the first-order Taylor step made exactly
    orthogonal. Solving (I - A/2) X = (I + A/2) E block-wise gives, with M = B^T B / 4,
        X_top = (I - S/2 + M)^-1 (I + S/2 - M),   X_bottom = B/2 (I + X_top),
    one k x k solve, O(d k^2). Confining A to the first k rows/columns loses nothing locally:
    n_params = d k - k (k + 1) / 2 is the dimension of the manifold of k-frames in R^d.
    Layout: the strictly lower triangle of S (row-major), then B row-major.
    """

    def __init__(self, dim: int, k: int):
        if not 0 < k <= dim:
            raise ValueError(f"need 0 < k <= dim = {dim}, got k = {k}")
        self.dim, self.k = dim, k
        self.n_params = dim * k - k * (k + 1) // 2
        self._tril = torch.tril_indices(k, k, -1).tolist()

    def columns(self, params: torch.Tensor, k: int | None = None) -> torch.Tensor:
        """[dim, k] for params [P], [B, dim, k] for params [B, P]."""
        if k not in (None, self.k):
            raise ValueError(f"this map was built for k = {self.k}")
        if params.shape[-1:] != (self.n_params,) or params.dim() > 2:
            raise ValueError(f"{self} takes [B, {self.n_params}] parameters, got shape {tuple(params.shape)}")
        k, n_s = self.k, self.k * (self.k - 1) // 2
        # float64 inside: exactness rests on the k x k Gram B^T B, a sum over d terms that float32 rounds
        # to ~1e-6 at d = 50k; the work is O(d k^2), so the wider type costs nothing that matters
        work = params.reshape(-1, self.n_params).double()
        lower = work.new_zeros(work.shape[0], k, k)
        lower[:, self._tril[0], self._tril[1]] = work[:, :n_s]
        half_s = (lower - lower.mT) * 0.5
        half_b = work[:, n_s:].reshape(work.shape[0], self.dim - k, k) * 0.5
        eye = torch.eye(k, dtype=work.dtype, device=work.device)
        m = half_b.mT @ half_b
        top = torch.linalg.solve(eye - half_s + m, eye + half_s - m)
        cols = torch.cat([top, half_b @ (eye + top)], 1).to(params.dtype)
        return cols if params.dim() == 2 else cols[0]

    def __repr__(self):
        return f"cayley({self.dim}, k={self.k})"


def quantize(x: torch.Tensor, bits: int | None) -> torch.Tensor:
    """Round to 2^bits levels per 2 pi (step 2 pi / 2^bits); the gradient passes straight through."""
    if bits is None:
        return x
    step = 2 * math.pi / (1 << bits)
    return x + (torch.round(x / step) * step - x).detach()
