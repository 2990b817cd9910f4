// ferry portal: a single page over the vault's REST API (docs/api.md).
// No framework and nothing fetched from elsewhere: it works offline.
"use strict";

const $ = (sel, root = document) => root.querySelector(sel);
// gen counts route changes: a page still loading when the user moves on
// must not draw over the new one or keep refreshing.
const state = { token: sessionStorage.getItem("ferry.token") || "", role: "", timer: null, gen: 0 };

// --- API ---------------------------------------------------------------

async function api(method, path, body) {
  const opts = { method, headers: { Authorization: "Bearer " + state.token } };
  if (body !== undefined) {
    opts.headers["Content-Type"] = "application/json";
    opts.body = JSON.stringify(body);
  }
  const resp = await fetch(path, opts);
  const text = await resp.text();
  let data = null;
  try { data = text ? JSON.parse(text) : null; } catch (e) { data = { error: text }; }
  if (!resp.ok) {
    const err = new Error((data && data.error) || resp.status + " " + resp.statusText);
    err.status = resp.status;
    throw err;
  }
  return data;
}

// --- helpers -----------------------------------------------------------

function el(tag, attrs = {}, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (v === undefined || v === null || v === false) continue;
    if (k.startsWith("on")) e.addEventListener(k.slice(2), v);
    else if (k === "class") e.className = v;
    else e.setAttribute(k, v === true ? "" : v);
  }
  for (const c of children.flat()) {
    if (c === null || c === undefined || c === false) continue;
    e.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return e;
}

const badge = (text, cls) => el("span", { class: "badge " + (cls || text) }, text);
const isZeroTime = (t) => !t || t.startsWith("0001-");
// Times are shown in the browser's time zone or in UTC (the switch in the
// header, remembered), always with the zone named.
const zone = () => (localStorage.getItem("ferry.tz") === "UTC" ? "UTC" : undefined);
function fmtTime(t) {
  if (isZeroTime(t)) return "—";
  return new Date(t).toLocaleString(undefined, { timeZone: zone(), timeZoneName: "short", year: "numeric", month: "short", day: "numeric", hour: "2-digit", minute: "2-digit", second: "2-digit" });
}
const fmtRPO = (s) => (s === undefined || s === null ? "—" : s < 1 ? Math.round(s * 1000) + " ms" : s.toFixed(1) + " s");
function fmtDur(a, b) {
  if (isZeroTime(a)) return "";
  const ms = (isZeroTime(b) ? Date.now() : new Date(b)) - new Date(a);
  return ms < 1000 ? ms + " ms" : (ms / 1000).toFixed(1) + " s";
}
function fmtBytes(n) {
  const u = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (n >= 1024 && i < u.length - 1) { n /= 1024; i++; }
  return (i ? n.toFixed(1) : n) + " " + u[i];
}

function showError(err) {
  const b = $("#banner");
  if (!err) { b.hidden = true; return; }
  b.textContent = err.message || String(err);
  b.hidden = false;
}

function setTimer(fn, ms) {
  clearInterval(state.timer);
  state.timer = fn ? setInterval(fn, ms) : null;
}

// --- sign in -----------------------------------------------------------

async function signIn(token) {
  state.token = token;
  try {
    const who = await api("GET", "/v1/whoami");
    state.role = who.role;
  } catch (e) {
    state.token = "";
    sessionStorage.removeItem("ferry.token");
    throw e.status === 401 ? new Error("That token is not valid: ask an operator for one ('ferry token create', or the token 'ferry up' printed).") : e;
  }
  sessionStorage.setItem("ferry.token", token);
  $("#login").hidden = true;
  $("#nav").hidden = false;
  $("#logout").hidden = false;
  $("#who").textContent = "signed in as " + state.role;
  document.body.dataset.role = state.role;
}

function signOut() {
  sessionStorage.removeItem("ferry.token");
  state.token = state.role = "";
  setTimer(null);
  $("#view").replaceChildren();
  $("#nav").hidden = $("#logout").hidden = true;
  $("#who").textContent = "";
  $("#login").hidden = false;
  $("#token").value = "";
  $("#token").focus();
}

const canAct = () => state.role === "operator";

// --- router ------------------------------------------------------------

// route draws the page the hash names. Each page function fills a fresh
// container and may return { refresh, every }: refresh runs every `every`
// ms while the page is shown, and returns false to stop.
async function route() {
  if (!state.role) return;
  const gen = ++state.gen;
  setTimer(null);
  showError(null);
  const parts = (location.hash || "#/items").slice(2).split("/");
  for (const a of document.querySelectorAll("header nav a")) {
    if (a.id === "nav-" + parts[0]) a.setAttribute("aria-current", "page");
    else a.removeAttribute("aria-current");
  }
  const view = el("div");
  let page;
  try {
    if (parts[0] === "items" && parts[1]) page = await itemPage(view, decodeURIComponent(parts[1]));
    else if (parts[0] === "jobs" && parts[1]) page = await jobPage(view, decodeURIComponent(parts[1]));
    else if (parts[0] === "jobs") page = await jobsPage(view);
    else if (parts[0] === "sites") page = await sitesPage(view);
    else if (parts[0] === "vms") page = await vmsPage(view);
    else if (parts[0] === "alerts") page = await alertsPage(view);
    else if (parts[0] === "policies") page = await policiesPage(view);
    else if (parts[0] === "access") page = await accessPage(view);
    else if (parts[0] === "plans" && parts[1]) page = await planPage(view, decodeURIComponent(parts[1]));
    else if (parts[0] === "imports" && parts[2]) page = await importPage(view, decodeURIComponent(parts[1]), decodeURIComponent(parts[2]));
    else page = await itemsPage(view);
  } catch (e) {
    if (gen === state.gen) showError(e);
    return;
  }
  if (gen !== state.gen) return;
  $("#view").replaceChildren(view);
  alertCount();
  if (page && page.refresh) {
    setTimer(async () => {
      if (gen !== state.gen) return;
      try {
        if ((await page.refresh()) === false && gen === state.gen) setTimer(null);
      } catch (e) { showError(e); }
    }, page.every);
  }
}

// --- replicated items --------------------------------------------------

const itemsView = { filter: "", sort: "vm", dir: 1 };

async function itemsPage(view) {
  const card = el("section", { class: "card", id: "items" });
  view.replaceChildren(card);
  const render = async () => {
    const ps = (await api("GET", "/v1/protections")) || [];
    const q = itemsView.filter.toLowerCase();
    const rows = ps.filter((p) => !q || [p.vm, p.source, p.target, p.state, p.health].join(" ").toLowerCase().includes(q));
    const key = itemsView.sort;
    rows.sort((a, b) => {
      const x = a[key] ?? "", y = b[key] ?? "";
      return (x < y ? -1 : x > y ? 1 : 0) * itemsView.dir;
    });
    const cols = [["vm", "VM"], ["source", "Source"], ["target", "Recovery site"], ["state", "State"], ["health", "Health"], ["rpo_seconds", "RPO"], ["last_point", "Last point"], ["last_app_point", "Last app-consistent"]];
    const head = el("tr", {}, cols.map(([k, label]) => el("th", { scope: "col", "aria-sort": key === k ? (itemsView.dir > 0 ? "ascending" : "descending") : "none" },
      el("button", { class: "sort", type: "button", onclick: () => { itemsView.dir = key === k ? -itemsView.dir : 1; itemsView.sort = k; render(); } },
        label + (key === k ? (itemsView.dir > 0 ? " ▲" : " ▼") : "")))));
    const body = rows.map((p) => el("tr", { "data-vm": p.vm },
      el("td", {}, el("a", { href: "#/items/" + encodeURIComponent(p.vm) }, p.vm)),
      el("td", {}, p.source), el("td", {}, p.target),
      el("td", {}, p.state, p.test_failover_pending ? " (test failover pending cleanup)" : "", p.job ? el("span", { class: "muted" }, " · job running") : ""),
      el("td", { title: p.health_reason || "" }, badge(p.health || "—", p.health)),
      el("td", { class: "rpo" }, fmtRPO(p.rpo_seconds)),
      el("td", {}, fmtTime(p.last_point)), el("td", {}, fmtTime(p.last_app_point))));
    const table = el("table", {}, el("thead", {}, head), el("tbody", {}, body.length ? body : el("tr", {}, el("td", { colspan: cols.length, class: "muted" }, ps.length ? "No item matches the filter." : "Nothing is protected yet: ferry protect VM --to SITE"))));
    const old = $("#items table", card);
    if (old) old.replaceWith(table); else card.append(table);
  };
  const filter = el("input", { type: "search", id: "filter", placeholder: "Filter by VM, site, state, health", "aria-label": "Filter replicated items", value: itemsView.filter,
    oninput: (e) => { itemsView.filter = e.target.value; render(); } });
  card.append(el("h1", {}, "Replicated items"), el("div", { class: "toolbar" }, filter, el("span", { class: "muted" }, "refreshes every 2 s")));
  const plansCard = el("section", { class: "card", id: "plans" });
  view.append(plansCard);
  const renderPlans = async () => {
    const plans = (await api("GET", "/v1/plans")) || [];
    plansCard.replaceChildren(el("h2", {}, "Recovery plans"), plans.length ? el("table", {},
      el("thead", {}, el("tr", {}, ["Plan", "Boot order", "Job"].map((h) => el("th", { scope: "col" }, h)))),
      el("tbody", {}, plans.map((p) => el("tr", { "data-plan": p.name },
        el("td", {}, el("a", { href: "#/plans/" + enc(p.name) }, p.name)),
        el("td", {}, p.groups.map((g) => g.vms.join(", ")).join(" → ")),
        el("td", {}, p.job ? el("a", { href: "#/jobs/" + p.job }, p.job) : "—")))))
      : el("p", { class: "muted" }, "No recovery plans: ferry plan create NAME --group VM --group VM,VM"));
  };
  const both = async () => { await render(); await renderPlans(); };
  await both();
  return { refresh: both, every: 2000 };
}

// --- one item ----------------------------------------------------------

