"""The Ray quantum-worker pool: same answers as the executor, splitting, recovery, shot accounting."""

import os
import signal
import sys
import threading
import time

import pytest
import torch

from qpeft_core.quantum.ansatz import qpa_ansatz
from qpeft_core.quantum.backend import ExecutionResult, Executor, TorchBackend
from qpeft_core.quantum.gradients import QNN, Autograd, ParameterShift, make_strategy
from services.contract.ledger import BudgetExhausted, InMemoryLedger
from services.quantum_pool import QuantumPool
from services.quantum_pool.pool import worker_resources

ANSATZ = qpa_ansatz(4, 3)
ray_test = pytest.mark.usefixtures("ray_cluster")


class TestExecutor(Executor):
    """Test-only executor: the exact torch simulator, slowed by `delay_s` per call, hanging once if
    `hang_file` exists (and removing it), and tagging usage.job_ids with '<pid>:<first angle>' so a test
    can see which worker ran which share."""

    __test__ = False  # not a pytest class

    def __init__(self, ansatz, delay_s=0.0, hang_file=None, seed=0):
        self.inner = TorchBackend(ansatz, seed=seed)
        self.ansatz, self.name, self.exact, self.max_qubits = ansatz, "exact", True, 30
        self.delay_s, self.hang_file = delay_s, hang_file

    def run(self, call):
        thetas = call.thetas
        if self.hang_file and os.path.exists(self.hang_file):
            os.remove(self.hang_file)
            time.sleep(120)
        time.sleep(self.delay_s)
        probs, usage = self.inner.run(call)
        usage.job_ids.append(f"{os.getpid()}:{float(thetas[0, 0]):.6f}")
        return ExecutionResult(probs, usage)


# Ray workers cannot import this test module by name: ship TestExecutor by value.
import ray.cloudpickle  # noqa: E402

ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])


def thetas(batch, seed=0):
    return torch.rand(batch, ANSATZ.n_params, generator=torch.Generator().manual_seed(seed)) * 6.28


def test_worker_resources_follow_the_worker_groups_a_cluster_offers():
    plain = {"CPU": 4.0, "qpu": 2.0}
    groups = {"CPU": 4.0, "qpu": 3.0, "qpu_aer": 2.0, "qpu_ibm": 1.0}
    assert worker_resources("ibm:ibm_brisbane", plain) == worker_resources("aer", plain) == {"qpu": 1}
    assert worker_resources("ibm:ibm_brisbane", groups) == {"qpu": 1, "qpu_ibm": 1}
    for simulator in ("exact", "aer", "aer-noisy:fake_manila", "fake-ibm:fake_manila"):
        assert worker_resources(simulator, groups) == {"qpu": 1, "qpu_aer": 1}
    assert worker_resources(TestExecutor, groups) == {"qpu": 1}


# --- the pool on real local Ray -----------------------------------------------------------------------
@ray_test
def test_pool_matches_executor_and_splits_in_order():
    direct = TorchBackend(ANSATZ)
    with QuantumPool(TestExecutor, ANSATZ, n_workers=2, min_share=8) as pool:
        assert (pool.name, pool.exact, pool.ansatz) == ("exact", True, ANSATZ)
        small, big = thetas(3), thetas(40, seed=1)
        r = pool.probabilities(small)
        assert torch.allclose(r.probs, direct.probabilities(small).probs, atol=1e-7)
        assert len(r.usage.job_ids) == 1  # small call: one worker, whole
        r = pool.probabilities(big)
        assert torch.allclose(r.probs, direct.probabilities(big).probs, atol=1e-7)
        # 40 circuits on 2 workers: two shares of 20, from two processes, gathered in order
        pids = {j.split(":")[0] for j in r.usage.job_ids}
        firsts = [float(j.split(":")[1]) for j in r.usage.job_ids]
        assert len(pids) == 2 and firsts == pytest.approx([float(big[0, 0]), float(big[20, 0])], abs=1e-5)
        assert r.usage.circuits == 40 and r.usage.shots == 0


@ray_test
def test_pool_matches_aer():
    pytest.importorskip("qiskit_aer")
    from qpeft_core.quantum.registry import make_backend

    x = thetas(20, seed=2)
    with QuantumPool("aer", ANSATZ, n_workers=2, min_share=4) as pool:
        r = pool.probabilities(x)
    direct = make_backend("aer", ANSATZ).probabilities(x)
    assert r.probs.shape == (20, 16) and torch.allclose(r.probs, direct.probs.to(r.probs.dtype), atol=1e-7)


