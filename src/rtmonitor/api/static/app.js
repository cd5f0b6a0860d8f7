// RealTimeDataMonitor dashboard: GET /metrics for the table, GET /stream (Server-Sent
// Events) for live updates. No framework, no build step. With an auth file the reads answer
// 401 until POST /login has set the session cookie (HttpOnly: this script never holds the
// token; EventSource cannot send an Authorization header, but it sends the cookie).
"use strict";

const state = { sort: "packets", order: "desc", prefix: "", devices: new Map(),
                selected: null, totalSeries: [], deviceSeries: new Map(), source: null };
const $ = (id) => document.getElementById(id);
const fmt = new Intl.NumberFormat("en");
const fmtRate = (x) => (x >= 100 ? fmt.format(Math.round(x)) : x.toFixed(1));
const fmtBytes = (n) => {
  const units = ["B", "KB", "MB", "GB", "TB"]; let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
  return `${i ? n.toFixed(1) : n} ${units[i]}`;
};
const ago = (ms) => {
  if (!ms) return "–";
  const s = Math.max(0, (Date.now() - ms) / 1000);
  return s < 60 ? `${s.toFixed(0)} s ago` : s < 3600 ? `${(s / 60).toFixed(0)} min ago` : `${(s / 3600).toFixed(1)} h ago`;
};
// Packets/s over the shortest window the API reports: the windows are defined once, on the
// server, and named in the JSON as packets_per_s_<seconds>s.
const packetRate = (rate) => {
  let best = 0, window = Infinity;
  for (const [key, value] of Object.entries(rate)) {
    const m = /^packets_per_s_(\d+)s$/.exec(key);
    if (m && Number(m[1]) < window) { window = Number(m[1]); best = value; }
  }
  return best;
};
const escapeHtml = (s) => s.replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" })[c]);

function renderTotals(t) {
  $("t-devices").textContent = fmt.format(t.devices);
  $("t-packets").textContent = fmt.format(t.packets);
  $("t-bytes").textContent = fmtBytes(t.bytes);
  $("t-rate").textContent = fmtRate(packetRate(t.rate));
  $("t-rejected").textContent = fmt.format(t.rejected);
}

function rowHtml(d) {
  return `<td>${escapeHtml(d.device_id)}</td>` +
    `<td><span class="dot ${d.online ? "on" : ""}"></span>${d.online ? "online" : "offline"}</td>` +
    `<td class="num packets">${fmt.format(d.packets)}</td><td class="num">${fmtBytes(d.bytes)}</td>` +
    `<td class="num">${fmtRate(packetRate(d.rate))}</td><td class="num">${ago(d.last_seen)}</td>`;
}

function renderTable() {
  const body = document.querySelector("#devices tbody");
  body.innerHTML = "";
  for (const d of state.devices.values()) {
    const tr = document.createElement("tr");
    tr.dataset.device = d.device_id;
    tr.innerHTML = rowHtml(d);
    if (d.device_id === state.selected) tr.classList.add("selected");
    tr.addEventListener("click", () => select(d.device_id));
    body.appendChild(tr);
  }
  document.querySelectorAll("th[data-sort]").forEach((th) => {
    th.classList.toggle("sorted", th.dataset.sort === state.sort);
    th.classList.toggle("asc", state.order === "asc");
  });
}

async function load() {
  const params = new URLSearchParams({ sort: state.sort, order: state.order, limit: "200" });
  if (state.prefix) params.set("prefix", state.prefix);
  const get = () => fetch(`/metrics?${params}`, { headers: { Accept: "application/json" } });
  let r = await get();
  let note = "", why = "";
  if (r.status === 400 && state.sort !== "device_id") {
    // too many matches to rank by a number (--prefix-sort-max-devices): list them by id
    why = (await r.json()).detail;
    note = " · too many to rank: listed by id";
    params.set("sort", "device_id"); params.set("order", "asc");
    r = await get();
  }
  if (r.status === 401 || r.status === 403) { showLogin(r.status === 403 ? (await r.json()).detail : ""); return false; }
  if (!r.ok) return true;
  const page = await r.json();
  state.devices = new Map(page.devices.map((d) => [d.device_id, d]));
  $("matched").textContent = `${fmt.format(page.matched)} matching${note}`;
  $("matched").title = why;
  renderTotals(page.totals);
  renderTable();
  if (state.selected) renderDetail(state.devices.get(state.selected));
  return true;
}

function showLogin(message) {
  if (state.source) { state.source.close(); state.source = null; }
  $("live").textContent = "logged out"; $("live").className = "badge off";
  $("login").hidden = false;
  $("login-error").textContent = message || "";
}

$("login").addEventListener("submit", async (e) => {
  e.preventDefault();
  const r = await fetch("/login", { method: "POST", headers: { "Content-Type": "application/json" },
                                    body: JSON.stringify({ token: $("token").value }) });
  $("token").value = "";
  if (!r.ok) { $("login-error").textContent = (await r.json()).detail || `error ${r.status}`; return; }
  $("login").hidden = true;
  if (await load()) connect();
});

