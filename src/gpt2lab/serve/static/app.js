// gpt2lab explorer: plain JavaScript over the server's JSON routes, no build step.
// Every piece of model or user text goes into the page with textContent / text nodes,
// never innerHTML: a prompt or token holding "<script>" shows as those characters.
"use strict";

const LENS_PAGE = 64; // lens grid columns drawn at once (long prompts page through)
const ATT_CELL = 24; // css pixels per attention cell for short prompts
const ATT_MAX_PX = 480; // attention maps never grow beyond this

const state = {
  info: null,
  modelId: null,
  tokens: [],
  lens: null,
  lensStart: 0,
  position: -1,
  runId: 0,
  attId: 0, // the latest attention / neuron request: older answers are dropped
  neuronId: 0,
  genAbort: null,
};

// ---- small helpers ------------------------------------------------------------------
const $ = (id) => document.getElementById(id);

function el(tag, props = {}, children = []) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(props)) {
    if (key === "text") node.textContent = value;
    else if (key === "class") node.className = value;
    else if (key === "data") Object.assign(node.dataset, value);
    else if (key === "style") Object.assign(node.style, value);
    else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else node.setAttribute(key, value);
  }
  for (const child of children) node.append(child);
  return node;
}

function clear(node) {
  node.replaceChildren();
}

// How a token's text shows in a cell: whitespace made visible, the rest as it is.
function shown(text) {
  if (text === "") return "∅";
  return text.replace(/\n/g, "↵").replace(/\t/g, "⇥").replace(/ /g, "·");
}

function pct(p) {
  if (p > 0 && p < 0.001) return (100 * p).toExponential(0) + "%";
  return (100 * p).toFixed(p >= 0.1 ? 0 : 1) + "%";
}

// probability -> background colour (white to blue) and a readable text colour
function heat(p) {
  const light = 100 - 58 * Math.max(0, Math.min(1, p));
  return { background: `hsl(212, 85%, ${light}%)`, color: light < 62 ? "#fff" : "#111" };
}

// patching value (0 = corrupted, 1 = clean; may leave [0, 1]) -> diverging colour
function diverging(v) {
  const x = Math.max(-1, Math.min(1, v));
  const hue = x >= 0 ? 212 : 4;
  const light = 100 - 55 * Math.abs(x);
  return { background: `hsl(${hue}, 80%, ${light}%)`, color: light < 62 ? "#fff" : "#111" };
}

function setStatus(text) {
  $("status").textContent = text;
}

function showError(err) {
  const box = $("error");
  if (!err) {
    box.hidden = true;
    box.textContent = "";
    return;
  }
  box.hidden = false;
  box.textContent = err.message || String(err);
}

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = $("api-key").value.trim();
  if (key) h.Authorization = "Bearer " + key;
  return h;
}

async function errorOf(response) {
  let message = `${response.status} ${response.statusText}`;
  try {
    const body = await response.json();
    if (body && body.error && body.error.message) message = body.error.message;
  } catch (e) {
    /* not JSON: keep the status line */
  }
  return new Error(message);
}

async function api(path, body) {
  const init = body === undefined
    ? { headers: headers() }
    : { method: "POST", headers: headers(), body: JSON.stringify(body) };
  const response = await fetch(path, init);
  if (!response.ok) throw await errorOf(response);
  return response.json();
}

function promptBody(extra = {}) {
  return { prompt: $("prompt").value, prepend_bos: $("prepend-bos").checked, ...extra };
}

function fillSelect(select, options, keep = true) {
  const old = select.value;
  clear(select);
  for (const [value, label] of options) select.append(el("option", { value, text: label }));
  if (keep && [...select.options].some((o) => o.value === old)) select.value = old;
}

// ---- start-up ----------------------------------------------------------------------
async function loadInfo() {
  try {
    state.info = await api("/v1/interp/info");
  } catch (err) {
    $("model-info").textContent = "cannot reach the server: " + err.message;
    return;
  }
  try {
    const models = await api("/v1/models");
    state.modelId = models.data && models.data.length ? models.data[0].id : null;
  } catch (err) {
    state.modelId = null; // completions will say what is wrong
  }
  const m = state.info.model;
  $("model-info").textContent =
    `${state.modelId || "model"}: ${m.n_layers} layers, ${m.n_heads} heads, d_model ${m.d_model}, ` +
    `context ${m.n_ctx}, prompts up to ${state.info.max_prompt_tokens} tokens`;
  const layers = [...Array(m.n_layers).keys()].map((l) => [String(l), `${l}`]);
  fillSelect($("att-layer"), layers);
  fillSelect($("att-head"), [["", "all"], ...[...Array(m.n_heads).keys()].map((h) => [String(h), `${h}`])]);
  fillSelect($("neuron-layer"), [["", "all"], ...layers]);
  fillSelect($("steer-layer"), layers);
  $("steer-layer").value = String(Math.floor(m.n_layers / 2));
  fillSelect($("patch-site"), state.info.patch_sites.map((s) => [s, s]));
  if (state.info.tuned_lens) $("lens-kind").append(el("option", { value: "tuned", text: "tuned lens" }));
  for (const v of state.info.steering) {
    $("steer-source").append(el("option", { value: "name:" + v.name, text: `${v.name} (${v.hooks.join(", ")})` }));
  }
  document.body.dataset.ready = "1";
}

