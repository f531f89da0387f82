// fedapp control-plane dashboard: a client of API v1 (docs/control_plane.md).
// Plain ES module, no dependencies, no build step. Every string that comes from
// the API is written with textContent / setAttribute, never parsed as HTML.

const CONFIG = Object.freeze({
  apiBase: "/api/v1",
  tokenKey: "fedapp.token",
  pollRunningMs: 2000,
  pollIdleMs: 10000,
  runsLimit: 50,
  eventsShown: 20,
  eventsPage: 500,
  actionReason: "from dashboard",
  stopConfirmMs: 4000,
  reportUrlLifetimeMs: 60000,
  legendMax: 12,
});

const PALETTE = ["#4e79a7", "#f28e2b", "#e15759", "#76b7b2", "#59a14f",
  "#edc948", "#b07aa1", "#ff9da7", "#9c755f", "#8c8c8c"];
const COLORS = Object.freeze({ accuracy: "#2563eb", loss: "#d97706", central: "#111827",
  distributed: "#7c3aed", budget: "#dc2626" });
const SVG_NS = "http://www.w3.org/2000/svg";
const CHART = Object.freeze({ height: 260, minWidth: 280, margin: { top: 14, right: 18, bottom: 42, left: 58 } });
const UNAUTHORIZED_MESSAGE = "The token was rejected (401): it is missing, invalid or expired. "
  + "Enter a valid token to continue.";

const session = { token: null, subject: null, role: null, expiresAt: null };
const poller = { timer: null, busy: false, again: false, generation: 0 };
const stopConfirm = { timer: null };
const view = { runs: [], runId: null, run: null, events: [], lastEventId: 0,
  actions: [], tracked: new Set(), memo: new Map() };

// ---------------------------------------------------------------- DOM helpers

const byId = (id) => document.getElementById(id);

function h(tag, props = {}, children = []) {
  const node = document.createElement(tag);
  applyProps(node, props);
  node.append(...children.filter((child) => child !== null && child !== undefined));
  return node;
}

function svg(tag, attrs = {}, text) {
  const node = document.createElementNS(SVG_NS, tag);
  for (const [key, value] of Object.entries(attrs)) node.setAttribute(key, String(value));
  if (text !== undefined) node.textContent = String(text);
  return node;
}

function applyProps(node, props) {
  for (const [key, value] of Object.entries(props)) {
    if (value === undefined || value === null || value === false) continue;
    if (key === "text") node.textContent = String(value);
    else if (key === "className") node.className = value;
    else if (key === "dataset") Object.assign(node.dataset, value);
    else node.setAttribute(key, value === true ? "" : String(value));
  }
}

function badge(text, kind) {
  return h("span", { className: `badge badge-${kind}`, text });
}

function setHidden(node, hidden) {
  node.hidden = Boolean(hidden);
}

/** Calls render(data) only when data differs from what `key` last rendered. */
function renderIfChanged(key, data, render) {
  const signature = JSON.stringify(data);
  if (view.memo.get(key) === signature) return;
  view.memo.set(key, signature);
  render(data);
}

// ----------------------------------------------------------------- formatting

const pad2 = (n) => String(n).padStart(2, "0");
const isNum = (value) => typeof value === "number" && Number.isFinite(value);

function clock(date) {
  return `${pad2(date.getHours())}:${pad2(date.getMinutes())}:${pad2(date.getSeconds())}`;
}

function dateTime(epochS) {
  if (!isNum(epochS)) return "—";
  const d = new Date(epochS * 1000);
  return `${d.getFullYear()}-${pad2(d.getMonth() + 1)}-${pad2(d.getDate())} ${clock(d)}`;
}

function fixed(value, digits = 3) {
  return isNum(value) ? value.toFixed(digits) : "—";
}

function percent(value) {
  return isNum(value) ? `${(value * 100).toFixed(2)} %` : "—";
}

function shortNumber(value) {
  if (!isNum(value)) return "—";
  return Math.abs(value) >= 100 ? value.toFixed(0) : String(Number(value.toPrecision(3)));
}

function privacyMechanisms(privacy = {}) {
  const names = [["client_dp", "client DP"], ["central_dp", "central DP"], ["distributed_dp", "distributed DP"]]
    .filter(([key]) => privacy[key]).map(([, label]) => label);
  return names.length ? names.join(", ") : "none";
}

