// edgellm's chat page: the conversation lives here; each reply streams from /v1/chat/completions.
// Text is shown with textContent only (never parsed as HTML).
"use strict";

const $ = (id) => document.getElementById(id);
const history = [];  // {role, content} of the conversation so far
let controller = null;  // AbortController of the reply being streamed

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = $("api_key").value.trim();
  if (key) h["Authorization"] = "Bearer " + key;
  return h;
}

function bubble(role, text) {
  const div = document.createElement("div");
  div.className = "msg " + role;
  div.textContent = text;
  $("log").appendChild(div);
  div.scrollIntoView({ block: "end" });
  return div;
}

async function errorText(resp) {
  try {
    const body = await resp.json();
    if (body && body.error && body.error.message) return body.error.message;
  } catch (e) { /* not JSON */ }
  return "HTTP " + resp.status;
}

function busy(on) {
  $("send").disabled = on;
  $("stop").disabled = !on;
}

async function send(text) {
  history.push({ role: "user", content: text });
  bubble("user", text);
  const out = bubble("assistant", "");
  const system = $("system").value.trim();
  const body = {
    messages: (system ? [{ role: "system", content: system }] : []).concat(history),
    stream: true,
    temperature: Number($("temperature").value),
    max_tokens: Number($("max_tokens").value),
  };
  controller = new AbortController();
  busy(true);
  $("status").textContent = "…";
  const t0 = performance.now();
  let reply = "", pieces = 0, reason = null;
  try {
    const resp = await fetch("/v1/chat/completions", {
      method: "POST", headers: headers(), body: JSON.stringify(body), signal: controller.signal,
    });
    if (!resp.ok) throw new Error(await errorText(resp));
    const reader = resp.body.getReader();
    const decoder = new TextDecoder();
    let buf = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buf += decoder.decode(value, { stream: true });
      let end;
      while ((end = buf.indexOf("\n\n")) >= 0) {  // one server-sent event
        const event = buf.slice(0, end);
        buf = buf.slice(end + 2);
        for (const line of event.split("\n")) {
          if (!line.startsWith("data:")) continue;
          const data = line.slice(5).trim();
          if (data === "[DONE]") continue;
          const chunk = JSON.parse(data);
          if (chunk.error) throw new Error(chunk.error.message);
          const choice = chunk.choices && chunk.choices[0];
          if (!choice) continue;
          if (choice.delta && choice.delta.content) {
            reply += choice.delta.content;
            pieces += 1;
            out.textContent = reply;
          }
          if (choice.finish_reason) reason = choice.finish_reason;
        }
      }
      out.scrollIntoView({ block: "end" });
    }
    const s = (performance.now() - t0) / 1000;
    $("status").textContent = `${pieces} pieces in ${s.toFixed(1)} s` + (reason ? ` (${reason})` : "");
  } catch (e) {
    if (e.name === "AbortError") {
      $("status").textContent = "stopped";
    } else {
      out.className = "msg error";
      out.textContent = e.message;
      $("status").textContent = "";
      history.pop();  // the question stays on screen but not in the conversation sent next time
      controller = null;
      busy(false);
      return;
    }
  }
  history.push({ role: "assistant", content: reply });
  out.dataset.done = "1";
  controller = null;
  busy(false);
}

async function showModel() {
  try {
    const resp = await fetch("/v1/models", { headers: headers() });
    if (!resp.ok) { $("model").textContent = await errorText(resp); return; }
    const body = await resp.json();
    $("model").textContent = body.data.map((m) => m.id).join(", ");
  } catch (e) { $("model").textContent = "server unreachable"; }
}

document.addEventListener("DOMContentLoaded", () => {
  $("api_key").value = sessionStorage.getItem("edgellm_key") || "";
  $("api_key").addEventListener("change", () => { sessionStorage.setItem("edgellm_key", $("api_key").value); showModel(); });
  $("form").addEventListener("submit", (ev) => {
    ev.preventDefault();
    const text = $("prompt").value.trim();
    if (!text || controller) return;
    $("prompt").value = "";
    send(text);
  });
  $("prompt").addEventListener("keydown", (ev) => {
    if (ev.key === "Enter" && !ev.shiftKey) { ev.preventDefault(); $("form").requestSubmit(); }
  });
  $("stop").addEventListener("click", () => { if (controller) controller.abort(); });
  $("clear").addEventListener("click", () => {
    if (controller) controller.abort();
    history.length = 0;
    $("log").textContent = "";
    $("status").textContent = "";
  });
  showModel();
});
