// The dpa device in a browser (issue 24): what `dpa client --release class-sums` does, from docs/protocol.md.
// The head runs in onnxruntime-web's standard WASM build (no training build: that one stopped at 1.19.2, as the
// Python training wheel did) from the export's own artifacts, checked against the manifest's SHA-256s: the
// eval graph and the head's parameters (head/parameters.npz) fed as its inputs, as runtime_client.head does,
// and for a training step the export's gradient graph (head/gradient_model.onnx, standard ONNX ops only).
// The images never leave the page; one class-sum release with Gaussian noise is all it sends.
import { parseNpy } from "./npy.js";
import { parseNpz } from "./npz.js";
import { optimizerStep, randomizedLabels, releaseBatch, releaseVjp } from "./dpa_step.js";
import { gaussianEpsilon, gaussianZ, roundHalfEven, secureNormals, snapStep } from "./privacy.js";
import { decode, encode } from "./wire.js";

let ort;  // onnxruntime-web: its WASM build, or its WebGPU build where the page runs on WebGPU (loadRuntime)

const $ = (id) => document.getElementById(id);
const state = { config: null, manifest: null, manifestSha: null, head: null, params: null, gradient: null,
                centre: null, prepared: null, templates: null, sent: false, dpa: null, moments: {} };
window.dpa = state;  // the page's state, for people with a console and for the test

class PageError extends Error {}

function say(text, kind = "info") {
  const box = $("status");
  box.textContent = text;
  box.className = kind;
}

async function sha256Hex(buf) {
  const digest = await crypto.subtle.digest("SHA-256", buf);
  return Array.from(new Uint8Array(digest), (b) => b.toString(16).padStart(2, "0")).join("");
}

async function fetchChecked(path) {  // a head file, checked against the manifest as a Python device does
  const buf = await (await fetch(`/artifacts/${path}`)).arrayBuffer();
  if ((await sha256Hex(buf)) !== state.manifest.files[path]) throw new PageError(`${path} does not match its SHA-256 in the manifest`);
  return buf;
}

// The execution provider (docs/web_device.md): "auto" takes WebGPU where the browser has an adapter, else
// WebAssembly; "webgpu" is refused, with a message, where it has none; "wasm" is WebAssembly.
async function loadRuntime(asked) {
  let webgpu = false, why = "not asked for";
  if (asked !== "wasm") {
    const adapter = navigator.gpu ? await navigator.gpu.requestAdapter().catch(() => null) : null;
    webgpu = Boolean(adapter);
    why = navigator.gpu ? (adapter ? "" : "the browser found no WebGPU adapter") : "this browser has no WebGPU (navigator.gpu)";
    if (asked === "webgpu" && !webgpu) {
      throw new PageError(`this page was started to run on WebGPU, but ${why}: start dpa web-device with --provider auto or wasm`);
    }
  }
  ort = await import(webgpu ? "/ort/ort.webgpu.min.mjs" : "/ort/ort.wasm.min.mjs");
  ort.env.wasm.wasmPaths = "/ort/";
  ort.env.wasm.numThreads = 1;  // no cross-origin isolation needed, and the same sums on every run
  state.providers = webgpu ? ["webgpu", "wasm"] : ["wasm"];  // WebGPU with WASM for the ops it lacks
  state.provider = webgpu ? "webgpu" : `wasm${asked === "auto" ? ` (${why})` : ""}`;
}

async function loadHead() {
  const raw = await (await fetch("/artifacts/manifest.json")).arrayBuffer();
  state.manifestSha = await sha256Hex(raw);
  state.manifest = JSON.parse(new TextDecoder().decode(raw));
  if (state.manifest.schema_version !== 1) throw new PageError(`manifest schema ${state.manifest.schema_version} is not 1`);
  const [parameters, evaluation] = await Promise.all(["head/parameters.npz", "head/eval_model.onnx"].map(fetchChecked));
  state.params = parseNpz(parameters);
  state.head = await ort.InferenceSession.create(new Uint8Array(evaluation), { executionProviders: state.providers });
  state.centre = state.manifest.release_centre ? parseNpy(await fetchChecked(state.manifest.release_centre)).data : null;
  $("clip").value = state.manifest.release_clip ?? "";
  $("head").textContent = `head: ${state.manifest.cut} of VGG-Face ${state.manifest.image_size}px, width ${state.manifest.width}, ` +
    `${state.manifest.num_classes} classes, manifest ${state.manifestSha.slice(0, 12)}…, onnxruntime-web ${ort.env.versions.web} ` +
    `on ${state.provider}`;
}

