"""The SQL shot ledger and the migrations, on SQLite and PostgreSQL."""

from __future__ import annotations

import pickle
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from services.contract.engine import engine_for
from services.contract.ledger import BudgetExhausted, ShotLedger
from services.contract.sql_ledger import SQLLedger
from services.control_plane import db
from tests.test_control_plane_support import db_url, pg_admin  # noqa: F401  (fixtures)


@pytest.fixture
def ledger(db_url):  # noqa: F811
    db.migrate(db_url)
    return SQLLedger(db_url)


def test_migration_matches_models(db_url):  # noqa: F811
    """Upgrading twice is a no-op, and the schema Alembic builds is exactly what the models declare."""
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext

    from services.control_plane.models import Base

    db.migrate(db_url)
    db.migrate(db_url)
    with engine_for(db_url).connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), Base.metadata)
    assert diff == []


def test_reserve_commit_release(ledger):
    assert isinstance(ledger, ShotLedger)
    ledger.set_budget("acme", 1000)
    a = ledger.reserve("acme", 600)
    assert ledger.remaining("acme") == 400
    with pytest.raises(BudgetExhausted) as e:
        ledger.reserve("acme", 401)
    assert (e.value.requested, e.value.remaining) == (401, 400)
    ledger.commit(a, 500)  # 100 of the 600 held go back
    ledger.commit(a, 500)  # a retried commit changes nothing
    assert ledger.remaining("acme") == 500
    b = ledger.reserve("acme", 300)
    ledger.release(b, lost=20)
    ledger.release(b, lost=20)
    acc = ledger.account("acme")
    assert (acc.spent, acc.lost, acc.reserved, acc.remaining) == (500, 20, 0, 480)
    with pytest.raises(ValueError):
        ledger.commit(ledger.reserve("acme", 10), 11)  # more than was held
    with pytest.raises(KeyError):
        ledger.commit("no-such-reservation", 1)
    with pytest.raises(KeyError):
        ledger.reserve("nobody", 1)
    assert pickle.loads(pickle.dumps(ledger)).remaining("acme") == 470  # Ray ships it by URL


def test_job_account_counts_against_its_tenant(ledger):
    ledger.set_budget("acme", 1000)
    ledger.set_budget("job:1", 300, parent="acme")
    ledger.set_budget("job:2", None, parent="acme")  # no own limit: the tenant's applies
    ledger.commit(ledger.reserve("job:1", 300), 300)
    with pytest.raises(BudgetExhausted) as e:
        ledger.reserve("job:1", 1)
    assert e.value.key == "job:1"
    ledger.commit(ledger.reserve("job:2", 600), 600)
    with pytest.raises(BudgetExhausted) as e:
        ledger.reserve("job:2", 101)
    assert e.value.key == "acme"  # refused by the parent: nothing stays held on the child
    assert ledger.account("job:2").reserved == 0
    assert ledger.remaining("job:2") == 100
    assert ledger.account("acme").spent == 900
    assert ledger.committed_total("acme") == (900, 0)


def test_qpu_seconds_budget(ledger):
    ledger.set_budget("acme", None, qpu_s=10.0)
    r = ledger.reserve("acme", 100, qpu_s=4.0)
    assert ledger.account("acme").qpu_s_remaining == 6.0
    ledger.commit(r, 100, qpu_s=10.5)  # the device reported more than estimated: charged as reported
    with pytest.raises(BudgetExhausted, match="QPU-time"):
        ledger.reserve("acme", 1)


def test_64_concurrent_reservations_never_overspend(ledger):
    """64 threads reserve at once against 1000 shots: exactly the ones that fit get through, nothing is
    overspent, and after concurrent commits and releases the account equals the sum of what was
    committed (and lost) per reservation."""
    ledger.set_budget("acme", 1000)
    ledger.set_budget("job:7", None, parent="acme")
    barrier = threading.Barrier(64)

    def reserve(i):
        barrier.wait()
        try:
            return ledger.reserve("job:7" if i % 2 else "acme", 70)
        except BudgetExhausted:
            return None

    with ThreadPoolExecutor(64) as ex:
        rids = [r for r in ex.map(reserve, range(64)) if r]
    assert len(rids) == 1000 // 70
    acc = ledger.account("acme")
    assert acc.reserved == 70 * len(rids) and acc.remaining == 1000 - 70 * len(rids)

    def close(i_rid):
        i, rid = i_rid
        if i % 3 == 0:
            ledger.release(rid, lost=5)
            return 0, 5
        ledger.commit(rid, 60)
        return 60, 0

    with ThreadPoolExecutor(16) as ex:
        charged = list(ex.map(close, enumerate(rids)))
    acc = ledger.account("acme")
    spent, lost = sum(c for c, _ in charged), sum(x for _, x in charged)
    assert (acc.spent, acc.lost, acc.reserved) == (spent, lost, 0)
    assert ledger.committed_total("acme") == (spent, lost)
    assert acc.remaining == 1000 - spent - lost >= 0
