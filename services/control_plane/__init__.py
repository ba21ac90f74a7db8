"""The control plane: REST API (FastAPI), database, shot ledger, Ray job reconciliation, dashboard.

Kept import-light: the trainer imports `services.control_plane.ledger` without pulling in FastAPI.
Build the app with `services.control_plane.app.create_app()`.
"""
