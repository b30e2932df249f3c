// jetsaga visualiser page: draws the laid-out chart (from /api/workflows) as SVG, lights the state of
// the selected revision, lists the history, and follows the instance live over Server-Sent Events.
// Plain ES module, no build step. Everything from the server is inserted as text, never as HTML.

const SVG = "http://www.w3.org/2000/svg";
const ID_PATTERN = /^[A-Za-z0-9_-]{1,128}$/;
// The machine itself as the source of top-level transitions (ROOT_ID in chart.ts).
const ROOT_ID = "(machine)";
// Entries asked for per request for earlier ones (the server's default page; its maximum is larger).
const PAGE_SIZE = 500;
// The server's largest page (MAX_HISTORY_LIMIT in visualiser/server.ts): time travel asks for whole gaps.
const MAX_PAGE_SIZE = 2000;
// Reconnecting the live stream: exponential from base to cap, so a struggling server is not
// hammered; a stream that stayed up this long counts as healthy and starts the backoff over.
const LIVE_RETRY = { baseMs: 1_000, capMs: 30_000, stableMs: 10_000 };
// Waiting for an instance that has not started: polled more gently the longer it takes.
const START_POLL = { baseMs: 1_000, capMs: 10_000 };

// The page's state: the loaded charts, the instance's entries and which one is shown.
const view = {
  workflows: new Map(),
  chart: undefined,
  entries: [],
  selected: -1,
  following: true,
  source: undefined,
  workflow: "",
  id: "",
  // The instance's first revision and whether entries before view.entries[0] are still unloaded.
  oldestRevision: 1,
  hasEarlier: false,
  // The one /history request for earlier entries in flight, if any.
  earlier: undefined,
  // The revision the slider last asked for: a request it had to wait on must not override a newer one.
  wanted: undefined,
  // Bumped whenever the shown instance changes: replies and timers of the old one are dropped.
  generation: 0,
  // A pending reconnect of the live stream, { timer, text }, and how many failed in a row.
  retry: undefined,
  liveAttempt: 0,
  // A pending retry of the first /history load (the instance has not started, or the server failed).
  loadTimer: undefined,
};

const $ = (id) => document.getElementById(id);
const el = {
  status: $("status"),
  workflow: $("workflow"),
  instance: $("instance"),
  chart: $("chart"),
  slider: $("revision"),
  sliderOut: $("revision-out"),
  latest: $("latest"),
  following: $("following"),
  snapshot: $("snapshot"),
  context: $("context"),
  history: $("history"),
  earlier: $("earlier"),
  deadLetters: $("dead-letters"),
  deadLettersSection: $("dead-letters-section"),
};

function setStatus(text) {
  el.status.textContent = text;
}

/** Milliseconds before retry `attempt` (0-based): doubling up to the cap, then 50–100% of that. */
function backoff(attempt, { baseMs, capMs }) {
  // Random, so pages cut off by one server restart do not all come back at the same moment.
  return Math.min(capMs, baseMs * 2 ** attempt) * (0.5 + Math.random() / 2);
}

function instancePath(workflow, id) {
  return `/api/instances/${encodeURIComponent(workflow)}/${encodeURIComponent(id)}`;
}

async function getJson(url) {
  const response = await fetch(url, { headers: { accept: "application/json" } });
  const body = await response.json().catch(() => ({}));
  if (!response.ok) {
    const error = new Error(body?.error?.message ?? `${response.status} ${response.statusText}`);
    error.status = response.status;
    throw error;
  }
  return body;
}

// ---------------------------------------------------------------------------------------------
// State values → lit state ids (the same rule as activeStateIds in chart.ts).

/** Every active state id of an xstate state value, ancestors included. */
function activeIds(value, prefix = "", out = new Set()) {
  if (typeof value === "string") {
    out.add(prefix + value);
  } else if (value && typeof value === "object") {
    for (const [key, child] of Object.entries(value)) {
      out.add(prefix + key);
      activeIds(child, `${prefix}${key}.`, out);
    }
  }
  return out;
}

