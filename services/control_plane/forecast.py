"""How many shots (and QPU seconds) a JobSpec will need, before it runs.

Only methods that declare `runs_circuits` (QPA) run circuits (Quantum-PEFT's orthogonal maps and LoRA are
classical); the executor's kind (qpeft_core/quantum/registry.py) gives its time per shot, the gradient
strategy its circuits per VJP (2P for parameter shift and shot_adaptive, 2 x samples for SPSA, 0 for
autograd on the exact simulator). The trainer takes one gradient call per angle update (dL/dp accumulated
over micro-batches, and over quantum_update_every steps), after warm_start_steps on the exact simulator.
Data-parallel replicas share the QNN (rank 0 talks to the QPU), so num_workers does not multiply the cost.
shot_adaptive spends at most its forecast (shots is its per-circuit cap): shots_bound says "upper".
"""

from __future__ import annotations

import functools
import json
import math

from qpeft_core.quantum.gradients import build_strategy
from qpeft_core.quantum.mitigation import DEFAULT_CALIBRATION_SHOTS, calibration_size
from qpeft_core.quantum.registry import ExecutorSpec
from services.contract.jobspec import POOL_WORKERS, JobSpec, runs_circuits

from .errors import ApiError


@functools.lru_cache(maxsize=32)
def _model_config(base_model: str, task: str, num_labels: int):
    from qpeft_core.train.models import model_config

    return model_config(base_model, task, num_labels)


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
def _qpu_time(executor: str, n_qubits: int, depth: int, entangler: str):
    """The executor kind's billed-time model for the QNN (qpeft_core/quantum/timing.py); None where unknown."""
    from qpeft_core.quantum.ansatz import qpa_ansatz

    return ExecutorSpec.parse(executor).qpu_time(qpa_ansatz(n_qubits, depth, entangler))


def warm_up_qiskit() -> None:
    """Load the fake-device catalogue and build one device Target now, on the calling (main) thread.

    Qiskit's first use sets up process-wide state; done first inside a short-lived worker thread (a
    request handler), a later use from another thread crashed the process (segfault in Target building,
    seen with qiskit 2.6 when the first thread had exited). Doing it once on the long-lived main thread
    avoids that; it also takes the ~2 s catalogue load off the first request."""
    from qpeft_core.quantum import qiskit_backends as qb

    qb.fake_device_qubits("FakeManilaV2")
    qb.fake_device("FakeManilaV2").num_qubits  # noqa: B018  (builds the Target: standard gates, parameters)


