"""Fast real statevector simulator for RY / CX / CZ circuits, batched and differentiable.

RY, CX and CZ keep amplitudes real, so states are real tensors (float32 by default).

Forward, per block of the ansatz:
- The RY layer is a Kronecker product of 2x2 rotations. It is applied in chunks of k qubits as one
  batched GEMM per chunk: the state viewed as [2^(n-k), 2^k] is multiplied by the 2^k x 2^k Kronecker
  block and written transposed, which rotates the bit order by k; after all chunks (sum of k = n) the
  order is back where it started, so no explicit permute/copy is needed.
- The entanglers (CX, CZ) of a block form one signed permutation, applied as a single gather.
- From |0..0> (`amplitudes`, `probabilities`) the first layer's output is a product state: it is built
  from outer products, with no GEMM.

Backward is the adjoint method: only the angles and the final state are saved. Walking the blocks in
reverse, the state psi and the cotangent lambda are un-computed side by side (orthogonal gates:
inverse = transpose), so memory is O(state), not O(layers * state). Since RY's
generator G = -iY/2 commutes with every rotation of its layer, dL/dtheta_q = <lambda, G_q psi> can be
read anywhere inside the layer: we take it from the Gram matrix lambda^T psi over the low bits at each
chunk, one more GEMM of the same size. A product-state first layer is not un-computed at all: its
gradients are lambda contracted with the product state, two matrix-vector products.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np
import torch

from .ansatz import Ansatz

DEFAULT_FUSE = 4  # largest chunk of qubits fused into one Kronecker GEMM; tuned by benchmarks/qnn_sim.py
_GRAM_BITS = 4  # Grams over fewer bits are slow GEMM shapes; the extra bits are simply summed over
_WIDE_ROWS = 16  # up to this many rows per vector, one wide GEMM + a transposing copy beats M tiny GEMMs


@dataclass(frozen=True, eq=False)  # identity hash: keys the per-device tensor cache
class Compiled:
    n: int
    n_params: int
    chunks: tuple[int, ...]  # sizes of the qubit chunks (from bit 0 upwards), summing to n
    wire_param: np.ndarray  # [n_blocks, n]: angle of each block's RY on each wire, n_params where none
    perms: tuple  # per block (perm, sign): new[i] = sign[i] * old[perm[i]]; each None where trivial
    cache: dict = field(default_factory=dict)


def _signed_permutation(gates, n):
    idx = np.arange(1 << n, dtype=np.int64)
    perm, sign = idx.copy(), np.ones(1 << n, dtype=np.int8)
    for g in gates:
        if g.name == "cx":
            c, t = g.wires
            p = idx ^ (((idx >> c) & 1) << t)
            s = np.ones_like(sign)
        elif g.name == "cz":
            a, b = g.wires
            p = idx
            s = (1 - 2 * ((idx >> a) & (idx >> b) & 1)).astype(np.int8)
        else:
            raise ValueError(f"gate {g} cannot follow the rotation layer of a block")
        # Compose: s1 = sign * s0[perm]; s2 = s * s1[p]  =>  s2 = s * sign[p] * s0[perm[p]].
        sign = s * sign[p]
        perm = perm[p]
    return (None if np.array_equal(perm, idx) else perm), (None if (sign == 1).all() else sign)


@lru_cache(maxsize=64)
def compile_ansatz(ansatz: Ansatz, fuse: int = DEFAULT_FUSE) -> Compiled:
    n = ansatz.n_qubits
    wire_param = np.full((len(ansatz.blocks), n), ansatz.n_params, dtype=np.int64)
    perms, seen = [], {}  # blocks with the same entanglers share one permutation (and its device copies)
    for b, gates in enumerate(ansatz.blocks):
        first_other = next((i for i, g in enumerate(gates) if g.name != "ry"), len(gates))
        ry, rest = gates[:first_other], gates[first_other:]
        if any(g.name == "ry" for g in rest) or len({g.wires for g in ry}) != len(ry):
            raise ValueError("a block must be RYs on distinct wires followed by entangling gates")
        for g in ry:
            wire_param[b, g.wires[0]] = g.param
        key = tuple((g.name, g.wires) for g in rest)
        if key not in seen:
            seen[key] = _signed_permutation(rest, n)
        perms.append(seen[key])
    n_chunks = -(-n // fuse)
    chunks = tuple(n // n_chunks + (1 if i < n % n_chunks else 0) for i in range(n_chunks))
    return Compiled(n, ansatz.n_params, chunks, wire_param, tuple(perms))


def _tensors(c: Compiled, device, dtype) -> dict:
    """The compiled circuit's index, sign and mask tensors on `device`, built once per (device, dtype)."""
    key = (str(device), dtype)
    if key in c.cache:
        return c.cache[key]
    as_t = lambda a, dt=None: None if a is None else torch.as_tensor(a, dtype=dt, device=device)  # noqa: E731
    ents, done = [], {}
    for pair in c.perms:
        perm, sign = pair
        if id(pair) not in done and (perm is not None or sign is not None):
            inv = None if perm is None else np.argsort(perm)
            inv_sign = None if sign is None else (sign if inv is None else sign[inv])
            done[id(pair)] = ((as_t(perm), as_t(sign, dtype)), (as_t(inv), as_t(inv_sign, dtype)))
        ents.append(done.get(id(pair)))
    masks = {}
    for k in set(c.chunks):
        # rows of lambda, columns of psi: <lambda, G_t psi> = (C[1, 0] - C[0, 1]) / 2 over pairs on bit t
        g = 1 << min(max(k, _GRAM_BITS), c.n)
        i = np.arange(g)
        m = np.zeros((k, g, g))
        for t in range(k):
            zero = i[(i >> t) & 1 == 0]
            m[t, zero | (1 << t), zero] = 0.5
            m[t, zero, zero | (1 << t)] = -0.5
        masks[k] = as_t(m, dtype)
    slot = np.empty(c.n_params, dtype=np.int64)
    blk, wire = np.nonzero(c.wire_param < c.n_params)
    slot[c.wire_param[blk, wire]] = blk * c.n + wire
    out = dict(ents=ents, masks=masks, wire_param=as_t(c.wire_param), slot=as_t(slot))
    c.cache[key] = out
    return out


