// Sparkle's page: sign in with an API key (exchanged for a session cookie the page cannot
// read), make images, follow them live, cancel, and browse your own. It speaks only the
// public API, and shows the API's own words when it refuses something.
"use strict";

const $ = (id) => document.getElementById(id);
const SIZES = ["512x512", "768x768", "1024x1024", "512x768", "768x512", "832x1216", "1216x832"];
const SCHEDULERS = [["euler", "Euler"], ["euler_a", "Euler a"], ["ddim", "DDIM"], ["dpmpp_2m_karras", "DPM++ 2M Karras"]];
const PAGE = 12;

let csrf = null;
let models = [];
let oldest = null;

class ApiError extends Error {
  constructor(status, body) {
    const e = (body && body.error) || {};
    super(e.message || `the server answered ${status}`);
    this.status = status;
    this.code = e.code || null;
  }
}

async function api(method, path, body) {
  const headers = { "Accept": "application/json" };
  if (body !== undefined) headers["Content-Type"] = "application/json";
  if (csrf && method !== "GET") headers["X-CSRF-Token"] = csrf;
  let response;
  try {
    response = await fetch(path, {
      method, headers, credentials: "same-origin", cache: "no-store",
      body: body === undefined ? undefined : JSON.stringify(body),
    });
  } catch (e) {
    throw new ApiError(0, { error: { message: "the service cannot be reached; check your connection and try again" } });
  }
  const text = await response.text();
  let json = null;
  try { json = text ? JSON.parse(text) : null; } catch (e) { json = null; }
  if (!response.ok) throw new ApiError(response.status, json);
  return json;
}

function show(el, visible) { el.hidden = !visible; }

function say(el, error) {
  if (!error) { el.textContent = ""; show(el, false); return; }
  el.textContent = error.code ? `${error.message} (${error.code})` : error.message;
  show(el, true);
}

function node(tag, props, ...children) {
  const el = document.createElement(tag);
  Object.assign(el, props || {});
  for (const child of children) if (child) el.append(child);
  return el;
}

// --- session --------------------------------------------------------------------------

function signedIn(session) {
  csrf = session.csrf_token;
  const until = new Date(session.expires_at * 1000).toLocaleString();
  $("who").textContent = `${session.key_name} · until ${until}`;
  show($("who"), true);
  show($("sign-out"), true);
  show($("signin"), false);
  show($("app"), true);
  loadModels().then(() => loadGallery(true));
}

function signedOut(error) {
  csrf = null;
  for (const source of streams.values()) source.close();
  streams.clear();
  $("live").replaceChildren();
  $("gallery").replaceChildren();
  show($("who"), false);
  show($("sign-out"), false);
  show($("app"), false);
  show($("signin"), true);
  say($("signin-error"), error);
  $("api-key").focus();
}

async function start() {
  try {
    signedIn(await api("GET", "/v1/session"));
  } catch (e) {
    signedOut(e.status === 401 ? null : e);
  } finally {
    show($("loading"), false);
  }
}

$("signin-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  const input = $("api-key");
  const button = event.submitter || $("signin-form").querySelector("button");
  button.disabled = true;
  try {
    const session = await api("POST", "/v1/session", { api_key: input.value.trim() });
    input.value = "";
    say($("signin-error"), null);
    signedIn(session);
  } catch (e) {
    say($("signin-error"), e);
    input.select();
  } finally {
    button.disabled = false;
  }
});

$("sign-out").addEventListener("click", async () => {
  try { await api("DELETE", "/v1/session"); } catch (e) { /* the session is gone either way */ }
  signedOut(null);
});

// --- the form -------------------------------------------------------------------------

async function loadModels() {
  try {
    models = (await api("GET", "/v1/models")).data;
  } catch (e) {
    say($("generate-error"), e);
    return;
  }
  const select = $("model");
  select.replaceChildren(...models.map((m) => node("option", { value: m.id, textContent: m.id })));
  const scheduler = $("scheduler");
  scheduler.replaceChildren(node("option", { value: "", textContent: "Model's default" }),
    ...SCHEDULERS.map(([value, name]) => node("option", { value, textContent: name })));
  modelChanged();
}

