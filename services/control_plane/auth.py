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
    """The request's session. Async so that closing it (which hands its pooled connection back) runs on the
    event loop when the response is done, not in another threadpool hop: a sync teardown keeps the connection
    checked out until a worker thread is free, and under a burst every thread can be waiting for a
    connection held that way (a stall, then pool timeouts; tests/test_control_plane_api.py, burst test).
    Sessions are not shared between threads: the sync dependencies and the endpoint use it one after another."""
    session = request.app.state.sessions()
    try:
        yield session
    finally:
        session.close()  # a ROLLBACK round trip at most, when a transaction is still open


Db = Annotated[Session, Depends(get_db)]


class SessionReleasingRoute(APIRoute):
    """A route whose sync endpoint closes its database sessions before it returns, in its own threadpool
    hop. FastAPI validates a sync endpoint's response in a further hop; a session still holding its pooled
    connection then keeps it while that hop waits for a free thread, and with every thread waiting for a
    connection the server stalls (tests/test_control_plane_api.py, the burst test). Closing detaches the
    ORM objects with their loaded attributes; the endpoints return pydantic models built from them."""

    def __init__(self, path: str, endpoint, **kwargs):
        if not inspect.iscoroutinefunction(endpoint):
            endpoint = _closing_sessions(endpoint)
        super().__init__(path, endpoint, **kwargs)

    def get_route_handler(self):
        """A route that takes a body and needs a key checks the key first: FastAPI parses and validates the
        body before it runs any dependency, so a bad body from a caller without a valid key would get 400
        or 422 instead of 401 (and the body's errors). The principal is kept for the `principal`
        dependency, so the key is looked up once."""
        handler = super().get_route_handler()
        if self.body_field is None or not _needs_key(self.dependant):
            return handler

        async def key_first(request: Request):
            def check() -> Principal:
                with request.app.state.sessions() as db:
                    return authenticate(request, db, presented_key(request))

            request.state.principal = await run_in_threadpool(check)
            return await handler(request)

        return key_first


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
    found = None if row is None else Principal(row.tenant, row.is_admin)
    # End the read here: the pooled connection goes back now instead of staying checked out while this
    # request waits for the threadpool to run its endpoint (under a burst, held connections whose requests
    # wait for a thread, while every thread waits for a connection, stall the server).
    db.rollback()
    if found is None:
        raise ApiError(401, "unknown or revoked API key", "header.X-API-Key", "ask the admin for a valid key")
    return found


def principal(
    request: Request,
    db: Db,
    header: Annotated[str | None, Security(api_key_header)] = None,
    cred: Annotated[HTTPAuthorizationCredentials | None, Security(bearer)] = None,
) -> Principal:
    known = getattr(request.state, "principal", None)  # checked before the body was read (AuthFirstRoute)
    if known is not None:
        return known
    return authenticate(request, db, header or (cred.credentials if cred else None))


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
