import json
import math

import pytest
import torch
from transformers import BertConfig, BertForSequenceClassification, GPT2Config, GPT2LMHeadModel

from qpeft_core import QPEFTModel, QuantumPEFTConfig, get_qpeft_model
from qpeft_core.adapters import TargetInfo, config_from_dict
from qpeft_core.adapters.io import CONFIG_NAME
from qpeft_core.adapters.quantum_peft import QuantumPEFTMethod, param_count
from qpeft_core.adapters.quantum_peft.orthogonal import (
    CayleyColumns,
    DirectSum,
    MixedRadix,
    PauliQubits,
    build_circuit,
    givens_ladder,
    pauli_param_count,
    quantize,
)
from qpeft_core.quantum.ansatz import pauli_ansatz
from qpeft_core.quantum.simulator import evolve

DIMS = [2, 3, 5, 6, 12, 64, 384, 768, 1536, 3072, 4096, 50257]


def gram_error(u: torch.Tensor) -> float:
    u = u.double()  # measure u itself, not the rounding of the check
    return (u.T @ u - torch.eye(u.shape[1], dtype=torch.float64)).abs().max().item()


@pytest.mark.parametrize("dim", DIMS)
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-6), (torch.float64, 1e-12)])
def test_columns_orthonormal_any_dim(dim, dtype, tol):
    circuit = build_circuit(dim, layers=1)
    gen = torch.Generator().manual_seed(dim)
    thetas = (torch.rand(circuit.n_params, generator=gen, dtype=torch.float64) * 4 - 2).to(dtype)
    k = min(16, dim)
    u = circuit.columns(thetas, k)
    assert u.shape == (dim, k) and u.dtype == dtype
    assert gram_error(u) < tol


@pytest.mark.parametrize("construction", ["mixed_radix", "direct_sum"])
@pytest.mark.parametrize("dim", [6, 12, 768, 3072])
def test_both_constructions_orthonormal(construction, dim):
    circuit = build_circuit(dim, 2, construction)
    assert isinstance(circuit, MixedRadix if construction == "mixed_radix" else DirectSum)
    thetas = torch.randn(circuit.n_params, dtype=torch.float64)
    assert gram_error(circuit.columns(thetas, min(8, dim))) < 1e-12


def test_full_matrix_is_orthogonal():
    # k = d: the whole Q, for every construction kind, including the 1 x 1 leftover block of 17 = 16 + 1
    for dim in [17, 12, 7, 48]:
        for construction in ["auto", "direct_sum"]:
            circuit = build_circuit(dim, 2, construction)
            q = circuit.columns(torch.randn(circuit.n_params, dtype=torch.float64), dim)
            assert gram_error(q) < 1e-12 and gram_error(q.T) < 1e-12


@pytest.mark.parametrize("n,layers", [(1, 1), (2, 1), (5, 0), (6, 1), (9, 3)])
def test_power_of_two_is_the_qubit_pauli_circuit(n, layers):
    circuit = build_circuit(1 << n, layers)
    ansatz = pauli_ansatz(n, layers)
    assert isinstance(circuit, PauliQubits) and circuit.n_params == ansatz.n_params
    assert circuit.n_params == (n if n == 1 else (2 * layers + 1) * n - 2 * layers)
    thetas = torch.randn(ansatz.n_params, dtype=torch.float64)
    k = min(8, 1 << n)
    basis = torch.eye(k, 1 << n, dtype=torch.float64)[None]
    ref = evolve(ansatz, thetas[None], basis)[0].T
    torch.testing.assert_close(circuit.columns(thetas, k), ref, atol=1e-12, rtol=0)
    # the generic qudit code with all-qubit wires is the same circuit too
    torch.testing.assert_close(MixedRadix((2,) * n, layers).columns(thetas, k), ref, atol=1e-12, rtol=0)