async function itemPage(view, vm) {
  const p = await api("GET", "/v1/protections/" + encodeURIComponent(vm));
  let points = [];
  try { points = (await api("GET", "/v1/protections/" + encodeURIComponent(vm) + "/points")) || []; } catch (e) { /* after commit there are none */ }
  const hist = (await api("GET", "/v1/protections/" + encodeURIComponent(vm) + "/rpo-history")) || [];
  const vms = (await api("GET", "/v1/vms")) || [];
  const spec = vms.find((v) => v.name === vm) || {};
  const runsAt = spec.site || p.source;

  const topo = el("div", { class: "topology", "aria-label": "topology" },
    el("div", { class: "site" + (runsAt === p.source ? " active" : "") }, el("strong", {}, p.source), el("small", {}, runsAt === p.source ? "VM runs here" : "source")),
    el("span", { class: "arrow", "aria-label": "replicates to" }, p.state === "failed-over" || p.state === "failover-committed" ? "⇢" : "→"),
    el("div", { class: "site" + (runsAt === p.target ? " active" : "") }, el("strong", {}, p.target), el("small", {}, runsAt === p.target ? "VM runs here" : "recovery site")));

  const facts = el("div", { class: "grid" },
    el("div", {}, el("span", {}, "State"), p.state, p.test_failover_pending ? " · test failover pending cleanup" : ""),
    el("div", {}, el("span", {}, "Health"), badge(p.health || "—", p.health), p.health_reason ? el("small", { class: "muted", id: "health-reason" }, " " + p.health_reason) : ""),
    el("div", {}, el("span", {}, "RPO"), el("b", { id: "rpo" }, fmtRPO(p.rpo_seconds))),
    el("div", {}, el("span", {}, "Policy"), p.policy),
    el("div", {}, el("span", {}, "Generation"), String(p.generation)),
    el("div", {}, el("span", {}, "Last point"), fmtTime(p.last_point)),
    el("div", {}, el("span", {}, "Last app-consistent point"), fmtTime(p.last_app_point)),
    el("div", {}, el("span", {}, "Running job"), p.job ? el("a", { href: "#/jobs/" + p.job }, p.job) : "none"),
    el("div", {}, el("span", {}, "Link"), el("span", { id: "link" }, linkText(p.link))));

  const actions = el("div", { class: "actions", id: "actions" });
  if (canAct()) {
    const busy = !!p.job;
    const act = (label, id, enabled, fn, cls) => actions.append(el("button", { type: "button", id, class: cls, disabled: busy || !enabled, onclick: fn }, label));
    const prot = p.state === "protected";
    // Dialogs take the points as they are when opened (one a second).
    const fresh = async () => { try { return (await api("GET", "/v1/protections/" + encodeURIComponent(vm) + "/points")) || []; } catch (e) { return points; } };
    act("Test failover", "act-test-failover", prot && !p.test_failover_pending, async () => testFailoverDialog(p, await fresh()));
    act("Cleanup test failover", "act-cleanup", p.test_failover_pending, () => cleanupDialog(p));
    act("Failover", "act-failover", prot && !p.test_failover_pending, async () => failoverDialog(p, await fresh()), "danger");
    act("Change recovery point", "act-change-point", p.state === "failed-over", async () => changePointDialog(p, await fresh()));
    act("Commit", "act-commit", p.state === "failed-over", () => commitDialog(p));
    act("Re-protect", "act-reprotect", p.state === "failover-committed", () => reprotectDialog(p));
    act("Disable protection", "act-disable", ["protected", "enabling", "initial-sync", "failover-committed"].includes(p.state) && !p.test_failover_pending, () => disableDialog(p));
    if (busy) actions.append(el("span", { class: "muted" }, "A job is running: actions wait for it."));
  }

  const pointRows = points.slice().reverse().map((pt) => el("tr", {}, el("td", {}, String(pt.seq)), el("td", {}, fmtTime(pt.time)),
    el("td", {}, pt.type === "app" ? "application-consistent" : pt.type === "crash" ? "crash-consistent" : pt.type), el("td", {}, pt.label || "")));
  const history = (p.history || []).slice().reverse().map((h) => el("tr", {}, el("td", {}, h.action), el("td", {}, fmtTime(h.time)), el("td", {}, h.duration || ""), el("td", {}, h.point ? String(h.point) : ""), el("td", {}, h.notes || "")));

  const head = el("section", { class: "card", id: "item" }, el("h1", {}, vm), topo, facts, el("h2", {}, "Actions"),
    canAct() ? actions : el("p", { class: "muted" }, "Sign in with an operator token to run DR actions."));
  const chart = el("section", { class: "card", id: "charts" }, el("h2", {}, "Replication over the last hours"),
    el("h3", {}, "RPO"), rpoChart(hist, p),
    el("div", { class: "charts" },
      el("div", {}, el("h3", {}, "Throughput"), seriesChart(hist, "throughput_bytes_per_second", (v) => fmtBytes(v) + "/s", "throughput")),
      el("div", {}, el("h3", {}, "Bytes pending"), seriesChart(hist, "pending_bytes", fmtBytes, "bytes written and not yet acknowledged")),
      el("div", {}, el("h3", {}, "Source journal"), seriesChart(hist, "journal_bytes", fmtBytes, "size of the source journal")),
      el("div", {}, el("h3", {}, "Low-entropy data overwritten with high"), seriesChart(lowHighRate(hist), "low_to_high_rate", (v) => fmtBytes(v) + "/s",
        "ransomware detector: low-entropy bytes overwritten with high-entropy data per second, at the recovery site"))));
  const pointsTable = el("table", { id: "points" },
    el("thead", {}, el("tr", {}, el("th", {}, "Id"), el("th", {}, "Time"), el("th", {}, "Type"), el("th", {}, "Label"))),
    el("tbody", {}, pointRows.length ? pointRows : el("tr", {}, el("td", { colspan: 4, class: "muted" }, "No recovery points (initial replication running, or the failover was committed)."))));
  const pointsCard = el("section", { class: "card" }, el("h2", {}, "Recovery points (" + points.length + ")"), el("div", { class: "scroll" }, pointsTable));
  const historyTable = el("table", {},
    el("thead", {}, el("tr", {}, el("th", {}, "Action"), el("th", {}, "Time"), el("th", {}, "Duration"), el("th", {}, "Point"), el("th", {}, "Notes"))),
    el("tbody", {}, history.length ? history : el("tr", {}, el("td", { colspan: 5, class: "muted" }, "No drills or failovers yet."))));
  const historyCard = el("section", { class: "card" }, el("h2", {}, "History"), historyTable);
  // The serial console, streamed: the VM's wherever it runs, or its
  // test failover's at the recovery site.
  const con = { which: p.test_failover_pending ? "test" : "vm", off: 0, text: "" };
  const pre = el("pre", { id: "console", class: "console", tabindex: 0, "aria-label": "serial console" });
  const where = el("span", { id: "console-where", class: "muted" });
  const pick = (which, label) => el("button", { type: "button", id: "con-" + which, "aria-pressed": String(con.which === which),
    onclick: (ev) => {
      con.which = which; con.off = 0; con.text = ""; pre.textContent = "";
      for (const b of ev.target.parentNode.querySelectorAll("button")) b.setAttribute("aria-pressed", String(b === ev.target));
      pollConsole();
    } }, label);
  const pollConsole = async () => {
    try {
      const c = await api("GET", "/v1/vms/" + enc(vm) + "/console?offset=" + con.off + (con.which === "test" ? "&test=1" : ""));
      if (c.data) {
        con.text = (con.text + c.data).slice(-65536);
        pre.textContent = con.text;
        pre.scrollTop = pre.scrollHeight;
      }
      con.off = c.next;
      where.textContent = (con.which === "test" ? "test VM " + vm + "-drill" : "VM " + vm) + " at " + c.site;
    } catch (e) {
      if (!con.text) pre.textContent = "No console: " + e.message;
    }
  };
  const consoleCard = el("section", { class: "card", id: "console-card" }, el("h2", {}, "Console"),
    el("div", { class: "toolbar", role: "group", "aria-label": "which console" }, pick("vm", "VM"),
      p.test_failover_pending ? pick("test", "Test failover VM") : "", where), pre);
  view.replaceChildren(...[ransomwareCard(p), head, chart, canAct() ? filesCard(p, points) : null, consoleCard, pointsCard, historyCard].filter(Boolean));
  pollConsole();
  return {
    every: 2000,
    refresh: async () => {
      const q = await api("GET", "/v1/protections/" + encodeURIComponent(vm));
      if (q.state !== p.state || q.job !== p.job || q.test_failover_pending !== p.test_failover_pending || !!q.ransomware !== !!p.ransomware) {
        route(); // redraw with the actions the new state allows
        return false;
      }
      $("#rpo", view).textContent = fmtRPO(q.rpo_seconds);
      $("#link", view).textContent = linkText(q.link);
      await pollConsole();
    },
  };
}

// fmtRate prints bits per second.
function fmtRate(bps) {
  if (!bps) return "unlimited";
  return bps >= 1e9 ? (bps / 1e9).toFixed(bps % 1e9 ? 1 : 0) + " Gbit/s" : bps >= 1e6 ? (bps / 1e6).toFixed(bps % 1e6 ? 1 : 0) + " Mbit/s" : (bps / 1e3).toFixed(0) + " kbit/s";
}

// parseRate reads "50Mbit", "1.5Gbit", "800kbit", "20MB" (bytes) or "off"
// into bits per second (NaN if it cannot).
function parseRate(s) {
  const m = /^\s*(off|unlimited|0|([0-9.]+)\s*([kmg]?)(bit|bits|bps|b)?)\s*$/i.exec(s);
  if (!m) return NaN;
  if (!m[2]) return 0;
  const unit = { "": 1, k: 1e3, m: 1e6, g: 1e9 }[m[3].toLowerCase()];
  return Math.round(parseFloat(m[2]) * unit * (m[4] && m[4].toLowerCase() === "b" ? 8 : 1));
}

// linkText sums up a protection's replication stream.
function linkText(l) {
  if (!l) return "—";
  const parts = [fmtBytes(l.throughput_bytes_per_second) + "/s"];
  if (l.wire_bytes > 0 && l.wire_bytes < l.payload_bytes) parts.push(`compressed ${(l.payload_bytes / l.wire_bytes).toFixed(2)}× (${fmtBytes(l.payload_bytes)} sent as ${fmtBytes(l.wire_bytes)})`);
  if (l.cap_bits_per_second) parts.push("cap " + fmtRate(l.cap_bits_per_second));
  if (l.link_bits_per_second) parts.push(`link ~${fmtRate(l.link_bits_per_second)}, ${l.compressing ? "compressing" : "sent plain (faster than compressing)"}`);
  if (l.backlog_bytes > 1 << 20) parts.push("backlog " + fmtBytes(l.backlog_bytes) + (l.clears_in_seconds < 0 ? ", not shrinking" : l.clears_in_seconds > 0 ? `, clears in ~${Math.round(l.clears_in_seconds)} s` : ""));
  return parts.join(" · ");
}

function rpoChart(hist, p) {
  const W = 1100, H = 200, L = 52, B = 22;
  const svg = (tag, attrs) => { const e = document.createElementNS("http://www.w3.org/2000/svg", tag); for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, v); return e; };
  const c = svg("svg", { class: "chart", viewBox: `0 0 ${W} ${H}`, role: "img", "aria-label": "RPO chart, " + hist.length + " samples" });
  if (hist.length < 2) {
    const t = svg("text", { x: 20, y: H / 2 }); t.textContent = "Collecting samples: the chart fills in as the vault polls (every 10 s)."; c.append(t);
    return c;
  }
  const t0 = new Date(hist[0].t).getTime(), t1 = new Date(hist[hist.length - 1].t).getTime();
  // A round top: 1, 2 or 5 times a power of ten, above the worst sample.
  const worst = Math.max(0.5, ...hist.map((s) => s.rpo)) * 1.1;
  const mag = Math.pow(10, Math.floor(Math.log10(worst)));
  const ymax = [1, 2, 5, 10].map((m) => m * mag).find((v) => v >= worst);
  const x = (t) => L + ((t - t0) / Math.max(1, t1 - t0)) * (W - L - 10);
  const y = (v) => H - B - (v / ymax) * (H - B - 10);
  c.append(svg("polyline", { class: "line", points: hist.map((s) => x(new Date(s.t).getTime()) + "," + y(s.rpo)).join(" ") }));
  for (const v of [0, ymax / 2, ymax]) { const t = svg("text", { x: 4, y: y(v) + 4 }); t.textContent = fmtRPO(v); c.append(t); }
  for (const tt of [t0, t1]) { const t = svg("text", { x: x(tt) - (tt === t1 ? 60 : 0), y: H - 6 }); t.textContent = new Date(tt).toLocaleTimeString(); c.append(t); }
  return c;
}