// ------------------------------------------------------------------ API client

class ApiError extends Error {
  constructor(status, detail) {
    super(detail);
    this.name = "ApiError";
    this.status = status;
  }
}

const runPath = (runId, suffix = "") => `/runs/${encodeURIComponent(runId)}${suffix}`;

async function request(path, { method = "GET", body, as = "json" } = {}) {
  const headers = { Authorization: `Bearer ${session.token}` };
  if (body !== undefined) headers["Content-Type"] = "application/json";
  let response;
  try {
    response = await fetch(CONFIG.apiBase + path, {
      method, headers, cache: "no-store", body: body === undefined ? undefined : JSON.stringify(body),
    });
  } catch {
    throw new ApiError(0, "the API is unreachable (network error)");
  }
  if (!response.ok) throw new ApiError(response.status, await errorDetail(response));
  return as === "text" ? response.text() : response.json();
}

async function errorDetail(response) {
  const fallback = `HTTP ${response.status} ${response.statusText}`.trim();
  try {
    const data = await response.json();
    if (typeof data?.detail === "string") return data.detail;
    return data?.detail ? JSON.stringify(data.detail) : fallback;
  } catch {
    return fallback;
  }
}

// -------------------------------------------------------------- session/token

function initSession() {
  byId("token-form").addEventListener("submit", onTokenSubmit);
  const stored = sessionStorage.getItem(CONFIG.tokenKey);
  if (stored) startSession(stored);
  else showSignedOut("Enter an API token to open the dashboard.");
}

function onTokenSubmit(event) {
  event.preventDefault();
  const input = byId("token-input");
  const token = input.value.trim();
  if (!token) {
    showSignedOut("Enter an API token to open the dashboard.");
    return;
  }
  input.value = "";
  startSession(token);
}

function startSession(token) {
  session.token = token;
  session.role = null;
  sessionStorage.setItem(CONFIG.tokenKey, token);
  setHidden(byId("auth-message"), true);
  resetRunView();
  refreshNow();
}

async function loadIdentity() {
  const me = await request("/whoami");
  Object.assign(session, { subject: me.subject, role: me.role, expiresAt: me.expires_at });
  const whoami = byId("whoami");
  whoami.textContent = `${me.subject} (${me.role})`;
  whoami.title = isNum(me.expires_at) ? `token expires ${dateTime(me.expires_at)}` : "";
  setHidden(byId("app"), false);
}

function showSignedOut(message) {
  clearTimeout(poller.timer);
  poller.generation += 1;
  Object.assign(session, { token: null, subject: null, role: null, expiresAt: null });
  sessionStorage.removeItem(CONFIG.tokenKey);
  byId("whoami").textContent = "not signed in";
  byId("whoami").title = "";
  const note = byId("auth-message");
  note.textContent = message;
  setHidden(note, false);
  setHidden(byId("app"), true);
  setHidden(byId("error-line"), true);
  byId("token-input").focus();
}

const isOperator = () => session.role === "operator";

// ------------------------------------------------------------------- polling

function refreshNow() {
  if (!session.token) return;
  if (poller.busy) {
    poller.again = true;
    return;
  }
  clearTimeout(poller.timer);
  poll();
}

async function poll() {
  poller.busy = true;
  try {
    await loadEverything(poller.generation);
    markUpdated();
  } catch (error) {
    handleFailure(error, "Refresh failed");
  } finally {
    poller.busy = false;
    if (poller.again) {
      poller.again = false;
      refreshNow();
    } else {
      scheduleNextPoll();
    }
  }
}

function scheduleNextPoll() {
  clearTimeout(poller.timer);
  if (!session.token) return;
  const delay = view.run?.status === "running" ? CONFIG.pollRunningMs : CONFIG.pollIdleMs;
  poller.timer = setTimeout(refreshNow, delay);
}

function markUpdated() {
  byId("last-updated").textContent = `last updated ${clock(new Date())}`;
  setHidden(byId("error-line"), true);
}

function handleFailure(error, what) {
  if (error instanceof ApiError && error.status === 401) {
    showSignedOut(UNAUTHORIZED_MESSAGE);
    return;
  }
  const line = byId("error-line");
  line.textContent = `${what} at ${clock(new Date())}: ${error.message}`;
  setHidden(line, false);
  if (!(error instanceof ApiError)) console.warn(error);
}

