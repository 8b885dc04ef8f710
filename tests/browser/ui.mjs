// Drives herd's chat page and dashboard in headless Chromium against a running gateway.
// usage: node ui.mjs GATEWAY_URL ARTIFACTS_DIR CHROMIUM_PATH [API_KEY]
// With API_KEY the gateway requires it: the pages must ask for it before anything works.
// Prints one line per check; exits non-zero on the first failure (screenshots are saved either way).
import { chromium } from "playwright-core";
import { mkdirSync } from "node:fs";
import { join } from "node:path";

const [base, outDir, executablePath, apiKey] = process.argv.slice(2);
if (!base || !outDir || !executablePath) {
  console.error("usage: node ui.mjs GATEWAY_URL ARTIFACTS_DIR CHROMIUM_PATH");
  process.exit(2);
}
mkdirSync(outDir, { recursive: true });

const browser = await chromium.launch({
  executablePath,
  // Chromium as root needs --no-sandbox; the rest keep it off the (closed) network.
  args: ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--disable-default-apps"],
});
const problems = [];
const shot = async (page, name) => {
  await page.screenshot({ path: join(outDir, name), fullPage: true });
  console.log(`screenshot ${join(outDir, name)}`);
};
const check = (ok, what) => {
  if (!ok) throw new Error(what);
  console.log(`ok   ${what}`);
};
const watch = (page, name) => {
  page.on("pageerror", (e) => problems.push(`${name}: ${e.message}`));
  page.on("console", (m) => {
    // Before the key is given, the browser reports the gateway's 401s: that is the point.
    if (m.type() === "error" && !(apiKey && m.text().includes("status of 401"))) {
      problems.push(`${name} console: ${m.text()}`);
    }
  });
};
const lastAnswer = (page) => page.locator(".message.assistant .content").last();
// Opens a page of herd; with keys on, checks that it asks for one and gives it.
const open = async (page, path, asking) => {
  await page.goto(base + path);
  if (!apiKey) return;
  const field = page.getByLabel("API key");
  await page.getByText(asking).waitFor({ timeout: 15000 });
  check(await field.isVisible() || path === "/", `${path} asks for the API key`);
  if (path === "/" && !(await field.isVisible())) await page.locator("summary", { hasText: "Settings" }).click();
  await field.fill(apiKey);
  await field.press("Enter");
  await field.dispatchEvent("change");
};

// Load from node itself, as a small bench would: `loops` conversations in parallel, each a few
// short turns that resend the history (so later prompts find their prefix in the KV cache),
// streamed, until `ms` have passed. Returns how many answers completed and what went wrong.
const SYSTEM = "You are a terse assistant in a load test of a small language model cluster. Answer in one or two " +
  "short sentences, plainly, without lists, headings or code. Keep to the facts you are sure of.";
const OPENERS = ["Name a large river.", "What is a prime number?", "Describe the moon.", "What do bees make?"];
const FOLLOW_UPS = ["Tell me one more thing about it.", "Why does that matter?", "Say it more simply."];
const authHeaders = () => ({ "Content-Type": "application/json", ...(apiKey ? { Authorization: "Bearer " + apiKey } : {}) });
async function firstModel() {
  const resp = await fetch(base + "/v1/models", { headers: authHeaders() });
  if (!resp.ok) throw new Error(`GET /v1/models: ${resp.status} ${await resp.text()}`);
  const id = (await resp.json()).data[0]?.id;
  if (!id) throw new Error("GET /v1/models lists no model");
  return id;
}
async function streamChat(model, messages) {
  const resp = await fetch(base + "/v1/chat/completions", {
    method: "POST", headers: authHeaders(),
    body: JSON.stringify({ model, messages, stream: true, max_tokens: 32, temperature: 0 }),
  });
  if (!resp.ok) return { status: resp.status, retryAfter: Number(resp.headers.get("retry-after")) || 1, error: await resp.text() };
  const decoder = new TextDecoder();
  let buffer = "";
  let text = "";
  for await (const bytes of resp.body) {
    buffer += decoder.decode(bytes, { stream: true });
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      for (const line of event.split("\n")) {
        if (!line.startsWith("data: ") || line === "data: [DONE]") continue;
        const chunk = JSON.parse(line.slice(6));
        if (chunk.error) return { status: 200, error: chunk.error.message };
        text += chunk.choices?.[0]?.delta?.content || "";
      }
    }
  }
  return { status: 200, text };
}
async function load(model, loops, ms) {
  const until = Date.now() + ms;
  const stats = { answers: 0, errors: [] };
  await Promise.all(Array.from({ length: loops }, async (_, i) => {
    while (Date.now() < until) {
      const messages = [{ role: "system", content: SYSTEM }, { role: "user", content: OPENERS[i % OPENERS.length] }];
      for (let turn = 0; turn <= FOLLOW_UPS.length && Date.now() < until; turn++) {
        const r = await streamChat(model, messages).catch((e) => ({ status: 0, error: e.message }));
        if (r.status === 429) {
          await new Promise((done) => setTimeout(done, 1000 * r.retryAfter));
          continue;
        }
        if (r.error !== undefined) {
          stats.errors.push(`${r.status}: ${r.error}`.slice(0, 200));
          await new Promise((done) => setTimeout(done, 200));
          break;
        }
        stats.answers += 1;
        messages.push({ role: "assistant", content: r.text });
        if (turn < FOLLOW_UPS.length) messages.push({ role: "user", content: FOLLOW_UPS[turn] });
      }
    }
  }));
  return stats;
}
// What a worker's chart shows: its svg[data-chart=KIND][data-worker=ID] and its first line.
const chartState = (page, kind, worker) => page.evaluate(([kind, worker]) => {
  const svg = [...document.querySelectorAll(`#charts svg[data-chart="${kind}"]`)].find((s) => s.dataset.worker === worker);
  if (!svg) return null;
  const n = (v) => (v === undefined || v === "" ? null : Number(v));
  return {
    points: n(svg.dataset.points), max: n(svg.dataset.max), current: n(svg.dataset.current),
    first: n(svg.dataset.firstMs), last: n(svg.dataset.lastMs), role: svg.getAttribute("role"),
    label: svg.getAttribute("aria-label") || "", d: svg.querySelector("path[data-series]")?.getAttribute("d") ?? null,
  };
}, [kind, worker]);