// ---- run a prompt --------------------------------------------------------------------
async function runPrompt() {
  const run = ++state.runId;
  showError(null);
  setStatus("running…");
  document.body.dataset.run = "busy";
  try {
    const [tokens, next, lens] = await Promise.all([
      api("/v1/interp/tokens", promptBody()),
      api("/v1/interp/next_token", promptBody({ k: 10 })),
      api("/v1/interp/lens", promptBody({ k: 5, lens: $("lens-kind").value })),
    ]);
    if (run !== state.runId) return; // a newer run started meanwhile
    state.tokens = tokens.tokens;
    state.position = tokens.tokens.length - 1;
    state.lens = lens;
    state.lensStart = Math.max(0, Math.floor(state.position / LENS_PAGE) * LENS_PAGE);
    renderTokens();
    renderNext(next.top);
    renderLens();
    await Promise.all([loadAttention(), loadNeurons()]);
    if (run !== state.runId) return;
    setStatus(`${tokens.n_tokens} tokens`);
    document.body.dataset.run = "done";
  } catch (err) {
    if (run !== state.runId) return;
    showError(err);
    setStatus("");
    document.body.dataset.run = "error";
  }
}

function renderTokens() {
  const strip = $("token-strip");
  clear(strip);
  $("token-count").textContent = `(${state.tokens.length})`;
  const frag = document.createDocumentFragment();
  state.tokens.forEach((t, i) => {
    frag.append(el("span", {
      class: "token" + (i === state.position ? " selected" : ""),
      text: t.text,
      title: `position ${i} · id ${t.id} · characters ${t.start}–${t.end}`,
      data: { pos: String(i), id: String(t.id) },
    }));
  });
  strip.append(frag);
  fillSelect($("neuron-pos"), state.tokens.map((t, i) => [String(i), `${i}: ${shown(t.text)}`]), false);
  $("neuron-pos").value = String(state.position);
}

function selectPosition(pos) {
  state.position = pos;
  for (const node of $("token-strip").querySelectorAll(".token.selected")) node.classList.remove("selected");
  const node = $("token-strip").querySelector(`.token[data-pos="${pos}"]`);
  if (node) node.classList.add("selected");
  $("neuron-pos").value = String(pos);
  loadNeurons().catch(showError);
}

function renderNext(top) {
  const table = $("next-table");
  clear(table);
  for (const t of top) {
    const bar = el("div", { class: "bar", style: { width: `${Math.max(1, 100 * t.prob)}%` } });
    table.append(el("tr", {}, [
      el("td", { class: "tok", text: shown(t.text), title: `id ${t.id}` }),
      el("td", { class: "barcell" }, [bar]),
      el("td", { class: "num", text: pct(t.prob) }),
    ]));
  }
}

// ---- lens grid -------------------------------------------------------------------------
function renderLens() {
  const lens = state.lens;
  const table = $("lens-grid");
  clear(table);
  clear($("lens-detail"));
  if (!lens) return;
  const n = lens.tokens.length;
  const start = state.lensStart;
  const stop = Math.min(n, start + LENS_PAGE);
  $("lens-range").textContent = n > LENS_PAGE ? `positions ${start}–${stop - 1} of ${n}` : `${n} positions`;
  $("lens-prev").disabled = start === 0;
  $("lens-next").disabled = stop >= n;
  const head = el("tr", {}, [el("th", { text: lens.lens })]);
  for (let p = start; p < stop; p++) {
    head.append(el("th", { class: "col", text: shown(lens.tokens[p].text), title: `position ${p} · id ${lens.tokens[p].id}` }));
  }
  const frag = document.createDocumentFragment();
  frag.append(head);
  lens.rows.forEach((label, r) => {
    const tr = el("tr", {}, [el("th", { class: "rowlabel", text: label })]);
    for (let p = start; p < stop; p++) {
      const id = lens.top_ids[r][p][0];
      const prob = lens.top_probs[r][p][0];
      const cell = el("td", {
        class: "lens-cell",
        style: heat(prob),
        title: `${label}, position ${p}: ${shown(lens.strings[id])} ${pct(prob)}`,
        data: { row: String(r), pos: String(p) },
      }, [el("span", { class: "t", text: shown(lens.strings[id]) }), el("span", { class: "p", text: pct(prob) })]);
      tr.append(cell);
    }
    frag.append(tr);
  });
  table.append(frag);
}

