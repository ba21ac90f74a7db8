"""Sessions and migrations over the shared engines (services/contract/engine.py): SQLite (embedded) and
PostgreSQL (cluster) behind one URL."""

from __future__ import annotations

from pathlib import Path

from sqlalchemy.orm import Session, sessionmaker

from services.contract.engine import engine_for, normalise_url

MIGRATIONS = Path(__file__).resolve().parent / "migrations"


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
