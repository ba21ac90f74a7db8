"""QPA: parameter counts against the paper's reference, the generator, training through the QNN, and the
one-QNN-call-per-step gradient path."""

import math

import pytest
import torch
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from qpeft_core import QPAConfig, QPEFTModel, get_qpeft_model
from qpeft_core.adapters.layers import find_targets
from qpeft_core.adapters.qpa import QPAGenerator, QPAMethod, plan
from qpeft_core.adapters.qpa.generator import REFERENCE_WIDTHS
from qpeft_core.quantum.backend import TorchBackend

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")


class Head(nn.Module):
    def __init__(self, d_in, d_out, device=None):
        super().__init__()
        self.lm_head = nn.Linear(d_in, d_out, bias=False, device=device)


# Smaller than load_model("tiny-llama") / ("tiny-gpt2") (1 layer, width 32): the parameter-shift gradient tests
# below run the model once per shifted angle, and the layout test relies on these exact shapes.
def llama():
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=128,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=32,
    )
    return LlamaForCausalLM(cfg)


def gpt2():
    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=128, n_positions=32, bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(cfg)


IDS = torch.randint(0, 128, (4, 10), generator=torch.Generator().manual_seed(0))


def fit_ids(model, steps: int = 12, lr: float = 2e-2) -> list[float]:
    """Adam on IDS for `steps` steps; the loss of each."""
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    losses = []
    for _ in range(steps):
        loss = model(input_ids=IDS, labels=IDS).loss
        loss.backward()
        losses.append(loss.item())
        opt.step()
        opt.zero_grad()
    return losses


def small(targets=("lm_head",), **kw):
    return QPAConfig(target_modules=list(targets), **{"r": 2, "n_mlp": 64, "qnn_depth": 2, **kw})


# --- parameter counts (DESIGN.md 1a) ------------------------------------------------------------------


def test_gpt2_lm_head_reference_count():
    m = 4 * (50257 + 768)
    assert plan(m, 2048) == (100, 7)
    model = get_qpeft_model(
        Head(768, 50257), QPAConfig(target_modules=["lm_head"], r=4, n_mlp=2048, qnn_depth=8, mapping="reference")
    )
    trainable, total = model.get_nb_trainable_parameters()
    assert model.method.m == m == 204_100
    assert (
        trainable
        == 106_264
        == 7 * 8
        + sum(
            a * b + b
            for a, b in zip([8, 32, 64, 128, 128, 64, 32, 32], [32, 64, 128, 128, 64, 32, 32, 2048], strict=True)
        )
    )
    assert f"{100 * trainable / m:.2f}" == "52.06"
    assert total == trainable + 768 * 50257
    same = QPAConfig(target_modules=["lm_head"], r=4, n_mlp=2048, qnn_depth=8, mapping_widths=REFERENCE_WIDTHS)
    default = get_qpeft_model(Head(768, 50257), same)
    assert default.get_nb_trainable_parameters()[0] == 106_264 + 1  # + one zero-started gate per target


def test_default_width_is_the_widest_within_the_budget():
    """mapping_widths=None: one hidden layer (N + 1) -> w -> n_mlp, w the largest that keeps angles + MLP +
    gate within param_budget * m."""

    def count(w):  # 7 qubits x 8 layers, the MLP, one gate
        return 56 + (8 * w + w) + (w * 2048 + 2048) + 1

    for budget in (0.5, 0.55, 0.3):
        cfg = QPAConfig(target_modules=["lm_head"], r=4, n_mlp=2048, qnn_depth=8, param_budget=budget)
        model = get_qpeft_model(Head(768, 50257), cfg)
        (w,) = model.method.widths
        n = model.get_nb_trainable_parameters()[0]
        assert n == count(w) <= budget * 204_100 < count(w + 1)
    assert w == 28 and n == 59_701  # budget 0.3
    cfg = QPAConfig(target_modules=["lm_head"], r=4, n_mlp=2048, qnn_depth=8, bit_features="pairs")
    model = get_qpeft_model(Head(768, 50257), cfg)
    (w,) = model.method.widths
    n = model.get_nb_trainable_parameters()[0]
    assert n == count(w) + 21 * w <= 0.5 * 204_100 < count(w + 1) + 21 * (w + 1)  # 7 * 6 / 2 pair inputs
    with pytest.raises(ValueError, match="raise param_budget to at least"):
        get_qpeft_model(Head(768, 50257), QPAConfig(target_modules=["lm_head"], param_budget=0.01))
    with pytest.raises(ValueError, match="param_budget"):
        QPAConfig(target_modules=["lm_head"], param_budget=0)