function showLensCell(r, p) {
  const lens = state.lens;
  const box = $("lens-detail");
  clear(box);
  for (const c of $("lens-grid").querySelectorAll("td.picked")) c.classList.remove("picked");
  const cell = $("lens-grid").querySelector(`td[data-row="${r}"][data-pos="${p}"]`);
  if (cell) cell.classList.add("picked");
  box.append(el("div", {
    class: "detail-title",
    text: `${lens.rows[r]}, position ${p} (${shown(lens.tokens[p].text)}) · entropy ${lens.entropy[r][p].toFixed(2)} nats`,
  }));
  const table = el("table", { class: "bars" });
  lens.top_ids[r][p].forEach((id, j) => {
    const prob = lens.top_probs[r][p][j];
    table.append(el("tr", {}, [
      el("td", { class: "tok", text: shown(lens.strings[id]), title: `id ${id}` }),
      el("td", { class: "barcell" }, [el("div", { class: "bar", style: { width: `${Math.max(1, 100 * prob)}%` } })]),
      el("td", { class: "num", text: pct(prob) }),
    ]));
  });
  box.append(table);
}

// ---- attention ------------------------------------------------------------------------
async function loadAttention() {
  if (!state.tokens.length) return;
  const id = ++state.attId;
  const layer = Number($("att-layer").value || 0);
  const headValue = $("att-head").value;
  const body = promptBody({ layer });
  if (headValue !== "") body.head = Number(headValue);
  $("att-note").textContent = "";
  let data;
  try {
    data = await api("/v1/interp/attention", body);
  } catch (err) {
    if (id !== state.attId) return;
    if (headValue !== "") throw err;
    // all heads of a long prompt is too much for one answer: fall back to head 0
    $("att-head").value = "0";
    data = await api("/v1/interp/attention", { ...body, head: 0 });
    $("att-note").textContent = err.message;
  }
  if (id === state.attId) renderAttention(data);
}

function renderAttention(data) {
  const box = $("attention-maps");
  clear(box);
  const n = data.tokens.length;
  const perMap = data.heads.length > 1 ? Math.min(ATT_MAX_PX / 2, ATT_CELL * n) : Math.min(ATT_MAX_PX, ATT_CELL * n);
  data.heads.forEach((h, i) => {
    const canvas = el("canvas", { class: "attention-map", width: String(n), height: String(n), data: { layer: String(data.layer), head: String(h) } });
    canvas.style.width = canvas.style.height = `${Math.max(perMap, 64)}px`;
    drawPattern(canvas, data.pattern[i]);
    canvas.addEventListener("mousemove", (ev) => {
      const rect = canvas.getBoundingClientRect();
      const q = Math.floor(((ev.clientY - rect.top) / rect.height) * n);
      const k = Math.floor(((ev.clientX - rect.left) / rect.width) * n);
      if (q < 0 || q >= n || k < 0 || k >= n) return;
      const w = k <= q ? data.pattern[i][q][k] : 0;
      $("att-hover").textContent =
        `layer ${data.layer} head ${h}: ${q} ${shown(data.tokens[q].text)} → ${k} ${shown(data.tokens[k].text)}: ${w.toFixed(4)}`;
    });
    box.append(el("figure", {}, [canvas, el("figcaption", { text: `L${data.layer} H${h}` })]));
  });
  box.dataset.rendered = String(data.heads.length);
}

// One pixel per (query, key): white = 0, dark blue = 1, on a square-root scale so that the
// spread-out weights of a long prompt stay visible; CSS scales it up (pixelated).
function drawPattern(canvas, rows) {
  const n = rows.length;
  const ctx = canvas.getContext("2d");
  const img = ctx.createImageData(n, n);
  const px = img.data;
  for (let q = 0; q < n; q++) {
    const row = rows[q];
    for (let k = 0; k < n; k++) {
      const w = k <= q ? Math.sqrt(Math.max(0, Math.min(1, row[k]))) : 0;
      const o = 4 * (q * n + k);
      px[o] = Math.round(255 - 230 * w);
      px[o + 1] = Math.round(255 - 170 * w);
      px[o + 2] = Math.round(255 - 60 * w);
      px[o + 3] = 255;
    }
  }
  ctx.putImageData(img, 0, 0);
}

