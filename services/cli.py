"""`qpeft`: the command line for the control plane (typer + rich).

Server: `qpeft serve` (embedded: SQLite + a local Ray head under the data dir; cluster: RAY_ADDRESS and
QPEFT_DATABASE_URL). Client commands talk to QPEFT_URL (default http://127.0.0.1:8000) with QPEFT_API_KEY.
"""

from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

app = typer.Typer(help="qpeft: hybrid quantum-classical fine-tuning service", no_args_is_help=True)
tenant_app = typer.Typer(help="Tenants (admin key)", no_args_is_help=True)
app.add_typer(tenant_app, name="tenant")
data_app = typer.Typer(help="My uploaded data sets", no_args_is_help=True)
app.add_typer(data_app, name="data")
out, err = Console(), Console(stderr=True)
FINAL = ("SUCCEEDED", "FAILED", "CANCELLED", "BUDGET_EXHAUSTED")


# --- HTTP ----------------------------------------------------------------------------------------
def _client():
    import httpx

    url = os.environ.get("QPEFT_URL", "http://127.0.0.1:8000").rstrip("/")
    key = os.environ.get("QPEFT_API_KEY")
    if not key:
        err.print("[red]set QPEFT_API_KEY[/red] (a tenant key; the admin key for `qpeft tenant`)")
        raise typer.Exit(2)
    return httpx.Client(base_url=url, headers={"X-API-Key": key}, timeout=httpx.Timeout(30.0, read=None))


def _check(r):
    if r.status_code < 400:
        return r
    try:
        body = r.json()
    except ValueError:
        body = {"detail": r.text}
    err.print(f"[red]error {r.status_code}:[/red] {body.get('detail')}")
    for e in body.get("errors") or []:
        if e.get("fix"):
            err.print(f"  {e.get('field') or '-'}: {e.get('message')} [dim]-> {e['fix']}[/dim]")
    raise typer.Exit(1)


def _call(method: str, path: str, **kw):
    import httpx

    try:
        with _client() as c:
            return _check(c.request(method, path, **kw)).json()
    except httpx.TransportError as e:
        err.print(f"[red]cannot reach {os.environ.get('QPEFT_URL', 'http://127.0.0.1:8000')}:[/red] {e}")
        raise typer.Exit(1) from None


def _sse(path: str):
    """(event, data) pairs of a Server-Sent Events stream, until it ends."""
    with _client() as c, c.stream("GET", path, headers={"Accept": "text/event-stream"}) as r:
        _check(r)
        name, data = "message", ""
        for line in r.iter_lines():
            if line.startswith("event: "):
                name = line[7:]
            elif line.startswith("data: "):
                data += line[6:]
            elif not line and data:
                yield name, json.loads(data)
                name, data = "message", ""


def load_spec(path: Path) -> dict:
    text = path.read_text()
    if path.suffix in (".yaml", ".yml"):
        import yaml

        class SpecLoader(yaml.SafeLoader):
            """YAML 1.1 reads 1e-3 (no dot) as a string, which the API's strict types refuse: read it as the
            number it means, as YAML 1.2 does."""

        exponent = re.compile(r"^[-+]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)[eE][-+]?[0-9]+$")
        SpecLoader.add_implicit_resolver("tag:yaml.org,2002:float", exponent, list("-+0123456789."))
        return yaml.load(text, Loader=SpecLoader)  # noqa: S506  (a SafeLoader)
    return json.loads(text)


def _fmt(v) -> str:
    if v is None:
        return "-"
    return f"{v:.4g}" if isinstance(v, float) else str(v)


# --- server --------------------------------------------------------------------------------------
@app.command()
def serve(
    host: Annotated[str, typer.Option(help="interface to listen on")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="port")] = 8000,
):
    """Run the control plane (API, dashboard at /dashboard/, reconciler)."""
    import uvicorn

    from services.control_plane.app import create_app
    from services.control_plane.settings import Settings

    settings = Settings.from_env()
    mode = "embedded (local Ray head, SQLite)" if settings.embedded else f"cluster (Ray at {settings.ray_address})"
    err.print(f"qpeft control plane: {mode}; data in {settings.data_dir}; http://{host}:{port}/dashboard/")
    # live streams (SSE, log follow) would hold a shutdown open as long as a client listens
    uvicorn.run(create_app(settings), host=host, port=port, log_level="info", timeout_graceful_shutdown=5)
    if settings.embedded:
        err.print("the local Ray head keeps running, so jobs survive a restart; `qpeft stop-ray` stops it")


