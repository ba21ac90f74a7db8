"""Data sets as a tenant's own resource, and specs that name only what the tenant may use: upload (streamed,
size-limited, checked, nothing half-written), list, get, delete (not while a job uses it), isolation between
tenants, server paths confined to operator-allowed roots with one answer for missing and forbidden, models
the same way (a hub id from a local hub cache, offline), the trainer's spec file carrying the resolved paths,
loader errors without cell values, and the CLI's `data` commands and upload-on-submit."""

from __future__ import annotations

import hashlib
import json
import os

import pytest
from fastapi.testclient import TestClient

from services.contract.jobspec import JobSpec
from services.control_plane.app import create_app
from services.control_plane.models import Dataset
from tests.test_control_plane_support import (  # noqa: F401  (fixtures)
    SPEC,
    FakeRay,
    LiveServer,
    db_url,
    make_settings,
    new_tenant,
    pg_admin,
    sqlite_url,
)

SECRET = "zebra-7741"  # a cell value that must never come back
TSV = f"sentence\tlabel\na fine film\t1\n{SECRET} dull\t0\nok\t1\n"
LM_SPEC = {**SPEC, "method": "lora", "executor": "exact", "shots": None, "method_config": {"r": 2}}


@pytest.fixture
def env(tmp_path, db_url):  # noqa: F811
    allowed = tmp_path / "allowed"
    allowed.mkdir()
    (allowed / "corpus.txt").write_text("one line\nanother line\n")
    ray = FakeRay()
    settings = make_settings(tmp_path / "data", db_url, max_upload_bytes=4096, data_roots=[allowed])
    app = create_app(settings, ray=ray, reconcile=False)
    with TestClient(app) as client:
        yield app, client, ray


def upload(c, key, text: str | bytes, name="reviews.tsv", **params):
    body = text.encode() if isinstance(text, str) else text
    return c.post("/v1/datasets", params={"name": name, **params}, content=body, headers=key)


def files_of(app, tenant: str) -> list[str]:
    folder = app.state.settings.datasets_dir(tenant)
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


def answer(r, name: str):
    """A refusal with the named value taken out: what must be identical for missing and forbidden names."""
    return r.status_code, [
        (e["field"], e["message"].replace(repr(name), "<name>"), e["fix"]) for e in r.json().get("errors", [])
    ]


def test_upload_list_get_delete_and_isolation(env):
    app, c, _ = env
    a, b = new_tenant(c, "acme"), new_tenant(c, "beta")
    r = upload(c, a, TSV)
    assert r.status_code == 201, r.text
    d = r.json()
    assert d["id"].startswith("ds_") and d["format"] == "tsv" and d["name"] == "reviews.tsv"
    assert d["sha256"] == hashlib.sha256(TSV.encode()).hexdigest() and d["size_bytes"] == len(TSV.encode())
    assert d["rows"] == 3 and d["empty_rows"] == 0 and d["used_by"] == []
    cols = {col["name"]: col for col in d["columns"]}
    assert cols["label"]["integers"] == 3 and cols["sentence"]["integers"] == 0 and cols["sentence"]["non_empty"] == 3
    assert SECRET not in r.text  # counts only, never a cell
    assert files_of(app, "acme") == [f"{d['id']}.tsv"]  # no temporary file left beside it

    text = upload(c, a, "line one\n\nline three\n", name="notes.txt").json()
    assert (text["format"], text["rows"], text["empty_rows"], text["columns"]) == ("text", 3, 1, None)
    jsonl = upload(c, a, '{"text": "x", "label": 1}\n{"text": "y", "label": 0}\n', name="d.jsonl").json()
    assert jsonl["format"] == "jsonl" and [col["name"] for col in jsonl["columns"]] == ["text", "label"]

    page = c.get("/v1/datasets", headers=a).json()
    assert page["total"] == 3 and {x["id"] for x in page["items"]} == {d["id"], text["id"], jsonl["id"]}
    assert c.get(f"/v1/datasets/{d['id']}", headers=a).json()["sha256"] == d["sha256"]

    # another tenant: not listed, not readable, not deletable, not usable in a job; 404 as if absent
    assert c.get("/v1/datasets", headers=b).json()["total"] == 0
    for method in ("GET", "DELETE"):
        r = c.request(method, f"/v1/datasets/{d['id']}", headers=b)
        assert r.status_code == 404 and r.json()["errors"][0]["field"] == "path.dataset_id"
    theirs = c.post("/v1/jobs", json={**LM_SPEC, "dataset": d["id"]}, headers=b)
    absent = c.post("/v1/jobs", json={**LM_SPEC, "dataset": "ds_0000000000000000"}, headers=b)
    assert theirs.status_code == 422 and answer(theirs, d["id"]) == answer(absent, "ds_0000000000000000")
    assert theirs.json()["errors"][0]["field"] == "body.dataset.train"
    assert c.post("/v1/estimate", json={**LM_SPEC, "dataset": d["id"]}, headers=b).status_code == 422

    ok = c.post("/v1/jobs", json={**LM_SPEC, "dataset": {"train": d["id"], "eval": text["id"]}}, headers=a)
    assert ok.status_code == 201, ok.text
    assert ok.json()["spec"]["dataset"]["train"] == d["id"] and "resolved" not in ok.json()["spec"]
    assert c.delete(f"/v1/datasets/{text['id']}", headers=a).status_code == 409  # the job evaluates on it
    assert c.delete(f"/v1/datasets/{jsonl['id']}", headers=a).status_code == 204
    assert c.get(f"/v1/datasets/{jsonl['id']}", headers=a).status_code == 404
    assert f"{jsonl['id']}.jsonl" not in files_of(app, "acme")


