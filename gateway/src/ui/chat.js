// The chat page: streams answers from /v1/chat/completions, keeps the conversation and settings
// in this browser's local storage, and the API key (when the gateway asks for one) in the tab's
// session storage only.
"use strict";

(function () {
  const $ = (id) => document.getElementById(id);
  const els = {
    model: $("model"), key: $("api-key"), keyField: $("key-field"), system: $("system"),
    temperature: $("temperature"), topP: $("top-p"), maxTokens: $("max-tokens"),
    conversation: $("conversation"), status: $("status"), form: $("composer"), message: $("message"),
    send: $("send"), stop: $("stop"), regenerate: $("regenerate"), newChat: $("new-chat"),
  };
  const STORE = "herd.chat";
  const saved = JSON.parse(localStorage.getItem(STORE) || "{}");
  let messages = Array.isArray(saved.messages) ? saved.messages : [];
  let running = null; // the AbortController of the answer being streamed

  for (const [name, el] of [["system", els.system], ["temperature", els.temperature],
                            ["top_p", els.topP], ["max_tokens", els.maxTokens]]) {
    if (saved[name] !== undefined) el.value = saved[name];
    el.addEventListener("change", save);
  }
  els.key.value = sessionStorage.getItem(STORE + ".key") || "";
  els.key.addEventListener("change", () => {
    sessionStorage.setItem(STORE + ".key", els.key.value.trim());
    loadModels();
  });
  els.model.addEventListener("change", save);

  function save() {
    localStorage.setItem(STORE, JSON.stringify({
      messages, model: els.model.value, system: els.system.value, temperature: els.temperature.value,
      top_p: els.topP.value, max_tokens: els.maxTokens.value,
    }));
  }

  function headers() {
    const h = { "Content-Type": "application/json" };
    const key = els.key.value.trim();
    if (key) h.Authorization = "Bearer " + key;
    return h;
  }

  function say(text) {
    els.status.textContent = text;
  }

  async function errorText(resp) {
    try {
      const body = await resp.json();
      return (body.error && body.error.message) || resp.statusText;
    } catch (_) {
      return resp.status + " " + resp.statusText;
    }
  }

  async function loadModels() {
    try {
      const resp = await fetch("/v1/models", { headers: headers() });
      if (!resp.ok) {
        say(resp.status === 401 ? "Enter an API key in Settings to chat." : await errorText(resp));
        return;
      }
      const list = (await resp.json()).data.map((m) => m.id);
      const wanted = els.model.value || saved.model;
      els.model.replaceChildren(...list.map((id) => new Option(id, id)));
      if (list.includes(wanted)) els.model.value = wanted;
      say(list.length ? "" : "No model is being served yet.");
    } catch (e) {
      say("Cannot reach the gateway: " + e.message);
    }
  }

  function bubble(role, text, note) {
    const li = document.createElement("li");
    li.className = "message " + role;
    const who = document.createElement("span");
    who.className = "role";
    who.textContent = role === "user" ? "You" : role === "assistant" ? "Assistant" : "Error";
    const body = document.createElement("div");
    body.className = "content";
    li.append(who, body);
    fill(body, role, text);
    if (note) addNote(li, note);
    els.conversation.append(li);
    li.scrollIntoView({ block: "end" });
    return li;
  }

  function fill(body, role, text) {
    if (role === "assistant") body.replaceChildren(window.renderMarkdown(text));
    else body.textContent = text;
  }

  function addNote(li, note) {
    const small = document.createElement("small");
    small.className = "note";
    small.textContent = note;
    li.append(small);
  }

  function redraw() {
    els.conversation.replaceChildren();
    for (const m of messages) bubble(m.role, m.content, m.note);
    buttons();
  }

  function buttons() {
    const busy = running !== null;
    els.send.disabled = busy;
    els.stop.disabled = !busy;
    els.regenerate.disabled = busy || !messages.some((m) => m.role === "user");
  }

  function request() {
    const convo = messages.filter((m) => m.role === "user" || m.role === "assistant")
      .map(({ role, content }) => ({ role, content }));
    const system = els.system.value.trim();
    const body = {
      model: els.model.value,
      messages: system ? [{ role: "system", content: system }, ...convo] : convo,
      stream: true,
      temperature: Number(els.temperature.value),
      top_p: Number(els.topP.value),
      max_tokens: Number(els.maxTokens.value),
    };
    return body;
  }

  // Reads the SSE body, calling onDelta with each piece of text; returns the finish reason.
  async function readStream(resp, onDelta) {
    const reader = resp.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    let finish = null;
    for (;;) {
      const { value, done } = await reader.read();
      if (done) return finish;
      buffer += decoder.decode(value, { stream: true });
      let cut;
      while ((cut = buffer.indexOf("\n\n")) >= 0) {
        const event = buffer.slice(0, cut);
        buffer = buffer.slice(cut + 2);
        for (const line of event.split("\n")) {
          if (!line.startsWith("data: ")) continue;
          const data = line.slice(6);
          if (data === "[DONE]") return finish;
          const chunk = JSON.parse(data);
          if (chunk.error) throw new Error(chunk.error.message);
          const choice = chunk.choices && chunk.choices[0];
          if (choice && choice.delta && choice.delta.content) onDelta(choice.delta.content);
          if (choice && choice.finish_reason) finish = choice.finish_reason;
        }
      }
    }
  }

  async function answer() {
    if (!els.model.value) {
      say("No model to ask: is a worker running?");
      return;
    }
    const reply = { role: "assistant", content: "" };
    const li = bubble("assistant", "");
    li.setAttribute("aria-busy", "true");
    const body = li.querySelector(".content");
    running = new AbortController();
    buttons();
    say("Generating…");
    let pending = false;
    const paint = () => {
      pending = false;
      fill(body, "assistant", reply.content);
      li.scrollIntoView({ block: "end" });
    };
    try {
      const resp = await fetch("/v1/chat/completions", {
        method: "POST", headers: headers(), body: JSON.stringify(request()), signal: running.signal,
      });
      if (!resp.ok) throw new Error(await errorText(resp));
      const finish = await readStream(resp, (text) => {
        reply.content += text;
        if (!pending) {
          pending = true;
          requestAnimationFrame(paint);
        }
      });
      if (finish === "length") reply.note = "Stopped at the max tokens limit.";
      say("");
    } catch (e) {
      if (e.name === "AbortError") {
        reply.note = "Stopped.";
        say("Stopped.");
      } else {
        li.remove();
        messages.push({ role: "error", content: e.message });
        bubble("error", e.message).setAttribute("role", "alert");
        say("The request failed.");
        return;
      }
    } finally {
      running = null;
      li.removeAttribute("aria-busy");
      buttons();
      save();
    }
    paint();
    if (reply.note) addNote(li, reply.note);
    messages.push(reply);
    save();
  }

  els.form.addEventListener("submit", (event) => {
    event.preventDefault();
    const text = els.message.value.trim();
    if (!text || running) return;
    messages.push({ role: "user", content: text });
    bubble("user", text);
    els.message.value = "";
    save();
    answer();
  });
  els.message.addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
      event.preventDefault();
      els.form.requestSubmit();
    }
  });
  els.stop.addEventListener("click", () => running && running.abort());
  els.regenerate.addEventListener("click", () => {
    if (running) return;
    while (messages.length && messages[messages.length - 1].role !== "user") messages.pop();
    redraw();
    answer();
  });
  els.newChat.addEventListener("click", () => {
    if (running) running.abort();
    messages = [];
    save();
    redraw();
    els.message.focus();
  });

  // Narrow screens start with the settings folded away.
  if (window.matchMedia("(max-width: 700px)").matches) $("settings-box").open = false;

  fetch("/ui/config").then((r) => r.json()).then((config) => {
    els.keyField.hidden = !config.api_keys;
  }).catch(() => {}).finally(loadModels);
  redraw();
})();
