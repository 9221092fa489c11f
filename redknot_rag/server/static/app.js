// RedKnot-RAG page: ask (SSE from /query), compare with `full`, sources, TTFT split, head profile,
// documents. Plain ES2020, no dependencies. Every server error ends up in the #error banner.
"use strict";

const $ = (id) => document.getElementById(id);
const KEY = "redknot.apiKey";
const ADMIN_KEY = "redknot.adminKey";

// ---- keys: session storage only (gone when the tab closes) ---------------------------------
const keys = {
  get(name) {
    try { return sessionStorage.getItem(name) || ""; } catch { return ""; }
  },
  set(name, value) {
    try {
      if (value) sessionStorage.setItem(name, value); else sessionStorage.removeItem(name);
    } catch { /* storage disabled: the key lives for this page only */ }
  },
};

// ---- HTTP ---------------------------------------------------------------------------------
class HttpError extends Error {
  constructor(status, message) { super(message); this.status = status; }
}

async function errorMessage(resp) {
  let text = "";
  try { text = await resp.text(); } catch { /* body unreadable */ }
  let msg = text.trim();
  try {
    const body = JSON.parse(text);
    msg = (body.error && body.error.message) || body.detail || body.message || msg;
  } catch { /* not JSON: show the text */ }
  return msg || resp.statusText || "no message";
}

function hint(status) {
  if (status === 401) return " Set the key with the \u201cAPI key\u201d button.";
  if (status === 403) return " Enter the admin key under Documents.";
  return "";
}

async function api(path, { method = "GET", body, admin = false, signal } = {}) {
  const headers = {};
  const key = admin ? keys.get(ADMIN_KEY) || keys.get(KEY) : keys.get(KEY);
  if (key) headers.Authorization = "Bearer " + key;
  let payload;
  if (body !== undefined) {
    headers["Content-Type"] = "application/json";
    payload = JSON.stringify(body);
  }
  let resp;
  try {
    resp = await fetch(path, { method, headers, body: payload, signal });
  } catch (e) {
    if (e.name === "AbortError") throw e;
    throw new HttpError(0, `cannot reach the server (${e.message})`);
  }
  if (!resp.ok) {
    const msg = await errorMessage(resp);
    throw new HttpError(resp.status, `${resp.status}: ${msg.replace(/\.$/, "")}.${hint(resp.status)}`);
  }
  return resp;
}

async function apiJson(path, opts) {
  const resp = await api(path, opts);
  try { return await resp.json(); } catch (e) { throw new HttpError(resp.status, `unreadable answer from ${path}: ${e.message}`); }
}

/** Server-sent events of a fetch response: calls onEvent(obj) per `data:` JSON; stops at [DONE]. */
async function readSSE(resp, onEvent) {
  const reader = resp.body.getReader();
  const decoder = new TextDecoder();
  let buf = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return false;
    buf += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buf.indexOf("\n\n")) >= 0) {
      const block = buf.slice(0, cut);
      buf = buf.slice(cut + 2);
      const data = block.split("\n").filter((l) => l.startsWith("data:")).map((l) => l.slice(5).replace(/^ /, "")).join("\n");
      if (!data) continue;
      if (data === "[DONE]") return true;
      onEvent(JSON.parse(data));
    }
  }
}

// ---- errors --------------------------------------------------------------------------------
function showError(e) {
  const msg = e instanceof Error ? e.message : String(e);
  $("error-text").textContent = msg;
  $("error").hidden = false;
}
function clearError() { $("error").hidden = true; $("error-text").textContent = ""; }
window.addEventListener("unhandledrejection", (ev) => showError(ev.reason));
window.addEventListener("error", (ev) => showError(`page error: ${ev.message}`));