def test_refused_uploads_leave_nothing(env):
    app, c, _ = env
    a = new_tenant(c, "acme")
    big = upload(c, a, "x" * 5000 + "\n", name="big.txt")
    assert big.status_code == 413 and "4096 bytes" in big.json()["detail"] and "QPEFT_MAX_UPLOAD_BYTES" in big.text

    def chunks():  # no Content-Length: the limit is enforced while streaming
        for _ in range(10):
            yield b"y" * 1000 + b"\n"

    streamed = c.post("/v1/datasets", params={"name": "big.txt"}, content=chunks(), headers=a)
    assert streamed.status_code == 413
    bad = [
        (f"sentence,label\n{SECRET},1,extra\n", "ragged.csv", "row 0: 3 fields, the header has 2"),
        ("", "empty.txt", "no data"),
        ("\n\n", "blank.txt", "no data"),
        (b"caf\xe9 au lait\n", "latin1.txt", "not UTF-8"),
        (f'{{"text": "ok"}}\n[{json.dumps(SECRET)}]\n', "rows.jsonl", "line 2: not a JSON object"),
        ("a\ta\n1\t2\n", "dup.tsv", "repeats a column name"),
    ]
    for body, name, words in bad:
        r = upload(c, a, body, name=name)
        assert r.status_code == 422 and words in r.json()["detail"], (name, r.text)
        assert SECRET not in r.text
    assert upload(c, a, "just text, no header", name="plain.csv", format="text").status_code == 201
    assert len(files_of(app, "acme")) == 1  # only the accepted one: no part files, no refused files
    with app.state.sessions() as s:
        assert s.query(Dataset).count() == 1


def test_server_paths_refused_alike(env, tmp_path):
    app, c, ray = env
    settings = app.state.settings
    a, b = new_tenant(c, "acme"), new_tenant(c, "beta")
    job = c.post("/v1/jobs", json=LM_SPEC, headers=a).json()
    app.state.reconciler.reconcile_once()  # writes acme's spec.json under the data dir
    other_spec = settings.job_dir(job["id"]) / "spec.json"
    assert other_spec.is_file()
    allowed = settings.data_roots[0]
    (allowed / "escape.txt").symlink_to("/etc/passwd")
    (tmp_path / "outside.txt").write_text("not allowed\n")

    missing = "/no/such/file.txt"
    refused = c.post("/v1/jobs", json={**LM_SPEC, "dataset": missing}, headers=b)
    assert refused.status_code == 422 and refused.json()["errors"][0]["field"] == "body.dataset.train"
    for name in [
        "/etc/passwd",
        "../../../../etc/passwd",
        f"{allowed}/../../../../etc/passwd",
        f"{allowed}/../outside.txt",
        str(allowed / "escape.txt"),  # a symlink inside the root that leads out of it
        str(settings.data_dir / "pepper"),
        str(settings.data_dir / "qpeft.db"),
        "/proc/self/environ",
        str(other_spec),
        str(settings.datasets_dir("acme")),
        "~/.bashrc",
    ]:
        for where in ("train", "eval"):
            r = c.post("/v1/jobs", json={**LM_SPEC, "dataset": {"train": "tinyshakespeare", where: name}}, headers=b)
            want = c.post(
                "/v1/jobs", json={**LM_SPEC, "dataset": {"train": "tinyshakespeare", where: missing}}, headers=b
            )
            assert answer(r, name) == answer(want, missing), (name, r.text)
    assert c.get("/v1/jobs", headers=b).json()["total"] == 0

    ok = c.post("/v1/jobs", json={**LM_SPEC, "dataset": str(allowed / "corpus.txt")}, headers=b)
    assert ok.status_code == 201, ok.text
    # a tenant cannot hand the trainer a path either
    smuggled = {**LM_SPEC, "resolved": {"train": "/etc/passwd", "base_model": "tiny-gpt2"}}
    r = c.post("/v1/jobs", json=smuggled, headers=b)
    assert r.status_code == 422 and r.json()["errors"][0]["field"] == "body.resolved"