/** The innermost active ids: the states the instance is "in". */
function leafIds(value, prefix = "", out = new Set()) {
  if (typeof value === "string") {
    out.add(prefix + value);
  } else if (value && typeof value === "object") {
    for (const [key, child] of Object.entries(value)) leafIds(child, `${prefix}${key}.`, out);
  }
  return out;
}

function describeValue(value) {
  return [...leafIds(value)].join(", ");
}

// ---------------------------------------------------------------------------------------------
// Chart drawing.

function svg(name, attributes = {}, parent) {
  const node = document.createElementNS(SVG, name);
  for (const [key, value] of Object.entries(attributes)) node.setAttribute(key, String(value));
  parent?.appendChild(node);
  return node;
}

function pathOf(points) {
  return points.map((p, i) => `${i === 0 ? "M" : "L"}${p.x} ${p.y}`).join(" ");
}

function drawChart(chart) {
  const width = chart.width + 8;
  const height = chart.height + 8;
  const root = svg("svg", {
    viewBox: `-4 -4 ${width} ${height}`,
    width,
    height,
    role: "group",
    "aria-label": `State chart of workflow ${chart.workflow} version ${chart.version}`,
    class: "chart",
  });
  const defs = svg("defs", {}, root);
  const marker = svg(
    "marker",
    {
      id: "arrow",
      viewBox: "0 0 10 10",
      refX: 9,
      refY: 5,
      markerWidth: 7,
      markerHeight: 7,
      orient: "auto-start-reverse",
    },
    defs,
  );
  svg("path", { d: "M0 0 L10 5 L0 10 z", class: "arrowhead" }, marker);

  // Containers first so their children and the edges are drawn on top of them.
  const nodes = [...chart.nodes].sort((a, b) => depth(a) - depth(b));
  const states = svg("g", { class: "states" }, root);
  for (const node of nodes) {
    const compound = node.type === "compound" || node.type === "parallel";
    const g = svg(
      "g",
      {
        class: `state state-${node.type}${node.pseudo ? " state-pseudo" : ""}`,
        "data-state": node.id,
        role: "img",
        "aria-label": stateLabel(node, ""),
      },
      states,
    );
    svg(
      "rect",
      { x: node.x, y: node.y, width: node.width, height: node.height, rx: compound ? 10 : 8, class: "box" },
      g,
    );
    if (node.type === "final") {
      svg(
        "rect",
        {
          x: node.x + 4,
          y: node.y + 4,
          width: node.width - 8,
          height: node.height - 8,
          rx: 5,
          class: "inner",
        },
        g,
      );
    }
    const label = svg(
      "text",
      compound
        ? { x: node.x + 12, y: node.y + 20, class: "label label-compound" }
        : {
            x: node.x + node.width / 2,
            y: node.y + node.height / 2 + 4.5,
            class: "label",
            "text-anchor": "middle",
          },
      g,
    );
    label.textContent = node.label;
    // The "current" tag: being lit must not depend on colour alone.
    const tag = svg(
      "text",
      compound
        ? { x: node.x + node.width - 10, y: node.y + 20, class: "tag", "text-anchor": "end" }
        : { x: node.x + node.width / 2, y: node.y + node.height - 9, class: "tag", "text-anchor": "middle" },
      g,
    );
    tag.textContent = "";
    const title = svg("title", {}, g);
    title.textContent = `${node.id} (${node.type})`;
  }

  const initials = svg("g", { class: "initials", "aria-hidden": "true" }, root);
  for (const marker of chart.initials) {
    svg(
      "circle",
      {
        cx: marker.dot.x + marker.dot.width / 2,
        cy: marker.dot.y + marker.dot.height / 2,
        r: 5,
        class: "initial-dot",
      },
      initials,
    );
    if (marker.points.length > 1)
      svg("path", { d: pathOf(marker.points), class: "edge-line", "marker-end": "url(#arrow)" }, initials);
  }

  const edges = svg("g", { class: "edges" }, root);
  for (const edge of chart.edges) {
    const g = svg(
      "g",
      { class: `edge edge-${edge.kind}`, "data-edge": edge.id, "data-event": edge.event },
      edges,
    );
    const title = svg("title", {}, g);
    title.textContent = `${edge.from} → ${edge.to}: ${edge.label}${edge.targetless ? " (no state change)" : ""}`;
    if (edge.points.length > 1)
      svg("path", { d: pathOf(edge.points), class: "edge-line", "marker-end": "url(#arrow)" }, g);
    if (edge.labelBox) {
      const b = edge.labelBox;
      svg(
        "rect",
        { x: b.x - 1, y: b.y, width: b.width + 2, height: b.height, rx: 3, class: "edge-label-bg" },
        g,
      );
      const text = svg("text", { x: b.x + 3, y: b.y + b.height - 5, class: "edge-label" }, g);
      text.textContent = edge.label;
    }
  }
  el.chart.replaceChildren(root);
}