function el(tag, props = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(props)) {
    if (k === "class") node.className = v;
    else if (k === "style") node.style.cssText = v; // CSSOM, allowed by the page's CSP (style attributes are not)
    else if (k.startsWith("aria-") || k === "role" || k === "tabindex") node.setAttribute(k, v);
    else node[k] = v;
  }
  for (const c of children) node.append(c);
  return node;
}
const fmtMs = (ms) => (ms >= 1000 ? `${(ms / 1000).toFixed(2)} s` : `${ms.toFixed(ms < 10 ? 1 : 0)} ms`);

// ---- tabs ----------------------------------------------------------------------------------
const TABS = ["ask", "docs", "heads"];
const loaded = new Set();
function selectTab(name, focus = false) {
  for (const t of TABS) {
    const on = t === name;
    const tab = $("tab-" + t);
    tab.setAttribute("aria-selected", String(on));
    tab.tabIndex = on ? 0 : -1;
    $("view-" + t).hidden = !on;
    if (on && focus) tab.focus();
  }
  if (name === "docs" && !loaded.has("docs")) { loaded.add("docs"); listDocuments(); }
  if (name === "heads" && !loaded.has("heads")) { loaded.add("heads"); loadHeads(); }
}
function setupTabs() {
  TABS.forEach((t, i) => {
    const tab = $("tab-" + t);
    tab.addEventListener("click", () => selectTab(t));
    tab.addEventListener("keydown", (ev) => {
      const step = { ArrowRight: 1, ArrowLeft: -1 }[ev.key];
      if (step) { ev.preventDefault(); selectTab(TABS[(i + step + TABS.length) % TABS.length], true); }
      if (ev.key === "Home") { ev.preventDefault(); selectTab(TABS[0], true); }
      if (ev.key === "End") { ev.preventDefault(); selectTab(TABS[TABS.length - 1], true); }
    });
  });
}

// ---- server info -----------------------------------------------------------------------------
let info = { reuse_policy: "", policies: [], namespaces: [] };
async function loadInfo() {
  try {
    info = await apiJson("/ui/info");
  } catch (e) {
    showError(e);
    if (e.status === 401) openKeyDialog();
    return;
  }
  $("model").textContent = info.model + (info.rag ? "" : " (RAG off: start the server with --data-dir)");
  const sel = $("policy");
  const chosen = sel.value;
  sel.replaceChildren(...info.policies.map((p) => el("option", { value: p, textContent: p === info.reuse_policy ? `${p} (server default)` : p })));
  if (chosen && info.policies.includes(chosen)) sel.value = chosen;
  $("namespaces").replaceChildren(...info.namespaces.map((n) => el("option", { value: n })));
  // the fields start at "default": where this key sees namespaces and none is "default", start at its first
  if (info.namespaces.length && !info.namespaces.includes("default")) {
    for (const id of ["namespace", "list-namespace"]) if ($(id).value === "default") $(id).value = info.namespaces[0];
  }
  $("max-tokens").max = String(info.max_new_tokens_limit);
  // the field starts at /query's own default; a number already typed in (not the page's initial one) stays
  const mt = $("max-tokens");
  if (info.query_max_new_tokens && mt.value === mt.defaultValue) mt.value = mt.defaultValue = String(info.query_max_new_tokens);
}

// ---- key dialog ------------------------------------------------------------------------------
function openKeyDialog() {
  const dlg = $("key-dialog");
  $("api-key").value = keys.get(KEY);
  if (!dlg.open) dlg.showModal();
  $("api-key").focus();
}
function setupKeyDialog() {
  $("key-button").addEventListener("click", openKeyDialog);
  $("key-form").addEventListener("submit", (ev) => {
    ev.preventDefault();
    const action = ev.submitter ? ev.submitter.value : "save";
    if (action === "save") keys.set(KEY, $("api-key").value.trim());
    if (action === "clear") keys.set(KEY, "");
    $("key-dialog").close();
    $("key-button").focus();
    if (action !== "cancel") { clearError(); loadInfo(); loaded.clear(); selectTab(currentTab()); }
  });
}
const currentTab = () => TABS.find((t) => !$("view-" + t).hidden) || "ask";

