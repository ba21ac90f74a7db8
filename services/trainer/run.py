"""A fine-tuning job on Ray: Ray Train's TorchTrainer over `worker_loop.train_loop_per_worker`.

What must outlive any one trainer worker lives in actors owned by the driver (this process):
- `PoolService` holds the quantum pool and the job's shot ledger, so a trainer group that Ray Train
  restarts after a failure finds the same quantum workers and the same shot count;
- `EventBox` carries rank 0's events to the driver, which prints them in order (stdout of a Ray job is
  what the control plane reads), so the result line always comes after the last progress line.
"""

from __future__ import annotations

import functools
import os
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import ray
from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from qpeft_core.quantum.backend import CircuitCall, Usage
from services.contract import events
from services.contract.ledger import BudgetExhausted, InMemoryLedger
from services.quantum_pool import QuantumPool

from .worker_loop import train_loop_per_worker, uses_pool


def on_driver_node() -> NodeAffinitySchedulingStrategy:
    """Where the job's own actors (event box, pool service) run: beside the driver. With 0 CPUs they would fit on
    any node, a quantum worker's included, and die with it: on Docker the event box went down with the Aer
    container and the job's events stopped (seen in the first real compose run). The driver's node going down
    ends the job anyway; the control plane then resubmits it."""
    return NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)


@ray.remote(num_cpus=0)
class EventBox:
    """Events from rank 0 (sent without waiting, executed in order) until the driver takes them."""

    def __init__(self):
        self.items = []

    def put(self, event: dict):
        self.items.append(event)

    def take(self) -> list[dict]:
        out, self.items = self.items, []
        return out


@ray.remote(num_cpus=0, max_concurrency=4)
class PoolService:
    """The quantum pool of one job, started on first use by the trainer (which knows the ansatz). It only runs
    circuits: calls arrive checked (CircuitCall) from the trainer's gradient strategy and QNN.

    Refusals by the ledger come back as {"budget": message} rather than as an exception, so the trainer
    can tell "out of shots" (stop cleanly) from a failure (let Ray Train retry)."""

    def __init__(self, executor, options, n_workers, make_ledger, key):
        self.args = (executor, n_workers, options)
        # built here, not shipped: a ledger holds a lock or a database engine
        self.ledger, self.key = make_ledger(), key
        self.pool, self.lock = None, threading.Lock()
        self.calls = {"forward": 0, "gradient": 0}  # by the call's tag
        self.usage = Usage(executor)

    def start(self, ansatz) -> dict:
        with self.lock:
            if self.pool is None:
                executor, n_workers, options = self.args
                self.pool = QuantumPool(executor, ansatz, n_workers, options, ledger=self.ledger, key=self.key)
            elif (ansatz.n_qubits, ansatz.n_params) != (self.pool.ansatz.n_qubits, self.pool.ansatz.n_params):
                raise ValueError("this job's pool runs a different circuit")
            p = self.pool
            return {"ansatz": p.ansatz, "name": p.name, "exact": p.exact, "max_qubits": p.max_qubits}

    def run(self, call: CircuitCall):
        try:
            probs, usage = self.pool.run(call)
        except BudgetExhausted as e:
            return {"budget": str(e)}
        with self.lock:
            self.calls[call.tag or "forward"] = self.calls.get(call.tag or "forward", 0) + 1
            self.usage = self.usage + usage
        return probs, usage

    def stats(self) -> dict:
        with self.lock:
            u, calls = self.usage, dict(self.calls)
        pool = self.pool.stats() if self.pool else {}
        return {
            **calls,
            "shots": u.shots,
            "qpu_s": u.qpu_s if u.qpu_s is not None else u.qpu_s_estimated,
            "lost_shots": pool.get("lost_shots", 0),
            "failures": pool.get("failures", 0),
            "remaining": self._remaining("remaining"),
            "qpu_s_remaining": self._remaining("qpu_s_remaining"),
        }

    def _remaining(self, what: str):
        try:
            return getattr(self.ledger, what)(self.key)
        except KeyError:  # no account (yet) in the database: nothing to stop on; a reservation will say why
            return None

    def worker_pids(self) -> list[int]:
        return self.pool.worker_pids() if self.pool else []

    def placement(self) -> list[dict]:
        """Where each quantum worker runs: pid, node id and node IP."""

        def where(actor):
            return {"pid": os.getpid(), "node_id": ray.get_runtime_context().get_node_id()}

        found = ray.get([w.__ray_call__.remote(where) for w in self.pool.workers]) if self.pool else []
        ips = {n["NodeID"]: n["NodeManagerAddress"] for n in ray.nodes()}  # the address each node registered
        return [{**w, "ip": ips.get(w["node_id"])} for w in found]

    def shutdown(self):
        if self.pool is not None:
            self.pool.shutdown()


def build_ledger(database_url: str | None, key: str, shot_limit: int | None):
    """The control plane's database ledger when there is a database URL (its accounts and limits are set by
    the control plane), else an in-process one holding this job's own shot limit (None: unlimited, counted)."""
    if database_url:
        from services.contract.sql_ledger import SQLLedger

        return SQLLedger(database_url)
    return InMemoryLedger({key: shot_limit} if shot_limit is not None else None)


