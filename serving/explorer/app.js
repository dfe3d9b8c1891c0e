// Attention explorer: one image through the zoo's <model>_image models over the KServe v2 HTTP API (binary tensors).
// Nothing here names a model or an output: what to draw comes from each config's `output_kinds` (the spec's kinds),
// the classes from Triton's classification extension, the crop from the config's `preprocess` parameter.
"use strict";

const HEADER = "Inference-Header-Content-Length";
const IMAGE_SUFFIX = "_image";
const VIEW = 256; // canvas side, px: the model's input frame drawn at this size
const BOX_COLOURS = [[0, 229, 255], [255, 64, 160], [255, 214, 0], [80, 255, 80]];
const TYPED = { FP32: Float32Array, FP64: Float64Array, INT32: Int32Array, INT64: BigInt64Array, INT8: Int8Array,
                UINT8: Uint8Array, INT16: Int16Array, UINT16: Uint16Array, UINT32: Uint32Array, UINT64: BigUint64Array };

const state = {
  index: null,          // /explorer/models.json
  models: new Map(),    // image model -> {config, kinds, preprocess, error, base}
  labels: new Map(),    // image model -> class labels learned from the classification extension
  file: null,           // {name, bytes: Uint8Array, bitmap: ImageBitmap|null, decodeError}
  running: false,
  again: false,         // an image or model chosen during a run: run again when it ends
};

const $ = (sel, root = document) => root.querySelector(sel);
const el = (tag, attrs = {}, ...children) => {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "text") e.textContent = v;
    else if (k === "dataset") Object.assign(e.dataset, v);
    else if (k === "style") e.style.cssText = v; // CSSOM: allowed under the page's CSP, a style attribute is not
    else e.setAttribute(k, v);
  }
  for (const c of children) if (c != null) e.append(c);
  return e;
};

// ------------------------------------------------------------------------------------------- errors

class ServerError extends Error {
  constructor(status, message, what) {
    super(message);
    this.status = status;
    this.what = what;
  }
}

// One readable line naming the problem, for every way a request can fail.
function explain(err, what) {
  if (err instanceof ServerError) {
    const m = err.message;
    switch (err.status) {
      case 400: return `${what}: the server refused it: ${m}`;
      case 404: return `${what}: not served by this server (${m})`;
      case 413: return `${what}: too large for this server: ${m}`;
      case 415: return `${what}: unsupported encoding: ${m}`;
      case 503: return `${what}: unavailable (the model is loading, or Triton is down); try again shortly: ${m}`;
      case 504: return `${what}: the server timed out: ${m}`;
      default: return `${what}: server error ${err.status}: ${m}`;
    }
  }
  if (err instanceof TypeError) { // fetch's network failure
    return `${what}: cannot reach the server at ${location.origin} (is the front door running?): ${err.message}`;
  }
  return `${what}: ${err && err.message ? err.message : err}`;
}

function showError(text) {
  const box = $("#error");
  box.textContent = text;
  box.hidden = !text;
}

function setStatus(text) { $("#status").textContent = text; }

async function errorText(resp) {
  const body = await resp.text();
  try { return JSON.parse(body).error || body; } catch { return body.slice(0, 300) || resp.statusText; }
}

async function getJSON(path, what) {
  let resp;
  try { resp = await fetch(path, { cache: "no-store" }); } catch (e) { throw new Error(explain(e, what)); }
  if (!resp.ok) throw new ServerError(resp.status, await errorText(resp), what);
  return resp.json();
}

// ------------------------------------------------------------------------------------ v2 over HTTP

function bytesElement(u8) { // BYTES tensor element: 4-byte little-endian length, then the bytes
  const out = new Uint8Array(4 + u8.length);
  new DataView(out.buffer).setUint32(0, u8.length, true);
  out.set(u8, 4);
  return out;
}

function parseBytes(buf) {
  const out = [], view = new DataView(buf), dec = new TextDecoder();
  for (let pos = 0; pos + 4 <= buf.byteLength;) {
    const n = view.getUint32(pos, true);
    out.push(dec.decode(new Uint8Array(buf, pos + 4, n)));
    pos += 4 + n;
  }
  return out;
}

