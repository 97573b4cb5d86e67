// The zimage web page: plain JavaScript, no build step. Talks to the job API (POST /api/v1/jobs,
// Server-Sent Events for progress, cancel) and the history routes. User text is only ever put in
// the page with textContent or input values, never parsed as HTML.
"use strict";

const $ = (id) => document.getElementById(id);
const state = { caps: null, jobs: new Map(), historyTotal: 0, inputs: {}, varianceShape: {} };
const INPUTS = ["image", "mask", "control_image"];  // base64 data URLs, as the job API takes them
const FIELDS = ["system_prompt", "thinking_content", "assistant_content", "negative_prompt"];

class HttpError extends Error {
  constructor(status, body, headers) {
    const err = body && body.error;
    super((err && err.message) || `HTTP ${status}`);
    this.status = status;
    this.body = body;
    this.headers = headers;
  }
}

async function api(path, options = {}) {
  const opts = { credentials: "same-origin", ...options };
  if (opts.json !== undefined) {
    opts.method = opts.method || "POST";
    opts.headers = { "Content-Type": "application/json", ...(opts.headers || {}) };
    opts.body = JSON.stringify(opts.json);
    delete opts.json;
  }
  const response = await fetch(path, opts);
  let body = null;
  const type = response.headers.get("content-type") || "";
  if (type.includes("application/json")) body = await response.json();
  if (response.status === 401) { showLogin(); }
  if (!response.ok) throw new HttpError(response.status, body, response.headers);
  return body;
}

function show(message, kind = "error") {
  const el = $("message");
  el.textContent = message;
  el.className = kind === "error" ? "message" : "message info";
  el.hidden = !message;
}

function el(tag, props = {}, children = []) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(props)) {
    if (key === "text") node.textContent = value;
    else if (key === "dataset") Object.assign(node.dataset, value);
    else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else node.setAttribute(key, value);
  }
  for (const child of children) node.append(child);
  return node;
}

// ------------------------------------------------------------------ login
function showLogin() {
  const dialog = $("login");
  if (!dialog.open) dialog.showModal();
}

$("login-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  try {
    await api("/api/v1/login", { json: { token: $("token").value } });
    $("login").close();
    $("login-error").hidden = true;
    await init();
  } catch (e) {
    $("login-error").textContent = e.message;
    $("login-error").hidden = false;
  }
});

// ------------------------------------------------------------------ form
function setSize(width, height) {
  $("width").value = width;
  $("height").value = height;
  for (const b of document.querySelectorAll(".preset")) {
    b.classList.toggle("active", Number(b.dataset.width) === width && Number(b.dataset.height) === height);
  }
}

function renderPresets(presets) {
  const box = $("presets");
  box.replaceChildren();
  for (const p of presets) {
    box.append(el("button", {
      type: "button", class: "preset small", text: p.label, title: `${p.width} x ${p.height}`,
      dataset: { width: p.width, height: p.height }, onclick: () => setSize(p.width, p.height),
    }));
  }
}

function readForm() {
  const body = { prompt: $("prompt").value };
  const num = (id) => ($(id).value.trim() === "" ? null : Number($(id).value));
  const width = num("width"), height = num("height"), steps = num("steps"), n = num("n");
  const guidance = num("guidance");
  if (width !== null) body.width = width;
  if (height !== null) body.height = height;
  if (steps !== null) body.steps = steps;
  if (n !== null) body.n = n;
  if (guidance !== null) body.guidance_scale = guidance;
  const variance = num("seed_variance");
  if (variance) Object.assign(body, { seed_variance: variance, ...state.varianceShape });
  const cache = num("first_block_cache");
  if (cache) body.first_block_cache = cache;
  const maxLen = num("max_sequence_length");
  if (maxLen !== null) body.max_sequence_length = maxLen;
  const seed = $("seed").value.trim();
  if (seed !== "") body.seed = /^-?\d+$/.test(seed) ? Number(seed) : seed;  // -1: random
  if ($("template").value) body.template = $("template").value;
  for (const f of FIELDS) if ($(f).value.trim() !== "") body[f] = $(f).value;
  if ($("force_think_block").checked) body.force_think_block = true;
  for (const f of INPUTS) if (state.inputs[f]) body[f] = state.inputs[f];
  const strength = num("strength"), scale = num("control_scale");
  if (strength !== null && body.image && !(body.mask && body.control_image)) body.strength = strength;
  if (scale !== null && body.control_image) body.control_scale = scale;
  return body;
}

