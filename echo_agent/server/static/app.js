// echo-agent review page. Plain JavaScript, no build step. It speaks only the JSON API
// (see /docs): POST /api/runs, the run's Server-Sent Events, GET /api/runs/{id}, the overlay
// and POST /api/runs/{id}/review. The events are echo_agent.events objects as JSON.
"use strict";

const $ = (id) => document.getElementById(id);
const EVENT_TYPES = ["perceived", "reasoner", "tool_called", "evidence", "tool_error",
                     "review_requested", "diagnosis"];
const STATUS_TEXT = {
  "running": "The agent is working…",
  "pending-review": "Waiting for your review.",
  "done": "Done: the report is final.",
  "error": "The run failed.",
};

let organs = {};       // name -> {labels, categories, category_system}
let current = null;    // run state from GET /api/runs/{id}
let source = null;     // the open EventSource

// -- helpers ------------------------------------------------------------------------------------
function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "class") node.className = v;
    else if (k === "text") node.textContent = v;
    else node.setAttribute(k, v);
  }
  for (const c of children) if (c !== null && c !== undefined) node.append(c);
  return node;
}

const fmt = (p) => (p === null || p === undefined ? "–" : Number(p).toFixed(2));
const boxText = (b) => (b ? `[${[b.x1, b.y1, b.x2, b.y2].map((v) => Math.round(v)).join(", ")}] px` : "–");

// FastAPI validation errors come as a list of {loc, msg}; echo-agent errors as one sentence.
function errorText(body, status) {
  if (body && typeof body.detail === "string") return body.detail;
  if (body && Array.isArray(body.detail)) {
    return body.detail.map((d) => {
      const where = (d.loc || []).filter((x) => x !== "body").join(".");
      return where ? `${where}: ${d.msg}` : d.msg;
    }).join("; ");
  }
  return `the server answered HTTP ${status}`;
}

function showError(box, message) {
  box.textContent = message;
  box.hidden = !message;
}

// A server started with access tokens answers 401 until the page has a session: ask for the token
// once, exchange it for an HttpOnly cookie (POST /api/session), then repeat the request.
async function signIn() {
  const token = window.prompt("This server needs your access token:");
  if (!token) return false;
  const res = await fetch("/api/session", {
    method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify({ token }),
  });
  return res.ok;
}

async function api(path, options = {}, retried = false) {
  const res = await fetch(path, options);
  if (res.status === 401 && !retried && await signIn()) return api(path, options, true);
  let body = null;
  try { body = await res.json(); } catch (e) { body = null; }
  if (!res.ok) throw new Error(errorText(body, res.status) + ` (HTTP ${res.status})`);
  return body;
}

// -- organs -------------------------------------------------------------------------------------
async function loadOrgans() {
  const list = await api("/api/organs");
  const select = $("organ");
  for (const o of list) {
    organs[o.name] = o;
    select.append(el("option", { value: o.name, text: o.display_name || o.name }));
  }
}

// -- steps --------------------------------------------------------------------------------------
function describeEvidence(ev) {
  const e = ev.evidence;
  if (e.kind === "detections") {
    const items = e.detections.map((d) => `${d.label} ${fmt(d.score)} at ${boxText(d.box)}`);
    return el("div", {},
      el("p", { text: `${e.detector}: ${e.detections.length} candidate(s) at threshold ${fmt(e.score_threshold)}${e.tta ? " with TTA" : ""}` }),
      items.length ? el("ul", {}, ...items.map((t) => el("li", { text: t }))) : null);
  }
  if (e.kind === "description") {
    const regions = e.regions.map((r) => {
      const desc = Object.entries(r.descriptors).map(([k, d]) => `${k} ${d.value}`).join(", ");
      return el("li", { text: `${r.detection_id || "region"} ${boxText(r.box)}: ${desc || r.caption}` });
    });
    return el("div", {}, el("p", { text: e.caption || "image described" }),
      regions.length ? el("ul", {}, ...regions) : null);
  }
  if (e.kind === "classification") {
    const regions = e.regions.map((r) => {
      const probs = Object.entries(r.probabilities).map(([k, v]) => `${k} ${fmt(v)}`).join(", ");
      const where = r.box ? `${r.detection_id || "region"} ${boxText(r.box)}` : "whole image";
      return el("li", { text: `${where}: ${probs}` });
    });
    return el("div", {}, el("p", { text: `second look (${e.classifier})` }), el("ul", {}, ...regions));
  }
  if (e.kind === "knowledge") {
    return el("div", {}, el("p", { text: `query: “${e.query}”` }),
      el("ul", {}, ...e.snippets.map((s) => el("li", { text: `${s.title} — ${s.source}` }))));
  }
  return el("pre", { text: JSON.stringify(e, null, 1) });
}