def _cos_sin(t: dict, thetas):
    """cos and sin of the half angles, [B, n_blocks, n] each; wires without an RY get the identity."""
    half = torch.cat([thetas, thetas.new_zeros(thetas.shape[0], 1)], 1)[:, t["wire_param"]] * 0.5
    return torch.cos(half), torch.sin(half)


def _kron_mats(chunks, cos, sin):
    """mats[block][chunk]: [B, 2^k, 2^k] = R_{lo+k-1} (x) ... (x) R_lo with R = [[c, -s], [s, c]]."""
    B, nb, n = cos.shape
    r = torch.stack([cos, -sin, sin, cos], -1).view(B, nb, n, 2, 2)
    mats, lo = [[] for _ in range(nb)], 0
    for k in chunks:
        m = r[:, :, lo]
        for q in range(lo + 1, lo + k):
            d = m.shape[-1]
            m = (r[:, :, q, :, None, :, None] * m[:, :, None, :, None, :]).reshape(B, nb, 2 * d, 2 * d)
        for b in range(nb):
            mats[b].append(m[:, b])
        lo += k
    return mats


def _rotate(x, mat, out):
    """out <- mat [B, K, K] applied to the low log2(K) bits of every vector of x [B, M, 2^n], those bits
    moved on top (the bit order rotates by log2(K))."""
    B, M, dim = x.shape
    K = mat.shape[-1]
    R = dim // K
    if M == 1:
        torch.bmm(mat, x.view(B, R, K).transpose(1, 2), out=out.view(B, K, R))
    elif R <= _WIDE_ROWS:
        wide = torch.bmm(mat, x.reshape(B, M * R, K).transpose(1, 2))
        out.view(B, M, K, R).copy_(wide.view(B, K, M, R).transpose(1, 2))
    else:
        mats = mat[:, None].expand(B, M, K, K).reshape(B * M, K, K)
        torch.bmm(mats, x.view(B * M, R, K).transpose(1, 2), out=out.view(B * M, K, R))
    return out


