// The lowband dashboard: the state pushed by /api/events (server-sent events), drawn without any
// library. Each push carries the curve points this page does not hold yet (train_from, val_from).
"use strict";

const COLORS = ["#2563eb", "#dc2626", "#16a34a", "#9333ea", "#ea580c", "#0891b2", "#4b5563", "#ca8a04"];
const MAX_POINTS = 1500;
let view = null;       // the latest state, with every curve point so far
let selected = null;   // the strategy whose sites are shown
let drawQueued = false;

function merge(update) {
  const before = view ? view.strategies : [];
  for (const [i, s] of update.strategies.entries()) {
    const old = before[i] && before[i].name === s.name ? before[i] : null;
    if (old && s.train_from > 0) s.train = old.train.slice(0, s.train_from).concat(s.train);
    if (old && s.val_from > 0) s.val = old.val.slice(0, s.val_from).concat(s.val);
  }
  // Wall-clock seconds since each strategy started: strategies that ran one after the other
  // are compared on one time axis.
  for (const s of update.strategies) {
    for (const p of s.train.concat(s.val)) p.elapsed = p.wall_seconds - s.started_wall_seconds;
  }
  view = update;
  if (!view.strategies.some((s) => s.name === selected)) {
    const running = view.strategies.filter((s) => !s.finished);
    const last = running.length ? running[running.length - 1] : view.strategies[view.strategies.length - 1];
    selected = last ? last.name : null;
  }
  if (!drawQueued) {
    drawQueued = true;
    requestAnimationFrame(() => { drawQueued = false; draw(); });
  }
}

function text(n, digits = 0) {
  if (n === null || n === undefined || Number.isNaN(n)) return "–";
  return Number(n).toLocaleString("en-US", { minimumFractionDigits: digits, maximumFractionDigits: digits });
}

function bytes(n) {
  const units = ["B", "kB", "MB", "GB", "TB"];
  let i = 0;
  while (n >= 1000 && i < units.length - 1) { n /= 1000; i++; }
  return `${n.toFixed(i ? 1 : 0)} ${units[i]}`;
}

function duration(seconds) {
  if (seconds === null || seconds === undefined) return "–";
  const s = Math.round(seconds);
  if (s < 90) return `${s} s`;
  if (s < 5400) return `${Math.round(s / 60)} min`;
  return `${(s / 3600).toFixed(1)} h`;
}

function element(tag, attributes = {}, children = []) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attributes)) e.setAttribute(k, v);
  for (const c of children) e.append(c);
  return e;
}

function draw() {
  document.getElementById("run").textContent = view.run;
  const status = document.getElementById("status");
  status.className = view.live ? "status live" : "status";
  status.textContent = view.live ? `running · ETA ${duration(view.eta_seconds)}` : "finished";
  drawStrategies();
  const strategy = view.strategies.find((s) => s.name === selected);
  if (strategy) {
    drawTotals(strategy);
    drawSites(strategy);
    drawTimeline(strategy);
  }
  drawChart("chart-tokens", (p) => p.tokens, "tokens", false);
  drawChart("chart-bytes", (p) => p.bytes, "bytes", true);
  drawChart("chart-wall", (p) => p.elapsed, "seconds", false);
  drawLegend();
}

function drawStrategies() {
  const nav = document.getElementById("strategies");
  nav.replaceChildren(...view.planned.map((name) => {
    const started = view.strategies.find((s) => s.name === name);
    const button = element("button", { type: "button" }, [started ? name : `${name} (not started)`]);
    if (name === selected) button.className = "selected";
    if (started) button.onclick = () => { selected = name; draw(); };
    else button.disabled = true;
    return button;
  }));
}

function drawTotals(s) {
  const train = s.train.length ? s.train[s.train.length - 1].loss : null;
  const val = s.val.length ? s.val[s.val.length - 1].loss : null;
  const cells = [
    ["steps", `${text(s.step)} / ${text(s.steps)}`],
    ["rounds", text(s.rounds)],
    ["inter-site bytes", bytes(s.bytes)],
    ["egress $", `$${text(s.egress_dollars, 4)}`],
    ["train loss", text(train, 4)],
    ["val loss", text(s.final_val_loss ?? val, 4)],
    ["emulated time", duration(s.emulated_seconds)],
    [s.finished ? "finished after" : "ETA", s.finished ? duration(s.wall_seconds - s.started_wall_seconds) : duration(s.eta_seconds)],
  ];
  document.getElementById("totals").replaceChildren(...cells.map(([label, value]) =>
    element("div", {}, [element("b", {}, [value]), element("span", {}, [label])])));
}

function drawSites(s) {
  const now = s.wall_seconds;
  const rows = s.site_views.map((site) => {
    const seen = site.last_seen_wall_seconds === null ? "–" : `${Math.max(0, now - site.last_seen_wall_seconds).toFixed(1)} s ago`;
    const history = site.history.map(([t, state]) => `${state} at ${t.toFixed(1)} s`).join(", ");
    const cells = [
      text(site.site),
      element("span", { class: "key" }, [site.key ?? "in memory"]),
      element("span", { class: `state ${site.state}`, title: history }, [site.state]),
      text(site.round),
      seen,
      text(site.compute_seconds, 1),
      text(site.sending_seconds, 2),
      text(site.waiting_seconds, 2),
      text(site.up_mbit_per_s, 1),
      text(site.down_mbit_per_s, 1),
      bytes(site.bytes_up),
      bytes(site.bytes_down),
      text(site.accepted),
      text(site.refused),
      text(site.cosine, 2),
      site.last_reason ?? "",
    ];
    return element("tr", { class: "site", "data-state": site.state }, cells.map((c) => element("td", {}, [c])));
  });
  document.querySelector("#sites tbody").replaceChildren(...rows);
}

