"""Operations: liveness, readiness (database and Ray), Prometheus metrics, service info, the dashboard."""

from __future__ import annotations

import importlib.metadata

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, RedirectResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from sqlalchemy import text

from .. import schemas
from ..auth import Authenticated, SessionReleasingRoute

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


@router.get("/metrics", summary="Prometheus metrics", response_class=Response)
def metrics(request: Request) -> Response:
    return Response(generate_latest(request.app.state.metrics.registry), media_type=CONTENT_TYPE_LATEST)


@router.get("/v1/info", response_model=schemas.Info, responses=schemas.errors(401), summary="Service info")
def info(request: Request, _: Authenticated) -> schemas.Info:
    try:
        version = importlib.metadata.version("qpeft")
    except importlib.metadata.PackageNotFoundError:
        version = "0+unknown"
    ray = request.app.state.reconciler.ray
    return schemas.Info(
        version=version,
        mode="embedded" if request.app.state.settings.embedded else "cluster",
        ray_dashboard_url=request.app.state.ray_dashboard_url(),
        ray_reachable=ray is not None and ray.reachable(),
    )


@router.get("/", include_in_schema=False)
def root() -> RedirectResponse:
    return RedirectResponse("/dashboard/")
