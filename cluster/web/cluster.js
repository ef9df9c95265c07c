// The cluster at a glance, refreshed every second from /v1/cluster.
const COLORS = ["#3a6df0", "#1f9d55", "#d9822b", "#9b59d0", "#d64545", "#138a9e", "#8a6d3b", "#5a6b8c"];

function render(c) {
  const state = document.getElementById("state");
  state.textContent = c.state;
  state.className = "state-" + c.state;
  document.getElementById("model").textContent = c.model;
  document.getElementById("node-count").textContent = c.nodes.length;
  document.getElementById("toks").textContent = c.last_decode_tok_s ? c.last_decode_tok_s.toFixed(1) : "–";
  document.getElementById("sessions").textContent = c.requests_in_flight + " / " + c.cached_conversations;
  document.getElementById("message").textContent = c.message;
  document.getElementById("layer-count").textContent = "(" + c.num_layers + ")";

  const staged = c.nodes.filter(n => n.layers).sort((a, b) => a.layers[0] - b.layers[0]);
  const bar = document.getElementById("layerbar");
  bar.replaceChildren(...staged.map((n, i) => {
    const count = n.layers[1] - n.layers[0];
    return el("div", { class: "stage", "data-node": n.name, title: `${n.name}: layers ${n.layers[0]}-${n.layers[1] - 1}`,
                       style: `width:${100 * count / c.num_layers}%;background:${COLORS[i % COLORS.length]}` },
              `${n.name} ${n.layers[0]}-${n.layers[1] - 1}`);
  }));

  const rows = [...c.nodes].sort((a, b) => (a.layers ? a.layers[0] : 1e9) - (b.layers ? b.layers[0] : 1e9));
  document.getElementById("nodes").replaceChildren(...rows.map(n => {
    const weights = n.resident_bytes || n.weight_bytes, usable = n.usable_bytes || 1;
    const mem = el("div", { class: "membar" },
      el("div", { class: "w", style: `width:${100 * weights / usable}%` }),
      el("div", { class: "k", style: `width:${100 * n.kv_bytes / usable}%` }));
    return el("tr", { class: "node", "data-node": n.name },
      el("td", {}, n.name), el("td", {}, n.address), el("td", { class: "state-" + n.status }, n.status),
      el("td", {}, n.layers ? `${n.layers[0]}-${n.layers[1] - 1}` : "spare"), el("td", {}, mem),
      el("td", { class: "num" }, formatBytes(weights)), el("td", { class: "num" }, formatBytes(n.kv_bytes)),
      el("td", { class: "num" }, formatBytes(n.free_bytes)), el("td", { class: "num" }, formatBytes(n.usable_bytes)));
  }));
}

async function refresh() {
  try {
    render(await apiGet("v1/cluster"));
    document.getElementById("error").textContent = "";
  } catch (e) {
    document.getElementById("error").textContent = "cannot read the cluster: " + e.message;
  }
  setTimeout(refresh, 1000);
}

setupKeyButton();
refresh();
