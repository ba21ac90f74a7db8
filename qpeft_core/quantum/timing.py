"""QPU time of executor calls: what IBM Quantum bills ("usage", in seconds) for the jobs a fine-tune sends.

One executor call is one Runtime job (one sampler PUB: the ansatz with B parameter sets, one shot count),
estimated as
    per_job_s + circuits x per_circuit_s + shots x per_shot_s
- per_shot_s: the transpiled circuit's critical path with the device's gate and measurement durations, plus
  its default repetition delay (qiskit_backends.seconds_per_shot); 250 us of delay dominates on IBM's devices.
- per_job_s = 3.0 s: IBM's usage documentation (quantum.cloud.ibm.com/docs/guides/estimate-job-run-time,
  read 2026-12-07) shows a 2-qubit Bell circuit at the Sampler's default 4,096 shots estimated at 4.1 s of
  quantum time, of which 4,096 x 250 us = 1.0 s is the shots: about 3 s is fixed per job.
- per_circuit_s = 0: no published figure; the parameter sets of one PUB share one compiled circuit.
For a QPA step (1 forward + 2P shifted circuits at 1,024 shots: 2 jobs, ~0.3 s of shots each) the fixed
cost is most of the bill; that is why the pool sends a device's calls whole instead of splitting them.
Each constant is overridable per device with QPEFT_QPU_TIMING, a JSON object
{"<device name>": {"per_job_s": ..., "per_circuit_s": ..., "per_shot_s": ...}} (read where executors are
built: the quantum workers, and the control plane for the forecast).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, replace

PER_JOB_S = 3.0
PER_CIRCUIT_S = 0.0
OVERRIDES_ENV = "QPEFT_QPU_TIMING"


@dataclass(frozen=True)
class QPUTime:
    per_shot_s: float
    per_circuit_s: float = PER_CIRCUIT_S
    per_job_s: float = PER_JOB_S

    def seconds(self, circuits: int, shots: int) -> float:
        """Estimated QPU seconds of one job of `circuits` parameter sets and `shots` shots in all."""
        return self.per_job_s + circuits * self.per_circuit_s + shots * self.per_shot_s


def device_timing(device_name: str, per_shot_s: float | None) -> QPUTime | None:
    """The time model of a device: its measured per-shot time, the documented overheads, and any override
    from QPEFT_QPU_TIMING for that device name. None when nothing gives a per-shot time."""
    raw = os.environ.get(OVERRIDES_ENV)
    override = {}
    if raw:
        try:
            override = json.loads(raw).get(device_name, {})
        except (ValueError, AttributeError):
            raise ValueError(f"{OVERRIDES_ENV} must be a JSON object of device name -> timing fields") from None
        unknown = set(override) - {"per_job_s", "per_circuit_s", "per_shot_s"}
        if unknown:
            raise ValueError(f"{OVERRIDES_ENV}[{device_name!r}]: unknown fields {sorted(unknown)}")
    per_shot_s = override.get("per_shot_s", per_shot_s)
    if per_shot_s is None:
        return None
    return replace(QPUTime(float(per_shot_s)), **{k: float(v) for k, v in override.items() if k != "per_shot_s"})