// ---- neurons ----------------------------------------------------------------------------
async function loadNeurons() {
  if (!state.tokens.length) return;
  const id = ++state.neuronId;
  const body = promptBody({ position: state.position, k: 8, vocab_k: 5 });
  if ($("neuron-layer").value !== "") body.layer = Number($("neuron-layer").value);
  const data = await api("/v1/interp/neurons", body);
  if (id !== state.neuronId) return;
  const box = $("neuron-list");
  clear(box);
  box.append(el("div", { class: "detail-title", text: `position ${data.position}: ${shown(data.token.text)}` }));
  for (const n of data.neurons) {
    const chips = (items, cls) => el("span", { class: "chips" }, items.map((t) => el("span", { class: "chip " + cls, text: shown(t.text), title: `id ${t.id} · ${t.score.toFixed(3)}` })));
    box.append(el("div", { class: "neuron" }, [
      el("span", { class: "neuron-name", text: `L${n.layer} N${n.neuron}` }),
      el("span", { class: "num", text: n.activation.toFixed(3) }),
      el("span", { class: "muted", text: "promotes" }), chips(n.promotes, "up"),
      el("span", { class: "muted", text: "suppresses" }), chips(n.suppresses, "down"),
    ]));
  }
}

// ---- completions: steering playground and streamed generation ---------------------------
function numberOf(id, fallback) {
  const v = Number($(id).value);
  return Number.isFinite(v) ? v : fallback;
}

// With return_unsteered, each choice carries its unsteered twin: {"unsteered": {"text", ...}}.
function unsteeredOf(choice) {
  return choice.unsteered && typeof choice.unsteered.text === "string" ? choice.unsteered.text : null;
}

async function runSteering() {
  showError(null);
  const plain = $("steer-plain");
  const steered = $("steer-steered");
  plain.textContent = steered.textContent = "…";
  delete $("steer-section").dataset.done;
  try {
    const source = $("steer-source").value;
    const layer = Number($("steer-layer").value || 0);
    const hook = `blocks.${layer}.hook_resid_pre`;
    const spec = { coefficient: numberOf("steer-coef", 4) };
    if (source.startsWith("name:")) {
      spec.name = source.slice(5);
    } else {
      const vec = await api("/v1/interp/steering_vector", { positive: $("steer-pos").value, negative: $("steer-neg").value, hook });
      spec.hook = vec.hook;
      spec.values = vec.values;
    }
    const body = {
      model: state.modelId || "bundled",
      prompt: $("prompt").value,
      max_tokens: numberOf("steer-max", 24),
      temperature: numberOf("steer-temp", 0.8),
      seed: numberOf("steer-seed", 0),
      steering: spec,
      return_unsteered: true,
    };
    const data = await api("/v1/completions", body);
    const choice = data.choices[0];
    steered.textContent = choice.text;
    const other = unsteeredOf(choice);
    plain.textContent = other === null ? "(the server sent no unsteered continuation)" : other;
    $("steer-section").dataset.done = "1";
  } catch (err) {
    plain.textContent = steered.textContent = "";
    showError(err);
  }
}

async function runGenerate() {
  showError(null);
  const out = $("gen-out");
  clear(out);
  const promptNode = el("span", { class: "prompt-echo", text: $("prompt").value });
  const textNode = document.createTextNode("");
  out.append(promptNode, textNode);
  delete $("stream-section").dataset.done;
  const controller = new AbortController();
  state.genAbort = controller;
  $("gen-run").disabled = true;
  $("gen-stop").disabled = false;
  try {
    const response = await fetch("/v1/completions", {
      method: "POST",
      headers: headers(),
      signal: controller.signal,
      body: JSON.stringify({
        model: state.modelId || "bundled",
        prompt: $("prompt").value,
        max_tokens: numberOf("gen-max", 48),
        temperature: numberOf("gen-temp", 0.8),
        seed: numberOf("gen-seed", 0),
        stream: true,
      }),
    });
    if (!response.ok) throw await errorOf(response);
    await readEvents(response.body, (event) => {
      if (event.error) throw new Error(event.error.message || "stream error");
      for (const choice of event.choices || []) textNode.appendData(choice.text || "");
    });
    $("stream-section").dataset.done = "1";
  } catch (err) {
    if (err.name !== "AbortError") showError(err);
  } finally {
    state.genAbort = null;
    $("gen-run").disabled = false;
    $("gen-stop").disabled = true;
  }
}