// ------------------------------------------------------------------ input images
function taskName() {
  const i = state.inputs;
  if (i.control_image) return i.mask && i.image ? "ControlNet inpainting" : "ControlNet";
  if (i.mask) return "inpainting";
  return i.image ? "img2img" : "";
}

function setInput(field, dataUrl) {
  if (dataUrl) state.inputs[field] = dataUrl; else delete state.inputs[field];
  const preview = $(`${field}-preview`);
  preview.hidden = !dataUrl;
  if (dataUrl) preview.src = dataUrl; else preview.removeAttribute("src");
  $(`${field}-clear`).hidden = !dataUrl;
  if (!dataUrl) $(`${field}-file`).value = "";
  const task = taskName();
  $("task").textContent = task ? `(${task})` : "";
}

for (const field of INPUTS) {
  $(`${field}-file`).addEventListener("change", (event) => {
    const file = event.target.files[0];
    if (!file) { setInput(field, null); return; }
    const limit = state.caps ? state.caps.limits.max_upload_bytes : Infinity;
    if (file.size > limit) {
      show(`${file.name} is larger than the server's limit of ${limit} bytes.`);
      setInput(field, null);
      return;
    }
    const reader = new FileReader();
    reader.onload = () => setInput(field, reader.result);
    reader.onerror = () => show(`${file.name} could not be read.`);
    reader.readAsDataURL(file);
  });
  $(`${field}-clear`).addEventListener("click", () => setInput(field, null));
}

function reuse(params) {
  $("prompt").value = params.prompt || "";
  if (params.width && params.height) setSize(params.width, params.height);
  $("steps").value = params.steps ?? "";
  $("seed").value = params.seed ?? "";
  $("n").value = 1;
  $("guidance").value = params.guidance_scale ?? "";
  $("seed_variance").value = params.seed_variance || "";
  $("first_block_cache").value = params.first_block_cache || "";
  $("max_sequence_length").value = params.max_sequence_length ?? "";
  // share and steps have no field here: a re-used request keeps those it was made with
  state.varianceShape = params.seed_variance ? { seed_variance_share: params.seed_variance_share,
    seed_variance_steps: params.seed_variance_steps } : {};
  $("template").value = params.template || "";
  for (const f of FIELDS) $(f).value = params[f] || "";
  $("force_think_block").checked = !!params.force_think_block;
  if (FIELDS.some((f) => params[f]) || params.template) $("format").open = true;
  $("prompt").focus();
  window.scrollTo({ top: 0, behavior: "smooth" });
}

$("form").addEventListener("submit", async (event) => {
  event.preventDefault();
  show("");
  const body = readForm();
  if (!body.prompt.trim()) { show("Write a prompt first."); return; }
  const button = $("generate");
  button.disabled = true;
  try {
    const job = await api("/api/v1/jobs", { json: body });
    trackJob(job, body.prompt);
    // e.g. guidance on Turbo: twice the time, and ComfyUI's cfg 1 is guidance 0 here
    if (job.advice && job.advice.length) show(job.advice.join(" "), "info");
  } catch (e) {
    if (e.status === 429) {
      const wait = (e.headers && e.headers.get("Retry-After")) || "a few";
      show(`The queue is full. Try again in ${wait} s.`);
    } else {
      show(e.message);
    }
  } finally {
    button.disabled = false;
  }
});

