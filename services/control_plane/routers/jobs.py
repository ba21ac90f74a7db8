"""/v1/jobs: submit, list, get, cancel. A tenant sees only its own jobs: others' answer 404, as if absent."""

from __future__ import annotations

import hashlib
import json
import uuid
from typing import Annotated

from fastapi import APIRouter, Header, Query, Request, Response
from fastapi import Path as PathParam
from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError

from services.contract.budget import admission
from services.contract.jobspec import JobSpec

from .. import schemas
from ..access import tenant_spec
from ..auth import Db, SessionReleasingRoute, TenantName
from ..errors import ApiError
from ..forecast import forecast
from ..limits import check_fits
from ..models import FINAL_STATES, Budget, Job

router = APIRouter(route_class=SessionReleasingRoute, prefix="/v1/jobs", tags=["jobs"])
JobId = Annotated[str, PathParam(max_length=64, description="the job's id")]


def find_job(db, tenant: str, job_id: str) -> Job:
    job = db.get(Job, job_id)
    if job is None or job.tenant != tenant:  # never confirm that another tenant's job exists
        raise ApiError(404, f"no job {job_id!r}", "path.job_id", "use an id from GET /v1/jobs")
    return job


def job_out(request: Request, db, job: Job) -> schemas.Job:
    acc = db.get(Budget, f"job:{job.id}")
    qpu_s = max(acc.qpu_s_spent if acc else 0.0, job.qpu_s or 0.0)
    price = request.app.state.settings.qpu_usd_per_s
    base = f"/v1/jobs/{job.id}"
    links = {
        "self": base,
        "logs": f"{base}/logs",
        "metrics": f"{base}/metrics",
        "events": f"{base}/events",
        "artifacts": f"{base}/artifacts",
        "dashboard": f"/dashboard/#job={job.id}",
    }
    return schemas.Job(
        id=job.id,
        name=job.name,
        state=job.state,
        sub_state=job.sub_state if job.state == "RUNNING" else None,
        reason=job.reason,
        created_at=job.created_at,
        started_at=job.started_at,
        finished_at=job.finished_at,
        step=job.step,
        max_steps=job.max_steps,
        attempt=job.attempt,
        loss=job.loss,
        parameters=None
        if job.trainable_params is None
        else schemas.JobParameters(trainable=job.trainable_params, total=job.total_params or 0),
        shots=schemas.JobShots(
            # the ledger is the record; a trainer's own count shows when it used no database ledger
            spent=max(acc.spent if acc else 0, job.shots_spent),
            lost=acc.lost if acc else 0,
            reserved=acc.reserved if acc else 0,
            limit=acc.budget if acc else None,
            forecast=job.forecast_shots,
            qpu_seconds=qpu_s,
            qpu_seconds_estimated=acc.qpu_s_estimated if acc else 0.0,
            qpu_seconds_limit=acc.qpu_s_budget if acc else None,
            qpu_seconds_forecast=job.forecast_qpu_s,
            cost_usd=qpu_s * price,
            cost_usd_forecast=None if job.forecast_qpu_s is None else job.forecast_qpu_s * price,
        ),
        spec=job.spec,
        links=links,
    )


def _admit(request: Request, db, tenant: str, spec: JobSpec, fc: dict) -> None:
    """409 when the forecast exceeds what the tenant (or the job's own limit) has left; a job that runs until
    its budget ends is admitted anyway."""
    if spec.run_until_budget_ends:
        return
    refused = admission(fc, request.app.state.ledger.account(tenant, db), spec)
    if refused is not None:
        raise ApiError(409, refused.message, refused.field, refused.fix, **refused.figures)


