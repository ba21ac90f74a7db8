"""The trainer's structured events (services/contract/events.py), read from its Ray job log and stored.

A trainer prints `QPEFT_EVENT <json>` lines on stdout (the types and fields are listed there); they are
found anywhere in a line, so prefixes that Ray adds to worker output do not matter. Every other line is kept
as a plain log line. Lines are numbered as in the Ray log, so re-reading a log after a restart skips what was
already stored (jobs.log_offset); a resubmitted job numbers its new log after the earlier attempts' lines
(jobs.log_base).
"""

from __future__ import annotations

import math
import re
import time
from pathlib import Path

from sqlalchemy import delete
from sqlalchemy.orm import Session

from services.contract.events import parse  # the one definition of the line format, shared with the trainer

from .models import FINAL_STATES, SUB_STATES, Job, JobArtifact, JobLog, JobMetric, now

MAX_LINE = 4000
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")  # Ray colours its worker prefixes; a stored log is plain text


def _num(v, kind=float):
    try:
        v = kind(v)
    except (TypeError, ValueError):
        return None
    return v if not isinstance(v, float) or math.isfinite(v) else None


def _redact(text: str, secrets: list[str]) -> str:
    for s in secrets:
        if s and s in text:
            text = text.replace(s, "***")
    return text[:MAX_LINE]


def ingest(db: Session, job: Job, lines: list[str], artifact_root: Path, secrets: list[str]) -> int:
    """Store `lines` (the log's lines from job.log_offset + 1 on); returns how many were new."""
    t = time.time()
    for i, raw in enumerate(lines):
        seq = job.log_base + job.log_offset + i + 1
        line = _redact(ANSI.sub("", raw.rstrip("\r")), secrets)
        event = parse(line)
        if event is None:
            db.add(JobLog(job_id=job.id, seq=seq, time=t, line=line))
            continue
        kind = event["type"]
        if kind == "log":
            db.add(JobLog(job_id=job.id, seq=seq, time=t, line=_redact(str(event.get("message", "")), secrets)))
        elif kind == "state":
            _sub_state(job, event.get("sub_state"))
        elif kind == "progress":
            _progress(db, job, event, t)
        elif kind == "params":
            job.trainable_params = _num(event.get("trainable"), int)
            job.total_params = _num(event.get("total"), int)
        elif kind == "artifact":
            _artifact(db, job, event, artifact_root)
        elif kind == "result" and event.get("state") in FINAL_STATES:
            job.result_state = event["state"]
            job.result_reason = _redact(str(event.get("reason") or ""), secrets) or None
    job.log_offset += len(lines)
    return len(lines)


def _running(job: Job) -> None:
    if job.state == "QUEUED":
        job.state, job.started_at = "RUNNING", job.started_at or now()


def _sub_state(job: Job, sub) -> None:
    if sub in SUB_STATES and job.state in ("QUEUED", "RUNNING"):
        _running(job)
        job.sub_state = sub


def _progress(db: Session, job: Job, ev: dict, t: float) -> None:
    step = _num(ev.get("step"), int)
    if step is None:
        return
    _running(job)
    if ev.get("sub_state"):
        _sub_state(job, ev["sub_state"])
    loss = _num(ev.get("loss"))
    ev_eval = ev.get("eval") if isinstance(ev.get("eval"), dict) else None
    shots = _num(ev.get("shots_spent"), int)
    qpu = _num(ev.get("qpu_s"))
    db.add(
        JobMetric(
            job_id=job.id,
            step=step,
            time=_num(ev.get("time")) or t,
            loss=loss,
            eval=ev_eval,
            shots_spent=shots or 0,
            qpu_s=qpu,
            tokens_per_s=_num(ev.get("tokens_per_s")),
        )
    )
    job.step = step
    job.max_steps = _num(ev.get("max_steps"), int) or job.max_steps
    job.loss = loss if loss is not None else job.loss
    job.shots_spent = max(job.shots_spent, shots or 0)
    job.qpu_s = qpu if qpu is not None else job.qpu_s
    job.pool_calls = _num(ev.get("pool_calls"), int) or job.pool_calls


def _artifact(db: Session, job: Job, ev: dict, root: Path) -> None:
    name, path = str(ev.get("name") or "").strip(), ev.get("path")
    if not name or not path or "/" in name or name.startswith("."):
        return
    resolved = Path(path).resolve()
    if not resolved.is_relative_to(root):  # only files the job wrote into its own folder are served
        return
    db.execute(delete(JobArtifact).where(JobArtifact.job_id == job.id, JobArtifact.name == name))
    db.add(JobArtifact(job_id=job.id, name=name, path=str(resolved)))


def final_state(job: Job, ray_status: str, message: str | None) -> tuple[str, str]:
    """A finished Ray job's state and reason: the trainer's own result where Ray agrees it ended cleanly."""
    told, why = job.result_state, job.result_reason
    if ray_status == "STOPPED":
        return "CANCELLED", "cancelled by the user" if job.cancel_requested else "stopped in Ray"
    if ray_status == "SUCCEEDED":
        return (told or "SUCCEEDED"), (why or ("finished" if told in (None, "SUCCEEDED") else told.lower()))
    # FAILED: a trainer that reported BUDGET_EXHAUSTED / CANCELLED and then exited non-zero keeps that state
    if told in ("BUDGET_EXHAUSTED", "CANCELLED", "FAILED"):
        return told, why or (message or "failed")
    return "FAILED", (message or "the trainer exited with an error").strip()[:2000]