def test_large_head_reference_count():
    targets = find_targets(Head(2048, 256000, device="meta"), ["lm_head"])  # shapes only, nothing allocated
    cfg = QPAConfig(target_modules=["lm_head"], r=4, n_mlp=4096, qnn_depth=8, mapping="reference")
    method = QPAMethod(cfg, targets)
    n = sum(p.numel() for p in method.parameters())
    assert (method.m, method.n_qubits, n) == (1_032_192, 8, 173_888)
    assert math.floor(1e4 * n / method.m) == 1684  # 16.846%: the paper truncates to 16.84


def test_plan_small_cases():
    assert plan(10, 64) == (1, 1)  # one basis state still needs one qubit
    assert plan(129, 64) == (3, 2)
    assert plan(64 * 8, 64) == (8, 3)


# --- the generator ------------------------------------------------------------------------------------


def test_generator_postprocessing_and_bits():
    gen = QPAGenerator(m=100, n_mlp=20, layers=1, widths=[8], activation="none")
    assert (gen.n_states, gen.n_qubits) == (5, 3)
    p = torch.softmax(torch.randn(8), 0)
    feats = gen.features(p)
    want = (0.6 * torch.tanh(0.1 * 4 * p)) ** 0.15
    want = (want - want.mean())[:5]
    assert torch.allclose(feats[:, -1], want)
    assert feats[:, :3].tolist() == [[((i >> q) & 1) * 2 - 1 for q in range(3)] for i in range(5)]
    out = gen(p)
    assert out.shape == (100,) and abs(out.mean().item()) < 1e-6
    pairs = QPAGenerator(m=100, n_mlp=20, layers=1, widths=[8], bit_features="pairs").features(p)
    assert pairs.shape == (5, 3 + 3 + 1) and torch.equal(pairs[:, :3], feats[:, :3])
    assert torch.equal(
        pairs[:, 3:6], torch.stack([feats[:, 0] * feats[:, 1], feats[:, 0] * feats[:, 2], feats[:, 1] * feats[:, 2]], 1)
    )
    triples = QPAGenerator(m=100, n_mlp=20, layers=1, widths=[8], bit_features="triples").features(p)
    assert torch.equal(triples[:, :6], pairs[:, :6]) and torch.equal(triples[:, 6], feats[:, :3].prod(1))
    rand = QPAGenerator(m=100, n_mlp=20, layers=1, widths=[8], bit_features="random")
    assert not torch.equal(rand.features(p)[:, :3], rand.features(p)[:, :3])  # re-drawn each call


def test_scale_mode_multiplies_each_row_by_one_plus_p_tilde():
    """p_mode="scale": the MLP sees the bits alone (no p~ input), and state i's output row is scaled by
    1 + p~_i, so the QNN's probabilities reach the generated weights however the MLP is trained."""
    gen = QPAGenerator(m=100, n_mlp=20, layers=1, widths=[8], p_mode="scale")
    assert gen.mlp[0].in_features == 3
    p = torch.softmax(torch.randn(8), 0).requires_grad_(True)
    feats = gen.features(p)
    assert feats.tolist() == [[((i >> q) & 1) * 2 - 1 for q in range(3)] for i in range(5)]
    rows = gen.mlp(feats) * (1 + gen.p_tilde(p))[:, None]
    want = rows.flatten()[:100] - rows.flatten()[:100].mean()
    out = gen(p)
    assert torch.allclose(out, want)
    out.square().sum().backward()
    assert p.grad.abs().sum() > 0  # the angles get a gradient through the scale
    uniform = torch.full((8,), 1 / 8)
    plain = gen.mlp(feats).flatten()[:100]
    assert torch.allclose(gen(uniform), plain - plain.mean())  # a constant p: p~ = 0, the bits-only MLP


