// stablekit studio: a page over the native API (/v1). No build step, no dependencies.
// Progress comes from each job's server-sent events, read with fetch() so that a token can be sent.
"use strict";

const TOKEN_KEY = "stablekit.token";
const FINAL = { completed: "succeeded", failed: "failed", cancelled: "cancelled" };
const SHOWN_META = ["prompt", "negative", "seed", "steps", "guidance", "scheduler", "size", "model", "method"];
const $ = (selector, root = document) => root.querySelector(selector);
const followed = new Set();
// A browser opens at most 6 connections to one server; each followed job holds one open for its events, so at
// most STREAMS jobs are followed at once and the page's other requests always find a connection.
const STREAMS = 3;
const waiting = [];
let streams = 0;
let token = sessionStorage.getItem(TOKEN_KEY);
let asking = null;

// ------------------------------------------------------------------ talking to the server

function askToken() {
  if (!asking) {
    asking = new Promise((resolve) => {
      const dialog = $("#token-dialog");
      $("#token-form").addEventListener(
        "submit",
        () => {
          token = $("#token").value.trim();
          sessionStorage.setItem(TOKEN_KEY, token);
          asking = null;
          resolve();
        },
        { once: true },
      );
      dialog.showModal();
    });
  }
  return asking;
}

async function call(path, options = {}) {
  const headers = { ...(options.headers || {}) };
  if (token) headers.Authorization = `Bearer ${token}`;
  let body = options.body;
  if (options.json !== undefined) {
    headers["Content-Type"] = "application/json";
    body = JSON.stringify(options.json);
  }
  const response = await fetch(path, { method: options.method || "GET", headers, body, signal: options.signal });
  if (response.status === 401) {
    await askToken();
    return call(path, options);
  }
  return response;
}

async function data(path, options) {
  const response = await call(path, options);
  const body = await response.json().catch(() => ({}));
  if (!response.ok) throw new Error(body.error || `${response.status} ${response.statusText}`);
  return body;
}

function say(text) {
  const message = $("#message");
  message.textContent = text || "";
  message.hidden = !text;
}

// ------------------------------------------------------------------ the form's choices

function fill(select, items, keep = 1) {
  while (select.options.length > keep) select.remove(keep);
  for (const item of items) select.add(new Option(item.label, item.value));
}

async function loadPlugins() {
  const plugins = await data("/v1/plugins");
  const of = (kind) => plugins.filter((p) => p.kind === kind).map((p) => ({ label: p.name, value: p.name }));
  fill($("#sampler"), of("scheduler"));
  fill($("#accel"), of("accel"));
  fill($("#guard"), of("guard"));
  fill($("#key-method"), of("watermark"), 0);
  for (const select of document.querySelectorAll("#sampler, #accel, #guard")) {
    for (const option of select.options) {
      const plugin = plugins.find((p) => p.name === option.value);
      if (plugin) option.title = plugin.doc;
    }
    select.addEventListener("change", () => hintArgs(select, plugins));
  }
}

function hintArgs(select, plugins) {
  // The arguments box shows the chosen plugin's parameters with their defaults; "{}" keeps the defaults.
  const plugin = plugins.find((p) => p.name === select.value);
  const hint = plugin ? Object.entries(plugin.params).map(([k, v]) => `${k}: ${JSON.stringify(v.default)}`) : [];
  $(`#${select.id}-args`).placeholder = hint.length ? `{} or e.g. {${hint.join(", ")}}` : "{}";
}

async function loadKeys() {
  const keys = await data("/v1/keys");
  const items = keys.map((k) => ({ label: `${k.name} (${k.method})`, value: k.name }));
  fill($("#watermark"), items);
  fill($("#detect-key"), items, 0);
  for (const option of $("#watermark").options) {
    const key = keys.find((k) => k.name === option.value);
    if (key) option.dataset.method = key.method;
  }
}

async function loadTasks() {
  const tasks = await data("/v1/tasks");
  for (const select of document.querySelectorAll("select[data-enum]")) {
    const [task, field] = select.dataset.enum.split(".");
    const schema = tasks[task].properties[field];
    fill(select, schema.enum.map((v) => ({ label: v, value: v })), 0);
    select.value = schema.default;
  }
}

async function loadModel() {
  let model;
  try {
    [model] = await data("/v1/models");
  } catch (e) {
    $("#model").textContent = e.message;
    setTimeout(loadModel, 2000);
    return;
  }
  $("#model").textContent = `${model.name} · ${model.device} · ${model.scheduler}`;
  for (const side of ["#width", "#height"]) $(side).value = model.native_size;
}

async function makeKey() {
  const name = $("#key-name").value.trim();
  try {
    await data("/v1/keys", { method: "POST", json: { name, method: $("#key-method").value } });
    await loadKeys();
    $("#watermark").value = name;
    say("");
  } catch (e) {
    say(e.message);
  }
}