// Server-sent events over fetch: "data: {json}" blocks separated by blank lines,
// ending with "data: [DONE]".
async function readEvents(stream, onEvent) {
  const reader = stream.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true }).replace(/\r\n/g, "\n");
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      const data = block.split("\n").filter((l) => l.startsWith("data:")).map((l) => l.slice(5).trimStart()).join("\n");
      if (!data) continue;
      if (data === "[DONE]") return;
      onEvent(JSON.parse(data));
    }
  }
}

// ---- activation patching ----------------------------------------------------------------
async function runPatching() {
  showError(null);
  const table = $("patch-grid");
  clear(table);
  $("patch-note").textContent = "patching…";
  try {
    const data = await api("/v1/interp/patching", {
      clean: $("patch-clean").value,
      corrupted: $("patch-corrupted").value,
      answer: $("patch-answer").value,
      wrong: $("patch-wrong").value,
      what: $("patch-site").value,
    });
    $("patch-note").textContent = data.note;
    renderPatch(data);
  } catch (err) {
    $("patch-note").textContent = "";
    showError(err);
  }
}

// rows: every axis but the last; columns: the last axis (positions or heads)
function renderPatch(data) {
  const table = $("patch-grid");
  const dims = data.dims;
  const colDim = dims[dims.length - 1];
  const rowDims = dims.slice(0, -1);
  const cols = data.labels[colDim];
  const rows = [];
  const walk = (values, labels, depth) => {
    if (depth === rowDims.length) {
      rows.push([labels.join(" "), values]);
      return;
    }
    const dim = rowDims[depth];
    values.forEach((v, i) => walk(v, [...labels, `${dim} ${data.labels[dim][i]}`], depth + 1));
  };
  if (rowDims.length === 0) rows.push([data.what, data.values]);
  else walk(data.values, [], 0);
  table.append(el("tr", {}, [el("th", { text: data.what }), ...cols.map((c) => el("th", { class: "col", text: c }))]));
  for (const [label, values] of rows) {
    table.append(el("tr", {}, [
      el("th", { class: "rowlabel", text: label }),
      ...values.map((v) => el("td", { class: "patch-cell", style: diverging(v ?? 0), text: v === null ? "–" : v.toFixed(2) })),
    ]));
  }
}

// ---- wiring --------------------------------------------------------------------------------
function wire() {
  $("run").addEventListener("click", runPrompt);
  $("prompt").addEventListener("keydown", (ev) => {
    if (ev.key === "Enter" && (ev.ctrlKey || ev.metaKey)) runPrompt();
  });
  $("token-strip").addEventListener("click", (ev) => {
    const node = ev.target.closest(".token");
    if (node) selectPosition(Number(node.dataset.pos));
  });
  $("lens-grid").addEventListener("click", (ev) => {
    const cell = ev.target.closest("td.lens-cell");
    if (cell) showLensCell(Number(cell.dataset.row), Number(cell.dataset.pos));
  });
  $("lens-prev").addEventListener("click", () => {
    state.lensStart = Math.max(0, state.lensStart - LENS_PAGE);
    renderLens();
  });
  $("lens-next").addEventListener("click", () => {
    if (state.lens && state.lensStart + LENS_PAGE < state.lens.tokens.length) state.lensStart += LENS_PAGE;
    renderLens();
  });
  $("lens-kind").addEventListener("change", () => {
    if (!state.tokens.length) return;
    api("/v1/interp/lens", promptBody({ k: 5, lens: $("lens-kind").value }))
      .then((lens) => { state.lens = lens; renderLens(); })
      .catch(showError);
  });
  $("att-layer").addEventListener("change", () => loadAttention().catch(showError));
  $("att-head").addEventListener("change", () => loadAttention().catch(showError));
  $("neuron-layer").addEventListener("change", () => loadNeurons().catch(showError));
  $("neuron-pos").addEventListener("change", () => selectPosition(Number($("neuron-pos").value)));
  $("steer-source").addEventListener("change", () => {
    const pair = $("steer-source").value === "pair";
    for (const node of document.querySelectorAll("#steer-section .pair")) node.hidden = !pair;
  });
  $("steer-run").addEventListener("click", runSteering);
  $("gen-run").addEventListener("click", runGenerate);
  $("gen-stop").addEventListener("click", () => state.genAbort && state.genAbort.abort());
  $("patch-run").addEventListener("click", runPatching);
  // a server with an API key answers 401 until one is given: retry with it
  $("api-key").addEventListener("change", () => {
    if (!state.info) loadInfo();
  });
}

wire();
loadInfo();