async function loadEverything(generation) {
  if (!session.token) return;
  if (!session.role) await loadIdentity();
  const { runs } = await request(`/runs?limit=${CONFIG.runsLimit}`);
  if (generation !== poller.generation) return;
  view.runs = runs;
  renderIfChanged("runs", { runs, selected: view.runId }, renderRuns);
  if (view.runId) await loadRun(view.runId, generation);
}

async function loadRun(runId, generation) {
  const base = runPath(runId);
  const [run, rounds, clients, privacy, events, audit, actions] = await Promise.all([
    request(base), request(`${base}/rounds`), request(`${base}/clients`), request(`${base}/privacy`),
    fetchEventsAfter(base, view.lastEventId), request(`${base}/audit`), request(`${base}/actions`),
  ]);
  const tracked = await fetchTrackedActions(base);
  if (generation !== poller.generation) return;
  view.run = run;
  mergeEvents(events);
  mergeActions(actions.actions, tracked);
  renderRun({ run, rounds: rounds.rounds, clients: clients.clients, privacy, audit });
}

async function fetchEventsAfter(base, after) {
  const fresh = [];
  for (let cursor = after; ;) {
    const { events } = await request(`${base}/events?after=${cursor}&limit=${CONFIG.eventsPage}`);
    fresh.push(...events);
    if (events.length < CONFIG.eventsPage) return fresh;
    cursor = events[events.length - 1].id;
  }
}

function mergeEvents(fresh) {
  const byEventId = new Map([...view.events, ...fresh].map((event) => [event.id, event]));
  view.events = [...byEventId.values()].sort((a, b) => a.id - b.id).slice(-CONFIG.eventsShown);
  view.lastEventId = Math.max(view.lastEventId, ...fresh.map((event) => event.id));
}

/** Follows the actions this dashboard submitted until they leave "pending". */
async function fetchTrackedActions(base) {
  const ids = [...view.tracked];
  const found = await Promise.all(ids.map((id) =>
    request(`${base}/actions/${encodeURIComponent(id)}?wait_s=0`)));
  for (const action of found) if (action.status !== "pending") view.tracked.delete(action.id);
  return found;
}

function mergeActions(listed, tracked) {
  const byActionId = new Map(listed.map((action) => [action.id, action]));
  for (const action of tracked) byActionId.set(action.id, action);
  view.actions = [...byActionId.values()].sort((a, b) => (b.requested_at ?? 0) - (a.requested_at ?? 0));
}

// ------------------------------------------------------------ run selection

function initRunSelection() {
  const tbody = byId("runs-table").tBodies[0];
  tbody.addEventListener("click", (event) => selectRowRun(event.target));
  tbody.addEventListener("keydown", (event) => {
    if (event.key === "Enter" || event.key === " ") {
      event.preventDefault();
      selectRowRun(event.target);
    }
  });
  window.addEventListener("hashchange", applyHash);
  applyHash();
}

function selectRowRun(target) {
  const row = target.closest("tr[data-run-id]");
  if (row) location.hash = `run=${encodeURIComponent(row.dataset.runId)}`;
}

function runIdFromHash() {
  const match = /^#run=(.+)$/.exec(location.hash);
  if (!match) return null;
  try {
    return decodeURIComponent(match[1]);
  } catch {
    return null;
  }
}

function applyHash() {
  const runId = runIdFromHash();
  if (runId === view.runId) return;
  resetRunView();
  view.runId = runId;
  setHidden(byId("run-detail"), !runId);
  refreshNow();
}

function resetRunView() {
  poller.generation += 1;
  Object.assign(view, { run: null, events: [], lastEventId: 0, actions: [], tracked: new Set() });
  view.memo.clear();
  byId("action-feedback").textContent = "";
  byId("report-feedback").textContent = "";
}

// ----------------------------------------------------------------- rendering

function renderRuns({ runs, selected }) {
  const rows = runs.map((run) => runRow(run, run.run_id === selected));
  byId("runs-table").tBodies[0].replaceChildren(...rows);
  setHidden(byId("runs-empty"), runs.length > 0);
}

