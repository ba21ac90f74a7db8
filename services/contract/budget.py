"""Admission: does a job's forecast fit what its tenant has left and the job's own limits? One check, which
POST /v1/jobs (refusing with 409) and POST /v1/estimate (answering `fits_budget`) both ask."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Refusal:
    """Why a forecast does not fit: a message, the request field to change, how, and the figures."""

    message: str
    field: str
    fix: str
    figures: dict = field(default_factory=dict)


def admission(forecast: dict, account, spec) -> Refusal | None:
    """None when `forecast` (control_plane.forecast: "shots", "qpu_seconds", "formula") fits the tenant's
    `account` (remaining, qpu_s_remaining; None: unlimited) and the spec's shot_limit and qpu_seconds_limit;
    else the first budget it exceeds. A spec with run_until_budget_ends is still measured here: POST
    /v1/jobs admits it anyway (it trains until the budget runs out), /v1/estimate reports that it does not fit."""
    shots = [v for v in (account.remaining, spec.shot_limit) if v is not None]
    if shots and forecast["shots"] > min(shots):
        return Refusal(
            f"the forecast of {forecast['shots']} shots exceeds the budget: {min(shots)} shots left",
            "body.max_steps",
            "lower max_steps or shots, raise the budget, or set run_until_budget_ends to train until it runs out",
            {
                "forecast_shots": forecast["shots"],
                "remaining_shots": account.remaining,
                "shot_limit": spec.shot_limit,
                "formula": forecast["formula"],
            },
        )
    qpu = [v for v in (account.qpu_s_remaining, spec.qpu_seconds_limit) if v is not None]
    if forecast["qpu_seconds"] is not None and qpu and forecast["qpu_seconds"] > min(qpu):
        return Refusal(
            f"the forecast of {forecast['qpu_seconds']:.1f} QPU seconds exceeds the {min(qpu):.1f} s left",
            "body.max_steps",
            "lower max_steps or shots, raise the QPU-time budget, or set run_until_budget_ends",
            {
                "forecast_qpu_seconds": forecast["qpu_seconds"],
                "remaining_qpu_seconds": account.qpu_s_remaining,
                "qpu_seconds_limit": spec.qpu_seconds_limit,
            },
        )
    return None