@ray_test
def test_qnn_through_pool_trains_and_matches_local_gradient():
    torch.manual_seed(0)
    x = thetas(2, seed=3)
    target = torch.softmax(torch.randn(2, 16, dtype=torch.float64), -1)
    local = QNN(TorchBackend(ANSATZ, dtype=torch.float64), "autograd")
    with QuantumPool("exact", ANSATZ, n_workers=2, options={"dtype": torch.float64}, min_share=4) as pool:
        qnn = QNN(pool, "parameter_shift")
        t_pool, t_local = x.clone().double().requires_grad_(), x.clone().double().requires_grad_()
        ((qnn(t_pool) - target) ** 2).sum().backward()
        ((local(t_local) - target) ** 2).sum().backward()
        assert torch.allclose(t_pool.grad, t_local.grad, atol=1e-10)
        # a VJP whose shifted circuits the pool splits over its workers; the pool only runs circuits, so
        # "auto" is parameter shift on it and autograd (which differentiates a local simulator) is refused
        g = torch.randn(2, 16, dtype=torch.float64)
        ref = torch.autograd.grad(local(t_local), t_local, g)[0]
        grad, usage = ParameterShift().vjp(pool, x.double(), g, None)
        assert torch.allclose(grad, ref, atol=1e-10) and usage.circuits == 2 * 2 * ANSATZ.n_params
        assert isinstance(make_strategy("auto", pool, None), ParameterShift)
        with pytest.raises(ValueError, match="autograd"):
            Autograd().vjp(pool, x.double(), g, None)
        # a few optimizer steps through the pool: the loss goes down
        theta = x.clone().double().requires_grad_()
        opt = torch.optim.Adam([theta], lr=0.1)
        losses = []
        for _ in range(15):
            opt.zero_grad()
            loss = ((qnn(theta) - target) ** 2).sum()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        assert losses[-1] < 0.5 * losses[0]
        assert qnn.usage.circuits > 0 and pool.stats()["failures"] == 0


def call_killing(pool, pids: list[int]):
    """A 32-circuit, 100-shot call split over the pool's workers, with `pids` SIGKILLed while both shares run:
    the call's result and the seconds it took to come back after the kill."""
    result = {}
    call = threading.Thread(target=lambda: result.update(r=pool.probabilities(thetas(32), shots=100)))
    call.start()
    time.sleep(0.7)  # both shares are running now
    for pid in pids:
        os.kill(pid, signal.SIGKILL)
    t0 = time.monotonic()
    call.join(timeout=120)
    assert not call.is_alive(), "the call did not come back"
    return result["r"], time.monotonic() - t0


@ray_test
def test_killed_worker_is_retried_charged_as_lost_and_restarted():
    led = InMemoryLedger({"job": 100_000})
    with QuantumPool(TestExecutor, ANSATZ, 2, {"delay_s": 1.5}, ledger=led, key="job", min_share=8) as pool:
        old = pool.worker_pids()
        r, _ = call_killing(pool, old[:1])
        assert r.probs.shape == (32, 16) and torch.allclose(r.probs.sum(1), torch.ones(32, dtype=r.probs.dtype))
        assert r.usage.shots == 3200  # what the caller got is charged once
        acc = led.account("job")
        assert (acc.spent, acc.lost, acc.reserved) == (3200, 1600, 0)  # the killed share: lost, separately
        assert pool.stats()["lost_shots"] == 1600 and pool.stats()["failures"] == 1
        new = pool.worker_pids()
        assert new[0] != old[0] and new[1] == old[1]  # Ray restarted the killed actor
        assert pool.probabilities(thetas(32), shots=10).usage.shots == 320  # and it works again


