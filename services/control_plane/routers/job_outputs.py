"""What a job produces: logs (page, tail, follow), metrics, live events (SSE) and artifacts.

Everything is read from the database, which the reconciler fills from the Ray job log, so these routes
work the same after a control-plane restart and never touch Ray themselves.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, Query, Request
from fastapi import Path as PathParam
from fastapi.responses import FileResponse, StreamingResponse
from sqlalchemy import func, select
from starlette.background import BackgroundTask

from .. import schemas
from ..auth import Db, SessionReleasingRoute, TenantName
from ..errors import ApiError
from ..models import FINAL_STATES, Job, JobArtifact, JobLog, JobMetric
from .jobs import JobId, find_job, job_out

router = APIRouter(route_class=SessionReleasingRoute, tags=["job outputs"])
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
POLL_S = 0.5
HEARTBEAT_S = 15.0


def _lines(db, job_id: str, after: int | None, tail: int, limit: int = 1000) -> list[JobLog]:
    if after is not None:
        q = select(JobLog).where(JobLog.job_id == job_id, JobLog.seq > after).order_by(JobLog.seq).limit(limit)
        return list(db.scalars(q))
    q = select(JobLog).where(JobLog.job_id == job_id).order_by(JobLog.seq.desc()).limit(tail)
    return list(reversed(db.scalars(q).all()))


def _point(m: JobMetric) -> schemas.MetricPoint:
    return schemas.MetricPoint(
        step=m.step,
        time=m.time,
        loss=m.loss,
        eval=m.eval,
        shots_spent=m.shots_spent,
        qpu_s=m.qpu_s,
        tokens_per_s=m.tokens_per_s,
    )


@router.get(
    "/v1/jobs/{job_id}/logs",
    response_model=schemas.LogPage,
    responses={200: {"content": {"text/plain": {}}}} | schemas.errors(401, 403, 404, 422),
    summary="Job log: the last lines, lines after a position, or a live follow",
)
def logs(
    job_id: JobId,
    request: Request,
    db: Db,
    tenant: TenantName,
    tail: Annotated[int, Query(ge=0, le=10_000, description="the last N lines")] = 100,
    after: Annotated[int | None, Query(ge=0, description="only lines after this position (next_after)")] = None,
    follow: Annotated[bool, Query(description="stream lines as text/plain until the job ends")] = False,
):
    job = find_job(db, tenant, job_id)
    if not follow:
        rows = _lines(db, job_id, after, tail)
        return schemas.LogPage(
            job_id=job_id,
            lines=[schemas.LogLine(seq=r.seq, time=r.time, line=r.line) for r in rows],
            next_after=rows[-1].seq if rows else (after or 0),
            finished=job.state in FINAL_STATES,
        )
    sessions = request.app.state.sessions
    first = _lines(db, job_id, None, tail) if after is None else []  # start with the tail, then follow
    end = db.scalar(select(func.max(JobLog.seq)).where(JobLog.job_id == job_id)) or 0

    async def stream() -> AsyncIterator[str]:
        pos = after if after is not None else end
        for r in first:
            yield r.line + "\n"
        while True:
            rows, final = await asyncio.to_thread(_poll_logs, sessions, job_id, pos)
            for r in rows:
                yield r.line + "\n"
            pos = rows[-1].seq if rows else pos
            if final and not rows:
                return
            if await request.is_disconnected():
                return
            await asyncio.sleep(POLL_S)

    return StreamingResponse(stream(), media_type="text/plain; charset=utf-8", headers=SSE_HEADERS)


def _poll_logs(sessions, job_id: str, after: int):
    with sessions() as db:
        state = db.scalar(select(Job.state).where(Job.id == job_id))
        return _lines(db, job_id, after, 0), state in FINAL_STATES


@router.get(
    "/v1/jobs/{job_id}/metrics",
    response_model=schemas.Metrics,
    responses=schemas.errors(401, 403, 404, 422),
    summary="Loss, evaluation and shots over steps",
)
def metrics(
    job_id: JobId,
    db: Db,
    tenant: TenantName,
    after_step: Annotated[int, Query(ge=-1, description="only points after this step")] = -1,
) -> schemas.Metrics:
    find_job(db, tenant, job_id)
    rows = db.scalars(
        select(JobMetric).where(JobMetric.job_id == job_id, JobMetric.step > after_step).order_by(JobMetric.id)
    )
    return schemas.Metrics(job_id=job_id, points=[_point(m) for m in rows])


def sse(event: str, data, event_id: str | None = None) -> str:
    head = f"id: {event_id}\n" if event_id else ""
    return f"{head}event: {event}\ndata: {json.dumps(data, default=str, separators=(',', ':'))}\n\n"


@router.get(
    "/v1/jobs/{job_id}/events",
    responses={200: {"content": {"text/event-stream": {}}, "description": "Server-Sent Events"}}
    | schemas.errors(401, 403, 404, 422),
    summary="Live job events (SSE): job, progress, log; 'end' once the job is final",
)
def events(job_id: JobId, request: Request, db: Db, tenant: TenantName) -> StreamingResponse:
    """Events: `job` (the job, on every change), `progress` (a metric point), `log` (a log line) and a
    final `end`. On connect the history comes first: every metric point and the last 200 log lines."""
    find_job(db, tenant, job_id)
    sessions = request.app.state.sessions

    def snapshot(pos_metric: int, pos_log: int | None):
        with sessions() as s:
            job = s.get(Job, job_id)
            points = s.scalars(
                select(JobMetric).where(JobMetric.job_id == job_id, JobMetric.id > pos_metric).order_by(JobMetric.id)
            ).all()
            lines = _lines(s, job_id, pos_log, 200)
            return job_out(request, s, job).model_dump(mode="json"), [(m.id, _point(m)) for m in points], lines

    async def stream() -> AsyncIterator[str]:
        pos_metric, pos_log, last_job, quiet = 0, None, None, 0.0
        while True:
            job, points, lines = await asyncio.to_thread(snapshot, pos_metric, pos_log)
            out = []
            if job != last_job:
                out.append(sse("job", job))
                last_job = job
            for mid, p in points:
                out.append(sse("progress", p.model_dump(mode="json"), f"m{mid}"))
                pos_metric = mid
            for r in lines:
                out.append(sse("log", {"seq": r.seq, "time": r.time, "line": r.line}))
            pos_log = lines[-1].seq if lines else (pos_log or 0)
            if out:
                quiet = 0.0
                yield "".join(out)
            else:
                quiet += POLL_S
                if quiet >= HEARTBEAT_S:
                    quiet = 0.0
                    yield ": keep-alive\n\n"
            if job["state"] in FINAL_STATES and not points and not lines:
                yield sse("end", {"state": job["state"], "reason": job["reason"]})
                return
            if await request.is_disconnected():
                return
            await asyncio.sleep(POLL_S)

    return StreamingResponse(stream(), media_type="text/event-stream", headers=SSE_HEADERS)


def _artifact_rows(db, job_id: str) -> list[JobArtifact]:
    return list(db.scalars(select(JobArtifact).where(JobArtifact.job_id == job_id).order_by(JobArtifact.name)))


@router.get(
    "/v1/jobs/{job_id}/artifacts",
    response_model=list[schemas.Artifact],
    responses=schemas.errors(401, 403, 404, 422),
    summary="Artifacts (adapter, LoRA export, metrics) of a job",
)
def artifacts(job_id: JobId, db: Db, tenant: TenantName) -> list[schemas.Artifact]:
    find_job(db, tenant, job_id)
    out = []
    for a in _artifact_rows(db, job_id):
        p = Path(a.path)
        if not p.exists():
            continue
        out.append(
            schemas.Artifact(
                name=a.name,
                kind="directory" if p.is_dir() else "file",
                size=None if p.is_dir() else p.stat().st_size,
                url=f"/v1/jobs/{job_id}/artifacts/{a.name}",
            )
        )
    return out


@router.get(
    "/v1/jobs/{job_id}/artifacts/{name}",
    response_class=FileResponse,
    responses={200: {"content": {"application/octet-stream": {}, "application/zip": {}}}}
    | schemas.errors(401, 403, 404, 422),
    summary="Download an artifact (a directory comes as a .zip)",
)
def download(
    job_id: JobId, name: Annotated[str, PathParam(max_length=200)], db: Db, tenant: TenantName
) -> FileResponse:
    find_job(db, tenant, job_id)
    row = next((a for a in _artifact_rows(db, job_id) if a.name == name), None)
    path = Path(row.path) if row else None
    if path is None or not path.exists():
        raise ApiError(404, f"job {job_id} has no artifact {name!r}", "path.name", "list them with .../artifacts")
    if path.is_file():
        return FileResponse(path, filename=path.name)
    tmp = Path(tempfile.mkdtemp(prefix="qpeft-artifact-"))
    archive = shutil.make_archive(str(tmp / name), "zip", root_dir=path)
    cleanup = BackgroundTask(shutil.rmtree, tmp, ignore_errors=True)
    return FileResponse(archive, filename=f"{name}.zip", media_type="application/zip", background=cleanup)


@router.get(
    "/v1/events",
    responses={200: {"content": {"text/event-stream": {}}, "description": "Server-Sent Events"}}
    | schemas.errors(401, 403),
    summary="Live list of my jobs (SSE): a `jobs` event with the newest 50 whenever one changes",
    tags=["job outputs"],
)
async def job_list_events(request: Request, tenant: TenantName) -> StreamingResponse:
    sessions = request.app.state.sessions

    def page():
        with sessions() as s:
            rows = s.scalars(select(Job).where(Job.tenant == tenant).order_by(Job.created_at.desc()).limit(50))
            return [job_out(request, s, j).model_dump(mode="json") for j in rows]

    async def stream() -> AsyncIterator[str]:
        last, quiet = None, 0.0
        while not await request.is_disconnected():
            items = await asyncio.to_thread(page)
            if items != last:
                last, quiet = items, 0.0
                yield sse("jobs", items)
            else:
                quiet += POLL_S
                if quiet >= HEARTBEAT_S:
                    quiet = 0.0
                    yield ": keep-alive\n\n"
            await asyncio.sleep(POLL_S)

    return StreamingResponse(stream(), media_type="text/event-stream", headers=SSE_HEADERS)