@app.command("stop-ray")
def stop_ray():
    """Stop the local Ray head that `qpeft serve` started in embedded mode."""
    from services.control_plane.ray_jobs import stop_local_head
    from services.control_plane.settings import Settings

    settings = Settings.from_env()
    stopped = stop_local_head(settings.data_dir)
    out.print("stopped the local Ray head" if stopped else f"no local Ray head recorded in {settings.data_dir}")


# --- jobs ----------------------------------------------------------------------------------------
def upload_dataset(client, path: Path, fmt: str | None = None) -> dict:
    """POST the file as the request body, streamed from disk (its length first, so that an over-large file is
    refused before it is sent). Returns the data set (its id names it in a JobSpec)."""
    params = {"name": path.name} | ({"format": fmt} if fmt else {})
    headers = {"Content-Type": "application/octet-stream", "Content-Length": str(path.stat().st_size)}
    with open(path, "rb") as f:
        return _check(client.post("/v1/datasets", params=params, content=f, headers=headers)).json()


def _local_file(value, base: Path) -> Path | None:
    """A dataset value of a spec that names a file on this machine (relative to the spec's folder or here)."""
    from services.contract.jobspec import DATASET_ID, SHARED_DATASETS

    if not isinstance(value, str) or value in SHARED_DATASETS or DATASET_ID.fullmatch(value):
        return None
    for candidate in (base / value, Path(value).expanduser()):
        if candidate.is_file():
            return candidate
    return None


def upload_local_data(client, spec: dict, base: Path) -> dict:
    """The spec with each local file in dataset / dataset.train / dataset.eval uploaded and named by its id."""
    dataset = spec.get("dataset")
    dataset = {"train": dataset} if isinstance(dataset, str) else dict(dataset or {})
    changed = False
    for which in ("train", "eval"):
        path = _local_file(dataset.get(which), base)
        if path is not None:
            up = upload_dataset(client, path)
            err.print(f"uploaded {path} as data set {up['id']} ({up['rows']} rows)")
            dataset[which], changed = up["id"], True
    return {**spec, "dataset": dataset} if changed else spec


@app.command()
def submit(
    spec: Annotated[Path, typer.Argument(exists=True, dir_okay=False, help="JobSpec as YAML or JSON")],
    follow: Annotated[bool, typer.Option("--follow", "-f", help="show progress until the job ends")] = False,
    idempotency_key: Annotated[str | None, typer.Option(help="resubmitting with the same key is safe")] = None,
    upload: Annotated[
        bool, typer.Option(help="upload data files of this machine named in the spec first, and name their ids")
    ] = True,
):
    """Submit a job."""
    headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
    body = load_spec(spec)
    if upload:
        with _client() as c:
            body = upload_local_data(c, body, spec.parent)
    job = _call("POST", "/v1/jobs", json=body, headers=headers)
    out.print(f"job [bold]{job['id']}[/bold] {job['state']} (forecast: {_fmt(job['shots']['forecast'])} shots)")
    if follow:
        raise typer.Exit(_follow(job))


def _qpu(shots: dict) -> str:
    """'  QPU 12.3 s $19.68' once a job has spent QPU time (cost at the server's rate), else ''."""
    if not shots.get("qpu_seconds"):
        return ""
    return f"  QPU {shots['qpu_seconds']:.1f} s ${shots['cost_usd']:.2f}"


def _follow(job: dict) -> int:
    """A progress bar with loss and shots until the job is final; exit code 0 only for SUCCEEDED."""
    columns = [
        TextColumn("[bold]{task.fields[state]}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]}  shots {task.fields[shots]}{task.fields[qpu]}"),
        TimeElapsedColumn(),
    ]
    final = job
    with Progress(*columns, console=out, transient=False) as bar:
        task = bar.add_task(job["id"], total=job["max_steps"] or None, state=job["state"], loss="-", shots="0", qpu="")
        for name, data in _sse(f"/v1/jobs/{job['id']}/events"):
            if name == "job":
                final = data
                sub = f" {data['sub_state']}" if data.get("sub_state") else ""
                bar.update(task, state=data["state"] + sub, shots=_fmt(data["shots"]["spent"]), qpu=_qpu(data["shots"]))
            elif name == "progress":
                bar.update(task, completed=data["step"], loss=_fmt(data["loss"]), shots=_fmt(data["shots_spent"]))
            elif name == "end":
                final = {**final, **data}
                break
    colour = "green" if final["state"] == "SUCCEEDED" else "red"
    out.print(f"[{colour}]{final['state']}[/{colour}]: {final.get('reason') or ''}")
    return 0 if final["state"] == "SUCCEEDED" else 1