// seriesChart draws one figure of the replication history, small.
// lowHighRate turns the detector's running count into a rate per slot.
function lowHighRate(hist) {
  return hist.map((s, i) => {
    const prev = i ? hist[i - 1] : null;
    const dt = prev ? (new Date(s.t) - new Date(prev.t)) / 1000 : 0;
    const d = prev && s.low_to_high_bytes !== undefined && prev.low_to_high_bytes !== undefined ? s.low_to_high_bytes - prev.low_to_high_bytes : 0;
    return { t: s.t, low_to_high_rate: dt > 0 && d > 0 ? d / dt : 0 };
  });
}

function seriesChart(hist, key, fmt, label) {
  const W = 360, H = 120, L = 64, B = 18;
  const svg = (tag, attrs) => { const e = document.createElementNS("http://www.w3.org/2000/svg", tag); for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, v); return e; };
  const c = svg("svg", { class: "chart small", viewBox: `0 0 ${W} ${H}`, role: "img", "data-series": key, "aria-label": `${label}: ${hist.length} samples` + (hist.length ? `, latest ${fmt(hist[hist.length - 1][key] || 0)}` : "") });
  if (hist.length < 2) {
    const t = svg("text", { x: 10, y: H / 2 }); t.textContent = "Collecting samples (every 10 s)."; c.append(t);
    return c;
  }
  const t0 = new Date(hist[0].t).getTime(), t1 = new Date(hist[hist.length - 1].t).getTime();
  const top = Math.max(1, ...hist.map((s) => s[key] || 0)) * 1.1;
  const x = (t) => L + ((t - t0) / Math.max(1, t1 - t0)) * (W - L - 6);
  const y = (v) => H - B - (v / top) * (H - B - 8);
  c.append(svg("polyline", { class: "line", points: hist.map((s) => x(new Date(s.t).getTime()) + "," + y(s[key] || 0)).join(" ") }));
  for (const v of [0, top]) { const t = svg("text", { x: 2, y: y(v) + 4 }); t.textContent = fmt(Math.round(v)); c.append(t); }
  return c;
}

// --- alerts and events ---------------------------------------------------

// alertCount shows in the menu how many alerts are in force.
async function alertCount() {
  try {
    const as = (await api("GET", "/v1/alerts")) || [];
    const b = $("#alert-count");
    b.textContent = as.length ? String(as.length) : "";
    b.hidden = !as.length;
    b.className = "count " + (as.some((a) => a.severity === "critical") ? "critical" : "warning");
    b.setAttribute("aria-label", as.length + " alerts");
  } catch (e) { /* the page shows its own errors */ }
}

const objectLink = (o) => {
  const [kind, name] = o.split("/", 2);
  if (kind === "protection") return el("a", { href: "#/items/" + enc(name) }, "VM " + name);
  if (kind === "job") return el("a", { href: "#/jobs/" + enc(name) }, "job " + name);
  if (kind === "site") return el("a", { href: "#/sites" }, "site " + name);
  return o;
};

async function alertsPage(view) {
  const render = async () => {
    const as = (await api("GET", "/v1/alerts")) || [];
    const evs = (await api("GET", "/v1/events?limit=200")) || [];
    const alerts = el("section", { class: "card", id: "alerts" }, el("h1", {}, "Alerts"),
      as.length ? el("table", {}, el("thead", {}, el("tr", {}, ["Severity", "About", "Since", "What is wrong", "What to do"].map((h) => el("th", { scope: "col" }, h)))),
        el("tbody", {}, as.map((a) => el("tr", { "data-object": a.object, "data-severity": a.severity }, el("td", {}, badge(a.severity)), el("td", {}, objectLink(a.object)),
          el("td", {}, fmtTime(a.since)), el("td", {}, a.message), el("td", {}, a.action)))))
        : el("p", { class: "ok-note" }, "No alerts: every site answers and every protection is healthy."));
    const events = el("section", { class: "card", id: "events" }, el("h2", {}, "Events"),
      el("p", { class: "muted" }, "Alerts raised and cleared, and jobs that ended; the newest 200 of the 1,000 the vault keeps."),
      el("div", { class: "scroll" }, el("table", {}, el("thead", {}, el("tr", {}, ["Time", "Severity", "Event", "About", "Message"].map((h) => el("th", { scope: "col" }, h)))),
        el("tbody", {}, evs.length ? evs.map((e) => el("tr", { "data-event": e.id, "data-kind": e.kind }, el("td", {}, fmtTime(e.time)), el("td", {}, badge(e.severity, e.severity === "info" ? "pending" : e.severity)),
          el("td", {}, { raised: "alert raised", cleared: "alert cleared", "job-failed": "job failed", "job-succeeded": "job succeeded" }[e.kind] || e.kind),
          el("td", {}, objectLink(e.object)), el("td", {}, e.message, e.action ? el("small", { class: "muted" }, " " + e.action) : "")))
          : el("tr", {}, el("td", { colspan: 5, class: "muted" }, "Nothing yet."))))));
    view.replaceChildren(alerts, events);
    alertCount();
  };
  await render();
  return { refresh: render, every: 3000 };
}

// --- policies --------------------------------------------------------------

// Durations cross the API in nanoseconds; people write 30s, 15m, 24h, 7d.
const NS = { ms: 1e6, s: 1e9, m: 60e9, h: 3600e9, d: 86400e9 };
function parseDuration(str) {
  const m = /^\s*([0-9.]+)\s*(ms|s|m|h|d)\s*$/.exec(str);
  return m ? Math.round(parseFloat(m[1]) * NS[m[2]]) : NaN;
}
function fmtDuration(ns) {
  for (const u of ["d", "h", "m", "s"]) if (ns >= NS[u] && ns % NS[u] === 0) return ns / NS[u] + u;
  return ns >= NS.s ? (ns / NS.s).toFixed(1) + "s" : ns / NS.ms + "ms";
}

async function policiesPage(view) {
  const ps = (await api("GET", "/v1/policies")) || [];
  const rows = ps.map((p) => el("tr", { "data-policy": p.name }, el("td", {}, p.name), el("td", {}, fmtDuration(p.retention)), el("td", {}, fmtDuration(p.checkpoint_interval)),
    el("td", {}, fmtDuration(p.app_interval)), el("td", {}, fmtDuration(p.rpo_warning) + " / " + fmtDuration(p.rpo_critical)),
    el("td", {}, canAct() ? el("button", { type: "button", class: "act-edit", onclick: () => policyDialog(p) }, "Edit") : "")));
  view.replaceChildren(el("section", { class: "card", id: "policies" }, el("h1", {}, "Replication policies"),
    el("p", { class: "muted" }, "How long recovery points are kept, how often they are taken, and when the RPO turns a protection warning or critical."),
    canAct() ? el("div", { class: "toolbar" }, el("button", { type: "button", id: "act-new-policy", class: "primary", onclick: () => policyDialog(null) }, "New policy")) : "",
    el("table", {}, el("thead", {}, el("tr", {}, ["Name", "Retention", "Crash-consistent points every", "App-consistent points every", "RPO warning / critical", ""].map((h) => el("th", { scope: "col" }, h)))),
      el("tbody", {}, rows))));
}

function policyDialog(p) {
  const d = (id, label, value, hint) => field(label, el("input", { id, name: id, required: true, value: value ? fmtDuration(value) : "" }), hint);
  openDialog(p ? "Edit policy " + p.name : "New policy", [
    p ? "" : field("Name", el("input", { id: "pol-name", name: "name", required: true, placeholder: "gold" })),
    ...d("retention", "Retention", p && p.retention, "how far back recovery points go, e.g. 24h"),
    ...d("checkpoint", "Crash-consistent point every", p && p.checkpoint_interval, "e.g. 1s (any instant is also a point)"),
    ...d("app", "App-consistent point every", p && p.app_interval, "through the guest agent, e.g. 1h"),
    ...d("warn", "RPO warning threshold", p && p.rpo_warning, "e.g. 30s"),
    ...d("crit", "RPO critical threshold", p && p.rpo_critical, "e.g. 5m"),
  ].flat(), p ? "Save" : "Create", async (f) => {
    const name = p ? p.name : f.elements.name.value.trim();
    const body = { name };
    for (const [k, id] of [["retention", "retention"], ["checkpoint_interval", "checkpoint"], ["app_interval", "app"], ["rpo_warning", "warn"], ["rpo_critical", "crit"]]) {
      body[k] = parseDuration(f.elements[id].value);
      if (isNaN(body[k])) throw new Error(`"${f.elements[id].value}": write a duration like 30s, 15m, 24h or 7d`);
    }
    await api("PUT", "/v1/policies/" + enc(name), body);
    return { href: "#/policies" };
  });
}

// --- access: API tokens ----------------------------------------------------

async function accessPage(view) {
  if (!canAct()) {
    view.replaceChildren(el("section", { class: "card", id: "access" }, el("h1", {}, "Access"), el("p", { class: "muted" }, "Operators manage API tokens here; sign in with an operator token.")));
    return;
  }
  const ts = (await api("GET", "/v1/tokens")) || [];
  const rows = ts.map((t) => el("tr", { "data-token": t.id, "data-name": t.name }, el("td", {}, t.name), el("td", {}, t.role), el("td", {}, el("code", {}, t.id)),
    el("td", {}, fmtTime(t.created)), el("td", {}, t.expires ? fmtTime(t.expires) : "never"),
    el("td", {}, el("button", { type: "button", class: "act-revoke danger", "aria-label": "revoke the token " + t.name, onclick: () => revokeDialog(t) }, "Revoke"))));
  const fresh = state.newToken;
  state.newToken = null;
  view.replaceChildren(el("section", { class: "card", id: "access" }, el("h1", {}, "API tokens"),
    el("p", { class: "muted" }, "Operators run DR actions; readers see everything and change nothing; enroll tokens let a new site join. A token's secret is shown once, when it is created."),
    el("div", { class: "toolbar" }, el("button", { type: "button", id: "act-new-token", class: "primary", onclick: tokenDialog }, "New token")),
    fresh ? el("div", { id: "new-token", class: "secret", role: "status" }, el("p", {}, `The ${fresh.role} token for ${fresh.name}. Copy it now: it is not shown again.`),
      el("input", { id: "new-token-value", type: "text", readonly: true, value: fresh.token, "aria-label": "the new token" })) : "",
    el("table", {}, el("thead", {}, el("tr", {}, ["Name", "Role", "Id", "Created", "Expires", ""].map((h) => el("th", { scope: "col" }, h)))),
      el("tbody", {}, rows.length ? rows : el("tr", {}, el("td", { colspan: 6, class: "muted" }, "No tokens."))))));
}

function tokenDialog() {
  openDialog("New API token", [
    ...field("Name", el("input", { id: "tok-name", name: "name", required: true, placeholder: "alice" }), "who or what uses it"),
    ...field("Role", el("select", { id: "tok-role", name: "role" }, ["reader", "operator", "enroll"].map((r) => el("option", { value: r }, r)))),
    ...field("Lifetime", el("input", { id: "tok-ttl", name: "ttl", placeholder: "e.g. 720h; empty: until revoked" })),
  ], "Create", async (f) => {
    const t = await api("POST", "/v1/tokens", { name: f.elements.name.value.trim(), role: f.elements.role.value, ttl: f.elements.ttl.value.trim() });
    state.newToken = t;
    return { href: "#/access" };
  });
}

function revokeDialog(t) {
  openDialog("Revoke " + t.name + "'s token", [el("p", {}, `Calls with the ${t.role} token ${t.name} (${t.id}) are refused from now on. This cannot be undone.`)],
    "Revoke", async () => { await api("DELETE", "/v1/tokens/" + enc(t.id)); return { href: "#/access" }; }, "danger");
}

// --- dialogs -----------------------------------------------------------