function runRow(run, selected) {
  const latest = run.latest ?? {};
  return h("tr", {
    dataset: { runId: run.run_id }, tabindex: 0, "aria-selected": String(selected),
    className: selected ? "selected" : "",
  }, [
    h("td", {}, [h("code", { text: run.run_id })]),
    h("td", { text: run.name }),
    h("td", {}, [badge(run.status, run.status), run.paused ? badge("paused", "paused") : null]),
    h("td", { className: "num", text: `${run.last_round}/${run.num_rounds}` }),
    h("td", { className: "num", text: percent(latest.test_accuracy) }),
    h("td", { className: "num", text: fixed(latest.max_client_epsilon, 2) }),
    h("td", { text: dateTime(run.started_at) }),
  ]);
}

function renderRun({ run, rounds, clients, privacy, audit }) {
  const actionable = isOperator() && run.status === "running";
  const effective = effectiveRounds(rounds);
  renderIfChanged("header", run, renderRunHeader);
  renderIfChanged("controls", { run, actionable }, renderControls);
  renderIfChanged("charts", { effective, privacy }, renderCharts);
  renderIfChanged("clients", { clients, actionable, pending: pendingClientActions() }, renderClients);
  renderIfChanged("events", view.events, renderEvents);
  renderIfChanged("audit", audit, renderAudit);
  renderIfChanged("actions", view.actions, renderActions);
}

function renderRunHeader(run) {
  byId("run-title").replaceChildren(run.name, " ", h("code", { className: "run-id", text: run.run_id }));
  const status = byId("run-status");
  status.textContent = run.status;
  status.className = `badge badge-${run.status}`;
  status.dataset.status = run.status;
  setHidden(byId("run-paused"), !run.paused);
  byId("run-facts").replaceChildren(...runFacts(run).map(([term, value]) =>
    h("div", {}, [h("dt", { text: term }), h("dd", { text: value })])));
}

function runFacts(run) {
  const privacy = run.privacy ?? {};
  const facts = [
    ["Round", `${run.last_round} of ${run.num_rounds}`],
    ["Strategy", run.strategy],
    ["Secure aggregation", run.secagg],
    ["Privacy", privacyMechanisms(privacy)],
    ["ε budget", isNum(privacy.epsilon_budget) ? shortNumber(privacy.epsilon_budget) : "none"],
    ["δ", isNum(privacy.delta) ? String(privacy.delta) : "—"],
    ["Clients per round", `${run.clients_per_round} of ${run.num_clients}`],
    ["Attempt", String(run.attempt)],
    ["Started", dateTime(run.started_at)],
    ["Ended", dateTime(run.ended_at)],
    ["Code version", run.code_version ?? "—"],
  ];
  if (run.error) facts.push(["Error", run.error]);
  return facts;
}

function renderControls({ run, actionable }) {
  setHidden(byId("operator-controls"), !actionable);
  byId("clients-table").classList.toggle("with-actions", actionable);
  if (!actionable) return;
  byId("pause-button").disabled = run.paused;
  byId("resume-button").disabled = !run.paused;
  syncInput(byId("rule-select"), run.strategy);
  const cpr = byId("cpr-input");
  cpr.max = String(run.num_clients);
  syncInput(cpr, String(run.clients_per_round));
}

/** Shows the value in force unless the operator is editing the field. */
function syncInput(input, value) {
  if (document.activeElement === input || input.dataset.dirty === "true") return;
  input.value = value;
}

/** One row per round: a retried round keeps its latest attempt. */
function effectiveRounds(rounds) {
  const byRound = new Map();
  for (const round of rounds) {
    const previous = byRound.get(round.round);
    if (!previous || (round.attempt ?? 0) >= (previous.attempt ?? 0)) byRound.set(round.round, round);
  }
  return [...byRound.values()].sort((a, b) => a.round - b.round);
}

function metricPoints(rounds, key) {
  return rounds.filter((round) => isNum(round.metrics?.[key]))
    .map((round) => ({ x: round.round, y: round.metrics[key] }));
}

const epsilonPoints = (series = []) => series.filter((point) => isNum(point.epsilon))
  .map((point) => ({ x: point.round, y: point.epsilon }));

