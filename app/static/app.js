// The playground: sign in, chat, compare & pick, training dashboard, operator view.
// Every piece of user or model text goes into the page with textContent, never as HTML.

import { Api, ApiError, chunkFinish, chunkText, newIdempotencyKey, seg } from "./api.js";
import { drawChart, fmt } from "./charts.js";

const KEY_STORAGE = "bapo.apiKey";
const USER_STORAGE = "bapo.userId";
const SCREENS = ["chat", "compare", "training", "operator"];
const FINISHED = new Set(["succeeded", "failed", "cancelled"]);
const POLL_MS = 1000;

const $ = (id) => document.getElementById(id);

const state = {
  api: null,
  operator: false,
  userId: null,
  user: null,
  screen: "chat",
  chat: { messages: [], abort: null },
  compare: { answers: [], prompt: "", idempotencyKey: null, busy: false },
  training: { job: null, timer: null, after: null, steps: [] },
  operatorView: { cursor: null },
};

// --- small DOM helpers ----------------------------------------------------------------------------

/** Create an element with text (textContent) and attributes; children appended in order. */
function h(tag, { text, cls, attrs } = {}, ...children) {
  const node = document.createElement(tag);
  if (text !== undefined && text !== null) node.textContent = String(text);
  if (cls) node.className = cls;
  for (const [name, value] of Object.entries(attrs || {})) node.setAttribute(name, String(value));
  node.append(...children.filter(Boolean));
  return node;
}

function showError(target, err) {
  const node = typeof target === "string" ? $(target) : target;
  if (!err) {
    node.textContent = "";
    return;
  }
  node.textContent = err instanceof ApiError ? err.describe() : `Error: ${err.message || err}`;
}

function announce(message) {
  $("status").textContent = message;
}

function when(iso) {
  if (!iso) return "—";
  const date = new Date(iso);
  return Number.isNaN(date.getTime()) ? String(iso) : date.toLocaleString();
}

function list(body) {
  if (Array.isArray(body)) return body;
  return body && Array.isArray(body.data) ? body.data : [];
}

function userPath(suffix = "") {
  return `/users/${seg(state.userId)}${suffix}`;
}

function numberField(id) {
  const value = $(id).value.trim();
  return value === "" ? undefined : Number(value);
}

// --- sign in / out --------------------------------------------------------------------------------

async function signIn(key, { quiet = false } = {}) {
  const api = new Api(key);
  const me = await api.get("/whoami");
  state.api = api;
  state.operator = Boolean(me.operator);
  if (key) sessionStorage.setItem(KEY_STORAGE, key);
  $("signin").hidden = true;
  $("workspace").hidden = false;
  $("who").hidden = false;
  $("sign-out").hidden = !key; // anonymous local use: there is nothing to sign out of
  $("who-label").textContent = state.operator ? "Signed in as operator" : `Signed in as ${me.user_id}`;
  $("tab-operator").hidden = !state.operator;
  $("user-pick-wrap").hidden = !state.operator;
  if (state.operator) {
    await loadUserPicker();
  } else {
    await selectUser(me.user_id);
  }
  route();
  if (!quiet) document.querySelector("[role=tab][aria-selected=true]")?.focus();
}

function signOut() {
  stopPolling();
  if (state.chat.abort) state.chat.abort.abort();
  sessionStorage.removeItem(KEY_STORAGE);
  sessionStorage.removeItem(USER_STORAGE);
  // A fresh page: nothing of the previous user's conversation or data stays on screen.
  location.replace(location.pathname);
}

async function onSignInSubmit(event) {
  event.preventDefault();
  const key = $("api-key").value.trim();
  showError("signin-error", null);
  if (!key) {
    $("signin-error").textContent = "Enter an API key.";
    $("api-key").focus();
    return;
  }
  try {
    await signIn(key);
    $("api-key").value = "";
  } catch (err) {
    showError("signin-error", err);
    $("api-key").focus();
  }
}

async function restoreSession() {
  const key = sessionStorage.getItem(KEY_STORAGE);
  try {
    // No stored key: a server configured for anonymous local use still lets us in.
    await signIn(key || "", { quiet: true });
  } catch (err) {
    if (key) {
      sessionStorage.removeItem(KEY_STORAGE);
      showError("signin-error", err);
    }
    $("signin").hidden = false;
  }
}

// --- the current user ------------------------------------------------------------------------------

