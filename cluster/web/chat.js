// Chat with streaming (server-sent events from /v1/chat/completions), thinking folded, and stop.
let messages = [], controller = null;
const log = document.getElementById("log");

function bubble(role) {
  const reasoning = el("div", { class: "reasoning" });
  const details = el("details", { hidden: "" }, el("summary", {}, "thinking"), reasoning);
  const content = el("div", { class: "content" });
  const stats = el("div", { class: "stats" });
  const node = el("div", { class: "msg " + role }, details, content, stats);
  log.append(node);
  return { node, details, reasoning, content, stats };
}

async function* events(response) {
  const reader = response.body.getReader(), decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const line = buffer.slice(0, cut).trim();
      buffer = buffer.slice(cut + 2);
      if (!line.startsWith("data: ")) continue;
      const data = line.slice(6);
      if (data === "[DONE]") return;
      yield JSON.parse(data);
    }
  }
}

// The structured-output fields of the request: a JSON schema (response_format) and tools, as typed.
function structured() {
  const out = {};
  for (const [id, put] of [["schema", v => ({ response_format: { type: "json_schema", json_schema: { name: "web", schema: v } } })],
                           ["tools", v => ({ tools: v })]]) {
    const text = document.getElementById(id).value.trim();
    if (!text) continue;
    try { Object.assign(out, put(JSON.parse(text))); }
    catch (e) { throw new Error(`the ${id} field is not valid JSON: ${e.message}`); }
  }
  return out;
}

async function send(text) {
  messages.push({ role: "user", content: text });
  bubble("user").content.textContent = text;
  const reply = bubble("assistant");
  reply.node.classList.add("streaming");
  controller = new AbortController();
  document.getElementById("send").disabled = true;
  document.getElementById("stop").disabled = false;
  document.getElementById("error").textContent = "";
  const started = performance.now();
  let first = null, chunks = 0, reasoning = "", content = "", finish = "stopped";
  const calls = [];
  try {
    const response = await fetch("v1/chat/completions", {
      method: "POST", headers: apiHeaders(), signal: controller.signal,
      body: JSON.stringify({ messages, stream: true, thinking: document.getElementById("thinking").checked,
                             ...structured() }),
    });
    if (!response.ok) {
      const body = await response.json();
      throw new Error((body.error && body.error.message) || response.statusText);
    }
    for await (const event of events(response)) {
      if (event.error) throw new Error(event.error.message);
      const choice = event.choices && event.choices[0];
      if (!choice) continue;
      const delta = choice.delta || {};
      if (delta.reasoning_content) {
        reasoning += delta.reasoning_content;
        reply.details.hidden = false;
        reply.reasoning.textContent = reasoning;
      }
      if (delta.content) { content += delta.content; reply.content.textContent = content; }
      for (const call of delta.tool_calls || []) {
        calls.push({ id: call.id, type: "function", function: call.function });
        reply.node.insertBefore(el("div", { class: "tool-call muted" },
          `calls ${call.function.name}(${call.function.arguments})`), reply.stats);
      }
      if (delta.reasoning_content || delta.content) { chunks++; first = first || performance.now(); }
      if (choice.finish_reason) finish = choice.finish_reason;
    }
    messages.push({ role: "assistant", content, reasoning_content: reasoning || undefined,
                    tool_calls: calls.length ? calls : undefined });
  } catch (e) {
    if (e.name !== "AbortError") document.getElementById("error").textContent = e.message;
    messages.pop();
  } finally {
    const seconds = (performance.now() - (first || started)) / 1000;
    reply.stats.textContent = `${finish}; ${chunks} chunks` +
      (first ? `, first after ${Math.round(first - started)} ms, ${(chunks / Math.max(seconds, 1e-3)).toFixed(1)}/s` : "");
    reply.node.classList.remove("streaming");
    reply.node.classList.add("done");
    controller = null;
    document.getElementById("send").disabled = false;
    document.getElementById("stop").disabled = true;
  }
}

document.getElementById("ask").addEventListener("submit", event => {
  event.preventDefault();
  const box = document.getElementById("prompt"), text = box.value.trim();
  if (!text || controller) return;
  box.value = "";
  send(text);
});
document.getElementById("prompt").addEventListener("keydown", event => {
  if (event.key === "Enter" && !event.shiftKey) {
    event.preventDefault();
    document.getElementById("ask").requestSubmit();
  }
});
document.getElementById("stop").addEventListener("click", () => controller && controller.abort());
document.getElementById("reset").addEventListener("click", () => { messages = []; log.replaceChildren(); });
setupKeyButton();