function renderCharts({ effective, privacy }) {
  byId("rounds-count").textContent = String(effective.filter((round) => round.round >= 1).length);
  lineChart(byId("accuracy-chart"), {
    title: "Test accuracy", xLabel: "Round", yLabel: "Test accuracy", yMin: 0, yMax: 1,
    tickFormat: (v) => `${Math.round(v * 100)}%`,
    series: [{ name: "test accuracy", color: COLORS.accuracy, points: metricPoints(effective, "test_accuracy") }],
  });
  lineChart(byId("loss-chart"), {
    title: "Test loss", xLabel: "Round", yLabel: "Test loss", yMin: 0,
    series: [{ name: "test loss", color: COLORS.loss, points: metricPoints(effective, "test_loss") }],
  });
  lineChart(byId("epsilon-chart"), epsilonChartSpec(privacy));
}

function epsilonChartSpec(privacy) {
  const clients = Object.entries(privacy.clients ?? {})
    .sort(([a], [b]) => a.localeCompare(b, undefined, { numeric: true }))
    .map(([label, points], index) => ({
      name: `client ${label}`, color: PALETTE[index % PALETTE.length], points: epsilonPoints(points),
    }));
  const aggregate = [
    { name: "central", color: COLORS.central, width: 3, points: epsilonPoints(privacy.central) },
    { name: "distributed", color: COLORS.distributed, width: 3, points: epsilonPoints(privacy.distributed) },
  ].filter((series) => series.points.length);
  const budget = privacy.epsilon_budget;
  return {
    title: "Privacy loss ε", xLabel: "Round", yLabel: "ε (epsilon)", yMin: 0, height: 300,
    series: [...clients, ...aggregate],
    threshold: isNum(budget) ? { y: budget, name: `budget ε = ${shortNumber(budget)}`, color: COLORS.budget } : null,
    emptyText: "No privacy accounting for this run.",
  };
}

function renderClients({ clients, actionable, pending }) {
  const rows = clients.map((client) => clientRow(client, actionable, pending.includes(client.client)));
  byId("clients-table").tBodies[0].replaceChildren(...rows);
}

function clientRow(client, actionable, pending) {
  const refusals = (client.refusals ?? []).map((r) => `round ${r.round}: ${r.status} (${r.reason})`);
  return h("tr", { dataset: { client: client.client } }, [
    h("td", {}, [h("code", { text: client.client })]),
    h("td", { dataset: { status: client.status } }, [badge(client.status, client.status)]),
    h("td", { className: "reason", text: client.status_reason || "" }),
    h("td", { className: "num", text: fixed(client.reputation, 2) }),
    h("td", { className: "num", text: fixed(client.anomaly_score, 2) }),
    h("td", { className: "num", text: fixed(client.epsilon, 2) }),
    h("td", { className: "num", text: fixed(client.budget_left, 2) }),
    h("td", { className: "num", text: String(client.refusal_count ?? 0), title: refusals.join("\n") || null }),
    h("td", { className: "operator-only" }, [actionable ? clientButton(client, pending) : null]),
  ]);
}

function clientButton(client, pending) {
  const action = client.status === "blocked" ? "unblock" : "block";
  return h("button", {
    type: "button", className: action === "block" ? "small danger" : "small secondary",
    dataset: { action }, disabled: pending, text: pending ? "Pending…" : action === "block" ? "Block" : "Unblock",
  });
}

/** Labels of clients with a block/unblock still pending. */
function pendingClientActions() {
  return view.actions
    .filter((action) => action.status === "pending" && ["block", "unblock"].includes(action.action))
    .map((action) => action.params?.client);
}

function renderEvents(events) {
  const items = [...events].reverse().map((event) => h("li", { dataset: { eventId: event.id } }, [
    h("span", { className: "event-round", text: `R${event.round ?? "–"}` }),
    h("span", { className: "event-kind", text: event.kind }),
    h("span", { className: "event-reason", text: event.reason || "" }),
    h("time", { className: "event-time muted", text: dateTime(event.time) }),
  ]));
  byId("events-list").replaceChildren(...(items.length ? items : [h("li", { className: "muted", text: "No events yet." })]));
}

function renderAudit(audit) {
  const node = byId("audit-status");
  node.dataset.ok = String(Boolean(audit.ok));
  node.className = `audit ${audit.ok ? "audit-ok" : "audit-bad"}`;
  node.replaceChildren(badge(audit.ok ? "ok" : "FAILED", audit.ok ? "ok" : "bad"), " ", audit.line ?? "");
}

function renderActions(actions) {
  const items = actions.map(actionItem);
  byId("actions-list").replaceChildren(...(items.length ? items : [h("li", { className: "muted", text: "No operator actions." })]));
}

