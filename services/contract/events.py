"""Trainer progress as structured lines on stdout: `QPEFT_EVENT <json>`, one event per line.

The trainer prints them; whoever reads its log (the control plane reads the Ray job log) finds them
anywhere in a line, so prefixes added by Ray or a shell do not matter. Every event has a "type":
  state     sub_state: WAITING_QPU | EXECUTING_QPU | TRAINING
  progress  step, max_steps, loss, eval (dict), shots_spent, qpu_s, tokens_per_s, time (+ step_s, pool_calls)
  log       message
  params    trainable, total (the adapted model's parameter counts, once training starts)
  artifact  name, path (a directory under QPEFT_ARTIFACT_DIR)
  result    state: SUCCEEDED | FAILED | BUDGET_EXHAUSTED | CANCELLED, reason
"""

from __future__ import annotations

import json
import math
import sys
import time

MARK = "QPEFT_EVENT "
TYPES = ("state", "progress", "log", "params", "artifact", "result")
SUB_STATES = ("WAITING_QPU", "EXECUTING_QPU", "TRAINING")
RESULTS = ("SUCCEEDED", "FAILED", "CANCELLED", "BUDGET_EXHAUSTED")  # a job's final states, in this order


def make(type: str, **fields) -> dict:
    if type not in TYPES:
        raise ValueError(f"event type {type!r} is not one of {TYPES}")
    return {"type": type, "time": time.time(), **fields}


def _finite(v):
    # NaN/inf are not JSON: a diverged loss is sent as null so strict readers still parse the line
    if isinstance(v, float):
        return v if math.isfinite(v) else None
    if isinstance(v, dict):
        return {k: _finite(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_finite(x) for x in v]
    return v


def line(event: dict) -> str:
    return MARK + json.dumps(_finite(event), default=str, separators=(",", ":"), allow_nan=False)


def emit(event: dict, stream=None) -> None:
    print(line(event), file=stream or sys.stdout, flush=True)


def parse(text: str) -> dict | None:
    """The event in a log line, or None for a plain line."""
    i = text.find(MARK)
    if i < 0:
        return None
    try:
        event = json.loads(text[i + len(MARK) :])
    except ValueError:
        return None
    return event if isinstance(event, dict) and isinstance(event.get("type"), str) else None