@ray_test
def test_every_worker_killed_at_once_the_call_waits_for_their_restart():
    """A whole quantum node lost (both workers at once, as a crashed container): the shares wait for Ray's
    restarted actors and run there, well inside the call timeout (the pool used to spin on restarted workers it
    never asked again until the timeout; seen on Docker)."""
    led = InMemoryLedger({"job": 100_000})
    with QuantumPool(TestExecutor, ANSATZ, 2, {"delay_s": 1.5}, ledger=led, key="job", min_share=8) as pool:
        old = pool.worker_pids()
        r, waited = call_killing(pool, old)
        assert waited < 60, "the call did not come back"
        assert r.usage.shots == 3200
        acc = led.account("job")
        # both killed shares lost; a resend can fail once more while Ray's handle still points at the dead
        # process (ActorUnavailableError: it may or may not have run), and is charged as lost too
        assert (acc.spent, acc.reserved) == (3200, 0) and acc.lost >= 3200 and acc.lost % 1600 == 0
        assert pool.stats()["lost_shots"] == acc.lost
        assert set(pool.worker_pids()).isdisjoint(old)


@ray_test
def test_hung_worker_times_out_and_is_replaced(tmp_path):
    hang = tmp_path / "hang-once"
    hang.touch()
    led = InMemoryLedger()
    opts = {"hang_file": str(hang)}
    with QuantumPool(TestExecutor, ANSATZ, 2, opts, ledger=led, call_timeout_s=3.0, min_share=8) as pool:
        old = pool.worker_pids()
        t0 = time.monotonic()
        r = pool.probabilities(thetas(4), shots=50)
        assert time.monotonic() - t0 < 20 and r.usage.shots == 200
        acc = led.account("default")
        assert (acc.spent, acc.lost) == (200, 200)
        assert sorted(pool.worker_pids()) != sorted(old)  # the hung one was killed and restarted


@ray_test
def test_budget_exhaustion_and_concurrent_calls_never_overspend():
    led = InMemoryLedger({"t": 10_000})
    with QuantumPool(TestExecutor, ANSATZ, 2, ledger=led, key="t", min_share=8) as pool:
        pool.probabilities(thetas(16), shots=100)  # 1600
        # 8,400 left: a split call of 2 x 16 x 300 = 9,600 is refused whole, before anything runs
        with pytest.raises(BudgetExhausted):
            pool.probabilities(thetas(32), shots=300)
        assert led.account("t").spent == 1600 and led.remaining("t") == 8400

        got, errors = [], []

        def hammer():
            while True:
                try:
                    got.append(pool.probabilities(thetas(5), shots=100).usage.shots)
                except BudgetExhausted:
                    return
                except Exception as e:  # pragma: no cover - reported below
                    errors.append(e)
                    return

        threads = [threading.Thread(target=hammer) for _ in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
        acc = led.account("t")
        assert not errors and acc.reserved == 0 and acc.lost == 0
        assert acc.spent == 1600 + sum(got) <= 10_000 and acc.remaining == 10_000 - acc.spent >= 0
        assert acc.remaining < 500  # it ran until the budget could not take one more call


@ray_test
def test_pool_charges_each_workers_readout_calibration():
    """A readout-mitigated executor calibrates once per worker before its first call: the pool reserves and
    commits those shots like any circuit's (3 qubits: mthree's balanced method runs 4 circuits of
    2 x 1000 / 4 shots, 2,000 in all), and a budget that cannot pay for them refuses the call first."""
    ansatz = qpa_ansatz(3, 1)
    opts = {"readout_mitigation": "mthree", "readout_calibration_shots": 1000}
    led = InMemoryLedger({"t": 10**7, "poor": 1000})
    x = torch.rand(2, ansatz.n_params, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    with QuantumPool("aer-noisy:FakeManilaV2", ansatz, n_workers=2, options=opts, ledger=led, key="t") as pool:
        probs, usage = pool.probabilities(x, shots=200)
        assert usage.shots == 400 and torch.allclose(probs.sum(1), torch.ones(2, dtype=probs.dtype))
        assert led.account("t").spent == 400 + 2 * 2000  # both workers calibrated, each charged
        pool.probabilities(x, shots=200)
        acc = led.account("t")
        assert (acc.spent, acc.reserved) == (800 + 2 * 2000, 0)  # calibrated once per worker
    with QuantumPool("aer-noisy:FakeManilaV2", ansatz, n_workers=1, options=opts, ledger=led, key="poor") as pool:
        with pytest.raises(BudgetExhausted):
            pool.probabilities(x, shots=200)
        acc = led.account("poor")
        assert (acc.spent, acc.lost, acc.reserved) == (0, 0, 0)  # refused before anything ran
