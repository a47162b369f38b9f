"""What else moves the class-template classifier at whole-run epsilon 8: a study on the demo's features.

Usage: python scripts/template_levers.py [WORKDIR]   (default runs/demo; run `dpa demo` first: it pretrains)

The private recipe of `dpa demo` (README) releases each example once, centred on the public mean, clipped
at the public median norm, with Gaussian noise and RRWithPrior labels calibrated together to a whole-run
epsilon of 8 (delta 1e-5); the server averages the releases per label into templates and the device scores
its clean held-out activations against them. This script simulates that mechanism exactly in numpy (the
noise multiplier from our accountant, the label keep probability of randomised response with a uniform
prior, which is what one release per example gets) and varies one lever at a time:

* the cut (pool5, fc6, fc7 of the same pretrained network);
* a PUBLIC projection before clipping (PCA or LDA directions fitted on the public faces), which spends
  the clip's norm on directions that separate public identities;
* whitening the scores with the public within-class covariance;
* the share of the budget given to the labels;
* the device's images per identity (75, 150, 225 training images; 75 held out).

Each figure is the mean held-out accuracy over 4 random splits of 300 private images per identity (the
device's identities, seed 0; 10 identities, chance 0.10), beside the same templates without noise.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import scipy.linalg
import torch

from dpa.contract.architecture import ArchConfig
from dpa.faces.lfw import index_faces, load_batch
from dpa.faces.synth import SynthConfig, cached_faces
from dpa.privacy.accountant import calibrate_noise_multiplier
from exporter.export import VGGFACE_MEAN
from exporter.pretrain import PRETRAIN_PIXEL_STD
from exporter.vggface import build_parts, load_weights

ARCH = ArchConfig(image_size=64, width=0.25, num_classes=10, dropout=0.0)
CLASSES, PER_IDENTITY, HELD_OUT, SPLITS = 10, 300, 75, 4


def _features(weights: Path, cut: str, images: np.ndarray) -> np.ndarray:
    head, tail = build_parts(ARCH, cut)
    load_weights((head, tail), weights)
    with torch.no_grad():
        parts = [head(torch.from_numpy(images[i : i + 256])).flatten(1).numpy() for i in range(0, len(images), 256)]
    return np.concatenate(parts).astype(np.float64)


def _clip(g: np.ndarray, c: float) -> np.ndarray:
    n = np.linalg.norm(g, axis=1, keepdims=True)
    return g * np.minimum(1.0, c / np.maximum(n, 1e-12))


def _projection(f: np.ndarray, y: np.ndarray, kind: str, k: int) -> np.ndarray | None:
    """(d, k) public directions: PCA, or LDA (generalised eigenvectors of between- vs within-class scatter)."""
    if kind == "none":
        return None
    g = f - f.mean(0)
    if kind == "pca":
        return np.linalg.svd(g, full_matrices=False)[2][:k].T
    sw, sb = np.zeros((g.shape[1],) * 2), np.zeros((g.shape[1],) * 2)
    for c in np.unique(y):
        gc = g[y == c]
        m = gc.mean(0)
        sw += (gc - m).T @ (gc - m)
        sb += len(gc) * np.outer(m, m)
    sw += 1e-2 * np.trace(sw) / len(sw) * np.eye(len(sw))
    vecs = scipy.linalg.eigh(sb, sw)[1][:, ::-1][:, :k]
    return vecs / np.linalg.norm(vecs, axis=0)


def _accuracy(
    pub: np.ndarray, ypub: np.ndarray, priv: np.ndarray, ypriv: np.ndarray, *, project: str = "none", k: int = 0,
    whiten: bool = False, label_epsilon: float = 4.0, train: int = 75,
) -> tuple[float, float]:  # fmt: skip
    """(private, noiseless) held-out accuracy of the templates for one setting, averaged over the splits."""
    centre = pub.mean(0)
    gp, gv = pub - centre, priv - centre
    p = _projection(pub, ypub, project, k)
    if p is not None:
        gp, gv = gp @ p, gv @ p
    c = float(np.median(np.linalg.norm(gp, axis=1)))
    z = calibrate_noise_multiplier(mechanism="gaussian", total_epsilon=8.0, delta=1e-5, releases=1,
                                   label_epsilon=label_epsilon)  # fmt: skip
    keep = math.exp(label_epsilon) / (math.exp(label_epsilon) + CLASSES - 1)
    w = None
    if whiten:
        sw = sum(np.cov(gp[ypub == q].T, bias=True) * np.mean(ypub == q) for q in np.unique(ypub))
        vals, vecs = np.linalg.eigh(sw + np.trace(sw) / len(sw) * np.eye(len(sw)))
        w = vecs @ np.diag(vals**-0.5) @ vecs.T
    private, clean = [], []
    for split in range(SPLITS):
        rng = np.random.default_rng(split)
        rows = [rng.permutation(np.flatnonzero(ypriv == q)) for q in range(CLASSES)]
        tr = np.concatenate([r[:train] for r in rows])
        te = np.concatenate([r[-HELD_OUT:] for r in rows])
        x, y = _clip(gv[tr], c), ypriv[tr]
        noisy = x + rng.normal(0.0, 2 * z * c, x.shape)
        sent = np.where(rng.random(len(y)) < keep, y, (y + rng.integers(1, CLASSES, len(y))) % CLASSES)
        templates = np.stack([noisy[sent == q].mean(0) for q in range(CLASSES)])
        noiseless = np.stack([x[y == q].mean(0) for q in range(CLASSES)])
        xt = _clip(gv[te], c)
        if w is not None:
            xt, templates, noiseless = xt @ w, templates @ w, noiseless @ w
        private.append(np.mean((xt @ templates.T).argmax(1) == ypriv[te]))
        clean.append(np.mean((xt @ noiseless.T).argmax(1) == ypriv[te]))
    return float(np.mean(private)), float(np.mean(clean))


def main() -> None:
    workdir = Path(sys.argv[1] if len(sys.argv) > 1 else "runs/demo")
    weights = workdir / "pretrained" / "weights.pt"
    if not weights.is_file():
        raise SystemExit(f"no pretrained weights at {weights}: run `dpa demo --workdir {workdir}` first")
    torch.set_num_threads(2)
    public_root = next((workdir / "pretrained" / "faces").iterdir())
    private_root = cached_faces(workdir / "levers-faces", SynthConfig(identities=CLASSES, per_identity=PER_IDENTITY))
    pub_index, priv_index = index_faces(public_root, min_faces_per_person=1), index_faces(private_root)
    std = (PRETRAIN_PIXEL_STD,) * 3
    pub_images = load_batch(list(pub_index.paths), size=64, mean=VGGFACE_MEAN, std=std)
    priv_images = load_batch(list(priv_index.paths), size=64, mean=VGGFACE_MEAN, std=std)
    ypub, ypriv = np.asarray(pub_index.labels), np.asarray(priv_index.labels)
    print("| lever | setting | private acc (whole-run eps 8) | the same templates without noise |")
    print("|---|---|---|---|")
    feats = {cut: (_features(weights, cut, pub_images), _features(weights, cut, priv_images))
             for cut in ("pool5", "fc6", "fc7")}  # fmt: skip
    pub, priv = feats["pool5"]

    def row(lever: str, setting: str, fp: np.ndarray, fv: np.ndarray, **kw: object) -> None:
        a, a0 = _accuracy(fp, ypub, fv, ypriv, **kw)  # type: ignore[arg-type]
        print(f"| {lever} | {setting} | {a:.3f} | {a0:.3f} |", flush=True)

    row("the demo's recipe", "pool5, label eps 4, 75 images per identity", pub, priv)
    for cut in ("fc6", "fc7"):
        row("cut", cut, *feats[cut])
    for kind, k in (("pca", 16), ("pca", 64), ("lda", 9), ("lda", 39)):
        row("public projection before the clip", f"{kind.upper()} to {k} dimensions", pub, priv, project=kind, k=k)
    row("scores whitened", "public within-class covariance", pub, priv, whiten=True)
    for eps in (3.0, 5.0, 6.0):
        row("label epsilon (of the 8)", f"{eps:g}", pub, priv, label_epsilon=eps)
    for n in (150, 225):
        row("images per identity", f"{n} for training", pub, priv, train=n)


if __name__ == "__main__":
    main()