def test_scale_mode_budget_and_training():
    """The default width accounts for the missing p~ input, and QPA with p_mode="scale" trains end to end."""
    cfg = QPAConfig(target_modules=["lm_head"], r=4, n_mlp=2048, qnn_depth=8, p_mode="scale")
    model = get_qpeft_model(Head(768, 50257), cfg)
    (w,) = model.method.widths
    n = model.get_nb_trainable_parameters()[0]
    assert n == 56 + 8 * w + (w * 2048 + 2048) + 1 <= 0.5 * 204_100  # 7 bit inputs, no p~
    model = get_qpeft_model(llama(), small(["q_proj", "v_proj", "lm_head"], p_mode="scale"))
    losses = fit_ids(model)
    assert losses[-1] < losses[0] - 0.05, losses
    with pytest.raises(ValueError, match="p_mode"):
        QPAConfig(target_modules=["lm_head"], p_mode="gate")


def test_zero_probabilities_give_finite_gradients():
    gen = QPAGenerator(m=40, n_mlp=10, layers=1, widths=[8])
    p = torch.tensor([1.0, 0, 0, 0]).requires_grad_(True)
    gen(p).square().sum().backward()
    assert torch.isfinite(p.grad).all()


# --- initialisation --------------------------------------------------------------------------------------


@pytest.mark.parametrize("make", [llama, gpt2])
def test_default_init_is_exactly_zero_reference_near_zero(make):
    with torch.no_grad():
        ref = make().eval()(input_ids=IDS).logits
        targets = ["q_proj", "v_proj", "lm_head"] if make is llama else ["c_attn", "lm_head"]
        out = get_qpeft_model(make(), small(targets)).eval()(input_ids=IDS).logits
        assert torch.equal(out, ref)
        out = get_qpeft_model(make(), small(targets, mapping="reference")).eval()(input_ids=IDS).logits
        assert (out - ref).abs().max() < 1e-4 * ref.abs().max()


def test_rows_layout_places_whole_rows_longest_first():
    # llama(): q_proj 32 -> 32, v_proj 32 -> 16, lm_head 32 -> 128; r=2
    cfg = small(["q_proj", "v_proj", "lm_head"], layout="rows", n_mlp=32)
    model = get_qpeft_model(llama(), cfg)
    ref = get_qpeft_model(llama(), small(["q_proj", "v_proj", "lm_head"], n_mlp=32))
    assert model.get_nb_trainable_parameters() == ref.get_nb_trainable_parameters()
    m = model.method
    with torch.no_grad():
        flat = m.generator(m.quantum_probs())
        got = m.factors()
    rows = []  # (start, length) of every A row and B column, to check they tile the flat vector
    for k, (name, t) in enumerate(m.targets.items()):
        a, b = got[name]
        starts_a, starts_b = m.rows[name]
        for j in range(cfg.r):
            assert torch.equal(a[j], flat[starts_a[j] : starts_a[j] + t.d_in])
            gate = m.scaling * m.gate[k]
            assert torch.equal(b[:, j], flat[starts_b[j] : starts_b[j] + t.d_out] * gate)
            rows += [(starts_a[j], t.d_in), (starts_b[j], t.d_out)]
    rows.sort()
    assert rows[0][0] == 0 and all(s + n == s2 for (s, n), (s2, _) in zip(rows, rows[1:], strict=False))
    assert rows[-1][0] + rows[-1][1] == m.m
    assert [n for _, n in rows] == sorted((n for _, n in rows), reverse=True)  # longest first
    # with n_mlp = 32 = d_in, the A rows and q's B columns fill whole basis states
    assert rows[:2] == [(0, 128), (128, 128)] and all(s % 32 == 0 for s, n in rows if n == 32)
    with torch.no_grad():  # Delta W = 0 at init in this layout too
        base = llama().eval()(input_ids=IDS).logits
        assert torch.equal(model.eval()(input_ids=IDS).logits, base)


