"""QuantumPool: a QuantumBackend whose circuits run on a set of Ray quantum-worker actors.

- It is an executor itself (ansatz, name, exact, max_qubits, run), so `QNN(pool, ...)` and the gradient
  strategies use it unchanged. It only runs circuits: gradients are the strategies' business, in the
  trainer; a call reaches it already checked (`CircuitCall`) and is not checked again here or below.
- A call of at least 2 * min_share circuits (e.g. all parameter-shift points of a step) is cut into
  contiguous shares, one per worker, and gathered in order; a smaller call goes whole to the least
  busy worker.
- Every share reserves circuits x shots, and the QPU seconds its executor's time model estimates, in the
  ledger before it is sent, and commits what the executor reports after (QPU seconds as the provider
  reported them, or else the estimate). A device's calls go whole to one worker: splitting them would add a
  job's fixed QPU time per share and gain nothing, as one device runs jobs one after another.
- A share whose worker dies (actor death) or hangs (past call_timeout_s; the pool then kills it) is
  charged as lost (its shots and estimated QPU time), re-reserved and sent to another worker; Ray restarts
  the dead actor, and the pool sends it nothing until it answers a ping. The timeout counts from sending, so it also
  covers time queued behind other calls on that worker: set it well above the longest expected call.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time

import ray
import torch
from ray.exceptions import GetTimeoutError, RayActorError

from qpeft_core.quantum.backend import CircuitCall, ExecutionResult, Executor, Usage, check_qubits
from qpeft_core.quantum.registry import ExecutorSpec
from services.contract.ledger import BudgetExhausted, InMemoryLedger, ShotLedger

from .worker import remote_worker

log = logging.getLogger(__name__)


class PoolError(RuntimeError):
    """A share failed on every attempt (all workers dead or hung)."""


class WorkerHung(RuntimeError):
    pass


def worker_resources(executor, offered: dict[str, float]) -> dict[str, float]:
    """What one quantum worker asks Ray for: a `qpu` slot, and its worker group's own resource where the
    cluster offers one (deploy/: `qpu_ibm` on nodes holding IBM credentials, `qpu_aer` on simulator nodes).
    So an ibm:<device> job's workers land only where the credentials are, and simulators stay off them."""
    if not isinstance(executor, str):  # an executor class (benchmarks, tests): any qpu slot
        return {"qpu": 1}
    group = ExecutorSpec.parse(executor).worker_group
    return {"qpu": 1, group: 1} if offered.get(group) else {"qpu": 1}


