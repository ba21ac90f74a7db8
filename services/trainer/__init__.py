"""The trainer job: Ray Train TorchTrainer + Accelerate per worker, quantum calls through the pool.

`python -m services.trainer --spec job.json` runs one job (see __main__.py); `TrainerRun(spec).run()` does
the same from Python. The line format it prints, which the control plane reads, is services/contract/events.py.
"""
