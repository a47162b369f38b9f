"""How far does one noise draw move the few-photo share? The demo's own release, drawn again many times.

Usage: python scripts/release_draws.py WORKDIR JSON [DRAWS]   (WORKDIR and JSON: a finished ``dpa demo --faces LFW
--seed S --workdir WORKDIR --json JSON``; DRAWS 40 by default; about 2 min on 2 cores, most of it the head over
4,300 chips)

``dpa demo --faces`` releases each enrolled person's sum once, so its share of the non-private recipe is one
draw of the noise. This script takes that run's export, split, clip and noise multiplier (its
``few-private-eps8`` report; the seed and the best non-private accuracy from its JSON), embeds the same
enrolled photos and probes through the same head, and releases the same totals again with
``dpa.privacy.class_sums`` under DRAWS fresh seeds: the spread a phone enrolling five photos a person should
expect. Nothing is chosen here: it only looks, after the choice was made on public people
(``scripts/real_face_projection.py``).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
from rich.progress import track

from dpa.contract.manifest import load_manifest
from dpa.privacy.class_sums import Adjacency, contributions, release_class_sums
from dpa.runs.real_faces import RealFacesConfig, device_embeddings
from runtime_client.config import ClientConfig
from runtime_client.dataset import prepare_data
from runtime_client.on_device import template_scores

RUN = "few-private-eps8"


def main(workdir: Path, summary: Path, draws: int) -> None:
    root, demo = workdir / "real-faces", json.loads(summary.read_text())
    art, report = root / "artifacts-few", json.loads((root / RUN / "report.json").read_text())
    defaults = RealFacesConfig(faces=workdir)  # the demo's few-photo shape: >= 10 photos, 5 enrolled
    manifest = load_manifest(art)
    cfg = ClientConfig(artifacts=art, data=str(root / "sets" / "few"), split_seed=demo["seed"],
                       min_faces_per_person=defaults.few_min_images, train_per_identity=defaults.few_enrol)  # fmt: skip
    train, test = prepare_data(cfg, manifest)
    print(f"embedding {len(train.paths)} enrolled photos and {len(test.paths)} probes", flush=True)
    tr, te = device_embeddings(art, train), device_embeddings(art, test)  # clipped to the export's public clip
    clip, z = manifest.release_clip, report["privacy"]["noise_multiplier"]
    k = len(train.names)
    totals = contributions(tr, train.labels, k, clip, counts=False)
    accs = []
    for d in track(range(draws), description="drawing the noise again"):
        out = release_class_sums(totals, clip=clip, noise_multiplier=z, rng=np.random.default_rng(10_000 + d),
                                 adjacency=Adjacency.ADD_REMOVE)  # fmt: skip
        accs.append(np.mean(template_scores(te, out.sums, np.ones(k)).argmax(axis=1) == test.labels))
    a, best, demo_draw = np.asarray(accs), demo["few_photos"]["best_nonprivate"], report["on_device"]["test_accuracy"]
    share = a / best
    print(
        f"seed {demo['seed']}: the demo's draw {demo_draw:.4f} ({demo_draw / best:.1%}); {draws} draws: mean "
        f"{a.mean():.4f} ({share.mean():.1%}), worst {a.min():.4f} ({share.min():.1%}), best {a.max():.4f} "
        f"({share.max():.1%}); below 90%: {np.mean(share < 0.9):.0%} of draws"
    )


if __name__ == "__main__":
    if len(sys.argv) not in (3, 4):
        sys.exit(__doc__.split("\n\n")[1])
    main(Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3]) if len(sys.argv) == 4 else 40)
