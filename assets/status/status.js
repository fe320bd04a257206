// Fulcrum's status page: polls GET /status and GET /status/live once a second
// and draws every pool, its policy, its backends and charts of the last
// two minutes. Data goes into the page as text only (no innerHTML), so an
// address or error message can never become markup.
"use strict";

const TOKEN_KEY = "fulcrum-admin-token";
const SVG = "http://www.w3.org/2000/svg";
const COLORS = ["#1f6feb", "#d9480f", "#2f9e44", "#9c36b5", "#e8590c", "#0b7285", "#c2255c", "#5c940d"];
const CHART_HEIGHT = 100;

let token = sessionStorage.getItem(TOKEN_KEY);
let timer = null;
const sections = new Map(); // pool name -> its DOM parts

function el(tag, attrs = {}, text) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) node.setAttribute(key, value);
  if (text !== undefined) node.textContent = text;
  return node;
}

// One admin call, with the token when there is one. Resolves to the parsed
// JSON; rejects with { status, message }.
async function call(path, options = {}) {
  const headers = Object.assign({}, options.headers);
  if (token) headers["Authorization"] = "Bearer " + token;
  const response = await fetch(path, Object.assign({}, options, { headers, cache: "no-store" }));
  let body = null;
  try { body = await response.json(); } catch (_) { body = null; }
  if (!response.ok) {
    throw { status: response.status, message: (body && body.error) || response.statusText };
  }
  return body;
}

function askForToken(message) {
  stop();
  document.getElementById("token-form").hidden = false;
  document.getElementById("token-error").textContent = message || "";
  document.getElementById("token").focus();
}

function showError(message) {
  const node = document.getElementById("error");
  node.hidden = !message;
  node.textContent = message || "";
}

async function refresh() {
  try {
    const [status, live] = await Promise.all([call("/status"), call("/status/live")]);
    showError("");
    render(status, live);
  } catch (error) {
    if (error && error.status === 401) {
      askForToken(token ? "That token was refused." : "");
    } else {
      showError("Cannot reach the admin API: " + (error && error.message ? error.message : error));
    }
  }
}

function start() {
  stop();
  refresh();
  timer = setInterval(refresh, 1000);
}

function stop() {
  if (timer !== null) clearInterval(timer);
  timer = null;
}

function render(status, live) {
  const ready = document.getElementById("ready");
  ready.textContent = status.ready ? "ready" : "not ready (draining)";
  ready.className = "badge " + (status.ready ? "good" : "bad");
  document.getElementById("updated").textContent = "updated " + new Date().toLocaleTimeString();

  const main = document.getElementById("pools");
  const seen = new Set();
  for (const pool of status.pools) {
    seen.add(pool.name);
    let section = sections.get(pool.name);
    if (!section) {
      section = poolSection(pool.name);
      sections.set(pool.name, section);
      main.appendChild(section.root);
    }
    updatePool(section, pool, live.samples || []);
  }
  for (const [name, section] of sections) {
    if (!seen.has(name)) {
      section.root.remove();
      sections.delete(name);
    }
  }
}

function poolSection(name) {
  const root = el("section", { class: "pool", "data-pool": name });
  const head = el("div", { class: "pool-head" });
  head.appendChild(el("h2", {}, name));
  const policy = el("span", { class: "policy" });
  const quarantine = el("span", { class: "badge bad", hidden: "" }, "policy quarantined");
  head.append(policy, quarantine);
  const charts = el("div", { class: "charts" });
  const rps = chart("Requests per second, by backend");
  const latency = chart("Latency (ms): p50 and p99");
  const errors = chart("Errors (5xx) per second, by backend");
  charts.append(rps.root, latency.root, errors.root);
  const table = el("table");
  const header = el("tr");
  for (const title of ["Backend", "Weight", "State", "In flight", "Requests", "Failures", "Last error", ""]) {
    header.appendChild(el("th", {}, title));
  }
  table.appendChild(el("thead")).appendChild(header);
  const body = table.appendChild(el("tbody"));
  root.append(head, charts, table);
  return { root, policy, quarantine, rps, latency, errors, body, rows: new Map() };
}