function modelChanged() {
  const model = models.find((m) => m.id === $("model").value) || models[0];
  if (!model) return;
  const sizes = [...new Set([model.default_size, ...SIZES])];
  $("size").replaceChildren(...sizes.map((s) => node("option", {
    value: s === model.default_size ? "" : s,
    textContent: s === model.default_size ? `${s} (default)` : s,
  })));
  $("steps").placeholder = String(model.default_steps);
  $("guidance").placeholder = String(model.default_guidance_scale);
  $("scheduler").options[0].textContent = `Model's default (${model.default_scheduler})`;
}
$("model").addEventListener("change", modelChanged);

function formRequest() {
  const body = { prompt: $("prompt").value };
  const text = (id, field) => { const v = $(id).value.trim(); if (v) body[field] = v; };
  const number = (id, field) => { const v = $(id).value.trim(); if (v !== "") body[field] = Number(v); };
  text("negative", "negative_prompt");
  text("model", "model");
  text("size", "size");
  text("scheduler", "scheduler");
  number("steps", "steps");
  number("guidance", "guidance_scale");
  number("seed", "seed");
  number("n", "n");
  return body;
}

function useSettings(request) {
  $("prompt").value = request.prompt;
  $("negative").value = request.negative_prompt || "";
  if (models.some((m) => m.id === request.model)) { $("model").value = request.model; modelChanged(); }
  const size = [...$("size").options].find((o) => (o.value || o.textContent.split(" ")[0]) === request.size);
  if (size) $("size").value = size.value;
  $("steps").value = request.steps;
  $("guidance").value = request.guidance_scale;
  $("seed").value = request.seed;
  $("scheduler").value = request.scheduler;
  $("n").value = request.n;
  $("prompt").focus();
}

async function submit(body) {
  const button = $("go");
  button.disabled = true;
  try {
    const job = await api("POST", "/v1/jobs", body);
    say($("generate-error"), null);
    follow(job);
  } catch (e) {
    say($("generate-error"), e);
  } finally {
    button.disabled = false;
  }
}

$("generate").addEventListener("submit", (event) => {
  event.preventDefault();
  submit(formRequest());
});

// --- jobs in progress -------------------------------------------------------------------

const streams = new Map();

function describe(request) {
  return `${request.model} · ${request.size} · ${request.steps} steps · guidance ${request.guidance_scale} · ${request.scheduler} · seed ${request.seed}` +
    (request.n > 1 ? ` · ${request.n} images` : "") +
    (request.negative_prompt ? ` · not: ${request.negative_prompt}` : "");
}

function statusText(job) {
  switch (job.status) {
    case "queued":
      return job.queue_position === undefined ? "Queued" :
        `Queued · ${job.queue_position} ahead` + (job.eta_seconds ? ` · starts in about ${Math.ceil(job.eta_seconds)} s` : "");
    case "running":
      return job.progress ? `Step ${job.progress.step}/${job.progress.total}` : "Starting";
    case "succeeded": return "Done";
    case "cancelled": return "Cancelled";
    default: return job.error ? `${job.status}: ${job.error.message}` : job.status;
  }
}