@pytest.mark.parametrize("layout", ["target", "rows"])
def test_unflatten_places_every_generated_number_once(layout):
    # benchmarks/qpa_capacity.py maps trained LoRA factors into QPA's block with unflatten(arange(m))
    m = get_qpeft_model(llama(), small(["q_proj", "v_proj", "lm_head"], layout=layout, n_mlp=32)).method
    index = m.unflatten(torch.arange(m.m))
    for name, t in m.targets.items():
        assert index[name][0].shape == (2, t.d_in) and index[name][1].shape == (t.d_out, 2)
    placed = torch.cat([x.flatten() for pair in index.values() for x in pair])
    assert torch.equal(placed.sort().values, torch.arange(m.m))


# --- training ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("gradient", ["autograd", "parameter_shift"])
def test_adam_reduces_loss_and_trains_angles(gradient):
    model = get_qpeft_model(llama(), small(["q_proj", "v_proj", "lm_head"], gradient=gradient))
    gen = model.method.generator
    theta0, w0 = gen.theta.detach().clone(), gen.mlp[0].weight.detach().clone()
    losses = fit_ids(model)
    model(input_ids=IDS, labels=IDS).loss.backward()
    assert gen.theta.grad is not None and gen.theta.grad.abs().sum() > 0
    assert losses[-1] < losses[0] - 0.05, losses
    assert not torch.equal(gen.theta, theta0) and not torch.equal(gen.mlp[0].weight, w0)


def test_parameter_shift_gradient_equals_autograd():
    grads = []
    for gradient in ("autograd", "parameter_shift"):
        model = get_qpeft_model(gpt2(), small(["c_attn", "lm_head"], gradient=gradient))
        with torch.no_grad():
            model.method.gate.fill_(1.0)
        model(input_ids=IDS, labels=IDS).loss.backward()
        grads.append(model.method.generator.theta.grad)
    assert torch.allclose(grads[0], grads[1], rtol=1e-4, atol=1e-7)


class CountingBackend(TorchBackend):
    """The exact simulator, recording every call's batch size (1 = forward, 2P = a parameter-shift VJP)."""

    def __init__(self, ansatz):
        super().__init__(ansatz, dtype=torch.float64)
        self.batches = []

    def run(self, call):
        self.batches.append(call.circuits)
        return super().run(call)


def _grad_after_microbatches(quantum_grad, gradient="autograd"):
    model = get_qpeft_model(llama(), small(["q_proj", "lm_head"], quantum_grad=quantum_grad, gradient=gradient))
    with torch.no_grad():
        model.method.gate.fill_(1.0)
    for k in range(3):
        (model(input_ids=IDS[k : k + 2], labels=IDS[k : k + 2]).loss / 3).backward()
    model.before_optimizer_step()
    return model.method.generator.theta.grad


def test_per_step_and_per_backward_give_the_same_theta_gradient():
    a, b = _grad_after_microbatches("per_backward"), _grad_after_microbatches("per_step")
    assert a is not None and a.abs().sum() > 0
    assert torch.allclose(a, b, rtol=1e-5, atol=1e-8)