// ------------------------------------------------------------------ building requests

const number = (id) => ($(id).value === "" ? null : Number($(id).value));

function generateRequest() {
  const params = {
    prompt: $("#prompt").value,
    negative_prompt: $("#negative").value,
    seed: number("#seed"),
    steps: number("#steps"),
    guidance: number("#guidance"),
    width: number("#width"),
    height: number("#height"),
    n: number("#count"),
    preview_every: 5,
  };
  const plugins = [];
  for (const id of ["#sampler", "#accel", "#guard"]) {
    if ($(id).value) plugins.push({ name: $(id).value, args: pluginArgs(`${id}-args`) });
  }
  const key = $("#watermark").selectedOptions[0];
  if (key && key.value) plugins.push({ name: key.dataset.method, args: { key: key.value } });
  return { task: "txt2img", params, plugins };
}

function pluginArgs(id) {
  const text = $(id).value.trim();
  let args;
  try {
    args = text ? JSON.parse(text) : {};
  } catch (e) {
    throw new Error(`arguments of ${id.slice(1, -5)}: not JSON (${e.message})`);
  }
  if (args === null || typeof args !== "object" || Array.isArray(args)) {
    throw new Error(`arguments of ${id.slice(1, -5)}: expected a JSON object such as {"concepts": ["star"]}`);
  }
  return args;
}

function readFile(id) {
  const file = $(id).files[0];
  if (!file) return Promise.reject(new Error("choose an image first"));
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result);
    reader.onerror = () => reject(new Error(`cannot read ${file.name}`));
    reader.readAsDataURL(file);
  });
}

const REQUESTS = {
  txt2img: async () => generateRequest(),
  edit: async () => ({
    task: "edit",
    params: {
      image: await readFile("#edit-image"),
      source: $("#edit-source").value,
      target: $("#edit-target").value,
      method: $("#edit-method").value,
      steps: number("#edit-steps"),
    },
  }),
  protect: async () => ({
    task: "protect",
    params: {
      image: await readFile("#protect-image"),
      method: $("#protect-method").value,
      eps: number("#protect-eps") / 255,
      ...(number("#protect-steps") ? { steps: number("#protect-steps") } : {}),
    },
  }),
  detect: async () => ({
    task: "detect",
    params: { image: await readFile("#detect-image"), keys: [$("#detect-key").value], steps: number("#detect-steps") },
  }),
};

async function submit(event) {
  event.preventDefault();
  const form = event.target;
  const button = $("button[type=submit]", form);
  button.disabled = true;
  try {
    const request = await REQUESTS[form.dataset.task]();
    const accepted = await data("/v1/jobs", { method: "POST", json: request });
    say("");
    const job = { id: accepted.id, task: request.task, status: accepted.status, position: accepted.position };
    render(card(job, true), job);
    follow(accepted.id);
  } catch (e) {
    say(e.message);
  } finally {
    button.disabled = false;
  }
}

// ------------------------------------------------------------------ the gallery

function card(job, first) {
  let node = document.querySelector(`article.job[data-id="${job.id}"]`);
  if (node) return node;
  node = $("#job-card").content.firstElementChild.cloneNode(true);
  node.dataset.id = job.id;
  $(".task", node).textContent = job.task;
  $(".cancel", node).addEventListener("click", () => cancel(job.id));
  const gallery = $("#gallery");
  if (first) gallery.prepend(node);
  else gallery.append(node);
  return node;
}

function showProgress(node, progress, live) {
  const bar = $("progress", node);
  if (!progress || !progress.total) return;
  bar.max = progress.total;
  bar.value = progress.step;
  const eta = !live || progress.eta_s == null ? "" : ` · ${progress.eta_s.toFixed(1)} s left`;
  $(".progress-text", node).textContent = `step ${progress.step} of ${progress.total}${eta}`;
}

function render(node, job) {
  node.dataset.status = job.status;
  const position = job.status === "queued" && job.position != null ? ` (${job.position} ahead)` : "";
  $(".status", node).textContent = job.status + position;
  const live = ["queued", "running"].includes(job.status);
  $(".cancel", node).hidden = !live;
  showProgress(node, job.progress, live);
  $("progress", node).hidden = !live && !$("progress", node).value;
  const error = $(".error", node);
  error.textContent = job.error || "";
  error.hidden = !job.error;
  if (job.result) showResult(node, job);
}

function term(list, name, value) {
  const dt = document.createElement("dt");
  const dd = document.createElement("dd");
  dt.textContent = name;
  dd.textContent = typeof value === "string" ? value : JSON.stringify(value);
  list.append(dt, dd);
}