function follow(job) {
  show($("live-title"), true);
  const status = node("p", { className: "status", textContent: statusText(job) });
  const bar = node("progress", { max: 1, value: 0 });
  bar.setAttribute("aria-label", "progress");
  const cancel = node("button", { type: "button", className: "quiet", textContent: "Cancel" });
  const card = node("li", { className: "card live" },
    node("p", { className: "prompt", textContent: job.request.prompt }),
    node("p", { className: "params", textContent: describe(job.request) }),
    status, bar, node("div", { className: "actions" }, cancel));
  card.dataset.job = job.id;
  $("live").prepend(card);
  const update = (job) => {
    card.dataset.status = job.status;
    status.textContent = statusText(job);
    if (job.progress) { bar.max = job.progress.total; bar.value = job.progress.step; }
  };
  update(job);
  cancel.addEventListener("click", async () => {
    cancel.disabled = true;
    try {
      const answer = await api("DELETE", `/v1/jobs/${job.id}`);
      // A job that finished meanwhile is deleted instead: it is gone.
      if (answer.deleted) { card.remove(); } else { update(answer); }
    } catch (e) {
      status.textContent = e.message;
      cancel.disabled = false;
    }
  });
  const finish = (final) => {
    streams.delete(job.id);
    update(final);
    cancel.remove();
    if (final.status === "succeeded") {
      card.remove();
      $("gallery").prepend(galleryCard(final));
      show($("gallery-empty"), false);
    } else {
      const dismiss = node("button", { type: "button", className: "quiet", textContent: "Dismiss" });
      dismiss.addEventListener("click", () => {
        card.remove();
        if (!$("live").children.length) show($("live-title"), false);
      });
      card.querySelector(".actions").append(dismiss);
    }
    if (!$("live").children.length) show($("live-title"), false);
  };
  const source = new EventSource(`/v1/jobs/${job.id}/events`, { withCredentials: true });
  streams.set(job.id, source);
  source.addEventListener("progress", (e) => update(JSON.parse(e.data)));
  source.addEventListener("done", (e) => {
    source.close();
    finish(JSON.parse(e.data));
  });
  // A stream the server refused or ended (too many open, the session gone): ask instead.
  source.addEventListener("error", () => {
    if (source.readyState !== EventSource.CLOSED || !streams.has(job.id)) return;
    streams.set(job.id, { close() { streams.delete(job.id); } });
    const poll = async () => {
      if (!streams.has(job.id)) return;
      try {
        const now = await api("GET", `/v1/jobs/${job.id}`);
        if (["queued", "running"].includes(now.status)) {
          update(now);
          setTimeout(poll, 2000);
        } else {
          finish(now);
        }
      } catch (e) {
        if (e.status === 401) { signedOut(e); return; }
        status.textContent = e.message;
        setTimeout(poll, 5000);
      }
    };
    poll();
  });
}

// --- the gallery ------------------------------------------------------------------------

function galleryCard(job) {
  const r = job.request;
  const images = node("div", { className: "images" },
    ...job.images.map((image) => node("img", {
      src: image.url, alt: `${r.prompt} (image ${image.index + 1})`, loading: "lazy",
      width: Number(r.size.split("x")[0]), height: Number(r.size.split("x")[1]),
    })));
  const actions = node("div", { className: "actions" });
  job.images.forEach((image) => {
    actions.append(node("a", {
      href: image.url, download: `${job.id}-${image.index}.png`,
      textContent: job.images.length > 1 ? `Download ${image.index + 1}` : "Download",
    }));
  });
  const use = node("button", { type: "button", className: "quiet", textContent: "Use these settings" });
  use.addEventListener("click", () => useSettings(r));
  const reroll = node("button", { type: "button", className: "quiet", textContent: "Re-roll" });
  reroll.addEventListener("click", () => {
    const body = { prompt: r.prompt, model: r.model, size: r.size, steps: r.steps,
      guidance_scale: r.guidance_scale, scheduler: r.scheduler, n: r.n };
    if (r.negative_prompt) body.negative_prompt = r.negative_prompt;
    submit(body);
  });
  actions.append(use, reroll);
  const card = node("li", { className: "card" }, images,
    node("p", { className: "prompt", textContent: r.prompt }),
    node("p", { className: "params", textContent: describe(r) }), actions);
  card.dataset.job = job.id;
  return card;
}

async function loadGallery(fresh) {
  if (fresh) { oldest = null; $("gallery").replaceChildren(); }
  const query = new URLSearchParams({ limit: String(PAGE), status: "succeeded" });
  if (oldest) query.set("before", oldest);
  try {
    const page = await api("GET", `/v1/jobs?${query}`);
    $("gallery").append(...page.data.map(galleryCard));
    oldest = page.last_id || oldest;
    show($("more"), page.has_more);
    show($("gallery-empty"), !$("gallery").children.length);
    say($("gallery-error"), null);
  } catch (e) {
    say($("gallery-error"), e);
  }
}
$("more").addEventListener("click", () => loadGallery(false));

start();