function stepItem(ev) {
  let title = ev.type;
  let body = null;
  let cls = "step";
  switch (ev.type) {
    case "perceived":
      title = `Image ${ev.image_width}×${ev.image_height} px, organ ${ev.organ}` +
        (ev.organ_confidence !== null && ev.organ_confidence !== undefined ? ` (confidence ${fmt(ev.organ_confidence)})` : "");
      break;
    case "reasoner":
      title = "Reasoner";
      body = el("p", { text: ev.text || (ev.tool_calls.length ? "calls tools" : "") });
      break;
    case "tool_called":
      title = `Tool call: ${ev.name}`;
      body = el("code", { text: JSON.stringify(ev.args) });
      cls += " step-tool";
      break;
    case "evidence":
      title = `Evidence from ${ev.name} (${ev.evidence.id})`;
      body = describeEvidence(ev);
      cls += " step-evidence";
      break;
    case "tool_error":
      title = `Tool error in ${ev.name}`;
      body = el("p", { text: ev.error });
      cls += " step-error";
      break;
    case "diagnosis": {
      const d = ev.diagnosis;
      title = d.review ? `Final diagnosis (${d.review.action} by ${d.review.reviewer})` : "Agent's diagnosis";
      body = el("p", { text: d.label + (d.review ? "" : ` p=${fmt(d.probability)}`) + (d.category ? `, ${d.category_system || "category"} ${d.category}` : "") +
        (d.indeterminate ? " — indeterminate" : "") });
      cls += " step-diagnosis";
      break;
    }
    case "review_requested":
      title = "Paused for human review";
      cls += " step-review";
      break;
  }
  return el("li", { class: cls, "data-type": ev.type, "data-step": String(ev.step) },
    el("span", { class: "step-title", text: title }), body);
}

function setStatus(status, error) {
  const p = $("run-status");
  p.textContent = (STATUS_TEXT[status] || status) + (error ? ` ${error}` : "");
  p.dataset.status = status;
}

// -- report -------------------------------------------------------------------------------------
function row(name, value) {
  return el("tr", {}, el("th", { scope: "row", text: name }), el("td", {}, value));
}

function probabilities(d) {
  const list = el("ul", { class: "probs" });
  for (const [label, p] of Object.entries(d.probabilities)) {
    list.append(el("li", {},
      el("span", { class: "prob-label", text: label }),
      el("meter", { min: "0", max: "1", value: String(p), "aria-label": `probability of ${label}` }),
      el("span", { class: "prob-value", text: fmt(p) })));
  }
  return list;
}