@app.command()
def jobs(
    state: Annotated[str | None, typer.Option(help="only jobs in this state")] = None,
    limit: Annotated[int, typer.Option(help="how many")] = 20,
):
    """List my jobs, newest first."""
    params = {"limit": limit} | ({"state": state} if state else {})
    page = _call("GET", "/v1/jobs", params=params)
    table = Table("id", "name", "state", "step", "loss", "shots", "created")
    for j in page["items"]:
        st = j["state"] + (f" ({j['sub_state']})" if j.get("sub_state") else "")
        table.add_row(
            j["id"],
            j["name"] or "",
            st,
            f"{j['step']}/{j['max_steps']}",
            _fmt(j["loss"]),
            _fmt(j["shots"]["spent"]),
            j["created_at"][:19],
        )
    out.print(table)
    out.print(f"{len(page['items'])} of {page['total']}")


@app.command()
def logs(
    job_id: str,
    follow: Annotated[bool, typer.Option("--follow", "-f", help="keep printing until the job ends")] = False,
    tail: Annotated[int, typer.Option(help="last N lines")] = 100,
):
    """Print a job's log."""
    if not follow:
        for line in _call("GET", f"/v1/jobs/{job_id}/logs", params={"tail": tail})["lines"]:
            print(line["line"])
        return
    with _client() as c, c.stream("GET", f"/v1/jobs/{job_id}/logs", params={"follow": True, "tail": tail}) as r:
        _check(r)
        for line in r.iter_lines():
            print(line, flush=True)


@app.command()
def cancel(job_id: str):
    """Cancel a queued or running job."""
    job = _call("POST", f"/v1/jobs/{job_id}/cancel")
    out.print(f"job {job['id']}: cancellation requested ({job['state']})")


@app.command()
def budget():
    """My shot and QPU-time budget."""
    b = _call("GET", "/v1/budget")
    table = Table("", "limit", "spent", "lost", "reserved", "remaining", title=f"budget of {b['tenant']}")
    s, q = b["shots"], b["qpu_seconds"]
    table.add_row(
        "shots", _fmt(s["limit"]), _fmt(s["spent"]), _fmt(s["lost"]), _fmt(s["reserved"]), _fmt(s["remaining"])
    )
    table.add_row("QPU s", _fmt(q["limit"]), _fmt(q["spent"]), "", _fmt(q["reserved"]), _fmt(q["remaining"]))
    out.print(table)


@app.command()
def estimate(spec: Annotated[Path, typer.Argument(exists=True, dir_okay=False, help="JobSpec as YAML or JSON")]):
    """Forecast the shots (and QPU seconds) a job will need."""
    e = _call("POST", "/v1/estimate", json=load_spec(spec))
    out.print(f"[bold]{e['shots']:,}[/bold] shots over {e['circuits']:,} circuits ({e['max_steps']} steps)")
    if e["qpu_seconds"] is not None:
        out.print(
            f"about {e['qpu_seconds']:.1f} s of QPU time: {e['jobs']} jobs x {e['seconds_per_job']:.1f} s fixed + "
            f"{e['shots']:,} shots x {e['seconds_per_shot'] * 1e6:.1f} us"
            + (f", about ${e['cost_usd']:,.2f}" if e.get("cost_usd") is not None else "")
        )
    out.print(e["formula"])
    out.print(f"[dim]{e['explanation']}[/dim]")
    left = "unlimited" if e["budget_remaining"] is None else f"{e['budget_remaining']:,}"
    verdict = "[green]fits[/green]" if e["fits_budget"] else "[red]exceeds[/red]"
    out.print(f"{verdict} the budget ({left} shots left)")


@app.command()
def backends():
    """Executors available to JobSpec.executor."""
    table = Table("executor", "kind", "qubits", "status")
    for b in _call("GET", "/v1/backends"):
        table.add_row(b["spec"], b["kind"], str(b["qubits"]), b["status"])
    out.print(table)


