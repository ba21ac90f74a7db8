"""Tenants, their API keys and budgets (admin), and a tenant's own budget."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Request, Response
from fastapi import Path as PathParam
from sqlalchemy import select

from services.contract.sql_ledger import AccountState

from .. import schemas
from ..auth import Admin, Db, SessionReleasingRoute, TenantName, hash_key, new_key
from ..errors import ApiError
from ..models import ApiKey, Budget, Tenant, now

router = APIRouter(route_class=SessionReleasingRoute, tags=["tenants and budgets"])
Name = Annotated[str, PathParam(max_length=64, description="tenant name")]


def budget_out(acc: AccountState, tenant: str) -> schemas.Budget:
    return schemas.Budget(
        tenant=tenant,
        shots=schemas.Shots(
            limit=acc.budget, spent=acc.spent, lost=acc.lost, reserved=acc.reserved, remaining=acc.remaining
        ),
        qpu_seconds=schemas.Seconds(
            limit=acc.qpu_s_budget, spent=acc.qpu_s_spent, reserved=acc.qpu_s_reserved, remaining=acc.qpu_s_remaining
        ),
    )


def _tenant(db, name: str) -> Tenant:
    row = db.get(Tenant, name)
    if row is None:
        raise ApiError(404, f"no tenant {name!r}", "path.name", "list tenants with GET /v1/tenants")
    return row


def _tenant_out(request: Request, db, t: Tenant) -> schemas.Tenant:
    keys = db.scalars(select(ApiKey).where(ApiKey.tenant == t.name).order_by(ApiKey.id)).all()
    return schemas.Tenant(
        name=t.name,
        created_at=t.created_at,
        budget=budget_out(request.app.state.ledger.account(t.name, db), t.name),
        keys=[
            schemas.ApiKeyInfo(id=k.id, prefix=k.prefix, created_at=k.created_at, revoked=k.revoked_at is not None)
            for k in keys
        ],
    )


def issue_key(request: Request, db, tenant: str | None, is_admin: bool = False) -> tuple[ApiKey, str]:
    key = new_key()
    row = ApiKey(tenant=tenant, is_admin=is_admin, key_hash=hash_key(request.app.state.pepper, key), prefix=key[:10])
    db.add(row)
    db.flush()
    return row, key


@router.get("/v1/budget", response_model=schemas.Budget, responses=schemas.errors(401, 403), summary="My budget")
def my_budget(request: Request, tenant: TenantName) -> schemas.Budget:
    return budget_out(request.app.state.ledger.account(tenant), tenant)


@router.post(
    "/v1/tenants",
    status_code=201,
    response_model=schemas.NewApiKey,
    responses=schemas.errors(401, 403, 409, 422),
    summary="Create a tenant with a budget and its first API key (admin)",
)
def create_tenant(body: schemas.TenantCreate, request: Request, db: Db, _: Admin) -> schemas.NewApiKey:
    if db.get(Tenant, body.name) is not None or db.get(Budget, body.name) is not None:
        raise ApiError(409, f"tenant {body.name!r} exists", "body.name", "pick another name, or add a key to it")
    db.add(Tenant(name=body.name))
    db.add(Budget(key=body.name, budget=body.shots, qpu_s_budget=body.qpu_seconds))
    db.flush()  # no ORM relationships: the tenant row must exist before its key references it
    row, key = issue_key(request, db, body.name)
    db.commit()
    return schemas.NewApiKey(tenant=body.name, id=row.id, api_key=key)


@router.get("/v1/tenants", response_model=list[schemas.Tenant], responses=schemas.errors(401, 403), summary="Tenants")
def list_tenants(request: Request, db: Db, _: Admin) -> list[schemas.Tenant]:
    return [_tenant_out(request, db, t) for t in db.scalars(select(Tenant).order_by(Tenant.name))]


@router.get(
    "/v1/tenants/{name}", response_model=schemas.Tenant, responses=schemas.errors(401, 403, 404, 422), summary="Tenant"
)
def get_tenant(name: Name, request: Request, db: Db, _: Admin) -> schemas.Tenant:
    return _tenant_out(request, db, _tenant(db, name))


@router.put(
    "/v1/tenants/{name}/budget",
    response_model=schemas.Budget,
    responses=schemas.errors(401, 403, 404, 422),
    summary="Set a tenant's shot and QPU-time budget (admin; null = unlimited)",
)
def set_budget(name: Name, body: schemas.BudgetUpdate, request: Request, db: Db, _: Admin) -> schemas.Budget:
    _tenant(db, name)
    db.close()  # one connection at a time: the ledger writes with its own
    acc = request.app.state.ledger.set_budget(name, body.shots, body.qpu_seconds)
    return budget_out(acc, name)


@router.post(
    "/v1/tenants/{name}/keys",
    status_code=201,
    response_model=schemas.NewApiKey,
    responses=schemas.errors(401, 403, 404, 422),
    summary="Issue another API key for a tenant (admin)",
)
def add_key(name: Name, request: Request, db: Db, _: Admin) -> schemas.NewApiKey:
    _tenant(db, name)
    row, key = issue_key(request, db, name)
    db.commit()
    return schemas.NewApiKey(tenant=name, id=row.id, api_key=key)


@router.delete(
    "/v1/tenants/{name}/keys/{key_id}",
    status_code=204,
    response_class=Response,
    responses=schemas.errors(401, 403, 404, 422),
    summary="Revoke an API key (admin)",
)
def revoke_key(name: Name, key_id: Annotated[int, PathParam(ge=1, le=2**31 - 1)], db: Db, _: Admin) -> Response:
    row = db.get(ApiKey, key_id)
    if row is None or row.tenant != name:
        raise ApiError(
            404, f"tenant {name!r} has no key {key_id}", "path.key_id", "see the keys in GET /v1/tenants/{name}"
        )
    row.revoked_at = row.revoked_at or now()
    db.commit()
    return Response(status_code=204)