// docs/protocol.md 2.3: RGB, centre-cropped square, resized to H x W, (pixel - mean) / std, channel-first.
async function preprocess(blob, label) {
  let bitmap;
  try {
    bitmap = await createImageBitmap(blob, { colorSpaceConversion: "none", premultiplyAlpha: "none" });
  } catch {
    throw new PageError(`cannot decode image ${label}: not an image this browser reads`);
  }
  const m = state.manifest, size = m.image_size, side = Math.min(bitmap.width, bitmap.height);
  const canvas = new OffscreenCanvas(size, size), ctx = canvas.getContext("2d", { willReadFrequently: true });
  ctx.imageSmoothingQuality = "high";
  ctx.drawImage(bitmap, (bitmap.width - side) >> 1, (bitmap.height - side) >> 1, side, side, 0, 0, size, size);
  const rgba = ctx.getImageData(0, 0, size, size).data, out = new Float32Array(3 * size * size);
  for (let c = 0; c < 3; c++) {
    const mean = Math.fround(m.pixel_mean[c]), std = Math.fround(m.pixel_std[c]);
    for (let i = 0; i < size * size; i++) out[c * size * size + i] = Math.fround(Math.fround(rgba[4 * i + c] - mean) / std);
  }
  return out;
}

// A head graph's feeds: the images (B, 3, H, W) and every parameter the graph takes, from head/parameters.npz.
function headFeeds(session, images, batch, extra = {}) {
  const m = state.manifest, feeds = { images: new ort.Tensor("float32", images, [batch, 3, m.image_size, m.image_size]), ...extra };
  for (const name of session.inputNames) {
    if (name in feeds) continue;
    const p = state.params[name];
    if (!p) throw new PageError(`the head's parameters lack ${name}`);
    feeds[name] = new ort.Tensor("float32", p.data, p.shape);
  }
  return feeds;
}

// d loss / d parameters = J^T upstream for a batch (images: one Float32Array (B, 3, H, W); upstream: the
// activation gradient, Float32Array (B, *activation_shape)): the export's gradient graph, as the Python
// device's HeadModel.accumulate runs it. {parameter name: {shape, data}}.
async function headGradients(images, batch, upstream) {
  if (!state.gradient) {
    if (!state.manifest.files["head/gradient_model.onnx"]) throw new PageError("this export has no gradient graph: its head can only be used frozen");
    state.gradient = await ort.InferenceSession.create(new Uint8Array(await fetchChecked("head/gradient_model.onnx")),
                                                       { executionProviders: state.providers });
  }
  const m = state.manifest, up = { upstream_gradient: new ort.Tensor("float32", upstream, [batch, ...m.activation_shape]) };
  const results = await state.gradient.run(headFeeds(state.gradient, images, batch, up));
  return Object.fromEntries(Object.entries(results).map(([k, t]) => [k.replace(/\.grad$/, ""), { shape: t.dims, data: t.data }]));
}

// The head's activations of a batch (one Float32Array (B, 3, H, W)) minus the release centre: Float32Array (B, d).
async function centredActivations(data, batch) {
  const m = state.manifest, outputs = Object.values(await state.head.run(headFeeds(state.head, data, batch)));
  const want = [batch, ...m.activation_shape];
  if (outputs.length !== 1 || outputs[0].dims.join() !== want.join()) {
    throw new Error(`the head's eval model answered ${outputs.map((o) => `[${o.dims}]`)}, not an activation of [${want}]`);
  }
  const act = Float32Array.from(outputs[0].data), d = act.length / batch;
  if (state.centre) for (let j = 0; j < act.length; j++) act[j] = Math.fround(act[j] - state.centre[j % d]);
  return act;
}

function stack(images) {  // Float32Arrays of one image each -> one (B, 3, H, W) Float32Array
  const per = 3 * state.manifest.image_size ** 2, data = new Float32Array(images.length * per);
  images.forEach((x, i) => data.set(x, i * per));
  return data;
}