// ------------------------------------------------------------------ jobs and progress
function trackJob(job, prompt) {
  const bar = el("div", { class: "bar-inner" });
  const stateText = el("span", { class: "state", text: "Queued" });
  const cancel = el("button", {
    type: "button", class: "small", text: "Cancel",
    onclick: async () => {
      cancel.disabled = true;
      try { await api(`/api/v1/jobs/${job.id}/cancel`, { method: "POST" }); }
      catch (e) { show(e.message); cancel.disabled = false; }
    },
  });
  const row = el("li", { class: "job", dataset: { id: job.id, status: "queued" } }, [
    el("div", {}, [el("div", { class: "label", text: prompt }), stateText]),
    cancel,
    el("div", { class: "bar-outer", role: "progressbar", "aria-valuemin": "0", "aria-valuemax": "100" }, [bar]),
  ]);
  $("jobs").prepend(row);
  const entry = { row, bar, stateText, cancel };
  state.jobs.set(job.id, entry);

  const setStatus = (status, text) => {
    row.dataset.status = status;
    stateText.textContent = text;
  };
  if (job.queue_position) setStatus("queued", `Queued, ${job.queue_position} ahead`);

  const source = new EventSource(`/api/v1/jobs/${job.id}/events`);
  const finish = (status, text) => {
    source.close();
    setStatus(status, text);
    cancel.hidden = true;
    refreshQueue();
    const dismiss = el("button", { type: "button", class: "small", text: "Dismiss", onclick: () => row.remove() });
    if (status !== "completed") row.replaceChild(dismiss, cancel);
    else setTimeout(() => row.remove(), 4000);
  };
  const data = (event) => JSON.parse(event.data);
  source.addEventListener("queued", (e) => {
    const d = data(e);
    setStatus("queued", d.position ? `Queued, ${d.position} ahead` : "Queued");
  });
  source.addEventListener("started", (e) => {
    setStatus("running", "Starting");
    refreshQueue();
    // known once the job runs: a prompt longer than max_sequence_length is cut
    const advice = data(e).advice;
    if (advice && advice.length) show(advice.join(" "), "info");
  });
  source.addEventListener("progress", (e) => {
    const d = data(e);
    const pct = Math.round((100 * d.step) / d.total);
    bar.style.width = `${pct}%`;
    row.querySelector(".bar-outer").setAttribute("aria-valuenow", String(pct));
    setStatus("running", `Step ${d.step} of ${d.total}`);
  });
  source.addEventListener("completed", (e) => {
    const d = data(e);
    bar.style.width = "100%";
    finish("completed", d.seconds != null ? `Done in ${d.seconds.toFixed(1)} s` : "Done");
    showResult(d.images);
    for (const image of [...d.images].reverse()) addHistoryItem(image, true);  // keeps the job's order
  });
  source.addEventListener("failed", (e) => finish("failed", `Failed: ${data(e).error}`));
  source.addEventListener("cancelled", () => finish("cancelled", "Cancelled"));
  source.onerror = () => {
    if (source.readyState === EventSource.CLOSED && row.dataset.status !== "completed") {
      setStatus(row.dataset.status, "Connection lost");
    }
  };
}

function showResult(images) {
  const box = $("result");
  box.replaceChildren();
  for (const image of images) {
    box.append(el("a", { href: image.url, target: "_blank", rel: "noopener" }, [
      el("img", { src: image.url, alt: image.prompt || "generated image", width: image.width, height: image.height }),
    ]));
  }
}

async function refreshQueue() {
  try {
    const health = await api("/health");
    const q = health.queue;
    // A job whose images are being stored is not done yet: named apart from the generating ones.
    const saving = q.saving ? `, ${q.saving} saving` : "";
    $("queue").textContent = `queue: ${q.running} running${saving}, ${q.queued} waiting (of ${q.queue_size})`;
  } catch (e) { /* the page keeps working without it */ }
}