async function showImage(holder, image) {
  const figure = document.createElement("figure");
  const img = document.createElement("img");
  const meta = document.createElement("dl");
  meta.className = "meta";
  img.alt = image.metadata.prompt || image.metadata.target || "result";
  img.width = image.width;
  img.height = image.height;
  for (const name of SHOWN_META) if (image.metadata[name]) term(meta, name, image.metadata[name]);
  term(meta, "sha256", image.sha256);
  const link = document.createElement("a");
  link.textContent = "PNG";
  link.download = `${image.id}.png`;
  figure.append(img, meta, link);
  holder.append(figure);
  const blob = await (await call(image.url)).blob();
  img.src = URL.createObjectURL(blob);
  link.href = img.src;
}

function showResult(node, job) {
  if (node.dataset.shown) return;
  node.dataset.shown = "1";
  $(".preview", node).hidden = true;
  const { images = [], ...rest } = job.result;
  for (const image of images) showImage($(".images", node), image);
  for (const [name, value] of Object.entries(rest)) term($(".result", node), name, value);
  $("progress", node).hidden = job.status === "succeeded";
}

async function cancel(id) {
  try {
    const job = await data(`/v1/jobs/${id}`, { method: "DELETE" });
    render(card(job), job);
  } catch (e) {
    say(e.message);
  }
}

// ------------------------------------------------------------------ events

function parseEvent(block) {
  const event = { id: null, name: "message", data: "" };
  for (const line of block.split("\n")) {
    if (line.startsWith(":")) continue;
    const [field, ...rest] = line.split(":");
    const value = rest.join(":").replace(/^ /, "");
    if (field === "id") event.id = Number(value);
    else if (field === "event") event.name = value;
    else if (field === "data") event.data += value;
  }
  return event;
}

function onEvent(id, event) {
  const node = card({ id, task: "" });
  const payload = event.data ? JSON.parse(event.data) : {};
  if (event.name === "progress") {
    render(node, { status: "running", progress: payload });
  } else if (event.name === "preview" && payload.image) {
    $(".preview", node).src = payload.image;
    $(".preview", node).hidden = false;
  } else if (event.name === "running") {
    render(node, { status: "running" });
  } else if (event.name === "queued") {
    render(node, { status: "queued", position: payload.position });
  } else if (event.name in FINAL) {
    render(node, payload);
    return true;
  }
  return false;
}

async function stream(id, last) {
  const headers = last ? { "Last-Event-ID": String(last) } : {};
  const response = await call(`/v1/jobs/${id}/events`, { headers });
  if (!response.ok) throw new Error((await response.json()).error);
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return { last, finished: false };
    buffer += value;
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const event = parseEvent(buffer.slice(0, cut));
      buffer = buffer.slice(cut + 2);
      if (event.id) last = event.id;
      if (onEvent(id, event)) return { last, finished: true };
    }
  }
}

async function slot() {
  if (streams < STREAMS) streams++;
  else await new Promise((resolve) => waiting.push(resolve));
}

function release() {
  const next = waiting.shift();
  if (next) next();
  else streams--;
}

async function follow(id) {
  if (followed.has(id)) return;
  followed.add(id);
  await slot();
  let last = 0;
  try {
    for (let tries = 0; tries < 20; tries++) {
      try {
        const state = await stream(id, last);
        if (state.finished) break;
        last = state.last;
      } catch (e) {
        say(`lost the events of job ${id.slice(0, 8)}: ${e.message}; retrying`);
      }
      await new Promise((r) => setTimeout(r, 1000));
    }
  } finally {
    release();
    followed.delete(id);
  }
  refreshQueue();
}

// ------------------------------------------------------------------ start

async function refreshQueue() {
  try {
    const queue = await data("/v1/queue");
    const waiting = queue.queued.length;
    $("#queue").textContent = `${queue.running ? "1 running" : "idle"}, ${waiting} queued`;
  } catch (e) {
    $("#queue").textContent = "";
  }
}

async function loadHistory() {
  const jobs = await data("/v1/jobs?limit=24");
  for (const job of jobs) {
    const node = card(job, false);
    $(".task", node).textContent = job.task;
    render(node, job);
    if (["queued", "running"].includes(job.status)) follow(job.id);
  }
}

function selectTab(tab) {
  for (const other of document.querySelectorAll("[role=tab]")) {
    const selected = other === tab;
    other.setAttribute("aria-selected", String(selected));
    document.getElementById(other.getAttribute("aria-controls")).hidden = !selected;
  }
}

async function start() {
  for (const tab of document.querySelectorAll("[role=tab]")) tab.addEventListener("click", () => selectTab(tab));
  for (const form of document.querySelectorAll("form[data-task]")) form.addEventListener("submit", submit);
  $("#make-key").addEventListener("click", makeKey);
  try {
    await loadPlugins();
    await Promise.all([loadKeys(), loadTasks(), loadModel(), loadHistory(), refreshQueue()]);
    document.body.dataset.ready = "1";
  } catch (e) {
    say(`cannot reach the server: ${e.message}`);
  }
  setInterval(refreshQueue, 5000);
}

start();
