// qpeft dashboard: plain JS, no dependencies (it must work without internet access).
// Live updates come over Server-Sent Events read with fetch(), because EventSource cannot send the
// API key header (and keys do not belong in URLs, which end up in logs).
"use strict";

const $ = (sel) => document.querySelector(sel);
const state = { jobs: [], jobId: null, job: null, points: [], jobStream: null, listStream: null, rayUrl: null };

function apiKey() { return localStorage.getItem("qpeftKey") || ""; }

async function api(path, opts = {}) {
  const r = await fetch(path, { ...opts, headers: { "X-API-Key": apiKey(), ...(opts.headers || {}) } });
  if (!r.ok) throw new Error(`${r.status} ${path}`);
  return r;
}

// Reads an SSE stream, calling onEvent(name, data) per event; reconnects after errors until aborted.
function stream(path, onEvent, onEnd) {
  const ctl = new AbortController();
  const run = async () => {
    while (!ctl.signal.aborted) {
      try {
        const r = await api(path, { signal: ctl.signal, headers: { Accept: "text/event-stream" } });
        setConn(true);
        const reader = r.body.getReader();
        const dec = new TextDecoder();
        let buf = "";
        for (;;) {
          const { value, done } = await reader.read();
          if (done) break;
          buf += dec.decode(value, { stream: true });
          let cut;
          while ((cut = buf.indexOf("\n\n")) >= 0) {
            const block = buf.slice(0, cut);
            buf = buf.slice(cut + 2);
            let name = "message", data = "";
            for (const line of block.split("\n")) {
              if (line.startsWith("event: ")) name = line.slice(7);
              else if (line.startsWith("data: ")) data += line.slice(6);
            }
            if (data) onEvent(name, JSON.parse(data));
            if (name === "end") { if (onEnd) onEnd(); return; }
          }
        }
      } catch (e) {
        if (ctl.signal.aborted) return;
        setConn(false);
      }
      await new Promise((ok) => setTimeout(ok, 2000));
    }
  };
  run();
  return ctl;
}

function setConn(on) {
  const el = $("#conn");
  el.className = "conn " + (on ? "on" : "off");
  el.textContent = on ? "live" : "offline";
}

function fmt(n) {
  if (n === null || n === undefined) return "-";
  if (typeof n !== "number") return String(n);
  if (Math.abs(n) >= 1e6) return (n / 1e6).toFixed(2) + "M";
  if (Math.abs(n) >= 1e4) return (n / 1e3).toFixed(1) + "k";
  return Number.isInteger(n) ? String(n) : n.toPrecision(4);
}

// --- job list ------------------------------------------------------------------------------------
function renderJobs() {
  const body = $("#jobs tbody");
  body.replaceChildren();
  for (const j of state.jobs) {
    const tr = document.createElement("tr");
    tr.dataset.jobId = j.id;
    if (j.id === state.jobId) tr.className = "selected";
    const cells = [
      j.name || j.id,
      null,
      `${j.step}/${j.max_steps}`,
      fmt(j.loss),
      fmt(j.shots.spent),
    ];
    cells.forEach((text, i) => {
      const td = document.createElement("td");
      if (i === 1) {
        const s = document.createElement("span");
        s.className = `state ${j.state}`;
        s.textContent = j.state + (j.sub_state ? ` · ${j.sub_state}` : "");
        td.appendChild(s);
      } else {
        td.textContent = text;
      }
      if (i === 0) td.title = j.id;
      tr.appendChild(td);
    });
    tr.addEventListener("click", () => { location.hash = `job=${j.id}`; });
    body.appendChild(tr);
  }
  $("#no-jobs").hidden = state.jobs.length > 0;
}

// --- data sets -----------------------------------------------------------------------------------
async function loadDatasets() {
  try {
    const page = await (await api("/v1/datasets?limit=200")).json();
    const body = $("#datasets tbody");
    body.replaceChildren();
    for (const d of page.items) {
      const tr = document.createElement("tr");
      tr.dataset.datasetId = d.id;
      const cells = [`${d.name} · ${d.id}`, d.format, fmt(d.rows), `${fmt(d.size_bytes)} B`, d.used_by.join(", ") || "-"];
      for (const text of cells) {
        const td = document.createElement("td");
        td.textContent = text;
        tr.appendChild(td);
      }
      tr.title = `sha256 ${d.sha256}`;
      body.appendChild(tr);
    }
    $("#no-datasets").hidden = page.items.length > 0;
  } catch (e) { /* no key yet */ }
}

