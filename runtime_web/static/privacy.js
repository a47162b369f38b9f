// The web device's privacy arithmetic (docs/web_device.md): the analytic Gaussian mechanism, the release
// grid, and normal noise from crypto.getRandomValues. Mirrors dpa.privacy (calibration.gaussian_sigma,
// mechanism.snap_step); tests/integration/test_web_device.py checks it against them in the browser.

const SQRT2 = Math.SQRT2;
const LOG_SQRT_PI = 0.5 * Math.log(Math.PI);

// log erfc(x) for x >= 0: Numerical Recipes' Chebyshev fit (relative error < 1.2e-7) while erfc is
// representable, the asymptotic series beyond.
function logErfcPositive(x) {
  if (x < 20) {
    const t = 1 / (1 + 0.5 * x);
    const poly = -x * x - 1.26551223 + t * (1.00002368 + t * (0.37409196 + t * (0.09678418 + t * (-0.18628806 +
      t * (0.27886807 + t * (-1.13520398 + t * (1.48851587 + t * (-0.82215223 + t * 0.17087277))))))));
    return Math.log(t) + poly;
  }
  const x2 = x * x;
  return -x2 - Math.log(x) - LOG_SQRT_PI + Math.log1p(-1 / (2 * x2) + 3 / (4 * x2 * x2));
}

// log Phi(x), the standard normal CDF.
export function logNdtr(x) {
  const y = -x / SQRT2;  // Phi(x) = erfc(-x / sqrt 2) / 2
  if (y >= 0) return Math.log(0.5) + logErfcPositive(y);
  return Math.log1p(-0.5 * Math.exp(logErfcPositive(-y)));  // erfc(y) = 2 - erfc(-y)
}

// delta of the Gaussian mechanism at epsilon for noise multiplier z = sigma / sensitivity (Balle and Wang,
// ICML 2018, Theorem 8): Phi(1/(2z) - eps z) - e^eps Phi(-1/(2z) - eps z), in log space.
export function gaussianDelta(z, epsilon) {
  const a = 1 / (2 * z), b = epsilon * z;
  const first = logNdtr(a - b), tail = logNdtr(-a - b);
  const gap = Math.min(epsilon + tail - first, 0);
  return Math.exp(first) * -Math.expm1(gap);
}

// The smallest z = sigma / sensitivity with delta(z, epsilon) <= delta: geometric bisection, the upper
// (more noise) end returned, as dpa.privacy.calibration.gaussian_sigma does.
export function gaussianZ(epsilon, delta) {
  if (!(epsilon > 0) || !Number.isFinite(epsilon)) throw new Error(`epsilon must be a positive number, got ${epsilon}`);
  if (!(delta > 0 && delta < 1)) throw new Error(`delta must be in (0, 1), got ${delta}`);
  let lo = 1e-3, hi = 1e3;
  if (gaussianDelta(hi, epsilon) > delta) throw new Error(`epsilon ${epsilon} at delta ${delta} needs z above ${hi}`);
  while (hi / lo - 1 > 1e-12) {
    const mid = Math.sqrt(lo * hi);
    if (gaussianDelta(mid, epsilon) <= delta) hi = mid; else lo = mid;
  }
  return hi;
}

// The epsilon one release at noise multiplier z spends at delta (the inverse, by bisection on epsilon).
export function gaussianEpsilon(z, delta) {
  let lo = 0, hi = 1;
  while (gaussianDelta(z, hi) > delta) hi *= 2;
  while (hi - lo > 1e-12 * hi) {
    const mid = 0.5 * (lo + hi);
    if (gaussianDelta(z, mid) <= delta) hi = mid; else lo = mid;
  }
  return hi;
}

// The release grid: 2^(floor(log2 sigma) - 12) (frexp: sigma = m 2^e, 0.5 <= m < 1, grid 2^(e - 13)).
export const SNAP_BITS = 12;
export function snapStep(sigma) {
  const e = Math.floor(Math.log2(sigma));
  // floor(log2) of a power of two is exact; guard the rounding of log2 near one
  const exp = 2 ** e > sigma ? e - 1 : 2 ** (e + 1) <= sigma ? e + 1 : e;
  return 2 ** (exp - SNAP_BITS);
}

// round half to even, as numpy.round
export function roundHalfEven(x) {
  const r = Math.round(x);
  return (Math.abs(x - Math.trunc(x)) === 0.5 && r % 2 !== 0) ? r - 1 : r;
}

// n standard normals from the browser's CSPRNG: each uniform takes 53 random bits, u = (k + 1/2) / 2^53 in
// (0, 1), and each pair (u1, u2) gives two normals by Box-Muller: sqrt(-2 ln u1) (cos, sin)(2 pi u2).
export function secureNormals(n) {
  const out = new Float64Array(n);
  const words = new Uint32Array(4 * Math.ceil(n / 2));
  for (let i = 0; i < words.length; i += 16384) crypto.getRandomValues(words.subarray(i, i + 16384));
  const uniform = (k) => ((words[k] >>> 5) * 67108864 + (words[k + 1] >>> 6) + 0.5) / 9007199254740992;
  for (let i = 0, k = 0; i < n; i += 2, k += 4) {
    const r = Math.sqrt(-2 * Math.log(uniform(k))), theta = 2 * Math.PI * uniform(k + 2);
    out[i] = r * Math.cos(theta);
    if (i + 1 < n) out[i + 1] = r * Math.sin(theta);
  }
  return out;
}
