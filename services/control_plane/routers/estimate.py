"""/v1/estimate: the shots and QPU time a JobSpec will need, before it is submitted."""

from __future__ import annotations

from fastapi import APIRouter, Request

from services.contract.budget import admission
from services.contract.jobspec import JobSpec

from .. import schemas
from ..access import tenant_spec
from ..auth import Db, SessionReleasingRoute, TenantName
from ..forecast import forecast
from ..limits import check_fits

router = APIRouter(route_class=SessionReleasingRoute, tags=["estimate"])


@router.post(
    "/v1/estimate",
    response_model=schemas.Estimate,
    responses=schemas.errors(401, 403, 422),
    summary="Forecast a job's shots (and QPU seconds on IBM devices), with the formula",
)
def estimate(spec: JobSpec, request: Request, db: Db, tenant: TenantName) -> schemas.Estimate:
    spec = tenant_spec(spec, request.app.state.settings, db, tenant)
    check_fits(request, spec)
    fc = forecast(spec, request.app.state.settings.qpu_usd_per_s)
    acc = request.app.state.ledger.account(tenant, db)
    return schemas.Estimate(
        **fc,
        budget_remaining=acc.remaining,
        qpu_seconds_remaining=acc.qpu_s_remaining,
        fits_budget=admission(fc, acc, spec) is None,
    )
