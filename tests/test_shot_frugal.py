"""Shot-frugal training: the shot-adaptive parameter shift and SPSA with averaging and a decaying perturbation
are unbiased, record exactly the shots they run and send one shot count per call (one IBM Runtime job);
QPA's quantum update period and simulator warm start spend circuits only where they say."""

import math

import pytest
import torch

from qpeft_core import get_qpeft_model  # noqa: I001  (after the test helpers it shares)
from qpeft_core.quantum.ansatz import qpa_ansatz
from qpeft_core.quantum.backend import TorchBackend
from qpeft_core.quantum.gradients import QNN, SPSA, Autograd, ShotAdaptive, build_strategy
from tests.test_qpa import IDS, CountingBackend, llama, small

ANSATZ = qpa_ansatz(3, 2)


class Recording(TorchBackend):
    """The exact simulator, sampled with shots, recording every call's (circuits, shots)."""

    def __init__(self, ansatz, seed=0):
        super().__init__(ansatz, dtype=torch.float64, seed=seed)
        self.calls = []

    def run(self, call):
        self.calls.append((call.circuits, call.shots))
        return super().run(call)


def point(seed=0):
    g = torch.Generator().manual_seed(seed)
    theta = torch.rand(1, ANSATZ.n_params, generator=g, dtype=torch.float64) * 6.28
    grad_p = torch.randn(1, ANSATZ.dim, generator=g, dtype=torch.float64)
    exact, _ = Autograd().vjp(TorchBackend(ANSATZ, dtype=torch.float64), theta, grad_p)
    return theta, grad_p, exact


def assert_unbiased(estimates: torch.Tensor, exact: torch.Tensor):
    mean, se = estimates.mean(0), estimates.std(0) / math.sqrt(estimates.shape[0])
    assert ((mean - exact).abs() <= 4 * se + 1e-12).all(), (mean, exact, se)


def test_shot_adaptive_is_unbiased_and_records_what_it_runs():
    theta, grad_p, exact = point()
    backend, strategy = Recording(ANSATZ), ShotAdaptive(min_shots=16, snr=100.0)
    estimates, levels_seen = [], set()
    for _ in range(300):
        backend.calls.clear()
        g, usage = strategy.vjp(backend, theta, grad_p, shots=512)
        estimates.append(g[0])
        per_angle = strategy.last_shots
        # shots recorded = shots run = 2 circuits per angle at that angle's count; one shot count per call
        assert usage.shots == sum(c * s for c, s in backend.calls) == 2 * sum(per_angle)
        assert len(backend.calls) == len(set(per_angle)) and {s for _, s in backend.calls} == set(per_angle)
        assert all(16 <= n <= 512 and (n == 512 or math.log2(n / 16).is_integer()) for n in per_angle)
        levels_seen |= set(per_angle)
    assert_unbiased(torch.stack(estimates), exact[0])
    assert len(levels_seen) > 1  # it did adapt: not every angle got the same count every time


def test_shot_adaptive_gives_noisier_terms_more_shots():
    s = ShotAdaptive(min_shots=8, snr=1.0, momentum=0.0)
    s.mean_g, s.mean_var, s.weight = torch.tensor([1.0, 1.0, 1.0]), torch.tensor([100.0, 400.0, 0.0]), 1.0
    # n_j = snr * sigma_j * sum(sigma) / |g|^2 = sigma_j * 30 / 3: 100 -> 128, 200 -> 256, 0 -> min_shots
    assert s.allocation(3, cap=1024) == [128, 256, 8]
    assert s.allocation(3, cap=200) == [128, 200, 8]  # the job's shots cap it
    fresh = ShotAdaptive(min_shots=64)
    assert fresh.allocation(3, cap=32) == [32, 32, 32]  # nothing measured yet: the least it may spend
    with pytest.raises(ValueError, match="set shots"):
        fresh.vjp(TorchBackend(ANSATZ), *point()[:2], shots=None)