function renderReport(d) {
  const report = $("report");
  report.replaceChildren();
  if (!d) {
    report.append(el("p", { class: "muted", text: "The report appears when the agent has finished." }));
    return;
  }
  const edited = d.review && d.review.changes && d.review.changes.label;
  const label = el("span", {}, el("strong", { text: d.label }),
    edited ? ` (set by ${d.review.reviewer}; the agent said ${edited.from}, p=${fmt(d.review.original && d.review.original.probability)})`
           : ` (p=${fmt(d.probability)})`);
  if (d.indeterminate) label.append(" ", el("span", { class: "badge", text: "indeterminate" }));
  const t = el("table", { class: "report", id: "report-table" },
    el("caption", { text: d.review ? "Reviewed report" : "Agent's report (not yet reviewed)" }));
  t.append(row("Organ", d.organ), row("Label", label),
    row(d.review ? "Agent's probabilities" : "Probabilities", probabilities(d)));
  if (d.category) t.append(row(d.category_system || "Category", d.category));
  t.append(row("Findings", d.findings.length
    ? el("ul", {}, ...d.findings.map((f) => el("li", { text: `${f.label} ${fmt(f.score)} at ${boxText(f.box)}` })))
    : "no lesion reported"));
  t.append(row("Rationale", d.rationale || "–"));
  t.append(row("Recommendation", d.recommendation || "–"));
  if (d.indeterminate_reason) t.append(row("Why indeterminate", d.indeterminate_reason));
  if (d.warnings.length) t.append(row("Warnings", el("ul", {}, ...d.warnings.map((w) => el("li", { text: w })))));
  report.append(t);
  if (d.review) {
    const r = d.review;
    const changes = Object.entries(r.changes).map(([k, c]) =>
      el("li", { text: `${k}: ${JSON.stringify(c.from)} → ${JSON.stringify(c.to)}` }));
    report.append(el("div", { class: "review-record", id: "review-record" },
      el("h3", { text: "Review" }),
      el("p", { text: `${r.action} by ${r.reviewer}${r.timestamp ? " at " + r.timestamp : ""}` }),
      r.comment ? el("p", { text: `Comment: ${r.comment}` }) : null,
      changes.length ? el("ul", {}, ...changes) : el("p", { class: "muted", text: "no changes" }),
      el("p", { class: "muted", text: `The agent's original label was ${r.original ? r.original.label : "–"}.` })));
  }
}

function renderOverlay(state) {
  const fig = $("overlay-figure");
  if (!state.image) { fig.hidden = true; return; }
  $("overlay").src = `${state.overlay_url}?v=${encodeURIComponent(state.updated_at)}-${state.events.length}`;
  $("overlay-caption").textContent = `${state.filename || "upload"} — ${state.image.width}×${state.image.height} px`;
  fig.hidden = false;
}

// -- review form --------------------------------------------------------------------------------
function fillReviewForm(d) {
  const spec = organs[d.organ] || { labels: [d.label], categories: d.category ? [d.category] : [] };
  const labelSel = $("edit-label");
  labelSel.replaceChildren(...spec.labels.map((l) => el("option", { value: l, text: l })));
  labelSel.value = d.label;
  const catSel = $("edit-category");
  catSel.replaceChildren(el("option", { value: "", text: "—" }),
    ...spec.categories.map((c) => el("option", { value: c, text: c })));
  catSel.value = d.category || "";
  $("edit-category-label").textContent = spec.category_system || "Category";
  const b = d.box;
  for (const k of ["x1", "y1", "x2", "y2"]) $(`box-${k}`).value = b ? Math.round(b[k]) : "";
}

function renderReview(state) {
  const section = $("review-section");
  section.hidden = state.status !== "pending-review";
  if (!section.hidden) fillReviewForm(state.diagnosis);
  showError($("review-error"), "");
}

function decisionFromForm() {
  const action = document.querySelector('input[name="action"]:checked').value;
  const reviewer = $("reviewer").value.trim();
  if (!reviewer) throw new Error("Enter your reviewer id: the report records who reviewed it.");
  const decision = { action, reviewer };
  const comment = $("comment").value.trim();
  if (comment) decision.comment = comment;
  if (action === "reject" && !comment) throw new Error("Say why you reject the report in the comment.");
  if (action === "edit") {
    const d = current.diagnosis;
    if ($("edit-label").value !== d.label) decision.label = $("edit-label").value;
    if ($("edit-category").value && $("edit-category").value !== (d.category || "")) decision.category = $("edit-category").value;
    const coords = ["x1", "y1", "x2", "y2"].map((k) => $(`box-${k}`).value.trim());
    if (coords.some((v) => v !== "")) {
      if (coords.some((v) => v === "")) throw new Error("Give all four box coordinates, or none.");
      const box = coords.map(Number);
      const old = d.box ? [d.box.x1, d.box.y1, d.box.x2, d.box.y2].map(Math.round) : null;
      if (!old || box.some((v, i) => v !== old[i])) decision.box = box;
    }
    if (!("label" in decision) && !("category" in decision) && !("box" in decision)) {
      throw new Error("Nothing was edited: change the label, the category or the box, or choose Accept.");
    }
  }
  return decision;
}