// ---- ask -----------------------------------------------------------------------------------
let current = null; // the run on screen: {controller, rid, stopped, request, final, full}

function readAskForm() {
  const question = $("question").value.trim();
  if (!question) throw new HttpError(0, "Type a question first.");
  const topK = Number($("top-k").value);
  const maxTokens = Number($("max-tokens").value);
  if (!Number.isInteger(topK) || topK < 1 || topK > 64) throw new HttpError(0, "Top-k must be a whole number from 1 to 64.");
  if (!Number.isInteger(maxTokens) || maxTokens < 1) throw new HttpError(0, "Max new tokens must be a whole number of at least 1.");
  const body = { question, namespace: $("namespace").value.trim() || "default", top_k: topK, max_new_tokens: maxTokens };
  if ($("policy").value) body.reuse_policy = $("policy").value;
  return body;
}

function setRunning(on) {
  $("ask").disabled = on;
  $("stop").disabled = !on;
  $("compare").disabled = on || !(current && current.final);
  $("answer").classList.toggle("running", on);
  $("answer").setAttribute("aria-busy", String(on));
}

function resetResults() {
  $("answer").textContent = "";
  $("ask-status").textContent = "";
  for (const id of ["time-card", "strip-card", "sources-card", "compare-answers"]) $(id).hidden = true;
  $("bars").replaceChildren();
  $("compare-summary").textContent = "";
  $("sources").replaceChildren();
}

async function ask(ev) {
  ev.preventDefault();
  if (current && current.controller && !current.done) return;
  let request;
  try { request = readAskForm(); } catch (e) { showError(e); $("question").focus(); return; }
  clearError();
  resetResults();
  const run = { controller: new AbortController(), rid: null, stopped: false, done: false, request, final: null, sources: [] };
  current = run;
  setRunning(true);
  $("ask-status").textContent = "Retrieving and assembling the context\u2026";
  let complete = false;
  try {
    const resp = await api("/query", { method: "POST", body: { ...request, stream: true }, signal: run.controller.signal });
    $("ask-status").textContent = "Generating\u2026";
    complete = await readSSE(resp, (e) => onQueryEvent(run, e));
    if (!complete && !run.final && !run.stopped) throw new HttpError(0, "the answer stream ended early (server closed the connection)");
  } catch (e) {
    if (!(e.name === "AbortError" && run.stopped)) {
      showError(e);
      $("ask-status").textContent = "Failed: see the message at the top of the page.";
    }
  } finally {
    run.done = true;
    if (run.stopped) $("ask-status").textContent = "Stopped: the request was cancelled on the server.";
    setRunning(false);
  }
}

function onQueryEvent(run, e) {
  if (e.object === "error" || e.error) {
    showError(new HttpError(e.error && e.error.code, `${(e.error && e.error.code) || "error"}: ${(e.error && e.error.message) || "the request failed"}`));
    return;
  }
  if (e.type === "sources") {
    run.rid = e.id;
    run.sources = e.sources || [];
    renderSources(run.sources, "");
  } else if (e.type === "token") {
    $("answer").append(e.text);
  } else if (e.type === "done") {
    run.final = e;
    $("answer").textContent = e.answer;
    renderSources(e.sources || run.sources, e.answer);
    const fr = e.finish_reason && e.finish_reason.type;
    const u = e.usage || {};
    const ttft = e.timing && e.timing.ttft_ms;
    $("ask-status").textContent = run.stopped && fr === "abort" ? "Stopped: the request was cancelled on the server."
      : `Done (${fr || "finished"}): ${u.completion_tokens ?? "?"} tokens; prompt ${u.prompt_tokens ?? "?"} tokens, ${u.cached_tokens ?? 0} reused from stored KV` +
        (ttft !== undefined ? `; TTFT ${fmtMs(ttft)}` : "");
    renderBars([{ label: policyLabel(run.request), timing: e.timing || {} }]);
    renderStrip(e, policyLabel(run.request));
  }
}

