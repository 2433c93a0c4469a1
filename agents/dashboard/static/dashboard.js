// The dspyrt dashboard page: polls ./api/snapshot and draws every series as an inline SVG chart.
// Nothing is fetched from anywhere but this server, and nothing from the bus is ever inserted as HTML:
// every label and message goes through textContent / setAttribute.
"use strict";

(function () {
  const SVG_NS = "http://www.w3.org/2000/svg";
  const POLL_MS = Math.max(250, Number(document.body.dataset.pollMs) || 2000);
  const COLORS = ["#1f5fbf", "#d9480f", "#2b8a3e", "#862e9c", "#c92a2a", "#0b7285", "#e67700", "#5c7cfa", "#495057"];
  const OVERVIEW = [
    "score", "improvement", "program_score", "validation_pass_rate", "cycle_cost", "lm_latency",
    "error_rate", "lm_tokens", "lm_cost", "queue_depth", "predictions", "feedback", "feedback_score",
    "optimization_duration",
  ];
  const W = 560, H = 200, PAD = { left: 58, right: 12, top: 10, bottom: 26 };
  const main = document.getElementById("main");
  const statusLine = document.getElementById("status");
  let timer = null;
  let generation = 0;

  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [key, value] of Object.entries(attrs || {})) {
      if (value !== undefined && value !== null) node.setAttribute(key, String(value));
    }
    for (const child of children.flat()) {
      if (child === undefined || child === null) continue;
      node.append(child instanceof Node ? child : document.createTextNode(String(child)));
    }
    return node;
  }

  function svg(tag, attrs, ...children) {
    const node = document.createElementNS(SVG_NS, tag);
    for (const [key, value] of Object.entries(attrs || {})) node.setAttribute(key, String(value));
    for (const child of children) node.append(child instanceof Node ? child : document.createTextNode(String(child)));
    return node;
  }

  function fmt(value) {
    if (value === null || value === undefined) return "–";
    if (Math.abs(value) >= 1e5 || (value !== 0 && Math.abs(value) < 1e-3)) return value.toExponential(2);
    return String(Number(value.toPrecision(4)));
  }

  function clock(t) {
    return new Date(t * 1000).toLocaleTimeString([], { hour12: false });
  }

  function labelText(labels) {
    const entries = Object.entries(labels || {});
    return entries.length ? entries.map(([k, v]) => k + "=" + v).join(", ") : "(no labels)";
  }

  function route() {
    const [view, ...rest] = (location.hash.slice(1) || "overview").split("/");
    return { view: view || "overview", arg: rest.length ? decodeURIComponent(rest.join("/")) : "" };
  }

  function link(view, arg, text) {
    return el("a", { href: "#" + view + "/" + encodeURIComponent(arg) }, text);
  }

  // --- charts ----------------------------------------------------------------------------------------

  function chart(metric, seriesList, info) {
    const all = seriesList.flatMap((s) => s.points);
    const figure = el("figure", { class: "chart", "data-metric": metric });
    const unit = info && info.unit ? " (" + info.unit + ")" : "";
    figure.append(el("figcaption", {}, metric, el("span", { class: "unit" }, unit)));
    const plot = svg("svg", { class: "plot", viewBox: "0 0 " + W + " " + H, role: "img", "aria-label": metric });
    figure.append(plot);
    if (!all.length) {
      figure.append(el("div", { class: "empty" }, "no points yet"));
      return figure;
    }
    let tMin = Infinity, tMax = -Infinity, vMin = Infinity, vMax = -Infinity;
    for (const [t, v] of all) {
      tMin = Math.min(tMin, t); tMax = Math.max(tMax, t); vMin = Math.min(vMin, v); vMax = Math.max(vMax, v);
    }
    if (tMax === tMin) { tMin -= 1; tMax += 1; }
    if (vMax === vMin) { const pad = Math.abs(vMax) * 0.1 || 1; vMin -= pad; vMax += pad; }
    const x = (t) => PAD.left + ((t - tMin) / (tMax - tMin)) * (W - PAD.left - PAD.right);
    const y = (v) => H - PAD.bottom - ((v - vMin) / (vMax - vMin)) * (H - PAD.top - PAD.bottom);
    plot.append(svg("line", { class: "axis", x1: PAD.left, y1: PAD.top, x2: PAD.left, y2: H - PAD.bottom }));
    plot.append(svg("line", { class: "axis", x1: PAD.left, y1: H - PAD.bottom, x2: W - PAD.right, y2: H - PAD.bottom }));
    for (const v of [vMin, (vMin + vMax) / 2, vMax]) {
      plot.append(svg("text", { x: PAD.left - 6, y: y(v) + 3, "text-anchor": "end" }, fmt(v)));
      plot.append(svg("line", { class: "axis", x1: PAD.left - 3, y1: y(v), x2: PAD.left, y2: y(v) }));
    }
    plot.append(svg("text", { x: PAD.left, y: H - 8, "text-anchor": "start" }, clock(tMin)));
    plot.append(svg("text", { x: W - PAD.right, y: H - 8, "text-anchor": "end" }, clock(tMax)));
    const legend = el("ul", { class: "legend" });
    seriesList.forEach((s, i) => {
      const color = COLORS[i % COLORS.length];
      const group = svg("g", { class: "series", "data-labels": JSON.stringify(s.labels), stroke: color });
      group.append(svg("polyline", { points: s.points.map((p) => x(p[0]) + "," + y(p[1])).join(" "), stroke: color }));
      for (const [t, v] of s.points) {
        const dot = svg("circle", { class: "point", cx: x(t), cy: y(v), r: 2.8, fill: color, "data-t": t, "data-v": v });
        dot.append(svg("title", {}, labelText(s.labels) + " @ " + clock(t) + ": " + fmt(v)));
        group.append(dot);
      }
      plot.append(group);
      const swatch = el("span", { class: "swatch" });
      swatch.style.backgroundColor = color; // CSSOM, not a style attribute: the CSP allows no inline styles
      legend.append(el("li", {}, swatch, labelText(s.labels) + " — last " + fmt(s.last)));
    });
    figure.append(legend);
    return figure;
  }

  function charts(snap, metrics) {
    const byMetric = new Map();
    for (const s of snap.series) {
      if (!byMetric.has(s.metric)) byMetric.set(s.metric, []);
      byMetric.get(s.metric).push(s);
    }
    const info = new Map(snap.metric_types.map((t) => [t.name, t]));
    const order = metrics || [...OVERVIEW, ...snap.metric_types.filter((t) => t.custom).map((t) => t.name)];
    const names = order.filter((m) => byMetric.has(m));
    for (const m of byMetric.keys()) if (!names.includes(m) && !metrics) names.push(m);
    const grid = el("div", { class: "grid" });
    for (const m of names) grid.append(chart(m, byMetric.get(m), info.get(m)));
    if (!names.length) grid.append(el("div", { class: "empty" }, "no series yet"));
    return grid;
  }

  // --- tables ----------------------------------------------------------------------------------------

  function table(headers, rows) {
    if (!rows.length) return el("div", { class: "empty" }, "none");
    return el("table", {}, el("thead", {}, el("tr", {}, headers.map((h) => el("th", {}, h)))),
      el("tbody", {}, rows.map((cells) => el("tr", {}, cells.map((c) => el("td", {}, c))))));
  }

  function alertRows(alerts) {
    return alerts.map((a) => [
      el("span", { class: "state-" + a.state }, a.state),
      a.rule, a.severity, el("span", { class: "labels" }, labelText(a.labels)), a.message,
      a.fired_at ? clock(a.fired_at) : "–", a.resolved_at ? clock(a.resolved_at) : "–",
    ]);
  }

  function alertTable(alerts) {
    return table(["state", "rule", "severity", "labels", "message", "fired", "resolved"], alertRows(alerts));
  }

  function card(value, label) {
    return el("div", { class: "card" }, el("div", { class: "value" }, value), el("div", { class: "label" }, label));
  }

  // --- views -----------------------------------------------------------------------------------------

  function overview(snap) {
    const firing = snap.alerts.filter((a) => a.state === "firing");
    return [
      el("div", { class: "cards" },
        card(snap.events, "events"), card(snap.programs.length, "programs"), card(snap.models.length, "models"),
        card(firing.length, "firing alerts"), card(snap.series.length, "series"),
        card(snap.queues.reduce((n, q) => n + q.depth, 0), "queued tasks")),
      el("h2", {}, "Firing alerts"), alertTable(firing),
      el("h2", {}, "Series"), charts(snap),
    ];
  }

  function programs(snap, name) {
    if (!name) {
      return [el("h2", {}, "Programs"), table(["program", "cycles", "last score", "improvement", "feedback", "feedback score", "active", "canary", "phase"],
        snap.programs.map((p) => [link("programs", p.program, p.program), p.cycles, fmt(p.last_score),
          fmt(p.last_improvement), p.feedback || 0, fmt(p.feedback_score), p.active_version ? "v" + p.active_version : "–",
          p.canary_version ? "v" + p.canary_version : "–", p.phase || "–"]))];
    }
    const p = snap.programs[0] || { program: name, log: [] };
    return [
      el("h2", {}, "Program " + name),
      el("div", { class: "cards" }, card(p.cycles || 0, "cycles"), card(fmt(p.last_score), "last score"),
        card(fmt(p.last_improvement), "last improvement"), card(p.active_version ? "v" + p.active_version : "–", "active"),
        card(p.canary_version ? "v" + p.canary_version : "–", "canary"), card(fmt(p.validation_pass_rate), "validation"),
        card(p.feedback || 0, "corrections"), card(fmt(p.feedback_score), "feedback score")),
      el("h2", {}, "Alerts"), alertTable(snap.alerts),
      el("h2", {}, "Series"), charts(snap),
      el("h2", {}, "Log"), table(["time", "event", "detail"], (p.log || []).slice().reverse().map((e) => [clock(e.time), e.topic, e.text])),
    ];
  }

  function models(snap, name) {
    const rows = snap.models.map((m) => [link("models", m.model, m.model), m.calls, m.failures,
      m.error_rate === null ? "–" : (m.error_rate * 100).toFixed(1) + "%", fmt(m.latency_p50_ms), fmt(m.latency_p95_ms),
      fmt(m.tokens), fmt(m.cost)]);
    const head = table(["model", "calls", "failures", "error rate", "p50 ms", "p95 ms", "tokens", "cost"], rows);
    if (!name) return [el("h2", {}, "Models"), head];
    return [el("h2", {}, "Model " + name), head, el("h2", {}, "Alerts"), alertTable(snap.alerts),
      el("h2", {}, "Series"), charts(snap)];
  }

  function alerts(snap) {
    const log = snap.alert_log.slice().reverse().map((e) => [clock(e.time), el("span", { class: "state-" + e.event }, e.event),
      e.rule, el("span", { class: "labels" }, labelText(e.labels)),
      e.action ? e.action + (e.ok === false ? " (failed)" : "") + (e.task_id ? " → " + e.task_id : "") : "–", e.message]);
    const rules = snap.rules.map((r) => [r.name, r.kind, r.metric, el("span", { class: "labels" }, labelText(r.labels)), r.severity]);
    return [
      el("h2", {}, "Alerts"), alertTable(snap.alerts),
      el("h2", {}, "History"), table(["time", "event", "rule", "labels", "action", "message"], log),
      el("h2", {}, "Rules"), table(["name", "kind", "metric", "labels", "severity"], rules),
    ];
  }

  const VIEWS = { overview, programs, models, alerts };

  function render(r, snap) {
    const view = VIEWS[r.view] || overview;
    main.replaceChildren(...view(snap, r.arg));
    for (const a of document.querySelectorAll("nav a")) a.classList.toggle("active", a.dataset.view === r.view);
    const firing = snap.alerts.filter((a) => a.state === "firing").length;
    document.getElementById("alert-count").textContent = firing ? String(firing) : "";
    const replay = snap.replaying ? " · replaying history" : "";
    statusLine.textContent = "updated " + clock(snap.generated_at) + " · " + snap.events + " events" + replay;
    statusLine.classList.remove("error");
    document.body.dataset.generatedAt = String(snap.generated_at);
  }

  async function refresh() {
    const r = route();
    const params = new URLSearchParams({ max_points: "300" });
    if (r.view === "programs" && r.arg) params.set("program", r.arg);
    if (r.view === "models" && r.arg) params.set("model", r.arg);
    const response = await fetch("api/snapshot?" + params.toString(), { cache: "no-store" });
    if (!response.ok) throw new Error("HTTP " + response.status);
    return { r, snap: await response.json() };
  }

  async function tick() {
    const mine = ++generation;
    clearTimeout(timer);
    try {
      const { r, snap } = await refresh();
      if (mine === generation) render(r, snap);
    } catch (err) {
      statusLine.textContent = "cannot reach the dashboard: " + err.message;
      statusLine.classList.add("error");
    } finally {
      if (mine === generation) timer = setTimeout(tick, POLL_MS);
    }
  }

  window.addEventListener("hashchange", tick);
  tick();
})();