// openDialog shows a form; submit runs act(form) -> job, then follows it.
function openDialog(title, body, okLabel, act, okClass) {
  const d = $("#dialog");
  if ($("#dialog-back")) $("#dialog-back").hidden = true;
  $("#dialog-title").textContent = title;
  $("#dialog-body").replaceChildren(...body);
  $("#dialog-error").hidden = true;
  const ok = $("#dialog-ok");
  ok.textContent = okLabel;
  ok.className = okClass || "primary";
  ok.disabled = false;
  $("#dialog-form").onsubmit = async (ev) => {
    ev.preventDefault();
    ok.disabled = true;
    try {
      // act returns a job to follow, or { href } of the page to show.
      const res = await act($("#dialog-form"));
      d.close();
      const to = res && res.href ? res.href : "#/jobs/" + res.id;
      if (location.hash === to) route(); else location.hash = to;
    } catch (e) {
      $("#dialog-error").textContent = e.message;
      $("#dialog-error").hidden = false;
      ok.disabled = false;
    }
  };
  $("#dialog-cancel").onclick = () => d.close();
  d.showModal();
  const first = $("#dialog-body input, #dialog-body select, #dialog-body textarea", d);
  (first || ok).focus();
}

// pointPicker picks a recovery point on a timeline of the retention
// window: click it (or move along it with the arrow keys), type a time
// (in the zone the header shows; the newest point at or before it), or
// search a label (the newest point whose label has it). The choice is the
// hidden input id, named "point". Choosing sets the dialog's "custom"
// option if it has one.
function pointPicker(points, id, startSeq) {
  const pts = points.slice().sort((a, b) => a.seq - b.seq);
  const ms = pts.map((pt) => new Date(pt.time).getTime());
  const hidden = el("input", { type: "hidden", id, name: "point", value: pts.length ? String(pts[pts.length - 1].seq) : "" });
  const chosen = el("p", { id: id + "-chosen", class: "chosen", "aria-live": "polite" });
  const kind = (pt) => (pt.type === "app" ? "application-consistent" : pt.type === "crash" ? "crash-consistent" : pt.type);
  const W = 640, H = 54, PAD = 8;
  const svg = (tag, attrs) => { const e = document.createElementNS("http://www.w3.org/2000/svg", tag); for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, v); return e; };
  const line = svg("svg", { class: "timeline", id: id + "-timeline", viewBox: `0 0 ${W} ${H}`, tabindex: 0, role: "slider",
    "aria-label": "recovery points on a timeline: arrow keys move from point to point", "aria-valuemin": pts.length ? pts[0].seq : 0, "aria-valuemax": pts.length ? pts[pts.length - 1].seq : 0 });
  const t0 = ms.length ? ms[0] : 0, t1 = ms.length ? ms[ms.length - 1] : 1;
  const x = (t) => PAD + ((t - t0) / Math.max(1, t1 - t0)) * (W - 2 * PAD);
  line.append(svg("line", { class: "axis", x1: PAD, x2: W - PAD, y1: H - 16, y2: H - 16 }));
  // One tick per pixel column that holds points, app-consistent ones taller.
  const cols = new Map();
  pts.forEach((pt, i) => {
    const c = Math.round(x(ms[i]));
    cols.set(c, (cols.get(c) || pt.type === "app") ? true : pt.type === "app");
  });
  for (const [c, app] of cols) line.append(svg("line", { class: app ? "tick app" : "tick", x1: c, x2: c, y1: app ? 6 : 16, y2: H - 16 }));
  pts.forEach((pt, i) => { if (pt.label) line.append(svg("circle", { class: "labelled", cx: x(ms[i]), cy: 6, r: 3 })); });
  const cursor = svg("line", { class: "cursor", x1: 0, x2: 0, y1: 2, y2: H - 12 });
  line.append(cursor);
  for (const [t, anchor] of [[t0, "start"], [t1, "end"]]) {
    const txt = svg("text", { x: anchor === "start" ? PAD : W - PAD, y: H - 2, "text-anchor": anchor });
    txt.textContent = pts.length ? fmtTime(new Date(t).toISOString()) : "";
    line.append(txt);
  }
  let cur = pts.length - 1;
  if (startSeq) { const i = pts.findIndex((pt) => pt.seq === startSeq); if (i >= 0) cur = i; }
  const choose = (i, byUser) => {
    if (i < 0 || i >= pts.length) return;
    cur = i;
    const pt = pts[i];
    hidden.value = String(pt.seq);
    cursor.setAttribute("x1", x(ms[i])); cursor.setAttribute("x2", x(ms[i]));
    line.setAttribute("aria-valuenow", pt.seq);
    line.setAttribute("aria-valuetext", `point ${pt.seq}, ${fmtTime(pt.time)}`);
    chosen.textContent = `Point ${pt.seq} · ${fmtTime(pt.time)} · ${kind(pt)}${pt.label ? " · " + pt.label : ""}`;
    if (byUser) { const r = document.getElementById("choice-custom"); if (r) r.checked = true; }
  };
  const err = el("p", { class: "error", id: id + "-error", role: "alert", hidden: true });
  const say = (msg) => { err.textContent = msg || ""; err.hidden = !msg; };
  line.addEventListener("click", (ev) => {
    const r = line.getBoundingClientRect();
    const t = t0 + ((ev.clientX - r.left) / r.width * W - PAD) / (W - 2 * PAD) * (t1 - t0);
    let best = 0;
    ms.forEach((m, i) => { if (Math.abs(m - t) < Math.abs(ms[best] - t)) best = i; });
    say(""); choose(best, true);
  });
  line.addEventListener("keydown", (ev) => {
    const to = { ArrowLeft: cur - 1, ArrowRight: cur + 1, Home: 0, End: pts.length - 1 }[ev.key];
    if (to === undefined) return;
    ev.preventDefault(); say(""); choose(Math.max(0, Math.min(pts.length - 1, to)), true);
  });
  // A typed time is read in the zone the header shows.
  const timeIn = el("input", { type: "text", id: id + "-time", placeholder: "YYYY-MM-DD HH:MM:SS", autocomplete: "off" });
  const byTime = () => {
    const v = timeIn.value.trim();
    if (!v) return;
    const m = /^(\d{4}-\d\d-\d\d)[ T](\d\d:\d\d(:\d\d)?)$/.exec(v);
    if (!m) return say(`"${v}": write a time like 2026-12-02 10:41:59`);
    const iso = m[1] + "T" + m[2] + (m[3] ? "" : ":00");
    const t = (zone() === "UTC" ? Date.parse(iso + "Z") : new Date(iso).getTime()) + 999; // the whole second
    let best = -1;
    ms.forEach((m2, i) => { if (m2 <= t) best = i; });
    if (best < 0) return say(`No point at or before ${v}: the oldest is ${pts.length ? fmtTime(pts[0].time) : "none"}.`);
    say(""); choose(best, true);
  };
  timeIn.addEventListener("change", byTime);
  timeIn.addEventListener("keydown", (ev) => { if (ev.key === "Enter") { ev.preventDefault(); byTime(); } });
  // Enter in the picker picks; it must never submit the dialog (a
  // failover).
  const noSubmit = (ev) => { if (ev.key === "Enter") ev.preventDefault(); };
  const labelIn = el("input", { type: "search", id: id + "-label", placeholder: "a point's label", autocomplete: "off" });
  labelIn.addEventListener("input", () => {
    const q = labelIn.value.trim().toLowerCase();
    if (!q) return say("");
    for (let i = pts.length - 1; i >= 0; i--) if ((pts[i].label || "").toLowerCase().includes(q)) { say(""); return choose(i, true); }
    say(`No point is labelled "${labelIn.value}".`);
  });
  for (const i of [timeIn, labelIn]) i.addEventListener("keypress", noSubmit);
  labelIn.addEventListener("keydown", noSubmit);
  choose(cur, false);
  return el("div", { class: "picker" }, line,
    el("div", { class: "row" },
      el("div", {}, el("label", { for: id + "-time" }, `At or before (${zone() === "UTC" ? "UTC" : "this browser's zone"})`), timeIn),
      el("div", {}, el("label", { for: id + "-label" }, "Or a label"), labelIn)),
    chosen, err, hidden, el("p", { class: "explain" }, `${pts.length} points: tall marks are application-consistent, dots are labelled.`));
}

// The last clean point of an open ransomware incident, offered first.
const lastCleanSeq = (p) => (p.ransomware && p.ransomware.last_clean ? p.ransomware.last_clean.seq : 0);
function lastCleanOption(p) {
  const lc = p.ransomware && p.ransomware.last_clean;
  if (!lc) return null;
  const o = option("choice", "last-clean", "Last clean point (before the suspected ransomware)",
    `Point ${lc.seq} · ${fmtTime(lc.time)}: the newest point before low-entropy data began to be overwritten with high-entropy data.`, false);
  // With an incident open it is the point to use: chosen first.
  setTimeout(() => { const r = document.getElementById("choice-last-clean"); if (r) r.checked = true; }, 0);
  return o;
}

// ransomwareCard is the item page's banner while an incident is open.
function ransomwareCard(p) {
  const inc = p.ransomware;
  if (!inc) return null;
  const lc = inc.last_clean;
  const card = el("section", { class: "card alert critical", id: "ransomware", role: "alert" },
    el("h2", {}, "Ransomware suspected"),
    el("p", {}, `Since ${fmtTime(inc.start)}, low-entropy data (documents, logs, records) is being overwritten with high-entropy data: `,
      el("b", {}, fmtBytes(inc.peak_bytes)), ` in one window, where the most before was ${fmtBytes(inc.baseline_bytes)}.`),
    el("p", {}, lc ? ["Last clean point: ", el("b", { id: "last-clean" }, `${lc.seq} · ${fmtTime(lc.time)}`), ". Restore files from it below, drill it, or fail over to it."]
      : "No recovery point before it is left."));
  if (canAct()) {
    card.append(el("div", { class: "actions" },
      el("button", { type: "button", id: "act-dismiss", onclick: () => confirmDialog("Dismiss the incident of " + p.vm,
        "The alert clears and retention no longer keeps the last clean point. Do this once the VM is dealt with.", "Dismiss",
        () => post(p, "/ransomware/dismiss", {})) }, "Dismiss")));
  }
  return card;
}