const policyLabel = (req) => req.reuse_policy || info.reuse_policy || "server default";

async function stop() {
  const run = current;
  if (!run || run.done) return;
  run.stopped = true;
  $("stop").disabled = true;
  $("ask-status").textContent = "Stopping\u2026";
  if (run.rid) {
    try { await api("/abort_request", { method: "POST", body: { rid: run.rid } }); } catch { /* closing the stream below cancels it too */ }
  }
  run.controller.abort(); // the server aborts a request whose client left
}

async function compare() {
  const run = current;
  if (!run || !run.final) return;
  $("compare").disabled = true;
  $("ask").disabled = true;
  $("compare-summary").textContent = "Running the same question with full prefill\u2026";
  try {
    const full = await apiJson("/query", { method: "POST", body: { ...run.request, reuse_policy: "full", stream: false } });
    run.full = full;
    const a = run.final, b = full;
    renderBars([{ label: policyLabel(run.request), timing: a.timing || {} }, { label: "full", timing: b.timing || {} }]);
    const ta = a.timing && a.timing.ttft_ms, tb = b.timing && b.timing.ttft_ms;
    const norm = (s) => (s || "").trim().replace(/\s+/g, " ");
    const agree = norm(a.answer) === norm(b.answer);
    const speed = ta && tb ? `TTFT ${fmtMs(ta)} vs ${fmtMs(tb)} with full prefill: ${(tb / ta).toFixed(2)}x` : "TTFT not reported";
    $("compare-summary").textContent = `${speed}. The answers ${agree ? "agree" : "differ"}.`;
    $("cmp-reuse-h").textContent = `${policyLabel(run.request)} answer`;
    $("cmp-reuse").textContent = a.answer;
    $("cmp-full").textContent = b.answer;
    $("compare-answers").hidden = false;
  } catch (e) {
    $("compare-summary").textContent = "";
    showError(e);
  } finally {
    $("ask").disabled = false;
    $("compare").disabled = false;
  }
}

// ---- sources ---------------------------------------------------------------------------------
/** [start, end) of `answer` (trimmed, trailing punctuation dropped, case-insensitive) in `text`, or null. */
function findSpan(text, answer) {
  const a = (answer || "").trim().replace(/[\s.!?,;:]+$/u, "");
  if (a.length < 2) return null;
  const i = text.toLowerCase().indexOf(a.toLowerCase());
  return i < 0 ? null : [i, i + a.length];
}

/** Sources as placed in the prompt. The API lists them by retrieval rank; the prompt puts the most
 * relevant chunk last (closest to the question). A `prompt_index` field, when present, wins. */
function promptOrder(sources) {
  const ranked = sources.map((s, i) => ({ ...s, rank: i + 1 }));
  if (ranked.every((s) => typeof s.prompt_index === "number")) return ranked.sort((x, y) => x.prompt_index - y.prompt_index);
  return ranked.reverse();
}

function renderSources(sources, answer) {
  const list = $("sources");
  list.replaceChildren();
  for (const s of promptOrder(sources)) {
    const text = s.text || "";
    const quote = el("blockquote");
    const span = findSpan(text, answer);
    if (span) quote.append(text.slice(0, span[0]), el("mark", { textContent: text.slice(span[0], span[1]), title: "the answer" }), text.slice(span[1]));
    else quote.textContent = text;
    const score = typeof s.score === "number" ? s.score.toFixed(3) : "?";
    list.append(el("li", {}, el("div", { class: "meta" }, el("strong", { textContent: s.doc_id }), ` \u00b7 chunk ${s.chunk_id} \u00b7 score ${score} \u00b7 retrieval rank ${s.rank}` + (span ? " \u00b7 holds the answer" : "")), quote));
  }
  $("sources-card").hidden = sources.length === 0;
}

// ---- time ------------------------------------------------------------------------------------
const SEGMENTS = [
  ["retrieve_ms", "retrieve"], ["kv_load_ms", "KV load"], ["kv_miss_prefill_ms", "KV miss prefill"],
  ["selection_ms", "selection"], ["recompute_ms", "recompute"], ["question_prefill_ms", "question prefill"],
];