def _dense_mixed_radix(sizes: tuple[int, ...], layers: int, thetas: torch.Tensor) -> torch.Tensor:
    """Q of the MixedRadix circuit from its definition, with dense matrices: wire 0 is the fastest digit,
    angles are taken in gate order, a CZ on wires (i, j) is the diagonal (-1)^(a_i a_j)."""
    m, dim, dt = len(sizes), math.prod(sizes), thetas.dtype
    strides = [math.prod(sizes[:w]) for w in range(m)]
    digit = [(torch.arange(dim) // strides[w]) % sizes[w] for w in range(m)]
    plan = [(range(m), [])]
    if m > 1:
        even = [(i, i + 1) for i in range(0, m - 1, 2)]
        odd = [(i, i + 1) for i in range(1, m - 1, 2)]
        plan += [(range(m - 1), even), (range(1, m), odd)] * layers
    q, used = torch.eye(dim, dtype=dt), 0
    for wires, pairs in plan:
        ladders = {}
        for w in wires:
            ladders[w] = givens_ladder(thetas[used : used + sizes[w] - 1], sizes[w])
            used += sizes[w] - 1
        mat = torch.ones(1, 1, dtype=dt)
        for w in reversed(range(m)):  # the slowest digit is the left Kronecker factor
            mat = torch.kron(mat, ladders.get(w, torch.eye(sizes[w], dtype=dt)))
        q = mat @ q
        parity = sum((digit[i] * digit[j] for i, j in pairs), torch.zeros(dim, dtype=torch.long)) % 2
        q = (1 - 2 * parity).to(dt)[:, None] * q
    assert used == thetas.numel()
    return q


@pytest.mark.parametrize(
    "sizes,layers", [((2, 3), 2), ((3, 2, 5), 1), ((7, 7, 7), 2), ((2, 2, 2, 2, 2, 2, 3, 3), 4), ((2,) * 6 + (3,), 4)]
)
def test_mixed_radix_matches_dense_definition(sizes, layers):
    # the fast path fuses wires into chunks, keeps a moving memory layout and folds CZs into the chunk
    # matrices; none of that may show against the plain matrix product, for apply() and columns() alike
    circuit = MixedRadix(sizes, layers)
    gen = torch.Generator().manual_seed(len(sizes))
    thetas = torch.randn(2, circuit.n_params, generator=gen, dtype=torch.float64)
    x = torch.randn(2, 5, circuit.dim, generator=gen, dtype=torch.float64)
    dense = torch.stack([_dense_mixed_radix(sizes, layers, t) for t in thetas])
    torch.testing.assert_close(circuit.apply(thetas, x), x @ dense.mT, atol=1e-12, rtol=0)
    k = min(32, circuit.dim)
    torch.testing.assert_close(circuit.columns(thetas, k), dense[:, :, :k], atol=1e-12, rtol=0)


def test_givens_ladder_is_ry_for_two_levels():
    a = torch.tensor([0.7], dtype=torch.float64)
    c, s = math.cos(0.35), math.sin(0.35)
    torch.testing.assert_close(givens_ladder(a, 2), torch.tensor([[c, -s], [s, c]], dtype=torch.float64))
    r = givens_ladder(torch.randn(4, dtype=torch.float64), 5)
    torch.testing.assert_close(r @ r.T, torch.eye(5, dtype=torch.float64))


def test_angle_counts():
    # powers of two: (2L+1) log2 d - 2L
    assert pauli_param_count(4096, 1) == 34 and pauli_param_count(1024, 2) == 46
    # mixed radix, S = sum(p_i - 1): S + L (2S - (p_0 - 1) - (p_last - 1)); 768 = 2^8 x 3 -> 10 + 17 L
    assert [pauli_param_count(768, L) for L in (0, 1, 2)] == [10, 27, 44]
    assert pauli_param_count(3072, 1) == 33
    # 50257 = 29 x 1733: 32768 (+) (16384 (+) (1024 (+) 3^4)), 2 mixing angles per split
    assert pauli_param_count(50257, 1) == 43 + 40 + 28 + 20 + 3 * 2 == 137
    assert pauli_param_count(768, 1, "direct_sum") == 25 + 22 + 2


def test_gradients_reach_every_angle():
    for dim in [12, 768, 50257, 4096]:
        circuit = build_circuit(dim, 1)
        thetas = (torch.randn(circuit.n_params) * 0.5).requires_grad_()
        u = circuit.columns(thetas, 4)
        (u * torch.randn_like(u)).sum().backward()
        assert torch.isfinite(thetas.grad).all() and (thetas.grad != 0).all(), dim


def test_direct_sum_gradient_matches_finite_differences():
    circuit = build_circuit(23, 1)  # 16 (+) 7, 7 = 4 (+) 3
    thetas = torch.randn(circuit.n_params, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: circuit.columns(t, 3), (thetas,))


@pytest.mark.parametrize("dim,k", [(6, 6), (768, 8), (4096, 16), (50257, 4)])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-6), (torch.float64, 1e-12)])
def test_taylor_cayley_orthonormal(dim, k, dtype, tol):
    cayley = CayleyColumns(dim, k)
    assert cayley.n_params == dim * k - k * (k + 1) // 2
    params = torch.randn(cayley.n_params, dtype=dtype) / math.sqrt(dim)
    assert gram_error(cayley.columns(params)) < tol
    assert gram_error(cayley.columns(params * 30)) < tol  # large generators stay exact too


