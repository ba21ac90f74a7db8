"""Quantum worker pool benchmark: (1) what the pool adds to a small call, (2) how a gradient scales with workers.

    .venv/bin/python benchmarks/pool_bench.py [--calls 300] [--latency-ms 200] [--append-results]

(1) Round trip of a small `probabilities` call (2 circuits, 8 qubits, exact) through a 1-worker pool,
    minus the same executor called directly (both one torch thread, called alternately); medians over
    --calls calls each. Goal: <= 5 ms added.
(2) A parameter-shift gradient of 64 circuits (1 parameter set, 32 angles, 1024 shots) through pools of
    1, 2 and 4 workers, against SimulatedQPU below: a fake device whose every circuit is one queued job
    taking --latency-ms (sleeping, so a 2-core machine can host 4 workers). Goal: >= 3.5x at 4 workers.
The last line is `pool_bench pool_overhead_ms=.. pool_speedup_4w=..`.
"""

import argparse
import datetime
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("RAY_AUTH_MODE", "disabled")

import ray
import torch

from qpeft_core.quantum.ansatz import qpa_ansatz
from qpeft_core.quantum.backend import ExecutionResult, Executor, TorchBackend
from qpeft_core.quantum.gradients import ParameterShift
from services.quantum_pool import QuantumPool


class SimulatedQPU(Executor):
    """BENCHMARK ONLY, NOT A REAL DEVICE: the exact simulator behind a fake QPU queue. Every circuit is one
    job that occupies the device for `latency_s` (time.sleep), jobs run one after another, so a call of C
    circuits takes C * latency_s. Results are the simulator's (with shots: sampled)."""

    def __init__(self, ansatz, latency_s=0.2):
        self.inner = TorchBackend(ansatz)
        self.ansatz, self.name, self.exact, self.max_qubits = ansatz, "simulated-qpu", True, 30
        self.latency_s = latency_s

    def run(self, call):
        time.sleep(self.latency_s * call.circuits)
        probs, usage = self.inner.run(call)
        usage.backend = self.name
        usage.qpu_s_estimated = self.latency_s * call.circuits
        return ExecutionResult(probs, usage)


def paired_medians_ms(fn_a, fn_b, calls):
    """Medians of fn_a and fn_b, called alternately so that load from other jobs hits both alike."""
    for _ in range(20):  # warm up: first calls pay for imports and Ray's connection set-up
        fn_a(), fn_b()
    a, b = [], []
    for _ in range(calls):
        for fn, out in ((fn_a, a), (fn_b, b)):
            t0 = time.perf_counter()
            fn()
            out.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(a), 1e3 * statistics.median(b)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--calls", type=int, default=300)
    ap.add_argument("--latency-ms", type=float, default=200.0)
    ap.add_argument("--append-results", action="store_true", help="append a section to benchmarks/RESULTS.md")
    args = ap.parse_args()
    ray.init(address="local", num_cpus=2, resources={"qpu": 4}, include_dashboard=False, logging_level="WARNING")

    # (1) overhead of the pool on a small call
    small = qpa_ansatz(8, 4)
    x = torch.rand(2, small.n_params) * 6.28
    direct = TorchBackend(small)
    # Ray runs num_cpus=0 actors with one torch thread; the direct call gets the same, so only the pool differs.
    torch.set_num_threads(1)
    with QuantumPool("exact", small, n_workers=1) as pool:
        pool_ms, direct_ms = paired_medians_ms(
            lambda: pool.probabilities(x), lambda: direct.probabilities(x), args.calls
        )
    overhead = pool_ms - direct_ms
    print(f"small call (2 circuits, 8 qubits): direct {direct_ms:.2f} ms, through pool {pool_ms:.2f} ms")

    # (2) a 64-circuit parameter-shift gradient on 1, 2, 4 workers of a simulated QPU
    theta = torch.rand(1, small.n_params) * 6.28  # 32 angles -> 64 shifted circuits
    grad_probs = torch.randn(1, small.dim)
    opts = {"latency_s": args.latency_ms / 1e3}
    seconds = {}
    for n in (1, 2, 4):
        with QuantumPool(SimulatedQPU, small, n_workers=n, options=opts) as pool:
            pool.probabilities(x[:1])  # warm up
            t0 = time.perf_counter()
            grad, usage = ParameterShift().vjp(pool, theta, grad_probs, 1024)
            seconds[n] = time.perf_counter() - t0
        assert usage.circuits == 64 and usage.shots == 64 * 1024 and grad.shape == theta.shape
        print(f"parameter-shift gradient, 64 circuits x {args.latency_ms:.0f} ms, {n} worker(s): {seconds[n]:.2f} s")
    speedup = seconds[1] / seconds[4]
    ray.shutdown()

    summary = f"pool_bench pool_overhead_ms={overhead:.2f} pool_speedup_4w={speedup:.2f}"
    if args.append_results:
        section = f"""
## pool_bench

`{" ".join([".venv/bin/python", "benchmarks/pool_bench.py", *sys.argv[1:]])}` ({datetime.date.today()}, \
2-core CPU machine shared with other jobs, local Ray)

| measurement | value |
|---|---|
| small call (2 circuits, 8 qubits, exact, 1 torch thread), direct | {direct_ms:.2f} ms |
| same call through a 1-worker pool | {pool_ms:.2f} ms |
| **pool overhead per call** (goal <= 5 ms) | **{overhead:.2f} ms** |
| 64-circuit parameter-shift gradient, SimulatedQPU {args.latency_ms:.0f} ms/circuit, 1 worker | {seconds[1]:.2f} s |
| same, 2 workers | {seconds[2]:.2f} s |
| same, 4 workers | {seconds[4]:.2f} s |
| **speedup at 4 workers** (goal >= 3.5x) | **{speedup:.2f}x** |

SimulatedQPU is a benchmark-only wrapper (the exact simulator plus a sleep of the stated latency per
circuit, jobs run back to back on each worker), standing in for a QPU queue.

`{summary}`
"""
        with open(Path(__file__).parent / "RESULTS.md", "a") as f:
            f.write(section)
    print(summary)


if __name__ == "__main__":
    main()