function depth(node) {
  return node.id.split(".").length;
}

function stateLabel(node, mark) {
  const kind = node.type === "final" ? "final state" : node.pseudo ? "any state" : "state";
  return `${kind} ${node.id}${mark ? ` (${mark})` : ""}`;
}

/** Lights the states of `entry` (and the transition that led there from `previous`). */
function lightChart(entry, previous) {
  const chart = view.chart;
  if (!chart) return;
  const active = entry ? activeIds(entry.state.value) : new Set();
  const leaves = entry ? leafIds(entry.state.value) : new Set();
  for (const g of el.chart.querySelectorAll("[data-state]")) {
    const id = g.getAttribute("data-state");
    const node = chart.nodes.find((n) => n.id === id);
    const isLeaf = leaves.has(id);
    const isActive = active.has(id);
    g.classList.toggle("lit", isActive);
    g.classList.toggle("current", isLeaf);
    if (isLeaf) g.setAttribute("aria-current", "true");
    else g.removeAttribute("aria-current");
    const mark = isLeaf ? "current" : isActive ? "active" : "";
    g.setAttribute("aria-label", stateLabel(node, mark));
    const tag = g.querySelector(".tag");
    if (tag) tag.textContent = isLeaf ? "▶ current" : isActive && node?.type !== "atomic" ? "active" : "";
  }
  // The transition taken: declared on a state active before, for this event, landing in a state active now.
  // The machine itself, source of top-level transitions, is active in every state; it is kept out of
  // `active` so its "any state" box is never lit.
  const before = previous ? activeIds(previous.state.value).add(ROOT_ID) : new Set();
  const after = new Set(active).add(ROOT_ID);
  const eventType = entry?.event?.type;
  for (const g of el.chart.querySelectorAll("[data-edge]")) {
    const edge = chart.edges.find((e) => e.id === g.getAttribute("data-edge"));
    // Timer firings carry the delayed transition's xstate event type, so one comparison covers all kinds.
    const taken =
      Boolean(previous && edge) && before.has(edge.from) && edge.event === eventType && after.has(edge.to);
    g.classList.toggle("taken", taken);
  }
}

// ---------------------------------------------------------------------------------------------
// History list, snapshot and time travel.

// Times come from stored messages: one outside the Date range (|ms| > 8.64e15) or not a number
// must not throw (toISOString does), or the whole list it is in would be lost.
function validDate(at) {
  const d = new Date(at);
  return Number.isNaN(d.getTime()) ? undefined : d;
}

function isoTime(at) {
  return validDate(at)?.toISOString() ?? String(at);
}

function formatTime(at) {
  const d = validDate(at);
  if (!d) return String(at);
  const pad = (n, w = 2) => String(n).padStart(w, "0");
  return `${pad(d.getHours())}:${pad(d.getMinutes())}:${pad(d.getSeconds())}.${pad(d.getMilliseconds(), 3)}`;
}

function eventName(entry) {
  return entry.event?.type ?? "?";
}