def test_one_shot_count_per_ibm_runtime_job():
    from qpeft_core.quantum.registry import make_backend

    ansatz = qpa_ansatz(2, 2)
    backend = make_backend("fake-ibm:FakeManilaV2", ansatz, seed=0)
    strategy = ShotAdaptive(min_shots=32, snr=50.0, momentum=0.0)
    theta = torch.full((1, ansatz.n_params), 0.4, dtype=torch.float64)
    grad_p = torch.tensor([[1.0, -2.0, 0.5, 3.0]], dtype=torch.float64)
    for _ in range(3):
        _, usage = strategy.vjp(backend, theta, grad_p, shots=1024)
        assert len(usage.job_ids) == len(set(strategy.last_shots))  # a job per distinct shot count
        assert usage.shots == 2 * sum(strategy.last_shots)


def test_spsa_averaged_and_decaying_is_unbiased():
    theta, grad_p, exact = point(1)
    strategy = SPSA(epsilon=1e-2, samples=4, decay=0.101, seed=3)
    backend = TorchBackend(ANSATZ, dtype=torch.float64)
    estimates = torch.stack([strategy.vjp(backend, theta, grad_p)[0][0] for _ in range(400)])
    assert strategy.calls == 400
    assert_unbiased(estimates, exact[0])
    with pytest.raises(ValueError, match="decay"):
        SPSA(decay=2.0)


def test_options_are_checked_by_name():
    assert build_strategy("spsa", {"samples": 3}).samples == 3
    with pytest.raises(ValueError, match=r"\['min_shots'\] do not apply to 'spsa'.*epsilon"):
        build_strategy("spsa", {"min_shots": 3})
    with pytest.raises(ValueError, match="gradient_options"):
        small(gradient="spsa", gradient_options={"snr": 1.0})
    with pytest.raises(ValueError, match="set gradient explicitly"):
        small(gradient_options={"samples": 2})
    qnn = QNN(TorchBackend(ANSATZ), "shot_adaptive", shots=64, options={"min_shots": 4})
    assert isinstance(qnn.strategy, ShotAdaptive) and qnn.strategy.min_shots == 4


def train_steps(model, steps, accum=2):
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    thetas = []
    for step in range(steps):
        for k in range(accum):
            model(input_ids=IDS[k : k + 1], labels=IDS[k : k + 1]).loss.backward()
        model.before_optimizer_step(step=step)
        opt.step()
        opt.zero_grad()
        thetas.append(model.method.generator.theta.detach().clone())
    return thetas


def test_quantum_update_period_updates_angles_every_k_steps_from_the_mean_gradient():
    cfg = dict(quantum_grad="per_step", gradient="parameter_shift")
    model = get_qpeft_model(llama(), small(["q_proj", "lm_head"], quantum_update_every=3, **cfg))
    backend = CountingBackend(model.method.ansatz)
    model.method.set_executor(backend)
    with torch.no_grad():
        model.method.gate.fill_(1.0)
    P = model.method.ansatz.n_params
    thetas = train_steps(model, 6)
    # the angles move only at steps 3 and 6; one forward per angle set, one gradient call per period
    assert torch.equal(thetas[0], thetas[1]) and not torch.equal(thetas[1], thetas[2])
    assert torch.equal(thetas[2], thetas[3]) and torch.equal(thetas[3], thetas[4])
    assert backend.batches == [1, 2 * P, 1, 2 * P] and model.method.calls == {"forward": 2, "gradient": 2}


def test_warm_start_runs_the_first_steps_exactly_then_the_executor():
    cfg = dict(quantum_grad="per_step", gradient="parameter_shift", warm_start_steps=2)
    model = get_qpeft_model(llama(), small(["q_proj", "lm_head"], **cfg))
    backend = CountingBackend(model.method.ansatz)
    model.method.set_executor(backend)
    with torch.no_grad():
        model.method.gate.fill_(1.0)
    train_steps(model, 4)
    # steps 1-2 on the exact simulator (autograd: no circuits run); steps 3-4 on the executor
    P = model.method.ansatz.n_params
    assert backend.batches == [1, 2 * P, 1, 2 * P] and model.method.calls == {"forward": 4, "gradient": 4}
