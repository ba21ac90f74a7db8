"""The in-process budget ledger (services/contract/ledger.py): shots and QPU seconds, as SQLLedger counts them
(tests/test_control_plane_ledger.py), and concurrent callers never overspending."""

from __future__ import annotations

import pickle
import threading

import pytest
import torch

from qpeft_core.quantum.backend import ExecutionRefused
from services.contract.ledger import BudgetExhausted, InMemoryLedger, ShotLedger


def test_ledger_reserve_commit_release():
    led = InMemoryLedger({"t": 1000})
    a = led.reserve("t", 600)
    assert led.remaining("t") == 400
    with pytest.raises(BudgetExhausted) as e:
        led.reserve("t", 401)
    assert (e.value.key, e.value.requested, e.value.remaining) == ("t", 401, 400)
    led.commit(a, 500)  # fewer ran than held: the rest goes back
    b = led.reserve("t", 300)
    led.release(b, lost=100)
    acc = led.account("t")
    assert (acc.spent, acc.lost, acc.reserved, acc.remaining) == (500, 100, 0, 400)
    with pytest.raises(KeyError):
        led.commit(a, 0)  # already closed
    with pytest.raises(ValueError):
        led.commit(led.reserve("t", 10), 11)  # more than held
    assert led.remaining("other") is None  # no budget: unlimited


def test_ledger_threads_never_overspend():
    led = InMemoryLedger({"t": 10_000})
    refused = []

    def spend(seed):
        g = torch.Generator().manual_seed(seed)
        for _ in range(300):
            n = int(torch.randint(1, 200, (1,), generator=g))
            try:
                rid = led.reserve("t", n)
            except BudgetExhausted:
                refused.append(n)
                continue
            assert led.remaining("t") >= 0
            if n % 3:
                led.commit(rid, n)
            else:
                led.release(rid, lost=n // 2)

    threads = [threading.Thread(target=spend, args=(s,)) for s in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    acc = led.account("t")
    assert refused and acc.reserved == 0
    assert acc.spent + acc.lost <= 10_000 and acc.remaining == 10_000 - acc.spent - acc.lost >= 0


def test_ledger_counts_qpu_seconds_and_refuses_like_the_sql_one():
    led = InMemoryLedger()
    assert isinstance(led, ShotLedger)
    led.set_budget("t", None, qpu_s=10.0)
    assert led.qpu_s_remaining("t") == 10.0 and led.remaining("t") is None
    a = led.reserve("t", 100, qpu_s=6.0)
    assert led.qpu_s_remaining("t") == 4.0
    with pytest.raises(BudgetExhausted, match="QPU-time") as e:
        led.reserve("t", 1, qpu_s=5.0)  # the estimate does not fit beside the one in flight
    assert isinstance(e.value, ExecutionRefused)  # a training loop stops cleanly at it
    again = pickle.loads(pickle.dumps(e.value))  # as Ray ships it from a pool to a trainer
    assert (type(again), str(again), again.key) == (BudgetExhausted, str(e.value), "t")
    led.commit(a, 100, qpu_s=7.5)  # what the executor reported, not the estimate
    b = led.reserve("t", 10, qpu_s=1.0)
    led.commit(b, 10)  # nothing reported: the estimate is charged
    c = led.reserve("t", 10, qpu_s=1.0)
    led.release(c, lost=10)  # released calls charge no QPU time unless told
    acc = led.account("t")
    assert (acc.spent, acc.lost, acc.qpu_s_spent, acc.qpu_s_reserved) == (110, 10, 8.5, 0.0)
    assert acc.qpu_s_remaining == pytest.approx(1.5)
    d = led.reserve("t", 0, qpu_s=1.0)
    led.release(d, qpu_s=None)  # lost with the estimate charged
    e2 = led.reserve("t", 0, qpu_s=0.0)
    led.commit(e2, 0, qpu_s=1.0)  # the executor ran over its estimate: QPU time is now used up
    with pytest.raises(BudgetExhausted, match=r"QPU-time budget of 't' exhausted: 10.500 of 10.0 s used"):
        led.reserve("t", 0)  # even a call estimated at 0 s: SQLLedger refuses once spent >= budget
    with pytest.raises(ValueError):
        led.reserve("t", 1, qpu_s=-1.0)