async function loadUserPicker() {
  const picker = $("user-pick");
  const body = await state.api.get("/users?limit=100");
  const users = list(body);
  picker.replaceChildren(...users.map((u) => h("option", { text: u.id, attrs: { value: u.id } })));
  const remembered = sessionStorage.getItem(USER_STORAGE);
  const chosen = users.find((u) => u.id === remembered) || users[0];
  if (chosen) {
    picker.value = chosen.id;
    await selectUser(chosen.id);
  } else {
    await selectUser(null);
  }
}

function addToPicker(userId) {
  const picker = $("user-pick");
  if (![...picker.options].some((o) => o.value === userId)) {
    picker.append(h("option", { text: userId, attrs: { value: userId } }));
  }
}

async function selectUser(userId) {
  if (userId !== state.userId) {
    stopPolling();
    resetChat();
    resetCompare();
    state.training = { job: null, timer: null, after: null, steps: [] };
  }
  state.userId = userId;
  state.user = null;
  if (userId && state.operator) {
    sessionStorage.setItem(USER_STORAGE, userId);
    $("user-pick").value = userId;
  }
  $("no-user").hidden = Boolean(userId);
  renderUserFacts();
  if (userId) await refreshUser();
}

/** Show a screen (also when its hash is already the current one). */
function go(screen) {
  if (location.hash === `#${screen}`) showScreen(screen);
  else location.hash = screen;
}

async function refreshUser() {
  if (!state.userId) return;
  try {
    state.user = await state.api.get(userPath());
  } catch (err) {
    announce(err instanceof ApiError ? err.describe() : String(err));
  }
  renderUserFacts();
}

function renderUserFacts() {
  const user = state.user;
  $("fact-user").textContent = state.userId || "—";
  $("fact-pairs").textContent = user ? String(user.pair_count) : "—";
  const version = user ? user.active_adapter_version : null;
  $("fact-adapter").textContent = version ? `v${version}` : user ? "none (base model)" : "—";
}

// --- screens and tabs -----------------------------------------------------------------------------

function route() {
  const wanted = location.hash.replace(/^#/, "");
  let screen = SCREENS.includes(wanted) ? wanted : state.screen;
  if (screen === "operator" && !state.operator) screen = "chat";
  if (!state.userId && state.operator) screen = "operator";
  showScreen(screen);
}

function showScreen(screen) {
  state.screen = screen;
  for (const name of SCREENS) {
    const tab = $(`tab-${name}`);
    const selected = name === screen;
    tab.setAttribute("aria-selected", String(selected));
    tab.tabIndex = selected ? 0 : -1;
    $(`panel-${name}`).hidden = !selected || (name !== "operator" && !state.userId);
  }
  if (screen !== "training") stopPolling();
  loadScreen(screen);
}

function loadScreen(screen) {
  if (!state.api) return;
  if (screen === "operator") loadUsers();
  if (!state.userId) return;
  if (screen === "compare") loadPairs();
  if (screen === "training") loadTraining();
}

function onTabKey(event) {
  const tabs = SCREENS.map((name) => $(`tab-${name}`)).filter((t) => !t.hidden);
  const index = tabs.indexOf(event.target);
  if (index < 0) return;
  const moves = { ArrowRight: index + 1, ArrowLeft: index - 1, Home: 0, End: tabs.length - 1 };
  if (!(event.key in moves)) return;
  event.preventDefault();
  const next = tabs[(moves[event.key] + tabs.length) % tabs.length];
  next.focus();
  location.hash = next.dataset.screen;
}

// --- generation -----------------------------------------------------------------------------------

/**
 * Stream one generation into `onText` (called with each new piece); resolve to
 * {text, finish, adapter} when the stream ends.
 */
async function generate(body, onText, signal) {
  let text = "";
  let finish = null;
  let adapter = null;
  for await (const chunk of state.api.stream(userPath("/generate"), body, { signal })) {
    const piece = chunkText(chunk);
    if (piece) {
      text += piece;
      onText(piece, text);
    }
    finish = chunkFinish(chunk) || finish;
    adapter = adapterOf(chunk) ?? adapter;
  }
  return { text, finish, adapter };
}

/** The adapter that answered, as reported by a chunk ("v3", "base") or null. */
function adapterOf(chunk) {
  if (!chunk || typeof chunk !== "object") return null;
  if (chunk.adapter_version !== undefined && chunk.adapter_version !== null) {
    return `v${chunk.adapter_version}`;
  }
  if (chunk.adapter_version === null && "adapter_version" in chunk) return "base";
  // The OpenAI-surface model id: user:<id>:v<N> or user:<id>:base.
  const match = typeof chunk.model === "string" ? chunk.model.match(/:(v\d+|base)$/) : null;
  return match ? match[1] : null;
}

// --- chat -----------------------------------------------------------------------------------------

function resetChat() {
  if (state.chat.abort) state.chat.abort.abort();
  state.chat = { messages: [], abort: null };
  $("chat-log").replaceChildren();
  showError("chat-error", null);
}

function chatBubble(role, text) {
  const label = role === "user" ? "You" : "Assistant";
  const body = h("p", { cls: "bubble-text", text });
  const meta = h("p", { cls: "bubble-meta" });
  const item = h("li", { cls: `bubble ${role}`, attrs: { "data-role": role } },
    h("span", { cls: "bubble-who", text: label }), body, meta);
  $("chat-log").append(item);
  item.scrollIntoView({ block: "end" });
  return { item, body, meta };
}

async function onChatSubmit(event) {
  event.preventDefault();
  const input = $("chat-input");
  const content = input.value;
  showError("chat-error", null);
  if (!content.trim()) {
    $("chat-error").textContent = "Type a message first.";
    input.focus();
    return;
  }
  if (state.chat.abort) return;
  const adapter = document.querySelector("input[name=chat-adapter]:checked").value;
  state.chat.messages.push({ role: "user", content });
  chatBubble("user", content);
  input.value = "";
  const reply = chatBubble("assistant", "");
  reply.item.classList.add("streaming");
  const log = $("chat-log");
  log.setAttribute("aria-busy", "true"); // announce the answer once, not token by token
  const controller = new AbortController();
  state.chat.abort = controller;
  setChatBusy(true);
  const body = {
    messages: state.chat.messages.slice(),
    max_tokens: numberField("chat-max-tokens") ?? 64,
    temperature: Number($("chat-temperature").value || 0),
    adapter,
  };
  try {
    const result = await generate(body, (piece) => reply.body.append(piece), controller.signal);
    if (result.text) state.chat.messages.push({ role: "assistant", content: result.text });
    reply.meta.textContent = `${servedBy(result.adapter, adapter)} · ${result.finish || "done"}`;
  } catch (err) {
    if (err.name === "AbortError") {
      const partial = reply.body.textContent;
      if (partial) state.chat.messages.push({ role: "assistant", content: partial });
      reply.meta.textContent = "stopped";
    } else {
      state.chat.messages.pop();
      reply.item.classList.add("failed");
      reply.meta.textContent = "failed";
      showError("chat-error", err);
    }
  } finally {
    reply.item.classList.remove("streaming");
    log.setAttribute("aria-busy", "false");
    state.chat.abort = null;
    setChatBusy(false);
    input.focus();
  }
}

function setChatBusy(busy) {
  $("chat-send").disabled = busy;
  $("chat-stop").disabled = !busy;
}

function onChatKey(event) {
  if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
    event.preventDefault();
    $("chat-form").requestSubmit();
  }
}