// POST one v2 inference request (binary-tensor extension); returns {outputs: name -> {shape, datatype, data}, ms}.
async function infer(model, inputs, outputs) {
  const header = JSON.stringify({
    inputs: inputs.map(i => ({ name: i.name, shape: i.shape, datatype: i.datatype,
                               parameters: { binary_data_size: i.data.byteLength } })),
    outputs, parameters: { binary_data_output: true },
  });
  const head = new TextEncoder().encode(header);
  const t0 = performance.now();
  let resp, buf;
  try {
    resp = await fetch(`/v2/models/${encodeURIComponent(model)}/infer`, {
      method: "POST", body: new Blob([head, ...inputs.map(i => i.data)]),
      headers: { "Content-Type": "application/octet-stream", [HEADER]: String(head.length) },
    });
    buf = await resp.arrayBuffer();
  } catch (e) {
    throw new Error(explain(e, model));
  }
  const ms = performance.now() - t0;
  if (!resp.ok) {
    let msg = new TextDecoder().decode(buf);
    try { msg = JSON.parse(msg).error || msg; } catch { /* not JSON: keep the text */ }
    throw new ServerError(resp.status, msg.slice(0, 400), model);
  }
  const hl = resp.headers.get(HEADER);
  const n = hl === null ? buf.byteLength : Number(hl);
  const json = JSON.parse(new TextDecoder().decode(new Uint8Array(buf, 0, n)));
  const out = {};
  let off = n;
  for (const o of json.outputs) {
    let data = o.data;
    const size = o.parameters && o.parameters.binary_data_size;
    if (size !== undefined) {
      const raw = buf.slice(off, off + size);
      off += size;
      data = o.datatype === "BYTES" ? parseBytes(raw) : new (TYPED[o.datatype] || Uint8Array)(raw);
    }
    out[o.name] = { shape: o.shape, datatype: o.datatype, data };
  }
  return { outputs: out, ms };
}

// ------------------------------------------------------------------------------------- model configs

function param(cfg, key, fallback) {
  const p = cfg.parameters && cfg.parameters[key];
  if (!p || !p.string_value) return fallback;
  try { return JSON.parse(p.string_value); } catch { return fallback; }
}

function dtypeName(t) { const d = t.replace("TYPE_", ""); return d === "STRING" ? "BYTES" : d; }

async function loadModel(name) {
  const info = { name, config: null, error: null, base: null };
  try {
    const cfg = await getJSON(`/v2/models/${encodeURIComponent(name)}/config`, name);
    info.config = cfg;
    info.kinds = param(cfg, "output_kinds", {});
    info.preprocess = param(cfg, "preprocess", null);
    info.description = (cfg.parameters && cfg.parameters.description && cfg.parameters.description.string_value) || "";
  } catch (e) {
    info.error = e instanceof ServerError ? e : new Error(String(e.message || e));
  }
  state.models.set(name, info);
  return info;
}

// The ensemble's steps: the preprocessing model, then the model itself. Its inputs beyond the image (optional
// ones with a value range, e.g. a target class) become controls; they are sent to the model directly.
async function loadBase(info) {
  if (info.base !== null) return info.base;
  info.base = false;
  const steps = (info.config.ensemble_scheduling || {}).step || [];
  if (steps.length !== 2) return false;
  const [pre, model] = steps;
  const [preOut, tensor] = Object.entries(pre.output_map || {})[0] || [];
  const imageInput = Object.keys(model.input_map || {}).find(k => model.input_map[k] === tensor);
  try {
    const cfg = await getJSON(`/v2/models/${encodeURIComponent(model.model_name)}/config`, model.model_name);
    const ranges = param(cfg, "input_ranges", {});
    const defaults = param(cfg, "input_defaults", {});
    const extras = (cfg.input || []).filter(i => i.name !== imageInput && i.optional && ranges[i.name])
      .map(i => ({ name: i.name, datatype: dtypeName(i.data_type), dims: i.dims, range: ranges[i.name],
                   default: defaults[i.name] }));
    info.base = { pre: pre.model_name, preOut, model: model.model_name, imageInput, config: cfg,
                  kinds: param(cfg, "output_kinds", {}), extras };
  } catch (e) {
    info.base = false; // the composed path still works; only the extra controls are missing
  }
  return info.base;
}

