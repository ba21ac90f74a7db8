"""Engines, sessions and migrations. SQLite (embedded) and PostgreSQL (cluster) behind one URL."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.pool import StaticPool

MIGRATIONS = Path(__file__).resolve().parent / "migrations"
_engines: dict[str, Engine] = {}
PG_POOL = {"pool_size": 10, "max_overflow": 20}  # per process; PostgreSQL allows 100 connections by default
_lock = threading.Lock()


def normalise_url(url: str) -> str:
    """postgresql:// means psycopg 3 here (the driver installed), not psycopg2."""
    u = make_url(url)
    if u.drivername in ("postgresql", "postgres"):
        u = u.set(drivername="postgresql+psycopg")
    return u.render_as_string(hide_password=False)


def _sqlite_pragmas(dbapi_conn, _record):
    cur = dbapi_conn.cursor()
    # WAL lets readers run beside the one writer; the busy timeout makes writers queue instead of failing.
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA busy_timeout=30000")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.close()


def engine_for(url: str) -> Engine:
    """One engine per URL and process (the trainer and the API may share a process in tests)."""
    url = normalise_url(url)
    with _lock:
        if url not in _engines:
            if url.startswith("sqlite"):
                path = make_url(url).database
                if path and path != ":memory:":
                    Path(path).parent.mkdir(parents=True, exist_ok=True)
                # A checkout never waits: beyond 16 kept connections the pool opens more (cheap for a SQLite
                # file) and closes them on return. Requests no longer hold connections between threadpool
                # hops (auth.SessionReleasingRoute), which once stalled a bounded pool at 200 requests/s.
                pool = (
                    {"pool_size": 16, "max_overflow": -1} if path and path != ":memory:" else {"poolclass": StaticPool}
                )
                eng = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30}, **pool)
                event.listen(eng, "connect", _sqlite_pragmas)
            else:
                eng = create_engine(url, pool_pre_ping=True, **PG_POOL)
            _engines[url] = eng
        return _engines[url]


def dispose(url: str) -> None:
    with _lock:
        eng = _engines.pop(normalise_url(url), None)
    if eng is not None:
        eng.dispose()


def session_factory(url: str) -> sessionmaker[Session]:
    return sessionmaker(engine_for(url), expire_on_commit=False)


def alembic_config(url: str):
    from alembic.config import Config

    cfg = Config(str(MIGRATIONS / "alembic.ini"))
    cfg.set_main_option("script_location", str(MIGRATIONS))
    cfg.set_main_option("sqlalchemy.url", normalise_url(url).replace("%", "%%"))
    return cfg


def migrate(url: str) -> None:
    """Bring the schema to the newest revision (idempotent; run at every start)."""
    from alembic import command

    with engine_for(url).begin() as conn:
        cfg = alembic_config(url)
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "head")


def sessions(factory: sessionmaker[Session]) -> Iterator[Session]:
    with factory() as s:
        yield s