// filesCard browses a recovery point's files (read at the recovery site
// through libguestfs; the VM is not booted) and downloads them.
function filesCard(p, points) {
  const hasClean = !!lastCleanSeq(p);
  const pointSel = el("select", { id: "files-point", name: "files-point" },
    hasClean ? el("option", { value: "last-clean" }, "Last clean point") : null,
    el("option", { value: "latest-processed" }, "Latest processed"),
    points.slice().reverse().slice(0, 200).map((pt) => el("option", { value: String(pt.seq) }, `${pt.seq} · ${fmtTime(pt.time)}`)));
  const crumbs = el("nav", { id: "files-path", class: "crumbs", "aria-label": "path" });
  const status = el("p", { id: "files-status", class: "muted", "aria-live": "polite" });
  const tbody = el("tbody", { id: "files-list" });
  const table = el("table", { class: "files", hidden: true },
    el("thead", {}, el("tr", {}, el("th", {}, "Name"), el("th", {}, "Size"), el("th", {}, "Modified"), el("th", {}, ""))), tbody);
  const url = (path, extra) => "/v1/protections/" + enc(p.vm) + "/files" + extra + "?point=" + enc(pointSel.value) + "&path=" + enc(path);
  const join = (dir, name) => (dir === "/" ? "/" : dir + "/") + name;
  const download = async (path, name, raw) => {
    status.textContent = `Downloading ${path}…`;
    try {
      const resp = await fetch(url(path, "/content") + "&format=" + (raw ? "raw" : "tar"), { headers: { Authorization: "Bearer " + state.token } });
      if (!resp.ok) {
        let msg = resp.status + " " + resp.statusText;
        try { msg = (await resp.json()).error || msg; } catch (e) { /* not JSON */ }
        throw new Error(msg);
      }
      const blob = await resp.blob();
      const a = el("a", { href: URL.createObjectURL(blob), download: raw ? name : name + ".tar" });
      document.body.append(a); a.click(); a.remove();
      setTimeout(() => URL.revokeObjectURL(a.href), 60000);
      status.textContent = `Downloaded ${path} (${fmtBytes(blob.size)}) from point ${resp.headers.get("Ferry-Point")}.`;
    } catch (e) {
      status.textContent = "";
      showError(e);
    }
  };
  // Only the newest request draws: a change of point and a click on
  // Browse, or two quick clicks, must not draw an older answer last.
  let asked = 0;
  const open = async (path) => {
    const mine = ++asked;
    status.textContent = `Reading ${path} at ${p.target}… (the first look at a point starts a small appliance there: 10-30 s)`;
    try {
      const l = await api("GET", url(path, ""));
      if (mine !== asked) return;
      crumbs.replaceChildren(el("span", {}, `Point ${l.point.seq} · ${fmtTime(l.point.time)}: `));
      const parts = l.path.split("/").filter(Boolean);
      crumbs.append(el("a", { href: "#", onclick: (ev) => { ev.preventDefault(); open("/"); } }, "/"));
      parts.forEach((part, i) => {
        const to = "/" + parts.slice(0, i + 1).join("/");
        crumbs.append(" ", el("a", { href: "#", onclick: (ev) => { ev.preventDefault(); open(to); } }, part + "/"));
      });
      tbody.replaceChildren(...(l.entries || []).map((f) => {
        const full = join(l.path, f.name);
        const isDir = f.type === "dir" || (f.type === "filesystem" && !f.unsupported);
        const name = isDir ? el("a", { href: "#", class: "dir", "data-name": f.name, onclick: (ev) => { ev.preventDefault(); open(full); } }, f.name + "/")
          : el("span", {}, f.name + (f.type === "symlink" ? " → " + f.link : ""));
        const what = f.type === "filesystem" ? `${f.fs_type}${f.unsupported ? " (cannot be read: " + f.unsupported + ")" : ""}` : f.type === "dir" ? "" : fmtBytes(f.size);
        const btn = f.type === "file" ? el("button", { type: "button", class: "small", onclick: () => download(full, f.name, true) }, "Download")
          : isDir && f.type === "dir" ? el("button", { type: "button", class: "small", onclick: () => download(full, f.name, false) }, "Download .tar") : "";
        return el("tr", { "data-name": f.name }, el("td", {}, name), el("td", {}, what), el("td", {}, f.type === "filesystem" ? "" : fmtTime(f.mtime)), el("td", {}, btn));
      }));
      if (!l.entries || !l.entries.length) tbody.append(el("tr", {}, el("td", { colspan: 4, class: "muted" }, "Empty.")));
      table.hidden = false;
      status.textContent = "";
    } catch (e) {
      if (mine !== asked) return;
      status.textContent = "";
      showError(e);
    }
  };
  pointSel.addEventListener("change", () => open("/"));
  return el("section", { class: "card", id: "files-card" }, el("h2", {}, "Files"),
    el("p", { class: "explain" }, "Browse the VM's disks as they were at a recovery point and download files or folders. Nothing is written and the VM is not booted."),
    el("div", { class: "toolbar" }, el("label", { for: "files-point" }, "Point "), pointSel,
      el("button", { type: "button", id: "files-browse", onclick: () => open("/") }, "Browse")),
    status, crumbs, el("div", { class: "scroll" }, table));
}

function option(name, value, label, explain, checked) {
  return el("div", {}, el("label", { class: "inline" }, el("input", { type: "radio", name, value, checked, id: name + "-" + value }), el("span", {}, label)),
    el("p", { class: "explain" }, explain));
}

const post = (p, path, body) => api("POST", "/v1/protections/" + encodeURIComponent(p.vm) + path, body);

function testFailoverDialog(p, points) {
  openDialog("Test failover of " + p.vm, [
    el("p", {}, `A test VM boots at ${p.target} in the isolated network from a writable copy of the point; replication goes on untouched.`),
    el("div", { class: "options" },
      option("choice", "latest-processed", "Latest processed", "The newest point the recovery site has: lowest RTO.", true),
      option("choice", "latest-app-consistent", "Latest app-consistent", "The newest point taken with the guest's file systems frozen.", false),
      lastCleanOption(p),
      option("choice", "custom", "Custom", "Pick a point below.", false)),
    el("h3", {}, "Point (for Custom)"), pointPicker(points, "tf-point"),
  ], "Start test failover", (f) => {
    const c = f.elements.choice.value;
    return post(p, "/test-failover", { point: c === "custom" ? f.elements.point.value : c });
  });
}

function cleanupDialog(p) {
  const done = el("input", { type: "checkbox", id: "cleanup-done", name: "done", required: true });
  openDialog("Cleanup test failover of " + p.vm, [
    el("label", { for: "cleanup-notes" }, "Notes"),
    el("textarea", { id: "cleanup-notes", name: "notes", placeholder: "What was tested, and how it went" }),
    el("label", { class: "inline" }, done, el("span", {}, "Testing is complete. Delete the test failover VM and its disks.")),
  ], "Cleanup", (f) => post(p, "/test-failover/cleanup", { notes: f.elements.notes.value }));
}

function failoverDialog(p, points) {
  openDialog("Failover of " + p.vm, [
    el("p", {}, `From ${p.source} to ${p.target}. The VM will run at ${p.target} on the point you choose.`),
    el("div", { class: "options" },
      option("choice", "latest", "Latest (lowest RPO)", "First processes all data that reached the recovery site, then makes a point of it: nothing received is lost; takes a little longer.", true),
      option("choice", "latest-processed", "Latest processed (lowest RTO)", "Fails over to the newest point already made: fastest start.", false),
      option("choice", "latest-app-consistent", "Latest app-consistent", "The newest point taken with the file systems frozen: applications start clean.", false),
      lastCleanOption(p),
      option("choice", "custom", "Custom", "Pick a point below.", false)),
    el("h3", {}, "Point (for Custom)"), pointPicker(points, "fo-point"),
    el("label", { class: "inline" }, el("input", { type: "checkbox", id: "fo-shutdown", name: "shutdown", checked: true }),
      el("span", {}, `Shut down the machine before beginning failover (at ${p.source}; recommended: nothing is lost; skipped if the site is down).`)),
  ], "Failover", (f) => {
    const c = f.elements.choice.value;
    return post(p, "/failover", { point: c === "custom" ? f.elements.point.value : c, shutdown_source: f.elements.shutdown.checked });
  }, "danger");
}

function changePointDialog(p, points) {
  openDialog("Change recovery point of " + p.vm, [
    el("p", {}, "The VM is stopped, its writes since the failover are discarded, and it starts on the point you choose."),
    el("h3", {}, "Point"), pointPicker(points, "cp-point", lastCleanSeq(p)),
  ], "Change point", (f) => post(p, "/change-point", { point: f.elements.point.value }));
}

function disableDialog(p) {
  openDialog("Disable protection of " + p.vm, [
    el("p", {}, `Replication of ${p.vm} to ${p.target} stops. The VM keeps running where it is; it is no longer protected.`),
    el("label", { class: "inline" }, el("input", { type: "checkbox", id: "dis-keep", name: "keep" }),
      el("span", {}, `Keep the replica at ${p.target} (its disks, journal and recovery points); otherwise they are deleted.`)),
  ], "Disable protection", (f) => post(p, "/disable", { keep_replica: f.elements.keep.checked }), "danger");
}

function commitDialog(p) {
  openDialog("Commit the failover of " + p.vm, [
    el("p", {}, `The VM's disks at ${p.target} become standalone and the recovery points are deleted: you can no longer change the recovery point. Re-protect afterwards.`),
  ], "Commit", () => post(p, "/commit", {}));
}

async function reprotectDialog(p) {
  let plan;
  try { plan = await api("GET", "/v1/protections/" + encodeURIComponent(p.vm) + "/reprotect-plan"); } catch (e) { return showError(e); }
  const rows = plan.disks.map((d) => el("tr", {}, el("td", {}, "disk " + d.name), el("td", {}, fmtBytes(d.size)), el("td", {}, d.action)));
  rows.unshift(el("tr", {}, el("td", {}, "VM " + plan.vm.name), el("td", {}, ""), el("td", {}, plan.vm.action)));
  openDialog("Re-protect " + p.vm, [
    el("p", {}, `Replicate from ${plan.from} (where the VM runs) back to ${plan.to}.`),
    el("table", { id: "plan" }, el("thead", {}, el("tr", {}, el("th", {}, `At ${plan.to}`), el("th", {}, "Size"), el("th", {}, "Action"))), el("tbody", {}, rows)),
    el("p", {}, `Expected to send ${fmtBytes(plan.expected_bytes)} of ${fmtBytes(plan.max_bytes)} (${plan.method})${plan.why ? ": " + plan.why : ""}.`),
  ], "Re-protect", () => post(p, "/reprotect", {}));
}

// --- jobs --------------------------------------------------------------

async function jobsPage(view) {
  const card = el("section", { class: "card", id: "jobs" }, el("h1", {}, "Jobs"));
  view.replaceChildren(card);
  const render = async () => {
    const js = (await api("GET", "/v1/jobs")) || [];
    const table = el("table", {}, el("thead", {}, el("tr", {}, ["Job", "Action", "VM", "State", "Started", "Duration", "Error"].map((h) => el("th", {}, h)))),
      el("tbody", {}, js.map((j) => el("tr", { "data-job": j.id }, el("td", {}, el("a", { href: "#/jobs/" + j.id }, j.id)), el("td", {}, j.action), el("td", {}, j.plan ? el("a", { href: "#/plans/" + enc(j.plan) }, "plan " + j.plan) : el("a", { href: "#/items/" + encodeURIComponent(j.protection) }, j.protection)),
        el("td", {}, badge(j.state)), el("td", {}, fmtTime(j.created)), el("td", {}, fmtDur(j.created, j.ended)), el("td", { class: "error" }, j.error || "")))));
    const old = $("table", card);
    if (old) old.replaceWith(table); else card.append(table);
  };
  await render();
  return { refresh: render, every: 2000 };
}