def test_per_step_makes_one_forward_and_one_gradient_call_per_step():
    model = get_qpeft_model(llama(), small(["q_proj", "lm_head"], quantum_grad="per_step", gradient="parameter_shift"))
    backend = CountingBackend(model.method.ansatz)
    model.method.set_executor(backend)
    with torch.no_grad():
        model.method.gate.fill_(1.0)  # so every step moves the angles
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    P = model.method.ansatz.n_params
    for step in range(3):
        for k in range(4):  # gradient accumulation: 4 micro-batches per optimizer step
            model(input_ids=IDS[k : k + 1], labels=IDS[k : k + 1]).loss.backward()
        model.before_optimizer_step()
        opt.step()
        opt.zero_grad()
        assert backend.batches == [1, 2 * P] * (step + 1)
    assert model.method.calls == {"forward": 3, "gradient": 3}


def test_eval_reuses_generated_factors_and_freeze_needs_no_executor():
    model = get_qpeft_model(gpt2(), small(["c_attn", "lm_head"])).eval()
    with torch.no_grad():
        model.method.gate.fill_(1.0)
        ref = model(input_ids=IDS).logits
        model(input_ids=IDS)
    assert model.method.calls["forward"] == 1
    model.freeze_generated()

    class Broken(TorchBackend):
        def run(self, call):
            raise AssertionError("the executor must not run after freeze_generated()")

    model.method.set_executor(Broken(model.method.ansatz))
    model.method.generator.theta.data.add_(1.0)  # would force a new QNN run if anything asked for one
    assert model.get_nb_trainable_parameters()[0] == 0
    with torch.no_grad():
        assert torch.equal(model(input_ids=IDS).logits, ref)
        assert torch.allclose(model.merge_and_unload()(input_ids=IDS).logits, ref, atol=1e-5)


def test_shot_based_adapter_reloads_exactly_without_the_executor(tmp_path):
    cfg = small(["c_attn", "lm_head"], shots=200, gradient="parameter_shift")
    model = get_qpeft_model(gpt2(), cfg).eval()
    with torch.no_grad():
        model.method.gate.fill_(1.0)
        ref = model(input_ids=IDS).logits
    model.save_pretrained(tmp_path)
    loaded = QPEFTModel.from_pretrained(gpt2(), tmp_path).eval()
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=IDS).logits, ref)  # the saved sample, not a new one
    assert loaded.method.calls["forward"] == 0
    m = loaded.method
    assert m.probs.sum().item() == pytest.approx(1.0) and (m.probs * 200).round().eq(m.probs * 200).all()


def test_config_round_trip_and_validation():
    cfg = small(["lm_head"], entangler="ring", activation="none", bit_features="random", shots=64)
    assert QPAConfig.from_dict(cfg.to_dict()) == cfg
    bads = ({"entangler": "full"}, {"r": 0}, {"shots": 0}, {"quantum_grad": "never"}, {"mapping": "x"}, {"layout": "x"})
    for bad in (*bads, {"gradient": "autograd", "shots": 10}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            small(**bad)
    model = get_qpeft_model(gpt2(), small())
    with pytest.raises(ValueError, match="different circuit"):
        model.method.set_executor(TorchBackend(model.method.ansatz.__class__(1, 0, ())))
    assert math.isclose(model.method.scaling, 8.0 / 2)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_follows_the_model_to_cuda_and_back():
    model = get_qpeft_model(gpt2().cuda(), small(["c_attn", "lm_head"]))
    with torch.no_grad():
        model.method.gate.fill_(1.0)
    ids = IDS.cuda()
    model(input_ids=ids, labels=ids).loss.backward()
    gen = model.method.generator
    assert gen.theta.grad.device.type == "cuda" and model.method.qnn.backend.device.type == "cuda"
    with torch.no_grad():
        ref = model(input_ids=ids).logits.cpu()
        model.cpu()
        assert torch.allclose(model(input_ids=IDS).logits, ref, atol=1e-4)
    assert model.method.qnn.backend.device.type == "cpu"