// -------------------------------------------------------------------------------------------- image

function cropBox(w, h, pre) { // training.images.crop_box: where the eval crop lies in the original
  const side = pre.resize != null ? pre.resize : Math.round(pre.size / 0.875);
  const s = side / Math.min(w, h);
  const rw = Math.max(side, Math.round(w * s)), rh = Math.max(side, Math.round(h * s));
  const x0 = Math.floor((rw - pre.size) / 2), y0 = Math.floor((rh - pre.size) / 2);
  return [x0 / rw, y0 / rh, (x0 + pre.size) / rw, (y0 + pre.size) / rh];
}

function drawBase(ctx, pre) { // the model's input frame: the centre crop of the file, grey for 1-channel models
  ctx.fillStyle = "#222";
  ctx.fillRect(0, 0, VIEW, VIEW);
  const bmp = state.file && state.file.bitmap;
  if (!bmp) return;
  const [x0, y0, x1, y1] = cropBox(bmp.width, bmp.height, pre || { size: 64, resize: 64 });
  ctx.save();
  if (pre && pre.channels === 1) ctx.filter = "grayscale(1)";
  ctx.imageSmoothingEnabled = true;
  ctx.drawImage(bmp, x0 * bmp.width, y0 * bmp.height, (x1 - x0) * bmp.width, (y1 - y0) * bmp.height, 0, 0, VIEW, VIEW);
  ctx.restore();
}

function newCanvas(cls, label) {
  const c = el("canvas", { class: cls, width: VIEW, height: VIEW, role: "img", "aria-label": label });
  return c;
}

function heatRGB(t) { // training.tasks.heat: black -> red -> yellow -> white
  const c = v => Math.round(Math.min(1, Math.max(0, v)) * 255);
  return [c(3 * t), c(3 * t - 1), c(3 * t - 2)];
}

function channelMaps(o) { // [..., H, W] -> list of {h, w, values}
  const s = o.shape.slice(1); // drop the batch axis
  const h = s[s.length - 2], w = s[s.length - 1], n = h * w, maps = [];
  for (let k = 0; k * n < o.data.length; k++) maps.push({ h, w, values: o.data.subarray(k * n, (k + 1) * n) });
  return maps;
}

function heatImage(m) {
  let lo = Infinity, hi = -Infinity;
  for (const v of m.values) { if (v < lo) lo = v; if (v > hi) hi = v; }
  const span = hi - lo || 1, img = new ImageData(m.w, m.h);
  m.values.forEach((v, i) => {
    const t = (v - lo) / span, [r, g, b] = heatRGB(t);
    img.data.set([r, g, b, Math.round(255 * (0.2 + 0.7 * t))], 4 * i);
  });
  return { img, lo, hi };
}

function scaled(imageData) { // an ImageData as a canvas, to draw scaled
  const c = document.createElement("canvas");
  c.width = imageData.width;
  c.height = imageData.height;
  c.getContext("2d").putImageData(imageData, 0, 0);
  return c;
}

function legendBar(lo, hi, what) {
  const fmt = v => (Math.abs(v) >= 1e3 || (Math.abs(v) < 1e-2 && v !== 0) ? v.toExponential(1) : v.toFixed(3));
  return el("div", { class: "legend heat-legend", "aria-label": `${what}: colour scale from ${fmt(lo)} to ${fmt(hi)}` },
    el("span", { class: "lo", text: fmt(lo) }), el("span", { class: "bar", "aria-hidden": "true" }),
    el("span", { class: "hi", text: fmt(hi) }));
}

// ------------------------------------------------------------------------------------------ drawing

function figure(title, ...children) {
  return el("figure", {}, ...children, el("figcaption", { text: title }));
}