/** TTFT parts of a /query `timing` (ms), in the order they happen, plus `other` (the unmeasured rest). */
function splitTiming(t, policy = "") {
  const parts = SEGMENTS.filter(([k]) => typeof t[k] === "number" && t[k] > 0).map(([k, name]) => ({ key: k.replace(/_ms$/, ""), name, ms: t[k] }));
  if (policy === "full") for (const p of parts) if (p.key === "question_prefill") p.name = "prefill of the whole prompt";
  const ttft = typeof t.ttft_ms === "number" ? t.ttft_ms : parts.reduce((a, p) => a + p.ms, 0);
  const rest = ttft - parts.reduce((a, p) => a + p.ms, 0);
  if (rest > 0.05 * ttft) parts.push({ key: "other", name: "other (queue, hand-off)", ms: rest });
  const decode = typeof t.decode_ms === "number" ? t.decode_ms : 0;
  return { parts, ttft, decode };
}

let shownRuns = [];
function renderBars(runs) {
  shownRuns = runs;
  const withDecode = $("show-decode").checked;
  const split = runs.map((r) => splitTiming(r.timing, r.label));
  const scale = Math.max(1e-6, ...split.map((s) => Math.max(s.ttft, s.parts.reduce((a, p) => a + p.ms, 0)) + (withDecode ? s.decode : 0)));
  const rows = runs.map((r, i) => {
    const s = split[i];
    const bar = el("div", { class: "bar", role: "img" });
    const pieces = [...s.parts.map((p) => ({ ...p, cls: "" })), ...(s.decode > 0 ? [{ key: "decode", name: "decode", ms: s.decode, cls: "decode" }] : [])];
    pieces.forEach((p, j) => {
      if (p.key === "decode" && !withDecode) return;
      const last = j === s.parts.length - 1 && s.decode > 0 && withDecode;
      bar.append(el("span", { class: `${p.cls}${last ? " ttft-end" : ""}`, title: `${p.name}: ${fmtMs(p.ms)}`, style: `width:${(100 * p.ms) / scale}%;background:var(--c-${p.key})` }));
    });
    const words = pieces.map((p) => `${p.name} ${fmtMs(p.ms)}`).join(", ");
    bar.setAttribute("aria-label", `${r.label}: TTFT ${fmtMs(s.ttft)} (${words})`);
    const legend = el("ul", { class: "bar-legend" }, ...pieces.map((p) => el("li", {}, el("i", { style: `background:var(--c-${p.key})`, "aria-hidden": "true" }), `${p.name} ${fmtMs(p.ms)}`)));
    return el("div", { class: "bar-row" },
      el("div", { class: "bar-label" }, el("strong", { textContent: r.label }), el("span", { textContent: `TTFT ${fmtMs(s.ttft)}` + (s.decode ? ` \u00b7 then decode ${fmtMs(s.decode)}` : "") })),
      bar, legend);
  });
  $("bars").replaceChildren(...rows);
  $("time-card").hidden = false;
}

// ---- recomputed-token strip ----------------------------------------------------------------------
function reuseStats(final) {
  for (const k of ["reuse", "reuse_stats", "stats"]) {
    const s = final[k];
    if (s && Array.isArray(s.recomputed_positions) && typeof s.context_len === "number") return s;
  }
  return null;
}

