// Shared by the pages: the API key (kept in this browser only) and JSON calls to the API.
const KEY_ITEM = "kimi-cluster-api-key";

function apiHeaders() {
  const key = localStorage.getItem(KEY_ITEM);
  const headers = { "Content-Type": "application/json" };
  if (key) headers["Authorization"] = "Bearer " + key;
  return headers;
}

async function apiGet(path) {
  const response = await fetch(path, { headers: apiHeaders() });
  const body = await response.json();
  if (!response.ok) throw new Error((body.error && body.error.message) || response.statusText);
  return body;
}

function setupKeyButton() {
  const button = document.getElementById("key");
  const label = () => { button.textContent = localStorage.getItem(KEY_ITEM) ? "API key set" : "Set API key"; };
  button.addEventListener("click", () => {
    const key = prompt("API key (the up --api-key value; empty for none):", localStorage.getItem(KEY_ITEM) || "");
    if (key === null) return;
    if (key) localStorage.setItem(KEY_ITEM, key); else localStorage.removeItem(KEY_ITEM);
    label();
  });
  label();
}

function formatBytes(n) {
  const units = ["B", "KB", "MB", "GB", "TB"];
  let i = 0;
  while (n >= 1000 && i < units.length - 1) { n /= 1000; i++; }
  return (i ? n.toFixed(1) : n) + " " + units[i];
}

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "class") node.className = v; else if (k === "style") node.style.cssText = v; else node.setAttribute(k, v);
  }
  for (const child of children) node.append(child);
  return node;
}