// QPU seconds and their cost beside the shots; "estimated" where no provider reported the time.
function qpuText(q) {
  if (!q.qpu_seconds && q.qpu_seconds_forecast === null) return "-";
  const est = q.qpu_seconds > 0 && q.qpu_seconds_estimated >= q.qpu_seconds ? " (estimated)" : "";
  let t = `${q.qpu_seconds.toFixed(1)} s${est}, $${q.cost_usd.toFixed(2)}`;
  if (q.qpu_seconds_forecast !== null) {
    t += `; forecast ${q.qpu_seconds_forecast.toFixed(1)} s, $${(q.cost_usd_forecast ?? 0).toFixed(2)}`;
  }
  if (q.qpu_seconds_limit !== null) t += `; limit ${q.qpu_seconds_limit} s`;
  return t;
}

async function loadBudget() {
  try {
    const b = await (await api("/v1/budget")).json();
    const s = b.shots;
    const used = s.spent + s.lost + s.reserved;
    $("#budget-text").textContent = s.limit === null
      ? `shots spent: ${fmt(used)} (no limit)`
      : `shots: ${fmt(used)} / ${fmt(s.limit)}`;
    $("#budget-bar").style.width = s.limit ? `${Math.min(100, (100 * used) / s.limit)}%` : "0";
  } catch (e) { /* no key yet */ }
}

// The API gives the Ray dashboard's URL to the admin key only (it has no login and takes job submissions):
// a tenant's page never shows it.
async function loadInfo() {
  try {
    const info = await (await api("/v1/info")).json();
    state.rayUrl = info.ray_dashboard_url;
    if (state.rayUrl) {
      const a = $("#ray-link");
      a.href = state.rayUrl;
      a.hidden = false;
    }
  } catch (e) { /* no key yet */ }
}

// --- one job -------------------------------------------------------------------------------------
function selectJob(id) {
  if (state.jobStream) state.jobStream.abort();
  state.jobId = id;
  state.points = [];
  state.job = null;
  $("#log").textContent = "";
  $("#job-pane").hidden = !id;
  renderJobs();
  if (!id) return;
  $("#job-title").textContent = `Job ${id}`;
  state.jobStream = stream(`/v1/jobs/${id}/events`, onJobEvent, () => loadArtifacts(id));
}

function onJobEvent(name, data) {
  if (name === "job") {
    state.job = data;
    renderJobMeta();
    loadArtifacts(data.id);
  } else if (name === "progress") {
    state.points.push(data);
    drawCharts();
  } else if (name === "log") {
    const log = $("#log");
    const atEnd = log.scrollTop + log.clientHeight >= log.scrollHeight - 4;
    log.textContent += data.line + "\n";
    if (log.textContent.length > 200000) log.textContent = log.textContent.slice(-150000);
    if (atEnd) log.scrollTop = log.scrollHeight;
  }
}

function renderJobMeta() {
  const j = state.job;
  const meta = $("#job-meta");
  meta.replaceChildren();
  const items = [
    ["state", j.state + (j.sub_state ? ` (${j.sub_state})` : "")],
    ["reason", j.reason || "-"],
    ["method", `${j.spec.method} on ${j.spec.base_model}`],
    ["trainable", j.parameters
      ? `${j.parameters.trainable.toLocaleString("en")} of ${j.parameters.total.toLocaleString("en")} parameters`
      : "-"],
    ["executor", j.spec.executor + (j.spec.shots ? ` × ${j.spec.shots} shots` : "")],
    ["step", `${j.step} / ${j.max_steps}`],
    ["shots", `${fmt(j.shots.spent)} spent, forecast ${fmt(j.shots.forecast)}` +
      (j.shots.limit !== null ? `, limit ${fmt(j.shots.limit)}` : "")],
    ["QPU time", qpuText(j.shots)],
  ];
  for (const [k, v] of items) {
    const span = document.createElement("span");
    const b = document.createElement("b");
    b.textContent = k + ": ";
    span.append(b, document.createTextNode(v));
    span.dataset.field = k;
    meta.appendChild(span);
  }
  $("#job-title").textContent = `Job ${j.name ? j.name + " · " : ""}${j.id}`;
  $("#cancel").hidden = !(j.state === "QUEUED" || j.state === "RUNNING");
  drawCharts();
}