/** Draw which context tokens the reuse policy recomputed (from the final /query answer's reuse stats). */
function renderStrip(final, policy) {
  const st = reuseStats(final);
  $("strip-card").hidden = false;
  const canvas = $("strip");
  if (!st) {
    canvas.hidden = true;
    $("strip-text").textContent = "This server's /query answer does not report which context tokens were recomputed" +
      (policy === "full" ? " (the full policy recomputes everything)." : ".");
    return;
  }
  const n = st.context_len, pos = st.recomputed_positions;
  const pct = n ? ((100 * pos.length) / n).toFixed(1) : "0";
  const text = `${pos.length} of ${n} context tokens recomputed (${pct}%); the rest reused from stored KV.`;
  $("strip-text").textContent = text;
  canvas.hidden = false;
  canvas.setAttribute("aria-label", text);
  const css = getComputedStyle(document.documentElement);
  const w = Math.max(1, Math.round(canvas.clientWidth * (window.devicePixelRatio || 1)));
  canvas.width = w;
  const h = canvas.height;
  const ctx = canvas.getContext("2d");
  ctx.fillStyle = css.getPropertyValue("--line");
  ctx.fillRect(0, 0, w, h);
  if (typeof st.anchor_len === "number" && n) {
    ctx.fillStyle = css.getPropertyValue("--muted");
    ctx.fillRect(0, 0, (st.anchor_len / n) * w, h);
  }
  ctx.fillStyle = css.getPropertyValue("--c-recompute");
  const cell = Math.max(1, w / Math.max(1, n));
  for (const p of pos) ctx.fillRect((p / n) * w, 0, cell, h);
}

// ---- heads -----------------------------------------------------------------------------------
let profile = null;
const heatColor = (t) => `hsl(${Math.round(220 - 220 * t)} 70% 45%)`; // t in [0, 1]: blue (low) to red (high)

async function loadHeads() {
  $("heads-status").textContent = "Loading\u2026";
  try {
    profile = await apiJson("/ui/head_profile");
  } catch (e) {
    $("heads-status").textContent = "";
    loaded.delete("heads");
    showError(e);
    return;
  }
  const p = profile;
  const nGlobal = p.classes.flat().filter((c) => c === 1).length;
  $("heads-status").textContent = `${p.model}: ${p.num_layers} layers x ${p.num_kv_heads} KV heads; ${nGlobal} global, ` +
    `${p.num_layers * p.num_kv_heads - nGlobal} local (sink + ${p.window}-token window; locality threshold ${p.locality_threshold}).`;
  renderHeat();
}

function renderHeat() {
  if (!profile) return;
  const p = profile, metric = $("metric").value;
  const vals = p[metric].flat();
  const lo = Math.min(...vals), hi = Math.max(...vals);
  $("legend-lo").textContent = lo.toFixed(2);
  $("legend-hi").textContent = hi.toFixed(2);
  const head = el("tr", {}, el("th", { scope: "col", textContent: "layer" }), ...Array.from({ length: p.num_kv_heads }, (_, h) => el("th", { scope: "col", textContent: `head ${h}` })));
  const rows = p.classes.map((row, l) => el("tr", {}, el("th", { scope: "row", textContent: String(l) }), ...row.map((c, h) => {
    const t = hi > lo ? (p[metric][l][h] - lo) / (hi - lo) : 0.5;
    const desc = `layer ${l}, KV head ${h}: ${c === 1 ? "global" : "local"}; locality ${p.locality[l][h].toFixed(3)}, ` +
      `reuse deviation ${p.reuse_deviation[l][h].toFixed(3)}, retrieval ${p.retrieval[l][h].toFixed(3)}`;
    const hue = 220 - 220 * t;
    const ink = hue > 25 && hue < 175 ? "#111" : "#fff"; // dark text on the light (yellow-green) part of the ramp
    const td = el("td", { textContent: c === 1 ? "G" : "L", title: desc, "aria-label": desc, tabindex: l === 0 && h === 0 ? "0" : "-1", style: `background:${heatColor(t)};color:${ink}` });
    td.dataset.l = String(l);
    td.dataset.h = String(h);
    return td;
  })));
  $("heat").replaceChildren(el("thead", {}, head), el("tbody", {}, ...rows));
}