/** Who answered, in words: "personalized v3", "base model", or base because there is no adapter. */
function servedBy(reported, requested) {
  if (reported && reported !== "base") return `personalized ${reported}`;
  if (requested === "active" && (reported === "base" || !state.user?.active_adapter_version)) {
    return "base model (no active adapter yet)";
  }
  return requested === "base" || reported === "base" ? "base model" : "personalized";
}

// --- compare and pick -----------------------------------------------------------------------------

function resetCompare() {
  state.compare = { answers: [], prompt: "", idempotencyKey: null, busy: false };
  for (const side of ["a", "b"]) {
    $(`answer-${side}-text`).textContent = "";
    $(`answer-${side}-source`).textContent = "";
    $(`answer-${side}`).classList.remove("chosen");
  }
  setPickEnabled(false, false);
  $("pick-result").textContent = "";
  showError("compare-error", null);
}

function setPickEnabled(picks, neither) {
  $("pick-a").disabled = !picks;
  $("pick-b").disabled = !picks;
  $("pick-neither").disabled = !neither;
}

/** The two generation requests to compare, with what each one is. */
function compareSources(mode, activeVersion) {
  if (mode === "base-active" && activeVersion) {
    return [
      { label: "base model", adapter: "base", temperature: 0 },
      { label: `personalized v${activeVersion}`, adapter: "active", temperature: 0 },
    ];
  }
  const label = activeVersion ? `personalized v${activeVersion}` : "base model";
  return [
    { label: `${label}, sample 1`, adapter: "active", temperature: 0.9 },
    { label: `${label}, sample 2`, adapter: "active", temperature: 0.9 },
  ];
}