function applyUpdate(update) {
  renderTotals(update.totals);
  if (update.lagged) load();  // some changes could not be kept for this stream: re-read
  const now = Date.now();
  state.totalSeries.push([now, packetRate(update.totals.rate)]);
  for (const d of update.devices) {
    const series = state.deviceSeries.get(d.device_id) || [];
    series.push([now, packetRate(d.rate)]);
    state.deviceSeries.set(d.device_id, series.slice(-300));
    if (!state.devices.has(d.device_id)) continue;  // not on this page
    state.devices.set(d.device_id, d);
    const tr = document.querySelector(`tr[data-device="${CSS.escape(d.device_id)}"]`);
    if (tr) { tr.innerHTML = rowHtml(d); tr.classList.remove("flash"); void tr.offsetWidth; tr.classList.add("flash"); }
    if (d.device_id === state.selected) renderDetail(d);
  }
  const cutoff = now - 5 * 60 * 1000;
  state.totalSeries = state.totalSeries.filter(([t]) => t >= cutoff);
  drawChart($("total-chart"), state.totalSeries);
}

function connect() {
  if (state.source) state.source.close();
  const params = state.prefix ? `?prefix=${encodeURIComponent(state.prefix)}` : "";
  const source = new EventSource(`/stream${params}`);
  source.addEventListener("open", () => { $("live").textContent = "live"; $("live").className = "badge on"; });
  source.addEventListener("error", () => { $("live").textContent = "reconnecting…"; $("live").className = "badge off"; });
  source.addEventListener("update", (e) => applyUpdate(JSON.parse(e.data)));
  state.source = source;
}

async function select(id) {
  state.selected = id;
  renderTable();
  const r = await fetch(`/metrics/${encodeURIComponent(id).replace(/%2F/g, "/")}`);
  if (r.ok) renderDetail(await r.json());
}

function renderDetail(d) {
  if (!d) return;
  $("detail").hidden = false;
  $("d-title").textContent = d.device_id;
  $("d-summary").textContent = `${d.online ? "online" : "offline"} · ${fmt.format(d.packets)} packets · ` +
    `${fmtBytes(d.bytes)} · ${fmtRate(packetRate(d.rate))} packets/s · first seen ${ago(d.first_seen)}`;
  $("d-kinds").querySelector("tbody").innerHTML = Object.entries(d.kinds)
    .map(([k, n]) => `<tr><td>${escapeHtml(k)}</td><td class="num">${fmt.format(n)}</td></tr>`).join("");
  const num = (x) => (x === null || x === undefined ? "–" : Number(x).toPrecision(6).replace(/\.?0+$/, ""));
  $("d-values").querySelector("tbody").innerHTML = Object.entries(d.values)
    .map(([n, v]) => `<tr><td>${escapeHtml(n)}</td><td class="num">${fmt.format(v.count)}</td><td class="num">${num(v.min)}</td>` +
      `<td class="num">${num(v.mean)}</td><td class="num">${num(v.max)}</td><td class="num">${num(v.last)}</td></tr>`).join("");
  drawChart($("device-chart"), state.deviceSeries.get(d.device_id) || []);
}

function drawChart(canvas, points) {
  const ratio = window.devicePixelRatio || 1;
  const w = canvas.clientWidth, h = canvas.clientHeight || Number(canvas.getAttribute("height"));
  canvas.width = w * ratio; canvas.height = h * ratio;
  const ctx = canvas.getContext("2d");
  ctx.scale(ratio, ratio);
  ctx.clearRect(0, 0, w, h);
  ctx.strokeStyle = "#2a3642"; ctx.fillStyle = "#8b98a5"; ctx.font = "11px system-ui";
  const max = Math.max(1, ...points.map(([, v]) => v)) * 1.1;
  for (let i = 0; i <= 4; i++) {
    const y = h - 16 - ((h - 24) * i) / 4;
    ctx.beginPath(); ctx.moveTo(40, y); ctx.lineTo(w, y); ctx.stroke();
    ctx.fillText(fmtRate((max * i) / 4), 0, y + 4);
  }
  if (points.length < 2) return;
  const t0 = points[0][0], t1 = Math.max(points[points.length - 1][0], t0 + 1);
  ctx.strokeStyle = "#4cc2ff"; ctx.lineWidth = 2; ctx.beginPath();
  points.forEach(([t, v], i) => {
    const x = 40 + ((w - 44) * (t - t0)) / (t1 - t0);
    const y = h - 16 - ((h - 24) * v) / max;
    i ? ctx.lineTo(x, y) : ctx.moveTo(x, y);
  });
  ctx.stroke();
}

document.querySelectorAll("th[data-sort]").forEach((th) => th.addEventListener("click", () => {
  const sort = th.dataset.sort;
  state.order = state.sort === sort && state.order === "desc" ? "asc" : "desc";
  state.sort = sort;
  load();
}));
let filterTimer;
$("filter").addEventListener("input", (e) => {
  clearTimeout(filterTimer);
  filterTimer = setTimeout(() => { state.prefix = e.target.value.trim(); load(); connect(); }, 250);
});
setInterval(load, 10000);  // re-rank and pick up devices that appeared (the stream updates values)
load().then((ok) => { if (ok) connect(); });
