"""API keys: per tenant, stored as sha256(pepper + key); an admin key manages tenants and budgets.

Dependencies: `tenant` (the caller's tenant name; admin keys are refused, so that a tenant's view is never
mixed with the admin's) and `admin`.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import inspect
import secrets
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request, Security
from fastapi.concurrency import run_in_threadpool
from fastapi.routing import APIRoute
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy import select
from sqlalchemy.orm import Session

from .errors import ApiError
from .models import ApiKey

KEY_PREFIX = "qpk_"
api_key_header = APIKeyHeader(name="X-API-Key", auto_error=False, description="a tenant or admin API key")
bearer = HTTPBearer(auto_error=False, description="the same API key as a bearer token")


def new_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


def hash_key(pepper: str, key: str) -> str:
    return hashlib.sha256((pepper + key).encode()).hexdigest()


async def get_db(request: Request) -> AsyncIterator[Session]:
    """The request's session, for the endpoint's body only (SessionReleasingRoute enforces it). A session
    takes a pooled connection at its first query, not here, and the endpoint closes it before it returns.
    Async so that making it costs no threadpool hop; the close here is a no-op by then."""
    session = request.app.state.sessions()
    try:
        yield session
    finally:
        session.close()


Db = Annotated[Session, Depends(get_db)]


class SessionReleasingRoute(APIRoute):
    """A route that does its database work in one place: the endpoint's body, in one threadpool hop.

    FastAPI runs a request in several hops (each sync dependency, the endpoint, the response's validation),
    each waiting for a free thread. A pooled connection held from one hop to the next is held while that
    request waits for a thread; with every thread waiting for a connection, the server stalls. So, checked
    when the route is built:
    - only a sync endpoint may take the request's session (`Db`), and it is closed (its connection handed
      back) when the endpoint returns, in the same hop; the endpoints return pydantic models built from
      the rows (closing detaches them with their loaded attributes) or a response;
    - no dependency takes it: authentication reads the key in a short session of its own (`check_key`);
    - an async endpoint does its database work in `run_in_threadpool` calls, each with its own session.
    And an endpoint holds one connection at a time: a second checkout while holding one (the ledger reading
    on its own connection) can leave a small pool's holders all waiting for each other, so the ledger reads
    through the session (`SQLLedger.account(key, db)`) and writes only after the session is closed."""

    def __init__(self, path: str, endpoint, **kwargs):
        if not inspect.iscoroutinefunction(endpoint):
            endpoint = _closing_sessions(endpoint)
        super().__init__(path, endpoint, **kwargs)
        holders = [d.call for d in self.dependant.dependencies if d.call is not get_db and _takes_db(d)]
        if holders or (inspect.iscoroutinefunction(self.dependant.call) and _takes_db(self.dependant)):
            names = ", ".join(getattr(c, "__name__", repr(c)) for c in holders or [self.dependant.call])
            raise TypeError(f"{path}: {names} take(s) the request's session; only a sync endpoint may (see Db)")

    def get_route_handler(self):
        """A route that takes a body and needs a key checks the key first: FastAPI parses and validates the
        body before it runs any dependency, so a bad body from a caller without a valid key would get 400
        or 422 instead of 401 (and the body's errors). The principal is kept for the `principal`
        dependency, so the key is looked up once."""
        handler = super().get_route_handler()
        if self.body_field is None or not _needs_key(self.dependant):
            return handler

        async def key_first(request: Request):
            request.state.principal = await run_in_threadpool(check_key, request, presented_key(request))
            return await handler(request)

        return key_first


def _takes_db(dependant) -> bool:
    """Whether `dependant` or anything it depends on takes the request's session."""
    return any(d.call is get_db or _takes_db(d) for d in dependant.dependencies)


def _needs_key(dependant) -> bool:
    return any(d.call is principal or _needs_key(d) for d in dependant.dependencies)


def _closing_sessions(fn):
    @functools.wraps(fn)  # FastAPI reads the parameters through __wrapped__
    def endpoint(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        finally:
            for value in kwargs.values():
                if isinstance(value, Session):
                    value.close()

    return endpoint


@dataclass(frozen=True)
class Principal:
    tenant: str | None
    admin: bool


def presented_key(request: Request) -> str | None:
    """The key from X-API-Key, else from Authorization: Bearer (what the two security schemes read)."""
    key = request.headers.get("x-api-key")
    if key:
        return key
    scheme, _, credentials = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer":
        return None
    return credentials.strip() or None


def check_key(request: Request, key: str | None) -> Principal:
    """The caller of `key`, read in a short session of its own (closed before this returns)."""
    with request.app.state.sessions() as db:
        return authenticate(request, db, key)


def authenticate(request: Request, db: Session, key: str | None) -> Principal:
    if not key:
        raise ApiError(
            401, "no API key", "header.X-API-Key", "send your key in X-API-Key (or Authorization: Bearer <key>)"
        )
    settings = request.app.state.settings
    digest = hash_key(request.app.state.pepper, key)
    if settings.admin_key and hmac.compare_digest(digest, hash_key(request.app.state.pepper, settings.admin_key)):
        return Principal(None, True)
    row = db.execute(select(ApiKey).where(ApiKey.key_hash == digest, ApiKey.revoked_at.is_(None))).scalar_one_or_none()
    if row is None:
        raise ApiError(401, "unknown or revoked API key", "header.X-API-Key", "ask the admin for a valid key")
    return Principal(row.tenant, row.is_admin)


def principal(
    request: Request,
    header: Annotated[str | None, Security(api_key_header)] = None,
    cred: Annotated[HTTPAuthorizationCredentials | None, Security(bearer)] = None,
) -> Principal:
    """Sync: its short session runs in its own threadpool hop."""
    known = getattr(request.state, "principal", None)  # checked before the body was read (key_first)
    if known is not None:
        return known
    return check_key(request, header or (cred.credentials if cred else None))


async def tenant(p: Annotated[Principal, Depends(principal)]) -> str:  # async: no I/O, no threadpool hop
    if p.tenant is None:
        raise ApiError(403, "this route needs a tenant key, not the admin key", "header.X-API-Key", "use a tenant key")
    return p.tenant


async def admin(p: Annotated[Principal, Depends(principal)]) -> Principal:
    if not p.admin:
        raise ApiError(403, "this route needs the admin key", "header.X-API-Key", "use the admin key")
    return p


TenantName = Annotated[str, Depends(tenant)]
Admin = Annotated[Principal, Depends(admin)]
Authenticated = Annotated[Principal, Depends(principal)]