// The head's activations of images (Float32Arrays), minus the release centre, clipped to L2 norm C: Float64Arrays.
async function clippedActivations(images, clip) {
  const out = [];
  for (let start = 0; start < images.length; start += 16) {
    const batch = images.slice(start, start + 16), act = await centredActivations(stack(batch), batch.length);
    const d = act.length / batch.length;
    for (let i = 0; i < batch.length; i++) {
      const a = Float64Array.from(act.subarray(i * d, (i + 1) * d));
      const norm = Math.sqrt(a.reduce((s, v) => s + v * v, 0));
      const f = norm > clip ? clip / norm : 1;
      out.push(a.map((v) => Math.fround(v * f)));
    }
  }
  return out;
}

function readNumber(id, what, check) {
  const v = Number($(id).value);
  if (!check(v)) throw new PageError(`${what} must be ${check.rule}, got "${$(id).value}"`);
  return v;
}
const positive = Object.assign((v) => v > 0 && Number.isFinite(v), { rule: "a positive number" });
const probability = Object.assign((v) => v > 0 && v < 1, { rule: "in (0, 1)" });
const counting = Object.assign((v) => Number.isInteger(v) && v >= 1, { rule: "a whole number >= 1" });

// {identity: [File|{url, name}]} from the folder picker (LFW layout: <root>/<identity>/<image>) or the built-in faces.
async function enrolmentSet() {
  const files = Array.from($("folder").files);
  if (files.length) {
    const by = {};
    for (const f of files) {
      const parts = f.webkitRelativePath.split("/");
      if (parts.length < 3 || f.name.startsWith(".")) continue;
      (by[parts[parts.length - 2]] ??= []).push({ blob: f, name: f.webkitRelativePath });
    }
    return by;
  }
  if (!state.config.builtin) throw new PageError("pick a folder of face images (one subfolder per identity)");
  const index = await (await fetch("/faces/index.json")).json(), by = {};
  for (const [name, urls] of Object.entries(index.enrol)) by[name] = urls.map((url) => ({ url, name: url }));
  return by;
}

async function blobOf(item) { return item.blob ?? (await (await fetch(item.url)).blob()); }

// Prepare: images -> head -> centre, clip -> per-identity sums and counts -> noise. Nothing is sent.
async function prepare() {
  state.prepared = null;
  const epsilon = readNumber("epsilon", "epsilon", positive), delta = readNumber("delta", "delta", probability);
  // The clip policy of dpa.privacy.release_clip: the field (the export's public clip, or the user's), else refused.
  if ($("clip").value.trim() === "")
    throw new PageError("the export carries no public release clip: give the clip C, or export with --centre-faces so that it has one");
  const clip = readNumber("clip", "the clip C", positive);
  const set = await enrolmentSet(), names = Object.keys(set).sort();
  const m = state.manifest, K = m.num_classes, d = m.activation_shape.reduce((a, b) => a * b, 1);
  if (!names.length) throw new PageError("no identities found: one subfolder of images per identity");
  if (names.length > K) throw new PageError(`${names.length} identities, but this head's export classifies ${K}`);
  for (const n of names) if (set[n].length < 2) throw new PageError(`identity ${n} has ${set[n].length} image; each needs at least 2`);
  const images = [], labels = [];
  for (const [label, n] of names.entries()) {
    for (const item of set[n]) { images.push(await preprocess(await blobOf(item), item.name)); labels.push(label); }
    say(`read ${images.length} images of ${label + 1} / ${names.length} identities`);
  }
  say(`running the head on ${images.length} images…`);
  const clipped = await clippedActivations(images, clip);
  const totals = new Float64Array(K * (d + 1));  // rows [sum of x, C * count], docs/protocol.md section 5
  clipped.forEach((x, i) => {
    const row = labels[i] * (d + 1);
    for (let j = 0; j < d; j++) totals[row + j] += x[j];
    totals[row + d] += clip;
  });
  const z = gaussianZ(epsilon, delta), sigma = 2 * z * clip, step = snapStep(sigma);
  const noise = secureNormals(totals.length), noisy = new Float64Array(totals.length);
  for (let i = 0; i < totals.length; i++) noisy[i] = roundHalfEven((totals[i] + noise[i] * sigma) / step) * step;
  const sums = new Float32Array(K * d), counts = new Float32Array(K);
  for (let k = 0; k < K; k++) {
    for (let j = 0; j < d; j++) sums[k * d + j] = noisy[k * (d + 1) + j];
    counts[k] = noisy[k * (d + 1) + d] / clip;
  }
  state.prepared = { names, labels, sums, counts, z, sigma, clip, epsilon: gaussianEpsilon(z, delta), delta, d,
                     images: images.length };
  if (state.config.test_hooks) state.noiseless = { totals: Array.from(totals), noisy: Array.from(noisy) };
  $("privacy").textContent = `one release of ${names.length} identities' sums (${images.length} images): ` +
    `epsilon ${state.prepared.epsilon.toFixed(4)}, delta ${delta} for the whole run, labels inside ` +
    `(Gaussian, z ${z.toFixed(4)}, sigma ${sigma.toFixed(3)} = 2 z C, C ${clip})`;
  $("send").disabled = false;
  say("ready: nothing has left this page. Check the privacy line, then send.", "ok");
}

