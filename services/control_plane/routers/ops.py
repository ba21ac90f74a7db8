"""Operations: liveness, readiness (database and Ray), Prometheus metrics, service info, the dashboard."""

from __future__ import annotations

import hmac
import importlib.metadata

from fastapi import APIRouter, Request, Security
from fastapi.responses import JSONResponse, RedirectResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from sqlalchemy import text

from .. import schemas
from ..auth import Authenticated, SessionReleasingRoute, api_key_header, bearer, check_key, presented_key
from ..errors import ApiError

router = APIRouter(route_class=SessionReleasingRoute, tags=["operations"])


@router.get("/healthz", summary="Liveness: the process answers")
def healthz() -> dict:
    return {"status": "ok"}


@router.get(
    "/readyz",
    summary="Readiness: the database and the Ray job server answer",
    responses={503: {"description": "a dependency is down; the body says which"}},
)
def readyz(request: Request) -> JSONResponse:
    checks = {}
    try:
        with request.app.state.sessions() as db:
            db.execute(text("SELECT 1"))
        checks["database"] = "ok"
    except Exception as e:
        checks["database"] = f"error: {type(e).__name__}"
    ray = request.app.state.reconciler.ray
    checks["ray"] = "ok" if ray is not None and ray.reachable() else "unreachable"
    ok = all(v == "ok" for v in checks.values())
    return JSONResponse({"status": "ready" if ok else "not ready", "checks": checks}, status_code=200 if ok else 503)


@router.get(
    "/metrics",
    summary="Prometheus metrics: totals without a key; by tenant with the admin key or the metrics token",
    response_class=Response,
    responses=schemas.errors(401, 403),
    dependencies=[Security(api_key_header), Security(bearer)],  # optional: documents the two ways to send it
)
def metrics(request: Request) -> Response:
    """Without credentials: request latency and job / shot totals, naming no tenant. With the admin key or
    QPEFT_METRICS_TOKEN (X-API-Key or Authorization: Bearer, as Prometheus' bearer_token sends it): the
    same labelled by tenant. A tenant key gets 403, an unknown key 401."""
    m, key = request.app.state.metrics, presented_key(request)
    if key is None:
        return Response(generate_latest(m.public), media_type=CONTENT_TYPE_LATEST)
    token = request.app.state.settings.metrics_token
    scraper = bool(token) and hmac.compare_digest(key.encode(), token.encode())
    if not scraper and not check_key(request, key).admin:
        raise ApiError(
            403,
            "metrics by tenant need the admin key or the metrics token",
            "header.X-API-Key",
            "send no key for the totals, or the admin key / QPEFT_METRICS_TOKEN for the tenant labels",
        )
    return Response(generate_latest(m.registry), media_type=CONTENT_TYPE_LATEST)


@router.get("/v1/info", response_model=schemas.Info, responses=schemas.errors(401), summary="Service info")
def info(request: Request, caller: Authenticated) -> schemas.Info:
    try:
        version = importlib.metadata.version("qpeft")
    except importlib.metadata.PackageNotFoundError:
        version = "0+unknown"
    ray = request.app.state.reconciler.ray
    return schemas.Info(
        version=version,
        mode="embedded" if request.app.state.settings.embedded else "cluster",
        # the Ray dashboard has no login and takes job submissions (code): operators only
        ray_dashboard_url=request.app.state.ray_dashboard_url() if caller.admin else None,
        ray_reachable=ray is not None and ray.reachable(),
    )


@router.get("/", include_in_schema=False)
def root() -> RedirectResponse:
    return RedirectResponse("/dashboard/")
