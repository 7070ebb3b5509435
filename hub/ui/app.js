// Shoal dashboard: renders the hub's live stream (GET /v1/stream, server-sent events).
// Plain JavaScript, no dependencies: the hub serves this file as is.
"use strict";

const state = {
  devices: [],
  workloads: [],
  events: [], // newest last, at most KEEP
  connected: false,
  received: 0,
};
const KEEP = 500;

// --- small DOM helpers (text only: nothing from the fleet is ever parsed as HTML) ---

function h(tag, attrs, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === undefined || v === null || v === false) continue;
    if (k === "class") el.className = v;
    else if (k.startsWith("data-") || k === "href" || k === "title" || k === "role" || k.startsWith("aria-")) el.setAttribute(k, v);
    else el[k] = v;
  }
  for (const c of children.flat()) {
    if (c === undefined || c === null || c === false) continue;
    el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return el;
}

function table(headers, rows, attrs) {
  return h("table", attrs,
    h("thead", {}, h("tr", {}, headers.map((x) => h("th", {}, x)))),
    h("tbody", {}, rows.length ? rows : [h("tr", {}, h("td", { colSpan: headers.length, class: "muted" }, "none"))]));
}

function ago(ms) {
  if (!ms) return "-";
  const s = Math.max(0, Math.floor((Date.now() - ms) / 1000));
  if (s < 120) return s + "s";
  if (s < 7200) return Math.floor(s / 60) + "m";
  if (s < 172800) return Math.floor(s / 3600) + "h";
  return Math.floor(s / 86400) + "d";
}

function bytes(n) {
  if (!n) return "0";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
  return (n >= 10 || i === 0 ? Math.round(n) : n.toFixed(1)) + " " + units[i];
}

function short(rev) { return (rev || "").slice(0, 12); }

function deviceState(d) {
  const s = d.lost ? "Lost" : d.online ? "Online" : "Offline";
  return d.cordoned ? s + ", Cordoned" : s;
}

function badge(text, kind) {
  return h("span", { class: "badge " + (kind || text.split(",")[0].toLowerCase()) }, text);
}

function bar(done, total, label) {
  const pct = total > 0 ? Math.min(100, Math.round((100 * done) / total)) : 0;
  const fill = h("span", { class: "fill" });
  fill.style.width = pct + "%"; // CSSOM, which the page's CSP allows (no inline style attribute)
  return h("span", { class: "bar", role: "progressbar", "aria-valuenow": String(pct), title: label || pct + "%" }, fill);
}

function deviceLink(id) {
  return id ? h("a", { href: "#/devices/" + encodeURIComponent(id) }, id) : h("span", { class: "muted" }, "<none>");
}

function workloadLink(name) {
  return h("a", { href: "#/workloads/" + encodeURIComponent(name) }, name);
}

function phases(w) {
  const counts = {};
  for (const r of w.replicas) counts[r.phase] = (counts[r.phase] || 0) + 1;
  return Object.entries(counts).map(([p, n]) => badge(n > 1 ? p + " ×" + n : p, p.toLowerCase()));
}

function eventsTable(events, limit) {
  const rows = events.slice(-limit).reverse().map((e) =>
    h("tr", { class: e.type === "Warning" ? "warning" : "", "data-reason": e.reason },
      h("td", { title: new Date(e.timeMs).toISOString() }, ago(e.timeMs)),
      h("td", {}, badge(e.type, e.type.toLowerCase())),
      h("td", {}, e.reason),
      h("td", {}, objectLink(e.object)),
      h("td", {}, e.message)));
  return table(["Age", "Type", "Reason", "Object", "Message"], rows, { class: "events" });
}

function objectLink(object) {
  const [kind, name] = object.split("/", 2);
  if (kind === "workload") return workloadLink(name);
  if (kind === "device") return deviceLink(name);
  return object;
}

// --- views ---

function summary() {
  const d = state.devices;
  const online = d.filter((x) => x.online).length;
  const lost = d.filter((x) => x.lost).length;
  const reps = state.workloads.flatMap((w) => w.replicas);
  const running = reps.filter((r) => r.phase === "Running").length;
  return [
    h("span", { "data-testid": "devices-online" }, online + "/" + d.length + " devices online"),
    lost ? h("span", { class: "warn" }, lost + " lost") : null,
    h("span", {}, state.workloads.length + " workloads"),
    h("span", {}, running + "/" + reps.length + " replicas running"),
  ];
}

