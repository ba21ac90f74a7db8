"""Alembic environment: the URL comes from the app (db.migrate) or from `-x url=...` / QPEFT_DATABASE_URL."""

import os

from alembic import context
from sqlalchemy import create_engine

from services.control_plane.db import normalise_url
from services.control_plane.models import Base

config = context.config
target_metadata = Base.metadata


def _url() -> str:
    url = context.get_x_argument(as_dictionary=True).get("url") or config.get_main_option("sqlalchemy.url")
    url = url or os.environ.get("QPEFT_DATABASE_URL")
    if not url:
        raise SystemExit("no database URL: pass -x url=... or set QPEFT_DATABASE_URL")
    return normalise_url(url)


def run() -> None:
    conn = config.attributes.get("connection")
    if conn is not None:  # called from the app with an open connection
        context.configure(connection=conn, target_metadata=target_metadata, render_as_batch=True)
        with context.begin_transaction():
            context.run_migrations()
        return
    if context.is_offline_mode():
        context.configure(url=_url(), target_metadata=target_metadata, literal_binds=True)
        with context.begin_transaction():
            context.run_migrations()
        return
    engine = create_engine(_url())
    with engine.connect() as connection:
        context.configure(connection=connection, target_metadata=target_metadata, render_as_batch=True)
        with context.begin_transaction():
            context.run_migrations()


run()
