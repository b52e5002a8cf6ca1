// replq's web GUI: the replication panels of the datacenter, each node and each guest.
// Plain JavaScript, no build step. Every change goes through /api/ with the session's CSRF token;
// every refusal is shown as the API words it, which are the CLI's words.
"use strict";

const FAST_REFRESH = 2000;   // while a job runs, is due or is being removed
const SLOW_REFRESH = 10000;
const TREE_REFRESH = 30000;

const state = {
  csrf: null,
  timezone: "UTC",
  route: { kind: "datacenter" },
  rows: new Map(),        // job id -> its <tr>
  jobs: new Map(),        // job id -> its latest API row
  selected: null,         // job id, kept while the table refreshes
  guests: [],
  nodes: [],
  treeKey: null,
  timer: null,
  treeTimer: null,
  dialog: null,           // {mode: "add"|"edit", id, original, digest}
};

const $ = (id) => document.getElementById(id);

// ---- the API -----------------------------------------------------------------------------------
class ApiError extends Error {
  constructor(status, message) { super(message); this.status = status; }
}

async function api(method, path, body) {
  const headers = {};
  if (body !== undefined) headers["Content-Type"] = "application/json";
  if (method !== "GET" && state.csrf) headers["CSRFPreventionToken"] = state.csrf;
  const res = await fetch(path, {
    method, headers, credentials: "same-origin",
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  let data = null;
  try { data = await res.json(); } catch (e) { data = null; }
  if (!res.ok) {
    const message = (data && data.error) || `${res.status} ${res.statusText}`;
    if (res.status === 401 && path !== "/api/login") showLogin();
    throw new ApiError(res.status, message);
  }
  return data;
}

// ---- log in / out ------------------------------------------------------------------------------
function showLogin(message) {
  clearTimeout(state.timer);
  clearTimeout(state.treeTimer);
  state.csrf = null;
  state.treeKey = null;
  $("app-view").hidden = true;
  $("logout").hidden = true;
  $("whoami").textContent = "";
  $("login-view").hidden = false;
  $("login-error").textContent = message || "";
  $("login-user").focus();
}

function startSession(info) {
  state.csrf = info.CSRFPreventionToken;
  state.timezone = info.timezone || "UTC";
  $("login-view").hidden = true;
  $("app-view").hidden = false;
  $("logout").hidden = false;
  $("whoami").textContent = info.user;
  refreshTree();
  route();
}

$("login-form").addEventListener("submit", async (ev) => {
  ev.preventDefault();
  $("login-error").textContent = "";
  try {
    const info = await api("POST", "/api/login", {
      username: $("login-user").value, password: $("login-password").value,
    });
    $("login-password").value = "";
    startSession(info);
  } catch (e) {
    $("login-error").textContent = e.message;
  }
});

$("logout").addEventListener("click", async () => {
  try { await api("POST", "/api/logout"); } catch (e) { /* the session is gone either way */ }
  showLogin();
});

// ---- formatting --------------------------------------------------------------------------------
function formatTime(epoch) {
  if (!epoch) return "-";
  let fmt;
  try {
    fmt = new Intl.DateTimeFormat("sv-SE", {
      timeZone: state.timezone, year: "numeric", month: "2-digit", day: "2-digit",
      hour: "2-digit", minute: "2-digit", second: "2-digit", hourCycle: "h23",
    });
  } catch (e) {
    fmt = new Intl.DateTimeFormat("sv-SE", { timeZone: "UTC", dateStyle: "short", timeStyle: "medium" });
  }
  return fmt.format(new Date(epoch * 1000));
}

function nextSyncText(row) {
  if (row.next_sync === null || row.next_sync === undefined) return "-";
  return row.next_sync <= Date.now() / 1000 ? "pending" : formatTime(row.next_sync);
}

function statusText(row) {
  if (row.remove_job && row.state === "OK") return `removal pending (${row.remove_job})`;
  return row.status;
}

function cells(row) {
  return [
    row.id, String(row.guest), row.target, statusText(row), formatTime(row.last_sync), nextSyncText(row),
    row.duration ? `${row.duration.toFixed(2)} s` : "-", String(row.fail_count), row.schedule,
    row.rate === null || row.rate === undefined ? "-" : String(row.rate), row.comment || "",
    row.enabled ? "Yes" : "No",
  ];
}

function stateClass(row) {
  if (row.state === "SYNCING") return "syncing";
  if (row.state !== "OK") return "failed";
  return "";
}

// ---- the tree and routing ----------------------------------------------------------------------
function routeHash(r) {
  if (r.kind === "node") return `#/node/${encodeURIComponent(r.name)}`;
  if (r.kind === "guest") return `#/guest/${r.vmid}`;
  return "#/";
}

function parseHash() {
  const parts = location.hash.replace(/^#\/?/, "").split("/").map(decodeURIComponent);
  if (parts[0] === "node" && parts[1]) return { kind: "node", name: parts[1] };
  if (parts[0] === "guest" && /^[0-9]+$/.test(parts[1] || "")) return { kind: "guest", vmid: Number(parts[1]) };
  return { kind: "datacenter" };
}

function treeLink(text, r) {
  const a = document.createElement("a");
  a.href = routeHash(r);
  a.textContent = text;
  a.dataset.route = routeHash(r);
  return a;
}

function renderTree() {
  const root = $("tree");
  root.replaceChildren();
  const dc = document.createElement("li");
  dc.append(treeLink("Datacenter", { kind: "datacenter" }));
  const nodes = document.createElement("ul");
  for (const node of state.nodes) {
    const li = document.createElement("li");
    li.className = "node";
    li.append(treeLink(node.name, { kind: "node", name: node.name }));
    const guests = state.guests.filter((g) => g.node === node.name);
    if (guests.length) {
      const ul = document.createElement("ul");
      for (const g of guests) {
        const gl = document.createElement("li");
        gl.className = "guest";
        gl.append(treeLink(String(g.vmid), { kind: "guest", vmid: g.vmid }));
        ul.append(gl);
      }
      li.append(ul);
    }
    nodes.append(li);
  }
  dc.append(nodes);
  root.append(dc);
  markCurrent();
}

function markCurrent() {
  const current = routeHash(state.route);
  for (const a of $("tree").querySelectorAll("a")) {
    if (a.dataset.route === current) a.setAttribute("aria-current", "page");
    else a.removeAttribute("aria-current");
  }
}

async function refreshTree() {
  clearTimeout(state.treeTimer);
  try {
    const [nodes, guests] = await Promise.all([api("GET", "/api/nodes"), api("GET", "/api/guests")]);
    const key = JSON.stringify([nodes.map((n) => n.name), guests.map((g) => [g.vmid, g.node, g.type])]);
    // Rebuild only on a change: a rebuilt tree would take the keyboard focus away.
    if (key !== state.treeKey) {
      state.treeKey = key;
      state.nodes = nodes;
      state.guests = guests;
      renderTree();
      fillGuestOptions();
    }
  } catch (e) {
    if (e.status === 401) return;
    $("panel-error").textContent = e.message;
  }
  state.treeTimer = setTimeout(refreshTree, TREE_REFRESH);
}

function panelTitle(r) {
  if (r.kind === "node") return `Replication — node ${r.name}`;
  if (r.kind === "guest") return `Replication — guest ${r.vmid}`;
  return "Replication — Datacenter";
}

function route() {
  state.route = parseHash();
  $("panel-title").textContent = panelTitle(state.route);
  $("jobs-caption").textContent = `Replication jobs of ${
    state.route.kind === "datacenter" ? "the datacenter"
      : state.route.kind === "node" ? `node ${state.route.name}` : `guest ${state.route.vmid}`}`;
  $("jobs-body").replaceChildren();
  state.rows.clear();
  state.jobs.clear();
  state.selected = null;
  $("panel-error").textContent = "";
  markCurrent();
  updateButtons();
  refreshJobs();
}

window.addEventListener("hashchange", () => { if (!$("app-view").hidden) route(); });

// ---- the jobs table ----------------------------------------------------------------------------
function jobsPath() {
  const r = state.route;
  if (r.kind === "node") return `/api/jobs?node=${encodeURIComponent(r.name)}`;
  if (r.kind === "guest") return `/api/jobs?guest=${r.vmid}`;
  return "/api/jobs";
}

function newRow(row) {
  const tr = document.createElement("tr");
  tr.dataset.id = row.id;
  const pick = document.createElement("td");
  const radio = document.createElement("input");
  radio.type = "radio";
  radio.name = "job-select";
  radio.value = row.id;
  radio.setAttribute("aria-label", `Select job ${row.id}`);
  radio.addEventListener("change", () => select(row.id));
  pick.append(radio);
  tr.append(pick);
  for (let i = 0; i < 12; i++) tr.append(document.createElement("td"));
  tr.addEventListener("click", (ev) => {
    if (ev.target !== radio) { radio.checked = true; select(row.id); }
  });
  tr.addEventListener("dblclick", () => { select(row.id); openEdit(); });
  return tr;
}

function fillRow(tr, row) {
  const texts = cells(row);
  const tds = tr.children;
  texts.forEach((text, i) => {
    if (tds[i + 1].textContent !== text) tds[i + 1].textContent = text;
  });
  tds[4].className = stateClass(row);
  tr.classList.toggle("disabled", !row.enabled);
}

function render(rows) {
  const body = $("jobs-body");
  const seen = new Set();
  let previous = null;
  for (const row of rows) {
    seen.add(row.id);
    state.jobs.set(row.id, row);
    let tr = state.rows.get(row.id);
    if (!tr) {
      tr = newRow(row);
      state.rows.set(row.id, tr);
    }
    fillRow(tr, row);
    // Move a row only when it is out of place: moving the focused row would take the focus away.
    const expected = previous ? previous.nextSibling : body.firstChild;
    if (expected !== tr) body.insertBefore(tr, expected);
    previous = tr;
  }
  for (const [id, tr] of state.rows) {
    if (!seen.has(id)) {
      tr.remove();
      state.rows.delete(id);
      state.jobs.delete(id);
      if (state.selected === id) state.selected = null;
    }
  }
  for (const [id, tr] of state.rows) {
    const chosen = id === state.selected;
    tr.classList.toggle("selected", chosen);
    tr.firstChild.firstChild.checked = chosen;
  }
  $("jobs-empty").hidden = rows.length > 0;
  updateButtons();
}

function busy(rows) {
  const now = Date.now() / 1000;
  return rows.some((r) => r.state === "SYNCING" || r.remove_job || (r.next_sync !== null && r.next_sync <= now + 2));
}

async function refreshJobs() {
  clearTimeout(state.timer);
  const path = jobsPath();
  let delay = SLOW_REFRESH;
  try {
    const rows = await api("GET", path);
    if (path !== jobsPath()) return;  // the operator moved to another panel meanwhile
    render(rows);
    delay = busy(rows) ? FAST_REFRESH : SLOW_REFRESH;
  } catch (e) {
    if (e.status === 401) return;
    $("panel-error").textContent = e.message;
  }
  state.timer = setTimeout(refreshJobs, delay);
}

function select(id) {
  state.selected = id;
  for (const [rid, tr] of state.rows) tr.classList.toggle("selected", rid === id);
  updateButtons();
}

function selectedJob() {
  return state.selected ? state.jobs.get(state.selected) : null;
}

function updateButtons() {
  const job = selectedJob();
  for (const id of ["btn-edit", "btn-remove", "btn-schedule-now", "btn-log"]) $(id).disabled = !job;
  $("btn-enable").disabled = !job || job.enabled;
  $("btn-disable").disabled = !job || !job.enabled;
}

async function act(fn) {
  $("panel-error").textContent = "";
  try {
    await fn();
  } catch (e) {
    $("panel-error").textContent = e.message;
  }
  refreshJobs();
}

const jobUrl = (id, rest = "") => `/api/jobs/${encodeURIComponent(id)}${rest}`;

$("btn-schedule-now").addEventListener("click", () => act(() => api("POST", jobUrl(state.selected, "/schedule-now"))));
$("btn-enable").addEventListener("click", () => act(() => api("POST", jobUrl(state.selected, "/enable"))));
$("btn-disable").addEventListener("click", () => act(() => api("POST", jobUrl(state.selected, "/disable"))));

// ---- the Add / Edit dialog ---------------------------------------------------------------------
function fillGuestOptions() {
  const list = $("guest-options");
  list.replaceChildren(...state.guests.map((g) => {
    const o = document.createElement("option");
    o.value = String(g.vmid);
    o.label = `${g.vmid} (${g.type} on ${g.node})`;
    return o;
  }));
}

function fillTargets(selected) {
  const guest = state.guests.find((g) => String(g.vmid) === $("f-guest").value.trim());
  const select = $("f-target");
  const names = state.nodes.map((n) => n.name).filter((n) => !guest || n !== guest.node);
  const keep = selected !== undefined ? selected : select.value;
  select.replaceChildren(...names.map((n) => {
    const o = document.createElement("option");
    o.value = n;
    o.textContent = n;
    return o;
  }));
  if (names.includes(keep)) select.value = keep;
}

let previewTimer = null;
let previewSeq = 0;

function schedulePreview() {
  clearTimeout(previewTimer);
  previewTimer = setTimeout(async () => {
    const expr = $("f-schedule").value.trim() || "*/15";
    const seq = ++previewSeq;
    const out = $("schedule-preview");
    try {
      const data = await api("GET", `/api/calendar?expr=${encodeURIComponent(expr)}&iterations=3`);
      if (seq !== previewSeq) return;
      const events = data.events.map((e) => formatTime(Date.parse(e) / 1000));
      out.className = "preview" + (data.job_ok ? "" : " error");
      out.textContent = data.job_ok ? `Next: ${events.join(", ")}` : `Not allowed for a job: it ${data.reason}`;
    } catch (e) {
      if (seq !== previewSeq) return;
      out.className = "preview error";
      out.textContent = e.message;
    }
  }, 250);
}

$("f-schedule").addEventListener("input", schedulePreview);
$("f-guest").addEventListener("input", () => fillTargets());

function openDialog(mode) {
  const dlg = $("job-dialog");
  $("job-error").textContent = "";
  $("job-dialog-title").textContent = mode === "add" ? "Add: Replication job" : `Edit: Replication job ${state.selected}`;
  $("job-submit").textContent = mode === "add" ? "Create" : "OK";
  $("f-guest").readOnly = mode === "edit";
  $("f-target").disabled = mode === "edit";
  dlg.showModal();
}

$("btn-add").addEventListener("click", () => {
  const r = state.route;
  state.dialog = { mode: "add" };
  $("f-guest").value = r.kind === "guest" ? String(r.vmid) : "";
  $("f-schedule").value = "*/15";
  $("f-rate").value = "";
  $("f-comment").value = "";
  $("f-enabled").checked = true;
  fillTargets("");
  openDialog("add");
  $("f-guest").readOnly = r.kind === "guest";
  schedulePreview();
  (r.kind === "guest" ? $("f-target") : $("f-guest")).focus();
});

async function openEdit() {
  const id = state.selected;
  if (!id) return;
  $("panel-error").textContent = "";
  let job;
  try {
    job = await api("GET", jobUrl(id));
  } catch (e) {
    $("panel-error").textContent = e.message;
    return;
  }
  const original = {
    schedule: job.schedule, rate: job.rate === undefined ? "" : String(job.rate),
    comment: job.comment || "", enabled: !job.disable,
  };
  state.dialog = { mode: "edit", id, original, digest: job.digest };
  $("f-guest").value = String(job.guest);
  fillTargets(job.target);
  const select = $("f-target");
  if (![...select.options].some((o) => o.value === job.target)) {
    const o = document.createElement("option");
    o.value = job.target;
    o.textContent = job.target;
    select.append(o);
  }
  select.value = job.target;
  $("f-schedule").value = original.schedule;
  $("f-rate").value = original.rate;
  $("f-comment").value = original.comment;
  $("f-enabled").checked = original.enabled;
  openDialog("edit");
  schedulePreview();
  $("f-schedule").focus();
}

$("btn-edit").addEventListener("click", openEdit);
$("job-cancel").addEventListener("click", () => $("job-dialog").close());

function createBody() {
  const body = { guest: $("f-guest").value.trim(), target: $("f-target").value, enabled: $("f-enabled").checked };
  const schedule = $("f-schedule").value.trim();
  if (schedule) body.schedule = schedule;
  const rate = $("f-rate").value.trim();
  if (rate) body.rate = rate;
  const comment = $("f-comment").value;
  if (comment.trim()) body.comment = comment;
  return body;
}

function updateBody(original, digest) {
  const body = { digest };
  const remove = [];
  const fields = { schedule: $("f-schedule").value.trim(), rate: $("f-rate").value.trim(), comment: $("f-comment").value };
  for (const [key, value] of Object.entries(fields)) {
    if (value === original[key]) continue;
    if (value.trim() === "") remove.push(key);
    else body[key] = value;
  }
  if ($("f-enabled").checked !== original.enabled) body.enabled = $("f-enabled").checked;
  if (remove.length) body.delete = remove;
  return Object.keys(body).length > 1 ? body : null;
}

$("job-form").addEventListener("submit", async (ev) => {
  ev.preventDefault();
  const d = state.dialog;
  $("job-error").textContent = "";
  try {
    if (d.mode === "add") {
      const job = await api("POST", "/api/jobs", createBody());
      state.selected = job.id;
    } else {
      const body = updateBody(d.original, d.digest);
      if (body) await api("PUT", jobUrl(d.id), body);
    }
    $("job-dialog").close();
    refreshJobs();
  } catch (e) {
    $("job-error").textContent = e.message;
  }
});

// ---- Remove and Log ----------------------------------------------------------------------------
$("btn-remove").addEventListener("click", () => {
  $("remove-title").textContent = `Remove replication job ${state.selected}`;
  $("remove-error").textContent = "";
  document.querySelector('input[name="remove-mode"][value="full"]').checked = true;
  $("remove-dialog").showModal();
});
$("remove-cancel").addEventListener("click", () => $("remove-dialog").close());
$("remove-form").addEventListener("submit", async (ev) => {
  ev.preventDefault();
  const mode = document.querySelector('input[name="remove-mode"]:checked').value;
  const query = mode === "keep" ? "?keep=1" : mode === "force" ? "?force=1" : "";
  try {
    await api("DELETE", jobUrl(state.selected) + query);
    $("remove-dialog").close();
    refreshJobs();
  } catch (e) {
    $("remove-error").textContent = e.message;
  }
});

$("btn-log").addEventListener("click", async () => {
  const id = state.selected;
  $("log-title").textContent = `Log: replication job ${id}`;
  $("log-text").textContent = "";
  $("log-dialog").showModal();
  try {
    const lines = await api("GET", jobUrl(id, "/log"));
    $("log-text").textContent = lines.length ? lines.join("\n") : "(no run yet)";
  } catch (e) {
    $("log-text").textContent = e.message;
  }
});
$("log-close").addEventListener("click", () => $("log-dialog").close());

// ---- start -------------------------------------------------------------------------------------
(async () => {
  try {
    startSession(await api("GET", "/api/session"));
  } catch (e) {
    showLogin(e.status === 401 ? "" : e.message);
  }
})();
