"""python -m services.trainer --spec job.json [--storage DIR] [--max-failures N] [--pool-workers N]

Runs one job on the Ray cluster this process can reach: RAY_ADDRESS if set (a Ray job has it), else a
cluster already running on this machine, else a local one started here with `pool-workers` units of the
"qpu" resource. Progress goes to stdout as `QPEFT_EVENT <json>` lines (services/contract/events.py).
Environment set by the control plane: QPEFT_DATABASE_URL (shot ledger in its database), QPEFT_JOB_ID,
QPEFT_TENANT / QPEFT_LEDGER_KEY (the ledger account), QPEFT_ARTIFACT_DIR (adapter and LoRA export).
Exit status 0 when the job succeeded or stopped cleanly at its budget, 1 when it failed, 2 for a bad spec.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys

from services.contract import events
from services.contract.jobspec import POOL_WORKERS


def connect(pool_workers: int) -> None:
    import ray

    if os.environ.get("RAY_ADDRESS"):
        ray.init(logging_level="WARNING")
        return
    try:
        ray.init(address="auto", logging_level="WARNING")
    except ConnectionError:  # nothing running: the embedded default, a local cluster with its own "qpu" slots
        ray.init(resources={"qpu": pool_workers}, include_dashboard=False, logging_level="WARNING")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m services.trainer", description=__doc__.split("\n\n")[0])
    ap.add_argument("--spec", required=True, help="the job's JSON spec (services.contract.jobspec.JobSpec)")
    ap.add_argument("--storage", default=os.environ.get("QPEFT_STORAGE"), help="Ray Train storage_path")
    ap.add_argument("--max-failures", type=int, default=1, help="trainer-group restarts from the last checkpoint")
    ap.add_argument("--pool-workers", type=int, default=POOL_WORKERS, help="quantum workers (each takes one 'qpu')")
    args = ap.parse_args(argv)

    from pydantic import ValidationError

    from services.contract.jobspec import JobSpec

    try:
        spec = JobSpec.load(args.spec)
    except (OSError, ValidationError) as e:
        events.emit(events.make("result", state="FAILED", reason=f"invalid spec {args.spec}: {e}"))
        return 2

    connect(args.pool_workers)

    def cancelled(signum, frame):
        # `ray job stop` sends SIGTERM and SIGKILLs a few seconds later: say so and leave at once. The trainer
        # workers, the pool and the event queue are actors this driver owns, so Ray ends them with it.
        events.emit(events.make("result", state="CANCELLED", reason=f"stopped by signal {signum}"))
        os._exit(128 + signum)

    signal.signal(signal.SIGTERM, cancelled)  # after ray.init, which installs its own handler
    from .run import TrainerRun

    events.emit(
        events.make(
            "log",
            message=f"job {spec.name or ''}: {spec.method} on {spec.base_model}, executor {spec.executor}, "
            f"{spec.scaling.num_workers} replica(s), {spec.max_steps} steps",
        )
    )
    run = TrainerRun(spec, storage_path=args.storage, max_failures=args.max_failures, pool_workers=args.pool_workers)
    result = run.run()
    return 0 if result.state in ("SUCCEEDED", "BUDGET_EXHAUSTED") else 1


if __name__ == "__main__":
    sys.exit(main())