function drawTimeline(s) {
  const rounds = s.timeline.slice(-12).reverse().map((r) => {
    const when = r.closed_wall_seconds === null ? "open" : `closed at ${r.closed_wall_seconds.toFixed(1)} s`;
    const chips = r.arrivals.map((a) => element("span", {
      class: `chip ${a.status}`,
      title: `${a.status}${a.wall_seconds === null ? "" : ` at ${a.wall_seconds.toFixed(2)} s`}${a.reason ? `: ${a.reason}` : ""}`,
    }, [`site ${a.site}`]));
    return element("div", { class: "round" }, [element("span", {}, [`round ${r.round}: ${when}`]), ...chips]);
  });
  document.getElementById("timeline").replaceChildren(...rounds);
  const excluded = s.exclusions.map(([round, site, reason]) =>
    element("div", {}, [`site ${site} excluded in round ${round}: ${reason}`]));
  document.getElementById("exclusions").replaceChildren(...excluded);
}

function thin(points) {
  if (points.length <= MAX_POINTS) return points;
  const every = Math.ceil(points.length / MAX_POINTS);
  const kept = points.filter((_, i) => i % every === 0);
  kept.push(points[points.length - 1]);
  return kept;
}

// One chart: every strategy's training loss (thin) and validation loss (thick) against `x`.
function drawChart(id, x, unit, logarithmic) {
  const svg = document.getElementById(id);
  const [width, height, left, bottom, top, right] = [420, 260, 44, 28, 8, 10];
  const series = [];
  view.strategies.forEach((s, i) => {
    const color = COLORS[i % COLORS.length];
    series.push({ points: thin(s.train), color, width: 1, opacity: 0.45 });
    series.push({ points: s.val, color, width: 2.2, opacity: 1 });
  });
  const all = series.flatMap((s) => s.points).filter((p) => !logarithmic || x(p) > 0);
  const children = [];
  if (all.length) {
    const fx = (p) => (logarithmic ? Math.log10(x(p)) : x(p));
    let [x0, x1] = [Math.min(...all.map(fx)), Math.max(...all.map(fx))];
    let [y0, y1] = [Math.min(...all.map((p) => p.loss)), Math.max(...all.map((p) => p.loss))];
    if (x1 === x0) x1 = x0 + 1;
    if (y1 === y0) y1 = y0 + 1;
    const sx = (v) => left + ((v - x0) / (x1 - x0)) * (width - left - right);
    const sy = (v) => top + (1 - (v - y0) / (y1 - y0)) * (height - top - bottom);
    children.push(svgElement("line", { class: "axis", x1: left, y1: height - bottom, x2: width - right, y2: height - bottom }));
    children.push(svgElement("line", { class: "axis", x1: left, y1: top, x2: left, y2: height - bottom }));
    for (const v of [y0, (y0 + y1) / 2, y1]) {
      children.push(svgElement("text", { x: 2, y: sy(v) + 3 }, v.toFixed(2)));
    }
    const label = (v) => (logarithmic ? bytes(10 ** v) : unit === "seconds" ? duration(v) : compact(v));
    children.push(svgElement("text", { x: left, y: height - 10 }, label(x0)));
    children.push(svgElement("text", { x: width - right - 60, y: height - 10 }, `${label(x1)}`));
    for (const s of series) {
      const shown = s.points.filter((p) => !logarithmic || x(p) > 0);
      if (!shown.length) continue;
      const points = shown.map((p) => `${sx(fx(p)).toFixed(1)},${sy(p.loss).toFixed(1)}`).join(" ");
      children.push(svgElement("polyline", {
        points, fill: "none", stroke: s.color, "stroke-width": s.width, "stroke-opacity": s.opacity,
      }));
    }
  } else {
    children.push(svgElement("text", { x: width / 2 - 40, y: height / 2 }, "no points yet"));
  }
  svg.replaceChildren(...children);
}

function compact(v) {
  if (v >= 1e9) return `${(v / 1e9).toFixed(1)}G`;
  if (v >= 1e6) return `${(v / 1e6).toFixed(1)}M`;
  if (v >= 1e3) return `${(v / 1e3).toFixed(1)}k`;
  return `${Math.round(v)}`;
}

function svgElement(tag, attributes, content) {
  const e = document.createElementNS("http://www.w3.org/2000/svg", tag);
  for (const [k, v] of Object.entries(attributes)) e.setAttribute(k, v);
  if (content !== undefined) e.textContent = content;
  return e;
}

function drawLegend() {
  const items = view.strategies.map((s, i) => element("span", {}, [
    element("i", { style: `background:${COLORS[i % COLORS.length]}` }), `${s.name} (thin: training, thick: validation)`,
  ]));
  document.getElementById("legend").replaceChildren(...items);
}

function connect() {
  const events = new EventSource("/api/events");
  events.addEventListener("state", (e) => merge(JSON.parse(e.data)));
  events.onerror = () => {
    const status = document.getElementById("status");
    if (view && !view.live) { events.close(); return; }
    status.className = "status";
    status.textContent = "disconnected: the run may be over (lowband view runs/NAME shows it again)";
  };
}

connect();