async function submitReview(event) {
  event.preventDefault();
  const errBox = $("review-error");
  showError(errBox, "");
  let decision;
  try { decision = decisionFromForm(); } catch (e) { showError(errBox, e.message); return; }
  const button = $("submit-review");
  button.disabled = true;
  try {
    await api(current.review_url, {
      method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(decision),
    });
    await showRun(current.run_id);
    refreshPending();
  } catch (e) {
    showError(errBox, e.message);
  } finally {
    button.disabled = false;
  }
}

// -- runs ---------------------------------------------------------------------------------------
function render(state) {
  current = state;
  $("steps").replaceChildren(...state.events.map(stepItem));
  setStatus(state.status, state.error);
  renderOverlay(state);
  renderReport(state.diagnosis);
  renderReview(state);
}

async function showRun(runId) {
  const state = await api(`/api/runs/${encodeURIComponent(runId)}`);
  render(state);
  return state;
}

function follow(runId) {
  if (source) source.close();
  $("steps").replaceChildren();
  setStatus("running");
  source = new EventSource(`/api/runs/${encodeURIComponent(runId)}/events`);
  const onEvent = (msg) => {
    const ev = JSON.parse(msg.data);
    $("steps").append(stepItem(ev));
  };
  for (const t of EVENT_TYPES) source.addEventListener(t, onEvent);
  source.addEventListener("end", async () => {
    source.close();
    source = null;
    try { await showRun(runId); } catch (e) { showError($("upload-error"), e.message); }
    refreshPending();
  });
  source.onerror = () => {
    // The browser reconnects by itself (sending Last-Event-ID); tell the user meanwhile.
    if (source && source.readyState === EventSource.CONNECTING) setStatus("running", "(reconnecting…)");
  };
}

async function submitUpload(event) {
  event.preventDefault();
  const errBox = $("upload-error");
  showError(errBox, "");
  const file = $("file").files[0];
  if (!file) { showError(errBox, "Choose an image file first."); return; }
  const form = new FormData();
  form.append("file", file, file.name);
  for (const name of ["organ", "age", "sex", "symptoms", "history"]) {
    const v = $(name).value.trim();
    if (v) form.append(name, v);
  }
  const button = $("analyse");
  button.disabled = true;
  try {
    const state = await api("/api/runs", { method: "POST", body: form });
    current = state;
    history.replaceState(null, "", `#run=${state.run_id}`);
    $("review-section").hidden = true;
    renderReport(null);
    renderOverlay(state);
    follow(state.run_id);
  } catch (e) {
    showError(errBox, e.message);
  } finally {
    button.disabled = false;
  }
}

async function refreshPending() {
  try {
    const runs = await api("/api/runs?status=pending-review&limit=20");
    const list = $("pending");
    list.replaceChildren(...(runs.length ? runs.map((r) => el("li", {},
      el("a", { href: `#run=${r.run_id}`, text: `${r.filename || r.run_id.slice(0, 8)} — ${r.label || "?"} (${r.created_at})` })))
      : [el("li", { class: "muted", text: "none" })]));
  } catch (e) { /* the list is a convenience; the page works without it */ }
}

function runFromHash() {
  const m = location.hash.match(/run=([0-9a-f]+)/);
  return m ? m[1] : null;
}

async function openFromHash() {
  const id = runFromHash();
  if (!id) return;
  try {
    const state = await showRun(id);
    if (state.status === "running") follow(id);
  } catch (e) { showError($("upload-error"), e.message); }
}

document.addEventListener("DOMContentLoaded", async () => {
  $("upload-form").addEventListener("submit", submitUpload);
  $("review-form").addEventListener("submit", submitReview);
  for (const r of document.querySelectorAll('input[name="action"]')) {
    r.addEventListener("change", () => {
      $("edit-fields").disabled = document.querySelector('input[name="action"]:checked').value !== "edit";
    });
  }
  window.addEventListener("hashchange", openFromHash);
  try { await loadOrgans(); } catch (e) { showError($("upload-error"), e.message); }
  refreshPending();
  openFromHash();
  document.body.dataset.ready = "1";
});
