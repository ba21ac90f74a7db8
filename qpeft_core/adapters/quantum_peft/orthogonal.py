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
from functools import lru_cache

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
        cols = self._columns(batch, k)
        return cols if thetas.dim() == 2 else cols[0]

    def _columns(self, thetas: torch.Tensor, k: int) -> torch.Tensor:
        """[B, dim, k] for thetas [B, P]."""
        basis = torch.eye(k, self.dim, dtype=thetas.dtype, device=thetas.device).expand(thetas.shape[0], k, self.dim)
        return self.apply(thetas, basis).transpose(1, 2)


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


def _kron(factors: list[torch.Tensor]) -> torch.Tensor:
    """Batched Kronecker product of [..., p_i, p_i] factors, the first one slowest -> [..., P, P].

    Halves are joined by an outer-product matmul plus one transposing copy: the broadcast multiply that
    forms the same products has a backward of strided reductions over size-2 dims, several times slower.
    """
    if len(factors) == 1:
        return factors[0]
    a, b = _kron(factors[: len(factors) // 2]), _kron(factors[len(factors) // 2 :])
    lead, p, q = a.shape[:-2], a.shape[-1], b.shape[-1]
    outer = torch.matmul(a.reshape(*lead, p * p, 1), b.reshape(*lead, 1, q * q))
    return outer.view(*lead, p, p, q, q).transpose(-3, -2).reshape(*lead, p * q, p * q)


class _ChunkGemm(torch.autograd.Function):
    """Y = mat @ X for mat [B, S, S], X [B, S, R], with one operand held transposed in memory.

    slow=False: x [B, R, S] holds X^T, the result [B, S, R] holds Y. slow=True: x [B, S, R] holds X, the
    result [B, R, S] holds Y^T. Autograd's bmm would hand back dX contiguous in the [B, S, R] layout of the
    transposed view and pay a copy to undo that; here each gradient is written in its operand's layout.
    """

    @staticmethod
    def forward(ctx, mat, x, slow):
        ctx.save_for_backward(mat, x)
        ctx.slow = slow
        if slow:
            return torch.bmm(x.transpose(1, 2), mat.transpose(1, 2))
        return torch.bmm(mat, x.transpose(1, 2))

    @staticmethod
    def backward(ctx, grad):
        mat, x = ctx.saved_tensors
        grad = grad.contiguous()
        d_mat = d_x = None
        if ctx.slow:  # grad holds dY^T, x holds X
            if ctx.needs_input_grad[0]:
                d_mat = torch.bmm(grad.transpose(1, 2), x.transpose(1, 2))
            if ctx.needs_input_grad[1]:
                d_x = torch.bmm(mat.transpose(1, 2), grad.transpose(1, 2))
        else:  # grad holds dY, x holds X^T
            if ctx.needs_input_grad[0]:
                d_mat = torch.bmm(grad, x)
            if ctx.needs_input_grad[1]:
                d_x = torch.bmm(grad.transpose(1, 2), mat)
        return d_mat, d_x, None


def _chunk_plan(sizes: tuple[int, ...], limit: int) -> list[tuple[int, int, int]]:
    """Consecutive wire ranges (lo, hi, levels): the fewest chunks of <= limit levels (a lone wire may
    exceed it), and among those the most even ones. Every chunk costs one pass over the state per block;
    within a pass the GEMM work grows with the chunk, so 576 = 2^6 x 3^2 runs faster as 32 x 18 than as
    64 x 9."""
    best = {0: (0, 0, ())}  # wires [0, hi) -> (chunks, largest chunk, plan)
    for hi in range(1, len(sizes) + 1):
        options = []
        for lo in range(hi):
            size = math.prod(sizes[lo:hi])
            if size <= limit or hi - lo == 1:
                count, largest, plan = best[lo]
                options.append((count + 1, max(largest, size), (*plan, (lo, hi, size))))
        best[hi] = min(options)
    return list(best[len(sizes)][2])


def _parity_signs(sizes: tuple[int, ...], pairs) -> np.ndarray:
    """(-1)^(sum a_i a_j over pairs) for every index of the digits `sizes` (digit 0 fastest)."""
    idx = np.arange(math.prod(sizes))
    strides = np.cumprod((1,) + sizes[:-1])
    digit = [(idx // s) % p for s, p in zip(strides, sizes, strict=True)]
    return 1 - 2 * (sum(digit[i] * digit[j] for i, j in pairs) % 2)


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
        # one GEMM per chunk of consecutive wires and block
        self.chunks = _chunk_plan(self.sizes, _FUSE_DIM)
        # block: ([(wire, first angle)], {chunk: CZ pairs inside it}, CZ pairs across chunks). A CZ inside a
        # rotated chunk is a +-1 row scaling of that chunk's matrix, exact and free; the rest needs a pass.
        self.blocks, p = [], 0
        for wires, pairs in plan:
            starts, inner, across = [], {}, []
            for w in wires:
                starts.append((w, p))
                p += sizes[w] - 1
            for i, j in pairs:
                c = next(c for c, (lo, hi, _) in enumerate(self.chunks) if lo <= i < hi)
                lo, hi, _ = self.chunks[c]
                if j < hi and any(lo <= w < hi for w in wires):
                    inner.setdefault(c, []).append((i - lo, j - lo))
                else:
                    across.append((i, j))
            self.blocks.append((starts, {c: tuple(v) for c, v in inner.items()}, tuple(across)))
        self.n_params = p
        # All blocks' matrices are built at once, [B, n_blocks, ...]: per radix, the angles of each block's
        # ladder on each wire of that radix, n_params (a zero angle, an exact identity ladder) where none
        self._ladder_index = {}
        for q in sorted(set(sizes)):
            wires = [w for w in range(m) if sizes[w] == q]
            idx = np.full((len(self.blocks), len(wires), q - 1), p)
            for b, (starts, _, _) in enumerate(self.blocks):
                for w, s in starts:
                    if sizes[w] == q:
                        idx[b, wires.index(w)] = np.arange(s, s + q - 1)
            self._ladder_index[q] = (wires, idx)
        self._rotated = [
            [any(lo <= w < hi for w, _ in starts) for lo, hi, _ in self.chunks] for starts, _, _ in self.blocks
        ]
        self._inner_signs = []  # per chunk: [n_blocks, size] row signs, None where no block has any
        for c, (lo, hi, size) in enumerate(self.chunks):
            table = np.ones((len(self.blocks), size))
            for b, (_, inner, _) in enumerate(self.blocks):
                if c in inner:
                    table[b] = _parity_signs(self.sizes[lo:hi], inner[c])
            self._inner_signs.append(None if (table == 1).all() else table)
        self._signs: dict = {}

    def _tensor(self, key, make, like):
        key = (key, like.dtype, like.device)
        if key not in self._signs:
            self._signs[key] = torch.as_tensor(make(), device=like.device)
            if self._signs[key].is_floating_point():
                self._signs[key] = self._signs[key].to(like.dtype)
        return self._signs[key]

    def _chunk_mats(self, thetas) -> list:
        """Per block and chunk, the [B, size, size] Kronecker product of the chunk's ladders with the
        block's CZ signs inside it applied; None where the block rotates none of the chunk's wires. Built
        for all blocks at once: the few dozen tiny ops per block would otherwise cost more than the math."""
        padded = torch.cat([thetas, thetas.new_zeros(thetas.shape[0], 1)], 1)
        factors = {}
        for q, (wires, idx) in self._ladder_index.items():
            ladders = givens_ladder(padded[:, self._tensor(("ladder", q), lambda idx=idx: idx, thetas)], q)
            factors.update({w: ladders[:, :, i] for i, w in enumerate(wires)})
        per_chunk = []
        for c, (lo, hi, _) in enumerate(self.chunks):
            # higher wire = slower digit = left Kronecker factor
            mat = _kron([factors[w] for w in reversed(range(lo, hi))])
            if self._inner_signs[c] is not None:
                mat = mat * self._tensor(("inner", c), lambda c=c: self._inner_signs[c], thetas)[:, :, None]
            per_chunk.append(mat.unbind(1))
        return [
            [mats[b] if rotated else None for mats, rotated in zip(per_chunk, self._rotated[b], strict=True)]
            for b in range(len(self.blocks))
        ]

    def _rotate(self, x, mats: list, flipped: bool):
        """Apply the chunk matrices (identity where None) to x, the flat [B, M * dim] state. Unflipped,
        memory holds (M, digits) and every chunk GEMM takes the fastest digit and writes it slowest;
        flipped, memory holds (digits, M) and chunks go the other way round. After all chunks the digits
        are back in order and only M has moved, so the flag toggles, and the transposing copies that a
        GEMM per chunk would otherwise need are never made."""
        B = x.shape[0]
        order = reversed(range(len(self.chunks))) if flipped else range(len(self.chunks))
        for c in order:
            size = self.chunks[c][2]
            view = x.view(B, size, -1) if flipped else x.view(B, -1, size)
            # with nothing to rotate the digit must still move along, as a GEMM would have moved it
            x = view.transpose(1, 2).contiguous() if mats[c] is None else _ChunkGemm.apply(mats[c], view, flipped)
        return x.reshape(B, -1)

    def _run(self, x, m: int, mats, blocks, flipped: bool):
        B = x.shape[0]
        for block, block_mats in zip(blocks, mats, strict=True):
            x, flipped = self._rotate(x, block_mats, flipped), not flipped
            if block[2]:
                sign = self._tensor(("across", block[2]), lambda p=block[2]: _parity_signs(self.sizes, p), x)
                x = (x.view(B, self.dim, m) * sign[:, None] if flipped else x.view(B, m, self.dim) * sign).view(B, -1)
        return x.view(B, self.dim, m).transpose(1, 2) if flipped else x.view(B, m, self.dim)

    def apply(self, thetas, x):
        B, m = x.shape[0], x.shape[1]
        return self._run(x.to(thetas.dtype).reshape(B, -1), m, self._chunk_mats(thetas), self.blocks, False)

    def _columns(self, thetas, k):
        # The first block rotates every wire and entangles nothing: Q_0 is the Kronecker product of the
        # chunk matrices, so column j is the outer product of each chunk's column at j's digit there. That
        # is the same single product per entry that the GEMMs on e_j would form, without the GEMMs.
        B, cols, post = thetas.shape[0], None, 1
        j = torch.arange(k, device=thetas.device)
        mats = self._chunk_mats(thetas)
        for (_, _, size), mat in zip(self.chunks, mats[0], strict=True):
            col = mat[:, :, (j // post) % size]
            cols = col if cols is None else (col[:, :, None] * cols[:, None]).reshape(B, -1, k)
            post *= size
        # cols [B, dim, k] holds the (digits, M) order, the flipped layout
        return self._run(cols.reshape(B, -1), k, mats[1:], self.blocks[1:], True).transpose(1, 2)

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
