// tether's status page: plain DOM, no framework, nothing fetched from anywhere but this server's API. Every value
// from the API is placed with textContent, never parsed as HTML.
"use strict";

const $ = (id) => document.getElementById(id);
const SVG = "http://www.w3.org/2000/svg";
const DAY = 24 * 3600 * 1000;

let token = sessionStorage.getItem("tether-token");
let operator = false;
let current = null;
let generation = 0;
let refreshing = false;
let again = false;
// The timelines' span, from the range buttons: 24 hours unless another is picked.
let range = DAY;

class ApiError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

async function api(method, path) {
  const response = await fetch(path, { method, headers: { Authorization: "Bearer " + token } });
  const text = await response.text();
  let body = null;
  try {
    body = text ? JSON.parse(text) : null;
  } catch {
    body = text;
  }
  if (!response.ok) {
    const message = body && body.error ? body.error.message : response.statusText;
    throw new ApiError(response.status, message);
  }
  return body;
}

function el(tag, attrs, ...children) {
  const e = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) {
    if (key === "class") e.className = value;
    else if (key.startsWith("data-") || key === "title" || key === "type") e.setAttribute(key, value);
    else e[key] = value;
  }
  for (const child of children) e.append(child ?? "");
  return e;
}

function svg(tag, attrs) {
  const e = document.createElementNS(SVG, tag);
  for (const [key, value] of Object.entries(attrs)) e.setAttribute(key, value);
  return e;
}

const time = (at) => (at ? new Date(at).toLocaleString() : "—");
const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));
const keyOf = (a) => a.uplink || a.ip;

async function signIn(candidate) {
  token = candidate;
  try {
    await api("GET", "/v1/domains");
  } catch (e) {
    token = null;
    $("login-error").textContent = e.status === 401 ? "Unknown token." : "Cannot sign in: " + e.message;
    return;
  }
  sessionStorage.setItem("tether-token", candidate);
  try {
    await api("GET", "/v1/heartbeat-servers");
    operator = true;
  } catch {
    operator = false;
  }
  $("login").hidden = true;
  $("app").hidden = false;
  $("signout").hidden = false;
  $("operator").hidden = !operator;
  $("who").textContent = operator ? "operator" : "subscriber";
  await refresh();
  followChanges();
}

function signOut() {
  sessionStorage.removeItem("tether-token");
  token = null;
  location.reload();
}

// One refresh at a time; a request for another while one runs makes it run once more after.
async function refresh() {
  if (refreshing) {
    again = true;
    return;
  }
  refreshing = true;
  try {
    do {
      again = false;
      const domains = await api("GET", "/v1/domains");
      renderDomains(domains);
      if (current && domains.some((d) => d.name === current)) await renderDomain(current);
      if (operator) await renderFleet();
      $("status").textContent = "updated " + new Date().toLocaleTimeString();
    } while (again);
  } catch (e) {
    $("status").textContent = "cannot refresh: " + e.message;
    if (e.status === 401) signOut();
  } finally {
    refreshing = false;
  }
}

// Wakes as soon as the served view changes (a long poll), besides the refresh every second (the fleet's state is
// not part of the view).
async function followChanges() {
  while (token) {
    try {
      const r = await api("GET", "/v1/changes?after=" + generation);
      if (r.generation !== generation) {
        generation = r.generation;
        refresh();
      }
    } catch {
      await sleep(1000);
    }
  }
}

function renderDomains(domains) {
  const list = $("domains");
  list.replaceChildren(
    ...domains.map((d) => {
      const button = el("button", { type: "button", "data-domain": d.name, class: d.name === current ? "current" : "" }, d.name);
      button.onclick = () => {
        current = d.name;
        $("pick").hidden = true;
        $("domain").hidden = false;
        refresh();
      };
      return el("li", {}, button);
    }),
  );
  $("no-domains").hidden = domains.length > 0;
}

async function renderDomain(name) {
  const path = "/v1/domains/" + encodeURIComponent(name);
  const since = new Date(Date.now() - DAY).toISOString();
  const [domain, events, answer] = await Promise.all([
    api("GET", path),
    api("GET", path + "/events?since=" + encodeURIComponent(since)),
    api("GET", path + "/answer"),
  ]);
  $("domain-name").textContent = domain.name;
  const got = [answer.a, answer.aaaa].filter((r) => r && r.addresses);
  const addresses = got.flatMap((r) => r.addresses);
  $("answer").textContent = addresses.length ? addresses.join(", ") : "no address (" + (got[0] ? got[0].rcode : "no answer") + ")";
  const ttl = got.map((r) => r.ttl).find((t) => t !== null && t !== undefined);
  $("answer-ttl").textContent = ttl !== undefined ? "TTL " + ttl + " s" : "";

  const rows = [...(domain.addresses || [])].sort((a, b) => keyOf(a).localeCompare(keyOf(b)));
  $("uplinks").tBodies[0].replaceChildren(
    ...rows.map((a) =>
      el(
        "tr",
        { "data-uplink": keyOf(a), "data-ip": a.ip },
        el("td", {}, a.uplink || "(" + a.source + ")"),
        el("td", {}, a.ip),
        el("td", {}, a.interface_ip || "—"),
        el("td", {}, el("span", { class: "state " + a.state, "data-state": a.state }, a.state)),
        el("td", {}, time(a.changed_at)),
        el("td", { class: "hbs" }, a.hbs || "—"),
        el("td", {}, String(a.load)),
      ),
    ),
  );

  const now = Date.now();
  const start = now - range;
  $("timelines").replaceChildren(...rows.map((a) => timeline(keyOf(a), a.state, events, start, now)));

  const recent = events.slice(-50).reverse();
  $("events").replaceChildren(
    ...recent.map((e) => {
      const change = e.kind === "state" ? (e.previous || "?") + " → " + e.state : e.kind === "handover" ? (e.previous_hbs || "none") + " → " + e.hbs : e.kind;
      return el("li", { "data-kind": e.kind }, time(e.at) + "  " + (e.uplink || e.ip) + "  " + change + "  (" + e.reason + ")");
    }),
  );
}

