"""/v1/datasets: upload, list, get and delete a tenant's own data sets. Another tenant's answer 404, as if
absent, and cannot be named in a job either (services/control_plane/access.py).

An upload streams the request body into a temporary file in the tenant's folder under the data dir, checks
size, format and content there, renames it into place and only then records the row: a refused or broken
upload leaves nothing behind."""

from __future__ import annotations

import contextlib
import hashlib
import os
import secrets
from pathlib import Path
from typing import Annotated, Literal

from fastapi import APIRouter, Query, Request, Response
from fastapi import Path as PathParam
from fastapi.concurrency import run_in_threadpool
from sqlalchemy import func, select

from .. import schemas
from ..auth import Db, SessionReleasingRoute, TenantName
from ..body_limit import body_limit
from ..datasets import SUFFIXES, Inspection, InvalidDataset, detect_format, inspect
from ..errors import ApiError
from ..models import ACTIVE_STATES, Dataset, Job

router = APIRouter(route_class=SessionReleasingRoute, prefix="/v1/datasets", tags=["datasets"])
DatasetId = Annotated[str, PathParam(max_length=64, description="the data set's id")]
FILE_NAME = r"^[^/\\\x00-\x1f]{1,200}$"  # a bare file name: no folders, no control characters
UPLOAD_BODY = {
    "requestBody": {
        "required": True,
        "description": "the file's bytes as the body (not a multipart form)",
        "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}},
    }
}


def find_dataset(db, tenant: str, dataset_id: str) -> Dataset:
    row = db.get(Dataset, dataset_id)
    if row is None or row.tenant != tenant:  # never confirm that another tenant's data set exists
        raise ApiError(404, f"no data set {dataset_id!r}", "path.dataset_id", "use an id from GET /v1/datasets")
    return row


def active_uses(db, tenant: str) -> dict[str, list[str]]:
    """Data set id -> this tenant's queued or running jobs whose spec names it (as train or eval)."""
    uses: dict[str, list[str]] = {}
    jobs = db.execute(select(Job.id, Job.spec).where(Job.tenant == tenant, Job.state.in_(ACTIVE_STATES))).all()
    for job in jobs:
        for name in {job.spec["dataset"].get("train"), job.spec["dataset"].get("eval")} - {None}:
            uses.setdefault(name, []).append(job.id)
    return uses


def dataset_out(row: Dataset, used_by: list[str]) -> schemas.Dataset:
    return schemas.Dataset(
        id=row.id,
        name=row.name,
        format=row.format,
        size_bytes=row.size_bytes,
        sha256=row.sha256,
        rows=row.rows,
        empty_rows=row.stats["empty_rows"],
        max_chars=row.stats["max_chars"],
        columns=None if row.columns is None else [schemas.DatasetColumn(**c) for c in row.columns],
        created_at=row.created_at,
        used_by=used_by,
    )


def _too_large(limit: int) -> ApiError:
    return ApiError(
        413,
        f"the upload exceeds this server's limit of {limit} bytes (QPEFT_MAX_UPLOAD_BYTES)",
        "body",
        "upload a smaller file, or ask the operator to raise QPEFT_MAX_UPLOAD_BYTES",
        limit_bytes=limit,
    )


async def _receive(request: Request, part: Path, limit: int) -> tuple[int, str]:
    """The body into `part`, chunk by chunk; (size, sha256). 413 past `limit` (the part file is removed)."""
    digest, size = hashlib.sha256(), 0
    with open(part, "xb") as f:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise _too_large(limit)
            digest.update(chunk)
            await run_in_threadpool(f.write, chunk)
        await run_in_threadpool(os.fsync, f.fileno())
    return size, digest.hexdigest()


def _record(request: Request, tenant: str, name: str, fmt: str, path: Path, size, sha256, found: Inspection):
    columns = None if found.columns is None else [vars(c) for c in found.columns.values()]
    row = Dataset(
        id=path.stem,
        tenant=tenant,
        name=name,
        format=fmt,
        size_bytes=size,
        sha256=sha256,
        rows=found.rows,
        columns=columns,
        stats={"empty_rows": found.empty_rows, "max_chars": found.max_chars},
        path=str(path),
    )
    with request.app.state.sessions() as db:
        db.add(row)
        db.commit()
        return dataset_out(row, [])