function overview() {
  const devices = state.devices.map((d) =>
    h("tr", { "data-device": d.id, "data-state": deviceState(d) },
      h("td", {}, deviceLink(d.id)),
      h("td", {}, badge(deviceState(d))),
      h("td", {}, d.arch || "-"),
      h("td", {}, String(d.replicas)),
      h("td", {}, bar(d.memoryAllocated, d.memory, bytes(d.memoryAllocated) + " of " + bytes(d.memory) + " allocated"),
        " ", bytes(d.memoryAllocated) + " / " + bytes(d.memory)),
      h("td", {}, ago(d.lastSeenMs))));
  const workloads = state.workloads.map((w) => {
    const r = w.rollout;
    const rolling = r && !["Complete"].includes(r.state);
    return h("tr", { "data-workload": w.name, "data-phases": w.replicas.map((x) => x.phase).join(",") },
      h("td", {}, workloadLink(w.name)),
      h("td", {}, w.ready + "/" + w.desired),
      h("td", {}, w.placement),
      h("td", { title: w.revision }, short(w.revision)),
      h("td", {}, phases(w)),
      h("td", {}, rolling ? [bar(r.updated, r.total), " ", r.state + " " + r.updated + "/" + r.total] : "-"));
  });
  return [
    h("section", {}, h("h2", {}, "Devices"),
      table(["Device", "State", "Arch", "Replicas", "Memory allocated", "Last seen"], devices, { id: "devices" })),
    h("section", {}, h("h2", {}, "Workloads"),
      table(["Workload", "Ready", "Placement", "Revision", "Phases", "Rollout"], workloads, { id: "workloads" })),
    h("section", {}, h("h2", {}, "Recent events"), eventsTable(state.events, 50)),
  ];
}

function workloadPage(name) {
  const w = state.workloads.find((x) => x.name === name);
  if (!w) return [h("h2", {}, "Workload " + name), h("p", { class: "muted" }, "No such workload (yet).")];
  const replicas = w.replicas.map((r) =>
    h("tr", { "data-replica": String(r.replica), "data-phase": r.phase },
      h("td", {}, w.name + "-" + r.replica),
      h("td", {}, deviceLink(r.device)),
      h("td", {}, r.variant || "-"),
      h("td", {}, badge(r.phase, r.phase.toLowerCase())),
      h("td", {}, String(r.restarts)),
      h("td", {}, ago(r.startedAtMs)),
      h("td", { title: r.revision }, short(r.revision)),
      h("td", {}, r.reason || "")));
  const out = [
    h("h2", {}, "Workload ", h("span", { "data-testid": "workload-name" }, w.name)),
    h("dl", {},
      h("dt", {}, "Ready"), h("dd", {}, w.ready + "/" + w.desired),
      h("dt", {}, "Placement"), h("dd", {}, w.placement),
      h("dt", {}, "Revision"), h("dd", {}, w.revision),
      w.pendingReason ? [h("dt", {}, "Pending"), h("dd", { class: "warn" }, w.pendingReason)] : null),
    h("section", {}, h("h3", {}, "Replicas"),
      table(["Instance", "Device", "Variant", "Phase", "Restarts", "Started", "Revision", "Reason"], replicas, { id: "replicas" })),
  ];
  const r = w.rollout;
  if (r) {
    out.push(h("section", { id: "rollout" }, h("h3", {}, "Rollout"),
      h("p", {}, badge(r.state, r.state.toLowerCase()), " revision ", h("code", {}, short(r.revision)),
        r.previousRevision ? [" from ", h("code", {}, short(r.previousRevision))] : null,
        " ", bar(r.updated, r.total), " ", r.updated + "/" + r.total + " updated",
        r.reason ? h("span", { class: "muted" }, " (" + r.reason + ")") : null),
      table(["Revision", "Applied", "Outcome"],
        (r.history || []).slice().reverse().map((e) =>
          h("tr", {}, h("td", { title: e.revision }, short(e.revision)), h("td", {}, ago(e.appliedMs)), h("td", {}, e.outcome))))));
  }
  out.push(h("section", {}, h("h3", {}, "Events"),
    eventsTable(state.events.filter((e) => e.object === "workload/" + name), 100)));
  return out;
}