function drawMaps(name, o, pre) {
  const figs = [];
  const maps = channelMaps(o);
  maps.forEach((m, k) => {
    const what = maps.length > 1 ? `${name}[${k}]` : name;
    const { img, lo, hi } = heatImage(m);
    const overlay = newCanvas("map", `${what} over the image`);
    overlay.dataset.output = name;
    overlay.dataset.channel = String(k);
    const ctx = overlay.getContext("2d");
    drawBase(ctx, pre);
    ctx.imageSmoothingEnabled = true;
    ctx.drawImage(scaled(img), 0, 0, VIEW, VIEW);
    // The map alone (opaque), small: the test and the eye can check that it is not flat.
    const alone = el("canvas", { class: "heat", width: m.w, height: m.h, role: "img", "aria-label": `${what} alone` });
    alone.dataset.output = name;
    alone.dataset.channel = String(k);
    const opaque = new ImageData(new Uint8ClampedArray(img.data), m.w, m.h);
    for (let i = 3; i < opaque.data.length; i += 4) opaque.data[i] = 255;
    alone.getContext("2d").putImageData(opaque, 0, 0);
    figs.push(figure(`${what} (${m.w}×${m.h} map)`, overlay, el("div", { class: "under" }, alone,
                                                                 legendBar(lo, hi, what))));
  });
  return figs;
}

function drawBoxes(name, o, pre, colourIndex) {
  const c = newCanvas("boxes", `${name}: boxes over the image`);
  const ctx = c.getContext("2d");
  drawBase(ctx, pre);
  const rgb = BOX_COLOURS[colourIndex % BOX_COLOURS.length];
  const d = o.data, boxes = [];
  for (let i = 0; i + 4 <= d.length; i += 4) {
    const b = [d[i], d[i + 1], d[i + 2], d[i + 3]];
    if (b.every(v => v === 0)) continue; // an unused slot of a fixed-size output (the Boxes kind's rule)
    boxes.push(b);
  }
  const lw = boxes.length > 8 ? 1 : 3;
  ctx.strokeStyle = `rgb(${rgb.join(",")})`;
  ctx.lineWidth = lw;
  boxes.forEach(([x0, y0, x1, y1], i) => {
    const px = [x0, y0, x1, y1].map(v => Math.round(v * VIEW));
    ctx.strokeRect(px[0] + lw / 2, px[1] + lw / 2, Math.max(1, px[2] - px[0] - lw), Math.max(1, px[3] - px[1] - lw));
    if (boxes.length <= 8) {
      ctx.fillStyle = `rgb(${rgb.join(",")})`;
      ctx.font = "bold 13px system-ui, sans-serif";
      ctx.fillText(String(i + 1), px[0] + 4, px[1] + 15);
    }
  });
  c.dataset.output = name;
  c.dataset.boxes = JSON.stringify(boxes);
  c.dataset.stroke = rgb.join(",");
  c.dataset.lineWidth = String(lw);
  const list = el("ol", { class: "box-list" });
  boxes.forEach(b => list.append(el("li", { text: `(${b.map(v => v.toFixed(3)).join(", ")})` })));
  const legend = el("div", { class: "legend" }, el("span", { class: "swatch", style: `background:rgb(${rgb.join(",")})` }),
    el("span", { text: `${name}: ${boxes.length} box${boxes.length === 1 ? "" : "es"} (x0, y0, x1, y1 of the input)` }));
  return figure(`${name} (${boxes.length} drawn)`, c, legend, boxes.length <= 8 ? list : null);
}

