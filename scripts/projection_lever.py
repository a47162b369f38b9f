"""Which public projection before the class-sum release, and is the cosine the right score? On public data.

Usage: python scripts/projection_lever.py   (about 2 min on 2 cores)

The demo's private run exports fc7 of the shipped weights with a public release projection (``dpa export
--release-dims K``: the top K principal directions of the centred fc7 activations on the export's public
centre faces, seed 1, 40 x 10). This script simulates the class-sum release exactly in numpy: project,
clip at ``RELEASE_CLIP_SHARE_OF_MEDIAN`` of the public median norm, sum per class with the counts, one
draw of Gaussian noise 2zC at the accountant's z for a whole-run epsilon (labels inside), templates over
the noisy counts. Each K is scored on a public task of the device task's shape (seed 4: where K is chosen)
and, for the record only, on the device's own faces (seed 0), 20 random 75 / 25 splits per identity, by
the device's cosine to the templates (``runtime_client.on_device.template_scores``) and by the inner
product it replaced. Verification (ROC AUC) is measured on held-out public pairs (seed 2) in each space.
"""

from __future__ import annotations

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
from dpa.faces.verification import cosine_scores, sample_pairs, verification
from dpa.privacy.accountant import calibrate_noise_multiplier
from dpa.privacy.release_clip import public_clip_from_norms
from dpa.runs.shipped_weights import shipped_info

DIMS = (None, 16, 32, 64, 128, 256)  # None: no projection
SPLITS = 20


def _accuracy(x: np.ndarray, y: np.ndarray, c: float, epsilon: float) -> float:
    """Mean held-out accuracy over the splits of the class-sum release of projected, centred features ``x``."""
    z = calibrate_noise_multiplier(mechanism="gaussian", total_epsilon=epsilon, delta=1e-5, releases=1)
    out = []
    for split in range(SPLITS):
        rng = np.random.default_rng(split)
        rows = [rng.permutation(np.flatnonzero(y == q)) for q in range(10)]
        tr, te = np.concatenate([r[:75] for r in rows]), np.concatenate([r[75:] for r in rows])
        templates, counts = released_templates(clip(x[tr], c), y[tr], 10, c, z, rng)
        out.append(device_accuracy(clip(x[te], c), y[te], templates, counts))
    return float(np.mean(out))


def main() -> None:
    shipped_info()  # the shipped file's hash, checked
    torch.set_num_threads(2)
    root = Path(tempfile.mkdtemp(prefix="projection-lever-"))
    centre_f, _ = features(root, SynthConfig(identities=40, per_identity=10, size=64, seed=1))  # the export's
    val_f, val_y = features(root, SynthConfig(identities=100, per_identity=8, size=64, seed=2))
    tasks = {name: features(root, SynthConfig(identities=10, per_identity=100, size=64, seed=seed))
             for name, seed in (("public task (seed 4)", 4), ("device (seed 0)", 0))}  # fmt: skip
    centre = centre_f.mean(0)
    _, _, vt = np.linalg.svd(centre_f - centre, full_matrices=False)  # as the export computes its basis
    pairs = sample_pairs(val_y, np.random.default_rng(0), genuine=3000, impostor=10000)
    print("| release dims | public pairs: AUC | data | ε 8 | ε 1 |")
    print("|---|---|---|---|---|")
    for k in DIMS:
        project = (lambda f: f - centre) if k is None else (lambda f, w=vt[:k]: (f - centre) @ w.T)
        c = public_clip_from_norms(np.linalg.norm(project(centre_f), axis=1))
        auc = verification(cosine_scores(project(val_f), pairs), pairs.same)["auc"]
        for name, (f, y) in tasks.items():
            r8, r1 = _accuracy(project(f), y, c, 8.0), _accuracy(project(f), y, c, 1.0)
            print(f"| {k or 'none'} | {auc:.4f} | {name} | {r8:.3f} | {r1:.3f} |", flush=True)


if __name__ == "__main__":
    main()
