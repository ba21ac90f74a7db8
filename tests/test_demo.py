"""The service part of `make demo` (services/demo.py) end to end with a tiny model: its own embedded control
plane and Ray head (on free ports, apart from the session's cluster), two QPA jobs over the REST API, the
LoRA artifact used with plain peft, and nothing left running afterwards."""

from __future__ import annotations

import pytest

from services.contract.jobspec import shared_data_dir


@pytest.mark.slow
def test_service_demo(monkeypatch):
    if not (shared_data_dir() / "wikitext-2" / "valid.txt").is_file():
        pytest.skip("WikiText-2 is not in the shared data folder")
    from services.demo import run_service_demo

    # the demo starts its own head: nothing may point it at the session's cluster
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setenv("QPEFT_SHARED_DATA", str(shared_data_dir()))  # restored after; the demo sets it
    r = run_service_demo("tiny-gpt2", shared_data_dir(), "cpu", steps=2, quick=True)
    (_, aer_state, aer_steps, aer_shots), (_, exact_state, exact_steps, exact_shots) = r["jobs"]
    assert (aer_state, aer_steps, exact_state, exact_steps) == ("SUCCEEDED", 2, "SUCCEEDED", 2)
    assert 0 < aer_shots <= r["budget"]["limit"] and exact_shots == 0
    assert r["budget"]["spent"] == aer_shots and r["budget"]["reserved"] == 0
    f = r["frugal"]
    assert f["spent"] == aer_shots < f["naive_forecast"]  # shot-adaptive spent fewer shots than the naive forecast
    assert f["qpu_seconds"] > 0 and f["cost_usd"] == pytest.approx(1.6 * f["qpu_seconds"])
    ppl = r["perplexity"]  # only the exact job evaluates before its first step too
    assert [s for s, _ in ppl[r["jobs"][0][0]]] == [2] and [s for s, _ in ppl[r["jobs"][1][0]]] == [0, 2]
    assert all(v > 1 for points in ppl.values() for _, v in points)
    assert r["dataset"]["id"].startswith("ds_") and r["dataset"]["format"] == "tsv" and r["dataset"]["rows"] > 0
    assert r["sample"].startswith("The history of the city")
    assert r["left_processes"] == {}