async function api(path, init = {}) {
  const url = `${$("server").value.replace(/\/+$/, "")}/v1/${path}`;
  const headers = { Authorization: `Bearer ${$("token").value.trim()}`, ...(init.headers ?? {}) };
  let reply;
  try {
    reply = await fetch(url, { ...init, headers });
  } catch (e) {
    throw new PageError(`cannot reach the edge server at ${$("server").value} (${e.message}); is it running, with --allow-origin ${location.origin}?`);
  }
  if (!reply.ok) {
    let detail = "";
    try { const body = await reply.json(); detail = `${body.error}: ${body.message}`; } catch { detail = reply.statusText; }
    throw new PageError(`the edge server answered ${reply.status} to ${path} (${detail})`);
  }
  return reply;
}

// The token is there and the server serves this page's head; else a message, and nothing is sent.
async function checkServer() {
  if (!$("token").value.trim()) throw new PageError("enter this device's token (dpa token add on the server's machine)");
  const status = await (await api("status")).json();
  if (status.manifest_sha256 !== state.manifestSha) {
    throw new PageError(`the server does not know this head: it serves manifest ${status.manifest_sha256.slice(0, 12)}…, ` +
      `this page's head is ${state.manifestSha.slice(0, 12)}…`);
  }
}

async function send() {
  if (!state.prepared) throw new PageError("prepare the release first");
  if (state.sent) throw new PageError("this page has released already: a second draw of noise would be a second privacy cost");
  await checkServer();
  const p = state.prepared, m = state.manifest;
  const body = encode([{ name: "class_sums", dtype: "float32", shape: [m.num_classes, ...m.activation_shape], data: p.sums },
                       { name: "counts", dtype: "float32", shape: [m.num_classes], data: p.counts }]);
  const session = await (await api("sessions", { method: "POST", headers: { "Content-Type": "application/json" },
    body: JSON.stringify({ manifest_sha256: state.manifestSha, client: "dpa web device",
                           labels: { mechanism: "in-class-sums" } }) })).json();
  state.sent = true;  // from here a retry must send these same bytes (the server keeps them once)
  const answer = await (await api(`sessions/${session.session_id}/class-sums`, { method: "POST",
    headers: { "Content-Type": "application/x-dpa-tensors" }, body })).json();
  const t = decode(await (await api("templates")).arrayBuffer());
  state.templates = { templates: t.tensors.templates.data, counts: Array.from(t.tensors.counts.data, Number) };
  state.session = session.session_id;
  $("send").disabled = true;
  $("recognise").disabled = false;
  say(`released once (session ${session.session_id}, ${answer.class_sum_releases} release(s) on the server); ` +
      "templates received: recognise images on this page", "ok");
}