function drawMask(name, o, pre) {
  const s = o.shape.slice(1), C = s[0], h = s[1], w = s[2], n = h * w, d = o.data;
  const palette = state.index.palette, counts = new Array(C).fill(0);
  const img = new ImageData(w, h);
  for (let p = 0; p < n; p++) {
    let best = 0;
    for (let k = 1; k < C; k++) if (d[k * n + p] > d[best * n + p]) best = k;
    counts[best]++;
    const [r, g, b] = palette[best % palette.length];
    img.data.set([r, g, b, best === 0 ? 60 : 200], 4 * p);
  }
  const c = newCanvas("mask", `${name}: per-pixel classes over the image`);
  c.dataset.output = name;
  const ctx = c.getContext("2d");
  drawBase(ctx, pre);
  ctx.imageSmoothingEnabled = false;
  ctx.drawImage(scaled(img), 0, 0, VIEW, VIEW);
  const legend = el("ul", { class: "legend class-legend", "aria-label": `${name}: classes present` });
  counts.forEach((k, cls) => {
    if (!k) return;
    const [r, g, b] = palette[cls % palette.length];
    legend.append(el("li", { dataset: { class: String(cls), pixels: String(k) } },
      el("span", { class: "swatch", style: `background:rgb(${r},${g},${b})` }),
      el("span", { text: `class ${cls}: ${k} px (${(100 * k / n).toFixed(1)}%)` })));
  });
  return figure(`${name} (per-pixel argmax, ${C} classes)`, c, legend);
}

function softmax(xs) {
  const m = Math.max(...xs), e = xs.map(x => Math.exp(x - m)), s = e.reduce((a, b) => a + b, 0);
  return e.map(v => v / s);
}

// Top-k rows {label, index, score, p} from classification strings (score:index:label) or raw logits.
function ranked(model, o, k) {
  let rows;
  if (o.datatype === "BYTES") {
    rows = o.data.map(t => { const [score, index, ...label] = String(t).split(":");
                             return { score: Number(score), index: Number(index), label: label.join(":") }; });
    const names = state.labels.get(model) || [];
    rows.forEach(r => { names[r.index] = r.label; });
    state.labels.set(model, names);
  } else {
    const names = state.labels.get(model) || [];
    rows = Array.from(o.data, (v, i) => ({ score: v, index: i, label: names[i] ?? String(i) }));
  }
  const p = softmax(rows.map(r => r.score));
  rows.forEach((r, i) => { r.p = p[i]; });
  rows.sort((a, b) => b.score - a.score);
  return rows.slice(0, k);
}

function drawLabels(model, name, o, k, headline) {
  const rows = ranked(model, o, k);
  const list = el("ol", { class: "topk", "aria-label": `${name}: top ${rows.length} labels` });
  rows.forEach((r, i) => {
    const li = el("li", { dataset: { label: r.label, index: String(r.index), score: String(r.score) } },
      el("span", { class: "label", text: r.label }),
      el("span", { class: "bar", style: `--p:${(100 * r.p).toFixed(1)}%`, "aria-hidden": "true" }),
      el("span", { class: "score", text: `${(100 * r.p).toFixed(1)}% (logit ${r.score.toFixed(2)})` }));
    if (i === 0 && headline) li.classList.add("top-label");
    list.append(li);
  });
  return el("div", { class: "labels", dataset: { output: name } }, el("h4", { text: name }), list);
}

function drawRows(model, name, o) { // class logits of rank > 1 (per scale, per part): each row's answer
  const C = o.shape[o.shape.length - 1], names = state.labels.get(model) || [];
  const parts = [];
  for (let r = 0; r * C < o.data.length; r++) {
    const row = Array.from(o.data.subarray(r * C, (r + 1) * C)), p = softmax(row);
    const best = row.indexOf(Math.max(...row));
    parts.push(`${r}: ${names[best] ?? best} (${(100 * p[best]).toFixed(0)}%)`);
  }
  return el("p", { class: "rows", dataset: { output: name }, text: `${name}, per row: ${parts.join(" · ")}` });
}

function drawSummary(name, o) {
  let lo = Infinity, hi = -Infinity;
  for (const v of o.data) { const x = Number(v); if (x < lo) lo = x; if (x > hi) hi = x; }
  return el("p", { class: "summary", text: `${name}: shape [${o.shape.join(", ")}], range [${lo.toFixed(3)}, ${hi.toFixed(3)}]` });
}