function updatePool(section, pool, samples) {
  const loaded = pool.policy_loaded_at ? new Date(pool.policy_loaded_at * 1000).toLocaleString() : "";
  section.policy.textContent = "policy " + pool.policy + " (" + String(pool.plugin_digest || "").slice(0, 12) +
    "), loaded " + loaded + ", faults " + pool.plugin_faults;
  section.quarantine.hidden = !pool.plugin_quarantined;

  const mine = samples.map((sample) => (sample.pools || []).find((p) => p.name === pool.name) || null);
  const addresses = pool.backends.map((b) => b.address);
  const perBackend = (field) => addresses.map((address) => ({
    name: address,
    values: mine.map((p) => {
      const b = p && p.backends.find((x) => x.address === address);
      return b ? b[field] : null;
    }),
  }));
  drawChart(section.rps, perBackend("requests_per_second"), "/s");
  drawChart(section.latency, [
    { name: "p50", values: mine.map((p) => (p ? p.p50_ms : null)) },
    { name: "p99", values: mine.map((p) => (p ? p.p99_ms : null)) },
  ], " ms");
  drawChart(section.errors, perBackend("errors_per_second"), "/s");

  const seen = new Set();
  for (const backend of pool.backends) {
    seen.add(backend.address);
    let row = section.rows.get(backend.address);
    if (!row) {
      row = backendRow(pool.name, backend.address);
      section.rows.set(backend.address, row);
      section.body.appendChild(row.root);
    }
    updateRow(row, backend);
  }
  for (const [address, row] of section.rows) {
    if (!seen.has(address)) {
      row.root.remove();
      section.rows.delete(address);
    }
  }
}

function backendRow(pool, address) {
  const root = el("tr", { "data-backend": address });
  const cells = {};
  for (const key of ["address", "weight", "state", "in_flight", "requests", "failures", "last_error"]) {
    const numeric = ["weight", "in_flight", "requests", "failures"].includes(key);
    cells[key] = root.appendChild(el("td", { class: numeric ? "num" : key.replace("_", "-") }));
  }
  cells.address.textContent = address;
  const action = el("button", { type: "button", "data-pool": pool, "data-address": address });
  action.addEventListener("click", () => change(pool, address, action.dataset.action));
  root.appendChild(el("td")).appendChild(action);
  return { root, cells, action };
}

function updateRow(row, backend) {
  row.root.className = "state-" + backend.state;
  row.cells.weight.textContent = backend.weight;
  row.cells.state.textContent = backend.state;
  row.cells.in_flight.textContent = backend.in_flight;
  row.cells.requests.textContent = backend.requests;
  row.cells.failures.textContent = backend.failures;
  row.cells.last_error.textContent = backend.last_error || "";
  const action = backend.state === "drained" ? "enable" : "drain";
  row.action.dataset.action = action;
  row.action.textContent = action === "drain" ? "Drain" : "Enable";
  row.action.title = action === "drain"
    ? "Send no new requests; requests in flight finish"
    : "Take requests again";
}

async function change(pool, address, action) {
  const path = "/pools/" + encodeURIComponent(pool) + "/backends/" + encodeURIComponent(address) + "/" + action;
  try {
    await call(path, { method: "POST", headers: { "Content-Type": "application/json" }, body: "{}" });
    showError("");
  } catch (error) {
    if (error && error.status === 401) return askForToken("That token was refused.");
    showError(action + " " + address + " failed: " + (error && error.message ? error.message : error));
  }
  refresh();
}

function chart(title) {
  const root = el("figure");
  const caption = el("figcaption");
  const name = el("span", {}, title);
  const top = el("span", { class: "top" });
  caption.append(name, top);
  const svg = document.createElementNS(SVG, "svg");
  svg.setAttribute("class", "chart");
  svg.setAttribute("preserveAspectRatio", "none");
  const legend = el("div", { class: "legend" });
  root.append(caption, svg, legend);
  return { root, svg, legend, top };
}

// Draws one polyline per series; a point per sample with a value.
function drawChart(chart, series, unit) {
  const width = 120; // samples in the window
  chart.svg.setAttribute("viewBox", "0 0 " + width + " " + CHART_HEIGHT);
  let max = 0;
  for (const s of series) for (const v of s.values) if (v !== null && v > max) max = v;
  const scale = max > 0 ? max * 1.1 : 1;
  chart.top.textContent = "max " + formatNumber(max) + unit;
  while (chart.svg.firstChild) chart.svg.firstChild.remove();
  chart.legend.textContent = "";
  series.forEach((s, i) => {
    const color = COLORS[i % COLORS.length];
    const offset = width - s.values.length;
    const points = [];
    s.values.forEach((v, x) => {
      if (v === null || v === undefined) return;
      const y = CHART_HEIGHT - (v / scale) * CHART_HEIGHT;
      points.push((offset + x).toFixed(1) + "," + y.toFixed(2));
    });
    const line = document.createElementNS(SVG, "polyline");
    line.setAttribute("points", points.join(" "));
    line.setAttribute("stroke", color);
    line.setAttribute("data-series", s.name);
    chart.svg.appendChild(line);
    const key = el("span");
    key.appendChild(el("i")).style.background = color;
    key.appendChild(document.createTextNode(s.name));
    chart.legend.appendChild(key);
  });
}

function formatNumber(v) {
  if (v >= 100) return v.toFixed(0);
  if (v >= 10) return v.toFixed(1);
  return v.toFixed(2);
}

document.getElementById("token-form").addEventListener("submit", (event) => {
  event.preventDefault();
  token = document.getElementById("token").value.trim();
  sessionStorage.setItem(TOKEN_KEY, token);
  document.getElementById("token-form").hidden = true;
  start();
});

start();