// DP-A, planned: the images read, the noise for the whole run's budget from the device's accountant (the page's
// own server runs dpa.privacy.release_plan), the epsilon shown. Nothing is sent.
async function planDpa() {
  state.dpa = null;
  const epsilon = readNumber("epsilon", "epsilon", positive), delta = readNumber("delta", "delta", probability);
  const clip = readNumber("clip", "the clip C", positive), epochs = readNumber("epochs", "epochs", counting);
  const labelEpsilon = readNumber("label-epsilon", "the label epsilon", positive);
  if (!state.manifest.files["head/gradient_model.onnx"]) throw new PageError("this export has no gradient graph: its head can only be used frozen");
  const set = await enrolmentSet(), names = Object.keys(set).sort();
  if (names.length > state.manifest.num_classes) throw new PageError(`${names.length} identities, but this head's export classifies ${state.manifest.num_classes}`);
  const images = [], labels = [];
  for (const [label, n] of names.entries()) {
    for (const item of set[n]) { images.push(await preprocess(await blobOf(item), item.name)); labels.push(label); }
  }
  const query = new URLSearchParams({ epsilon, delta, clip, releases: epochs, label_epsilon: labelEpsilon });
  const reply = await fetch(`/plan?${query}`);
  if (!reply.ok) throw new PageError(await reply.text());
  const plan = await reply.json();
  state.dpa = { images, labels, epochs, plan, steps: 0 };
  $("dpa-privacy").textContent = `${images.length} images of ${names.length} identities, each released ${epochs} time(s) ` +
    `with its own noise: epsilon ${plan.epsilon.toFixed(4)}, delta ${delta} for the whole run, labels at ${labelEpsilon} ` +
    `inside (Gaussian, z ${plan.noise_multiplier.toFixed(4)}, sigma ${plan.sigma.toFixed(3)} = 2 z C, C ${clip})`;
  $("train-dpa").disabled = false;
  say("ready to train: nothing has left this page. Check the privacy line, then train.", "ok");
}

// One DP-A step on images[rows]: release, the server's step, the activation gradient back through the
// clipping and the head's gradient graph, the manifest's optimizer (runtime_client.split_step, in the page).
async function dpaStep(session, rows) {
  const m = state.manifest, p = state.dpa.plan, batch = rows.length, data = stack(rows.map((i) => state.dpa.images[i]));
  const act = await centredActivations(data, batch);
  const { release, norms, scale } = releaseBatch(act, batch, p.clip, p.sigma);
  const sent = randomizedLabels(rows.map((i) => state.dpa.labels[i]), m.num_classes, p.label_epsilon);
  const body = encode([{ name: "activation", dtype: "float32", shape: [batch, ...m.activation_shape], data: release },
                       { name: "labels", dtype: "int64", shape: [batch], data: BigInt64Array.from(sent, BigInt) }],
                      { step: state.dpa.steps + 1 });
  const reply = decode(await (await api(`sessions/${session}/train`, { method: "POST",
    headers: { "Content-Type": "application/x-dpa-tensors" }, body })).arrayBuffer());
  const grad = reply.tensors.activation_gradient;
  if (!grad || grad.dtype !== "float32" || grad.shape.join() !== [batch, ...m.activation_shape].join() || !grad.data.every(Number.isFinite)) {
    throw new PageError("the server's activation gradient is missing, misshapen or not finite: the head is left as it was");
  }
  const grads = await headGradients(data, batch, releaseVjp(act, grad.data, batch, p.clip, norms, scale));
  optimizerStep(state.params, grads, m.optimizer, m.optimizer.lr, state.moments);
  state.dpa.steps += 1;
  if (state.config.test_hooks && !state.dpa.first) {
    state.dpa.first = { rows, images: Array.from(data), release: Array.from(release), sent, gradient: Array.from(grad.data), scale,
      grads: Object.fromEntries(Object.entries(grads).map(([k, v]) => [k, Array.from(v.data)])) };
  }
  return Number(reply.tensors.loss.data[0]);
}