function devicePage(id) {
  const d = state.devices.find((x) => x.id === id);
  if (!d) return [h("h2", {}, "Device " + id), h("p", { class: "muted" }, "No such device.")];
  const here = [];
  for (const w of state.workloads) {
    for (const r of w.replicas) {
      if (r.device === id) {
        here.push(h("tr", { "data-phase": r.phase },
          h("td", {}, workloadLink(w.name), "-" + r.replica),
          h("td", {}, r.variant || "-"),
          h("td", {}, badge(r.phase, r.phase.toLowerCase())),
          h("td", {}, String(r.restarts)),
          h("td", {}, ago(r.startedAtMs)),
          h("td", {}, r.reason || "")));
      }
    }
  }
  const labels = Object.entries(d.labels || {}).map(([k, v]) => k + "=" + v).join(", ") || "<none>";
  return [
    h("h2", {}, "Device ", h("span", { "data-testid": "device-name" }, d.id), " ", badge(deviceState(d))),
    h("dl", {},
      h("dt", {}, "Arch / OS"), h("dd", {}, (d.arch || "-") + " / " + (d.os || "-")),
      h("dt", {}, "Runtimes"), h("dd", {}, (d.runtimes || []).join(", ") || "-"),
      h("dt", {}, "CPUs"), h("dd", {}, String(d.cpus)),
      h("dt", {}, "Memory"), h("dd", {}, bar(d.memoryAllocated, d.memory), " ",
        bytes(d.memoryAllocated) + " allocated of " + bytes(d.memory)),
      h("dt", {}, "Labels"), h("dd", {}, labels),
      h("dt", {}, "Generation"), h("dd", {}, d.observedGeneration + " observed / " + d.desiredGeneration + " desired"),
      h("dt", {}, "Agent"), h("dd", {}, d.agentVersion || "-"),
      h("dt", {}, "Last seen"), h("dd", {}, ago(d.lastSeenMs)),
      h("dt", {}, "mDNS"), h("dd", {}, (d.mdnsAddresses || []).join(", ") || "-")),
    h("section", {}, h("h3", {}, "Replicas here"),
      table(["Instance", "Variant", "Phase", "Restarts", "Started", "Reason"], here, { id: "device-replicas" })),
    h("section", {}, h("h3", {}, "Events"),
      eventsTable(state.events.filter((e) => e.object === "device/" + id), 100)),
  ];
}

function render() {
  document.getElementById("summary").replaceChildren(...summary().filter(Boolean));
  const link = document.getElementById("link");
  link.textContent = state.connected ? "live" : "reconnecting…";
  link.className = "link " + (state.connected ? "up" : "down");
  const route = decodeURIComponent(location.hash.replace(/^#\/?/, "")).split("/");
  let view;
  if (route[0] === "workloads" && route[1]) view = workloadPage(route[1]);
  else if (route[0] === "devices" && route[1]) view = devicePage(route[1]);
  else view = overview();
  const main = document.getElementById("view");
  main.replaceChildren(...view.filter(Boolean));
  main.dataset.updates = String(state.received);
}

// --- the live stream (EventSource reconnects by itself) ---

function connect() {
  const source = new EventSource("/v1/stream");
  source.addEventListener("fleet", (msg) => {
    const f = JSON.parse(msg.data);
    state.devices = f.devices;
    state.workloads = f.workloads;
    const last = state.events.length ? state.events[state.events.length - 1].seq : 0;
    // A restarted hub numbers its events from 1 again: start over.
    if (f.events.length && f.events[0].seq <= last) state.events = [];
    state.events.push(...f.events);
    if (state.events.length > KEEP) state.events.splice(0, state.events.length - KEEP);
    state.connected = true;
    state.received++;
    render();
  });
  source.onerror = () => {
    state.connected = false;
    render();
  };
}

window.addEventListener("hashchange", render);
setInterval(render, 5000); // ages move on
connect();