function render(article, model, result, cfg, kinds, pre, note) {
  const k = Number($("#topk").value);
  const body = $(".body", article);
  body.replaceChildren();
  const text = el("div", { class: "text" }), figs = el("div", { class: "figures" });
  const input = newCanvas("input", "the model's input: the centre crop of the image");
  drawBase(input.getContext("2d"), pre);
  figs.append(figure("input (the model's crop)", input));
  let headline = true, boxColour = 0;
  // In the config's order (the spec's), whatever order the response lists them in.
  for (const name of cfg.output.map(o => o.name).filter(n => n in result.outputs)) {
    const o = result.outputs[name], kind = kinds[name] || "tensor", rank = o.shape.length - 1;
    if (kind === "logits" && rank === 1) { text.append(drawLabels(model, name, o, k, headline)); headline = false; }
    else if (kind === "logits") text.append(drawRows(model, name, o));
    else if (kind === "map" || kind === "saliency") figs.append(...drawMaps(name, o, pre));
    else if (kind === "boxes") figs.append(drawBoxes(name, o, pre, boxColour++));
    else if (kind === "segmentation") figs.append(drawMask(name, o, pre));
    else text.append(drawSummary(name, o));
  }
  const ms = result.ms.reduce((a, b) => a + b, 0);
  const latency = el("p", { class: "latency", dataset: { ms: ms.toFixed(1) },
    text: `served in ${ms.toFixed(1)} ms` + (result.ms.length > 1
      ? ` (${result.ms.length} requests: ${result.ms.map(v => v.toFixed(1)).join(" + ")} ms)` : " (1 request)") });
  if (note) text.prepend(el("p", { class: "note", text: note }));
  text.prepend(latency);
  body.append(text, figs);
  article.dataset.state = "done";
}

// ------------------------------------------------------------------------------------------ running

function extraValues(info) {
  if (!info.base || !info.base.extras.length) return null;
  const values = {};
  let changed = false;
  for (const x of info.base.extras) {
    const v = Number(document.getElementById(`extra-${info.name}-${x.name}`)?.value ?? x.default);
    values[x.name] = v;
    if (v !== x.default) changed = true;
  }
  return changed ? values : null;
}

async function runOne(info, article) {
  const cfg = info.config;
  const fileTensor = bytesElement(state.file.bytes);
  const extras = extraValues(info);
  if (!extras) { // the composed <model>_image: the file's bytes in, every output out
    const outputs = cfg.output.map(o => {
      const labelled = o.label_filename && (info.kinds[o.name] === "logits") && o.dims.length === 1;
      return { name: o.name, parameters: labelled ? { classification: o.dims[0], binary_data: false }
                                                   : { binary_data: true } };
    });
    const r = await infer(info.name, [{ name: cfg.input[0].name, datatype: "BYTES", shape: [1, 1], data: fileTensor }],
                          outputs);
    render(article, info.name, { outputs: r.outputs, ms: [r.ms] }, cfg, info.kinds, info.preprocess);
    return;
  }
  // With a non-default extra input (e.g. a target class), the two steps of the ensemble as two requests: the
  // served preprocessing (the same transform), then the model with the extra inputs.
  const b = info.base;
  const pre = await infer(b.pre, [{ name: cfg.input[0].name, datatype: "BYTES", shape: [1, 1], data: fileTensor }],
                          [{ name: b.preOut, parameters: { binary_data: true } }]);
  const image = pre.outputs[b.preOut];
  const inputs = [{ name: b.imageInput, datatype: "FP32", shape: image.shape,
                    data: new Uint8Array(image.data.buffer, image.data.byteOffset, image.data.byteLength) }];
  for (const x of b.extras) {
    const shape = [1, ...x.dims.map(d => (d < 0 ? 1 : d))];
    const n = shape.reduce((a, c) => a * c, 1);
    const arr = x.datatype === "INT64" ? BigInt64Array.from({ length: n }, () => BigInt(extras[x.name]))
      : new (TYPED[x.datatype] || Float32Array)(n).fill(extras[x.name]);
    inputs.push({ name: x.name, datatype: x.datatype, shape, data: new Uint8Array(arr.buffer) });
  }
  const r = await infer(b.model, inputs, b.config.output.map(o => ({ name: o.name, parameters: { binary_data: true } })));
  const set = Object.entries(extras).map(([k, v]) => `${k} = ${v}`).join(", ");
  render(article, info.name, { outputs: r.outputs, ms: [pre.ms, r.ms] }, b.config, b.kinds, info.preprocess,
         `${set}: sent as ${b.pre} then ${b.model}`);
}