async function jobPage(view, id) {
  const card = el("section", { class: "card", id: "job" });
  view.replaceChildren(card);
  const render = async () => {
    const j = await api("GET", "/v1/jobs/" + encodeURIComponent(id));
    const subject = j.plan ? el("a", { href: "#/plans/" + enc(j.plan) }, "plan " + j.plan) : el("a", { href: "#/items/" + encodeURIComponent(j.protection) }, j.protection);
    const controls = el("div", { class: "actions" });
    if (canAct() && j.plan && j.state === "waiting") {
      controls.append(el("button", { type: "button", id: "job-resume", class: "primary", onclick: async () => {
        try { await api("POST", "/v1/jobs/" + enc(j.id) + "/resume", {}); route(); } catch (e) { showError(e); }
      } }, "Done: continue the plan"));
    }
    if (canAct() && j.plan && j.state === "failed") {
      controls.append(el("button", { type: "button", id: "job-retry", onclick: async () => {
        try { await api("POST", "/v1/jobs/" + enc(j.id) + "/retry", {}); route(); } catch (e) { showError(e); }
      } }, "Retry from the failed step"));
    }
    card.replaceChildren(
      el("h1", {}, `${j.action} of `, subject, " ", badge(j.state)),
      el("p", { class: "muted" }, `job ${j.id} · started ${fmtTime(j.created)} · ${fmtDur(j.created, j.ended)}`),
      j.error ? el("p", { class: "error", role: "alert" }, j.error) : "",
      j.state === "waiting" ? el("p", { role: "status", id: "job-waiting" }, "The plan waits for an operator: do what the waiting step says, then continue.") : "",
      controls,
      ...j.steps.map((s) => el("div", { class: "step " + s.state, "data-step": s.name },
        el("header", {}, el("strong", {}, s.name), badge(s.state), el("progress", { max: 100, value: s.percent, "aria-label": s.name + " progress" }), el("span", { class: "muted" }, fmtDur(s.start, s.end))),
        s.messages && s.messages.length ? el("ul", {}, s.messages.map((m) => el("li", {}, m))) : "")));
    return j.state === "running" || j.state === "pending" || j.state === "waiting";
  };
  return (await render()) ? { refresh: render, every: 1000 } : null;
}

// --- recovery plans ----------------------------------------------------

async function planPage(view, name) {
  const plan = await api("GET", "/v1/plans/" + enc(name));
  const ps = (await api("GET", "/v1/protections")) || [];
  const prot = Object.fromEntries(ps.map((p) => [p.vm, p]));
  const actionText = (a) => (a.script ? "script " + a.script : "manual: " + a.manual) + (a.name ? " (" + a.name + ")" : "");
  const groups = plan.groups.map((g, i) => el("li", { class: "bootgroup", "data-group": String(i + 1) },
    (g.pre || []).map((a) => el("div", { class: "muted" }, "before: " + actionText(a))),
    el("strong", {}, `${i + 1}. ${g.name || "group " + (i + 1)}`), " — wait for " + ((g.wait && g.wait.for) || "guest-agent"),
    el("ul", {}, g.vms.map((vm) => {
      const p = prot[vm];
      return el("li", { "data-vm": vm }, el("a", { href: "#/items/" + enc(vm) }, vm), " ",
        p ? [p.source + " → " + p.target + " · " + p.state + (p.test_failover_pending ? " (drill pending cleanup)" : "") + " ", badge(p.health || "—", p.health)] : el("span", { class: "muted" }, "not protected"));
    })),
    (g.post || []).map((a) => el("div", { class: "muted" }, "after: " + actionText(a)))));
  const actions = el("div", { class: "actions", id: "plan-actions" });
  if (canAct()) {
    const run = (label, id, action, explain, cls, extra) => actions.append(el("button", { type: "button", id, class: cls, disabled: !!plan.job, onclick: () =>
      openDialog(label + " of plan " + name, [el("p", {}, explain), ...(extra ? extra() : [])], label, (f) =>
        api("POST", "/v1/plans/" + enc(name) + "/run", { action, notes: f.elements.notes ? f.elements.notes.value : "" }), cls) }, label));
    run("Test failover", "plan-test-failover", "test-failover", "Every VM of the plan boots at its recovery site in the isolated network, group after group, from its newest processed point.");
    run("Cleanup test failover", "plan-cleanup", "cleanup-test-failover", "Deletes the plan's test VMs.", "", () => [el("label", { for: "plan-notes" }, "Notes"), el("textarea", { id: "plan-notes", name: "notes" })]);
    run("Failover", "plan-failover", "failover", "Each VM's source shuts down and the VM starts at its recovery site from its latest point, group after group in boot order.", "danger");
    run("Commit", "plan-commit", "commit", "Commits every VM's failover: their recovery points are deleted.");
    run("Re-protect", "plan-reprotect", "reprotect", "Replicates every VM back to the site it came from.");
    if (plan.job) actions.append(el("span", { class: "muted" }, "A job of the plan runs or waits: ", el("a", { href: "#/jobs/" + plan.job }, plan.job)));
  }
  const hist = (plan.history || []).slice().reverse().map((h) => el("tr", {}, el("td", {}, h.action), el("td", {}, fmtTime(h.time)), el("td", {}, h.duration || ""), el("td", {}, h.notes || "")));
  view.replaceChildren(
    el("section", { class: "card", id: "plan" }, el("h1", {}, "Recovery plan " + name), el("h2", {}, "Boot order"), el("ol", { class: "bootorder" }, groups),
      el("h2", {}, "Actions"), canAct() ? actions : el("p", { class: "muted" }, "Sign in with an operator token to run the plan.")),
    el("section", { class: "card" }, el("h2", {}, "History"), el("table", {},
      el("thead", {}, el("tr", {}, ["Action", "Time", "Duration", "Outcome"].map((h) => el("th", {}, h)))),
      el("tbody", {}, hist.length ? hist : el("tr", {}, el("td", { colspan: 4, class: "muted" }, "The plan has not run yet."))))));
  return { every: 3000, refresh: async () => {
    const q = await api("GET", "/v1/plans/" + enc(name));
    if (q.job !== plan.job) { route(); return false; }
  } };
}

// --- virtual machines --------------------------------------------------

const enc = encodeURIComponent;

async function vmsPage(view) {
  const card = el("section", { class: "card", id: "vms" });
  view.replaceChildren(card);
  const sites = (await api("GET", "/v1/sites")) || [];
  const render = async () => {
    const vms = (await api("GET", "/v1/vms")) || [];
    const ps = (await api("GET", "/v1/protections")) || [];
    const prot = Object.fromEntries(ps.map((p) => [p.vm, p]));
    const rows = vms.map((v) => {
      const p = prot[v.name];
      const protectable = !p || p.state === "disabled";
      return el("tr", { "data-vm": v.name },
        el("td", {}, v.name, v.domain ? el("small", { class: "muted" }, " (libvirt)") : "",
          v.members && v.members.length ? el("small", { class: "muted" }, ` (consistency group: ${v.members.map((m) => m.name).join(", ")})`) : ""),
        el("td", {}, v.site),
        el("td", {}, v.domain ? "libvirt domain " + v.domain : "QEMU (run by ferry)"),
        el("td", {}, `${v.vcpus || 1} vCPU · ${v.memory_mib} MiB · ${v.firmware === "uefi" ? "UEFI" : "BIOS"}`),
        el("td", {}, (v.disks || []).map((d) => `${d.name} ${fmtBytes(d.size)}`).join(", ")),
        el("td", { class: "nics" }, (v.nics || []).map((n) => `${n.name} → ${n.network}`).join(", ")),
        el("td", {}, v.running ? "running" : "—"),
        el("td", {}, p && !protectable ? el("a", { href: "#/items/" + enc(v.name) }, p.state)
          : canAct() ? el("button", { type: "button", class: "act-protect", onclick: () => enableWizard(v) }, "Protect") : "not protected"));
    });
    const table = el("table", {}, el("thead", {}, el("tr", {}, ["VM", "Site", "Runtime", "Machine", "Disks", "NICs", "Running", "Protection"].map((h) => el("th", { scope: "col" }, h)))),
      el("tbody", {}, rows.length ? rows : el("tr", {}, el("td", { colspan: 8, class: "muted" }, "No VMs yet: define one, or import a libvirt domain."))));
    const old = $("table", card);
    if (old) old.replaceWith(table); else card.append(table);
    // Libvirt domains the sites have that ferry does not run yet.
    const found = [];
    for (const s of sites) {
      try { for (const d of (await api("GET", "/v1/sites/" + enc(s.name) + "/domains")) || []) found.push({ site: s.name, ...d }); } catch (e) { /* an unreachable site lists none */ }
    }
    const dom = el("section", { class: "card", id: "domains" }, el("h2", {}, "Libvirt domains not run by ferry"),
      el("p", { class: "muted" }, "VMs the libvirt sites run outside ferry. Import one to protect it: its disks are copied into ferry and it keeps running."),
      el("table", {}, el("thead", {}, el("tr", {}, ["Domain", "Site", "Machine", "Disks", "NICs", "State", ""].map((h) => el("th", { scope: "col" }, h)))),
        el("tbody", {}, found.map((d) => el("tr", { "data-domain": d.site + "/" + d.name }, el("td", {}, d.name), el("td", {}, d.site),
          el("td", {}, `${d.vcpus || 1} vCPU · ${d.memory_mib || "?"} MiB · ${d.firmware === "uefi" ? "UEFI" : "BIOS"}`),
          el("td", {}, (d.disks || []).map((x) => `${x.name} ${fmtBytes(x.size)} (${x.format})`).join(", ")), el("td", {}, String(d.nics)),
          el("td", {}, d.running ? "running" : "shut off"),
          el("td", {}, !d.importable ? el("span", { class: "muted" }, "cannot import: " + d.reason)
            : canAct() ? el("button", { type: "button", class: "act-import-domain", onclick: () => importDialog(sites, d.site, d.name) }, "Import") : ""))))));
    const oldDom = $("#domains", view);
    if (!found.length) { if (oldDom) oldDom.remove(); }
    else if (oldDom) oldDom.replaceWith(dom); else view.append(dom);
  };
  const tools = el("div", { class: "toolbar" });
  if (canAct()) {
    tools.append(el("button", { type: "button", id: "act-enable", class: "primary", onclick: () => enableWizard(null) }, "Enable replication"),
      el("button", { type: "button", id: "act-define", onclick: () => defineDialog(sites) }, "Define VM"),
      el("button", { type: "button", id: "act-import", onclick: () => importDialog(sites) }, "Import from libvirt"));
  }
  tools.append(el("span", { class: "muted" }, "refreshes every 5 s"));
  card.append(el("h1", {}, "Virtual machines"), tools);
  await render();
  return { refresh: render, every: 5000 };
}

const siteSelect = (sites, id) => el("select", { id, name: "site", required: true }, sites.map((s) => el("option", { value: s.name }, s.name)));
const field = (label, input, hint) => [el("label", { for: input.id }, label), input, hint ? el("p", { class: "explain" }, hint) : ""];
const lines = (text) => text.split(/[\n,]+/).map((x) => x.trim()).filter(Boolean);

// parseSize reads 10G, 512M, 64MiB or bytes, as the CLI does.
function parseSize(str) {
  const m = /^(\d+(?:\.\d+)?)\s*([KMGT]?)(i?B)?$/i.exec(str.trim());
  if (!m) throw new Error(`size "${str}": want a number with K, M, G or T (like 10G)`);
  const mult = { "": 1, K: 1 << 10, M: 1 << 20, G: 1 << 30, T: 2 ** 40 }[m[2].toUpperCase()];
  return Math.round(parseFloat(m[1]) * mult);
}

// pairs reads "a=b" items (one per line or comma-separated).
function pairs(text, what, example) {
  return lines(text).map((x) => {
    const i = x.indexOf("=");
    if (i <= 0 || i === x.length - 1) throw new Error(`${what} "${x}": want NAME=VALUE, like ${example}`);
    return [x.slice(0, i).trim(), x.slice(i + 1).trim()];
  });
}