def test_taylor_zero_generator_is_identity_and_small_one_is_first_order():
    cayley = CayleyColumns(10, 3)
    torch.testing.assert_close(cayley.columns(torch.zeros(cayley.n_params)), torch.eye(10, 3))
    # Cayley = exp(A) + O(A^3): check against the matrix exponential of the full generator
    params = torch.randn(cayley.n_params, dtype=torch.float64) * 1e-3
    lower = torch.zeros(3, 3, dtype=torch.float64)
    lower[tuple(torch.tril_indices(3, 3, -1))] = params[:3]
    b = params[3:].view(7, 3)
    gen = torch.zeros(10, 10, dtype=torch.float64)
    gen[:3, :3], gen[3:, :3], gen[:3, 3:] = lower - lower.T, b, -b.T
    torch.testing.assert_close(cayley.columns(params), torch.linalg.matrix_exp(gen)[:, :3], atol=1e-8, rtol=0)


def test_quantize_straight_through():
    x = torch.tensor([0.1, 1.0, -2.5], requires_grad=True)
    q = quantize(x, 3)
    step = 2 * math.pi / 8
    torch.testing.assert_close(q.detach(), torch.round(x.detach() / step) * step)
    (q * torch.tensor([1.0, 2.0, 3.0])).sum().backward()
    torch.testing.assert_close(x.grad, torch.tensor([1.0, 2.0, 3.0]))
    assert quantize(x, None) is x


def test_batched_columns_match_one_by_one():
    for dim in [12, 64, 50257]:
        circuit = build_circuit(dim, 1)
        thetas = torch.randn(3, circuit.n_params, dtype=torch.float64)
        batched = circuit.columns(thetas, 4)
        for b in range(3):
            torch.testing.assert_close(batched[b], circuit.columns(thetas[b], 4), atol=1e-13, rtol=0)
    cayley = CayleyColumns(20, 3)
    params = torch.randn(2, cayley.n_params, dtype=torch.float64)
    torch.testing.assert_close(cayley.columns(params)[1], cayley.columns(params[1]))


# --- the adapter method ------------------------------------------------------------------------------------

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")
IDS = torch.randint(0, 512, (2, 12), generator=torch.Generator().manual_seed(1))


def gpt2():
    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=2, n_embd=48, n_head=2, vocab_size=512, n_positions=64, bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(cfg).eval()  # c_attn 48 -> 144 = 2^4 x 3^2, c_fc 48 -> 192, lm_head 48 -> 512