function resultArticle(info) {
  const article = el("article", { class: "result", dataset: { model: info.name, file: state.file.name, state: "running" },
                                  "aria-busy": "true" },
    el("h2", { text: info.name.endsWith(IMAGE_SUFFIX) ? info.name.slice(0, -IMAGE_SUFFIX.length) : info.name }),
    info.description ? el("p", { class: "description", text: info.description }) : null,
    el("div", { class: "body" }, el("p", { class: "pending", text: "waiting for the server…" })));
  return article;
}

async function run() {
  if (!state.file) return;
  if (state.running) { state.again = true; return; }
  const choice = $("#model").value;
  const names = choice === "*" ? [...state.models.values()].filter(m => m.config).map(m => m.name) : [choice];
  if (!names.length || !names[0]) { showError("Choose a model first."); document.body.dataset.busy = "false"; return; }
  const limit = state.index.body_limit, size = state.file.bytes.length;
  if (size + 1024 > limit) { // the JSON header rides in the same body
    $("#results").replaceChildren();
    showError(`${state.file.name}: the file is too large: ${(size / 2 ** 20).toFixed(1)} MiB; this server accepts ` +
              `requests up to ${(limit / 2 ** 20).toFixed(1)} MiB.`);
    setStatus("Not sent.");
    document.body.dataset.busy = "false";
    return;
  }
  showError("");
  state.running = true;
  document.body.dataset.busy = "true";
  $("#run").disabled = true;
  const results = $("#results");
  results.replaceChildren();
  const failures = [];
  try {
    for (const [i, name] of names.entries()) {
      const info = state.models.get(name);
      const article = resultArticle(info);
      results.append(article);
      setStatus(`Running ${name} (${i + 1} of ${names.length})…`);
      try {
        await runOne(info, article);
      } catch (e) {
        const msg = e instanceof ServerError ? explain(e, `${state.file.name} on ${name}`) : e.message;
        failures.push(msg);
        article.dataset.state = "error";
        $(".body", article).replaceChildren(el("p", { class: "error-inline", text: msg }));
      }
      article.removeAttribute("aria-busy");
    }
  } finally {
    state.running = false;
    $("#run").disabled = false;
  }
  if (failures.length) showError(failures.length === 1 ? failures[0]
    : `${failures.length} of ${names.length} models failed; first: ${failures[0]}`);
  setStatus(failures.length === names.length ? "Failed." : `Done: ${names.length - failures.length} of ${names.length} answered.`);
  results.dataset.done = String(Date.now());
  if (state.again) { state.again = false; run(); } else document.body.dataset.busy = "false";
}

// ------------------------------------------------------------------------------------------- inputs

async function useFile(name, blob) {
  const bytes = new Uint8Array(await blob.arrayBuffer());
  let bitmap = null, decodeError = null;
  try { bitmap = await createImageBitmap(blob); } catch (e) { decodeError = e; }
  state.file = { name, bytes, bitmap, decodeError };
  $("#chosen").textContent = bitmap
    ? `${name}: ${bitmap.width}×${bitmap.height} px, ${(bytes.length / 1024).toFixed(1)} KiB`
    : `${name}: ${(bytes.length / 1024).toFixed(1)} KiB; this browser cannot decode it as an image (the server decides)`;
  $("#run").disabled = !$("#model").value;
  if ($("#model").value) run();
}

async function useSample(name) {
  setStatus(`Loading sample ${name}…`);
  try {
    const resp = await fetch(`samples/${encodeURIComponent(name)}`);
    if (!resp.ok) throw new ServerError(resp.status, await errorText(resp), `sample ${name}`);
    await useFile(name, await resp.blob());
  } catch (e) {
    showError(explain(e, `sample ${name}`));
    setStatus("");
  }
}

