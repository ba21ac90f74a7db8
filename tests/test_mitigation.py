"""Readout-error mitigation (mthree) on the shot-based Qiskit executors: closer to the exact distribution on a
device with large readout error, calibration counted once in Usage, options checked where they enter."""

import math

import pytest
import torch

pytest.importorskip("mthree")

from pydantic import ValidationError  # noqa: E402

from qpeft_core.adapters import QPAConfig  # noqa: E402
from qpeft_core.quantum import qiskit_backends as qb  # noqa: E402
from qpeft_core.quantum.ansatz import qpa_ansatz  # noqa: E402
from qpeft_core.quantum.backend import TorchBackend  # noqa: E402
from qpeft_core.quantum.registry import make_backend  # noqa: E402
from qpeft_core.quantum.timing import PER_JOB_S  # noqa: E402
from services.contract.jobspec import JobSpec  # noqa: E402

# FakeYorktownV2's calibration data: readout errors up to 9% (P(1|0)) and 50% (P(0|1)) on its five qubits
DEVICE = "FakeYorktownV2"
SHOTS = 4000
EXECUTORS = {
    "aer-noisy": lambda a, seed, **o: qb.AerSamplerBackend(a, DEVICE, seed=seed, **o),
    "fake-ibm": lambda a, seed, **o: qb.IBMRuntimeBackend(a, DEVICE, seed=seed, **o),
}


def _tvd(p, q):
    return 0.5 * (p - q).abs().sum(-1)


@pytest.mark.parametrize("kind", EXECUTORS)
def test_mthree_brings_counts_closer_to_the_exact_distribution(kind):
    ansatz = qpa_ansatz(3, 1)
    thetas = torch.randn(4, ansatz.n_params, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    exact = TorchBackend(ansatz, dtype=torch.float64).probabilities(thetas).probs
    # E[TVD] of an empirical distribution over K states from N shots is at most sqrt(K / N) / 2
    shot_noise = 0.5 * math.sqrt(ansatz.dim / SHOTS)
    for seed in range(3):
        raw = EXECUTORS[kind](ansatz, seed).probabilities(thetas, SHOTS).probs
        mitigated = EXECUTORS[kind](ansatz, seed, readout_mitigation="mthree").probabilities(thetas, SHOTS).probs
        assert mitigated.dtype == torch.float64 and mitigated.shape == exact.shape
        assert (mitigated >= 0).all()
        torch.testing.assert_close(mitigated.sum(-1), torch.ones(4, dtype=torch.float64), atol=1e-12, rtol=0)
        before, after = _tvd(raw, exact).mean().item(), _tvd(mitigated, exact).mean().item()
        assert before - after > 2 * shot_noise, (seed, before, after, shot_noise)


@pytest.mark.parametrize("kind", EXECUTORS)
def test_calibration_runs_once_and_is_charged_in_usage(kind):
    ansatz = qpa_ansatz(3, 1)
    thetas = torch.zeros(2, ansatz.n_params, dtype=torch.float64)
    plain = EXECUTORS[kind](ansatz, 0).probabilities(thetas, 500).usage
    executor = EXECUTORS[kind](ansatz, 0, readout_mitigation="mthree", readout_calibration_shots=1000)
    first = executor.probabilities(thetas, 500).usage
    calibration = executor._mitigator.calibration
    # mthree's balanced method: a few circuits over all measured qubits at once, 2 x the calibration shots
    assert calibration.shots >= 2 * 1000 and calibration.circuits >= 2
    assert (first.shots, first.circuits) == (2 * 500 + calibration.shots, 2 + calibration.circuits)
    assert set(calibration.job_ids) < set(first.job_ids)
    if kind == "fake-ibm":  # a device's time model: the calibration is one more job (timing.py)
        assert calibration.qpu_s_estimated > PER_JOB_S
        assert first.qpu_s_estimated == pytest.approx(plain.qpu_s_estimated + calibration.qpu_s_estimated)
    else:  # Aer is a simulator: no QPU time, calibration included
        assert first.qpu_s_estimated is plain.qpu_s_estimated is calibration.qpu_s_estimated is None
    second = executor.probabilities(thetas, 500).usage
    assert (second.shots, second.circuits, second.qpu_s_estimated) == (plain.shots, 2, plain.qpu_s_estimated)
    # the three measured qubits were calibrated, and nothing else
    cals = executor._mitigator._mit.single_qubit_cals
    assert sorted(q for q, c in enumerate(cals) if c is not None) == sorted(executor._mitigator.qubits)
    assert len(set(executor._mitigator.qubits)) == 3


def test_unknown_mitigation_names_the_option_and_the_allowed_values():
    ansatz = qpa_ansatz(3, 1)
    with pytest.raises(ValueError, match=r"readout_mitigation must be one of \('none', 'mthree'\), got 'm3'"):
        qb.AerSamplerBackend(ansatz, DEVICE, readout_mitigation="m3")
    with pytest.raises(ValueError, match="readout_mitigation must be one of .*got 'zne'"):
        make_backend(f"fake-ibm:{DEVICE}", ansatz, readout_mitigation="zne")
    with pytest.raises(ValueError, match="readout_calibration_shots must be a positive int, got 0"):
        make_backend(f"aer-noisy:{DEVICE}", ansatz, readout_mitigation="mthree", readout_calibration_shots=0)
    with pytest.raises(ValueError, match="readout_mitigation given, but executor 'exact' has no readout error"):
        QPAConfig(target_modules=["c_attn"], executor_options={"readout_mitigation": "mthree"})
    with pytest.raises(ValueError, match="readout_mitigation must be one of"):
        QPAConfig(
            target_modules=["c_attn"],
            executor="aer-noisy:fake_yorktown",
            shots=10,
            executor_options={"readout_mitigation": "M3"},
        )


SPEC = {
    "base_model": "tiny-gpt2",
    "dataset": "tinyshakespeare",
    "method": "qpa",
    "method_config": {"r": 2, "n_mlp": 64, "qnn_depth": 2},
    "shots": 100,
    "executor_options": {"readout_mitigation": "mthree", "readout_calibration_shots": 2000},
}


@pytest.mark.parametrize("executor", [f"aer-noisy:{DEVICE}", "fake-ibm:fake_manila"])
def test_jobspec_carries_the_option_to_qpa_config(executor):
    spec = JobSpec.model_validate({**SPEC, "executor": executor})
    config = spec.adapter_config()
    assert config.executor_options == {"readout_mitigation": "mthree", "readout_calibration_shots": 2000}


@pytest.mark.parametrize(
    "change, words",
    [
        ({"executor": "exact", "shots": None}, "executor 'exact' has no readout error to mitigate"),
        ({"executor": "aer"}, "executor 'aer' has no readout error to mitigate"),
        ({"executor": f"aer-noisy:{DEVICE}", "executor_options": {"readout_mitigation": "twirl"}}, "got 'twirl'"),
    ],
)
def test_jobspec_refuses_mitigation_where_it_makes_no_sense(change, words):
    with pytest.raises(ValidationError) as info:
        JobSpec.model_validate({**SPEC, **change})
    (error,) = info.value.errors()
    # the API's error handler reads the "field: " prefix as the field: body.executor_options, with the fix
    assert error["type"] == "executor_options" and error["msg"].startswith("executor_options: "), error
    assert words in error["msg"], error
    assert "mthree" in error["msg"] and "mthree" in error["ctx"]["fix"]