async function trainDpa() {
  if (!state.dpa) throw new PageError("plan the training first: its epsilon is shown before anything is sent");
  if (state.dpa.steps) throw new PageError("this page has trained already: plan again for another run (another privacy cost)");
  await checkServer();
  const label = state.dpa.plan.label_epsilon;
  const session = (await (await api("sessions", { method: "POST", headers: { "Content-Type": "application/json" },
    body: JSON.stringify({ manifest_sha256: state.manifestSha, client: "dpa web device (DP-A)",
      labels: label === Infinity ? { mechanism: "clear" } : { mechanism: "rr-with-prior", epsilon: label } }) })).json()).session_id;
  $("train-dpa").disabled = true;
  state.dpa.session = session;
  let loss = NaN;
  for (let epoch = 0; epoch < state.dpa.epochs; epoch++) {
    for (let start = 0; start < state.dpa.images.length; start += 8) {
      const rows = Array.from({ length: Math.min(8, state.dpa.images.length - start) }, (_, i) => start + i);
      loss = await dpaStep(session, rows);
      say(`epoch ${epoch + 1} / ${state.dpa.epochs}: step ${state.dpa.steps}, the server's loss ${loss.toFixed(3)}`);
    }
  }
  say(`trained: ${state.dpa.steps} DP-A steps in session ${session}, every example released ${state.dpa.epochs} time(s); ` +
      `the head on this page holds the update`, "ok");
}

async function probes() {
  const files = Array.from($("probes").files);
  if (files.length) return files.map((f) => ({ blob: f, name: f.name }));
  if (!state.config.builtin) throw new PageError("pick images to recognise");
  return (await (await fetch("/faces/index.json")).json()).probe.map((p) => ({ url: p.url, name: p.url, truth: p.identity }));
}

async function recognise() {
  if (!state.templates) throw new PageError("send the release first: recognition uses the server's templates");
  const items = await probes(), p = state.prepared, { templates, counts } = state.templates;
  const images = [];
  for (const item of items) images.push(await preprocess(await blobOf(item), item.name));
  const x = await clippedActivations(images, p.clip);
  state.recognised = x.map((e, i) => {
    let best = -1, score = -Infinity;
    for (let k = 0; k < counts.length; k++) {
      if (counts[k] === 0) continue;  // a class the server never received
      // The cosine to the template, as runtime_client.on_device.template_scores (a noisy count only
      // rescales a class-sum template); the probe is clipped like a release.
      let s = 0, tt = 0;
      for (let j = 0; j < p.d; j++) { const t = templates[k * p.d + j]; s += e[j] * t; tt += t * t; }
      s /= Math.max(Math.sqrt(tt), 1e-30);
      if (s > score) { score = s; best = k; }
    }
    return { image: items[i].name, label: best, identity: p.names[best] ?? null, score, truth: items[i].truth ?? null };
  });
  const known = state.recognised.some((r) => r.truth !== null);
  const cell = (text) => { const td = document.createElement("td"); td.textContent = text; return td; };
  const table = $("results");
  table.replaceChildren();
  const head = table.insertRow();
  for (const h of ["image", "identity", "score", ...(known ? ["true identity"] : [])]) head.appendChild(cell(h));
  for (const r of state.recognised) {  // textContent, never innerHTML: a file name is not markup
    const row = table.insertRow();
    row.append(cell(r.image.split("/").pop()), cell(r.identity), cell(r.score.toFixed(3)));
    if (known) row.appendChild(cell(r.truth === r.identity ? `✓ ${r.truth}` : `✗ ${r.truth}`));
  }
  say(`recognised ${items.length} images on this page with the server's templates`, "ok");
}

function guarded(action) {
  return async () => {
    try { await action(); } catch (e) { say(e instanceof PageError ? e.message : `error: ${e.message}`, "error"); }
    document.body.dataset.busy = "no";
  };
}
for (const [id, action] of [["prepare", prepare], ["send", send], ["recognise", recognise], ["plan-dpa", planDpa],
                            ["train-dpa", trainDpa]]) {
  const run = guarded(action);
  $(id).addEventListener("click", () => { document.body.dataset.busy = "yes"; run(); });
}

guarded(async () => {
  state.config = await (await fetch("/config.json")).json();
  $("server").value = state.config.server ?? "";
  $("epsilon").value = state.config.epsilon; $("delta").value = state.config.delta;
  $("builtin").textContent = state.config.builtin ? `built-in faces: ${state.config.builtin}` : "";
  await loadRuntime(state.config.provider ?? "auto");
  await loadHead();
  if (state.config.test_hooks) Object.assign(state, { headGradients, preprocess, blobOf });  // the tests' handles
  $("prepare").disabled = false;
  $("plan-dpa").disabled = false;
  say("head loaded and checked; pick a folder of faces (or use the built-in ones) and prepare the release", "ok");
  document.body.dataset.ready = "yes";
})();
