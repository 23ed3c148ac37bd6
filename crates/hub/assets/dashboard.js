// The hub's dashboard: renders the snapshots of /v1/dashboard/events (one a second) without a
// reload; charts are drawn on canvases from the hub's sampled counters. No dependencies.
"use strict";

const $ = (id) => document.getElementById(id);
const short = (a) => (a ? String(a).slice(0, 10) + "…" : "");
const num = (n) => (n === null || n === undefined ? "–" : Number(n).toLocaleString("en-US"));

function cell(text, cls) {
  const td = document.createElement("td");
  td.textContent = text;
  if (cls) td.className = cls;
  return td;
}

function fill(tableId, rows, render) {
  const body = $(tableId).querySelector("tbody");
  const fresh = document.createDocumentFragment();
  for (const row of rows) {
    const tr = document.createElement("tr");
    for (const [text, cls] of render(row)) tr.appendChild(cell(text, cls));
    if (row.id !== undefined) tr.dataset.id = row.id;
    if (row.address !== undefined) tr.dataset.address = String(row.address).toLowerCase();
    fresh.appendChild(tr);
  }
  body.replaceChildren(fresh);
}

// Per-interval rates from cumulative samples.
function rates(series, field) {
  const out = [];
  for (let i = 1; i < series.length; i++) {
    const dt = Math.max(1, series[i].t - series[i - 1].t);
    out.push((series[i][field] - series[i - 1][field]) / dt);
  }
  return out;
}

function passRate(series) {
  return series.map((p) => (p.passed + p.failed > 0 ? p.passed / (p.passed + p.failed) : 1));
}

function chart(canvasId, values, color, fixedMax) {
  const c = $(canvasId);
  const g = c.getContext("2d");
  const w = c.width, h = c.height, pad = 18;
  g.clearRect(0, 0, w, h);
  g.fillStyle = "#ffffff";
  g.fillRect(0, 0, w, h);
  g.strokeStyle = "#e3e6ec";
  g.lineWidth = 1;
  g.beginPath();
  g.moveTo(pad, h - pad);
  g.lineTo(w - 4, h - pad);
  g.moveTo(pad, 4);
  g.lineTo(pad, h - pad);
  g.stroke();
  c.dataset.points = String(values.length);
  if (values.length === 0) return;
  const max = fixedMax || Math.max(1e-9, ...values);
  g.fillStyle = "#6b7385";
  g.font = "10px sans-serif";
  g.fillText(max >= 10 ? Math.round(max).toString() : max.toFixed(2), 2, 12);
  g.strokeStyle = color;
  g.lineWidth = 2;
  g.beginPath();
  values.forEach((v, i) => {
    const x = pad + ((w - pad - 6) * i) / Math.max(1, values.length - 1);
    const y = h - pad - ((h - pad - 8) * v) / max;
    if (i === 0) g.moveTo(x, y);
    else g.lineTo(x, y);
  });
  g.stroke();
}

function render(s) {
  const t = s.totals;
  $("t-jobs").textContent = num(t.jobs);
  $("t-tokens").textContent = num(t.tokens);
  $("t-spend").textContent = num(t.spend);
  $("t-checks").textContent = num(t.verifications_passed) + " / " + num(t.verifications_failed);
  $("t-slashed").textContent = num(t.slashed);
  $("t-ledger").textContent = num(s.ledger.escrow) + " / " + num(s.ledger.stake);
  if (s.chain) {
    $("t-chain").textContent =
      num(s.chain.vault_holdings) + (s.chain.reconciled ? " ✓ reconciled" : " ✗ not reconciled");
  }
  fill("providers", s.providers, (p) => [
    [short(p.address), "addr"],
    [p.model || ""],
    [num(p.price_per_token)],
    [num(p.stake)],
    [Number(p.reputation || 0).toFixed(2)],
    [num(p.jobs)],
    [num(p.verified_passed) + " / " + num(p.verified_failed)],
    [num(p.slashed)],
    p.quarantined ? ["quarantined", "quarantined"] : [p.connected ? "live" : "offline", p.connected ? "live-ok" : "muted"],
  ]);
  fill("jobs", s.jobs, (j) => [
    [j.id, "addr"],
    [short(j.provider), "addr"],
    [j.model],
    [num(j.tokens)],
    [num(j.cost)],
    [j.verification, j.verification],
    [j.label || ""],
  ]);
  fill("slashes", s.slashes, (x) => [[short(x.provider), "addr"], [num(x.amount)], [x.reason]]);
  fill("tasks", s.tasks.recent, (x) => [[short(x.id), "addr"], [x.kind || ""], [num(x.bounty)], [x.state]]);
  $("task-states").textContent = Object.entries(s.tasks.states).map(([k, v]) => k + ": " + v).join(" · ");
  fill("runs", s.runs, (r) => [[r.label], [num(r.jobs)], [num(r.tokens)], [num(r.cost)], [num(r.failed)]]);
  chart("chart-throughput", rates(s.series, "tokens"), "#3b5bdb");
  chart("chart-spend", rates(s.series, "spend"), "#e67700");
  chart("chart-verification", passRate(s.series), "#1f8a4c", 1);
  document.body.dataset.updates = String(Number(document.body.dataset.updates || 0) + 1);
}

function connect() {
  const events = new EventSource("/v1/dashboard/events");
  events.addEventListener("snapshot", (e) => {
    $("status").textContent = "live";
    $("status").className = "status live";
    render(JSON.parse(e.data));
  });
  events.onerror = () => {
    $("status").textContent = "reconnecting…";
    $("status").className = "status";
  };
}

connect();