function actionItem(action) {
  const rounds = isNum(action.effective_round) ? `effective from round ${action.effective_round}` : null;
  return h("li", { dataset: { actionId: action.id, status: action.status } }, [
    h("div", { className: "action-head" }, [
      badge(action.status, action.status),
      h("strong", { text: describeAction(action) }),
    ]),
    h("div", { className: "muted", text: [`#${action.id}`, `by ${action.requested_by}`,
      dateTime(action.requested_at), rounds].filter(Boolean).join(" · ") }),
    action.result ? h("div", { className: "action-result", text: action.result }) : null,
  ]);
}

function describeAction({ action, params = {} }) {
  if (params.client !== undefined) return `${action} client ${params.client}`;
  if (params.rule !== undefined) return `${action} → ${params.rule}`;
  if (params.clients_per_round !== undefined) return `${action} → ${params.clients_per_round}`;
  return action;
}

// ------------------------------------------------------------------- charts

const chartSpecs = new Map();
const chartResizes = new ResizeObserver((entries) => {
  // Redraw on the next frame: drawing inside the callback would resize observed boxes again.
  requestAnimationFrame(() => entries.forEach(({ target }) => redrawIfResized(target)));
});

function redrawIfResized(container) {
  const spec = chartSpecs.get(container);
  const drawn = Number(container.dataset.width);
  if (spec && Math.abs(chartWidth(container) - drawn) > 2) lineChart(container, spec);
}

function chartWidth(container) {
  return Math.max(CHART.minWidth, Math.floor(container.clientWidth || CHART.minWidth));
}

/** Draws a line chart as inline SVG sized to its container (redrawn when that resizes). */
function lineChart(container, spec) {
  if (!chartSpecs.has(container)) chartResizes.observe(container);
  chartSpecs.set(container, spec);
  const series = spec.series.filter((s) => s.points.length);
  const points = series.flatMap((s) => s.points);
  container.dataset.points = String(points.length);
  if (!points.length) {
    container.replaceChildren(h("p", { className: "chart-empty", text: spec.emptyText ?? "No data yet." }));
    return;
  }
  const box = chartBox(chartWidth(container), spec.height ?? CHART.height);
  const scales = chartScales(points, spec, box);
  const root = svg("svg", { width: box.width, height: box.height, viewBox: `0 0 ${box.width} ${box.height}`,
    role: "img", "aria-label": chartSummary(spec, series), class: "chart-svg" });
  root.append(chartAxes(scales, spec), ...series.map((s) => seriesGroup(s, scales)));
  if (spec.threshold) root.append(thresholdLine(spec.threshold, scales));
  container.dataset.width = String(box.width);
  container.replaceChildren(root, chartLegend(series, spec.threshold));
}

function chartBox(width, height) {
  const { top, right, bottom, left } = CHART.margin;
  return { width, height, left, right: width - right, top, bottom: height - bottom };
}

function chartScales(points, spec, box) {
  const xs = points.map((p) => p.x);
  const ys = points.map((p) => p.y).concat(spec.threshold ? [spec.threshold.y] : []);
  const xMin = Math.min(...xs);
  const xMax = Math.max(...xs, xMin + 1);
  const yTicks = niceTicks(spec.yMin ?? Math.min(...ys), spec.yMax ?? Math.max(...ys));
  const yMin = Math.min(yTicks[0], spec.yMin ?? Infinity);
  const yMax = Math.max(yTicks[yTicks.length - 1], spec.yMax ?? -Infinity);
  const xTickCount = Math.max(2, Math.floor((box.right - box.left) / 60));
  return {
    box,
    x: linear([xMin, xMax], [box.left, box.right]),
    y: linear([yMin, yMax], [box.bottom, box.top]),
    xTicks: niceTicks(xMin, xMax, xTickCount).filter((t) => Number.isInteger(t) && t >= xMin && t <= xMax),
    yTicks: yTicks.filter((t) => t >= yMin && t <= yMax),
  };
}

function linear([d0, d1], [r0, r1]) {
  const span = d1 - d0 || 1;
  return (value) => r0 + ((value - d0) / span) * (r1 - r0);
}

