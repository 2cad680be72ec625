// The page of `gpt serve`: a chat and a completion playground over the server's own OpenAI
// API (/v1), streamed as server-sent events. No libraries, nothing fetched from elsewhere.
"use strict";

const $ = (id) => document.getElementById(id);
const chat = [];  // the conversation so far: {role, content}
let running = null;  // the AbortController of the request in flight

function showError(message) {
  $("error").textContent = message;
  $("error").hidden = !message;
}

function setStatus(text) {
  $("status").textContent = text;
}

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = $("api-key").value.trim();
  if (key) h.Authorization = `Bearer ${key}`;
  return h;
}

// The settings as request fields; a value that is not a number is refused here, and one out
// of range by the server, whose error names the field and the fix.
function settings() {
  const fields = { temperature: "temperature", top_p: "top-p", max_tokens: "max-tokens" };
  const body = {};
  for (const [field, id] of Object.entries(fields)) {
    const text = $(id).value.trim();
    if (text === "") continue;  // the server's default
    const value = Number(text);
    if (!Number.isFinite(value)) throw new Error(`'${field}' must be a number, got "${text}"`);
    body[field] = value;
  }
  return body;
}

// POST `body` with stream: true; call onText with each new piece of text; resolve with the
// finish reason. Rejects with the server's error message (and its code, as `code`).
async function stream(path, body, onText, signal) {
  const response = await fetch(path, {
    method: "POST", headers: headers(), signal,
    body: JSON.stringify({ ...body, stream: true, stream_options: { include_usage: true } }),
  });
  if (!response.ok) {
    let message = `${response.status} ${response.statusText}`, code = null;
    try {
      ({ message, code } = (await response.json()).error);
    } catch (e) { /* not JSON */ }
    const error = new Error(message);
    error.code = code;
    throw error;
  }
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "", finish = null, usage = null;
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true });
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      if (!event.startsWith("data: ")) continue;
      const data = event.slice(6);
      if (data === "[DONE]") return { finish, usage };
      const chunk = JSON.parse(data);
      if (chunk.error) throw new Error(chunk.error.message);
      if (chunk.usage) usage = chunk.usage;
      for (const choice of chunk.choices) {
        const text = choice.delta ? choice.delta.content : choice.text;
        if (text) onText(text);
        if (choice.finish_reason) finish = choice.finish_reason;
      }
    }
  }
  return { finish, usage };
}

function busy(on, stopButton) {
  for (const id of ["chat-send", "complete"]) $(id).disabled = on;
  $(stopButton).disabled = !on;
}

async function run(stopButton, request) {
  showError("");
  let body;
  try {
    body = settings();
  } catch (e) {
    showError(e.message);
    return;
  }
  running = new AbortController();
  busy(true, stopButton);
  setStatus("generating...");
  const started = performance.now();
  try {
    const { finish, usage, notice } = await request(body, running.signal);
    const seconds = ((performance.now() - started) / 1000).toFixed(2);
    const tokens = usage ? `${usage.completion_tokens} tokens, ` : "";
    setStatus(`${notice ? `(${notice}) ` : ""}${tokens}${seconds} s, finished: ${finish}`);
  } catch (e) {
    if (e.name === "AbortError") {
      setStatus("stopped");
    } else {
      showError(e.message);
      setStatus("");
    }
  } finally {
    running = null;
    busy(false, stopButton);
  }
}

function addMessage(role, content) {
  const div = document.createElement("div");
  div.className = `message ${role}`;
  div.textContent = content;
  $("messages").appendChild(div);
  return div;
}

// Send the conversation and the new message. When it no longer fits the model's context, the
// oldest exchanges (a user message and its reply) are dropped one at a time until it does, as
// `gpt chat` does; the page still shows them.
async function sendChat(event) {
  event.preventDefault();
  const content = $("chat-input").value;
  if (!content.trim() || running) return;
  await run("chat-stop", async (body, signal) => {
    const user = addMessage("user", content);
    const reply = addMessage("assistant", "");
    let text = "", dropped = 0;
    for (;;) {
      try {
        const messages = [...chat, { role: "user", content }];
        const result = await stream("/v1/chat/completions", { ...body, messages },
          (piece) => { text += piece; reply.textContent = text; }, signal);
        chat.push({ role: "user", content }, { role: "assistant", content: text });
        $("chat-input").value = "";
        if (dropped) {
          const turns = dropped > 1 ? `${dropped} oldest exchanges` : "oldest exchange";
          result.notice = `dropped the ${turns} to fit the model's context`;
        }
        return result;
      } catch (e) {
        if (e.code === "context_length_exceeded" && chat.length >= 2) {
          chat.splice(0, 2);
          dropped += 1;
          continue;
        }
        if (e.name !== "AbortError") { user.remove(); reply.remove(); }
        else chat.push({ role: "user", content }, { role: "assistant", content: text });
        throw e;
      }
    }
  });
}

async function complete(event) {
  event.preventDefault();
  if (running) return;
  const prompt = $("prompt").value;
  await run("completion-stop", async (body, signal) => {
    const output = $("output");
    output.textContent = "";
    const shown = document.createElement("span");
    shown.className = "prompt";
    shown.textContent = prompt;
    const generated = document.createElement("span");
    generated.id = "generated";
    output.append(shown, generated);
    return stream("/v1/completions", { ...body, prompt },
      (piece) => { generated.textContent += piece; }, signal);
  });
}

function switchTo(name) {
  for (const panel of ["chat", "completion"]) {
    $(panel).hidden = panel !== name;
    $(`tab-${panel}`).classList.toggle("active", panel === name);
  }
}

async function loadModel() {
  try {
    const response = await fetch("/v1/models", { headers: headers() });
    if (response.status === 401) {
      $("model").textContent = "(this server needs an API key: enter it above)";
      return;
    }
    const models = await response.json();
    $("model").textContent = models.data.map((m) => m.id).join(", ");
  } catch (e) {
    $("model").textContent = "(the server cannot be reached)";
  }
}

document.addEventListener("DOMContentLoaded", () => {
  $("tab-chat").addEventListener("click", () => switchTo("chat"));
  $("tab-completion").addEventListener("click", () => switchTo("completion"));
  $("chat-form").addEventListener("submit", sendChat);
  $("completion-form").addEventListener("submit", complete);
  $("chat-input").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey) sendChat(e);
  });
  for (const id of ["chat-stop", "completion-stop"]) {
    $(id).addEventListener("click", () => running && running.abort());
  }
  $("chat-clear").addEventListener("click", () => {
    chat.length = 0;
    $("messages").textContent = "";
  });
  $("api-key").addEventListener("change", loadModel);
  loadModel();
});
