"""Does scoring templates through the PUBLIC within-class precision beat the device's cosine?

Usage: python scripts/precision_lever.py [PUBLIC_IDENTITIES]   (default 200; about 4 min on 2 cores)

An LDA-style classifier scores a probe x against template t by <x, P t> with P = (S_w + lam I)^-1, S_w the
within-class covariance of centred, clipped fc7 features of PUBLIC identities (the generator's seed 5:
neither the device's, seed 0, nor pretraining's, seed 1), lam a multiple of S_w's mean eigenvalue. P is
public and t a function of the one release, so this is post-processing: no privacy cost. The script
runs the demo's class-sum release through the product's own functions (shipped weights, fc7, the export's
public centre and public clip, noise 2zC at the accountant's z for a whole-run epsilon, counts noised too) on
a public task of the device task's shape (seed 4, as the reference's hyperparameters are chosen) and on the device's
own faces (seed 0, 10 x 100, 75 / 25 per identity), 6 random splits each, and prints private / noiseless
accuracy per lam against the device's own scoring (the cosine).
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from shipped_features import (
    clip,
    device_accuracy,
    features,
    released_templates,
)  # scripts/: run as python scripts/<name>.py

from dpa.faces.synth import SynthConfig
from dpa.privacy.accountant import calibrate_noise_multiplier
from dpa.privacy.release_clip import public_clip_from_norms
from dpa.runs.shipped_weights import shipped_info

LAMBDAS = (None, 1e-2, 1e-1, 1.0, 3.0, 10.0)  # None: the device's cosine (runtime_client.on_device)


def _accuracies(f, y, centre, c, vals, vecs, epsilon, splits=6):  # type: ignore[no-untyped-def]
    z = calibrate_noise_multiplier(mechanism="gaussian", total_epsilon=epsilon, delta=1e-5, releases=1)
    out: dict[tuple[str, float | None], list[float]] = {}
    for split in range(splits):
        rng = np.random.default_rng(split)
        rows = [rng.permutation(np.flatnonzero(y == q)) for q in range(10)]
        tr, te = np.concatenate([r[:75] for r in rows]), np.concatenate([r[75:] for r in rows])
        x, xt = clip(f[tr] - centre, c), clip(f[te] - centre, c)
        for kind, noise in (("noiseless", 0.0), ("private", z)):
            t, n = released_templates(x, y[tr], 10, c, noise, rng)
            for lam in LAMBDAS:
                if lam is None:  # the device's own scoring
                    out.setdefault((kind, lam), []).append(device_accuracy(xt, y[te], t, n))
                    continue
                pt = t @ (vecs @ np.diag(1 / (vals + lam * vals.mean())) @ vecs.T)
                out.setdefault((kind, lam), []).append(float(np.mean((xt @ pt.T).argmax(1) == y[te])))
    return {k: float(np.mean(v)) for k, v in out.items()}


def main() -> None:
    shipped_info()  # the shipped file's hash, checked
    torch.set_num_threads(2)
    public_ids = int(sys.argv[1]) if len(sys.argv) > 1 else 200
    root = Path(tempfile.mkdtemp(prefix="precision-lever-"))
    centre_f, _ = features(root, SynthConfig(identities=40, per_identity=10, size=64, seed=1))  # the export's
    cov_f, cov_y = features(root, SynthConfig(identities=public_ids, per_identity=10, size=64, seed=5))
    tasks = {
        name: features(root, SynthConfig(identities=10, per_identity=100, size=64, seed=seed))
        for name, seed in (("public task (seed 4)", 4), ("device (seed 0)", 0))
    }
    centre = centre_f.mean(0)
    c = public_clip_from_norms(np.linalg.norm(centre_f - centre, axis=1))
    g = clip(cov_f - centre, c)
    sw = sum(np.cov(g[cov_y == q].T, bias=True) * np.mean(cov_y == q) for q in np.unique(cov_y))
    vals, vecs = np.linalg.eigh(sw)
    print("| whole-run ε | data | device (cosine) | " + " | ".join(f"λ {lam:g}" for lam in LAMBDAS[1:]) + " |")
    print("|---|---|" + "---|" * len(LAMBDAS))
    for epsilon in (8.0, 1.0):
        for name, (f, y) in tasks.items():
            r = _accuracies(f, y, centre, c, vals, vecs, epsilon)
            cells = [f"{r[('private', lam)]:.3f} ({r[('noiseless', lam)]:.3f})" for lam in LAMBDAS]
            print(f"| {epsilon:g} | {name} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
