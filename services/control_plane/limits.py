"""Checks at submit (and estimate) that need the server: what this server's executors, the base model and
the Ray cluster can hold. The JobSpec checks what a spec says on its own (services/contract/jobspec.py); these
check it against this deployment, and each 422 names the field and the limit."""

from __future__ import annotations

import logging
import threading
import time

from services.contract.jobspec import JobSpec

from .errors import ApiError
from .forecast import target_dims

log = logging.getLogger(__name__)
CAPACITY_TTL_S = 30.0  # cluster resources change when nodes join or leave; one read per TTL, not per request
UNKNOWN_TTL_S = 2.0  # no answer, or no CPU yet (a starting head, workers not joined): ask again soon


class ClusterCapacity:
    """The CPUs and GPUs jobs may ask for: the settings' ceilings (an autoscaling cluster), else what the
    Ray cluster's alive nodes have, read through the reconciler's job client at most every TTL. None when
    Ray does not answer or lists no CPU yet: the job then waits in the queue as before."""

    def __init__(self, state):
        self.state = state
        self._lock = threading.Lock()
        self._until, self._value = 0.0, None

    def get(self) -> dict[str, float] | None:
        s = self.state.settings
        if s.cluster_cpus is not None and s.cluster_gpus is not None:
            return {"CPU": float(s.cluster_cpus), "GPU": float(s.cluster_gpus)}
        ray = self.state.reconciler.ray
        if ray is None:  # not connected yet (the reconciler starts or finds the head)
            return None
        with self._lock:
            if time.monotonic() >= self._until:
                self._value = self._read(ray)
                self._until = time.monotonic() + (UNKNOWN_TTL_S if self._value is None else CAPACITY_TTL_S)
            value = dict(self._value) if self._value is not None else None
        if value is not None:
            if s.cluster_cpus is not None:
                value["CPU"] = float(s.cluster_cpus)
            if s.cluster_gpus is not None:
                value["GPU"] = float(s.cluster_gpus)
        return value

    @staticmethod
    def _read(ray) -> dict[str, float] | None:
        try:
            total = ray.resources()
        except Exception as e:  # Ray down or starting: no check now rather than a failed submit
            log.info("could not read the Ray cluster's resources (%s)", type(e).__name__)
            return None
        # Right after start the head may not list its resources yet, and a head with 0 CPUs has no CPU until
        # the worker nodes join: a count of 0 then means "not known yet", never "refuse every job".
        return total if total.get("CPU", 0) > 0 else None


def check_cluster(capacity: ClusterCapacity, spec: JobSpec) -> None:
    """One CPU per worker, or one GPU with use_gpu (Ray Train's default per-worker resources)."""
    have = capacity.get()
    if have is None:
        return
    workers = spec.scaling.num_workers
    if spec.scaling.use_gpu:
        gpus = int(have.get("GPU", 0))
        if gpus == 0:
            raise ApiError(
                422,
                "the cluster has 0 GPUs; use_gpu needs one per worker",
                "body.scaling.use_gpu",
                "set scaling.use_gpu to false, or run on a cluster with GPUs",
            )
        if workers > gpus:
            raise ApiError(
                422,
                f"{workers} GPU workers asked; the cluster has {gpus} GPU(s), one per worker",
                "body.scaling.num_workers",
                f"use at most {gpus} workers with use_gpu",
            )
    cpus = int(have.get("CPU", 0))
    if not spec.scaling.use_gpu and workers > cpus:
        raise ApiError(
            422,
            f"{workers} workers asked; the cluster has {cpus} CPU(s), one per worker",
            "body.scaling.num_workers",
            f"use at most {cpus} workers",
        )


def check_executor(spec: JobSpec, listed: list[dict], declared: list[str]) -> None:
    """IBM devices only when this server knows them: listed by its IBM account (GET /v1/backends), or named
    by the operator in QPEFT_IBM_BACKENDS when only the quantum workers hold the account."""
    if spec.executor.partition(":")[0] != "ibm":
        return
    known = sorted({b["spec"] for b in listed if b["kind"] == "ibm"} | {f"ibm:{name}" for name in declared})
    if spec.executor not in known:
        raise ApiError(
            422,
            "this IBM backend is not among the IBM devices configured on this server"
            if known
            else "no IBM account is configured on this server, so no ibm: executor can run here",
            "body.executor",
            f"use one of {', '.join(known)}" if known else "use a simulator or fake device listed by GET /v1/backends",
        )


def check_model(spec: JobSpec) -> None:
    """r at most the smallest side of the targeted layers (a larger rank adds nothing). QPA's n_mlp is
    bounded by the m numbers it generates in the forecast, which computes m."""
    cfg = spec.adapter_config()
    dims = target_dims(spec, cfg.target_modules)
    limit = min(min(d_in, d_out) for d_in, d_out in dims)
    if cfg.r > limit:
        raise ApiError(
            422,
            f"r = {cfg.r} exceeds the smallest targeted layer side ({limit}) of {spec.base_model}",
            "body.method_config.r",
            f"use r <= {limit}",
        )


def check_fits(request, spec: JobSpec) -> None:
    from .routers.backends import listing

    check_executor(spec, listing(), request.app.state.settings.ibm_backends)
    check_model(spec)
    check_cluster(request.app.state.capacity, spec)