function buildExtras() {
  const box = $("#extras");
  box.replaceChildren();
  const choice = $("#model").value;
  const shown = choice === "*" ? [...state.models.values()] : [state.models.get(choice)].filter(Boolean);
  for (const info of shown) {
    if (!info.base || !info.base.extras.length) continue;
    for (const x of info.base.extras) {
      const id = `extra-${info.name}-${x.name}`;
      const select = el("select", { id, name: id });
      const [lo, hi] = x.range, names = state.labels.get(info.name) || [];
      for (let v = lo; v <= hi; v++) {
        const text = v === x.default ? `${v}: default (${info.base.model} chooses)` : `${v}${names[v] ? `: ${names[v]}` : ""}`;
        select.append(el("option", { value: String(v), text }));
      }
      select.value = String(x.default);
      select.addEventListener("change", () => { if (state.file) run(); });
      const base = info.name.endsWith(IMAGE_SUFFIX) ? info.name.slice(0, -IMAGE_SUFFIX.length) : info.name;
      box.append(el("label", { for: id, text: `${base}: ${x.name}` }), select);
    }
  }
}

async function pickModel() {
  const choice = $("#model").value;
  $("#run").disabled = !state.file || !choice;
  $("#extras").replaceChildren();
  if (state.file) run(); // now, with defaults: the extra inputs' controls follow once the model's config is read
  const shown = choice === "*" ? [...state.models.values()].filter(m => m.config) : [state.models.get(choice)];
  await Promise.all(shown.filter(Boolean).map(loadBase));
  if ($("#model").value === choice) buildExtras();
}

async function init() {
  const drop = $("#drop"), input = $("#file");
  input.addEventListener("change", () => { if (input.files[0]) useFile(input.files[0].name, input.files[0]); });
  drop.addEventListener("click", () => input.click());
  drop.addEventListener("keydown", e => { if (e.key === "Enter" || e.key === " ") { e.preventDefault(); input.click(); } });
  for (const ev of ["dragenter", "dragover"]) drop.addEventListener(ev, e => { e.preventDefault(); drop.classList.add("over"); });
  for (const ev of ["dragleave", "drop"]) drop.addEventListener(ev, () => drop.classList.remove("over"));
  drop.addEventListener("drop", e => {
    e.preventDefault();
    const f = e.dataTransfer.files[0];
    if (f) useFile(f.name, f);
  });
  $("#controls").addEventListener("submit", e => { e.preventDefault(); run(); });
  $("#model").addEventListener("change", pickModel);

  setStatus("Loading the model list…");
  try {
    state.index = await getJSON("models.json", "the model list");
  } catch (e) {
    showError(e instanceof ServerError ? explain(e, "the model list") : e.message);
    setStatus("");
    return;
  }
  const samples = $("#samples");
  for (const s of state.index.samples) {
    const b = el("button", { type: "button", class: "sample", dataset: { sample: s } },
      el("img", { src: `samples/${encodeURIComponent(s)}`, alt: "" }), el("span", { text: s }));
    b.addEventListener("click", () => useSample(s));
    samples.append(b);
  }
  const infos = await Promise.all(state.index.models.map(loadModel));
  const select = $("#model");
  select.replaceChildren();
  const ready = infos.filter(i => i.config);
  if (ready.length > 1) select.append(el("option", { value: "*", text: `all ${ready.length} models` }));
  for (const i of infos) {
    // 503: the front door knows the model (it is in the repository) but Triton cannot serve it now: not loaded
    // here, being reloaded, or its stub restarting; 404: no such model on this server.
    const why = i.error ? (i.error.status === 404 ? "not loaded" : i.error.status === 503 ? "not loaded, or loading"
      : "error") : "";
    const opt = el("option", { value: i.name, text: why ? `${i.name} (${why})` : i.name });
    if (!i.config) opt.disabled = true;
    select.append(opt);
  }
  if (!ready.length) {
    const first = infos.find(i => i.error);
    showError(first ? explain(first.error, "every model") : "This server's repository has no <model>_image models.");
    select.disabled = true;
    setStatus("");
    return;
  }
  select.value = ready[0].name;
  select.disabled = false;
  setStatus(`${ready.length} model${ready.length === 1 ? "" : "s"} ready.`);
  document.body.dataset.ready = "true";
  await pickModel();
}

window.addEventListener("DOMContentLoaded", init);
