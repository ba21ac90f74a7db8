"""API keys: per tenant, stored as sha256(pepper + key); an admin key manages tenants and budgets.

Dependencies: `tenant` (the caller's tenant name; admin keys are refused, so that a tenant's view is never
mixed with the admin's) and `admin`.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request, Security
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


def get_db(request: Request) -> Iterator[Session]:
    with request.app.state.sessions() as session:
        yield session


Db = Annotated[Session, Depends(get_db)]


@dataclass(frozen=True)
class Principal:
    tenant: str | None
    admin: bool


def principal(
    request: Request,
    db: Db,
    header: Annotated[str | None, Security(api_key_header)] = None,
    cred: Annotated[HTTPAuthorizationCredentials | None, Security(bearer)] = None,
) -> Principal:
    key = header or (cred.credentials if cred else None)
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