function setupHeat() {
  const grid = $("heat");
  const show = (td) => { if (td && td.dataset.l) $("head-detail").textContent = td.getAttribute("aria-label"); };
  grid.addEventListener("mouseover", (ev) => show(ev.target.closest("td")));
  grid.addEventListener("focusin", (ev) => show(ev.target.closest("td")));
  grid.addEventListener("keydown", (ev) => {
    const td = ev.target.closest("td");
    if (!td || !profile) return;
    const move = { ArrowUp: [-1, 0], ArrowDown: [1, 0], ArrowLeft: [0, -1], ArrowRight: [0, 1] }[ev.key];
    if (!move) return;
    ev.preventDefault();
    const l = Math.min(profile.num_layers - 1, Math.max(0, Number(td.dataset.l) + move[0]));
    const h = Math.min(profile.num_kv_heads - 1, Math.max(0, Number(td.dataset.h) + move[1]));
    const next = grid.querySelector(`td[data-l="${l}"][data-h="${h}"]`);
    td.tabIndex = -1;
    next.tabIndex = 0;
    next.focus();
  });
  $("metric").addEventListener("change", renderHeat);
}

// ---- documents -------------------------------------------------------------------------------
async function listDocuments(ev) {
  if (ev) ev.preventDefault();
  const ns = $("list-namespace").value.trim() || "default";
  $("docs-status").textContent = "Loading\u2026";
  let out;
  try {
    out = await apiJson(`/documents?namespace=${encodeURIComponent(ns)}`, { admin: true });
  } catch (e) {
    $("docs-status").textContent = "";
    $("docs-table").hidden = true;
    if (e.status === 404) { $("docs-status").textContent = `No namespace \u201c${ns}\u201d yet: upload a file into it.`; return; }
    if ((e.status === 401 || e.status === 403) && !ev) { $("docs-status").textContent = "Listing documents needs the admin key: enter it above."; return; }
    showError(e);
    return;
  }
  const docs = out.documents || [];
  $("docs-status").textContent = `${docs.length} document${docs.length === 1 ? "" : "s"} in \u201c${ns}\u201d.`;
  $("docs").replaceChildren(...docs.map((d) => {
    const del = el("button", { type: "button", class: "secondary", textContent: "Delete", "aria-label": `Delete ${d.doc_id}` });
    del.addEventListener("click", () => deleteDocument(ns, d.doc_id));
    const added = d.created ? new Date(d.created * 1000).toLocaleString() : "";
    return el("tr", {}, el("td", { textContent: d.doc_id }), el("td", { textContent: d.source_path || "(uploaded text)" }), el("td", { textContent: added }), el("td", {}, del));
  }));
  $("docs-table").hidden = docs.length === 0;
}

async function deleteDocument(ns, docId) {
  if (!window.confirm(`Delete \u201c${docId}\u201d from \u201c${ns}\u201d? Its chunks and stored KV go too.`)) return;
  try {
    await api(`/documents/${encodeURIComponent(docId)}?namespace=${encodeURIComponent(ns)}`, { method: "DELETE", admin: true });
    $("docs-status").textContent = `Deleted \u201c${docId}\u201d.`;
  } catch (e) { showError(e); return; }
  await listDocuments();
  $("list").focus();
}

/** While an /ingest runs: poll the namespace's chunks still without stored KV (the server marks each
 * chunk when its KV is durable) and report the done fraction of the most pending tokens seen. */
function pollKvProgress(ns, onProgress) {
  let most = 0, live = true, timer = null;
  const tick = async () => {
    try {
      const p = await apiJson(`/ui/kv_pending?namespace=${encodeURIComponent(ns)}`, { admin: true });
      most = Math.max(most, p.tokens);
      if (live && most > 0) onProgress((most - p.tokens) / most, p.tokens);
    } catch { /* progress is best effort; the /ingest answer reports errors */ }
    if (live) timer = setTimeout(tick, 400);
  };
  timer = setTimeout(tick, 200);
  return { stop() { live = false; clearTimeout(timer); } };
}

/** "pdf" or "docx" for the binary formats the server parses, else null (the file is read as text). */
function binaryFormat(name) {
  const m = /\.(pdf|docx)$/i.exec(name);
  return m ? m[1].toLowerCase() : null;
}