def _entangle(x, ent, out):
    """out <- sign * x[..., perm] (new[i] = sign[i] * old[perm[i]]) for every vector of x [B, M, 2^n]."""
    perm, sign = ent
    if perm is None:
        return torch.mul(x, sign, out=out)
    if x.shape[0] * x.shape[1] == 1:  # one vector: the flat index_select is the fastest gather
        torch.index_select(x.view(-1), 0, perm, out=out.view(-1))
    else:  # (index_select along the last dim of several vectors is ~50x slower than gather)
        torch.gather(x, -1, perm.expand(x.shape), out=out)
    return out if sign is None else out.mul_(sign)


def _product(cos, sin, wires, deriv=False):
    """[B, 1, 2^w]: the product state of the (cos, sin) factors on `wires` (wires[0] the lowest bit). With
    deriv, [B, 1 + w, 2^w], where row 1 + t has wire t's factor replaced by its derivative (-sin, cos) / 2."""
    B, w = cos.shape[0], len(wires)
    g = torch.stack([cos[:, wires], sin[:, wires]], -1)[:, None]  # [B, 1, w, 2]
    if deriv:
        dg = torch.stack([-sin[:, wires], cos[:, wires]], -1)[:, None] * 0.5
        swap = torch.eye(w + 1, w + 1, dtype=torch.bool, device=cos.device)[:, 1:, None]  # [1 + w, w, 1]
        g = torch.where(swap, dg, g)
    vec = cos.new_ones(B, g.shape[1], 1)
    for j in range(w):
        vec = (g[:, :, j, :, None] * vec[:, :, None, :]).reshape(B, g.shape[1], -1)
    return vec


class _Circuit(torch.autograd.Function):
    @staticmethod
    def forward(ctx, thetas, states, c: Compiled):
        t = _tensors(c, thetas.device, thetas.dtype)
        cos, sin = _cos_sin(t, thetas)
        mats = _kron_mats(c.chunks, cos, sin)
        first = 0
        if states is None:  # |0..0>: the first layer gives a product state, hi (x) lo halves of the wires
            B, n, m = thetas.shape[0], c.n, c.n // 2
            lo = _product(cos[:, 0], sin[:, 0], list(range(m)))[:, 0]
            hi = _product(cos[:, 0], sin[:, 0], list(range(m, n)))[:, 0]
            states = (hi[:, :, None] * lo[:, None, :]).view(B, 1, 1 << n)
            if t["ents"][0]:
                states = _entangle(states, t["ents"][0][0], torch.empty_like(states))
            first = 1
        if first < len(mats):
            # two ping-pong buffers from one allocation: a fresh tensor per op costs page faults
            ws, k = states.new_empty((2, *states.shape)), 0
            for b in range(first, len(mats)):
                for mat in mats[b]:
                    states, k = _rotate(states, mat, ws[k]), k ^ 1
                if t["ents"][b]:
                    states, k = _entangle(states, t["ents"][b][0], ws[k]), k ^ 1
            states = states.clone()  # the saved output must not pin the workspace
        ctx.c, ctx.first = c, first
        ctx.save_for_backward(thetas, states)
        return states

    @staticmethod
    def backward(ctx, grad_out):
        thetas, psi = ctx.saved_tensors
        c, first = ctx.c, ctx.first
        t = _tensors(c, psi.device, psi.dtype)
        cos, sin = _cos_sin(t, thetas)
        mats = _kron_mats(c.chunks, cos, sin)
        B, M, dim = psi.shape
        need_states = not first and ctx.needs_input_grad[1]
        # psi and lambda go separately: a batch of 2 makes every GEMM and gather slower than two of 1
        lam, grams = grad_out.contiguous(), []
        ws, kp, kl = psi.new_empty((2, 2, *psi.shape)), 0, 0  # ping-pong pairs for psi and lambda
        for b in range(len(mats) - 1, first - 1, -1):
            if t["ents"][b]:
                psi, kp = _entangle(psi, t["ents"][b][1], ws[0, kp]), kp ^ 1
                lam, kl = _entangle(lam, t["ents"][b][1], ws[1, kl]), kl ^ 1
            for i, mat in enumerate(mats[b]):
                g = t["masks"][c.chunks[i]].shape[-1]
                grams.append(torch.matmul(lam.view(B, -1, g).transpose(1, 2), psi.view(B, -1, g)))  # summed over M
                more = b > first or i < len(mats[b]) - 1
                if more:
                    psi, kp = _rotate(psi, mat.transpose(1, 2), ws[0, kp]), kp ^ 1
                if more or first or need_states:
                    lam, kl = _rotate(lam, mat.transpose(1, 2), ws[1, kl]), kl ^ 1
        grads = thetas.new_zeros(B, 0, c.n)  # [B, blocks from `first`, n]
        if grams:
            nc = len(c.chunks)  # grams run blocks backwards, chunks forwards
            per_chunk = [torch.stack(grams[i::nc][::-1], 1) for i in range(nc)]  # [B, blocks, g, g]
            # multiply-and-sum, not einsum: as a GEMM this tiny reduction can stall MKL's threads for ~10 ms
            grads = torch.cat(
                [(per_chunk[i][:, :, None] * t["masks"][k]).sum((-1, -2)) for i, k in enumerate(c.chunks)], 2
            )
        if first:  # lambda against the product state (hi (x) lo) of block 0, one wire replaced at a time
            n, m = c.n, c.n // 2
            if t["ents"][0]:
                lam = _entangle(lam, t["ents"][0][1], ws[1, kl])
            lam = lam.view(B, 1 << (n - m), 1 << m)
            lo = _product(cos[:, 0], sin[:, 0], list(range(m)), deriv=True)
            hi = _product(cos[:, 0], sin[:, 0], list(range(m, n)), deriv=True)
            g_lo = torch.matmul(lo[:, 1:], torch.matmul(hi[:, :1], lam).transpose(1, 2))[..., 0]
            g_hi = torch.matmul(hi[:, 1:], torch.matmul(lam, lo[:, :1].transpose(1, 2)))[..., 0]
            grads = torch.cat([torch.cat([g_lo, g_hi], 1)[:, None], grads], 1)
        grad_thetas = grads.reshape(B, -1)[:, t["slot"]]
        return grad_thetas, (lam.clone() if need_states else None), None