async function onCompareSubmit(event) {
  event.preventDefault();
  if (state.compare.busy) return;
  const prompt = $("compare-prompt").value;
  resetCompare();
  if (!prompt.trim()) {
    $("compare-error").textContent = "Type a prompt first.";
    $("compare-prompt").focus();
    return;
  }
  await refreshUser();
  const mode = $("compare-mode").value;
  const active = state.user ? state.user.active_adapter_version : null;
  let sources = compareSources(mode, active);
  if (mode === "base-active" && !active) {
    announce("No adapter yet: comparing two samples of the base model instead.");
  }
  if ($("compare-blind").checked && Math.random() < 0.5) sources = [sources[1], sources[0]];
  state.compare = { answers: [], prompt, idempotencyKey: newIdempotencyKey(), busy: true };
  $("compare-run").disabled = true;
  $("answers").setAttribute("aria-busy", "true");
  try {
    for (const [i, source] of sources.entries()) {
      const side = i === 0 ? "a" : "b";
      const target = $(`answer-${side}-text`);
      target.classList.add("streaming");
      const result = await generate(
        { prompt, max_tokens: numberField("compare-max-tokens") ?? 64, temperature: source.temperature,
          adapter: source.adapter },
        (piece) => target.append(piece),
      );
      target.classList.remove("streaming");
      state.compare.answers.push({ ...source, text: result.text });
      if (!$("compare-blind").checked) $(`answer-${side}-source`).textContent = `(${source.label})`;
    }
    finishCompare();
  } catch (err) {
    showError("compare-error", err);
    setPickEnabled(false, true);
  } finally {
    for (const side of ["a", "b"]) $(`answer-${side}-text`).classList.remove("streaming");
    state.compare.busy = false;
    $("compare-run").disabled = false;
    $("answers").setAttribute("aria-busy", "false");
  }
}

function finishCompare() {
  const [a, b] = state.compare.answers;
  if (a.text.trim() === b.text.trim() || !a.text.trim() || !b.text.trim()) {
    $("pick-result").textContent =
      "The two answers are the same (or empty), so there is nothing to pick. Try two samples or another prompt.";
    setPickEnabled(false, true);
    return;
  }
  $("pick-result").textContent = "Which answer is better?";
  setPickEnabled(true, true);
  $("pick-a").focus();
}

async function pick(winner) {
  const [a, b] = state.compare.answers;
  const [chosen, rejected] = winner === "a" ? [a, b] : [b, a];
  setPickEnabled(false, false);
  try {
    const body = {
      prompt: state.compare.prompt,
      chosen: chosen.text,
      rejected: rejected.text,
      metadata: { source: "playground", chosen_from: chosen.label, rejected_from: rejected.label },
    };
    const stored = await state.api.post(userPath("/feedback"), body, {
      headers: { "Idempotency-Key": state.compare.idempotencyKey },
    });
    revealSources();
    await refreshUser();
    const pairId = stored && stored.pairs && stored.pairs[0] ? ` #${stored.pairs[0].id}` : "";
    const n = state.user ? state.user.pair_count : null;
    const count = n === null ? "" : ` You now have ${n} pair${n === 1 ? "" : "s"}.`;
    $(`answer-${winner}`).classList.add("chosen");
    $("pick-result").textContent =
      `Saved pair${pairId}: answer ${winner.toUpperCase()} (${chosen.label}) preferred.${count}`;
    loadPairs();
  } catch (err) {
    showError("compare-error", err);
    setPickEnabled(true, true);
  }
}

function pickNeither() {
  revealSources();
  setPickEnabled(false, false);
  $("pick-result").textContent = "Skipped: nothing was stored. Generate again for a new pair.";
  $("compare-prompt").focus();
}

function revealSources() {
  state.compare.answers.forEach((answer, i) => {
    $(`answer-${i === 0 ? "a" : "b"}-source`).textContent = `(${answer.label})`;
  });
}

async function loadPairs() {
  const target = $("pairs-list");
  try {
    const body = await state.api.get(userPath("/feedback?limit=5"));
    const pairs = list(body);
    if (!pairs.length) {
      target.replaceChildren(h("li", { cls: "hint", text: "No pairs yet." }));
      return;
    }
    target.replaceChildren(...pairs.map(pairItem));
  } catch (err) {
    target.replaceChildren(h("li", { cls: "error", text: err.describe ? err.describe() : err }));
  }
}

function pairItem(pair) {
  const turns = Array.isArray(pair.messages) ? pair.messages : [];
  const prompt = [...turns].reverse().find((m) => m.role === "user");
  const row = (label, text, cls) =>
    h("div", { cls: `pair-row ${cls}` }, h("span", { cls: "pair-label", text: label }),
      h("span", { cls: "pair-text", text }));
  return h("li", { cls: "pair", attrs: { "data-pair-id": pair.id } },
    row("Prompt", prompt ? prompt.content : "", "prompt"),
    row("Chosen", pair.chosen, "chosen"),
    row("Rejected", pair.rejected, "rejected"));
}

