"""Data-parallel step time: the same QPA job with 1 and with 2 Ray Train replicas on this machine.

    .venv/bin/python benchmarks/dp_bench.py [--model all-minilm-l6-v2] [--steps 14] [--batch 16] [--append-results]

Each replica trains on its own batch of --batch examples per step (weak scaling: 2 replicas see twice the
data per step), one CPU and one torch thread each; the QNN runs once per step on a 2-worker exact pool
whatever the number of replicas (rank 0 asks, the others get p by broadcast, dL/dp is all-reduced). The
step time is the trainer's own `step_s` (forward, backward, both pool calls, optimizer), median over the
steps after the first (start-up) and before the last (final checkpoint). Ideal data parallelism on
separate cores gives a ratio of 1.0, i.e. twice the examples per second.
The last line is `dp_bench dp_step_ratio=<2-replica step time / 1-replica step time>`.
"""

import argparse
import datetime
import os
import statistics
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import ray  # noqa: E402

from services.contract.jobspec import JobSpec  # noqa: E402
from services.trainer.run import TrainerRun  # noqa: E402


def spec(model: str, replicas: int, steps: int, batch: int, gradient: str = "parameter_shift") -> JobSpec:
    task = "seq_cls" if model in ("all-minilm-l6-v2", "tiny-bert") else "causal_lm"
    data = {"train": "sst2", "max_length": 64, "limit": 2000} if task == "seq_cls" else {"train": "wikitext-2"}
    return JobSpec.model_validate(
        {
            "base_model": model,
            "task": task,
            "dataset": {**data, "eval_limit": 32},
            "method": "qpa",
            "method_config": {"r": 4, "n_mlp": 2048, "qnn_depth": 4},
            # the QNN on the exact pool, as a QPU job would run ("auto" on exact is autograd in the trainer)
            "gradient": gradient,
            "max_steps": steps,
            "training": {"batch_size": batch, "lr": 1e-3, "eval_max_batches": 1},
            "scaling": {"num_workers": replicas},
        }
    )


def measure(model, replicas, steps, batch, storage, gradient="parameter_shift") -> dict:
    seen = []
    job = spec(model, replicas, steps, batch, gradient)
    result = TrainerRun(job, storage_path=storage, name=f"dp{replicas}", on_event=seen.append).run()
    if result.state != "SUCCEEDED":
        raise RuntimeError(f"{replicas}-replica run {result.state}: {result.reason}")
    progress = [e for e in seen if e["type"] == "progress"][1:-1]
    step_s = statistics.median(e["step_s"] for e in progress)
    return {
        "step_s": step_s,
        "examples_per_s": replicas * batch / step_s,
        "tokens_per_s": statistics.median(e["tokens_per_s"] for e in progress),
        "pool": result.pool_stats,
    }


def _calls(pool: dict | None) -> str:
    return "no pool (autograd in the trainer)" if pool is None else f"{pool['forward']}, {pool['gradient']}"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="all-minilm-l6-v2")
    ap.add_argument("--steps", type=int, default=14)
    ap.add_argument("--batch", type=int, default=16, help="examples per replica per step")
    ap.add_argument("--gradient", default="parameter_shift", help="QPA's gradient (parameter_shift: on the pool)")
    ap.add_argument("--append-results", action="store_true", help="append a section to benchmarks/RESULTS.md")
    args = ap.parse_args()
    ray.init(address="local", num_cpus=2, resources={"qpu": 2}, include_dashboard=False, logging_level="WARNING")
    load = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as storage:
        one = measure(args.model, 1, args.steps, args.batch, storage, args.gradient)
        two = measure(args.model, 2, args.steps, args.batch, storage, args.gradient)
    ray.shutdown()
    ratio = two["step_s"] / one["step_s"]
    rows = [
        ("replicas", "1", "2"),
        ("median step time", f"{one['step_s'] * 1e3:.0f} ms", f"{two['step_s'] * 1e3:.0f} ms"),
        ("examples / s", f"{one['examples_per_s']:.1f}", f"{two['examples_per_s']:.1f}"),
        ("tokens / s (padded)", f"{one['tokens_per_s']:.0f}", f"{two['tokens_per_s']:.0f}"),
        ("pool calls (forward, gradient)", *(_calls(r["pool"]) for r in (one, two))),
    ]
    table = "\n".join(f"| {a} | {b} | {c} |" for a, b, c in rows)
    print(table)
    print(f"speed-up in examples/s: {two['examples_per_s'] / one['examples_per_s']:.2f}x (ideal 2x)")
    last = f"dp_bench dp_step_ratio={ratio:.2f}"
    if args.append_results:
        cmd = "`.venv/bin/python benchmarks/dp_bench.py " + " ".join(sys.argv[1:]) + "`"
        date = datetime.date.today().isoformat()
        text = f"""
## dp_bench

{cmd} ({date}; 2-core CPU machine shared with other jobs, 1-minute load average {load:.1f} at the start; local Ray)

QPA ({args.model}, r=4, n_mlp=2048, L=4, exact 2-worker pool, gradient {args.gradient}), {args.batch} examples
per replica per step,
{args.steps} steps per run, median of the steps between the first and the last.

| | 1 replica | 2 replicas |
|---|---|---|
{table.split(chr(10), 1)[1]}

Each replica is one Ray Train worker with one CPU and one torch thread, so 2 replicas use both cores; the
quantum pool, the driver and Ray's own processes share those cores. The pool sees the same calls per step
for 1 and 2 replicas. A ratio of 1.0 would be perfect weak scaling (twice the examples per second).

`{last}`
"""
        with open(Path(__file__).parent / "RESULTS.md", "a") as f:
            f.write(text)
    print(last)


if __name__ == "__main__":
    main()
