// The dashboard: polls /admin/cluster every second and redraws the gateway figures and the
// worker and model tables.
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

  function draw(data) {
    const g = data.gateway;
    $("req-rate").textContent = g.e2e.per_second.toFixed(2);
    $("in-flight").textContent = g.in_flight;
    $("ttft").textContent = trio(g.ttft);
    $("e2e").textContent = trio(g.e2e);
    const workers = data.workers.map((w) => {
      const tr = row([
        w.id, w.models.join(", "), w.address, w.state, w.running, w.waiting, w.in_flight,
        w.tokens_per_second.toFixed(1),
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
      td.colSpan = 11;
      td.textContent = "No worker is registered.";
      const tr = document.createElement("tr");
      tr.append(td);
      workers.push(tr);
    }
    $("workers").tBodies[0].replaceChildren(...workers);
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
