"""The control plane: REST API (FastAPI), database, shot ledger, Ray job reconciliation, dashboard.

What it shares with the trainer and the quantum pool (JobSpec, events, the ledger) is in services/contract.
Build the app with `services.control_plane.app.create_app()`.
"""