def bert():
    torch.manual_seed(0)
    cfg = BertConfig(
        vocab_size=512, hidden_size=48, num_hidden_layers=2, num_attention_heads=2, intermediate_size=96, num_labels=3
    )
    return BertForSequenceClassification(cfg).eval()


MODELS = {"gpt2": (gpt2, ["c_attn", "c_fc", "lm_head"], []), "bert": (bert, ["query", "value"], ["classifier"])}


def logits(model):
    with torch.no_grad():
        return model(input_ids=IDS).logits


def qpeft(kind, **kw):
    make, targets, saves = MODELS[kind]
    config = QuantumPEFTConfig(target_modules=targets, modules_to_save=saves, r=4, layers=2, scaling=2.0, **kw)
    return get_qpeft_model(make(), config).eval()


def trained(kind, **kw):
    model = qpeft(kind, **kw)
    with torch.no_grad():  # a real Delta W: nonzero lambda and angles away from their init
        for p in model.method.parameters():
            p.copy_(torch.randn_like(p) * (0.5 if p.numel() > 4 else 1.5))
    return model


def test_parameter_count_formula():
    config = QuantumPEFTConfig(target_modules=["w"], r=8, layers=1)
    method = QuantumPEFTMethod(config, {"w": TargetInfo("w", 4096, 4096)})
    assert sum(p.numel() for p in method.parameters()) == param_count(config, 4096, 4096) == 76
    assert param_count(config, 3072, 768) == 33 + 27 + 8 and param_count(config, 50257, 768) == 137 + 27 + 8
    taylor = QuantumPEFTConfig(target_modules=["w"], r=8, mapping="taylor")
    assert param_count(taylor, 768, 768) == 2 * (768 * 8 - 36) + 8
    for kind in MODELS:
        model = qpeft(kind)
        n_saved = sum(p.numel() for s in MODELS[kind][2] for p in model.base_model.get_submodule(s).parameters())
        trainable, _ = model.get_nb_trainable_parameters()
        assert trainable == model.method.num_parameters_formula() + n_saved


@pytest.mark.parametrize("kind", list(MODELS))
@pytest.mark.parametrize("mapping", ["pauli", "taylor"])
def test_zero_update_at_init(kind, mapping):
    assert torch.equal(logits(qpeft(kind, mapping=mapping)), logits(MODELS[kind][0]()))


@pytest.mark.parametrize("mapping,bits", [("pauli", None), ("taylor", None), ("pauli", 4)])
def test_factors_and_gradients(mapping, bits):
    model = qpeft("gpt2", mapping=mapping, quantize_bits=bits)
    method = model.method
    loss = model(input_ids=IDS, labels=IDS).loss
    loss.backward()
    for t in method.adapters.values():  # lambda = 0: only lambda can move on the first step
        assert t.lam.grad.abs().min() > 0 and t.u.grad.abs().max() == 0
    with torch.no_grad():
        for t in method.adapters.values():
            t.lam.normal_()
    model.zero_grad()
    model(input_ids=IDS, labels=IDS).loss.backward()
    for t in method.adapters.values():
        assert t.u.grad.abs().max() > 0 and t.v.grad.abs().max() > 0 and t.lam.grad.abs().min() > 0
    with torch.no_grad():
        for name, (u, v) in method.orthonormal_factors().items():
            assert gram_error(u) < 1e-6 and gram_error(v) < 1e-6
            a, b = method.factors()[name]
            lam = method.adapters[method.keys[name]].lam
            torch.testing.assert_close(b @ a, 2.0 * u @ torch.diag(lam) @ v.T)
            ea, eb = method.export_factors()[name]
            torch.testing.assert_close(eb @ ea, b @ a, atol=1e-6, rtol=1e-5)