// --- training -------------------------------------------------------------------------------------

function trainingBody() {
  const hyperparameters = {};
  for (const name of ["epochs", "max_steps", "batch_size", "base_max_new_tokens"]) {
    const value = numberField(`hp-${name}`);
    if (value !== undefined) hyperparameters[name] = Math.trunc(value);
  }
  for (const name of ["learning_rate", "beta", "anchor_weight"]) {
    const value = numberField(`hp-${name}`);
    if (value !== undefined) hyperparameters[name] = value;
  }
  const rank = $("hp-lora_rank").value;
  if (rank) hyperparameters.lora_rank = Number(rank);
  const body = { method: $("train-method").value };
  if (Object.keys(hyperparameters).length) body.hyperparameters = hyperparameters;
  return body;
}

async function onTrainSubmit(event) {
  event.preventDefault();
  showError("train-error", null);
  $("train-start").disabled = true;
  try {
    const job = await state.api.post(userPath("/train"), trainingBody());
    const fresh = !state.training.job || state.training.job.id !== job.id;
    announce(fresh ? `Training job ${job.id} ${job.status}` : `A job is already ${job.status}`);
    followJob(job);
    loadJobsTableOnly();
    refreshUser();
  } catch (err) {
    showError("train-error", err);
  } finally {
    $("train-start").disabled = false;
  }
}

async function onCancelJob() {
  const job = state.training.job;
  if (!job) return;
  $("train-cancel").disabled = true;
  try {
    renderJob(await state.api.post(userPath(`/train/jobs/${seg(job.id)}/cancel`)));
    announce("Cancellation requested");
  } catch (err) {
    showError("job-error", err);
  }
}

async function loadTraining() {
  await Promise.all([loadJobs(), loadAdapters()]);
}

async function loadJobs() {
  const tbody = $("jobs-table").querySelector("tbody");
  try {
    const jobs = list(await state.api.get(userPath("/train/jobs?limit=10")));
    tbody.replaceChildren(...jobs.map(jobRow));
    const latest = jobs[0];
    const following = state.training.job;
    if (latest && (!following || following.id !== latest.id)) followJob(latest);
    else if (!latest) renderJob(null);
  } catch (err) {
    showError("train-error", err);
  }
}

function jobRow(job) {
  return h("tr", {},
    h("td", { cls: "mono", text: job.id }),
    h("td", {}, statusBadge(job.status)),
    h("td", { text: job.method }),
    h("td", { text: job.pair_count }),
    h("td", { text: job.adapter_version ? `v${job.adapter_version}` : "—" }),
    h("td", { text: when(job.created_at) }));
}

function statusBadge(status) {
  return h("span", { cls: `badge status-${status}`, text: status });
}

/** Show `job` and, while it is not finished, poll it and its events. */
function followJob(job) {
  const same = state.training.job && state.training.job.id === job.id;
  if (!same) {
    stopPolling();
    state.training.after = null;
    state.training.steps = [];
  }
  state.training.job = job;
  renderJob(job);
  renderCharts();
  pollOnce();
}

function stopPolling() {
  clearTimeout(state.training.timer);
  state.training.timer = null;
}

async function pollOnce() {
  const job = state.training.job;
  if (!job || !state.api || state.screen !== "training") return;
  stopPolling();
  try {
    await fetchEvents(job.id);
    const fresh = await state.api.get(userPath(`/train/jobs/${seg(job.id)}`));
    if (state.training.job?.id !== fresh.id) return;
    const wasRunning = !FINISHED.has(state.training.job.status);
    state.training.job = fresh;
    renderJob(fresh);
    renderCharts();
    if (FINISHED.has(fresh.status)) {
      if (wasRunning) await onJobFinished(fresh);
      return;
    }
  } catch (err) {
    showError("job-error", err);
  }
  if (state.training.job?.id === job.id) state.training.timer = setTimeout(pollOnce, POLL_MS);
}

async function fetchEvents(jobId) {
  for (let page = 0; page < 20; page += 1) {
    const after = state.training.after !== null ? `&after=${seg(state.training.after)}` : "";
    const body = await state.api.get(
      userPath(`/train/jobs/${seg(jobId)}/events?kind=step&limit=100${after}`));
    for (const event of list(body)) {
      state.training.steps.push({ step: event.step ?? event.data.step, ...event.data });
    }
    if (body.next_cursor) state.training.after = body.next_cursor;
    if (!body.has_more) return;
  }
}