@data_app.command("upload")
def data_upload(
    file: Annotated[Path, typer.Argument(exists=True, dir_okay=False, help="a .txt, .tsv, .csv or .jsonl file")],
    format: Annotated[str | None, typer.Option(help="text, tsv, csv or jsonl (default: from the suffix)")] = None,
):
    """Upload a data set; name its id in a spec's dataset."""
    with _client() as c:
        d = upload_dataset(c, file, format)
    columns = ", ".join(col["name"] for col in d["columns"]) if d["columns"] else "-"
    out.print(f"data set [bold]{d['id']}[/bold]: {d['format']}, {d['rows']} rows, columns {columns}")
    out.print(f"sha256 {d['sha256']}")


@data_app.command("ls")
def data_ls():
    """List my data sets."""
    page = _call("GET", "/v1/datasets", params={"limit": 200})
    table = Table("id", "name", "format", "rows", "bytes", "used by", "created")
    for d in page["items"]:
        used = ", ".join(d["used_by"])
        table.add_row(d["id"], d["name"], d["format"], str(d["rows"]), str(d["size_bytes"]), used, d["created_at"][:19])
    out.print(table)
    out.print(f"{len(page['items'])} of {page['total']}")


@data_app.command("rm")
def data_rm(dataset_id: str):
    """Delete a data set (refused while a queued or running job names it)."""
    import httpx

    with _client() as c:
        try:
            _check(c.delete(f"/v1/datasets/{dataset_id}"))
        except httpx.TransportError as e:
            err.print(f"[red]cannot reach the server:[/red] {e}")
            raise typer.Exit(1) from None
    out.print(f"deleted data set {dataset_id}")


@tenant_app.command("create")
def tenant_create(
    name: str,
    shots: Annotated[int | None, typer.Option(help="shot budget (default: unlimited)")] = None,
    qpu_seconds: Annotated[float | None, typer.Option(help="QPU-time budget (default: unlimited)")] = None,
):
    """Create a tenant and print its first API key (shown once)."""
    t = _call("POST", "/v1/tenants", json={"name": name, "shots": shots, "qpu_seconds": qpu_seconds})
    out.print(f"tenant {t['tenant']}: API key {t['api_key']}  (shown once)")


@tenant_app.command("budget")
def tenant_budget(
    name: str,
    shots: Annotated[int | None, typer.Option(help="shot budget (omit: unlimited)")] = None,
    qpu_seconds: Annotated[float | None, typer.Option(help="QPU-time budget (omit: unlimited)")] = None,
):
    """Set a tenant's budget."""
    b = _call("PUT", f"/v1/tenants/{name}/budget", json={"shots": shots, "qpu_seconds": qpu_seconds})
    out.print(f"{name}: {_fmt(b['shots']['limit'])} shots, {_fmt(b['qpu_seconds']['limit'])} QPU s")


@app.command()
def demo(
    model: Annotated[
        str, typer.Option(help="base model the server knows (tiny-gpt2 for a quick check)")
    ] = "smollm2-135m",
    corpus: Annotated[
        Path | None,
        typer.Option(exists=True, dir_okay=False, help="a local text file to train on (default: WikiText-2's valid)"),
    ] = None,
    eval_data: Annotated[str, typer.Option("--eval", help="held-out data set id or shared name")] = "wikitext-2-test",
    steps: Annotated[int, typer.Option(help="steps of the exact job")] = 10,
    quick: Annotated[bool, typer.Option(help="shorter blocks and fewer Aer steps")] = False,
    device: Annotated[str, typer.Option(help="where the downloaded LoRA generates text")] = "cpu",
):
    """The service part of `make demo` against the server at QPEFT_URL, as the tenant of QPEFT_API_KEY: uploads
    a local text file, runs a QPA job on Aer with shots and one on the exact executor, follows both, downloads
    the LoRA artifact and generates from it with plain transformers + peft. (`make demo` runs the whole demo,
    library and service, on an embedded server of its own.)"""
    import tempfile

    from services.contract.jobspec import shared_data_dir
    from services.demo import run_jobs

    corpus = corpus or shared_data_dir() / "wikitext-2" / "valid.txt"
    if not corpus.is_file():
        raise typer.BadParameter(f"{corpus} is not a file; name a local text file with --corpus", param_hint="--corpus")
    work = Path(tempfile.mkdtemp(prefix="qpeft-demo-"))
    with _client() as c:
        run_jobs(c, out, model, corpus, work, device, steps, quick, eval_data=eval_data)


def main() -> None:
    app()


if __name__ == "__main__":
    sys.exit(main())