class QuantumPool(Executor):
    def __init__(
        self,
        spec,
        ansatz,
        n_workers: int = 2,
        options: dict | None = None,
        *,
        ledger: ShotLedger | None = None,
        key: str = "default",
        call_timeout_s: float = 300.0,
        max_attempts: int = 3,
        min_share: int = 8,
        resources: dict[str, float] | None = None,
        num_cpus: float = 0,
        max_restarts: int = -1,
        start_timeout_s: float = 120.0,
    ):
        if n_workers < 1 or max_attempts < 1 or min_share < 1:
            raise ValueError("n_workers, max_attempts and min_share must be >= 1")
        self.ansatz, self.key = ansatz, key
        self.ledger = ledger if ledger is not None else InMemoryLedger()
        self.call_timeout_s, self.max_attempts, self.min_share = call_timeout_s, max_attempts, min_share
        resources = resources or worker_resources(spec, ray.cluster_resources())
        actor = remote_worker(resources, num_cpus, max_restarts)
        self.workers = [actor.remote(spec, ansatz, options) for _ in range(n_workers)]
        try:
            infos = ray.get([w.info.remote() for w in self.workers], timeout=start_timeout_s)
        except GetTimeoutError:
            self.shutdown()
            raise RuntimeError(
                f"{n_workers} quantum workers did not start within {start_timeout_s} s; each needs "
                f"{resources} and the cluster has {ray.cluster_resources()}"
            ) from None
        self.name, self.exact, self.max_qubits = infos[0]["name"], infos[0]["exact"], infos[0]["max_qubits"]
        self.qpu_time = infos[0].get("qpu_time")  # billed time model (qpeft_core/quantum/timing.py), or None
        # one device runs jobs one after another: a call goes whole (splitting adds a job's fixed cost per share)
        self.one_device = isinstance(spec, str) and ExecutorSpec.parse(spec).one_device
        check_qubits(ansatz, self.max_qubits, f"executor {self.name}")
        self.busy = [0] * n_workers  # shares in flight per worker, for least-busy placement
        self.rotation = itertools.count()  # breaks ties so equal workers take turns
        self.probes = {}  # worker index -> ping sent after it failed; absent once it answers
        self.prepared: set[int] = set()  # workers whose one-time work (readout calibration) is paid for
        self.lock = threading.Lock()
        self.failures = self.lost_shots = 0

    # --- the executor protocol -------------------------------------------------------------------
    def run(self, call: CircuitCall) -> ExecutionResult:
        self._prepare_live()
        n = 1 if self.one_device else max(1, min(len(self.workers), call.circuits // self.min_share))
        shares = call.split(n)
        outs = self._run("run", [(c,) for c in shares], [(c.total_shots, self._seconds(c)) for c in shares])
        usage = sum((u for _, u in outs), Usage(self.name))
        return ExecutionResult(torch.cat([p for p, _ in outs]), usage)

    # --- placement ------------------------------------------------------------------------------
    def _is_up(self, k: int) -> bool:
        """(Under self.lock.) A worker that failed gets no work until it answers a ping again, so
        shares are not thrown at an actor Ray is still restarting."""
        ref = self.probes.get(k)
        if ref is None:
            return True
        if not ray.wait([ref], timeout=0)[0]:
            return False
        try:
            ray.get(ref)
        except RayActorError:  # still restarting: ask again
            self.probes[k] = self.workers[k].info.remote()
            return False
        del self.probes[k]
        return True

    def _pick(self, avoid: int | None) -> int:
        """The least busy live worker, other than `avoid` if there is one; waits while all are down. For one
        device, the first live worker: its open Session or Batch keeps serving (a Session bills its wall time,
        so a second one open on another worker would bill twice); the others stand by for its failure."""
        deadline = time.monotonic() + self.call_timeout_s
        while True:
            with self.lock:
                turn, n = next(self.rotation), len(self.workers)
                # every worker's ping is read, prepared or not: one that came back is unprepared (see _lose), and
                # skipping its ping left it "down" until the deadline (all workers lost at once, seen on Docker)
                answering = [k for k in range(n) if self._is_up(k)]
                live = [k for k in answering if k in self.prepared]
                up = live if self.one_device else sorted(live, key=lambda k: (self.busy[k], (k - turn) % n))  # noqa: B023
                if up:
                    k = next((k for k in up if k != avoid), up[0])
                    self.busy[k] += 1
                    return k
                probes = list(self.probes.values())
                waiting = any(k not in self.prepared for k in answering)
            if waiting:  # a worker that came back fresh is up but not calibrated yet: do that first
                self._prepare_live()
                continue
            if time.monotonic() > deadline:
                raise PoolError(f"no quantum worker came back within {self.call_timeout_s} s")
            ray.wait(probes, num_returns=1, timeout=1.0)
            time.sleep(0.05)  # a restarting actor refuses pings at once: do not spin

    def _prepare_live(self) -> None:
        """Reserve, run and commit the one-time work (a readout calibration) of every live worker that has not
        done it, before any call reaches it: its shots are charged like any circuit's, and a budget that cannot
        pay for them refuses the call that needed them. A worker Ray restarted calibrates again, charged again."""
        with self.lock:
            live = [k for k in range(len(self.workers)) if self._is_up(k)]
            # one device is served by its first live worker only (see _pick): the others need nothing yet
            todo = [k for k in (live[:1] if self.one_device else live) if k not in self.prepared]
        for k in todo:
            cost = ray.get(self.workers[k].prepare_cost.remote(), timeout=self.call_timeout_s)
            rid = self._reserve(cost)
            try:
                usage = ray.get(self.workers[k].prepare.remote(), timeout=self.call_timeout_s)
            except (RayActorError, GetTimeoutError) as err:
                self._lose(k, rid, cost[0], err)
                continue
            except Exception:
                self._release(rid)
                raise
            if rid is not None:
                ran = 0 if usage is None else usage.shots
                self.ledger.commit(rid, min(ran, cost[0]), qpu_s=None if usage is None else usage.qpu_s)
            with self.lock:
                self.prepared.add(k)

    def _seconds(self, call: CircuitCall) -> float:
        """The QPU seconds a share is estimated to take (0 where nothing bills time)."""
        return 0.0 if self.qpu_time is None else self.qpu_time.seconds(call.circuits, call.total_shots)

    # --- dispatch ---------------------------------------------------------------------------------
    def _reserve(self, cost: tuple[int, float]):
        shots, seconds = cost
        if not shots and not seconds:  # exact calls cost nothing
            return None
        return self.ledger.reserve(self.key, shots, qpu_s=seconds)

    def _release(self, rid, lost: int = 0):
        if rid is not None:  # lost work keeps its estimated QPU time charged (it may have run); else none
            self.ledger.release(rid, lost=lost, qpu_s=None if lost else 0.0)

    def _send(self, pending: dict, i: int, method: str, args, rid, avoid: int | None = None):
        try:
            k = self._pick(avoid)
        except PoolError:
            self._release(rid)
            raise
        ref = getattr(self.workers[k], method).remote(*args)
        pending[ref] = (i, k, rid, time.monotonic() + self.call_timeout_s)

    def _run(self, method: str, shares: list[tuple], costs: list[tuple[int, float]]) -> list:
        """Run shares[i] as workers[k].method(*shares[i]) on some k each; results in share order."""
        # Reserve every share before any runs, so a refused call spends nothing.
        rids = []
        try:
            for c in costs:
                rids.append(self._reserve(c))
        except BudgetExhausted:
            for rid in rids:
                self._release(rid)
            raise
        pending, fatal = {}, None
        for i, rid in enumerate(rids):
            if fatal is not None:
                self._release(rid)
                continue
            try:
                self._send(pending, i, method, shares[i], rid)
            except PoolError as err:
                fatal = err

        results, attempts = [None] * len(shares), [1] * len(shares)
        while pending:
            wait_s = max(0.0, min(p[3] for p in pending.values()) - time.monotonic())
            ready, _ = ray.wait(list(pending), num_returns=1, timeout=wait_s)
            now = time.monotonic()
            hung = {r for r, p in pending.items() if p[3] <= now and r not in ready}
            for ref in [*ready, *hung]:
                i, k, rid, _ = pending.pop(ref)
                with self.lock:
                    self.busy[k] -= 1
                try:
                    if ref in hung:
                        ray.kill(self.workers[k], no_restart=False)  # Ray starts a fresh one
                        raise WorkerHung(f"worker {k} gave no answer within {self.call_timeout_s} s")
                    out = ray.get(ref)
                except (RayActorError, WorkerHung) as err:
                    self._lose(k, rid, costs[i][0], err)
                    if fatal is None and attempts[i] >= self.max_attempts:
                        fatal = PoolError(f"share {i} of {len(shares)} failed {attempts[i]} times; last: {err}")
                    if fatal is None:
                        attempts[i] += 1
                        try:
                            self._send(pending, i, method, shares[i], self._reserve(costs[i]), avoid=k)
                        except (BudgetExhausted, PoolError) as exc:
                            fatal = exc
                    continue
                except Exception as err:  # the executor itself raised: not retried, nothing charged
                    self._release(rid)
                    fatal = fatal or err
                    continue
                if rid is not None:
                    usage, held = out[1], costs[i][0]
                    if usage.shots > held:
                        log.warning("executor reported %d shots for a share reserved at %d", usage.shots, held)
                    # QPU time as the provider reported it; where nothing reports it, the estimate held
                    self.ledger.commit(rid, min(usage.shots, held), qpu_s=usage.qpu_s)
                results[i] = out
        # Only after every share is settled in the ledger is a failure reported.
        if fatal is not None:
            raise fatal
        return results

    def _lose(self, k: int, rid, shots: int, err: Exception):
        # The attempt may have run some or all of its shots: charged as lost, never as spent, never hidden.
        log.warning(
            "quantum worker %d failed (%s); its share's %d shots are charged as lost", k, type(err).__name__, shots
        )
        self._release(rid, lost=shots)
        with self.lock:
            self.failures += 1
            self.lost_shots += shots
            self.prepared.discard(k)  # Ray starts a fresh actor: its one-time work is to do again
            if k not in self.probes:
                self.probes[k] = self.workers[k].info.remote()

    # --- housekeeping -----------------------------------------------------------------------------
    def worker_pids(self, timeout_s: float = 60.0) -> list[int]:
        """Process ids of the workers, waiting for any that are restarting."""
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                return [i["pid"] for i in ray.get([w.info.remote() for w in self.workers], timeout=timeout_s)]
            except RayActorError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)

    def stats(self) -> dict:
        with self.lock:
            return {
                "workers": len(self.workers),
                "busy": list(self.busy),
                "failures": self.failures,
                "lost_shots": self.lost_shots,
            }

    def shutdown(self):
        for w in self.workers:
            ray.kill(w, no_restart=True)
        self.workers = []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.shutdown()