async function onJobFinished(job) {
  const message = {
    succeeded: job.adapter_version
      ? `Training finished: adapter v${job.adapter_version}` : "Training finished",
    failed: `Training failed: ${job.error || "unknown error"}`,
    cancelled: "Training cancelled",
  }[job.status];
  announce(message);
  await Promise.all([loadAdapters(), refreshUser(), loadJobsTableOnly()]);
}

async function loadJobsTableOnly() {
  try {
    const jobs = list(await state.api.get(userPath("/train/jobs?limit=10")));
    $("jobs-table").querySelector("tbody").replaceChildren(...jobs.map(jobRow));
  } catch (err) {
    showError("train-error", err);
  }
}

function renderJob(job) {
  $("job-empty").hidden = Boolean(job);
  $("job-body").hidden = !job;
  $("train-cancel").disabled = !job || FINISHED.has(job.status);
  if (!job) return;
  $("job-id").textContent = job.id;
  const badge = $("job-status");
  badge.textContent = job.status;
  badge.className = `badge status-${job.status}`;
  $("job-phase").textContent = job.phase || (FINISHED.has(job.status) ? "done" : "waiting for a worker");
  $("job-progress").value = Math.max(0, Math.min(1, Number(job.progress) || 0));
  $("job-progress").textContent = `${Math.round((Number(job.progress) || 0) * 100)}%`;
  const steps = state.training.steps;
  $("job-step").textContent = steps.length ? String(steps[steps.length - 1].step) : "—";
  $("job-adapter").textContent = adapterSummary(job);
  $("job-error").textContent = job.error ? `Error: ${job.error}` : "";
}

function adapterSummary(job) {
  if (!job.adapter_version) return "—";
  const gate = job.gate;
  if (gate && gate.passed === false) {
    return `v${job.adapter_version} (not activated: ${gate.reason || "failed the retention gate"})`;
  }
  return `v${job.adapter_version}`;
}

function series(name, label, className) {
  const points = state.training.steps
    .filter((s) => typeof s[name] === "number" && Number.isFinite(s[name]))
    .map((s) => ({ x: s.step, y: s[name] }));
  return { label, className, points };
}

function renderCharts() {
  drawChart($("chart-loss"), [
    series("loss", "loss", "s1"),
    series("dpo_loss", "DPO", "s2"),
    series("anchor_loss", "anchor", "s3"),
  ], { title: "Loss" });
  drawChart($("chart-accuracy"), [series("reward_accuracy", "accuracy", "s1")],
    { title: "Reward accuracy", yRange: [0, 1] });
  drawChart($("chart-anchor"), [series("anchor_logratio", "log-ratio", "s4")],
    { title: "Anchor drift (base log-ratio)", zeroLine: true });
}

// --- adapters -------------------------------------------------------------------------------------

async function loadAdapters() {
  showError("adapters-error", null);
  const tbody = $("adapters-table").querySelector("tbody");
  try {
    const body = await state.api.get(userPath("/adapters"));
    const adapters = list(body);
    adapters.sort((x, y) => y.version - x.version);
    const active = body && "active_version" in body ? body.active_version : activeVersion(adapters);
    tbody.replaceChildren(...adapters.map((a) => adapterRow(a, active)));
    $("adapters-empty").hidden = adapters.length > 0;
    $("use-base").disabled = !active;
  } catch (err) {
    showError("adapters-error", err);
  }
}

function activeVersion(adapters) {
  const flagged = adapters.find((a) => a.active === true || a.is_active === true);
  if (flagged) return flagged.version;
  return state.user ? state.user.active_adapter_version : null;
}

/** Evaluation numbers of an adapter, wherever its metrics keep them. */
function evaluation(adapter) {
  const m = adapter.metrics || adapter.evaluation || {};
  const pick = (...values) => values.find((v) => typeof v === "number" && Number.isFinite(v));
  const retention = m.knowledge_retention || m.retention || {};
  const gate = adapter.gate || m.gate || {};
  const heldout = pick(m.heldout_preference_accuracy, m.preference_accuracy);
  return {
    preference: heldout ?? pick(m.train_reward_accuracy, m.reward_accuracy),
    preferenceSplit: heldout === undefined ? "train" : "held-out",
    retentionDelta: pick(retention.delta, m.retention_delta, gate.retention_delta),
    retentionAdapter: pick(retention.adapter?.accuracy, m.retention_accuracy),
    retentionBase: pick(retention.base?.accuracy, m.base_accuracy),
    drift: pick(gate.anchor_logratio, m.anchor_logratio, m.anchor_drift,
      m.heldout_anchor_logratio, m.train_anchor_logratio),
    gatePassed: pick(adapter.gate_passed === undefined ? undefined : Number(adapter.gate_passed),
      gate.passed === undefined ? undefined : Number(gate.passed)),
    gateReason: adapter.gate_reason || gate.reason || null,
    // The gate's figures (adapters gated before they were recorded have none of these).
    retentionStderr: pick(gate.retention_stderr, retention.delta_stderr),
    retentionThreshold: pick(gate.retention_threshold),
    retentionZ: pick(gate.retention_z),
    questions: pick(gate.mc_questions, retention.questions, retention.adapter?.n),
    degenerate: pick(gate.degenerate_fraction, retention.fluency?.adapter_degenerate_fraction),
    baseDegenerate: pick(gate.base_degenerate_fraction,
      retention.fluency?.base_degenerate_fraction),
    maxDegenerate: pick(gate.max_degenerate_fraction),
    prompts: pick(gate.gate_prompts, retention.fluency?.prompts),
  };
}