// The address's states over the window, from its events: each event starts a segment in the state it left.
function segments(key, state, events, start, now) {
  const mine = events.filter((e) => (e.uplink || e.ip) === key);
  let at = start;
  let was = mine.length ? (mine[0].kind === "registered" ? "gone" : mine[0].previous || "pending") : state;
  const out = [];
  for (const e of mine) {
    const t = Math.max(start, Date.parse(e.at));
    if (t > at) out.push([at, t, was]);
    at = Math.max(at, t);
    was = e.kind === "removed" ? "gone" : e.state || was;
  }
  out.push([at, now, state]);
  return out;
}

function timeline(key, state, events, start, now) {
  const width = 600;
  const height = 30;
  const x = (t) => ((t - start) / (now - start)) * width;
  const graph = svg("svg", { class: "timeline", width, height, viewBox: `0 0 ${width} ${height}`, "data-uplink": key, role: "img" });
  for (const [from, to, what] of segments(key, state, events, start, now)) {
    const w = Math.max(x(to) - x(from), what === "dead" ? 2 : 0.5);
    const rect = svg("rect", { x: x(from), y: 0, width: w, height: 16, "data-state": what });
    const title = svg("title", {});
    title.textContent = `${what} from ${new Date(from).toLocaleTimeString()} to ${new Date(to).toLocaleTimeString()}`;
    rect.append(title);
    graph.append(rect);
  }
  for (let q = 0; q <= 4; q += 1) {
    const label = svg("text", { x: Math.min((q * width) / 4, width - 24), y: 28, class: "axis" });
    const ago = ((4 - q) * (now - start)) / 4;
    label.textContent = q === 4 ? "now" : ago >= 3600000 ? "-" + ago / 3600000 + "h" : "-" + Math.round(ago / 60000) + "min";
    graph.append(label);
  }
  return el("div", {}, el("div", { class: "timeline-label" }, key), graph);
}

async function renderFleet() {
  const since = new Date(Date.now() - DAY).toISOString();
  const [servers, failovers] = await Promise.all([
    api("GET", "/v1/heartbeat-servers"),
    api("GET", "/v1/events?limit=20&since=" + encodeURIComponent(since)),
  ]);
  $("fleet").tBodies[0].replaceChildren(
    ...servers.map((s) => {
      const draining = s.state === "draining";
      const button = el("button", { type: "button", "data-action": draining ? "activate" : "drain", "data-server": s.name }, draining ? "Activate" : "Drain");
      button.onclick = async () => {
        button.disabled = true;
        try {
          await api("POST", "/v1/heartbeat-servers/" + encodeURIComponent(s.name) + (draining ? "/activate" : "/drain"));
        } catch (e) {
          $("status").textContent = "cannot change " + s.name + ": " + e.message;
        }
        refresh();
      };
      return el(
        "tr",
        { "data-server": s.name },
        el("td", {}, s.name),
        el("td", {}, el("span", { class: "state", "data-state": s.state }, s.state)),
        el("td", {}, s.current_load + " / " + s.capacity),
        el("td", {}, Math.round(s.age_seconds) + " s ago"),
        el("td", {}, button),
      );
    }),
  );
  $("failovers").replaceChildren(
    ...failovers.map((e) => el("li", {}, time(e.at) + "  " + e.domain + " " + (e.uplink || e.ip) + ": " + (e.previous_hbs || "none") + " → " + e.hbs + " (" + e.reason + ")")),
  );
}

$("login-form").onsubmit = (event) => {
  event.preventDefault();
  signIn($("token").value.trim());
};
$("signout").onclick = signOut;
for (const button of document.querySelectorAll("#ranges button")) {
  button.onclick = () => {
    range = Number(button.dataset.range);
    for (const b of document.querySelectorAll("#ranges button")) b.classList.toggle("current", b === button);
    refresh();
  };
}
setInterval(() => token && !$("app").hidden && refresh(), 1000);
if (token) signIn(token);
