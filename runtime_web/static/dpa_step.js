// DP-A's per-example step in the page (docs/protocol.md section 5), the arithmetic only: the release, the
// labels' randomised response, the clipping's vector-Jacobian product and the optimizer. device.js runs the
// head's graphs and talks to the edge server. Mirrors dpa.privacy.mechanism (DPActivations.release and
// backward), dpa.privacy.label_randomizer (RRWithPrior, here with a uniform prior: k-ary randomised response)
// and runtime_client.optimizers; tests/integration/test_web_device.py checks the step against the Python device.
import { roundHalfEven, secureNormals, snapStep } from "./privacy.js";

// y_i = s * round_grid(a_i * min(1, C / ||a_i||) + N(0, sigma^2)) for each example (act: Float32Array (B, d)),
// s = 1 / sqrt(sigma^2 + C^2 / d) (the public release scale). -> {release: Float32Array, norms, scale}.
export function releaseBatch(act, batch, clip, sigma) {
  const d = act.length / batch, step = snapStep(sigma), scale = 1 / Math.sqrt(sigma * sigma + (clip * clip) / d);
  const noise = secureNormals(act.length), release = new Float32Array(act.length), norms = new Float64Array(batch);
  for (let i = 0; i < batch; i++) {
    let n2 = 0;
    for (let j = i * d; j < (i + 1) * d; j++) n2 += act[j] * act[j];
    norms[i] = Math.sqrt(n2);
    const f = norms[i] > clip ? clip / norms[i] : 1;
    for (let j = i * d; j < (i + 1) * d; j++) {
      const clipped = Math.fround(act[j] * f);
      release[j] = Math.fround(roundHalfEven((clipped + noise[j] * sigma) / step) * step) * scale;
    }
  }
  return { release, norms, scale };
}

// d loss / d a from d loss / d y (grad: Float32Array (B, d)): s times the clipping's VJP at a,
// g for an example within the clip, (C/n) (g - a (a . g) / n^2) for one clipped (dpa.privacy.clipping).
export function releaseVjp(act, grad, batch, clip, norms, scale) {
  const d = act.length / batch, out = new Float32Array(act.length);
  for (let i = 0; i < batch; i++) {
    const lo = i * d, hi = lo + d;
    if (norms[i] <= clip) {
      for (let j = lo; j < hi; j++) out[j] = scale * grad[j];
      continue;
    }
    let dot = 0;
    for (let j = lo; j < hi; j++) dot += act[j] * grad[j];
    const f = clip / norms[i], along = dot / (norms[i] * norms[i]);
    for (let j = lo; j < hi; j++) out[j] = scale * f * (grad[j] - act[j] * along);
  }
  return out;
}

// k-ary randomised response at epsilon over K classes from the browser's CSPRNG: the true label with
// probability e^eps / (e^eps + K - 1), each other with 1 / (e^eps + K - 1). Infinity: labels as they are.
export function randomizedLabels(labels, K, epsilon) {
  if (epsilon === Infinity) return labels.slice();
  const keep = 1 / (1 + (K - 1) * Math.exp(-epsilon)), words = new Uint32Array(2 * labels.length);
  crypto.getRandomValues(words);
  return labels.map((y, i) => {
    if (words[2 * i] / 4294967296 < keep || K === 1) return y;
    const other = Math.min(Math.floor((words[2 * i + 1] / 4294967296) * (K - 1)), K - 2);
    return other < y ? other : other + 1;
  });
}

// The manifest's optimizer on the head's parameters, in place (runtime_client.optimizers): SGD, w -= lr g; or
// onnxruntime's AdamW (adam_mode 1, betas 0.9 / 0.999, eps 1e-6, bias correction, decoupled weight decay).
export function optimizerStep(params, grads, optimizer, lr, moments) {
  if (optimizer.name === "sgd") {
    for (const [name, g] of Object.entries(grads)) {
      const w = params[name].data;
      for (let j = 0; j < w.length; j++) w[j] = Math.fround(w[j] - Math.fround(lr * g.data[j]));
    }
    return;
  }
  if (optimizer.name !== "adamw") throw new Error(`the page has no optimizer ${optimizer.name}`);
  const t = (moments.step = (moments.step ?? 0) + 1), b1 = 0.9, b2 = 0.999, wd = optimizer.weight_decay ?? 0;
  const stepSize = (lr * Math.sqrt(1 - b2 ** t)) / (1 - b1 ** t);
  for (const [name, g] of Object.entries(grads)) {
    const w = params[name].data, m = (moments[`${name}.m`] ??= new Float32Array(w.length));
    const v = (moments[`${name}.v`] ??= new Float32Array(w.length));
    for (let j = 0; j < w.length; j++) {
      m[j] = b1 * m[j] + (1 - b1) * g.data[j];
      v[j] = b2 * v[j] + (1 - b2) * g.data[j] * g.data[j];
      w[j] -= (stepSize * m[j]) / (Math.sqrt(v[j]) + 1e-6);
      if (wd) w[j] -= lr * wd * w[j];
    }
  }
}