function defineDialog(sites) {
  const nets = (site) => ((sites.find((s) => s.name === site) || {}).networks || []).filter((n) => n.kind === "production").map((n) => n.name).join(", ");
  const siteSel = siteSelect(sites, "vm-site");
  const netHint = el("p", { class: "explain", id: "vm-nets-hint" });
  const showNets = () => { netHint.textContent = "Production networks at this site: " + (nets(siteSel.value) || "none declared"); };
  siteSel.addEventListener("change", showNets);
  showNets();
  openDialog("Define a VM", [
    ...field("Name", el("input", { id: "vm-name", name: "name", required: true, pattern: "[a-z0-9][a-z0-9-]*", placeholder: "web" })),
    ...field("Site", siteSel),
    el("div", { class: "row" },
      el("div", {}, ...field("vCPUs", el("input", { id: "vm-vcpus", name: "vcpus", type: "number", min: 1, max: 64, value: 1 }))),
      el("div", {}, ...field("Memory (MiB)", el("input", { id: "vm-memory", name: "memory", type: "number", min: 16, value: 256 }))),
      el("div", {}, ...field("Firmware", el("select", { id: "vm-firmware", name: "firmware" }, el("option", { value: "bios" }, "BIOS (SeaBIOS)"), el("option", { value: "uefi" }, "UEFI (OVMF)"))))),
    ...field("Disks", el("textarea", { id: "vm-disks", name: "disks", required: true, rows: 2, placeholder: "vda=10G\nvdb=50G" }), "NAME=SIZE, one per line: empty disks, created at the site."),
    ...field("NICs", el("textarea", { id: "vm-nics", name: "nics", rows: 2, placeholder: "nic0=production\nnic1=backend" }), "NAME=NETWORK, one per line, in the order the guest sees them (empty: one NIC on the site's first production network)."),
    netHint,
    ...field("Published service", el("input", { id: "vm-forwards", name: "forwards", placeholder: "east=127.0.0.1:8081, west=127.0.0.1:8082" }), "SITE=HOST:PORT per site, reaching the guest port through the first NIC (optional)."),
    ...field("Guest port", el("input", { id: "vm-port", name: "port", type: "number", min: 1, max: 65535, value: 80 })),
    ...field("Kernel (optional: boot from the first disk without)", el("input", { id: "vm-kernel", name: "kernel", placeholder: "/var/lib/ferry/vmlinuz" })),
    ...field("Initrd", el("input", { id: "vm-initrd", name: "initrd" })),
    ...field("Kernel command line", el("input", { id: "vm-append", name: "append", placeholder: "console=ttyS0" })),
  ], "Define", async (f) => {
    const e = f.elements;
    const vm = { name: e.name.value.trim(), site: e.site.value, vcpus: +e.vcpus.value, memory_mib: +e.memory.value, firmware: e.firmware.value,
      guest_port: +e.port.value, qga: true, kernel: e.kernel.value.trim(), initrd: e.initrd.value.trim(), append: e.append.value.trim(),
      disks: pairs(e.disks.value, "disk", "vda=10G").map(([name, size]) => ({ name, size: parseSize(size) })),
      nics: pairs(e.nics.value, "NIC", "nic0=production").map(([name, network]) => ({ name, network })),
      forwards: Object.fromEntries(pairs(e.forwards.value, "published address", "east=127.0.0.1:8081")) };
    await api("POST", "/v1/vms", vm);
    return { href: "#/vms" };
  });
}

function importDialog(sites, site, domain) {
  openDialog("Import a libvirt domain", [
    el("p", {}, "Copies the domain's disks into ferry at its site (a running domain is imported live, with a block copy and a pivot: it keeps running) and switches the domain onto ferry's disks. Its own disks stay untouched; releasing the VM gives them back."),
    ...field("Site (runs libvirt)", (() => { const x = siteSelect(sites, "imp-site"); if (site) x.value = site; return x; })()),
    ...field("Domain", el("input", { id: "imp-domain", name: "domain", required: true, placeholder: "web", value: domain || "" }), "The libvirt domain's name at that site (virsh list --all)."),
    ...field("Published service", el("input", { id: "imp-forwards", name: "forwards", placeholder: "east=127.0.0.1:8081, west=127.0.0.1:8082" }), "SITE=HOST:PORT per site (optional)."),
    ...field("Guest port", el("input", { id: "imp-port", name: "port", type: "number", min: 0, max: 65535, value: 80 })),
  ], "Import", async (f) => {
    const e = f.elements;
    const req = { site: e.site.value, domain: e.domain.value.trim(), guest_port: +e.port.value,
      forwards: Object.fromEntries(pairs(e.forwards.value, "published address", "east=127.0.0.1:8081")) };
    await api("POST", "/v1/imports", req);
    return { href: "#/imports/" + enc(req.site) + "/" + enc(req.domain) };
  });
}

async function importPage(view, site, domain) {
  const card = el("section", { class: "card", id: "import" });
  view.replaceChildren(card);
  const render = async () => {
    const st = await api("GET", "/v1/imports/" + enc(site) + "/" + enc(domain));
    const pct = st.total_bytes ? Math.floor((100 * st.done_bytes) / st.total_bytes) : st.state === "done" ? 100 : 0;
    const res = st.result;
    card.replaceChildren(
      el("h1", {}, `Import of ${domain} at ${site} `, badge(st.state, st.state === "done" ? "succeeded" : st.state)),
      el("progress", { id: "import-progress", max: 100, value: pct, "aria-label": "import progress" }),
      el("p", { class: "muted" }, `${fmtBytes(st.done_bytes || 0)} of ${fmtBytes(st.total_bytes || 0)} copied`),
      st.error ? el("p", { class: "error", role: "alert" }, st.error) : "",
      res ? el("div", { id: "import-result" },
        el("p", {}, `${res.live ? "Imported live" : "Imported"} in ${res.seconds.toFixed(2)} s: ${res.disks.length} disk(s), ${(res.nics || []).length} NIC(s). `,
          el("a", { href: "#/vms" }, "The VM is defined"), ": protect it from the VM list."),
        el("table", {}, el("thead", {}, el("tr", {}, ["Disk", "From", "Format", "Size", "Data copied"].map((h) => el("th", {}, h)))),
          el("tbody", {}, res.disks.map((d) => el("tr", {}, el("td", {}, d.name), el("td", {}, d.source), el("td", {}, d.format), el("td", {}, fmtBytes(d.size)), el("td", {}, fmtBytes(d.copied))))))) : "");
    return st.state === "copying";
  };
  return (await render()) ? { refresh: render, every: 1000 } : null;
}

// enableWizard is ASR's "Enable replication": pick the VMs (of one
// site, not protected yet), the recovery site and the policy, map each
// NIC to a network there and pick the drill network, review what will be
// created and copied, then start a job per VM and follow it.
async function enableWizard(preselect) {
  const [sites, vms, ps, pols] = await Promise.all([api("GET", "/v1/sites"), api("GET", "/v1/vms"), api("GET", "/v1/protections"), api("GET", "/v1/policies")]);
  const prot = Object.fromEntries((ps || []).map((p) => [p.vm, p]));
  const free = (vms || []).filter((v) => !prot[v.name] || prot[v.name].state === "disabled");
  if (!free.length) return showError(new Error("Every VM is protected already: define or import one on this page first."));
  const w = { source: preselect ? preselect.site : free[0].site, vms: preselect ? [preselect.name] : [], target: "", policy: "default", nets: {}, test: {} };
  const nicsOf = (v) => (v.nics && v.nics.length ? v.nics : [{ name: "nic0", network: "" }]);
  const siteOf = (name) => (sites || []).find((s) => s.name === name) || { networks: [] };
  const chosen = () => free.filter((v) => w.vms.includes(v.name));
  const steps = [
    { title: "virtual machines", render: () => {
      const src = el("select", { id: "wz-source", name: "source" }, [...new Set(free.map((v) => v.site))].map((n) => el("option", { value: n, selected: n === w.source }, n)));
      const list = el("fieldset", { id: "wz-vms" }, el("legend", {}, "VMs to protect"));
      const draw = () => list.replaceChildren(el("legend", {}, "VMs to protect"), ...free.filter((v) => v.site === src.value).map((v) =>
        el("label", { class: "inline" }, el("input", { type: "checkbox", id: "wz-vm-" + v.name, name: "vm", value: v.name, checked: w.vms.includes(v.name) }),
          el("span", {}, `${v.name}: ${(v.disks || []).map((d) => `${d.name} ${fmtBytes(d.size)}`).join(", ")} · ${nicsOf(v).length} NIC(s) · ${v.running ? "running" : "stopped"}`))));
      src.addEventListener("change", draw);
      draw();
      return [el("p", {}, "Replicate VMs continuously to a recovery site, with recovery points there. Start with the VMs, all at one site."), ...field("Source site", src), list];
    }, check: (f) => {
      w.source = f.elements.source.value;
      w.vms = [...f.querySelectorAll('input[name="vm"]:checked')].map((x) => x.value);
      if (!w.vms.length) throw new Error("Pick at least one VM.");
    } },
    { title: "recovery site and policy", render: () => {
      const others = (sites || []).filter((s) => s.name !== w.source);
      return [...field("Recovery site", el("select", { id: "wz-target", name: "target" }, others.map((s) => el("option", { value: s.name, selected: s.name === w.target }, `${s.name}${s.reachable ? "" : " (unreachable)"}`)))),
        ...field("Replication policy", el("select", { id: "wz-policy", name: "policy" }, (pols || []).map((p) => el("option", { value: p.name, selected: p.name === w.policy },
          `${p.name}: points kept ${fmtDuration(p.retention)}, app-consistent every ${fmtDuration(p.app_interval)}, RPO alerts at ${fmtDuration(p.rpo_warning)} / ${fmtDuration(p.rpo_critical)}`))),
        "policies are managed on the Policies page")];
    }, check: (f) => {
      if (!f.elements.target || !f.elements.target.value) throw new Error("There is no other site to replicate to: add one (ferry site add).");
      w.target = f.elements.target.value;
      w.policy = f.elements.policy.value;
    } },
    { title: "networks", render: () => {
      const s = siteOf(w.target);
      const prod = (s.networks || []).filter((n) => n.kind === "production");
      const iso = (s.networks || []).filter((n) => n.kind === "isolated");
      return [el("p", {}, `Where each NIC attaches at ${w.target} after a failover, and where drills run (isolated).`), ...chosen().flatMap((v) => [el("h3", {}, v.name),
        ...nicsOf(v).flatMap((n) => field(`${n.name} (on ${n.network || "its site's network"}) fails over to`,
          el("select", { id: `pr-nic-${v.name}-${n.name}`, "data-vm": v.name, "data-nic": n.name }, prod.map((x) => el("option", { value: x.name, selected: (w.nets[v.name] || {})[n.name] === x.name }, `${x.name} (${x.subnet})`))))),
        ...field("Drills run on", el("select", { id: "pr-test-" + v.name, "data-test": v.name }, iso.map((x) => el("option", { value: x.name, selected: w.test[v.name] === x.name }, `${x.name} (${x.subnet}, isolated)`))))])];
    }, check: (f) => {
      for (const sel of f.querySelectorAll("select[data-nic]")) (w.nets[sel.dataset.vm] = w.nets[sel.dataset.vm] || {})[sel.dataset.nic] = sel.value;
      for (const sel of f.querySelectorAll("select[data-test]")) w.test[sel.dataset.test] = sel.value;
    } },
    { title: "review", render: () => {
      const vs = chosen();
      const total = vs.reduce((n, v) => n + (v.disks || []).reduce((m, d) => m + d.size, 0), 0);
      return [el("p", {}, `From ${w.source} to ${w.target}, policy ${w.policy}.`),
        el("table", { id: "wz-review" }, el("thead", {}, el("tr", {}, ["VM", `Created at ${w.target}`, "NICs fail over to", "Drills on"].map((h) => el("th", { scope: "col" }, h)))),
          el("tbody", {}, vs.map((v) => el("tr", { "data-vm": v.name }, el("td", {}, v.name),
            el("td", {}, `replica ${v.name}: ` + (v.disks || []).map((d) => `disk ${d.name} ${fmtBytes(d.size)}`).join(", ") + ", its journal and recovery points"),
            el("td", {}, nicsOf(v).map((n) => `${n.name} → ${(w.nets[v.name] || {})[n.name] || "the first production network"}`).join(", ")),
            el("td", {}, w.test[v.name] || "the first isolated network"))))),
        el("p", { id: "wz-bytes" }, `Initial replication copies at most ${fmtBytes(total)} (the disks' size; holes and zero blocks are not sent), then streams every write.`)];
    } },
  ];
  wizard("Enable replication", steps, "Enable replication", async () => {
    const jobs = [];
    for (const v of chosen()) {
      jobs.push(await api("POST", "/v1/protections", { vm: v.name, target: w.target, policy: w.policy, networks: w.nets[v.name] || {}, test_network: w.test[v.name] || "" }));
    }
    return jobs.length === 1 ? jobs[0] : { href: "#/jobs" };
  });
}