def test_trainer_spec_file_carries_resolved_paths(env):
    app, c, ray = env
    a = new_tenant(c, "acme")
    d = upload(c, a, "some text\nmore text\n", name="mine.txt").json()
    job = c.post("/v1/jobs", json={**LM_SPEC, "dataset": d["id"]}, headers=a).json()
    app.state.reconciler.reconcile_once()
    path = app.state.settings.job_dir(job["id"]) / "spec.json"
    spec = JobSpec.load(path)
    assert spec.dataset.train == d["id"]  # the tenant's name, for messages
    assert spec.data_path("train") == app.state.settings.datasets_dir("acme") / f"{d['id']}.txt"
    assert spec.model_location() == "tiny-gpt2"
    raw = json.loads(path.read_text())
    with pytest.raises(ValueError, match="resolved"):  # only the trainer's trusted read accepts it
        JobSpec.model_validate(raw)

    # the data set went away before the job reached Ray: the job fails, naming it, not reading elsewhere
    second = c.post("/v1/jobs", json={**LM_SPEC, "dataset": d["id"]}, headers=a).json()
    os.remove(spec.data_path("train"))
    app.state.reconciler.reconcile_once()
    j = c.get(f"/v1/jobs/{second['id']}", headers=a).json()
    assert j["state"] == "FAILED" and d["id"] in j["reason"] and "not found" in j["reason"]


def test_delete_refused_while_a_running_job_uses_it(env):
    app, c, ray = env
    a = new_tenant(c, "acme")
    d = upload(c, a, TSV).json()
    job = c.post(
        "/v1/jobs", json={**LM_SPEC, "task": "seq_cls", "base_model": "tiny-bert", "dataset": d["id"]}, headers=a
    )
    assert job.status_code == 201, job.text
    jid, sid = job.json()["id"], f"qpeft-{job.json()['id']}"
    rec = app.state.reconciler
    rec.reconcile_once()
    ray.emit(sid, {"type": "state", "sub_state": "TRAINING"})
    rec.reconcile_once()
    assert c.get(f"/v1/jobs/{jid}", headers=a).json()["state"] == "RUNNING"
    assert c.get(f"/v1/datasets/{d['id']}", headers=a).json()["used_by"] == [jid]
    r = c.delete(f"/v1/datasets/{d['id']}", headers=a)
    assert r.status_code == 409 and r.json()["jobs"] == [jid] and jid in r.json()["detail"]
    ray.emit(sid, {"type": "result", "state": "SUCCEEDED", "reason": "done"}, status="SUCCEEDED")
    rec.reconcile_once()
    assert c.delete(f"/v1/datasets/{d['id']}", headers=a).status_code == 204
    assert files_of(app, "acme") == []