let chat;
let dash;
try {
  const context = await browser.newContext({ viewport: { width: 1280, height: 900 } });
  chat = await context.newPage();
  watch(chat, "chat");
  await open(chat, "/", "Enter an API key");
  const model = chat.getByLabel("Model", { exact: true });
  await chat.waitForFunction(() => document.querySelector("#model").options.length > 0, null, { timeout: 30000 });
  check((await model.inputValue()) !== "", `the model picker lists ${await model.inputValue()}`);

  // Answers render as Markdown, built as DOM nodes: code blocks stay code, markup stays text.
  const rendered = await chat.evaluate(() => {
    const box = document.createElement("div");
    box.append(window.renderMarkdown("# Title\n\nSome **bold** and `code`:\n\n```rust\nfn main() {}\n```\n- one\n- two\n\n<img src=x onerror=alert(1)>"));
    return {
      heading: box.querySelector("h3")?.textContent,
      bold: box.querySelector("p strong")?.textContent,
      inline: box.querySelector("p code")?.textContent,
      block: box.querySelector("pre code")?.textContent,
      items: box.querySelectorAll("ul li").length,
      images: box.querySelectorAll("img").length,
      raw: box.textContent.includes("<img src=x onerror=alert(1)>"),
    };
  });
  check(rendered.heading === "Title" && rendered.bold === "bold" && rendered.inline === "code" &&
        rendered.block === "fn main() {}" && rendered.items === 2,
        `Markdown renders headings, emphasis, code and lists: ${JSON.stringify(rendered)}`);
  check(rendered.images === 0 && rendered.raw, "HTML in an answer is shown as text, never as markup");

  // A question, answered greedily, typed and sent from the keyboard.
  await chat.getByLabel("Temperature").fill("0");
  await chat.getByLabel("Max tokens").fill("60");
  await chat.getByLabel("Message").fill("Who wrote the play Hamlet?");
  await chat.getByLabel("Message").press("Enter");
  // Streaming: the answer must be seen growing, not only in its final form.
  const lengths = new Set();
  const deadline = Date.now() + 60000;
  while (Date.now() < deadline) {
    const text = (await lastAnswer(chat).textContent().catch(() => "")) || "";
    if (text) lengths.add(text.length);
    if (await chat.getByRole("button", { name: "Send" }).isEnabled() && text) break;
    await chat.waitForTimeout(15);
  }
  const answer = await lastAnswer(chat).textContent();
  check(answer.includes("Shakespeare"), `the answer names Shakespeare: ${JSON.stringify(answer)}`);
  check(lengths.size >= 3, `the answer streamed in (${lengths.size} distinct lengths seen)`);
  await shot(chat, "chat-answer.png");

  // The conversation survives a reload (local storage).
  await chat.reload();
  await chat.waitForFunction(() => document.querySelectorAll(".message").length >= 2);
  await chat.waitForFunction(() => document.querySelector("#model").options.length > 0);
  check((await lastAnswer(chat).textContent()) === answer, "the conversation is kept across a reload");

  // The dashboard, beside a long answer: the worker's running count rises, then falls after Stop.
  dash = await context.newPage();
  watch(dash, "dashboard");
  await open(dash, "/dashboard", "Enter an API key to see the cluster");
  const row = dash.locator("#workers tbody tr[data-worker]").first();
  await row.waitFor({ timeout: 15000 });
  const running = async () => Number(await row.locator("td").nth(3).textContent());
  // The table shows what the worker last reported (it heartbeats every few seconds).
  const runningIn = (lo, hi) => dash.waitForFunction(([lo, hi]) => {
    const cell = document.querySelector("#workers tbody tr[data-worker] td:nth-of-type(4)");
    const n = cell ? Number(cell.textContent) : NaN;
    return n >= lo && n <= hi;
  }, [lo, hi], { timeout: 30000 });
  await runningIn(0, 0);
  check((await running()) === 0, "the dashboard lists the worker, idle");
  await shot(dash, "dashboard-idle.png");

  await chat.getByRole("button", { name: "New chat" }).click();
  check((await chat.locator(".message").count()) === 0, "New chat clears the conversation");
  await chat.getByLabel("Max tokens").fill("3000");
  await chat.getByLabel("Message").fill("Write a very long story about a dragon who learns to cook.");
  await chat.getByRole("button", { name: "Send" }).click();
  await runningIn(1, Infinity);
  check((await running()) >= 1, `the dashboard's running count rose to ${await running()} during the answer`);
  await shot(dash, "dashboard-running.png");

  await chat.getByRole("button", { name: "Stop" }).click();
  await chat.getByText("Stopped.", { exact: true }).first().waitFor({ timeout: 5000 });
  const stoppedAt = (await lastAnswer(chat).textContent()).length;
  await chat.waitForTimeout(1500);
  check((await lastAnswer(chat).textContent()).length === stoppedAt, `the answer stopped growing at ${stoppedAt} characters`);
  check(await chat.getByRole("button", { name: "Send" }).isEnabled(), "Send is available again after Stop");
  await runningIn(0, 0);
  check(true, "the worker stopped generating (running back to 0)");
  await shot(chat, "chat-stopped.png");
  await shot(dash, "dashboard-after-stop.png");

  // Regenerate asks again and answers again.
  await chat.getByLabel("Max tokens").fill("20");
  await chat.getByRole("button", { name: "Regenerate" }).click();
  await chat.waitForFunction(() => !document.querySelector("#send").disabled && document.querySelectorAll(".message.assistant").length === 1, null, { timeout: 60000 });
  check(((await lastAnswer(chat).textContent()) || "").length > 0, "Regenerate replaces the answer");

  // The worker's charts (its last five minutes, inline SVG) move during a bench run from here.
  const worker = await row.getAttribute("data-worker");
  const kinds = ["tokens", "queue", "cached"];
  await dash.waitForFunction((worker) => [...document.querySelectorAll('#charts svg[data-chart="tokens"]')]
    .some((s) => s.dataset.worker === worker && Number(s.dataset.points) > 0), worker, { timeout: 30000 });
  const charts = Object.fromEntries(await Promise.all(kinds.map(async (k) => [k, await chartState(dash, k, worker)])));
  check(kinds.every((k) => charts[k] && charts[k].role === "img" && charts[k].label.includes(worker)),
        `worker ${worker} has tokens/s, queue and cached-share charts, each an svg role="img" with a label: ` +
        JSON.stringify(kinds.map((k) => charts[k] && charts[k].label)));
  const before = charts.tokens;
  const loadModel = await firstModel();
  const loadMs = 14000;
  const seen = []; // the tokens/s chart while the load runs, and until its samples show the end of it
  let sampling = true;
  const sampler = (async () => {
    while (sampling) {
      const at = Date.now();
      seen.push({ at, ...(await chartState(dash, "tokens", worker)) });
      await new Promise((done) => setTimeout(done, Math.max(0, 500 - (Date.now() - at))));
    }
  })();
  const started = Date.now();
  const loadRun = load(loadModel, 4, loadMs);
  await new Promise((done) => setTimeout(done, loadMs / 2));
  await shot(dash, "dashboard-charts-load.png");
  const stats = await loadRun;
  const loadEnded = Date.now();
  console.log(`load: ${stats.answers} answers from ${loadModel} in ${((loadEnded - started) / 1000).toFixed(1)} s by 4 loops` +
              (stats.errors.length ? `; ${stats.errors.length} errors, first: ${stats.errors[0]}` : ""));
  check(stats.answers > 0, `the load got answers (${stats.answers}; errors: ${stats.errors.slice(0, 3).join(" | ") || "none"})`);
  // Samples come every ~2 s: wait for two more than the chart had when the load ended.
  const lastAtEnd = seen.length ? seen[seen.length - 1].last : before.last;
  await dash.waitForFunction(([worker, last]) => {
    const svg = [...document.querySelectorAll('#charts svg[data-chart="tokens"]')].find((s) => s.dataset.worker === worker);
    return svg && Number(svg.dataset.lastMs) >= last + 3500;
  }, [worker, lastAtEnd], { timeout: 20000 }).catch(() => console.log("note: fewer than two samples came after the load"));
  sampling = false;
  await sampler;
  const after = await chartState(dash, "tokens", worker);
  await shot(dash, "dashboard-charts-after.png");
  const during = seen.filter((s) => s.at >= started && s.at <= loadEnded + 1000);
  const peakNow = Math.max(0, ...seen.map((s) => s.current || 0));
  const peakNowDuring = Math.max(0, ...during.map((s) => s.current || 0));
  const maxDuring = Math.max(0, ...during.map((s) => s.max || 0));
  console.log(`tokens/s chart: ${before.points} -> ${after.points} points, latest sample ${before.last} -> ${after.last}; ` +
              `during the load: max ${maxDuring.toFixed(1)}, highest latest value ${peakNowDuring.toFixed(1)} ` +
              `(${peakNow.toFixed(1)} counting the samples just after)`);
  // Once five minutes of samples are held, old ones leave as new ones come: then the window moves instead.
  const full = before.last - before.first >= 290000;
  check(after.last > before.last && (after.points > before.points || (full && after.first > before.first)),
        `the tokens/s chart drew new samples during the load (${before.points} -> ${after.points} points` +
        `${full ? ", window full" : ""}; latest sample ${before.last} -> ${after.last})`);
  check(maxDuring > 0 && peakNow > 0,
        `the tokens/s chart showed a non-zero rate during the load (chart max ${maxDuring.toFixed(1)}, ` +
        `latest value up to ${peakNow.toFixed(1)} tokens/s)`);
  check(after.d !== before.d && after.d, "the tokens/s chart's line changed (its path's d differs from before the load)");
  check(/now \d/.test(after.label), `the tokens/s chart's label gives the current value: ${JSON.stringify(after.label)}`);
  for (const k of ["queue", "cached"]) {
    const c = await chartState(dash, k, worker);
    console.log(`${k} chart: ${charts[k].points} -> ${c.points} points, max ${c.max}, latest ${c.current}; ${c.label}`);
  }

  // A narrow screen: no sideways scrolling, settings folded away, the message box reachable.
  const phone = await browser.newContext({ viewport: { width: 360, height: 740 } });
  const small = await phone.newPage();
  watch(small, "narrow chat");
  await open(small, "/", "Enter an API key");
  await small.waitForFunction(() => document.querySelector("#model").options.length > 0);
  const overflow = await small.evaluate(() => document.documentElement.scrollWidth - window.innerWidth);
  check(overflow <= 0, `the chat page fits a 360 px screen (overflow ${overflow} px)`);
  check(await small.getByLabel("Message").isVisible(), "the message box is visible on a narrow screen");
  await shot(small, "chat-narrow.png");
  // Same tab: the key given on the chat page is remembered for the dashboard.
  await small.goto(base + "/dashboard");
  await small.locator("#workers tbody tr[data-worker]").first().waitFor();
  const dashOverflow = await small.evaluate(() => document.documentElement.scrollWidth - window.innerWidth);
  check(dashOverflow <= 0, `the dashboard fits a 360 px screen (its tables scroll inside their box; overflow ${dashOverflow} px)`);
  const chartWidths = await small.evaluate(() =>
    [...document.querySelectorAll("#charts svg[data-chart]")].map((s) => Math.round(s.getBoundingClientRect().width)));
  check(chartWidths.length >= 3 && Math.min(...chartWidths) >= 250,
        `the charts take the width of a 360 px screen, one a row (widths ${chartWidths.join(", ")} px)`);
  await shot(small, "dashboard-narrow.png");

  check(problems.length === 0, `no script errors on the pages${problems.length ? ": " + problems.join("; ") : ""}`);
  console.log("browser test: all checks passed");
} catch (e) {
  console.error(`FAIL ${e.message}`);
  for (const [page, name] of [[chat, "failure-chat.png"], [dash, "failure-dashboard.png"]]) {
    if (page) await shot(page, name).catch(() => {});
  }
  if (problems.length) console.error("page errors: " + problems.join("; "));
  process.exitCode = 1;
} finally {
  await browser.close();
}