// wizard runs a dialog in steps: Next checks a step and shows the next;
// the last runs finish, which returns a job to follow or { href }.
function wizard(title, steps, finishLabel, finish) {
  const d = $("#dialog");
  const ok = $("#dialog-ok");
  let back = $("#dialog-back");
  if (!back) {
    back = el("button", { type: "button", id: "dialog-back" }, "Back");
    ok.before(back);
  }
  let i = 0;
  const show = () => {
    $("#dialog-title").textContent = `${title}: ${steps[i].title} (step ${i + 1} of ${steps.length})`;
    $("#dialog-body").replaceChildren(...steps[i].render().flat());
    $("#dialog-error").hidden = true;
    ok.textContent = i === steps.length - 1 ? finishLabel : "Next";
    ok.className = "primary";
    ok.disabled = false;
    back.hidden = i === 0;
    const first = $("#dialog-body input, #dialog-body select", d);
    (first || ok).focus();
  };
  const fail = (e) => { $("#dialog-error").textContent = e.message; $("#dialog-error").hidden = false; ok.disabled = false; };
  back.onclick = () => { if (i > 0) { i--; show(); } };
  $("#dialog-form").onsubmit = async (ev) => {
    ev.preventDefault();
    try {
      if (steps[i].check) await steps[i].check($("#dialog-form"));
    } catch (e) { return fail(e); }
    if (i < steps.length - 1) { i++; show(); return; }
    ok.disabled = true;
    try {
      const res = await finish();
      d.close();
      const to = res && res.href ? res.href : "#/jobs/" + res.id;
      if (location.hash === to) route(); else location.hash = to;
    } catch (e) { fail(e); }
  };
  $("#dialog-cancel").onclick = () => d.close();
  show();
  d.showModal();
}

// --- sites -------------------------------------------------------------

async function sitesPage(view) {
  const sites = (await api("GET", "/v1/sites")) || [];
  const caps = (await api("GET", "/v1/bandwidth")) || {};
  const limText = (l) => [fmtRate(l.bits_per_second), ...(l.schedule || []).map((w) => `${w.days || "every day"} ${w.from}-${w.to}: ${fmtRate(w.bits_per_second)}`)].join("; ") + (l.time_zone && (l.schedule || []).length ? ` (${l.time_zone})` : "");
  const rows = [...(caps.pairs || []).map((p) => el("tr", { "data-cap": p.from + ">" + p.to }, el("td", {}, `${p.from} → ${p.to}`), el("td", {}, limText(p.limit)))),
    ...Object.entries(caps.vms || {}).map(([vm, l]) => el("tr", { "data-cap": "vm:" + vm }, el("td", {}, "VM " + vm), el("td", {}, limText(l))))];
  const bw = el("section", { class: "card", id: "bandwidth" }, el("h2", {}, "Bandwidth caps"),
    el("p", { class: "muted" }, "What replication may send on the wire, per site pair and per VM; a stream honours both. New writes go before initial copies."),
    el("table", {}, el("thead", {}, el("tr", {}, el("th", {}, "Capped"), el("th", {}, "Cap"))),
      el("tbody", {}, rows.length ? rows : el("tr", {}, el("td", { colspan: 2, class: "muted" }, "No caps: replication sends as fast as the link allows.")))),
    canAct() ? el("div", { class: "actions" }, el("button", { type: "button", id: "set-cap", onclick: () => capDialog(sites) }, "Set a cap")) : "");
  const netList = (s) => el("ul", { class: "plain" }, (s.networks || []).map((n) => el("li", { "data-network": s.name + "/" + n.name }, `${n.name} (${n.kind}, ${n.subnet})`,
    canAct() ? el("button", { type: "button", class: "link act-del-net", "aria-label": `remove network ${n.name} at ${s.name}`, onclick: () => confirmDialog(`Remove network ${n.name} at ${s.name}`,
      `VMs mapped to it keep their mapping until you change it; the vault refuses while a protection uses it.`, "Remove", () => api("DELETE", "/v1/sites/" + enc(s.name) + "/networks/" + enc(n.name)), "#/sites") }, "remove") : "")));
  view.replaceChildren(el("section", { class: "card", id: "sites" }, el("h1", {}, "Sites"),
    canAct() ? el("div", { class: "toolbar" }, el("button", { type: "button", id: "act-add-site", class: "primary", onclick: siteDialog }, "Add site"),
      el("button", { type: "button", id: "act-add-net", onclick: () => networkDialog(sites) }, "Add network")) : "",
    el("table", {}, el("thead", {}, el("tr", {}, ["Site", "Address", "Reachable", "Last seen", "Networks", ""].map((h) => el("th", { scope: "col" }, h)))),
      el("tbody", {}, sites.map((s) => el("tr", { "data-site": s.name }, el("td", {}, s.name), el("td", {}, s.addr), el("td", {}, badge(s.reachable ? "reachable" : "unreachable", s.reachable ? "healthy" : "critical")),
        el("td", {}, fmtTime(s.last_seen)), el("td", {}, netList(s)),
        el("td", {}, canAct() ? el("button", { type: "button", class: "act-del-site", "aria-label": "remove site " + s.name, onclick: () => confirmDialog("Remove site " + s.name,
          `The vault forgets ${s.name} (its agent keeps running and keeps its disks); it refuses while a VM or a protection uses the site.`, "Remove", () => api("DELETE", "/v1/sites/" + enc(s.name)), "#/sites") }, "Remove") : "")))))), bw);
}

// confirmDialog asks before a removal; act's error is shown in the dialog.
function confirmDialog(title, text, okLabel, act, href) {
  openDialog(title, [el("p", {}, text)], okLabel, async () => { await act(); return { href }; }, "danger");
}

function siteDialog() {
  openDialog("Add a site", [
    el("p", {}, "A site is a KVM host (or cluster) running ferry's agent. Its agent must hold a site certificate of this installation's CA (ferry ca issue --role site NAME, or enroll it with a token)."),
    ...field("Name", el("input", { id: "site-name", name: "name", required: true, placeholder: "west" }), "the name in its certificate"),
    ...field("Agent address", el("input", { id: "site-addr", name: "addr", required: true, placeholder: "10.0.0.2:7443" }), "HOST:PORT of its API"),
  ], "Add site", async (f) => {
    await api("POST", "/v1/sites", { name: f.elements.name.value.trim(), addr: f.elements.addr.value.trim() });
    return { href: "#/sites" };
  });
}

function networkDialog(sites) {
  openDialog("Add a network", [
    el("p", {}, "Networks a site offers its VMs: production ones for failovers, isolated ones for drills."),
    ...field("Site", siteSelect(sites, "net-site")),
    ...field("Name", el("input", { id: "net-name", name: "name", required: true, placeholder: "backend" })),
    ...field("Kind", el("select", { id: "net-kind", name: "kind" }, el("option", { value: "production" }, "production"), el("option", { value: "isolated" }, "isolated (drills)"))),
    ...field("Subnet", el("input", { id: "net-subnet", name: "subnet", required: true, placeholder: "10.0.3.0/24" }), "IPv4 CIDR the guests get addresses from"),
  ], "Add network", async (f) => {
    const e = f.elements;
    await api("PUT", "/v1/sites/" + enc(e.site.value) + "/networks/" + enc(e.name.value.trim()), { kind: e.kind.value, subnet: e.subnet.value.trim() });
    return { href: "#/sites" };
  });
}

// capDialog sets a site pair's or a VM's cap, with optional windows.
function capDialog(sites) {
  const siteSel = (id, name, label) => el("select", { id, name, "aria-label": label }, sites.map((s) => el("option", { value: s.name }, s.name)));
  const from = siteSel("cap-from", "from", "sending site"), to = siteSel("cap-to", "to", "receiving site");
  if (sites.length > 1) to.selectedIndex = 1;
  openDialog("Set a bandwidth cap", [
    el("p", {}, "Cap what one site replicates to another, or one VM's stream. A rate of off lifts the cap."),
    ...field("From site", from), ...field("To site", to),
    ...field("Or one VM (leave empty for the site pair)", el("input", { id: "cap-vm", name: "vm", placeholder: "db" })),
    ...field("Rate", el("input", { id: "cap-rate", name: "rate", required: true, placeholder: "50Mbit" })),
    ...field("Windows, one per line: DAYS HH:MM-HH:MM RATE", el("textarea", { id: "cap-windows", name: "windows", rows: 3, placeholder: "mon-fri 08:00-18:00 20Mbit" })),
    ...field("Time zone of the windows", el("input", { id: "cap-tz", name: "tz", value: "UTC" })),
  ], "Set cap", async (f) => {
    const rate = parseRate(f.elements.rate.value);
    if (isNaN(rate)) throw new Error(`rate "${f.elements.rate.value}": write it like 50Mbit, 1Gbit or off`);
    const lim = { bits_per_second: rate, time_zone: f.elements.tz.value.trim(), schedule: [] };
    for (const line of f.elements.windows.value.split("\n").map((x) => x.trim()).filter(Boolean)) {
      const m = /^(\S+)\s+(\d\d:\d\d)-(\d\d:\d\d)\s+(\S+)$/.exec(line);
      const r = m ? parseRate(m[4]) : NaN;
      if (!m || isNaN(r)) throw new Error(`window "${line}": write it like mon-fri 08:00-18:00 20Mbit`);
      lim.schedule.push({ days: m[1], from: m[2], to: m[3], bits_per_second: r });
    }
    const vm = f.elements.vm.value.trim();
    if (vm) await api("PUT", "/v1/bandwidth/vms/" + enc(vm), lim);
    else await api("PUT", "/v1/bandwidth/pairs/" + enc(f.elements.from.value) + "/" + enc(f.elements.to.value), lim);
    return { href: "#/sites" };
  });
}

// --- start -------------------------------------------------------------

$("#login-form").addEventListener("submit", async (ev) => {
  ev.preventDefault();
  try {
    await signIn($("#token").value.trim());
    showError(null);
    if (!location.hash) location.hash = "#/items"; else route();
  } catch (e) { showError(e); }
});
$("#logout").addEventListener("click", signOut);
{
  const tz = $("#tz");
  tz.value = zone() === "UTC" ? "UTC" : "local";
  tz.addEventListener("change", () => {
    localStorage.setItem("ferry.tz", tz.value === "UTC" ? "UTC" : "local");
    route(); // redraw every time shown
  });
}
window.addEventListener("hashchange", route);
if (state.token) signIn(state.token).then(route).catch(() => signOut());