function historyItem(entry) {
  const li = document.createElement("li");
  li.className = "entry";
  li.dataset.revision = String(entry.revision);
  const row = document.createElement("div");
  row.className = "entry-row";
  const pick = document.createElement("button");
  pick.type = "button";
  pick.className = "entry-pick";
  pick.setAttribute("aria-label", `Show revision ${entry.revision}: ${eventName(entry)}`);
  const rev = document.createElement("span");
  rev.className = "rev";
  rev.textContent = `#${entry.revision}`;
  const type = document.createElement("span");
  type.className = "etype";
  type.textContent = eventName(entry);
  const time = document.createElement("time");
  time.dateTime = isoTime(entry.at);
  time.title = isoTime(entry.at);
  time.textContent = formatTime(entry.at);
  pick.append(rev, type, time);
  // By revision, not index: loading earlier entries shifts every index.
  pick.addEventListener("click", () => select(indexOfRevision(entry.revision), false));
  row.append(pick);

  const details = document.createElement("details");
  const summary = document.createElement("summary");
  summary.textContent = "JSON";
  summary.setAttribute("aria-label", `Event and state JSON of revision ${entry.revision}`);
  const body = document.createElement("div");
  body.append(
    jsonBlock("Event", entry.event),
    jsonBlock("State", { value: entry.state.value, status: entry.state.status }),
    jsonBlock("Context", entry.state.context),
  );
  if (entry.effects?.length) body.append(jsonBlock("Effects", entry.effects));
  details.append(summary, body);
  li.append(row, details);
  return li;
}

function deadLetterItem(letter) {
  const li = document.createElement("li");
  li.className = "entry dead-letter";
  const row = document.createElement("div");
  row.className = "entry-row";
  const seq = document.createElement("span");
  seq.className = "rev";
  seq.textContent = `#${letter.seq}`;
  const code = document.createElement("span");
  code.className = "etype";
  code.textContent = letter.code;
  const time = document.createElement("time");
  time.dateTime = isoTime(letter.at);
  time.title = isoTime(letter.at);
  time.textContent = formatTime(letter.at);
  row.append(seq, code, time);
  const reason = document.createElement("p");
  reason.className = "reason";
  reason.textContent = `${letter.reason} (${letter.subject}, ${letter.deliveries} deliveries)`;
  li.append(row, reason);
  return li;
}

// Shown whether or not the instance has a history: a start refused before its first entry (an
// unknown workflow, a bad input) leaves only its dead letter.
async function loadDeadLetters(workflow, id) {
  el.deadLetters.replaceChildren();
  el.deadLettersSection.hidden = true;
  try {
    const body = await getJson(
      `/api/instances/${encodeURIComponent(workflow)}/${encodeURIComponent(id)}/dead-letters`,
    );
    if (view.workflow !== workflow || view.id !== id) return;
    for (const letter of body.deadLetters) el.deadLetters.append(deadLetterItem(letter));
    if (!body.complete) {
      const more = document.createElement("li");
      more.className = "muted";
      more.textContent = "Only the oldest letters were searched; see npm run dead-letters -- list.";
      el.deadLetters.append(more);
    }
    el.deadLettersSection.hidden = body.deadLetters.length === 0 && body.complete;
  } catch {
    // The page works without them; the status line is about the instance.
  }
}

function jsonBlock(title, value) {
  const wrap = document.createElement("div");
  const h = document.createElement("h3");
  h.textContent = title;
  const pre = document.createElement("pre");
  pre.className = "json";
  pre.tabIndex = 0;
  pre.textContent = JSON.stringify(value, null, 2);
  wrap.append(h, pre);
  return wrap;
}

function fact(term, value) {
  const dt = document.createElement("dt");
  dt.textContent = term;
  const dd = document.createElement("dd");
  dd.textContent = value;
  el.snapshot.append(dt, dd);
}