/** Round tick values (steps of 1, 2 or 5 × 10^k) covering [min, max]. */
function niceTicks(min, max, count = 5) {
  const top = max > min ? max : min + 1;
  const rough = (top - min) / count;
  const magnitude = 10 ** Math.floor(Math.log10(rough));
  const ratio = rough / magnitude;
  const step = magnitude * (ratio >= 7.5 ? 10 : ratio >= 3.5 ? 5 : ratio >= 1.5 ? 2 : 1);
  const ticks = [];
  for (let v = Math.floor(min / step) * step; v < top + step; v += step) {
    ticks.push(Number(v.toPrecision(12)));
    if (v >= top) break;
  }
  return ticks;
}

function chartAxes({ box, x, y, xTicks, yTicks }, spec) {
  const group = svg("g", { class: "axes" });
  const format = spec.tickFormat ?? shortNumber;
  for (const t of yTicks) {
    group.append(svg("line", { class: "grid", x1: box.left, x2: box.right, y1: y(t), y2: y(t) }),
      svg("text", { class: "tick", x: box.left - 8, y: y(t), "text-anchor": "end", "dominant-baseline": "middle" },
        format(t)));
  }
  for (const t of xTicks) {
    group.append(svg("line", { class: "tick-mark", x1: x(t), x2: x(t), y1: box.bottom, y2: box.bottom + 5 }),
      svg("text", { class: "tick", x: x(t), y: box.bottom + 18, "text-anchor": "middle" }, t));
  }
  group.append(
    svg("line", { class: "axis", x1: box.left, x2: box.right, y1: box.bottom, y2: box.bottom }),
    svg("line", { class: "axis", x1: box.left, x2: box.left, y1: box.top, y2: box.bottom }),
    svg("text", { class: "axis-label", x: (box.left + box.right) / 2, y: box.height - 6, "text-anchor": "middle" },
      spec.xLabel),
    svg("text", { class: "axis-label", transform: `translate(14 ${(box.top + box.bottom) / 2}) rotate(-90)`,
      "text-anchor": "middle" }, spec.yLabel),
  );
  return group;
}

function seriesGroup(series, { x, y }) {
  const group = svg("g", { class: "series" });
  const path = series.points.map((p, i) => `${i ? "L" : "M"}${x(p.x).toFixed(1)} ${y(p.y).toFixed(1)}`).join(" ");
  group.append(svg("path", { d: path, fill: "none", stroke: series.color, "stroke-width": series.width ?? 2,
    "stroke-linejoin": "round", "stroke-linecap": "round" }));
  const radius = series.points.length > 30 ? 2 : 3;
  for (const p of series.points) {
    const dot = svg("circle", { cx: x(p.x).toFixed(1), cy: y(p.y).toFixed(1), r: radius, fill: series.color });
    dot.append(svg("title", {}, `${series.name} · round ${p.x}: ${shortNumber(p.y)}`));
    group.append(dot);
  }
  return group;
}

function thresholdLine(threshold, { box, y }) {
  const group = svg("g", { class: "threshold" });
  const line = svg("line", { x1: box.left, x2: box.right, y1: y(threshold.y), y2: y(threshold.y),
    stroke: threshold.color, "stroke-width": 1.5, "stroke-dasharray": "6 4" });
  line.append(svg("title", {}, threshold.name));
  group.append(line, svg("text", { class: "threshold-label", x: box.right - 4, y: y(threshold.y) - 6,
    "text-anchor": "end", fill: threshold.color }, threshold.name));
  return group;
}

function chartLegend(series, threshold) {
  const shown = series.slice(0, CONFIG.legendMax).map((s) => legendItem(s.name, s.color, false));
  if (series.length > CONFIG.legendMax) {
    shown.push(h("li", { className: "muted", text: `+${series.length - CONFIG.legendMax} more` }));
  }
  if (threshold) shown.push(legendItem(threshold.name, threshold.color, true));
  return h("ul", { className: "legend" }, shown);
}

function legendItem(name, color, dashed) {
  const swatch = svg("svg", { width: 18, height: 10, "aria-hidden": "true" });
  swatch.append(svg("line", { x1: 1, x2: 17, y1: 5, y2: 5, stroke: color, "stroke-width": 3,
    "stroke-dasharray": dashed ? "4 3" : "none" }));
  return h("li", {}, [swatch, h("span", { text: name })]);
}

