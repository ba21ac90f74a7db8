"""Request and response bodies (the JobSpec itself lives in services/contract/jobspec.py)."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

State = Literal["QUEUED", "RUNNING", "SUCCEEDED", "FAILED", "CANCELLED", "BUDGET_EXHAUSTED"]
SubState = Literal["WAITING_QPU", "EXECUTING_QPU", "TRAINING"]
TENANT_NAME = r"^[a-z0-9][a-z0-9_-]{0,62}$"


class ErrorItem(BaseModel):
    field: str | None = Field(description="where the problem is, e.g. body.max_steps or path.job_id")
    message: str
    fix: str | None = Field(description="what to change")


class ErrorBody(BaseModel):
    detail: str
    errors: list[ErrorItem]


def errors(*codes: int) -> dict:
    """OpenAPI `responses` entries for the error codes a route can return."""
    return {code: {"model": ErrorBody} for code in codes}


class Shots(BaseModel):
    """Shots of a ledger account; limit None means unlimited. remaining = limit - spent - lost - reserved."""

    limit: int | None
    spent: int
    lost: int = Field(description="ran on a worker that failed; charged, results discarded")
    reserved: int = Field(description="held by calls in flight")
    remaining: int | None


class Seconds(BaseModel):
    """QPU seconds of a ledger account (reported by the device, or estimated from its timing)."""

    limit: float | None
    spent: float
    reserved: float
    remaining: float | None


class Budget(BaseModel):
    tenant: str
    shots: Shots
    qpu_seconds: Seconds


class BudgetUpdate(BaseModel):
    model_config = ConfigDict(extra="forbid")
    shots: int | None = Field(None, ge=0, le=10**15, description="shot budget; null: unlimited")
    qpu_seconds: float | None = Field(None, ge=0, le=1e9, description="QPU-time budget; null: unlimited")


class TenantCreate(BudgetUpdate):
    name: str = Field(pattern=TENANT_NAME, description="lower-case letters, digits, '-' and '_'")


class Tenant(BaseModel):
    name: str
    created_at: datetime
    budget: Budget
    keys: list[ApiKeyInfo]


class ApiKeyInfo(BaseModel):
    id: int
    prefix: str = Field(description="the key's first characters, to tell keys apart")
    created_at: datetime
    revoked: bool


class NewApiKey(BaseModel):
    tenant: str
    id: int
    api_key: str = Field(description="shown once: only a hash is stored")


class JobShots(BaseModel):
    spent: int
    lost: int
    reserved: int
    limit: int | None
    forecast: int | None
    qpu_seconds: float
    qpu_seconds_estimated: float = Field(
        0.0, description="the part of qpu_seconds that is the time model's estimate (no provider report)"
    )
    qpu_seconds_limit: float | None = None
    qpu_seconds_forecast: float | None
    cost_usd: float = Field(0.0, description="qpu_seconds at the server's QPEFT_QPU_USD_PER_S rate")
    cost_usd_forecast: float | None = None


class JobParameters(BaseModel):
    trainable: int
    total: int


class Job(BaseModel):
    id: str
    name: str | None
    state: State
    sub_state: SubState | None
    reason: str | None
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    step: int
    max_steps: int
    attempt: int = Field(description="Ray submissions so far: more than 1 after a driver died and was resubmitted")
    loss: float | None
    parameters: JobParameters | None = Field(description="the adapted model's counts, once training has started")
    shots: JobShots
    spec: dict[str, Any]
    links: dict[str, str]


class JobPage(BaseModel):
    items: list[Job]
    total: int
    limit: int
    offset: int
    next_offset: int | None


class LogLine(BaseModel):
    seq: int
    time: float
    line: str


class LogPage(BaseModel):
    job_id: str
    lines: list[LogLine]
    next_after: int = Field(description="pass as ?after= to get only newer lines")
    finished: bool


class MetricPoint(BaseModel):
    step: int
    time: float
    loss: float | None
    eval: dict[str, Any] | None
    shots_spent: int
    qpu_s: float | None
    tokens_per_s: float | None


class Metrics(BaseModel):
    job_id: str
    points: list[MetricPoint]


class Artifact(BaseModel):
    name: str
    kind: Literal["file", "directory"]
    size: int | None
    url: str


class Backend(BaseModel):
    spec: str = Field(description="the executor string for JobSpec.executor")
    kind: str = Field(description="simulator, fake (a fake IBM device simulated here), ibm, or a registered kind")
    qubits: int
    exact: bool
    status: str


class StepForecast(BaseModel):
    forward_circuits: int
    gradient_circuits_per_call: int
    gradient_calls: int
    circuits: int
    shots: int


class Forecast(BaseModel):
    method: str
    executor: str
    gradient: str
    qubits: int | None
    parameters: int | None = Field(description="QNN angles P")
    shots_per_circuit: int
    per_step: StepForecast
    max_steps: int
    circuits: int
    shots: int
    qpu_seconds: float | None = Field(
        description="estimated QPU time (IBM devices): jobs x seconds_per_job + circuits x seconds_per_circuit "
        "+ shots x seconds_per_shot (qpeft_core/quantum/timing.py)"
    )
    seconds_per_shot: float | None
    seconds_per_job: float | None = Field(None, description="the fixed QPU time of one Runtime job")
    seconds_per_circuit: float | None = None
    jobs: int = Field(0, description="executor calls, each one Runtime job (an upper bound for shot_adaptive)")
    cost_usd: float | None = Field(
        None, description="qpu_seconds at the server's QPEFT_QPU_USD_PER_S rate (default: IBM's pay-as-you-go price)"
    )
    formula: str
    shots_bound: Literal["exact", "upper"] = Field(
        "exact", description="upper: an adaptive gradient strategy spends at most this many shots"
    )
    explanation: str


class Estimate(Forecast):
    budget_remaining: int | None = Field(description="shots the tenant can still spend; null: unlimited")
    qpu_seconds_remaining: float | None
    fits_budget: bool


class DatasetColumn(BaseModel):
    name: str
    non_empty: int = Field(description="rows with a non-blank value")
    integers: int = Field(description="rows whose value reads as an integer (a class label)")
    max_chars: int


class Dataset(BaseModel):
    """An uploaded data set. Statistics are counts; no value of the file is ever returned."""

    id: str = Field(description="name it in a JobSpec as dataset.train or dataset.eval")
    name: str = Field(description="the file name given at upload")
    format: Literal["text", "tsv", "csv", "jsonl"]
    size_bytes: int
    sha256: str
    rows: int = Field(description="lines (text), data rows below the header (csv/tsv), objects (jsonl)")
    empty_rows: int
    max_chars: int = Field(description="the longest row, in characters")
    columns: list[DatasetColumn] | None = Field(description="csv/tsv/jsonl: each column's counts; text: null")
    created_at: datetime
    used_by: list[str] = Field(description="ids of this tenant's queued or running jobs that name it")


class DatasetPage(BaseModel):
    items: list[Dataset]
    total: int
    limit: int
    offset: int
    next_offset: int | None


class Info(BaseModel):
    version: str
    mode: Literal["embedded", "cluster"]
    ray_dashboard_url: str | None = Field(description="the Ray dashboard, for the admin key only; null for tenants")
    ray_reachable: bool


Tenant.model_rebuild()