/** Shows revision `index` (into view.entries). `follow`: stay on the latest as entries arrive. */
function select(index, follow) {
  const entries = view.entries;
  if (entries.length === 0) return;
  const i = Math.max(0, Math.min(index, entries.length - 1));
  view.selected = i;
  view.following = follow ?? i === entries.length - 1;
  const entry = entries[i];
  // An instance runs on the version it started with: draw that version's chart when it differs.
  const chart = chartFor(entry.state.definitionVersion);
  if (chart && chart.version !== view.chart?.version) {
    view.chart = chart;
    drawChart(chart);
  }
  lightChart(entry, entries[i - 1]);

  // The slider spans the whole history, loaded or not: picking an unloaded revision loads it.
  el.slider.min = String(Math.min(view.oldestRevision, entries[0].revision));
  el.slider.max = String(entries.at(-1).revision);
  el.slider.value = String(entry.revision);
  el.slider.disabled = false;
  el.slider.setAttribute(
    "aria-valuetext",
    `revision ${entry.revision} of ${entries.at(-1).revision}: ${eventName(entry)}`,
  );
  el.sliderOut.textContent = `${entry.revision} / ${entries.at(-1).revision}`;
  el.latest.disabled = i === entries.length - 1;

  el.snapshot.replaceChildren();
  const state = entry.state;
  fact("Revision", String(entry.revision));
  fact("Event", eventName(entry));
  fact("At", isoTime(entry.at));
  fact("In", describeValue(state.value));
  fact("Status", state.status);
  if (state.failure) fact("Failure", state.failure.reason);
  if (state.output !== undefined) fact("Output", JSON.stringify(state.output));
  const timers = Object.values(state.timers ?? {});
  if (timers.length) fact("Timers", timers.map((t) => `${t.event} at ${isoTime(t.dueAt)}`).join("; "));
  if (view.chart && state.definitionVersion !== view.chart.version) {
    fact(
      "Note",
      `instance started on version ${state.definitionVersion}; chart is version ${view.chart.version}`,
    );
  }
  el.context.textContent = JSON.stringify(state.context, null, 2);

  for (const li of el.history.children) {
    const on = li.dataset.revision === String(entry.revision);
    li.classList.toggle("selected", on);
    const button = li.querySelector(".entry-pick");
    if (on) button?.setAttribute("aria-current", "step");
    else button?.removeAttribute("aria-current");
  }
  renderFollowing();
}

function renderFollowing() {
  const last = view.entries.at(-1);
  const finished = last && last.state.status !== "running";
  const live = view.source && view.source.readyState !== EventSource.CLOSED;
  const where = view.following ? "Showing the latest revision" : "Time travelling";
  const how = finished
    ? `instance ${last.state.status}`
    : view.retry
      ? view.retry.text
      : live
        ? "live: new events appear as they happen"
        : "not live";
  el.following.textContent = `${where} — ${how}.`;
  el.following.dataset.following = String(view.following);
  el.following.dataset.live = finished ? "ended" : view.retry ? "reconnecting" : live ? "live" : "off";
}

function showLatestStatus() {
  const last = view.entries.at(-1);
  if (!last) return;
  setStatus(
    `${view.workflow}/${view.id}: ${describeValue(last.state.value)} (${last.state.status}), revision ${last.revision}.`,
  );
}

function addEntry(entry) {
  const last = view.entries.at(-1);
  if (last && entry.revision <= last.revision) return; // already shown (reconnect overlap)
  // Row first: if building it throws, entries and the list still match.
  const item = historyItem(entry);
  view.entries.push(entry);
  el.history.append(item);
  if (view.following) select(view.entries.length - 1, true);
  else select(view.selected, false);
  showLatestStatus();
}

/** The index of the latest loaded entry at or before `revision` (0 when all are after it). */
function indexOfRevision(revision) {
  const entries = view.entries;
  let low = 0;
  let high = entries.length;
  while (low < high) {
    const middle = (low + high) >>> 1;
    if (entries[middle].revision <= revision) low = middle + 1;
    else high = middle;
  }
  return Math.max(0, low - 1);
}

function renderEarlier() {
  el.earlier.hidden = !view.hasEarlier;
  el.earlier.disabled = Boolean(view.earlier);
  el.earlier.textContent = view.earlier ? "Loading earlier entries…" : "Load earlier entries";
}

/**
 * Loads up to `limit` entries before the first loaded one (at most the server's page limit);
 * concurrent callers share one request.
 */
function loadEarlier(limit = PAGE_SIZE) {
  if (!view.hasEarlier || view.entries.length === 0) return Promise.resolve();
  if (view.earlier) return view.earlier;
  const generation = view.generation;
  const first = view.entries[0].revision;
  const request = (async () => {
    try {
      const body = await getJson(
        `${instancePath(view.workflow, view.id)}/history?before=${first}&limit=${Math.min(limit, MAX_PAGE_SIZE)}`,
      );
      if (generation !== view.generation) return;
      const older = body.entries.filter((entry) => entry.revision < view.entries[0].revision);
      el.history.prepend(...older.map((entry) => historyItem(entry)));
      view.entries = [...older, ...view.entries];
      view.hasEarlier = body.hasEarlier === true && older.length > 0;
      if (typeof body.oldestRevision === "number") view.oldestRevision = body.oldestRevision;
      select(view.selected + older.length, view.following);
    } catch (error) {
      if (generation === view.generation) setStatus(`Could not load earlier entries: ${error.message}`);
      throw error;
    } finally {
      if (generation === view.generation) {
        view.earlier = undefined;
        renderEarlier();
      }
    }
  })();
  view.earlier = request;
  renderEarlier();
  return request;
}

