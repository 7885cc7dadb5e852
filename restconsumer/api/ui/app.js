// The restconsumer dashboard (SPEC §10): plain JavaScript, no library, no build step.
// Everything it shows comes from the service's own HTTP API, with the token kept in this
// tab's sessionStorage and sent as "Authorization: Bearer"; it asks no other origin.
"use strict";

(() => {
  const TOKEN_KEY = "restconsumer.token";
  const REFRESH_MS = 3000;
  const DEAD_LETTER_MS = 10000;
  const RATE_SAMPLES = 60;
  const API_BASE = new URL("../", window.location.href);
  const TEMPLATE = {
    id: "my-job", owner: "my-team", type: "POST", topic: ["my-topic"],
    datamap: {id: "$.msg.id", name: "$.msg.name"},
    url: "https://example.org/api/people/{id}", json_body: ["id", "name"],
  };

  const $ = (id) => document.getElementById(id);

  /** A new element: attributes (class, text, on…) and children. */
  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [name, value] of Object.entries(attrs || {})) {
      if (value === null || value === undefined || value === false) continue;
      if (name === "text") node.textContent = value;
      else if (name === "class") node.className = value;
      else if (name.startsWith("on")) node.addEventListener(name.slice(2), value);
      else node.setAttribute(name, value === true ? "" : String(value));
    }
    for (const child of children) {
      if (child !== null && child !== undefined) node.append(child);
    }
    return node;
  }

  function svg(tag, attrs) {
    const node = document.createElementNS("http://www.w3.org/2000/svg", tag);
    for (const [name, value] of Object.entries(attrs || {})) node.setAttribute(name, String(value));
    return node;
  }

  /** Show ``text`` in a message element; ``kind`` "error" or "ok" colours it. */
  function say(node, text, kind) {
    node.textContent = text || "";
    node.classList.toggle("error", kind === "error");
    node.classList.toggle("ok", kind === "ok");
  }

  // -- the token -------------------------------------------------------------------------

  function token() {
    return window.sessionStorage.getItem(TOKEN_KEY);
  }

  function signOut(why) {
    window.sessionStorage.removeItem(TOKEN_KEY);
    stopTimers();
    say($("signin-message"), why || "", "error");
    if (window.location.hash !== "#/") window.history.replaceState(null, "", "#/");
    route();
  }

  // -- the API ---------------------------------------------------------------------------

  class ApiError extends Error {
    constructor(status, body) {
      const error = body && typeof body === "object" && body.error ? body.error : `HTTP ${status}`;
      super(error);
      this.status = status;
      this.body = body;
      this.details = body && Array.isArray(body.details) ? body.details : [];
    }

    /** The error with its details, as one line. */
    explain() {
      const details = this.details.map((d) => (d && typeof d === "object"
        ? `${d.field ? d.field + ": " : ""}${d.reason || JSON.stringify(d)}` : String(d)));
      return details.length ? `${this.message}: ${details.join("; ")}` : this.message;
    }
  }

  /** A path segment: a job id of dots only must not read as "." or "..". */
  function seg(text) {
    return /^\.+$/.test(text) ? text.replace(/\./g, "%2E") : encodeURIComponent(text);
  }

  async function api(method, path, body) {
    const headers = {Authorization: `Bearer ${token()}`, Accept: "application/json"};
    const init = {method, headers, cache: "no-store", credentials: "omit", redirect: "error"};
    if (body !== undefined) {
      headers["Content-Type"] = "application/json";
      init.body = JSON.stringify(body);
    }
    let response;
    try {
      response = await fetch(new URL(path, API_BASE), init);
    } catch (e) {
      throw new ApiError(0, {error: "the service does not answer", details: [String(e.message || e)]});
    }
    const text = await response.text();
    let data = null;
    try {
      data = text ? JSON.parse(text) : null;
    } catch (e) {
      data = {error: `HTTP ${response.status}`, details: [text.slice(0, 200)]};
    }
    if (response.status === 401) {
      signOut("The service refused this token (401). Sign in again.");
      throw new ApiError(401, data);
    }
    if (!response.ok) throw new ApiError(response.status, data);
    return data;
  }

  // -- formatting ------------------------------------------------------------------------

  function number(value, digits) {
    if (typeof value !== "number" || !Number.isFinite(value)) return "–";
    return value.toLocaleString("en", {maximumFractionDigits: digits || 0});
  }

  /** A time the API gave (Unix seconds, or ISO 8601) as a Date. */
  function when(at) {
    if (at === null || at === undefined || at === "") return null;
    const date = typeof at === "number" ? new Date(at * 1000) : new Date(at);
    return Number.isNaN(date.getTime()) ? null : date;
  }

  function ago(at) {
    const date = when(at);
    if (!date) return "";
    const seconds = Math.max(0, Math.round((Date.now() - date.getTime()) / 1000));
    if (seconds < 60) return `${seconds} s ago`;
    if (seconds < 3600) return `${Math.round(seconds / 60)} min ago`;
    if (seconds < 86400) return `${Math.round(seconds / 3600)} h ago`;
    return date.toISOString().slice(0, 16).replace("T", " ");
  }

  function clock() {
    return new Date().toLocaleTimeString("en-GB");
  }

  function stateBadge(node, state) {
    node.textContent = state || "unknown";
    node.className = `badge state-${String(state || "unknown").replace(/\s+/g, "-")}`;
  }

  function circuitBadge(node, circuit, short) {
    const open = circuit && circuit.state === "open";
    const word = circuit ? circuit.state : "unknown";
    node.textContent = short ? word : `circuit ${word}`;
    node.className = `badge ${open ? "state-error" : circuit ? "state-closed" : ""}`;
    node.title = open ? `${circuit.reason || ""} (since ${circuit.since || "?"})` : "";
  }

  function lastError(status) {
    const failing = status && (status.error || status.last_error);
    if (!failing) return "";
    return `${failing.reason || ""}${failing.at ? ` (${ago(failing.at)})` : ""}`;
  }

  function payload(value) {
    if (value === null || value === undefined) return "";
    if (typeof value === "object" && value.base64 !== undefined) return `base64: ${value.base64}`;
    return typeof value === "string" ? value : JSON.stringify(value);
  }

  // -- timers ----------------------------------------------------------------------------

  let timers = [];
  let generation = 0;

  function stopTimers() {
    for (const t of timers) window.clearTimeout(t);
    timers = [];
    generation += 1;
  }

  /** Run ``task`` now and again ``every`` ms after each run ends, until the view changes. */
  function every(ms, task, enabled) {
    const mine = generation;
    const tick = async () => {
      if (mine !== generation) return;
      if (!enabled || enabled()) {
        try {
          await task(mine);
        } catch (e) {
          if (!(e instanceof ApiError)) throw e;
        }
      }
      if (mine === generation) timers.push(window.setTimeout(tick, ms));
    };
    tick();
  }

  // -- views -----------------------------------------------------------------------------

  const VIEWS = ["signin", "jobs", "job", "new"];

  function show(view) {
    for (const name of VIEWS) $(name).hidden = name !== view;
    $("nav").hidden = view === "signin";
  }

  function route() {
    const hash = window.location.hash;
    if (hash.startsWith("#token=")) {
      let given = hash.slice("#token=".length);
      try {
        given = decodeURIComponent(given);
      } catch (e) {
        // left as it is
      }
      if (given) window.sessionStorage.setItem(TOKEN_KEY, given);
      // The token leaves the address bar (and the history) at once.
      window.history.replaceState(null, "", `${window.location.pathname}${window.location.search}#/`);
      route();
      return;
    }
    stopTimers();
    if (!token()) {
      show("signin");
      document.title = "Sign in · restconsumer";
      $("token").focus();
      return;
    }
    const job = /^#\/job\/(.+)$/.exec(hash);
    if (job) {
      let id = job[1];
      try {
        id = decodeURIComponent(id);
      } catch (e) {
        // left as it is
      }
      openJob(id);
    } else if (hash === "#/new") {
      openNew();
    } else {
      openJobs();
    }
  }

  // -- sign-in ---------------------------------------------------------------------------

  $("signin-form").addEventListener("submit", async (event) => {
    event.preventDefault();
    const given = $("token").value.trim();
    if (!given) return;
    window.sessionStorage.setItem(TOKEN_KEY, given);
    say($("signin-message"), "");
    try {
      await api("GET", "jobs");
    } catch (e) {
      if (e.status === 401) $("token").value = "";
      else say($("signin-message"), e.explain(), "error");
      return;
    }
    $("token").value = "";
    if (window.location.hash !== "#/") window.location.hash = "#/";
    else route();
  });

  $("signout").addEventListener("click", () => signOut(""));

  // -- the jobs table --------------------------------------------------------------------

  let bulkStatus = true; // GET /jobs/status; per job GET /job/{id}/status when it is missing

  /** Every visible job's status by id: one request, or one per job where needed. */
  async function statuses(jobs) {
    const byId = new Map();
    if (bulkStatus) {
      try {
        const all = await api("GET", "jobs/status");
        for (const s of Array.isArray(all) ? all : []) {
          if (s && typeof s === "object" && s.counters) byId.set(s.id, s);
        }
      } catch (e) {
        if (e.status !== 404 && e.status !== 403 && e.status !== 405) throw e;
        bulkStatus = false;
      }
    }
    const missing = jobs.filter((j) => !byId.has(j.id));
    await Promise.all(missing.map(async (j) => {
      try {
        byId.set(j.id, await api("GET", `job/${seg(j.id)}/status`));
      } catch (e) {
        if (e.status !== 404) throw e;
      }
    }));
    return byId;
  }

  function cell(row, index, text, title) {
    const td = row.cells[index];
    if (td.textContent !== text) td.textContent = text;
    if (title !== undefined && td.title !== title) td.title = title;
    return td;
  }

  function jobRow(id) {
    const row = el("tr", {"data-id": id},
      el("th", {scope: "row"}, el("a", {href: `#/job/${encodeURIComponent(id)}`, text: id})),
      el("td"), el("td", {}, el("span", {class: "badge"})), el("td", {}, el("span", {class: "badge"})),
      el("td", {class: "num"}), el("td", {class: "num"}), el("td", {class: "num"}),
      el("td", {class: "last-error"}));
    return row;
  }

  function renderJobs(jobs, byId) {
    const body = $("jobs-table").tBodies[0];
    const wanted = $("filter").value.trim().toLowerCase();
    const existing = new Map([...body.rows].map((r) => [r.dataset.id, r]));
    const shown = [];
    for (const job of jobs.slice().sort((a, b) => (a.id < b.id ? -1 : a.id > b.id ? 1 : 0))) {
      const status = byId.get(job.id) || {};
      const state = status.state || "unknown";
      const haystack = `${job.id} ${job.owner} ${state}`.toLowerCase();
      if (wanted && !haystack.includes(wanted)) continue;
      const row = existing.get(job.id) || jobRow(job.id);
      existing.delete(job.id);
      cell(row, 1, String(job.owner || ""));
      stateBadge(row.cells[2].firstChild, state);
      circuitBadge(row.cells[3].firstChild, status.circuit, true);
      cell(row, 4, number(status.rate, 2));
      cell(row, 5, number(status.total_lag));
      cell(row, 6, number(status.counters ? status.counters.dead_lettered : undefined));
      const failing = status.error || status.last_error;
      cell(row, 7, lastError(status), failing ? String(failing.reason || "") : "");
      row.classList.toggle("failing", Boolean(status.error) || (status.circuit || {}).state === "open");
      shown.push(row);
    }
    for (const gone of existing.values()) gone.remove();
    // Put rows in order, moving only those out of place (a moved row would lose focus).
    shown.forEach((row, i) => {
      if (body.rows[i] !== row) body.insertBefore(row, body.rows[i] || null);
    });
    $("jobs-empty").hidden = jobs.length > 0;
  }

  let lastJobs = null;

  async function refreshJobs(mine) {
    try {
      const jobs = await api("GET", "jobs");
      const byId = await statuses(jobs);
      if (mine !== generation) return;
      lastJobs = [jobs, byId];
      renderJobs(jobs, byId);
      say($("jobs-message"), "");
      $("jobs-updated").textContent = `Updated ${clock()}`;
    } catch (e) {
      if (mine === generation && e instanceof ApiError && e.status !== 401) {
        say($("jobs-message"), e.explain(), "error");
      }
      throw e;
    }
  }

  function openJobs() {
    show("jobs");
    document.title = "Jobs · restconsumer";
    every(REFRESH_MS, refreshJobs, () => $("auto").checked || !lastJobs);
  }

  $("filter").addEventListener("input", () => {
    if (lastJobs) renderJobs(...lastJobs);
  });
  $("auto").addEventListener("change", () => {
    if ($("auto").checked && !$("jobs").hidden) refreshJobs(generation).catch(() => {});
  });

  // -- one job ---------------------------------------------------------------------------

  let current = null; // {id, stored, samples: [{at, rate}]}

  async function openJob(id) {
    show("job");
    document.title = `${id} · restconsumer`;
    const fresh = !current || current.id !== id;
    if (fresh) {
      current = {id, stored: null, samples: [], lastLetters: 0};
      $("job-title").textContent = `Job ${id}`;
      say($("job-message"), "");
      say($("dl-message"), "");
      $("definition").textContent = "";
      $("counters").textContent = "";
      $("job-error").textContent = "";
      $("lag-table").tBodies[0].textContent = "";
      $("dl-table").tBodies[0].textContent = "";
      $("rate-chart").textContent = "";
      clearProblems();
      say($("save-message"), "");
      $("preview-out").textContent = "";
    }
    $("job").append($("editor"));
    $("editor").hidden = false;
    $("editor-title").textContent = "Edit";
    const mine = generation;
    try {
      await loadDefinition(fresh);
      if (mine !== generation) return;
    } catch (e) {
      if (mine !== generation) return;
      if (e instanceof ApiError && e.status !== 401) {
        say($("job-message"), e.status === 404 ? `No job ${id} (or not one this token may see).`
          : e.explain(), "error");
        $("editor").hidden = true;
      }
      return;
    }
    every(REFRESH_MS, refreshStatus);
    every(DEAD_LETTER_MS, refreshDeadLetters);
  }

  /** The stored definition, shown as the API returns it; into the editor when ``fill``. */
  async function loadDefinition(fill) {
    const stored = await api("GET", `job/${seg(current.id)}`);
    current.stored = stored;
    $("definition").textContent = JSON.stringify(stored, null, 2);
    const topics = Array.isArray(stored.topic) ? stored.topic : [stored.topic];
    $("offset-topics").replaceChildren(...topics.map((t) => el("option", {value: t})));
    if (fill) setEditor(editable(stored));
  }

  /** A stored job without its generated fields, as the editor holds it. */
  function editable(stored) {
    const copy = {...stored};
    delete copy.modified;
    delete copy.hash;
    return copy;
  }

  async function refreshStatus(mine) {
    const id = current.id;
    let status;
    try {
      status = await api("GET", `job/${seg(id)}/status`);
    } catch (e) {
      if (mine === generation && e.status !== 401) say($("job-message"), e.explain(), "error");
      throw e;
    }
    if (mine !== generation || !current || current.id !== id) return;
    current.samples.push({at: Date.now(), rate: Number(status.rate) || 0});
    if (current.samples.length > RATE_SAMPLES) current.samples.shift();
    renderStatus(status);
    $("job-updated").textContent = `Updated ${clock()}`;
    const letters = status.counters ? status.counters.dead_lettered : 0;
    if (letters !== current.lastLetters) {
      current.lastLetters = letters;
      refreshDeadLetters(mine).catch(() => {});
    }
  }

  function renderStatus(status) {
    stateBadge($("job-state"), status.state);
    circuitBadge($("job-circuit"), status.circuit);
    const counters = status.counters || {};
    const items = [
      ["Consumed", number(counters.consumed)], ["Delivered", number(counters.delivered)],
      ["Retried", number(counters.retried)], ["Dead letters", number(counters.dead_lettered)],
      ["Failed", number(counters.failed)], ["Delivered/s", number(status.rate, 2)],
      ["Lag", number(status.total_lag)], ["Bytes held", number(status.bytes_held)],
      ["In flight", `${number(status.in_flight)} of ${number(status.in_flight_limit)}`],
    ];
    if (status.circuit && status.circuit.state === "open") {
      items.push(["Circuit", `open since ${status.circuit.since || "?"}: ${status.circuit.reason || ""}`]);
    }
    const instances = status.instances || [];
    items.push(["Instances", instances.length ? instances.map((i) => i.instance).join(", ") : "none"]);
    if (status.last_error) items.push(["Last error", lastError({last_error: status.last_error})]);
    $("counters").replaceChildren(...items.flatMap(([name, value]) => [
      el("dt", {text: name}), el("dd", {text: value, "data-counter": name})]));
    $("job-error").textContent = status.error ? `Cannot run: ${status.error.reason}` : "";
    renderLag(status.lag || {});
    drawRate(current.samples);
    renderReplay(status.replay);
  }

  function renderLag(lag) {
    const entries = Object.entries(lag);
    const most = Math.max(1, ...entries.map(([, v]) => Number(v) || 0));
    const rows = entries.map(([partition, value]) => {
      const bar = svg("svg", {width: 120, height: 10, viewBox: "0 0 120 10", role: "img",
        "aria-label": `${value} of ${most}`});
      bar.append(svg("rect", {x: 0, y: 1, width: 120, height: 8, class: "track"}));
      bar.append(svg("rect", {x: 0, y: 1, height: 8, class: "fill",
        width: Math.round((120 * (Number(value) || 0)) / most)}));
      return el("tr", {}, el("th", {scope: "row", text: partition}),
        el("td", {class: "num", text: number(value)}), el("td", {}, bar));
    });
    if (!rows.length) {
      rows.push(el("tr", {}, el("td", {colspan: 3, class: "muted",
        text: "No partition assigned right now."})));
    }
    $("lag-table").tBodies[0].replaceChildren(...rows);
  }

  /** The recent delivery rate as a small inline SVG line chart. */
  function drawRate(samples) {
    const width = 320;
    const height = 90;
    const pad = 4;
    const top = Math.max(1, ...samples.map((s) => s.rate));
    const now = samples.length ? samples[samples.length - 1].rate : 0;
    const chart = svg("svg", {width: "100%", viewBox: `0 0 ${width} ${height}`, role: "img",
      "aria-labelledby": "rate-title", class: "rate"});
    const title = svg("title", {id: "rate-title"});
    title.textContent = `Delivered per second over the last ${samples.length} samples: now ` +
      `${number(now, 2)}, at most ${number(top, 2)}`;
    chart.append(title);
    chart.append(svg("line", {x1: pad, y1: height - pad, x2: width - pad, y2: height - pad, class: "axis"}));
    chart.append(svg("line", {x1: pad, y1: pad, x2: width - pad, y2: pad, class: "grid-line"}));
    const step = (width - 2 * pad) / (RATE_SAMPLES - 1);
    const offset = RATE_SAMPLES - samples.length;
    const points = samples.map((s, i) => {
      const x = pad + (offset + i) * step;
      const y = height - pad - ((height - 2 * pad) * s.rate) / top;
      return `${x.toFixed(1)},${y.toFixed(1)}`;
    });
    if (points.length > 1) {
      const first = points[0].split(",")[0];
      const last = points[points.length - 1].split(",")[0];
      chart.append(svg("polygon", {class: "area",
        points: `${first},${height - pad} ${points.join(" ")} ${last},${height - pad}`}));
      chart.append(svg("polyline", {class: "line", points: points.join(" ")}));
    } else if (points.length === 1) {
      const [x, y] = points[0].split(",");
      chart.append(svg("circle", {class: "dot", cx: x, cy: y, r: 2.5}));
    }
    const label = svg("text", {x: pad + 4, y: pad + 11, class: "label"});
    label.textContent = `max ${number(top, 1)}/s`;
    chart.append(label);
    $("rate-chart").replaceChildren(chart);
    $("rate-caption").textContent = `Delivered per second (last ${samples.length * REFRESH_MS / 1000} s, ` +
      `now ${number(now, 2)}/s)`;
  }

  function renderReplay(replay) {
    const node = $("dl-message");
    if (!replay || node.dataset.busy) return;
    const text = `Replay ${replay.state}: ${replay.replayed} replayed, ${replay.delivered} delivered, ` +
      `${replay.dead_lettered} dead-lettered again${replay.error ? `; ${replay.error}` : ""}`;
    say(node, text, replay.error ? "error" : replay.state === "done" ? "ok" : "");
  }

  async function refreshDeadLetters(mine) {
    const id = current.id;
    let answer;
    try {
      answer = await api("GET", `job/${seg(id)}/deadletters?limit=20`);
    } catch (e) {
      if (mine === generation && e.status !== 401) say($("dl-message"), e.explain(), "error");
      throw e;
    }
    if (mine !== generation || !current || current.id !== id) return;
    const letters = (answer && answer.deadletters) || [];
    const rows = letters.slice().reverse().map((d) => {
      const source = d.source || {};
      return el("tr", {},
        el("td", {text: d.timestamp ? String(d.timestamp).replace("T", " ").replace(/\.\d+Z$/, "Z") : ""}),
        el("td", {text: source.topic !== undefined ? `${source.topic}[${source.partition}]@${source.offset}` : ""}),
        el("td", {text: d.status === null || d.status === undefined ? "" : String(d.status)}),
        el("td", {class: "num", text: d.attempts === undefined ? "" : String(d.attempts)}),
        el("td", {class: "reason", text: d.reason || ""}),
        el("td", {class: "payload", text: payload(d.key)}),
        el("td", {class: "payload", text: payload(d.value)}));
    });
    $("dl-table").tBodies[0].replaceChildren(...rows);
    $("dl-empty").hidden = letters.length > 0;
  }

  async function act(button, message, work) {
    button.disabled = true;
    try {
      await work();
    } catch (e) {
      if (e instanceof ApiError && e.status !== 401) say(message, e.explain(), "error");
      else if (!(e instanceof ApiError)) throw e;
    } finally {
      button.disabled = false;
    }
  }

  function runState(verb) {
    const button = $(verb);
    act(button, $("job-message"), async () => {
      const answer = await api("POST", `job/${seg(current.id)}/${verb}`);
      say($("job-message"), `Job ${answer.id}: ${answer.state}.`, "ok");
      stateBadge($("job-state"), answer.state);
    });
  }

  $("start").addEventListener("click", () => runState("start"));
  $("stop").addEventListener("click", () => runState("stop"));

  $("offset-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const offset = $("offset").value.trim();
    const topic = $("offset-topic").value.trim();
    const partition = $("offset-partition").value.trim();
    const query = new URLSearchParams();
    if (topic) query.set("topic", topic);
    if (partition) query.set("partition", partition);
    const path = `job/${seg(current.id)}/set_offset/${seg(offset)}${query.toString() ? `?${query}` : ""}`;
    say($("job-message"), `Moving offsets to ${offset}… (the job halts on every instance meanwhile)`);
    act($("offset-go"), $("job-message"), async () => {
      const answer = await api("POST", path);
      const moved = (Array.isArray(answer.offsets) ? answer.offsets : [])
        .map((o) => `${o.topic}[${o.partition}] → ${o.offset}`).join(", ");
      say($("job-message"), `Offsets set: ${moved || "nothing to move"}.`, "ok");
    });
  });

  $("dl-refresh").addEventListener("click", () => {
    act($("dl-refresh"), $("dl-message"), () => refreshDeadLetters(generation));
  });

  $("replay").addEventListener("click", () => {
    const node = $("dl-message");
    act($("replay"), node, async () => {
      node.dataset.busy = "1";
      try {
        const answer = await api("POST", `job/${seg(current.id)}/deadletters/replay`);
        const parts = Object.entries((answer.replay || {}).partitions || {})
          .map(([p, [from, to]]) => `partition ${p}: ${from}–${to}`).join(", ");
        say(node, `Replay started${parts ? ` (${parts})` : " (nothing to replay)"}.`, "ok");
      } catch (e) {
        if (e.status === 409) {
          say(node, "A replay of this job is already under way.", "error");
          return;
        }
        throw e;
      } finally {
        window.setTimeout(() => delete node.dataset.busy, REFRESH_MS * 2);
      }
    });
  });

  // -- a new job -------------------------------------------------------------------------

  function openNew() {
    show("new");
    document.title = "New job · restconsumer";
    current = null;
    $("new").append($("editor"));
    $("editor").hidden = false;
    $("editor-title").textContent = "Definition";
    clearProblems();
    say($("save-message"), "");
    $("preview-out").textContent = "";
    setEditor(TEMPLATE);
    $("editor-text").focus();
  }

  // -- the editor ------------------------------------------------------------------------

  let marks = new Map(); // line index → [problem text]

  function setEditor(definition) {
    $("editor-text").value = JSON.stringify(definition, null, 2);
    marks = new Map();
    paintBackdrop();
  }

  /** The layer behind the textarea: the same lines, the problem ones marked with the reason. */
  function paintBackdrop() {
    const lines = $("editor-text").value.split("\n");
    const backdrop = $("editor-backdrop");
    backdrop.replaceChildren(...lines.map((line, n) => {
      const notes = marks.get(n);
      const div = el("div", {class: notes ? "line bad" : "line", "data-line": n + 1}, line || " ");
      if (notes) div.append(el("span", {class: "note", text: `  ← ${notes.join(" · ")}`}));
      return div;
    }));
    syncScroll();
  }

  function syncScroll() {
    const backdrop = $("editor-backdrop");
    const text = $("editor-text");
    backdrop.scrollTop = text.scrollTop;
    backdrop.scrollLeft = text.scrollLeft;
  }

  $("editor-text").addEventListener("scroll", syncScroll);
  $("editor-text").addEventListener("input", () => {
    if (marks.size) {
      marks = new Map();
      $("problems-list").classList.add("stale");
    }
    paintBackdrop();
  });

  function clearProblems() {
    marks = new Map();
    $("problems-title").hidden = true;
    $("problems-list").replaceChildren();
    $("problems-list").classList.remove("stale");
    $("editor-text").removeAttribute("aria-invalid");
    paintBackdrop();
  }

  /** Parse JSON text into a tree that knows where each key and value starts. */
  function tree(text) {
    let i = 0;
    const space = () => {
      while (i < text.length && " \t\r\n".includes(text[i])) i += 1;
    };
    const string = () => {
      const start = i;
      i += 1;
      while (i < text.length && text[i] !== "\"") i += text[i] === "\\" ? 2 : 1;
      i += 1;
      return JSON.parse(text.slice(start, i));
    };
    const value = () => {
      space();
      const start = i;
      const c = text[i];
      if (c === "{" || c === "[") {
        const object = c === "{";
        const node = object ? {kind: "object", start, members: []} : {kind: "array", start, items: []};
        i += 1;
        space();
        if (text[i] === (object ? "}" : "]")) {
          i += 1;
          return node;
        }
        for (;;) {
          space();
          if (object) {
            const keyStart = i;
            const key = string();
            space();
            i += 1; // the colon
            node.members.push({key, keyStart, value: value()});
          } else {
            node.items.push(value());
          }
          space();
          const sep = text[i];
          i += 1;
          if (sep !== ",") return node;
        }
      }
      if (c === "\"") {
        string();
        return {kind: "value", start};
      }
      while (i < text.length && !",]} \t\r\n".includes(text[i])) i += 1;
      return {kind: "value", start};
    };
    return value();
  }

  /**
   * Where a problem's field path ("datamap.name", "topic[1]", "retry.max_wait", "") is in
   * the text: the offset of its key (or of the nearest enclosing part that is there), and
   * whether the field itself was found. Keys are matched as the service reads them (job
   * fields case-insensitively), the longest first, so a datamap key with a dot still matches.
   */
  function locate(root, field) {
    let node = root;
    let at = root.start;
    let rest = field || "";
    while (rest) {
      if (rest[0] === "[") {
        const m = /^\[(\d+)\]/.exec(rest);
        const item = m && node.kind === "array" ? node.items[Number(m[1])] : null;
        if (!item) break;
        node = item;
        at = item.start;
        rest = rest.slice(m[0].length);
        continue;
      }
      if (rest[0] === ".") rest = rest.slice(1);
      if (node.kind !== "object") break;
      let best = null;
      for (const member of node.members) {
        const key = member.key;
        const fits = (exact) => (exact ? rest.startsWith(key) : rest.toLowerCase().startsWith(key.toLowerCase())) &&
          (rest.length === key.length || ".[".includes(rest[key.length]));
        const score = fits(true) ? 2 : fits(false) ? 1 : 0;
        if (score && (!best || key.length > best.member.key.length ||
            (key.length === best.member.key.length && score >= best.score))) {
          best = {member, score};
        }
      }
      if (!best) break;
      node = best.member.value;
      at = best.member.keyStart;
      rest = rest.slice(best.member.key.length);
    }
    return {at, found: !rest};
  }

  function lineOf(text, offset) {
    let line = 0;
    for (let i = 0; i < offset && i < text.length; i += 1) if (text[i] === "\n") line += 1;
    return line;
  }

  /** Put the caret on a line of the editor and bring it into view. */
  function goToLine(line) {
    const text = $("editor-text");
    const lines = text.value.split("\n");
    const start = lines.slice(0, line).reduce((n, l) => n + l.length + 1, 0);
    text.focus();
    text.setSelectionRange(start, start + (lines[line] || "").length);
    const height = parseFloat(window.getComputedStyle(text).lineHeight) || 20;
    text.scrollTop = Math.max(0, line * height - text.clientHeight / 2);
    syncScroll();
  }

  /** Show the problems: a list labelled by field, and each marked on its line in the editor. */
  function showProblems(problems) {
    const text = $("editor-text").value;
    let root = null;
    try {
      JSON.parse(text);
      root = tree(text);
    } catch (e) {
      root = null;
    }
    marks = new Map();
    const items = problems.map((p) => {
      const field = p.field || "";
      let line = typeof p.line === "number" ? p.line : null;
      let found = line !== null;
      if (line === null && root) {
        const spot = locate(root, field);
        line = lineOf(text, spot.at);
        found = spot.found;
      }
      const label = field || "(the job)";
      if (line !== null) {
        const notes = marks.get(line) || [];
        notes.push(`${found ? "" : `${label}: `}${p.reason}`);
        marks.set(line, notes);
      }
      const where = line === null ? "" : found ? ` (line ${line + 1})` : ` (not in the definition; near line ${line + 1})`;
      const item = el("li", {"data-field": field},
        el("code", {class: "field", text: label}), " ",
        el("span", {class: "reason", text: p.reason}),
        el("span", {class: "muted", text: where}));
      if (line !== null) {
        item.append(" ", el("button", {type: "button", class: "link", text: "Go to line",
          "aria-label": `Go to line ${line + 1}, field ${label}`, onclick: () => goToLine(line)}));
      }
      return item;
    });
    $("problems-list").replaceChildren(...items);
    $("problems-list").classList.remove("stale");
    $("problems-title").hidden = !items.length;
    $("problems-title").textContent = items.length === 1 ? "1 problem" : `${items.length} problems`;
    if (items.length) $("editor-text").setAttribute("aria-invalid", "true");
    else $("editor-text").removeAttribute("aria-invalid");
    paintBackdrop();
  }

  /** The editor's definition, or null (the problem shown) when it is not JSON. */
  function definition() {
    const text = $("editor-text").value;
    try {
      return JSON.parse(text);
    } catch (e) {
      const message = String(e.message || e);
      let line = null;
      const at = /line (\d+)/.exec(message);
      const position = /position (\d+)/.exec(message);
      if (at) line = Number(at[1]) - 1;
      else if (position) line = lineOf(text, Number(position[1]));
      showProblems([{field: "", reason: `not valid JSON: ${message}`, line}]);
      return null;
    }
  }

  function problemsOf(error) {
    const details = error.details.filter((d) => d && typeof d === "object" && "reason" in d);
    if (details.length) return details.map((d) => ({field: String(d.field || ""), reason: String(d.reason)}));
    return [{field: "", reason: error.explain()}];
  }

  $("save").addEventListener("click", () => {
    const job = definition();
    if (!job) return;
    const id = current ? current.id : job && typeof job === "object" ? (job.id ?? job.ID ?? job.Id) : null;
    if (typeof id !== "string" || !id) {
      showProblems([{field: "id", reason: "is required: it names the job (POST /job/{id})"}]);
      return;
    }
    say($("save-message"), "Saving…");
    act($("save"), $("save-message"), async () => {
      try {
        const stored = await api("POST", `job/${seg(id)}`, job);
        clearProblems();
        say($("save-message"), `Saved job ${stored.id} (hash ${String(stored.hash || "").slice(0, 12)}).`, "ok");
        if (!current) {
          window.location.hash = `#/job/${encodeURIComponent(stored.id)}`;
          return;
        }
        current.stored = stored;
        $("definition").textContent = JSON.stringify(stored, null, 2);
        setEditor(editable(stored));
      } catch (e) {
        if (e instanceof ApiError && e.status === 400) {
          say($("save-message"), `Not saved: ${e.message}.`, "error");
          showProblems(problemsOf(e));
          return;
        }
        throw e;
      }
    });
  });

  $("revert").addEventListener("click", () => {
    clearProblems();
    say($("save-message"), "");
    setEditor(current && current.stored ? editable(current.stored) : TEMPLATE);
  });

  // -- the preview -----------------------------------------------------------------------

  /** The pasted sample as an envelope: JSON as a value, anything else as raw text. */
  function envelope(text) {
    try {
      return {value: JSON.parse(text)};
    } catch (e) {
      const bytes = new TextEncoder().encode(text);
      let binary = "";
      for (const b of bytes) binary += String.fromCharCode(b);
      return {base64: window.btoa(binary)};
    }
  }

  function same(a, b) {
    return JSON.stringify(a) === JSON.stringify(b);
  }

  function renderPreview(results) {
    const out = $("preview-out");
    if (!results.length) {
      out.replaceChildren(el("p", {class: "muted", text: "The message gave no record."}));
      return;
    }
    out.replaceChildren(...results.map((r) => {
      const title = `Message ${r.message + 1}, record ${r.record + 1}`;
      if (r.request) {
        const q = r.request;
        const headers = Object.entries(q.headers || {}).map(([k, v]) => `${k}: ${v}`).join("\n");
        const text = `${q.method} ${q.url}\n${headers}${q.body ? `\n\n${q.body}` : ""}`;
        return el("div", {class: "result"}, el("h4", {text: `${title}: would send`}),
          el("pre", {class: "code request", tabindex: 0, "aria-label": `${title}, the request`, text}));
      }
      if (r.filtered) return el("div", {class: "result"}, el("h4", {text: `${title}: filtered out, nothing sent`}));
      return el("div", {class: "result"}, el("h4", {text: `${title}: not sent`}),
        el("p", {class: "error", text: r.error || "unknown error"}));
    }));
  }

  $("preview").addEventListener("click", () => {
    const job = definition();
    if (!job) return;
    const messages = [envelope($("sample").value)];
    const out = $("preview-out");
    act($("preview"), out, async () => {
      out.replaceChildren(el("p", {class: "muted", text: "Building the request…"}));
      let answer;
      try {
        // The stored job, unchanged, is previewed as stored (its secrets stay hidden).
        answer = current && current.stored && same(job, editable(current.stored))
          ? await api("POST", `job/${seg(current.id)}/preview`, {messages})
          : await api("POST", "preview", {job, messages});
      } catch (e) {
        if (e instanceof ApiError && e.status === 400) {
          const mine = e.details.some((d) => d && typeof d === "object" && String(d.field || "").startsWith("messages"));
          out.replaceChildren(el("p", {class: "error", text: `No preview: ${e.explain()}`}));
          if (!mine) showProblems(problemsOf(e));
          return;
        }
        out.textContent = "";
        throw e;
      }
      clearProblems();
      renderPreview((answer && answer.results) || []);
    });
  });

  // -- start -----------------------------------------------------------------------------

  // The skip link moves the focus without touching the hash (which holds the route).
  document.querySelector(".skip").addEventListener("click", (event) => {
    event.preventDefault();
    $("main").focus();
  });

  window.addEventListener("hashchange", route);
  route();
})();