@router.post(
    "",
    status_code=201,
    response_model=schemas.Job,
    responses={200: {"model": schemas.Job, "description": "an earlier submission with the same key"}}
    | schemas.errors(401, 403, 409, 422),
    summary="Submit a job",
)
def submit(
    spec: JobSpec,
    request: Request,
    response: Response,
    db: Db,
    tenant: TenantName,
    idempotency_key: Annotated[
        str | None,
        Header(
            max_length=200,
            description="same key and body: the same job again (200); same key, other body: 409",
        ),
    ] = None,
) -> schemas.Job:
    spec = tenant_spec(spec, request.app.state.settings, db, tenant)
    body = spec.model_dump(mode="json", exclude={"resolved"})  # the tenant's names; the paths stay server-side
    digest = hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()
    if idempotency_key:
        earlier = db.scalar(select(Job).where(Job.tenant == tenant, Job.idempotency_key == idempotency_key))
        if earlier is not None:
            return _replay(request, response, db, earlier, digest, idempotency_key)
    check_fits(request, spec)
    fc = forecast(spec, request.app.state.settings.qpu_usd_per_s)
    _admit(request, db, tenant, spec, fc)
    job_id = uuid.uuid4().hex[:16]
    job = Job(
        id=job_id,
        tenant=tenant,
        name=spec.name,
        spec=body,
        spec_hash=digest,
        idempotency_key=idempotency_key or None,
        ray_submission_id=f"qpeft-{job_id}",
        max_steps=spec.max_steps,
        forecast_shots=fc["shots"],
        forecast_qpu_s=fc["qpu_seconds"],
    )
    db.add(job)
    db.flush()  # the job row first: the account below references nothing, but readers join on it
    db.add(Budget(key=f"job:{job_id}", parent=tenant, budget=spec.shot_limit, qpu_s_budget=spec.qpu_seconds_limit))
    try:
        db.commit()
    except IntegrityError:  # a concurrent request with the same idempotency key won
        db.rollback()
        earlier = db.scalar(select(Job).where(Job.tenant == tenant, Job.idempotency_key == idempotency_key))
        if earlier is None:
            raise
        return _replay(request, response, db, earlier, digest, idempotency_key)
    request.app.state.wake_reconciler()
    return job_out(request, db, job)


def _replay(request, response, db, earlier: Job, digest: str, key: str) -> schemas.Job:
    if earlier.spec_hash != digest:
        raise ApiError(
            409,
            f"Idempotency-Key {key!r} was already used for job {earlier.id} with a different body",
            "header.Idempotency-Key",
            "send the original body to get that job back, or use a new key for a new job",
            job_id=earlier.id,
        )
    response.status_code = 200
    return job_out(request, db, earlier)


@router.get("", response_model=schemas.JobPage, responses=schemas.errors(401, 403, 422), summary="List jobs")
def list_jobs(
    request: Request,
    db: Db,
    tenant: TenantName,
    state: Annotated[schemas.State | None, Query(description="only jobs in this state")] = None,
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
    offset: Annotated[int, Query(ge=0, le=10**9)] = 0,
) -> schemas.JobPage:
    where = [Job.tenant == tenant] + ([Job.state == state] if state else [])
    total = db.scalar(select(func.count()).select_from(Job).where(*where))
    rows = db.scalars(
        select(Job).where(*where).order_by(Job.created_at.desc(), Job.id).limit(limit).offset(offset)
    ).all()
    items = [job_out(request, db, j) for j in rows]
    nxt = offset + len(items) if offset + len(items) < total else None
    return schemas.JobPage(items=items, total=total, limit=limit, offset=offset, next_offset=nxt)


@router.get("/{job_id}", response_model=schemas.Job, responses=schemas.errors(401, 403, 404, 422), summary="Get a job")
def get_job(job_id: JobId, request: Request, db: Db, tenant: TenantName) -> schemas.Job:
    return job_out(request, db, find_job(db, tenant, job_id))


@router.post(
    "/{job_id}/cancel",
    status_code=202,
    response_model=schemas.Job,
    responses=schemas.errors(401, 403, 404, 409, 422),
    summary="Cancel a job",
)
def cancel(job_id: JobId, request: Request, db: Db, tenant: TenantName) -> schemas.Job:
    job = find_job(db, tenant, job_id)
    if job.state in FINAL_STATES:
        raise ApiError(
            409, f"job {job_id} already finished ({job.state})", "path.job_id", "only QUEUED or RUNNING jobs cancel"
        )
    job.cancel_requested = True
    db.commit()
    request.app.state.wake_reconciler()
    return job_out(request, db, job)