def test_rank_mask_and_quantized_angles():
    model = trained("bert", rank_mask=[1, 0, 1, 0], quantize_bits=3)
    step = 2 * math.pi / 8
    for name, (_, b) in model.method.factors().items():
        assert (b[:, [1, 3]] == 0).all() and (b[:, [0, 2]].norm(dim=0) > 0).all()
        t = model.method.targets[name]
        u_ref = model.method.maps[t.d_out].columns(
            torch.round(model.method.adapters[model.method.keys[name]].u / step) * step, 4
        )
        torch.testing.assert_close(model.method.orthonormal_factors()[name][0], u_ref)


def test_angle_scale_multiplies_the_angles_and_their_adam_step():
    plain, scaled = qpeft("bert", init_std=0.3), qpeft("bert", init_std=0.3, angle_scale=10.0)
    for a, b in zip(plain.method.adapters.values(), scaled.method.adapters.values(), strict=True):
        torch.testing.assert_close(b.u * 10.0, a.u)  # the same angles at init
    for name, (u, v) in plain.method.orthonormal_factors().items():
        su, sv = scaled.method.orthonormal_factors()[name]
        torch.testing.assert_close(su, u)
        torch.testing.assert_close(sv, v)
    moved = {}
    for model in (plain, scaled):
        with torch.no_grad():
            for t in model.method.adapters.values():
                t.lam.fill_(0.5)
        opt = torch.optim.Adam([t.u for t in model.method.adapters.values()], lr=1e-3)
        model(input_ids=IDS, labels=torch.tensor([0, 1])).loss.backward()
        before = {n: f[0].detach().clone() for n, f in model.method.orthonormal_factors().items()}
        opt.step()
        moved[model is scaled] = {n: (f[0] - before[n]).norm() for n, f in model.method.orthonormal_factors().items()}
    for name in moved[False]:  # Adam's first step is lr per parameter: ten times the angle, ten times the move
        assert moved[True][name] > 5 * moved[False][name]
    with pytest.raises(ValueError):
        QuantumPEFTConfig(target_modules=["q"], angle_scale=0.0)


def test_config_round_trip():
    config = QuantumPEFTConfig(target_modules=["q"], r=2, mapping="taylor", rank_mask=[1, 0], quantize_bits=5)
    assert config_from_dict(json.loads(json.dumps(config.to_dict()))) == config
    for bad in [dict(mapping="exp"), dict(construction="pad"), dict(r=0), dict(rank_mask=[1]), dict(quantize_bits=0)]:
        with pytest.raises(ValueError):
            QuantumPEFTConfig(**{"target_modules": ["q"], "r": 2, **bad})
    with pytest.raises(ValueError, match="exceeds"):
        QuantumPEFTMethod(QuantumPEFTConfig(target_modules=["w"], r=5), {"w": TargetInfo("w", 4, 8)})


@pytest.mark.parametrize("kind", list(MODELS))
@pytest.mark.parametrize("kw", [{}, {"mapping": "taylor", "quantize_bits": 6}, {"construction": "direct_sum"}])
def test_save_load_merge_export(kind, kw, tmp_path):
    from peft import PeftModel

    model = trained(kind, **kw)
    ref = logits(model)
    assert (ref - logits(MODELS[kind][0]())).abs().max() > 1e-3
    model.save_pretrained(tmp_path / "ours")
    assert json.loads((tmp_path / "ours" / CONFIG_NAME).read_text())["method"] == "quantum_peft"
    loaded = QPEFTModel.from_pretrained(MODELS[kind][0](), tmp_path / "ours").eval()
    assert torch.equal(logits(loaded), ref)
    model.export_lora(tmp_path / "lora")
    peft_model = PeftModel.from_pretrained(MODELS[kind][0](), tmp_path / "lora").eval()
    torch.testing.assert_close(logits(peft_model), ref, atol=1e-5, rtol=0)
    torch.testing.assert_close(logits(model.merge_and_unload()), ref, atol=1e-5, rtol=0)


def test_training_steps_reduce_loss():
    model = qpeft("gpt2").train()
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=5e-2)
    losses = []
    for _ in range(4):
        loss = model(input_ids=IDS, labels=IDS).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