function chartSummary(spec, series) {
  const last = (s) => s.points[s.points.length - 1];
  const lines = series.slice(0, 3).map((s) => `${s.name} ${shortNumber(last(s).y)} at round ${last(s).x}`);
  return `${spec.title}: ${lines.join("; ")}${series.length > 3 ? `; ${series.length - 3} more series` : ""}`;
}

// ---------------------------------------------------------- operator actions

function initOperatorControls() {
  byId("clients-table").tBodies[0].addEventListener("click", onClientAction);
  byId("rule-form").addEventListener("submit", (event) => submitSetting(event, "rule-select",
    (value) => ({ action: "set_rule", rule: value })));
  byId("cpr-form").addEventListener("submit", (event) => submitSetting(event, "cpr-input",
    (value) => ({ action: "set_clients_per_round", clients_per_round: Number.parseInt(value, 10) })));
  for (const id of ["rule-select", "cpr-input"]) {
    byId(id).addEventListener("input", (event) => { event.target.dataset.dirty = "true"; });
  }
  byId("pause-button").addEventListener("click", () => sendAction({ action: "pause" }));
  byId("resume-button").addEventListener("click", () => sendAction({ action: "resume" }));
  byId("stop-button").addEventListener("click", onStop);
  byId("report-button").addEventListener("click", openReport);
}

function onClientAction(event) {
  const button = event.target.closest("button[data-action]");
  const row = button?.closest("tr[data-client]");
  if (!row || button.disabled) return;
  button.disabled = true;
  sendAction({ action: button.dataset.action, client: row.dataset.client });
}

function submitSetting(event, inputId, toBody) {
  event.preventDefault();
  const input = byId(inputId);
  delete input.dataset.dirty;
  sendAction(toBody(input.value));
}

/** Stop takes two clicks: the first arms the button for a few seconds. */
function onStop() {
  const button = byId("stop-button");
  if (button.dataset.armed === "true") {
    disarmStop();
    sendAction({ action: "stop" });
    return;
  }
  button.dataset.armed = "true";
  button.textContent = "Confirm stop";
  stopConfirm.timer = setTimeout(disarmStop, CONFIG.stopConfirmMs);
}

function disarmStop() {
  const button = byId("stop-button");
  clearTimeout(stopConfirm.timer);
  delete button.dataset.armed;
  button.textContent = "Stop";
}

async function sendAction(body) {
  const runId = view.runId;
  if (!runId) return;
  try {
    const action = await request(runPath(runId, "/actions"), {
      method: "POST", body: { ...body, reason: CONFIG.actionReason },
    });
    view.tracked.add(action.id);
    view.actions = [action, ...view.actions.filter((a) => a.id !== action.id)];
    setFeedback(`Requested: ${describeAction(action)} (action #${action.id}; its progress is under Actions).`, "ok");
  } catch (error) {
    actionFailed(error);
  } finally {
    view.memo.delete("clients");
    refreshNow();
  }
}

function actionFailed(error) {
  if (error.status === 401) return showSignedOut(UNAUTHORIZED_MESSAGE);
  if (error.status === 403) return setFeedback("Refused: operator role required.", "error");
  if (error.status === 409) return setFeedback(`Refused: ${error.message}`, "error");
  return setFeedback(`Action failed: ${error.message}`, "error");
}

function setFeedback(text, kind) {
  const node = byId("action-feedback");
  node.textContent = text;
  node.dataset.kind = kind;
}

// ---------------------------------------------------------- compliance report

async function openReport() {
  const runId = view.runId;
  if (!runId) return;
  // Open the window within the click so pop-up blockers allow it, fill it later.
  const win = window.open("", "_blank");
  const feedback = byId("report-feedback");
  feedback.textContent = "";
  try {
    const html = await request(runPath(runId, "/report.html"), { as: "text" });
    const url = URL.createObjectURL(new Blob([html], { type: "text/html" }));
    setTimeout(() => URL.revokeObjectURL(url), CONFIG.reportUrlLifetimeMs);
    if (!win) throw new Error("the browser blocked the report window; allow pop-ups for this site");
    win.opener = null;
    win.location.href = url;
  } catch (error) {
    win?.close();
    if (error.status === 401) showSignedOut(UNAUTHORIZED_MESSAGE);
    else feedback.textContent = `Compliance report failed: ${error.message}`;
  }
}

// ----------------------------------------------------------------- startup

function main() {
  initOperatorControls();
  initRunSelection();
  initSession();
}

main();
