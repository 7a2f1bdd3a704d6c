// MassTasker dashboard. No framework, no build step, nothing fetched from elsewhere.
// Every string that comes from the server goes into the page through textContent (see el()),
// never through innerHTML: group names, labels, errors and payloads are data, not markup.
"use strict";

(function () {
  const app = document.getElementById("app");
  const flash = document.getElementById("flash");
  const live = document.getElementById("live");
  const crumbs = document.getElementById("crumbs");
  const SVG = "http://www.w3.org/2000/svg";
  let info = { mode: "read-only", actions_need_token: false, reading_needs_token: false };

  // -- DOM helpers ---------------------------------------------------------------------------------

  // el("td", {className: "n", text: "42"}, child, ...): text is set with textContent, always.
  function el(tag, props, ...children) {
    const node = document.createElement(tag);
    for (const [key, value] of Object.entries(props || {})) {
      if (value === undefined || value === null) continue;
      if (key === "text") node.textContent = String(value);
      else if (key === "className") node.className = value;
      else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
      else node.setAttribute(key, String(value));
    }
    for (const child of children) {
      if (child === null || child === undefined) continue;
      node.append(child instanceof Node ? child : document.createTextNode(String(child)));
    }
    return node;
  }

  function svg(tag, attrs) {
    const node = document.createElementNS(SVG, tag);
    for (const [key, value] of Object.entries(attrs || {})) node.setAttribute(key, String(value));
    return node;
  }

  function link(href, text) { return el("a", { href: href, text: text }); }
  function groupHref(name) { return "/group?name=" + encodeURIComponent(name); }
  function taskHref(id) { return "/task?id=" + encodeURIComponent(id); }
  function groupName(name) { return name === "" ? '""' : name; }

  function say(message, ok) {
    flash.className = ok ? "ok" : "";
    flash.textContent = message || "";
  }

  // -- formatting ------------------------------------------------------------------------------------

  const fmtInt = (n) => Number(n || 0).toLocaleString("en-US");
  function fmtDuration(seconds) {
    if (seconds === null || seconds === undefined || !isFinite(seconds)) return "-";
    let s = Math.round(seconds);
    const h = Math.floor(s / 3600); s -= h * 3600;
    const m = Math.floor(s / 60); s -= m * 60;
    if (h >= 48) return Math.floor(h / 24) + "d" + String(h % 24).padStart(2, "0") + "h";
    if (h) return h + "h" + String(m).padStart(2, "0") + "m";
    if (m) return m + "m" + String(s).padStart(2, "0") + "s";
    return s + "s";
  }
  function fmtRate(r) {
    if (r >= 100) return fmtInt(Math.round(r)) + "/s";
    if (r >= 1) return r.toFixed(1) + "/s";
    if (r > 0) return (r * 60).toFixed(1) + "/min";
    return "0/s";
  }
  function fmtEta(g) { return g.total === 0 ? "done" : fmtDuration(g.eta); }

  // -- talking to the server -------------------------------------------------------------------------

  function headers(extra) {
    const h = Object.assign({}, extra || {});
    const token = sessionStorage.getItem("masstasker-token");
    if (token) h["Authorization"] = "Bearer " + token;
    return h;
  }

  async function api(path, params) {
    const url = path + (params ? "?" + new URLSearchParams(params).toString() : "");
    const response = await fetch(url, { headers: headers(), cache: "no-store" });
    const body = await response.json().catch(() => ({ error: response.statusText }));
    if (!response.ok) throw Object.assign(new Error(body.error || response.statusText), { status: response.status });
    return body;
  }

  async function post(path, body) {
    const response = await fetch(path, {
      method: "POST",
      headers: headers({ "Content-Type": "application/json" }),
      body: JSON.stringify(body),
    });
    const reply = await response.json().catch(() => ({ error: response.statusText }));
    if (!response.ok) throw Object.assign(new Error(reply.error || response.statusText), { status: response.status });
    return reply;
  }

  // Server-sent events read with fetch (EventSource cannot send the Authorization header).
  // Reconnects a second after the stream ends; stop() ends it for good.
  function stream(params, onStats) {
    let stopped = false;
    let controller = null;
    async function run() {
      while (!stopped) {
        controller = new AbortController();
        try {
          const url = "/api/events?" + new URLSearchParams(params).toString();
          const response = await fetch(url, { headers: headers(), signal: controller.signal, cache: "no-store" });
          if (!response.ok) {
            const body = await response.json().catch(() => ({}));
            throw new Error(body.error || response.statusText);
          }
          const reader = response.body.getReader();
          const decoder = new TextDecoder();
          let buffer = "";
          for (;;) {
            const { value, done } = await reader.read();
            if (done) break;
            buffer += decoder.decode(value, { stream: true });
            let end;
            while ((end = buffer.indexOf("\n\n")) >= 0) {
              const frame = buffer.slice(0, end);
              buffer = buffer.slice(end + 2);
              let event = "message";
              const data = [];
              for (const line of frame.split("\n")) {
                if (line.startsWith("event: ")) event = line.slice(7);
                else if (line.startsWith("data: ")) data.push(line.slice(6));
              }
              if (event === "stats" && data.length) {
                live.className = "live on";
                live.textContent = "live · " + new Date().toLocaleTimeString();
                onStats(JSON.parse(data.join("\n")));
              } else if (event === "problem" && data.length) {
                say(JSON.parse(data.join("\n")).error);
              }
            }
          }
        } catch (err) {
          if (stopped) return;
          live.className = "live off";
          live.textContent = "disconnected: " + err.message;
        }
        if (!stopped) await new Promise((r) => setTimeout(r, 1000));
      }
    }
    run();
    return { stop() { stopped = true; if (controller) controller.abort(); } };
  }

  // -- confirmation ------------------------------------------------------------------------------------

  // Resolves to the target group (or true when no target is asked), or null when cancelled.
  function confirmAction(text, askTarget, defaultTarget) {
    const dialog = document.getElementById("confirm");
    document.getElementById("confirm-text").textContent = text;
    const label = document.getElementById("confirm-target-label");
    const input = document.getElementById("confirm-target");
    label.hidden = !askTarget;
    input.value = defaultTarget || "";
    return new Promise((resolve) => {
      dialog.addEventListener("close", function done() {
        dialog.removeEventListener("close", done);
        if (dialog.returnValue !== "ok") return resolve(null);
        resolve(askTarget ? input.value : true);
      });
      dialog.returnValue = "";
      dialog.showModal();
      if (askTarget) input.focus();
    });
  }

  async function act(what, path, body, askTarget, defaultTarget, after) {
    if (info.mode !== "read-write") return say("The dashboard is read-only (start the server with --dashboard read-write).");
    const answer = await confirmAction(what, askTarget, defaultTarget);
    if (answer === null) return;
    if (askTarget) body = Object.assign({}, body, { to: answer });
    try {
      const reply = await post(path, body);
      say(describe(path, reply), true);
      if (after) after(reply);
    } catch (err) {
      say((err.status === 401 ? "Refused: " : "Failed: ") + err.message);
    }
  }

  function describe(path, reply) {
    if (path.endsWith("retry")) return "Retried " + fmtInt(reply.retried) + " task(s).";
    if (path.endsWith("move")) return "Moved " + fmtInt(reply.moved) + " task(s).";
    return reply.deleted === null ? "Deleted the group's tasks." : "Deleted " + fmtInt(reply.deleted) + " task(s).";
  }

  function actionButton(text, className, onClick) {
    const b = el("button", { type: "button", className: className, text: text, onclick: onClick });
    if (info.mode !== "read-write") { b.disabled = true; b.title = "read-only dashboard"; }
    return b;
  }

  // -- charts ------------------------------------------------------------------------------------------

  // points: [[time, value], ...]. Draws a line (and its area) scaled to the box; numbers only.
  function lineChart(points, width, height, className, axis) {
    const box = svg("svg", { width: width, height: height, viewBox: "0 0 " + width + " " + height, class: className });
    if (points.length < 2) return box;
    const pad = axis ? 22 : 2;
    const t0 = points[0][0], t1 = points[points.length - 1][0];
    let max = 0;
    for (const p of points) max = Math.max(max, p[1]);
    const x = (t) => pad + ((t - t0) / Math.max(t1 - t0, 1)) * (width - pad - 4);
    const y = (v) => height - (axis ? 16 : 2) - (max ? v / max : 0) * (height - (axis ? 26 : 4));
    const line = points.map((p) => x(p[0]).toFixed(1) + "," + y(p[1]).toFixed(1)).join(" ");
    const base = y(0).toFixed(1);
    box.append(svg("polygon", { class: "area", points: x(t0).toFixed(1) + "," + base + " " + line + " " + x(t1).toFixed(1) + "," + base }));
    box.append(svg("polyline", { class: "total", points: line }));
    if (axis) {
      const top = svg("text", { x: 2, y: 12, class: "axis" }); top.textContent = fmtInt(max);
      const left = svg("text", { x: pad, y: height - 3, class: "axis" }); left.textContent = new Date(t0 * 1000).toLocaleTimeString();
      const right = svg("text", { x: width - 4, y: height - 3, class: "axis", "text-anchor": "end" }); right.textContent = "now";
      box.append(top, left, right);
    }
    return box;
  }

  // A series per group: the server's history, then the live totals appended once a second.
  const series = new Map();
  function remember(name, time, total) {
    const s = series.get(name) || [];
    if (!s.length || time > s[s.length - 1][0]) s.push([time, total]);
    while (s.length && s[0][0] < time - 3600) s.shift();
    series.set(name, s);
  }

  // -- pages -------------------------------------------------------------------------------------------

  function card(key, value, className) {
    return el("div", { className: "card " + (className || "") }, el("div", { className: "k", text: key }), el("div", { className: "v", text: value, "data-k": key }));
  }

  function statsCards(g) {
    return el("div", { className: "cards", id: "cards" },
      card("total", fmtInt(g.total)), card("visible", fmtInt(g.visible)), card("leased", fmtInt(g.leased)),
      card("scheduled", fmtInt(g.scheduled)), card("errors", fmtInt(g.errors), g.errors ? "err" : ""),
      card("oldest visible", fmtDuration(g.oldest_visible_age)), card("rate", fmtRate(g.departure_rate)),
      card("ETA", fmtEta(g)));
  }

  async function overview(params) {
    document.title = "MassTasker · groups";
    crumbs.replaceChildren();
    const filter = params.get("filter") || "";
    const offset = Number(params.get("offset") || 0);
    const filterInput = el("input", { type: "search", placeholder: "filter groups", value: filter, name: "filter" });
    const form = el("form", { className: "toolbar", action: "/" }, filterInput, el("button", { type: "submit", text: "Filter" }));
    const totals = el("div", { className: "cards", id: "totals" });
    const tbody = el("tbody", { id: "groups" });
    const pager = el("div", { className: "pager" });
    const head = el("tr", {}, ...["group", "total", "visible", "leased", "scheduled", "errors", "oldest", "rate", "ETA", "last hour"]
      .map((h, i) => el("th", { className: i && i < 9 ? "n" : "", text: h })));
    app.replaceChildren(el("h1", { text: "Groups" }), totals, form, el("table", {}, el("thead", {}, head), tbody), pager);

    let shown = [];
    async function loadHistory() {
      if (!shown.length) return;
      try {
        const reply = await api("/api/history", { groups: JSON.stringify(shown) });
        for (const [name, points] of Object.entries(reply.history)) {
          const mine = series.get(name) || [];
          const merged = points.map((p) => [p.time, p.total]);
          const last = merged.length ? merged[merged.length - 1][0] : 0;
          series.set(name, merged.concat(mine.filter((p) => p[0] > last)));
        }
      } catch (err) { say(err.message); }
    }

    function draw(data) {
      totals.replaceChildren(card("groups", fmtInt(data.all_groups)), card("tasks", fmtInt(data.totals.total)),
        card("visible", fmtInt(data.totals.visible)), card("leased", fmtInt(data.totals.leased)),
        card("scheduled", fmtInt(data.totals.scheduled)), card("errors", fmtInt(data.totals.errors), data.totals.errors ? "err" : ""));
      const names = data.groups.map((g) => g.group);
      const fresh = names.some((n) => !shown.includes(n));
      shown = names;
      if (fresh) loadHistory();
      tbody.replaceChildren(...data.groups.map((g) => {
        remember(g.group, data.now, g.total);
        return el("tr", { "data-group": g.group },
          el("td", { className: "name" }, link(groupHref(g.group), groupName(g.group))),
          el("td", { className: "n", text: fmtInt(g.total), "data-col": "total" }),
          el("td", { className: "n", text: fmtInt(g.visible), "data-col": "visible" }),
          el("td", { className: "n", text: fmtInt(g.leased), "data-col": "leased" }),
          el("td", { className: "n", text: fmtInt(g.scheduled), "data-col": "scheduled" }),
          el("td", { className: "n" + (g.errors ? " err" : ""), text: fmtInt(g.errors), "data-col": "errors" }),
          el("td", { className: "n", text: fmtDuration(g.oldest_visible_age) }),
          el("td", { className: "n", text: fmtRate(g.departure_rate) }),
          el("td", { className: "n", text: fmtEta(g), "data-col": "eta" }),
          el("td", {}, lineChart(series.get(g.group) || [], 120, 24, "spark", false)));
      }));
      if (!data.groups.length) tbody.append(el("tr", {}, el("td", { colspan: 10, className: "muted", text: filter ? "No group matches." : "No groups yet." })));
      const q = (o) => "/?" + new URLSearchParams({ filter: filter, offset: o }).toString();
      pager.replaceChildren(
        offset > 0 ? link(q(Math.max(0, offset - data.limit)), "← previous") : el("span"),
        el("span", { className: "muted", text: data.count ? (offset + 1) + "–" + Math.min(offset + data.limit, data.count) + " of " + fmtInt(data.count) : "" }),
        offset + data.limit < data.count ? link(q(offset + data.limit), "next →") : el("span"));
    }

    draw(await api("/api/groups", { filter: filter, offset: offset }));
    const history = setInterval(loadHistory, 60000);
    const s = stream({ filter: filter, offset: offset }, draw);
    return () => { s.stop(); clearInterval(history); };
  }

  async function groupPage(params) {
    const name = params.get("name") || "";
    document.title = "MassTasker · " + groupName(name);
    crumbs.replaceChildren(link("/", "groups"), " / ", el("span", { text: groupName(name) }));
    const token = params.get("page_token") || "";
    const labels = params.get("labels") || "";
    const state = params.get("state") || "all";
    const first = await api("/api/group", { name: name });
    let cards = statsCards(first.group);
    const chartBox = el("div", { id: "chart" });
    const points = first.group.history.map((p) => [p.time, p.total]);
    chartBox.append(lineChart(points, 720, 140, "chart", true));

    const labelInput = el("input", { name: "labels", placeholder: "label k=v", value: labels });
    const stateSelect = el("select", { name: "state" }, ...["all", "visible", "leased", "scheduled", "error"].map((s) => {
      const o = el("option", { value: s, text: s }); if (s === state) o.selected = true; return o;
    }));
    const filters = el("form", { className: "toolbar", action: "/group" },
      el("input", { type: "hidden", name: "name", value: name }), labelInput, stateSelect, el("button", { type: "submit", text: "Filter" }));
    const actions = el("div", { className: "toolbar" },
      actionButton("Retry all into…", "primary", () => act("Move every task of " + groupName(name) + " to another group, visible now, with its error cleared?", "/api/retry", { group: name }, true, "", reload)),
      actionButton("Move all to…", "", () => act("Move every task of " + groupName(name) + " to another group?", "/api/move", { group: name }, true, "", reload)),
      actionButton("Delete all", "danger", () => act("Delete every task of " + groupName(name) + "? This cannot be undone.", "/api/delete", { group: name }, false, "", reload)));
    const tbody = el("tbody", { id: "tasks" });
    const pager = el("div", { className: "pager" });
    app.replaceChildren(el("h1", { text: groupName(name) }), cards, chartBox, actions, el("h2", { text: "Tasks in queue order" }), filters,
      el("table", {}, el("thead", {}, el("tr", {}, ...["id", "state", "not before", "attempts", "type", "labels", "error"].map((h) => el("th", { text: h, className: h === "attempts" ? "attempts n" : "" })))), tbody), pager);

    let asked = 0;  // reloads started: only the newest one's answer is shown (answers may arrive out of order)
    async function reload() {
      const mine = ++asked;
      let reply;
      try {
        reply = await api("/api/tasks", { group: name, page_token: token, labels: labels.split(",").join("\n"), state: state });
      } catch (err) { return say(err.message); }
      if (mine !== asked) return;
      // Attempts (Task field 7) only where the server has it.
      const attempts = reply.tasks.some((t) => t.attempts !== null);
      for (const cell of document.querySelectorAll(".attempts")) cell.hidden = !attempts;
      tbody.replaceChildren(...reply.tasks.map(taskRow));
      if (!attempts) for (const cell of tbody.querySelectorAll(".attempts")) cell.hidden = true;
      if (!reply.tasks.length) tbody.append(el("tr", {}, el("td", { colspan: 7, className: "muted", text: "No tasks on this page." })));
      const here = (t) => "/group?" + new URLSearchParams({ name: name, labels: labels, state: state, page_token: t }).toString();
      pager.replaceChildren(token ? link(here(""), "← first page") : el("span"), reply.next_page_token ? link(here(reply.next_page_token), "next page →") : el("span"));
    }
    await reload();

    let lastKey = "";
    const s = stream({ group: name }, (data) => {
      const g = data.group;
      const fresh = statsCards(g);
      cards.replaceWith(fresh);
      cards = fresh;
      points.push([data.now, g.total]);
      while (points.length && points[0][0] < data.now - 3600) points.shift();
      chartBox.replaceChildren(lineChart(points, 720, 140, "chart", true));
      // The first event reloads too: a change between the first listing and the stream's start
      // would otherwise leave the list behind the counts until the next change.
      const key = [g.total, g.created, g.owned, g.departed, g.leased, g.errors].join("/");
      if (key !== lastKey) reload();
      lastKey = key;
    });
    return () => s.stop();
  }

  function labelsOf(labels) {
    return Object.entries(labels).map(([k, v]) => el("span", { className: "label", text: k + "=" + v }));
  }

  function taskRow(t) {
    return el("tr", { "data-id": t.id },
      el("td", {}, link(taskHref(t.id), String(t.id))),
      el("td", {}, el("span", { className: "state " + (t.state || ""), text: t.state || "" })),
      el("td", { text: t.not_before }),
      el("td", { className: "attempts n", text: t.attempts === null ? "-" : t.attempts }),
      el("td", { text: t.data ? t.data.type_url.split("/").pop() : "" }),
      el("td", {}, ...labelsOf(t.labels)),
      el("td", { className: "err", text: t.error }));
  }

  async function taskPage(params) {
    const id = params.get("id") || "";
    document.title = "MassTasker · task " + id;
    let t;
    try {
      t = (await api("/api/task", { id: id })).task;
    } catch (err) {
      crumbs.replaceChildren(link("/", "groups"));
      app.replaceChildren(el("h1", { text: "Task " + id }),
        el("p", { className: "muted", text: err.status === 404 ? "This task no longer exists. A task gets a new ID whenever it changes (leased, moved, retried), and is gone once done." : err.message }));
      return () => {};
    }
    crumbs.replaceChildren(link("/", "groups"), " / ", link(groupHref(t.group), groupName(t.group)), " / ", el("span", { text: "task " + t.id }));
    const fields = el("dl", { className: "fields" });
    function row(k, v) { fields.append(el("dt", { text: k }), el("dd", {}, v)); }
    row("id", String(t.id));
    row("group", link(groupHref(t.group), groupName(t.group)));
    row("state", el("span", { className: "state " + t.state, text: t.state }));
    row("not before", t.not_before);
    if (t.attempts !== null) row("attempts", String(t.attempts));
    row("labels", el("span", {}, ...labelsOf(t.labels)));
    row("error", el("span", { className: "err", id: "task-error", text: t.error || "—" }));
    row("payload type", t.data ? t.data.type_url : "(none)");
    const payload = !t.data ? el("p", { className: "muted", text: "No payload." })
      : t.data.fields !== null ? el("pre", { id: "payload", text: JSON.stringify(t.data.fields, null, 2) })
      : el("div", {}, el("p", { className: "muted", text: "This payload's type is not known to the server; its bytes, base64:" }), el("pre", { id: "payload", text: t.data.base64 }));
    const gone = () => { location.href = groupHref(t.group); };
    const actions = el("div", { className: "toolbar" },
      actionButton("Retry…", "primary", () => act("Move task " + t.id + " to another group, visible now, with its error cleared?", "/api/retry", { ids: [t.id] }, true, "", gone)),
      actionButton("Move…", "", () => act("Move task " + t.id + " to another group?", "/api/move", { ids: [t.id] }, true, "", gone)),
      actionButton("Delete", "danger", () => act("Delete task " + t.id + "? This cannot be undone.", "/api/delete", { ids: [t.id] }, false, "", gone)));
    const status = el("p", { className: "muted", id: "task-status" });
    app.replaceChildren(el("h1", { text: "Task " + t.id }), actions, status, fields, el("h2", { text: "Payload" }), payload);

    // Live: when the group changes, check that this task still exists (its ID dies with any change).
    let lastKey = "";
    const s = stream({ group: t.group }, async (data) => {
      const g = data.group;
      const key = [g.total, g.created, g.owned, g.departed].join("/");
      if (key !== lastKey) {  // the first event too: the task may have gone since the page was read
        try { await api("/api/task", { id: id }); } catch (err) {
          if (err.status === 404) status.textContent = "This task no longer exists: it was done, leased, moved or retried (each change gives a task a new ID).";
        }
      }
      lastKey = key;
    });
    return () => s.stop();
  }

  // -- start ---------------------------------------------------------------------------------------------

  function setupToken() {
    const form = document.getElementById("token-form");
    const input = document.getElementById("token");
    if (!info.actions_need_token && !info.reading_needs_token) return;
    form.hidden = false;
    input.value = sessionStorage.getItem("masstasker-token") || "";
    form.addEventListener("submit", (event) => {
      event.preventDefault();
      sessionStorage.setItem("masstasker-token", input.value.trim());
      location.reload();
    });
  }

  async function main() {
    try {
      info = await api("/api/info");
    } catch (err) {
      if (err.status !== 401) throw err;
      info = { mode: "read-only", actions_need_token: true, reading_needs_token: true };
    }
    setupToken();
    const params = new URLSearchParams(location.search);
    const pages = { "/": overview, "/group": groupPage, "/task": taskPage };
    const page = pages[location.pathname] || overview;
    try {
      await page(params);
    } catch (err) {
      app.replaceChildren(el("p", { className: "muted", text: "Could not load this page: " + err.message }));
    }
  }

  main();
})();