// ------------------------------------------------------------------ history
function addHistoryItem(image, atTop = false) {
  const list = $("history");
  if (list.querySelector(`[data-id="${CSS.escape(image.id)}"]`)) return;
  const params = image.params || {};
  const del = el("button", {
    type: "button", class: "danger", text: "Delete", "aria-label": "Delete image",
    onclick: async () => {
      try {
        await api(`/api/v1/images/${encodeURIComponent(image.id)}`, { method: "DELETE" });
        item.remove();
        setHistoryCount(state.historyTotal - 1);
      } catch (e) { show(e.message); }
    },
  });
  const item = el("li", { class: "item", dataset: { id: image.id } }, [
    el("a", { href: image.url, target: "_blank", rel: "noopener" }, [
      el("img", { src: image.thumbnail_url, alt: params.prompt || "generated image", loading: "lazy" }),
    ]),
    el("div", { class: "caption", text: params.prompt || "", title: params.prompt || "" }),
    el("div", { class: "meta", text: `${image.width}x${image.height} seed ${image.seed ?? "?"}` }),
    el("div", { class: "tools" }, [
      el("button", { type: "button", text: "Re-use", onclick: () => reuse({ ...params, seed: image.seed }) }),
      del,
    ]),
  ]);
  if (atTop) list.prepend(item); else list.append(item);
  setHistoryCount(state.historyTotal + 1);
}

function setHistoryCount(total) {
  state.historyTotal = Math.max(0, total);
  $("history-count").textContent = state.historyTotal ? `(${state.historyTotal})` : "";
  $("history-empty").hidden = state.historyTotal > 0;
}

async function loadHistory() {
  const data = await api("/api/v1/images?limit=200");
  $("history").replaceChildren();
  state.historyTotal = 0;
  for (const image of data.items) addHistoryItem(image);
  setHistoryCount(data.total);
}

$("clear").addEventListener("click", async () => {
  if (!window.confirm("Delete every image in the history?")) return;
  try {
    await api("/api/history", { method: "DELETE" });
    $("history").replaceChildren();
    setHistoryCount(0);
  } catch (e) { show(e.message); }
});

// The jobs still queued or running (started before a reload, or from another tab): tracked again,
// with progress and a Cancel button, as if this page had started them.
async function resumeJobs() {
  const data = await api("/api/v1/jobs?limit=50");
  const active = data.jobs.filter((j) => j.status === "queued" || j.status === "running");
  for (const job of active.reverse()) {  // running first, at the top
    if (!state.jobs.has(job.id)) trackJob(job, (job.params && job.params.prompt) || "");
  }
}

// ------------------------------------------------------------------ start
async function init() {
  const caps = await api("/api/v1/capabilities");
  state.caps = caps;
  $("model").textContent = `${caps.model} (${caps.variant})`;
  renderPresets(caps.presets);
  const d = caps.defaults, l = caps.limits;
  if (!$("width").value) setSize(d.width, d.height);
  for (const id of ["width", "height"]) { $(id).min = l.min_side; $(id).max = l.max_side; }
  $("steps").placeholder = d.steps; $("steps").max = l.max_steps;
  $("max_sequence_length").placeholder = d.max_sequence_length; $("max_sequence_length").max = l.max_sequence_length;
  $("n").max = l.max_images;
  $("guidance").placeholder = d.guidance_scale;
  $("prompt").maxLength = l.max_prompt_chars;
  $("generate").disabled = !caps.features.generate;
  $("strength").placeholder = d.strength;
  $("control_scale").placeholder = d.control_scale;
  $("control_scale").max = l.max_control_scale;
  $("control-upload").hidden = !caps.features.control;
  $("control-scale-label").hidden = !caps.features.control;
  $("first-block-cache-label").hidden = !caps.features.first_block_cache;  // not under CUDA graphs
  $("mask-file").disabled = !caps.features.inpaint;
  if (!caps.features.generate) show("This server runs the text encoder only.", "info");
  const templates = await api("/api/templates");
  const select = $("template");
  select.replaceChildren(el("option", { value: "", text: "(none)" }));
  for (const t of templates.templates) {
    if (t.category === "rewriter") continue;
    select.append(el("option", { value: t.name, text: `${t.name} - ${t.description}` }));
  }
  await loadHistory();
  await resumeJobs();
  refreshQueue();
}

init().catch((e) => { if (e.status !== 401) show(e.message); });
setInterval(() => { if (document.visibilityState === "visible" && state.caps) refreshQueue(); }, 3000);