def forecast(spec: JobSpec, usd_per_qpu_second: float | None = None) -> dict:
    steps = spec.max_steps
    gradient = spec.resolved_gradient()
    base = {
        "method": spec.method,
        "executor": spec.executor,
        "gradient": gradient,
        "max_steps": steps,
        "seconds_per_shot": None,
        "qpu_seconds": None,
        "jobs": 0,
        "cost_usd": None,
    }
    if not runs_circuits(spec.method):
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
            "shots_bound": "exact",
            "explanation": f"{spec.method} computes its weight update classically and runs no circuits.",
        }
    from qpeft_core.adapters.qpa.generator import plan, resolve_widths

    cfg = spec.adapter_config()  # the QPAConfig the trainer will build, defaults included
    r, n_mlp, depth = cfg.r, cfg.n_mlp, cfg.qnn_depth
    entangler = cfg.entangler
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
    options = spec.gradient_options if gradient == spec.gradient else {}
    strategy = build_strategy(gradient, options)
    grad_circuits = strategy.circuits(params)
    # The trainer takes one gradient call per update: at step indices i = k j - 1 (quantum_update_every = k), on
    # the executor once i >= warm_start_steps. Each update moves the angles, which the next step's forward (or
    # the final checkpoint) measures, on the executor once that step is past the warm start; the very first
    # update of the default mapping with k = 1 does not move them (its gate starts at 0, so dL/dp = 0). The
    # initial angles are measured on the executor only without a warm start.
    k, warm = cfg.quantum_update_every, cfg.warm_start_steps
    periods = steps // k
    updates = max(0, periods - math.ceil((warm + 1) / k) + 1)
    first = max(1, math.ceil(warm / k))
    forwards = max(0, periods - first + 1) - (1 if k == 1 and first == 1 and periods else 0) + (1 if warm == 0 else 0)
    quantum_steps = max(0, steps - warm)
    shots = spec.shots or 0
    per_step_circuits = 1 + grad_circuits
    circuits = forwards + updates * grad_circuits
    total = circuits * shots
    # A readout-mitigated executor calibrates once per quantum worker that serves it (one for a device, whose
    # calls stick to one worker; every worker of a simulator pool), one job each (mitigation.calibration_size).
    cal_workers, cal_circuits, cal_shots = 0, 0, 0
    if spec.executor_options.get("readout_mitigation") not in (None, "none"):
        per = spec.executor_options.get("readout_calibration_shots") or DEFAULT_CALIBRATION_SHOTS
        cal_workers = 1 if ExecutorSpec.parse(spec.executor).one_device else POOL_WORKERS
        cal_circuits, cal_shots = (cal_workers * n for n in calibration_size(n_qubits, per))
    circuits, total = circuits + cal_circuits, total + cal_shots
    # Executor calls, each one Runtime job: a forward, and per update the strategy's calls (shot_adaptive: at
    # most one per shot count it can pick)
    jobs = forwards + updates * strategy.calls_per_vjp(params, shots) + cal_workers
    base["jobs"] = jobs
    if ExecutorSpec.parse(spec.executor).kind.qpu_time is not None:
        try:
            timing = _qpu_time(spec.executor, n_qubits, depth, entangler)
        except ValueError as e:
            raise ApiError(422, str(e), "body.executor", "pick a device with enough qubits or a smaller QNN") from e
        except RuntimeError:  # no IBM account here: the device's timing cannot be looked up
            timing = None
        if timing is not None:
            seconds = jobs * timing.per_job_s + circuits * timing.per_circuit_s + total * timing.per_shot_s
            base.update(
                seconds_per_shot=timing.per_shot_s,
                seconds_per_job=timing.per_job_s,
                seconds_per_circuit=timing.per_circuit_s,
                qpu_seconds=seconds,
                cost_usd=None if usd_per_qpu_second is None else seconds * usd_per_qpu_second,
            )
    grad_text = {
        "parameter_shift": f"2P = {grad_circuits}",
        "shot_adaptive": f"2P = {grad_circuits} (at most {shots} shots each: shots per angle adapt)",
        "spsa": f"2 x samples = {grad_circuits}",
        "autograd": "0 (autograd on the exact simulator)",
    }[gradient]
    schedule = f"{quantum_steps} step(s) on the executor" + (f" after {warm} warm-start step(s)" if warm else "")
    if k > 1:
        schedule += f", the angles updated every {k} steps ({updates} updates)"
    explanation = (
        f"QPA generates m = r * sum(d_in + d_out) = {m} LoRA parameters over {len(dims)} target layer(s), "
        f"n_mlp = {n_mlp} per basis state, so N = {n_qubits} qubits and P = N x L = {params} angles. "
        f"{schedule}. Each update runs 1 gradient call of {grad_text} circuits and each new angle set 1 QNN "
        f"forward, at {shots} shots per circuit{' (exact: no shots)' if not shots else ''}. "
        f"num_workers does not multiply this: data-parallel replicas share one QNN."
    )
    formula = (
        f"shots = (forwards + updates x G) x shots_per_circuit = ({forwards} + {updates} x {grad_circuits}) x "
        f"{shots}"
        + (f" + {cal_shots} readout calibration ({cal_workers} worker(s))" if cal_shots else "")
        + f" = {total}"
    )
    return {
        **base,
        "qubits": n_qubits,
        "parameters": params,
        "shots_per_circuit": shots,
        "per_step": {
            "forward_circuits": 1,
            "gradient_circuits_per_call": grad_circuits,
            "gradient_calls": 1,
            "circuits": per_step_circuits,
            "shots": per_step_circuits * shots,
        },
        "circuits": circuits,
        "shots": total,
        "formula": formula,
        "shots_bound": "upper" if gradient == "shot_adaptive" else "exact",
        "explanation": explanation,
    }