/** Time travel to `revision`, loading the entries before the loaded ones first if it is among them. */
async function travelTo(revision, follow) {
  view.wanted = revision;
  const generation = view.generation;
  try {
    // The whole gap in as few requests as the server allows, and no further once the user has
    // moved on (a drag asks for every revision it passes).
    while (
      view.wanted === revision &&
      generation === view.generation &&
      view.hasEarlier &&
      view.entries[0]?.revision > revision
    ) {
      await loadEarlier(view.entries[0].revision - revision);
    }
  } catch {
    // Reported by loadEarlier; show the oldest loaded entry instead.
  }
  if (generation !== view.generation || view.wanted !== revision) return;
  select(indexOfRevision(revision), follow);
}

// ---------------------------------------------------------------------------------------------
// Loading and live updates.

/** Follows the instance live from the last loaded entry, reconnecting with backoff when the stream fails. */
function follow() {
  const { workflow, id, generation } = view;
  view.source?.close();
  clearTimeout(view.retry?.timer);
  view.retry = undefined;
  // From the last entry shown, not EventSource's Last-Event-ID: this is also a fresh EventSource
  // after a failed one, and the server fills in what was appended meanwhile.
  const after = view.entries.at(-1).revision;
  const source = new EventSource(`${instancePath(workflow, id)}/live?after=${after}`);
  view.source = source;
  let openedAt;
  source.addEventListener("entry", (event) => addEntry(JSON.parse(event.data)));
  source.addEventListener("end", () => {
    source.close();
    renderFollowing();
  });
  source.addEventListener("open", () => {
    openedAt = Date.now();
    if (view.source === source) showLatestStatus();
    renderFollowing();
  });
  source.addEventListener("error", () => {
    if (view.source !== source || generation !== view.generation) return;
    // EventSource gives up for good on an answer other than 200 (a 503 from a busy or restarting
    // server) and retries a dropped stream at the server's fixed pace: both go through the one
    // backoff here instead.
    source.close();
    if (view.entries.at(-1)?.state.status !== "running") {
      renderFollowing();
      return;
    }
    if (openedAt !== undefined && Date.now() - openedAt >= LIVE_RETRY.stableMs) view.liveAttempt = 0;
    const delay = backoff(view.liveAttempt, LIVE_RETRY);
    view.liveAttempt += 1;
    const seconds = Math.max(1, Math.round(delay / 1_000));
    const text = `live updates interrupted: reconnecting in ${seconds} s (attempt ${view.liveAttempt})`;
    view.retry = { timer: setTimeout(follow, delay), text };
    setStatus(`${workflow}/${id}: ${text}…`);
    renderFollowing();
  });
}

/** Shows the latest page of the instance's history and follows it; waits for it if it has not started. */
async function loadLatest(attempt) {
  const { workflow, id, generation } = view;
  view.loadTimer = undefined;
  let body;
  try {
    // The server's default page: the latest entries.
    body = await getJson(`${instancePath(workflow, id)}/history`);
  } catch (error) {
    if (generation !== view.generation) return;
    const notYet = error.status === 404;
    // Other 4xx answers will not change by asking again.
    if (!notYet && error.status !== undefined && error.status < 500) {
      setStatus(`Could not load ${workflow}/${id}: ${error.message}`);
      return;
    }
    // Polled rather than pushed: /live is for instances that exist, and one read per poll is cheap.
    view.loadTimer = setTimeout(() => loadLatest(attempt + 1), backoff(attempt, START_POLL));
    setStatus(
      notYet
        ? `No instance ${workflow}/${id} yet: waiting for it to start…`
        : `Could not load ${workflow}/${id}: ${error.message}. Trying again…`,
    );
    return;
  }
  if (generation !== view.generation) return;
  view.entries = body.entries;
  view.oldestRevision = body.oldestRevision ?? body.entries[0].revision;
  view.hasEarlier = body.hasEarlier === true;
  el.history.replaceChildren(...body.entries.map((entry) => historyItem(entry)));
  renderEarlier();
  select(view.entries.length - 1, true);
  showLatestStatus();
  if (view.entries.at(-1).state.status === "running") follow();
  renderFollowing();
}

