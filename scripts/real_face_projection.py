"""Which public projection before the class-sum release on photographs? Chosen on public LFW people only.

Usage: python scripts/real_face_projection.py [LFW]   (LFW: ../shared/data/lfw; about 11 min on 2 cores the first
time: alignment 4.5 min and the network 1.5 min plain, 3 min flip-averaged, all cached under
runs/real-face-projection/)

The real-face demo (``dpa demo --faces``) exports dlib's network at its embedding with a public projection
(``dpa export --release-dims K --release-whitening W``: the top K principal directions of the centred
embeddings of its public-centre people, row i scaled by (s_i / s_1) ** -W). This script chooses K and W where
the demo's device people cannot be seen: for each of the demo's seeds 0-2 it forms the same public sets as
``dpa.runs.real_faces`` (people with 2-9 photos ranked by the seed's hash: 300 for the centre and the
projection, the rest public), and enrols the public people with 6-9 photos outside the centre 5 photos each
(the few-photo run's shape; the rest are probes). The release is ``dpa.privacy.class_sums`` itself
(add-remove, sensitivity C, z from the accountant for whole-run epsilon 8 and 1, delta 1e-5, C half the
public median norm), 8 noise draws per seed; the score is the device's cosine to the noisy sums.
Embeddings come from the exporter's torch twin of dlib's network (equal to the export within 1e-6), plain or
flip-averaged (``dpa export --flip-average``: the head averages each photo's descriptor with its mirror
image's, for the public side, the enrolled photos and the probes alike).
"""

from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from dpa.faces.align import align_images
from dpa.faces.chips import preprocess_chips
from dpa.faces.lfw import IMAGE_EXTENSIONS
from dpa.privacy.accountant import calibrate_noise_multiplier
from dpa.privacy.class_sums import Adjacency, contributions, release_class_sums
from dpa.privacy.release_clip import public_clip_from_norms
from dpa.runs.lfw_eval import images_root
from dpa.runs.real_faces import seeded_rank
from exporter.export import principal_basis
from exporter.networks.dlib import default_dat
from exporter.networks.dlib_resnet import build_parts, load_dat

WORK = Path("runs/real-face-projection")
# (dims, whitening), each plain and flip-averaged; at 48 / 0.4 also replace-one, which releases counts too, at
# twice the noise (sensitivity 2C)
GRID = [(32, 0.0), (32, 0.4), (48, 0.0), (48, 0.2), (48, 0.4), (48, 0.6), (48, 1.0), (64, 0.0), (64, 0.4), (80, 0.4)]
DRAWS = 8


def _embeddings(lfw: Path, mirror: bool) -> tuple[np.ndarray, np.ndarray]:
    """(embeddings (N, 128) float64, identity names (N,)) of every LFW photo with a face found, cached; with
    ``mirror`` the flip-averaged head's."""
    cache = WORK / ("embeddings-flip-average.npz" if mirror else "embeddings.npz")
    if cache.is_file():
        d = np.load(cache)
        return d["e"], d["names"]
    root = images_root(lfw)
    images = sorted(p for p in root.glob("*/*") if p.suffix.lower() in IMAGE_EXTENSIONS)
    print(f"aligning {len(images)} photographs into {WORK / 'chips'} (kept)", flush=True)
    align_images(images, root, WORK / "chips", workers=2)
    chips = sorted((WORK / "chips").glob("*/*.png"))
    head, tail = build_parts("embedding", num_classes=2, mirror=mirror)
    load_dat((head, tail), default_dat(), seed=0)
    torch.set_num_threads(2)
    out = []
    for start in range(0, len(chips), 64):
        batch = np.stack([np.asarray(Image.open(p).convert("RGB")) for p in chips[start : start + 64]])
        with torch.no_grad():
            out.append(head.eval()(torch.from_numpy(preprocess_chips(batch))).double().numpy())
    e, names = np.concatenate(out), np.array([p.parent.name for p in chips])
    np.savez(cache, e=e, names=names)
    return e, names


def main() -> None:
    lfw = Path(sys.argv[1] if len(sys.argv) > 1 else "../shared/data/lfw")
    WORK.mkdir(parents=True, exist_ok=True)
    z = {eps: calibrate_noise_multiplier(mechanism="gaussian", total_epsilon=eps, delta=1e-5, releases=1)
         for eps in (8.0, 1.0)}  # fmt: skip
    scores: dict[tuple[bool, int, float, float, str], list[float]] = {}
    for flip in (False, True):
        _simulate(*_embeddings(lfw, flip), flip, z, scores)
    print("flip  dims  whitening  adjacency    eps 8 (mean, min over draws)  eps 1")
    for flip, k, w, eps, adjacency in sorted(scores, key=lambda key: (key[4] != "add-remove", key[:3])):
        if eps == 8.0:
            a, b = scores[(flip, k, w, 8.0, adjacency)], scores[(flip, k, w, 1.0, adjacency)]
            print(
                f"{'yes' if flip else 'no':4s}  {k:4d}  {w:9.1f}  {adjacency:11s}  {np.mean(a):.3f} ({np.min(a):.3f})"
                f"               {np.mean(b):.3f} ({np.min(b):.3f})"
            )


def _simulate(e: np.ndarray, names: np.ndarray, flip: bool, z: dict[float, float], scores: dict) -> None:
    """Every GRID point's accuracies over the 3 public splits x DRAWS noise draws, added to ``scores``."""
    count = Counter(names.tolist())
    for seed in (0, 1, 2):
        public = sorted((n for n, c in count.items() if 2 <= c < 10), key=lambda n: seeded_rank(n, seed))
        centre = np.isin(names, public[:300])
        people = sorted(n for n in public[300:] if count[n] >= 6)
        rng = np.random.default_rng(seed)
        enrol, probe = [], []
        for n in people:
            rows = rng.permutation(np.flatnonzero(names == n))
            enrol.append(rows[:5])
            probe.append(rows[5:])
        tr, te = np.concatenate(enrol), np.concatenate(probe)
        label = {n: i for i, n in enumerate(people)}
        y_tr, y_te = np.array([label[n] for n in names[tr]]), np.array([label[n] for n in names[te]])
        mean = e[centre].mean(axis=0)
        for k, w in GRID:
            basis = principal_basis(e[centre] - mean, k, w).astype(np.float64)
            c = public_clip_from_norms(np.linalg.norm((e[centre] - mean) @ basis.T, axis=1))
            x = (e - mean) @ basis.T
            x *= np.minimum(1.0, c / np.linalg.norm(x, axis=1, keepdims=True))
            probes = x[te] / np.linalg.norm(x[te], axis=1, keepdims=True)
            for adjacency in (
                (Adjacency.ADD_REMOVE, Adjacency.REPLACE_ONE) if (k, w) == (48, 0.4) else (Adjacency.ADD_REMOVE,)
            ):
                counts = adjacency is Adjacency.REPLACE_ONE
                totals = contributions(x[tr], y_tr, len(people), c, counts=counts)
                for eps, zz in z.items():
                    for draw in range(DRAWS):
                        release = release_class_sums(totals, clip=c, noise_multiplier=zz, adjacency=adjacency,
                                                     rng=np.random.default_rng(1000 * seed + draw))  # fmt: skip
                        t = release.sums / np.linalg.norm(release.sums, axis=1, keepdims=True)
                        right = float(np.mean((probes @ t.T).argmax(1) == y_te))
                        scores.setdefault((flip, k, w, eps, adjacency.value), []).append(right)
        print(f"seed {seed}{' (flip-averaged)' if flip else ''}: {len(people)} public people, {len(tr)} enrolled, "
              f"{len(te)} probes", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