def _check_thetas(ansatz: Ansatz, thetas: torch.Tensor) -> torch.Tensor:
    if not torch.is_tensor(thetas) or not thetas.is_floating_point():
        raise TypeError("thetas must be a floating-point torch.Tensor of shape [B, n_params]")
    if thetas.dim() == 1:
        thetas = thetas.unsqueeze(0)
    if thetas.dim() != 2 or thetas.shape[1] != ansatz.n_params:
        raise ValueError(
            f"thetas must have shape [B, {ansatz.n_params}] for this {ansatz.n_qubits}-qubit ansatz "
            f"({ansatz.family}), got {tuple(thetas.shape)}"
        )
    return thetas


def evolve(ansatz: Ansatz, thetas: torch.Tensor, states: torch.Tensor, fuse: int = DEFAULT_FUSE):
    """Apply the circuit to `states` [B, M, 2^n] (M vectors per parameter set) -> [B, M, 2^n].

    Differentiable in `thetas` and `states` with the adjoint method. Runs on the device and in the dtype
    of the inputs.
    """
    thetas = _check_thetas(ansatz, thetas)
    if states.dim() != 3 or states.shape[0] != thetas.shape[0] or states.shape[2] != ansatz.dim:
        raise ValueError(f"states must have shape [{thetas.shape[0]}, M, {ansatz.dim}], got {tuple(states.shape)}")
    compiled = compile_ansatz(ansatz, fuse)
    return _Circuit.apply(thetas.to(states.dtype), states.contiguous(), compiled)


def amplitudes(ansatz: Ansatz, thetas: torch.Tensor, fuse: int = DEFAULT_FUSE) -> torch.Tensor:
    """Real amplitudes [B, 2^n] of the circuit applied to |0..0>; thetas [B, n_params] (or [n_params])."""
    thetas = _check_thetas(ansatz, thetas)
    return _Circuit.apply(thetas, None, compile_ansatz(ansatz, fuse))[:, 0]


def probabilities(ansatz: Ansatz, thetas: torch.Tensor, fuse: int = DEFAULT_FUSE) -> torch.Tensor:
    """Exact probabilities [B, 2^n] of every basis state, differentiable in `thetas`."""
    return amplitudes(ansatz, thetas, fuse).square()
