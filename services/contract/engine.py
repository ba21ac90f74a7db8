"""One SQLAlchemy engine per database URL and process: SQLite (embedded) and PostgreSQL (cluster).

The control plane's sessions and every SQLLedger (in the API, trainers and quantum pools) share it.
PostgreSQL's pool size per process comes from QPEFT_DB_POOL_SIZE, QPEFT_DB_MAX_OVERFLOW and
QPEFT_DB_POOL_TIMEOUT (seconds), read when a URL's engine is first made.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.pool import StaticPool

_engines: dict[str, Engine] = {}
_lock = threading.Lock()
# per process; PostgreSQL allows 100 connections by default
PG_POOL = {"pool_size": 10, "max_overflow": 20, "pool_timeout": 30.0}
POOL_ENV = {
    "pool_size": "QPEFT_DB_POOL_SIZE",
    "max_overflow": "QPEFT_DB_MAX_OVERFLOW",
    "pool_timeout": "QPEFT_DB_POOL_TIMEOUT",
}


def normalise_url(url: str) -> str:
    """postgresql:// means psycopg 3 here (the driver installed), not psycopg2."""
    u = make_url(url)
    if u.drivername in ("postgresql", "postgres"):
        u = u.set(drivername="postgresql+psycopg")
    return u.render_as_string(hide_password=False)


def pg_pool() -> dict:
    """PG_POOL with the environment's overrides."""
    kind = {"pool_size": int, "max_overflow": int, "pool_timeout": float}
    return {k: kind[k](os.environ[POOL_ENV[k]]) if os.environ.get(POOL_ENV[k]) else v for k, v in PG_POOL.items()}


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
                # file) and closes them on return.
                pool = (
                    {"pool_size": 16, "max_overflow": -1} if path and path != ":memory:" else {"poolclass": StaticPool}
                )
                eng = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30}, **pool)
                event.listen(eng, "connect", _sqlite_pragmas)
            else:
                eng = create_engine(url, pool_pre_ping=True, **pg_pool())
            _engines[url] = eng
        return _engines[url]


def dispose(url: str) -> None:
    with _lock:
        eng = _engines.pop(normalise_url(url), None)
    if eng is not None:
        eng.dispose()
