"""The control plane's FastAPI app: `create_app(settings)`; `qpeft serve` runs it with uvicorn.

State kept on app.state: settings, sessions (SQLAlchemy), ledger (SQLLedger), pepper, metrics and the
reconciler (ray_jobs.Reconciler), which owns the Ray client.
"""

from __future__ import annotations

import asyncio
import logging
import sys
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.staticfiles import StaticFiles
from sqlalchemy import select
from starlette.exceptions import HTTPException as StarletteHTTPException

from services.contract.sql_ledger import SQLLedger

from . import db as dbm
from .body_limit import BodyLimitMiddleware
from .errors import ApiError, api_error_handler, http_error_handler, validation_handler
from .forecast import warm_up_qiskit
from .limits import ClusterCapacity
from .metrics import LatencyMiddleware, Metrics
from .models import ApiKey, Budget, Tenant
from .ray_jobs import RayJobs, Reconciler
from .routers import backends, datasets, estimate, job_outputs, jobs, ops, tenants
from .settings import Settings

log = logging.getLogger(__name__)
DASHBOARD = Path(__file__).resolve().parent / "dashboard"
LOCAL_TENANT = "local"

DESCRIPTION = """Hybrid quantum-classical fine-tuning as a service: submit QPA, Quantum-PEFT or LoRA jobs, which
run on Ray; follow their state, logs, metrics and shot usage; download adapters.

Authenticate with an API key in `X-API-Key` (or `Authorization: Bearer <key>`). Tenant keys see only their
own jobs and budget; the admin key manages tenants and budgets. Every 4xx body lists
`errors: [{field, message, fix}]`."""


def bootstrap_keys(app: FastAPI) -> list[str]:
    """Embedded mode without QPEFT_ADMIN_KEY: on the very first start, make an admin key and a 'local'
    tenant (unlimited budget) and return the keys to print once; only their hashes are stored."""
    settings = app.state.settings
    if not settings.embedded or settings.admin_key:
        return []
    from .routers.tenants import issue_key

    class _Req:  # issue_key only needs app.state
        pass

    req = _Req()
    req.app = app
    with app.state.sessions() as db:
        if db.scalar(select(ApiKey.id).where(ApiKey.is_admin.is_(True)).limit(1)) is not None:
            return []
        _, admin_key = issue_key(req, db, None, is_admin=True)
        lines = [f"admin API key:          {admin_key}"]
        if db.get(Tenant, LOCAL_TENANT) is None:
            db.add(Tenant(name=LOCAL_TENANT))
            db.add(Budget(key=LOCAL_TENANT))
            db.flush()
            _, key = issue_key(req, db, LOCAL_TENANT)
            lines.append(f"tenant '{LOCAL_TENANT}' API key:   {key}")
        db.commit()
    return lines


def create_app(settings: Settings | None = None, ray: RayJobs | None = None, reconcile: bool = True) -> FastAPI:
    """`ray`: a ready job client (tests pass a fake); None: the reconciler connects (or starts a local head).
    `reconcile=False`: no background thread; call app.state.reconciler.reconcile_once() by hand."""
    settings = settings or Settings.from_env()
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    url = settings.db_url
    dbm.migrate(url)
    warm_up_qiskit()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        for line in bootstrap_keys(app):
            print(f"[qpeft] {line}  (shown once; store it now)", file=sys.stderr, flush=True)
        if reconcile:
            app.state.reconciler.start()
        yield
        await asyncio.to_thread(app.state.reconciler.stop)  # joins the thread: keep the loop free

    app = FastAPI(
        title="qpeft control plane",
        version="1",
        description=DESCRIPTION,
        lifespan=lifespan,
        docs_url="/docs",
        openapi_url="/openapi.json",
    )
    st = app.state
    st.settings, st.sessions = settings, dbm.session_factory(url)
    st.ledger, st.pepper, st.ray = SQLLedger(url), settings.resolved_pepper(), ray
    st.metrics = Metrics(st.sessions)
    st.reconciler = Reconciler(st)
    st.wake_reconciler = st.reconciler.wake.set
    st.ray_dashboard_url = lambda: (
        settings.ray_dashboard_url or (st.reconciler.ray.dashboard_url if st.reconciler.ray is not None else None)
    )

    app.add_exception_handler(RequestValidationError, validation_handler)
    app.add_exception_handler(ApiError, api_error_handler)
    app.add_exception_handler(StarletteHTTPException, http_error_handler)
    st.capacity = ClusterCapacity(st)
    routers = [r.router for r in (jobs, job_outputs, datasets, tenants, estimate, backends, ops)]
    for router in routers:
        app.include_router(router)
    app.add_middleware(BodyLimitMiddleware, fastapi_app=app, routes=[r for router in routers for r in router.routes])
    app.add_middleware(LatencyMiddleware, metrics=st.metrics)  # outermost: 413s are observed too
    app.mount("/dashboard", StaticFiles(directory=DASHBOARD, html=True), name="dashboard")
    return app