// A small line chart in SVG: series = [{cls, pts: [[x, y], ...]}], optional horizontal limit.
function chart(svg, series, limit) {
  const W = 480, H = 220, L = 52, R = 10, T = 10, B = 26;
  svg.replaceChildren();
  const all = series.flatMap((s) => s.pts);
  const ys = all.map((p) => p[1]).concat(limit ? [limit] : []);
  const xs = all.map((p) => p[0]);
  const ns = "http://www.w3.org/2000/svg";
  const el = (tag, attrs) => {
    const e = document.createElementNS(ns, tag);
    for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, v);
    svg.appendChild(e);
    return e;
  };
  el("line", { x1: L, y1: H - B, x2: W - R, y2: H - B, class: "axis" });
  el("line", { x1: L, y1: T, x2: L, y2: H - B, class: "axis" });
  if (!all.length) {
    el("text", { x: L + 10, y: H / 2 }).textContent = "waiting for data…";
    return;
  }
  let [x0, x1] = [Math.min(...xs), Math.max(...xs)];
  let [y0, y1] = [Math.min(...ys), Math.max(...ys)];
  if (x1 === x0) x1 = x0 + 1;
  if (y1 === y0) { y1 += Math.abs(y1) * 0.1 || 1; y0 -= Math.abs(y0) * 0.1 || 1; }
  const sx = (x) => L + ((x - x0) / (x1 - x0)) * (W - L - R);
  const sy = (y) => H - B - ((y - y0) / (y1 - y0)) * (H - T - B);
  el("text", { x: 4, y: T + 8 }).textContent = fmt(y1);
  el("text", { x: 4, y: H - B }).textContent = fmt(y0);
  el("text", { x: L, y: H - 8 }).textContent = `step ${fmt(x0)}`;
  el("text", { x: W - R - 60, y: H - 8 }).textContent = `step ${fmt(x1)}`;
  if (limit) el("line", { x1: L, y1: sy(limit), x2: W - R, y2: sy(limit), class: "limit" });
  for (const s of series) {
    if (!s.pts.length) continue;
    const pl = el("polyline", { class: s.cls, points: s.pts.map(([x, y]) => `${sx(x)},${sy(y)}`).join(" ") });
    pl.dataset.points = String(s.pts.length);
  }
}

function evalValue(e) {
  if (!e) return null;
  for (const k of ["loss", "eval_loss", "perplexity", "accuracy"]) if (typeof e[k] === "number") return e[k];
  const first = Object.values(e).find((v) => typeof v === "number");
  return first === undefined ? null : first;
}

function drawCharts() {
  const pts = state.points;
  const loss = pts.filter((p) => p.loss !== null).map((p) => [p.step, p.loss]);
  const ev = pts.map((p) => [p.step, evalValue(p.eval)]).filter((p) => p[1] !== null);
  chart($("#loss-chart"), [{ cls: "loss", pts: loss }, { cls: "eval", pts: ev }]);
  const shots = pts.map((p) => [p.step, p.shots_spent]);
  const j = state.job;
  const cap = j ? (j.shots.limit ?? j.shots.forecast) : null;
  chart($("#shots-chart"), [{ cls: "shots", pts: shots }], cap || null);
}

async function loadArtifacts(id) {
  try {
    const list = await (await api(`/v1/jobs/${id}/artifacts`)).json();
    const ul = $("#artifacts");
    ul.replaceChildren();
    if (!list.length) {
      const li = document.createElement("li");
      li.className = "muted";
      li.textContent = "none yet";
      ul.appendChild(li);
    }
    for (const a of list) {
      const li = document.createElement("li");
      const link = document.createElement("a");
      link.href = a.url;
      link.textContent = a.name + (a.kind === "directory" ? " (.zip)" : ` (${fmt(a.size)} bytes)`);
      link.addEventListener("click", (ev) => { ev.preventDefault(); download(a); });
      li.appendChild(link);
      ul.appendChild(li);
    }
  } catch (e) { /* job gone or no key */ }
}

// Downloads go through fetch so the key travels in a header, then hand the browser a blob.
async function download(a) {
  const blob = await (await api(a.url)).blob();
  const link = document.createElement("a");
  link.href = URL.createObjectURL(blob);
  link.download = a.kind === "directory" ? `${a.name}.zip` : a.name;
  link.click();
  setTimeout(() => URL.revokeObjectURL(link.href), 10000);
}

// --- start ---------------------------------------------------------------------------------------
function route() {
  const params = new URLSearchParams(location.hash.slice(1));
  if (params.get("key")) {  // a key passed in the fragment (never sent to a server): keep it, hide it
    localStorage.setItem("qpeftKey", params.get("key"));
    params.delete("key");
    history.replaceState(null, "", location.pathname + (params.toString() ? "#" + params : ""));
  }
  const id = params.get("job");
  if (id !== state.jobId) selectJob(id);
}

function start() {
  if (state.listStream) state.listStream.abort();
  if (!apiKey()) { setConn(false); return; }
  loadInfo();
  loadBudget();
  loadDatasets();
  clearInterval(state.datasetTimer);
  state.datasetTimer = setInterval(loadDatasets, 10000);  // uploads change no job: poll for them
  state.listStream = stream("/v1/events", (name, data) => {
    if (name !== "jobs") return;
    state.jobs = data;
    renderJobs();
    loadBudget();
    loadDatasets();  // "used by" follows the jobs
  });
}

$("#key-form").addEventListener("submit", (ev) => {
  ev.preventDefault();
  localStorage.setItem("qpeftKey", $("#api-key").value.trim());
  $("#api-key").value = "";
  start();
  if (state.jobId) selectJob(state.jobId);
});
$("#cancel").addEventListener("click", async () => {
  if (state.jobId) await api(`/v1/jobs/${state.jobId}/cancel`, { method: "POST" });
});
window.addEventListener("hashchange", route);
route();
start();