@router.post(
    "",
    status_code=201,
    response_model=schemas.Dataset,
    responses=schemas.errors(401, 403, 413, 422),
    openapi_extra=UPLOAD_BODY,
    summary="Upload a data set (the body is the file)",
)
@body_limit(None)  # the upload counts its bytes against max_upload_bytes itself, streaming them to disk
async def upload(
    request: Request,
    tenant: TenantName,
    name: Annotated[
        str, Query(pattern=FILE_NAME, description="the file's name; its suffix gives the format if none is set")
    ] = "upload.txt",
    format: Annotated[
        Literal["text", "tsv", "csv", "jsonl"] | None,
        Query(description="text (one example per line), tsv, csv (with a header) or jsonl; default: from name"),
    ] = None,
) -> schemas.Dataset:
    settings = request.app.state.settings
    limit = settings.max_upload_bytes
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:  # refuse before reading a byte
        raise _too_large(limit)
    fmt = detect_format(name, format)
    folder = settings.datasets_dir(tenant)
    folder.mkdir(parents=True, exist_ok=True)
    dataset_id = f"ds_{secrets.token_hex(8)}"
    part, final = folder / f".{dataset_id}.part", folder / f"{dataset_id}{SUFFIXES[fmt]}"
    try:
        size, sha256 = await _receive(request, part, limit)
        found = await run_in_threadpool(inspect, part, fmt)
        os.replace(part, final)  # complete and checked: only now under its real name
        return await run_in_threadpool(_record, request, tenant, name, fmt, final, size, sha256, found)
    except InvalidDataset as e:
        raise ApiError(
            422, f"{name}: {e}", "body", f"upload a valid {fmt} file, or set ?format= to the file's real format"
        ) from None
    except BaseException:  # the row is written last: any failure before it leaves no file either
        with contextlib.suppress(FileNotFoundError):
            final.unlink()
        raise
    finally:
        with contextlib.suppress(FileNotFoundError):
            part.unlink()


@router.get("", response_model=schemas.DatasetPage, responses=schemas.errors(401, 403, 422), summary="List data sets")
def list_datasets(
    db: Db,
    tenant: TenantName,
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
    offset: Annotated[int, Query(ge=0, le=10**9)] = 0,
) -> schemas.DatasetPage:
    total = db.scalar(select(func.count()).select_from(Dataset).where(Dataset.tenant == tenant))
    rows = db.scalars(
        select(Dataset)
        .where(Dataset.tenant == tenant)
        .order_by(Dataset.created_at.desc(), Dataset.id)
        .limit(limit)
        .offset(offset)
    ).all()
    uses = active_uses(db, tenant)
    items = [dataset_out(r, uses.get(r.id, [])) for r in rows]
    nxt = offset + len(items) if offset + len(items) < total else None
    return schemas.DatasetPage(items=items, total=total, limit=limit, offset=offset, next_offset=nxt)


@router.get(
    "/{dataset_id}", response_model=schemas.Dataset, responses=schemas.errors(401, 403, 404, 422), summary="Get one"
)
def get_dataset(dataset_id: DatasetId, db: Db, tenant: TenantName) -> schemas.Dataset:
    row = find_dataset(db, tenant, dataset_id)
    return dataset_out(row, active_uses(db, tenant).get(dataset_id, []))


@router.delete(
    "/{dataset_id}",
    status_code=204,
    response_class=Response,
    responses=schemas.errors(401, 403, 404, 409, 422),
    summary="Delete a data set (not while a queued or running job names it)",
)
def delete_dataset(dataset_id: DatasetId, db: Db, tenant: TenantName) -> Response:
    row = find_dataset(db, tenant, dataset_id)
    users = active_uses(db, tenant).get(dataset_id, [])
    if users:
        raise ApiError(
            409,
            f"data set {dataset_id} is used by queued or running job(s) {', '.join(users)}",
            "path.dataset_id",
            "wait for those jobs to finish, or cancel them",
            jobs=users,
        )
    path = Path(row.path)
    db.delete(row)
    db.commit()  # the row first: a crash between the two leaves a stray file, never a row without its file
    path.unlink(missing_ok=True)
    return Response(status_code=204)
