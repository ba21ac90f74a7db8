"""What a tenant's job spec may name: its own uploaded data sets, the shared ones, and what the operator allowed.

The control plane validates every spec a second time with the tenant's `Access` as pydantic's validation
context (FastAPI's own parse of the body only checks its form) and once more when it hands the job to Ray,
writing the resolved server paths into the spec file the trainer reads (services/contract/jobspec.py)."""

from __future__ import annotations

from pathlib import Path

from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError
from sqlalchemy.orm import Session

from services.contract.jobspec import Access, JobSpec, hub_online

from .models import Dataset
from .settings import Settings


def tenant_access(settings: Settings, db: Session, tenant: str) -> Access:
    def uploaded(dataset_id: str) -> Path | None:
        row = db.get(Dataset, dataset_id)
        if row is None or row.tenant != tenant:  # another tenant's id reads as no such id
            return None
        path = Path(row.path)
        return path if path.is_file() else None

    return Access(
        uploaded=uploaded,
        data_roots=tuple(settings.data_roots),
        model_roots=tuple(settings.model_roots),
        hub_cache=settings.hub_cache,
        hub_online=hub_online(),
    )


def resolve_spec(spec: JobSpec | dict, settings: Settings, db: Session, tenant: str) -> JobSpec:
    """The spec validated for `tenant`, with `resolved` filled in; raises pydantic's ValidationError."""
    body = spec.model_dump(mode="json", exclude={"resolved"}) if isinstance(spec, JobSpec) else spec
    return JobSpec.model_validate(body, context={"access": tenant_access(settings, db, tenant)})


def tenant_spec(spec: JobSpec, settings: Settings, db: Session, tenant: str) -> JobSpec:
    """resolve_spec at the edge: its errors answer 422 like FastAPI's own, located under body."""
    try:
        return resolve_spec(spec, settings, db, tenant)
    except ValidationError as e:
        errors = [{**err, "loc": ("body", *err["loc"])} for err in e.errors(include_url=False, include_input=False)]
        raise RequestValidationError(errors) from None