def _tiny_checkpoint(folder):
    from qpeft_core.train.models import load_model

    model, tok = load_model("tiny-gpt2", device="cpu")
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def test_models_known_allowed_or_cached_hub_ids(tmp_path, sqlite_url, monkeypatch):  # noqa: F811
    """A hub id resolves offline from a hub cache the test builds itself (the layout huggingface_hub reads:
    models--org--name/refs/main naming a snapshot folder); HF_HUB_OFFLINE stays 1."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    models = tmp_path / "models"
    _tiny_checkpoint(models / "my-gpt2")
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--acme--tiny-gpt2"
    _tiny_checkpoint(repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    settings = make_settings(tmp_path / "data", sqlite_url, model_roots=[models], hub_cache=tmp_path / "hub")
    app = create_app(settings, ray=FakeRay(), reconcile=False)
    with TestClient(app) as c:
        a = new_tenant(c, "acme")
        for model in ("acme/tiny-gpt2", str(models / "my-gpt2")):
            r = c.post("/v1/jobs", json={**LM_SPEC, "base_model": model}, headers=a)
            assert r.status_code == 201, (model, r.text)
            assert r.json()["spec"]["method_config"]["target_modules"] == ["c_attn"]  # from its config.json
        app.state.reconciler.reconcile_once()
        jobs = c.get("/v1/jobs", headers=a).json()["items"]
        where = {JobSpec.load(settings.job_dir(j["id"]) / "spec.json").model_location() for j in jobs}
        assert where == {str(repo / "snapshots" / commit), str((models / "my-gpt2").resolve())}

        missing = "/no/such/model"
        want = c.post("/v1/jobs", json={**LM_SPEC, "base_model": missing}, headers=a)
        assert want.status_code == 422 and want.json()["errors"][0]["field"] == "body.base_model"
        for model in ["acme/not-cached", "/etc", str(tmp_path), str(settings.data_dir), "../models/my-gpt2", "x/../.."]:
            r = c.post("/v1/jobs", json={**LM_SPEC, "base_model": model}, headers=a)
            assert answer(r, model) == answer(want, missing), (model, r.text)


def test_loader_errors_name_row_and_column_not_cells(tmp_path):
    from qpeft_core.train.data import read_labeled, read_texts

    csv_file = tmp_path / "ds_0123456789abcdef.csv"
    csv_file.write_text(f"text,label,note\nfine,1,a\nbad,{SECRET},b\n")
    with pytest.raises(ValueError) as e:
        read_labeled(csv_file, name="ds_0123456789abcdef")
    assert "row 1" in str(e.value) and "'label'" in str(e.value) and "ds_0123456789abcdef" in str(e.value)
    assert SECRET not in str(e.value)
    private = tmp_path / "c.tsv"
    private.write_text(f"{SECRET}_col\tlabel\nx\t1\n")
    with pytest.raises(KeyError) as e:
        read_texts(private, text_field="text", name="mine")
    assert "'text'" in str(e.value) and SECRET not in str(e.value)  # the asked-for column, not the header
    bad_json = tmp_path / "d.jsonl"
    bad_json.write_text(f'{{"text": "a"}}\n{SECRET}\n')
    with pytest.raises(ValueError, match="line 2") as e:
        read_texts(bad_json, name="mine")
    assert SECRET not in str(e.value)


def test_cli_data_commands_and_upload_on_submit(tmp_path, sqlite_url):  # noqa: F811
    import httpx
    from typer.testing import CliRunner

    from services.cli import app as cli

    app = create_app(make_settings(tmp_path / "data", sqlite_url), ray=FakeRay(), reconcile=False)
    with LiveServer(app) as server, httpx.Client(base_url=server.url) as c:
        key = new_tenant(c, "acme")
        env = {"QPEFT_URL": server.url, "QPEFT_API_KEY": key["X-API-Key"], "COLUMNS": "200"}
        run = CliRunner().invoke
        data = tmp_path / "reviews.tsv"
        data.write_text(TSV)
        r = run(cli, ["data", "upload", str(data)], env=env)
        assert r.exit_code == 0 and "tsv, 3 rows, columns sentence, label" in r.output, r.output
        first = r.output.split()[2].rstrip(":")
        spec = tmp_path / "spec.yaml"
        spec.write_text(
            "base_model: tiny-bert\ntask: seq_cls\nmethod: lora\nmethod_config: {r: 2}\nmax_steps: 2\n"
            "dataset: {train: reviews.tsv, eval: " + first + "}\n"
        )
        r = run(cli, ["submit", str(spec)], env=env)  # reviews.tsv is relative to the spec's folder
        assert r.exit_code == 0 and "uploaded" in r.output, r.output
        job = c.get("/v1/jobs", headers=key).json()["items"][0]
        uploaded = job["spec"]["dataset"]["train"]
        assert uploaded.startswith("ds_") and uploaded != first and job["spec"]["dataset"]["eval"] == first
        r = run(cli, ["data", "ls"], env=env)
        assert r.exit_code == 0 and first in r.output and uploaded in r.output and job["id"] in r.output, r.output
        r = run(cli, ["data", "rm", uploaded], env=env)
        assert r.exit_code == 1 and "queued or running" in r.output
        c.post(f"/v1/jobs/{job['id']}/cancel", headers=key)
        app.state.reconciler.reconcile_once()  # no reconciler thread here: the cancelled job ends now
        assert run(cli, ["data", "rm", uploaded], env=env).exit_code == 0
        r = run(cli, ["data", "rm", first], env=env)
        assert r.exit_code == 0 and "deleted" in r.output, r.output
        r = run(cli, ["data", "rm", first], env=env)
        assert r.exit_code == 1 and "no data set" in r.output