function loadInstance(workflow, id) {
  view.generation += 1;
  view.workflow = workflow;
  view.id = id;
  view.source?.close();
  view.source = undefined;
  clearTimeout(view.retry?.timer);
  view.retry = undefined;
  view.liveAttempt = 0;
  clearTimeout(view.loadTimer);
  view.loadTimer = undefined;
  view.entries = [];
  view.selected = -1;
  view.following = true;
  view.oldestRevision = 1;
  view.hasEarlier = false;
  view.earlier = undefined;
  view.wanted = undefined;
  renderEarlier();
  el.history.replaceChildren();
  el.deadLetters.replaceChildren();
  el.deadLettersSection.hidden = true;
  el.snapshot.replaceChildren();
  el.context.textContent = "";
  el.slider.disabled = true;
  lightChart(undefined, undefined);
  if (!id) {
    setStatus(`Chart of ${workflow}. Enter an instance id to see its state.`);
    renderFollowing();
    return Promise.resolve();
  }
  if (!ID_PATTERN.test(id)) {
    setStatus("Instance ids are 1–128 letters, digits, _ or -.");
    return Promise.resolve();
  }
  setStatus(`Loading ${workflow}/${id}…`);
  void loadDeadLetters(workflow, id);
  return loadLatest(0);
}

/** The chart of `version` of the workflow shown: its own when served, else the latest version's. */
function chartFor(version) {
  const workflow = view.workflows.get(view.workflow);
  return workflow?.versions?.find((v) => v.version === version)?.chart ?? workflow?.chart;
}

function showWorkflow(name) {
  const workflow = view.workflows.get(name);
  if (!workflow) return false;
  view.chart = workflow.chart;
  drawChart(workflow.chart);
  return true;
}

async function start() {
  const params = new URLSearchParams(location.search);
  try {
    const { workflows } = await getJson("/api/workflows");
    for (const w of workflows) {
      view.workflows.set(w.name, w);
      const option = document.createElement("option");
      option.value = w.name;
      option.textContent = `${w.name} (v${w.version})`;
      el.workflow.append(option);
    }
  } catch (error) {
    setStatus(`Could not load workflows: ${error.message}`);
    return;
  }
  const workflow = params.get("workflow") ?? el.workflow.value;
  const id = params.get("id") ?? "";
  if (!showWorkflow(workflow)) {
    setStatus(`Unknown workflow "${workflow}".`);
    // No chart and no history, but a start refused for an unknown workflow leaves a dead letter.
    el.instance.value = id;
    view.workflow = workflow;
    view.id = id;
    if (ID_PATTERN.test(id)) await loadDeadLetters(workflow, id);
    return;
  }
  el.workflow.value = workflow;
  el.instance.value = id;
  await loadInstance(workflow, id);
}

el.slider.addEventListener("input", () => void travelTo(Number(el.slider.value)));
el.latest.addEventListener("click", () => select(view.entries.length - 1, true));
el.earlier.addEventListener("click", () => void loadEarlier().catch(() => {}));
document.addEventListener("keydown", (event) => {
  // Arrow keys step through revisions while the history list has focus.
  if (!el.history.contains(document.activeElement)) return;
  if (event.key === "ArrowUp" || event.key === "ArrowDown") {
    event.preventDefault();
    const entry = view.entries[view.selected];
    if (!entry) return;
    // Up from the oldest loaded entry loads the ones before it.
    const revision = entry.revision + (event.key === "ArrowUp" ? -1 : 1);
    void travelTo(revision).then(() =>
      el.history.children[view.selected]?.querySelector(".entry-pick")?.focus(),
    );
  }
});

start();
