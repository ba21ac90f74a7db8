"""STAND-IN for the real trainer (services/trainer), used only by the control-plane tests until the e2e
test is switched to `python -m services.trainer`. It follows the same contract, without any model:

    python tests/control_plane_standin_trainer.py --spec <JobSpec JSON>
    env: QPEFT_DATABASE_URL, QPEFT_JOB_ID, QPEFT_TENANT, QPEFT_LEDGER_KEY, QPEFT_ARTIFACT_DIR

It prints `QPEFT_EVENT <json>` lines (state, progress, log, artifact, result), reserves and commits
shots in the SQL ledger every step (3 circuits x spec.shots), stops with BUDGET_EXHAUSTED when a
reservation is refused, and with CANCELLED on SIGTERM (Ray's stop_job). Like the real trainer, it resumes
from its last checkpoint (a step count written after every step, beside the artifact folder) when the control
plane submits the job again. Test knobs (env): QPEFT_STANDIN_STEP_S (seconds per step, default 0.2),
QPEFT_STANDIN_FAIL_AT (exit 1 at that step), QPEFT_STANDIN_HANG_AT (first attempt only: hold that step's
shot reservation and never return, a QPU call that hangs until the driver is killed).
"""

import argparse
import json
import os
import signal
import sys
import time
from pathlib import Path

from services.contract.ledger import BudgetExhausted
from services.contract.sql_ledger import SQLLedger

CIRCUITS_PER_STEP = 3
stop = False


def emit(**event):
    print("QPEFT_EVENT " + json.dumps(event), flush=True)


def on_term(*_):
    global stop
    stop = True


def save_artifacts(root: Path, step: int) -> None:
    adapter = root / "adapter"
    adapter.mkdir(parents=True, exist_ok=True)
    (adapter / "adapter_config.json").write_text(json.dumps({"method": "stand-in", "step": step}))
    (root / "metrics.jsonl").write_text(json.dumps({"step": step}) + "\n")
    emit(type="artifact", name="adapter", path=str(adapter))
    emit(type="artifact", name="metrics.jsonl", path=str(root / "metrics.jsonl"))


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--spec", required=True)
    spec = json.loads(Path(ap.parse_args().spec).read_text())
    signal.signal(signal.SIGTERM, on_term)
    step_s = float(os.environ.get("QPEFT_STANDIN_STEP_S", "0.2"))
    fail_at = int(os.environ.get("QPEFT_STANDIN_FAIL_AT", "0"))
    first_attempt = os.environ.get("QPEFT_ATTEMPT", "1") == "1"
    hang_at = int(os.environ.get("QPEFT_STANDIN_HANG_AT", "0")) if first_attempt else 0
    ledger, key = SQLLedger(os.environ["QPEFT_DATABASE_URL"]), os.environ["QPEFT_LEDGER_KEY"]
    artifacts = Path(os.environ["QPEFT_ARTIFACT_DIR"])
    shots = (spec.get("shots") or 0) * CIRCUITS_PER_STEP
    max_steps = 10**9 if spec.get("run_until_budget_ends") else spec["max_steps"]
    print(f"stand-in trainer for job {os.environ['QPEFT_JOB_ID']} of {os.environ['QPEFT_TENANT']}", flush=True)
    ckpt = artifacts.parent / "standin-checkpoint.json"
    spent, step = 0, 0
    if ckpt.exists():
        step = json.loads(ckpt.read_text())["step"]
        emit(type="log", message=f"resumed from the checkpoint of step {step}")
    while step < max_steps:
        if stop:
            save_artifacts(artifacts, step)
            emit(type="result", state="CANCELLED", reason=f"stopped at step {step}")
            return 0
        if fail_at and step + 1 == fail_at:
            print("stand-in trainer: simulated crash", file=sys.stderr, flush=True)
            return 1
        if shots:
            emit(type="state", sub_state="WAITING_QPU")
            try:
                rid = ledger.reserve(key, shots)
            except BudgetExhausted as e:
                save_artifacts(artifacts, step)
                emit(type="result", state="BUDGET_EXHAUSTED", reason=str(e))
                return 0
            emit(type="state", sub_state="EXECUTING_QPU")
            while hang_at and step + 1 == hang_at:
                time.sleep(1)
            ledger.commit(rid, shots)
            spent += shots
        emit(type="state", sub_state="TRAINING")
        step += 1
        loss = 3.0 * 0.9**step
        emit(
            type="progress",
            step=step,
            max_steps=spec["max_steps"],
            loss=loss,
            eval={"loss": loss * 1.1} if step % 2 == 0 else None,
            shots_spent=spent,
            qpu_s=None,
            tokens_per_s=1000.0,
            time=time.time(),
            pool_calls=2 * step,
        )
        emit(type="log", message=f"step {step}: loss {loss:.4f}")
        ckpt.write_text(json.dumps({"step": step}))
        time.sleep(step_s)
    save_artifacts(artifacts, step)
    emit(type="result", state="SUCCEEDED", reason="max_steps reached")
    return 0


if __name__ == "__main__":
    sys.exit(main())
