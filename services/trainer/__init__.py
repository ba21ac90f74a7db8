"""The trainer job: Ray Train TorchTrainer + Accelerate per worker, quantum calls through the pool.

`python -m services.trainer --spec job.json` runs one job (see __main__.py); `TrainerRun(spec).run()` does
the same from Python; `events` is the line format both print and the control plane reads.
"""

from . import events

__all__ = ["events"]
