// The dashboard: polls /admin/cluster every second and redraws the gateway figures, the worker
// and model tables, and each worker's charts of its last five minutes (inline SVG, drawn here).
"use strict";

(function () {
  const $ = (id) => document.getElementById(id);
  const KEY = "herd.chat.key";
  const keyInput = $("api-key");
  keyInput.value = sessionStorage.getItem(KEY) || "";
  keyInput.addEventListener("change", () => {
    sessionStorage.setItem(KEY, keyInput.value.trim());
    refresh();
  });

  const secs = (v) => (v === null || v === undefined ? "–" : v < 1 ? Math.round(v * 1000) + " ms" : v.toFixed(2) + " s");
  const trio = (s) => (s.count ? [s.p50, s.p90, s.p99].map(secs).join(" / ") : "no requests yet");

  function row(cells) {
    const tr = document.createElement("tr");
    cells.forEach((value, i) => {
      const cell = document.createElement(i === 0 ? "th" : "td");
      if (i === 0) cell.scope = "row";
      cell.textContent = value;
      tr.append(cell);
    });
    return tr;
  }

  // ---- Charts -------------------------------------------------------------------------------
  // Each chart is an <svg role="img"> whose aria-label says what it shows and its latest value;
  // its data-* attributes (data-chart, data-worker, data-points, data-max, data-current,
  // data-first-ms, data-last-ms) describe what is drawn, for tests and tools.

  const SVG = "http://www.w3.org/2000/svg";
  const SPAN_MS = 300 * 1000; // the x axis: the 5 minutes up to the latest sample
  // The drawing's coordinates (it scales with its box, keeping this shape).
  const W = 300, H = 124;
  const PLOT = { left: 34, right: 292, top: 10, bottom: 100 };
  const count = (n) => (typeof n === "number" && isFinite(n) ? Math.round(n).toLocaleString("en-US") : null);
  const pct = (v) => Math.round(v * 100) + "%";
  const rate = (v) => (v >= 100 ? v.toFixed(0) : v.toFixed(1));
  const compact = (v) => (v >= 1e6 ? v / 1e6 + "M" : v >= 1e3 ? v / 1e3 + "k" : String(v));

  // The charts of a worker: each names its series (a field of a history sample) and how to say
  // a value. `fixedMax` pins the y axis; otherwise it is scaled to the largest value drawn.
  const CHARTS = [
    {
      kind: "tokens", title: "Tokens/s", what: "Tokens generated per second",
      series: [{ key: "tokens", label: "tokens/s", field: "tokens_per_second" }],
      area: true, say: rate, axis: compact,
    },
    {
      kind: "queue", title: "Sequences", what: "Running and waiting sequences",
      series: [
        { key: "running", label: "running", field: "running" },
        { key: "waiting", label: "waiting", field: "waiting" },
      ],
      say: (v) => String(Math.round(v)), axis: compact,
    },
    {
      kind: "cached", title: "Cached prefix share", what: "Share of prompt tokens found in the KV cache",
      series: [{ key: "cached", label: "cached", field: "cached_share" }],
      area: true, fixedMax: 1, say: pct, axis: pct,
    },
  ];

  // The smallest of 1, 2, 5 × 10^k at or above v (at least 1).
  function niceMax(v) {
    if (!(v > 1)) return 1;
    const p = Math.pow(10, Math.floor(Math.log10(v)));
    for (const m of [1, 2, 5, 10]) if (m * p >= v * (1 - 1e-9)) return m * p;
    return 10 * p;
  }

  const num = (v) => (typeof v === "number" && isFinite(v) ? v : null);

  // What to draw of one chart from a worker's history (oldest first): the samples of the last
  // five minutes up to the latest, the line of each series (broken at nulls and at gaps in the
  // reports, never drawn as zero) and the figures the captions give.
  function plan(history, def) {
    const samples = (Array.isArray(history) ? history : []).filter((s) => s && num(s.t_ms) !== null);
    samples.sort((a, b) => a.t_ms - b.t_ms);
    const end = samples.length ? samples[samples.length - 1].t_ms : 0;
    const start = end - SPAN_MS;
    const shown = samples.filter((s) => s.t_ms >= start);
    // A silence longer than three usual intervals (at least 5 s) is a gap, not a straight line.
    const steps = shown.slice(1).map((s, i) => s.t_ms - shown[i].t_ms).sort((a, b) => a - b);
    const gap = Math.max(5000, 3 * (steps.length ? steps[steps.length >> 1] : 2000));
    const value = (s, serie) => {
      const v = num(s[serie.field]);
      return v === null ? null : def.fixedMax ? Math.min(Math.max(v, 0), def.fixedMax) : Math.max(v, 0);
    };
    let max = 0;
    let points = 0;
    for (const s of shown) {
      let any = false;
      for (const serie of def.series) {
        const v = value(s, serie);
        if (v === null) continue;
        any = true;
        max = Math.max(max, v);
      }
      if (any) points += 1;
    }
    const top = def.fixedMax || niceMax(max);
    const x = (t) => PLOT.left + ((t - start) / SPAN_MS) * (PLOT.right - PLOT.left);
    const y = (v) => PLOT.bottom - (v / top) * (PLOT.bottom - PLOT.top);
    const r = (n) => Math.round(n * 10) / 10;
    const lines = {};
    const areas = {};
    const current = {};
    for (const serie of def.series) {
      const runs = []; // runs of consecutive drawable points
      let run = null;
      let last = null;
      for (const s of shown) {
        const v = value(s, serie);
        if (v === null || (last !== null && s.t_ms - last > gap)) run = null;
        if (v !== null) {
          if (!run) runs.push((run = []));
          run.push([r(x(s.t_ms)), r(y(v))]);
        }
        last = s.t_ms;
      }
      // A lone point is drawn as a dot (a zero-length line with round caps).
      lines[serie.key] = runs.map((p) => "M" + p.map((q) => q.join(",")).join("L") + (p.length === 1 ? "h0" : "")).join("");
      areas[serie.key] = runs
        .filter((p) => p.length > 1)
        .map((p) => `M${p[0][0]},${PLOT.bottom}L` + p.map((q) => q.join(",")).join("L") + `L${p[p.length - 1][0]},${PLOT.bottom}Z`)
        .join("");
      current[serie.key] = shown.length ? value(shown[shown.length - 1], serie) : null;
    }
    return {
      points, max, top, lines, areas, current,
      first: shown.length ? shown[0].t_ms : null,
      last: shown.length ? end : null,
    };
  }

  function svgEl(name, attrs, parent) {
    const el = document.createElementNS(SVG, name);
    for (const [k, v] of Object.entries(attrs || {})) el.setAttribute(k, v);
    if (parent) parent.append(el);
    return el;
  }

  function el(name, className, text) {
    const e = document.createElement(name);
    if (className) e.className = className;
    if (text !== undefined) e.textContent = text;
    return e;
  }

  // Builds one (empty) chart: a <figure> with a caption (title, legend with latest values) and the SVG.
  function makeChart(def, workerId) {
    const fig = el("figure", "chart chart-" + def.kind);
    const cap = el("figcaption");
    cap.append(el("span", "chart-title", def.title));
    const legend = el("span", "chart-legend");
    const values = {};
    for (const serie of def.series) {
      const item = el("span", "legend-item");
      const swatch = el("span", "swatch s-" + serie.key);
      swatch.setAttribute("aria-hidden", "true");
      values[serie.key] = el("span", "legend-value", "–");
      item.append(swatch, def.series.length > 1 ? serie.label + " " : "now ", values[serie.key]);
      legend.append(item);
    }
    cap.append(legend);
    const note = el("p", "chart-note");
    const svg = svgEl("svg", {
      viewBox: `0 0 ${W} ${H}`, role: "img", class: "chart-svg", focusable: "false",
      "data-chart": def.kind, "data-worker": workerId, "data-points": "0",
    });
    const grid = svgEl("g", { class: "grid" }, svg);
    for (let m = 0; m <= 5; m++) {
      const gx = PLOT.left + (m / 5) * (PLOT.right - PLOT.left);
      svgEl("line", { x1: gx, x2: gx, y1: PLOT.top, y2: PLOT.bottom, class: "tick" }, grid);
    }
    for (const gy of [PLOT.top, (PLOT.top + PLOT.bottom) / 2]) {
      svgEl("line", { x1: PLOT.left, x2: PLOT.right, y1: gy, y2: gy, class: "tick" }, grid);
    }
    svgEl("line", { x1: PLOT.left, x2: PLOT.right, y1: PLOT.bottom, y2: PLOT.bottom, class: "axis" }, grid);
    const label = (text, attrs) => {
      const t = svgEl("text", attrs, svg);
      t.textContent = text;
      return t;
    };
    const yMax = label("–", { x: PLOT.left - 4, y: PLOT.top + 4, "text-anchor": "end", class: "y-max" });
    label("0", { x: PLOT.left - 4, y: PLOT.bottom + 4, "text-anchor": "end", class: "y-zero" });
    label("−5 min", { x: PLOT.left, y: H - 6, "text-anchor": "start", class: "x-label" });
    label("now", { x: PLOT.right, y: H - 6, "text-anchor": "end", class: "x-label" });
    const empty = label("No samples yet", {
      x: (PLOT.left + PLOT.right) / 2, y: (PLOT.top + PLOT.bottom) / 2 + 4, "text-anchor": "middle", class: "empty",
    });
    const areas = {};
    const lines = {};
    for (const serie of def.series) {
      if (def.area) areas[serie.key] = svgEl("path", { d: "", class: "area s-" + serie.key }, svg);
    }
    for (const serie of def.series) {
      lines[serie.key] = svgEl("path", { d: "", class: "line s-" + serie.key, "data-series": serie.key }, svg);
    }
    fig.append(cap, svg, note);
    return { def, fig, svg, yMax, empty, areas, lines, values, note, workerId };
  }

  function describe(def, p, workerId) {
    const head = `${def.what}, worker ${workerId}, last 5 minutes: `;
    if (!p.points) return head + "no samples yet.";
    const latest = def.series
      .map((s) => {
        const v = p.current[s.key];
        const said = v === null ? "none" : def.say(v);
        return def.series.length > 1 ? `${said} ${s.label}` : said;
      })
      .join(", ");
    const now = def.kind === "cached" && p.current.cached === null ? "no prompt in the latest interval" : "now " + latest;
    return head + `${now}; peak ${def.say(p.max)}; scale 0 to ${def.axis(p.top)}.`;
  }

  function updateChart(chart, worker) {
    const { def, svg } = chart;
    const p = plan(worker.history, def);
    for (const serie of def.series) {
      chart.lines[serie.key].setAttribute("d", p.lines[serie.key]);
      if (chart.areas[serie.key]) chart.areas[serie.key].setAttribute("d", p.areas[serie.key]);
      const v = p.current[serie.key];
      chart.values[serie.key].textContent = v === null ? "–" : def.say(v);
    }
    chart.yMax.textContent = def.axis(p.top);
    chart.empty.setAttribute("visibility", p.points ? "hidden" : "visible");
    svg.setAttribute("aria-label", describe(def, p, chart.workerId));
    svg.dataset.points = p.points;
    svg.dataset.max = p.max;
    const first = def.series[0].key;
    svg.dataset.current = p.current[first] === null ? "" : p.current[first];
    svg.dataset.firstMs = p.first === null ? "" : p.first;
    svg.dataset.lastMs = p.last === null ? "" : p.last;
    // Totals since the worker started, when it reports them.
    let note = "";
    if (def.kind === "tokens" && count(worker.generated_tokens) !== null) {
      note = `${count(worker.generated_tokens)} tokens generated in all`;
    } else if (def.kind === "cached" && count(worker.prompt_tokens) !== null) {
      const cached = num(worker.cached_prompt_tokens) || 0;
      note = worker.prompt_tokens > 0
        ? `${pct(cached / worker.prompt_tokens)} of ${count(worker.prompt_tokens)} prompt tokens in all`
        : "no prompt processed yet";
    } else if (def.kind === "queue") {
      note = "peak " + def.say(p.max) + " in 5 minutes";
    }
    chart.note.textContent = note;
  }

  const panels = new Map(); // worker id -> { section, charts }
  let panelCount = 0;

  function panel(worker) {
    let found = panels.get(worker.id);
    if (!found) {
      const section = el("section", "worker-charts");
      section.dataset.worker = worker.id;
      const title = el("h3", null);
      title.id = "worker-charts-" + ++panelCount;
      section.setAttribute("aria-labelledby", title.id);
      const name = el("span", "worker-name", worker.id);
      const models = el("span", "worker-models");
      title.append(name, " ", models);
      const grid = el("div", "charts");
      const charts = CHARTS.map((def) => makeChart(def, worker.id));
      grid.append(...charts.map((c) => c.fig));
      section.append(title, grid);
      found = { section, charts, models };
      panels.set(worker.id, found);
    }
    found.models.textContent = (worker.models || []).join(", ") + (worker.state && worker.state !== "ready" ? ` (${worker.state})` : "");
    for (const chart of found.charts) updateChart(chart, worker);
    return found.section;
  }

  function drawCharts(workers) {
    const seen = new Set(workers.map((w) => w.id));
    for (const id of [...panels.keys()]) if (!seen.has(id)) panels.delete(id);
    const box = $("charts");
    const sections = workers.map(panel);
    if (!sections.length) {
      box.replaceChildren(el("p", "muted", "No worker is registered."));
      return;
    }
    const same = sections.length === box.children.length && sections.every((s, i) => box.children[i] === s);
    if (!same) box.replaceChildren(...sections);
  }

  // ---- Polling ------------------------------------------------------------------------------

  function draw(data) {
    const g = data.gateway;
    $("req-rate").textContent = g.e2e.per_second.toFixed(2);
    $("in-flight").textContent = g.in_flight;
    $("ttft").textContent = trio(g.ttft);
    $("e2e").textContent = trio(g.e2e);
    $("routing").textContent = data.routing_policy || "–";
    const workers = data.workers.map((w) => {
      const tr = row([
        w.id, w.models.join(", "), w.address, w.state, w.running, w.waiting, w.in_flight,
        w.tokens_per_second.toFixed(1),
        w.pace > 1.05 ? `${w.load.toFixed(1)} (×${w.pace.toFixed(1)} slower)` : w.load.toFixed(1),
        w.kv_blocks_total
          ? `${w.kv_blocks_used} / ${w.kv_blocks_total} blocks (${w.kv_blocks_cached} cached)`
          : `${w.kv_used_tokens} tokens`,
        `${w.devices.join(", ")} (tp ${w.tp_size})`, w.seconds_since_heartbeat.toFixed(1) + " s ago",
      ]);
      tr.dataset.worker = w.id;
      tr.className = "state-" + w.state;
      return tr;
    });
    if (!workers.length) {
      const td = document.createElement("td");
      td.colSpan = 12;
      td.textContent = "No worker is registered.";
      const tr = document.createElement("tr");
      tr.append(td);
      workers.push(tr);
    }
    $("workers").tBodies[0].replaceChildren(...workers);
    drawCharts(data.workers);
    $("models").tBodies[0].replaceChildren(...data.models.map((m) => row([m.name, m.workers, m.ready])));
    $("status").textContent = "Updated " + new Date().toLocaleTimeString();
  }

  async function refresh() {
    const headers = {};
    const key = keyInput.value.trim();
    if (key) headers.Authorization = "Bearer " + key;
    try {
      const resp = await fetch("/admin/cluster", { headers });
      if (resp.status === 401) {
        $("key-field").hidden = false;
        $("status").textContent = "Enter an API key to see the cluster.";
        return;
      }
      if (!resp.ok) throw new Error(resp.status + " " + resp.statusText);
      draw(await resp.json());
    } catch (e) {
      $("status").textContent = "Cannot reach the gateway: " + e.message;
    }
  }

  refresh();
  setInterval(refresh, 1000);
})();