@dataclass
class RunResult:
    state: str  # SUCCEEDED | FAILED | BUDGET_EXHAUSTED | CANCELLED
    reason: str
    checkpoint: str | None  # the last checkpoint Ray Train kept (a directory under storage_path)
    artifacts: dict = field(default_factory=dict)  # name -> path
    pool_stats: dict | None = None
    events: list = field(default_factory=list)  # every event, in order (the result event included)


class TrainerRun:
    """One job: `TrainerRun(spec, ...).run()`; `pool` is the PoolService handle (None for classical methods)
    once run() has started, for callers that watch or disturb the quantum workers."""

    def __init__(
        self,
        spec,
        *,
        storage_path: str | None = None,
        artifact_dir: str | None = None,
        name: str | None = None,
        max_failures: int = 1,
        pool_workers: int = 2,
        make_ledger=None,
        ledger_key: str | None = None,
        on_event=events.emit,
        step_callback=None,
    ):
        self.spec, self.on_event, self.step_callback = spec, on_event, step_callback
        self.name = name or f"qpeft-{os.environ.get('QPEFT_JOB_ID') or uuid.uuid4().hex[:8]}"
        artifact_dir = artifact_dir or os.environ.get("QPEFT_ARTIFACT_DIR")
        # checkpoints next to the job's artifacts when the control plane gave a folder, else a temp folder;
        # on a multi-node cluster this must be storage every node reaches (shared filesystem, S3, GCS)
        default = Path(artifact_dir).parent / "ray" if artifact_dir else Path(tempfile.gettempdir()) / "qpeft-runs"
        self.storage_path = str(Path(storage_path or default).resolve())
        self.artifact_dir = str(Path(artifact_dir or Path(self.storage_path) / self.name / "artifacts").resolve())
        self.max_failures, self.pool_workers = max_failures, pool_workers
        self.ledger_key = (
            ledger_key or os.environ.get("QPEFT_LEDGER_KEY") or os.environ.get("QPEFT_TENANT") or "default"
        )
        self.make_ledger = make_ledger  # zero-argument callable run in the pool's actor; default build_ledger
        self.pool = None
        self.seen: list[dict] = []
        self.told: dict | None = None

    def _start_pool(self):
        spec, make = self.spec, self.make_ledger
        if make is None:
            make = functools.partial(
                build_ledger, os.environ.get("QPEFT_DATABASE_URL"), self.ledger_key, spec.shot_limit
            )
        self.pool = PoolService.options(scheduling_strategy=on_driver_node()).remote(
            spec.executor, spec.executor_options, self.pool_workers, make, self.ledger_key
        )

    def _stop_pool(self) -> dict | None:
        if self.pool is None:
            return None
        try:
            stats = ray.get(self.pool.stats.remote())
            ray.get(self.pool.shutdown.remote())
        except ray.exceptions.RayError:  # the pool's actor itself died: its workers went with it
            stats = None
        ray.kill(self.pool)
        return stats

    def _pump(self, box, done: threading.Event):
        while True:
            last = done.is_set()  # read before taking, so a final take follows the end of training
            for ev in ray.get(box.take.remote()):
                if ev["type"] == "result":  # what the workers said; the driver writes the result line: see run()
                    self.told = ev
                    continue
                self.seen.append(ev)
                self.on_event(ev)
            if last:
                return
            time.sleep(0.2)

    def run(self) -> RunResult:
        spec = self.spec
        if uses_pool(spec):
            self._start_pool()
        box = EventBox.options(scheduling_strategy=on_driver_node()).remote()
        done = threading.Event()
        pump = threading.Thread(target=self._pump, args=(box, done), daemon=True)
        pump.start()
        trainer = TorchTrainer(
            train_loop_per_worker,
            train_loop_config={
                "spec": spec.model_dump(mode="json"),
                "pool": self.pool,
                "events": box,
                "artifact_dir": self.artifact_dir,
                "step_callback": self.step_callback,
            },
            scaling_config=ScalingConfig(num_workers=spec.scaling.num_workers, use_gpu=spec.scaling.use_gpu),
            run_config=RunConfig(
                name=self.name,
                storage_path=self.storage_path,
                failure_config=FailureConfig(max_failures=self.max_failures),
                checkpoint_config=CheckpointConfig(num_to_keep=2),
            ),
        )
        state, reason, ckpt, finished = "FAILED", "the trainer ended without a result", None, False
        try:
            result = trainer.fit()
            ckpt, finished = (result.checkpoint.path if result.checkpoint else None), True
        except Exception as e:  # TrainingFailedError after max_failures retries, or a controller error
            reason = f"training failed: {type(e).__name__}: {e}"
        finally:
            done.set()
            pump.join()
            stats = self._stop_pool()
            ray.kill(box)
        if finished and self.told:  # the workers finished and said how
            state, reason = self.told["state"], self.told["reason"]
        artifacts = {e["name"]: e["path"] for e in self.seen if e["type"] == "artifact"}
        final = events.make("result", state=state, reason=reason)
        self.seen.append(final)
        self.on_event(final)
        return RunResult(state, reason, ckpt, artifacts, stats, list(self.seen))
