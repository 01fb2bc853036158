// lilota dashboard: polls the JSON API every second and renders with textContent only.
// No innerHTML anywhere: every task field is text, whatever it contains.
"use strict";

(function () {
  const POLL_MS = 1000;
  const WORKERS_EVERY = 5; // list polls between two looks at the workers
  const STATUSES = ["pending", "running", "completed", "failed", "cancelled"];
  const csrfMeta = document.querySelector('meta[name="lilota-csrf"]');
  const CSRF = csrfMeta ? csrfMeta.getAttribute("content") : "";
  const $ = (id) => document.getElementById(id);

  // ------------------------------------------------------------------ helpers

  function el(tag, attrs, text) {
    const node = document.createElement(tag);
    if (attrs) {
      for (const key of Object.keys(attrs)) {
        if (key === "class") node.className = attrs[key];
        else node.setAttribute(key, attrs[key]);
      }
    }
    if (text !== undefined && text !== null) node.textContent = String(text);
    return node;
  }

  function setText(node, text) {
    const value = text === undefined || text === null ? "" : String(text);
    if (node.textContent !== value) node.textContent = value;
  }

  function fmtTime(iso) {
    if (!iso) return "";
    const d = new Date(iso);
    if (isNaN(d.getTime())) return iso;
    const now = new Date();
    return d.toDateString() === now.toDateString() ? d.toLocaleTimeString() : d.toLocaleString();
  }

  function fmtDuration(seconds) {
    if (seconds === null || seconds === undefined || !isFinite(seconds)) return "";
    if (seconds < 0) seconds = 0;
    if (seconds < 10) return seconds.toFixed(2) + " s";
    if (seconds < 60) return seconds.toFixed(1) + " s";
    const m = Math.floor(seconds / 60);
    if (m < 60) return m + " min " + Math.floor(seconds % 60) + " s";
    return Math.floor(m / 60) + " h " + (m % 60) + " min";
  }

  function elapsed(task, nowIso) {
    if (task.duration !== null && task.duration !== undefined) return task.duration;
    if (!task.started_at || !nowIso) return null;
    return (new Date(nowIso).getTime() - new Date(task.started_at).getTime()) / 1000;
  }

  // An action's error stays up a while; a later successful poll does not hide it at once.
  let stickyUntil = 0;
  function showBanner(message, sticky) {
    if (!message && Date.now() < stickyUntil) return;
    stickyUntil = sticky ? Date.now() + 8000 : 0;
    const banner = $("banner");
    setText(banner, message || "");
    banner.hidden = !message;
  }

  function setLive(ok) {
    const live = $("live");
    live.classList.toggle("offline", !ok);
    setText(live, ok ? "live" : "offline");
  }

  class HttpError extends Error {
    constructor(status, message) {
      super(message);
      this.status = status;
    }
  }

  async function request(path, options) {
    const res = await fetch(path, Object.assign({ credentials: "same-origin", cache: "no-store" }, options));
    if (res.status === 401) {
      window.location.assign(document.baseURI + "login");
      throw new HttpError(401, "authentication required");
    }
    let data = null;
    try {
      data = await res.json();
    } catch (e) {
      data = null;
    }
    if (!res.ok) {
      throw new HttpError(res.status, (data && data.error) || res.status + " " + res.statusText);
    }
    return data;
  }

  const getJSON = (path) => request(path, { headers: { Accept: "application/json" } });
  const post = (path) =>
    request(path, { method: "POST", headers: { Accept: "application/json", "X-CSRF-Token": CSRF } });

  // Runs fn now and then every ms while the page is visible; never two at once.
  function poller(fn, ms) {
    let timer = null;
    let busy = false;
    let again = false;
    async function run() {
      if (timer !== null) {
        clearTimeout(timer);
        timer = null;
      }
      if (busy) {
        again = true;
        return;
      }
      busy = true;
      try {
        await fn();
        setLive(true);
      } catch (e) {
        setLive(false);
        if (!(e instanceof HttpError && e.status === 401)) showBanner("Cannot update: " + e.message);
      } finally {
        busy = false;
      }
      if (again) {
        again = false;
        run();
      } else if (!document.hidden) {
        timer = setTimeout(run, ms);
      }
    }
    document.addEventListener("visibilitychange", function () {
      if (!document.hidden && !busy && timer === null) run();
    });
    return run;
  }

  async function act(button, taskId, action, after) {
    button.disabled = true;
    try {
      await post("api/tasks/" + Number(taskId) + "/" + action);
      stickyUntil = 0;
      showBanner("");
    } catch (e) {
      showBanner("Could not " + action + " task " + taskId + ": " + e.message, true);
    } finally {
      button.disabled = false;
      after();
    }
  }

  function canCancel(t) {
    return (t.status === "pending" || t.status === "running") && !(t.status === "running" && t.cancel_requested);
  }

  function canRetry(t) {
    return t.status === "failed" || t.status === "cancelled";
  }

  // ------------------------------------------------------------------ task list

  function listView() {
    const params = new URLSearchParams(window.location.search);
    const state = {
      status: STATUSES.includes(params.get("status")) ? params.get("status") : "",
      name: params.get("name") || "",
      before: /^\d+$/.test(params.get("before_id") || "") ? Number(params.get("before_id")) : null,
      previous: [], // before_id values of the newer pages, for "Newer"
      next: null,
    };
    const rows = new Map(); // task id -> {tr, cells...}
    const tbody = $("task-rows");
    const statusFilter = $("status-filter");
    const nameFilter = $("name-filter");
    let generation = 0; // bumps when the filters change: answers to older queries are dropped
    let ticks = 0;
    statusFilter.value = state.status;
    nameFilter.value = state.name;

    function query() {
      const q = new URLSearchParams();
      if (state.status) q.set("status", state.status);
      if (state.name) q.set("name", state.name);
      if (state.before !== null) q.set("before_id", String(state.before));
      return q;
    }

    function syncUrl() {
      const q = query().toString();
      window.history.replaceState(null, "", window.location.pathname + (q ? "?" + q : ""));
    }

    function makeRow(id) {
      const r = { tr: el("tr", { "data-id": String(id) }) };
      const idCell = el("td", { class: "num" });
      idCell.append(el("a", { href: "tasks/" + Number(id) }, id));
      r.name = el("td", { class: "name" });
      r.status = el("span", { class: "status" });
      const statusCell = el("td");
      statusCell.append(r.status);
      r.bar = el("progress", { class: "bar", max: "100", value: "0" });
      r.pct = el("span", { class: "pct" });
      const progressCell = el("td", { class: "progress" });
      progressCell.append(r.bar, r.pct);
      r.attempts = el("td", { class: "num" });
      r.created = el("td", { class: "time" });
      r.duration = el("td", { class: "num" });
      r.input = el("td", { class: "input" });
      r.cancel = el("button", { type: "button", class: "small danger cancel" }, "Cancel");
      r.retry = el("button", { type: "button", class: "small retry" }, "Retry");
      r.cancel.addEventListener("click", () => act(r.cancel, id, "cancel", refresh));
      r.retry.addEventListener("click", () => act(r.retry, id, "retry", refresh));
      const actions = el("td", { class: "actions" });
      actions.append(r.cancel, r.retry);
      r.tr.append(idCell, r.name, statusCell, progressCell, r.attempts, r.created, r.duration, r.input, actions);
      return r;
    }

    function updateRow(r, t, nowIso) {
      r.tr.setAttribute("data-status", t.status);
      setText(r.name, t.name);
      r.name.title = t.description || "";
      setText(r.status, t.status + (t.status === "running" && t.cancel_requested ? " (cancelling)" : ""));
      r.status.className = "status " + t.status;
      if (Number(r.bar.value) !== t.progress) r.bar.value = t.progress;
      setText(r.pct, t.progress + "%");
      setText(r.attempts, t.attempts + " / " + t.max_attempts);
      setText(r.created, fmtTime(t.created_at));
      r.created.title = t.created_at || "";
      setText(r.duration, fmtDuration(elapsed(t, nowIso)));
      setText(r.input, t.error ? t.error : t.input_preview);
      r.input.classList.toggle("error", Boolean(t.error));
      r.input.title = t.error ? t.error : t.input_preview;
      r.cancel.hidden = !canCancel(t);
      r.retry.hidden = !canRetry(t);
    }

    function renderCounts(counts) {
      const box = $("counts");
      let total = 0;
      for (const s of STATUSES) total += counts[s] || 0;
      const items = [["", "all", total]].concat(STATUSES.map((s) => [s, s, counts[s] || 0]));
      if (!box.firstChild) {
        for (const [value, label] of items) {
          const button = el("button", { type: "button", class: "count " + (value || "all"), id: "count-" + label });
          button.append(el("span", { class: "n" }), el("span", { class: "label" }, label));
          button.addEventListener("click", () => setStatus(value));
          box.append(button);
        }
      }
      for (const [value, label, n] of items) {
        const button = $("count-" + label);
        setText(button.querySelector(".n"), n.toLocaleString());
        button.setAttribute("aria-pressed", String(state.status === value));
      }
    }

    function render(data) {
      let ref = tbody.firstChild;
      const seen = new Set();
      for (const t of data.tasks) {
        seen.add(t.id);
        let r = rows.get(t.id);
        if (!r) {
          r = makeRow(t.id);
          rows.set(t.id, r);
        }
        updateRow(r, t, data.now);
        if (r.tr === ref) ref = ref.nextSibling;
        else tbody.insertBefore(r.tr, ref);
      }
      for (const [id, r] of rows) {
        if (!seen.has(id)) {
          r.tr.remove();
          rows.delete(id);
        }
      }
      $("empty").hidden = data.tasks.length > 0;
      renderCounts(data.counts);
      state.next = data.next_before_id;
      $("older").disabled = state.next === null;
      $("newer").disabled = state.before === null;
      $("newest").disabled = state.before === null;
    }

    async function load() {
      const mine = generation;
      const q = query();
      const data = await getJSON("api/tasks" + (q.toString() ? "?" + q : ""));
      if (mine !== generation) return;
      render(data);
      showBanner("");
      if (ticks++ % WORKERS_EVERY === 0) loadWorkers();
    }

    async function loadWorkers() {
      try {
        const data = await getJSON("api/workers");
        const n = data.workers.length;
        const box = $("workers");
        setText(box, n === 1 ? "1 worker" : n + " workers");
        box.title = data.workers.map((w) => w.hostname + " pid " + w.pid + ": " + w.task_names.join(", ")).join("\n");
        // Pending tasks no live worker runs wait for ever: say so next to the workers.
        const unserved = Object.entries(data.unserved || {});
        const warn = $("unserved");
        setText(warn, unserved.length ? unserved.map(([name, n]) => n + " pending " + name + ": no worker runs it").join("; ") : "");
        warn.hidden = unserved.length === 0;
        const list = $("task-names");
        const names = data.task_names;
        if (list.children.length !== names.length || names.some((n, i) => list.children[i].value !== n)) {
          list.replaceChildren(...names.map((n) => el("option", { value: n })));
        }
      } catch (e) {
        // the task list reports connection problems
      }
    }

    const refresh = poller(load, POLL_MS);

    function changed() {
      generation++;
      syncUrl();
      refresh();
    }

    function setStatus(value) {
      state.status = value;
      statusFilter.value = value;
      state.before = null;
      state.previous = [];
      changed();
    }

    statusFilter.addEventListener("change", () => setStatus(statusFilter.value));
    let typing = null;
    nameFilter.addEventListener("input", function () {
      clearTimeout(typing);
      typing = setTimeout(function () {
        state.name = nameFilter.value.trim();
        state.before = null;
        state.previous = [];
        changed();
      }, 250);
    });
    $("older").addEventListener("click", function () {
      if (state.next === null) return;
      state.previous.push(state.before);
      state.before = state.next;
      changed();
    });
    $("newer").addEventListener("click", function () {
      state.before = state.previous.length ? state.previous.pop() : null;
      changed();
    });
    $("newest").addEventListener("click", function () {
      state.before = null;
      state.previous = [];
      changed();
    });
    $("list-view").hidden = false;
    refresh();
  }

  // ------------------------------------------------------------------ one task

  function taskView(taskId) {
    const fields = $("t-fields");
    const cells = new Map();
    const rows = [
      ["Name", (t) => t.name],
      ["Status", (t) => t.status + (t.cancel_requested && t.status === "running" ? " (cancel requested)" : "")],
      ["Description", (t) => t.description],
      ["Attempts", (t) => t.attempts + " of " + t.max_attempts],
      ["Priority", (t) => t.priority],
      ["Created", (t) => fmtTime(t.created_at)],
      ["Run at", (t) => fmtTime(t.run_at)],
      ["Started", (t) => fmtTime(t.started_at)],
      ["Ended", (t) => fmtTime(t.ended_at)],
      ["Duration", (t) => fmtDuration(t.duration)],
      ["Worker", (t) => (t.worker_id ? t.worker_id + (t.pid ? " (pid " + t.pid + ")" : "") : "")],
      ["Lease expires", (t) => fmtTime(t.lease_expires_at)],
      ["Unique key", (t) => t.unique_key],
    ];
    for (const [label] of rows) {
      const dd = el("dd");
      fields.append(el("dt", null, label), dd);
      cells.set(label, dd);
    }
    const pretty = (v) => (v === null || v === undefined ? "—" : JSON.stringify(v, null, 2));

    function render(t) {
      document.title = "lilota · task " + t.id + " (" + t.status + ")";
      setText($("t-title"), "Task " + t.id + ": " + t.name);
      const status = $("t-status");
      setText(status, t.status);
      status.className = "status " + t.status;
      for (const [label, get] of rows) {
        const value = get(t);
        setText(cells.get(label), value === null || value === undefined || value === "" ? "—" : value);
      }
      $("t-progress").value = t.progress;
      setText($("t-progress-text"), t.progress + "%");
      $("t-cancel").hidden = !canCancel(t);
      $("t-retry").hidden = !canRetry(t);
      $("t-exception-box").hidden = !t.exception;
      if (t.exception) {
        setText($("t-exception"), t.exception.type + (t.exception.message ? ": " + t.exception.message : ""));
        setText($("t-traceback"), t.exception.traceback || "(no traceback)");
      }
      setText($("t-input"), pretty(t.input));
      setText($("t-output"), pretty(t.output));
    }

    async function load() {
      try {
        render(await getJSON("api/tasks/" + taskId));
        showBanner("");
      } catch (e) {
        if (e instanceof HttpError && e.status === 404) {
          showBanner("Task " + taskId + " does not exist (it may have been cleaned up).");
          return;
        }
        throw e;
      }
    }

    const refresh = poller(load, POLL_MS);
    $("t-cancel").addEventListener("click", () => act($("t-cancel"), taskId, "cancel", refresh));
    $("t-retry").addEventListener("click", () => act($("t-retry"), taskId, "retry", refresh));
    $("task-view").hidden = false;
    refresh();
  }

  // ------------------------------------------------------------------ start

  function start() {
    if (document.body.getAttribute("data-auth") === "token") $("logout").hidden = false;
    const view = document.body.getAttribute("data-view");
    const taskId = Number(document.body.getAttribute("data-task-id"));
    if (view === "task" && taskId > 0) taskView(taskId);
    else listView();
  }

  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", start);
  else start();
})();