/** A file's bytes as base64 (a data: URL without its header). */
function fileBase64(file) {
  return new Promise((resolve, reject) => {
    const r = new FileReader();
    r.onload = () => resolve(String(r.result).slice(String(r.result).indexOf(",") + 1));
    r.onerror = () => reject(r.error || new Error("read failed"));
    r.readAsDataURL(file);
  });
}

async function upload(ev) {
  ev.preventDefault();
  const files = Array.from($("files").files || []);
  const ns = $("upload-namespace").value.trim() || "default";
  if (!files.length) { showError("Choose one or more files first (text, PDF or DOCX)."); $("files").focus(); return; }
  clearError();
  const bar = $("upload-progress"), status = $("upload-status");
  bar.max = files.length;
  bar.value = 0;
  $("upload").disabled = true;
  let ok = 0, chunks = 0, tokens = 0;
  try {
    for (const [i, f] of files.entries()) {
      status.textContent = `File ${i + 1} of ${files.length}: ${f.name} \u2014 chunking, embedding and computing chunk KV\u2026`;
      const format = binaryFormat(f.name);
      let doc;
      try {
        // PDF and DOCX travel as bytes (base64) and the server extracts their text, as for a file on disk
        doc = format ? { content_base64: await fileBase64(f), format } : { text: await f.text() };
      } catch (e) { showError(`could not read ${f.name}: ${e.message}`); continue; }
      if (format ? !f.size : !doc.text.trim()) { showError(`${f.name} is empty; skipped.`); bar.value = i + 1; continue; }
      const poll = pollKvProgress(ns, (frac, pending) => {
        bar.value = i + frac;
        status.textContent = `File ${i + 1} of ${files.length}: ${f.name} \u2014 computing chunk KV, ${pending} tokens to go\u2026`;
      });
      try {
        const out = await apiJson("/ingest", { method: "POST", admin: true, body: { namespace: ns, documents: [{ doc_id: f.name, ...doc, metadata: { filename: f.name, bytes: f.size } }] } });
        const s = out.documents || {};
        ok += 1; chunks += s.chunks || 0; tokens += s.tokens || 0;
      } catch (e) { showError(`${f.name}: ${e.message}`); } finally { poll.stop(); }
      bar.value = i + 1;
    }
    status.textContent = `Ingested ${ok} of ${files.length} file${files.length === 1 ? "" : "s"} into \u201c${ns}\u201d: ${chunks} new chunks, ${tokens} tokens with KV stored.`;
  } finally {
    $("upload").disabled = false;
  }
  $("list-namespace").value = ns;
  await loadInfo();
  await listDocuments();
}

// ---- start -------------------------------------------------------------------------------------
function start() {
  setupTabs();
  setupKeyDialog();
  setupHeat();
  $("error-close").addEventListener("click", clearError);
  $("ask-form").addEventListener("submit", ask);
  $("stop").addEventListener("click", stop);
  $("compare").addEventListener("click", compare);
  $("show-decode").addEventListener("change", () => renderBars(shownRuns));
  $("question").addEventListener("keydown", (ev) => {
    if (ev.key === "Enter" && (ev.ctrlKey || ev.metaKey)) { ev.preventDefault(); $("ask-form").requestSubmit(); }
  });
  $("admin-form").addEventListener("submit", (ev) => {
    ev.preventDefault();
    keys.set(ADMIN_KEY, $("admin-key").value.trim());
    $("upload-status").textContent = keys.get(ADMIN_KEY) ? "Admin key set for this tab." : "Admin key cleared.";
  });
  $("admin-key").value = keys.get(ADMIN_KEY);
  $("upload-form").addEventListener("submit", upload);
  $("list-form").addEventListener("submit", listDocuments);
  loadInfo();
}

window.RedKnotUI = { findSpan, promptOrder, splitTiming, renderStrip };
document.addEventListener("DOMContentLoaded", start);