function pct(value) {
  return typeof value === "number" ? `${(value * 100).toFixed(1)}%` : "—";
}

function signedPct(value) {
  if (typeof value !== "number") return "—";
  return `${value >= 0 ? "+" : ""}${(value * 100).toFixed(1)} pts`;
}

function points(value) {
  return typeof value === "number" ? `${(value * 100).toFixed(1)} pts` : "—";
}

/** "base → adapter (change ± paired stderr, n questions; fails below threshold, z)". */
function knowledgeText(e) {
  if (e.retentionAdapter === undefined) return signedPct(e.retentionDelta);
  const accuracy = e.retentionBase !== undefined
    ? `${pct(e.retentionBase)} → ${pct(e.retentionAdapter)}` : pct(e.retentionAdapter);
  if (e.retentionStderr === undefined) return `${accuracy} (${signedPct(e.retentionDelta)} vs base)`;
  const n = e.questions === undefined ? "" : `, ${e.questions} questions`;
  const limit = e.retentionThreshold === undefined ? ""
    : `; fails below ${signedPct(e.retentionThreshold)}`
      + (e.retentionZ === undefined ? "" : `, z = ${e.retentionZ}`);
  return `${accuracy} (${signedPct(e.retentionDelta)} ± ${points(e.retentionStderr)}${n}${limit})`;
}

/** "adapter share vs base share of degenerate answers (n prompts; fails above max)". */
function degenerateText(e) {
  if (e.degenerate === undefined) return "—";
  const base = e.baseDegenerate === undefined ? "" : ` vs base ${pct(e.baseDegenerate)}`;
  const details = [];
  if (e.prompts !== undefined) details.push(`${e.prompts} prompts`);
  if (e.maxDegenerate !== undefined) details.push(`fails above ${pct(e.maxDegenerate)}`);
  return `${pct(e.degenerate)}${base}${details.length ? ` (${details.join("; ")})` : ""}`;
}

function adapterRow(adapter, active) {
  const e = evaluation(adapter);
  const isActive = adapter.version === active;
  const retention = knowledgeText(e);
  const gate = e.gatePassed === undefined ? "—"
    : e.gatePassed ? "passed" : `failed${e.gateReason ? `: ${e.gateReason}` : ""}`;
  let action = null;
  if (!isActive) {
    const verb = active && adapter.version < active ? "Roll back to" : "Activate";
    action = h("button", {
      cls: "secondary small",
      text: `${verb} v${adapter.version}`,
      attrs: { type: "button", "data-version": adapter.version },
    });
    action.addEventListener("click", () => activate(adapter.version, action));
  }
  return h("tr", { attrs: { "data-version": adapter.version, "data-active": isActive } },
    h("th", { text: `v${adapter.version}`, attrs: { scope: "row" } }),
    h("td", { text: when(adapter.created_at) }),
    h("td", { text: e.preference === undefined ? "—" : `${pct(e.preference)} (${e.preferenceSplit})` }),
    h("td", { cls: "wrap", text: retention, attrs: { "data-testid": "adapter-knowledge" } }),
    h("td", { cls: "wrap", text: degenerateText(e), attrs: { "data-testid": "adapter-degenerate" } }),
    h("td", { text: e.drift === undefined ? "—" : `${fmt(e.drift)} nats` }),
    h("td", { cls: "wrap", text: gate }),
    h("td", {}, isActive ? h("span", { cls: "badge status-succeeded", text: "active" })
      : h("span", { text: adapter.available === false ? "files missing" : "available" })),
    h("td", {}, action));
}

/** Activate version N, or "base" to serve the base model. */
async function activate(version, button) {
  button.disabled = true;
  showError("adapters-error", null);
  const selector = version === "base" ? "base" : `v${version}`;
  try {
    await state.api.post(userPath(`/adapters/${seg(selector)}/activate`));
    announce(version === "base" ? "Serving the base model (no adapter)"
      : `Adapter v${version} is now active`);
    await refreshUser();
    await loadAdapters();
  } catch (err) {
    showError("adapters-error", err);
    button.disabled = false;
  }
}

// --- operator -------------------------------------------------------------------------------------

async function loadUsers({ more = false } = {}) {
  if (!state.operator) return;
  showError("users-error", null);
  const tbody = $("users-table").querySelector("tbody");
  const cursor = more && state.operatorView.cursor ? `&cursor=${seg(state.operatorView.cursor)}` : "";
  try {
    const body = await state.api.get(`/users?limit=20${cursor}`);
    const rows = await Promise.all(list(body).map(userRow));
    if (more) tbody.append(...rows);
    else tbody.replaceChildren(...rows);
    state.operatorView.cursor = body.next_cursor || null;
    $("users-more").hidden = !body.has_more;
    if (!rows.length && !more) {
      tbody.replaceChildren(h("tr", {}, h("td", { text: "No users yet.", attrs: { colspan: 6 } })));
    }
  } catch (err) {
    showError("users-error", err);
  }
}

async function userRow(user) {
  const base = `/users/${seg(user.id)}`;
  const [jobs, adapters] = await Promise.all([
    state.api.get(`${base}/train/jobs?limit=1`).then(list, () => null),
    state.api.get(`${base}/adapters`).then(list, () => null),
  ]);
  const job = jobs && jobs[0];
  const versions = adapters
    ? adapters.map((a) => `v${a.version}`).join(", ") || "none"
    : "—";
  const open = h("button", { cls: "secondary small", text: `Open ${user.id}`,
    attrs: { type: "button" } });
  open.addEventListener("click", async () => {
    addToPicker(user.id);
    await selectUser(user.id);
    go("training");
  });
  return h("tr", { attrs: { "data-user": user.id } },
    h("th", { cls: "mono", text: user.id, attrs: { scope: "row" } }),
    h("td", { text: user.pair_count }),
    h("td", { text: user.active_adapter_version ? `v${user.active_adapter_version}` : "—" }),
    h("td", {}, job ? statusBadge(job.status) : h("span", { text: "—" })),
    h("td", { text: versions }),
    h("td", {}, open));
}

async function onCreateUser(event) {
  event.preventDefault();
  showError("create-user-error", null);
  const id = $("new-user-id").value.trim();
  try {
    const created = await state.api.post("/users", id ? { id } : {});
    $("new-key-user").textContent = created.id;
    $("new-key-value").textContent = created.api_key;
    $("new-key").hidden = false;
    $("new-user-id").value = "";
    addToPicker(created.id);
    if (!state.userId) await selectUser(created.id);
    announce(`Created user ${created.id}`);
    await loadUsers();
  } catch (err) {
    showError("create-user-error", err);
  }
}

// --- wiring ---------------------------------------------------------------------------------------

function wire() {
  $("signin-form").addEventListener("submit", onSignInSubmit);
  $("sign-out").addEventListener("click", signOut);
  $("user-pick").addEventListener("change", async (e) => {
    await selectUser(e.target.value);
    showScreen(state.screen);
  });
  for (const name of SCREENS) {
    const tab = $(`tab-${name}`);
    tab.addEventListener("click", () => {
      location.hash = name;
    });
    tab.addEventListener("keydown", onTabKey);
  }
  window.addEventListener("hashchange", () => state.api && route());
  $("chat-form").addEventListener("submit", onChatSubmit);
  $("chat-input").addEventListener("keydown", onChatKey);
  $("chat-stop").addEventListener("click", () => state.chat.abort?.abort());
  $("chat-clear").addEventListener("click", () => {
    resetChat();
    $("chat-input").focus();
  });
  $("compare-form").addEventListener("submit", onCompareSubmit);
  $("pick-a").addEventListener("click", () => pick("a"));
  $("pick-b").addEventListener("click", () => pick("b"));
  $("pick-neither").addEventListener("click", pickNeither);
  $("train-form").addEventListener("submit", onTrainSubmit);
  $("train-cancel").addEventListener("click", onCancelJob);
  $("use-base").addEventListener("click", (e) => activate("base", e.currentTarget));
  $("create-user-form").addEventListener("submit", onCreateUser);
  $("users-refresh").addEventListener("click", () => loadUsers());
  $("users-more").addEventListener("click", () => loadUsers({ more: true }));
  renderCharts();
}

wire();
restoreSession();
