"""The honest non-private reference: the best of several non-private recipes on the device's training data.

A private figure means little as a share of a weak reference (issue 23: 0.44 was "92%" of the demo's own
0.56, and 55% of a careful fine-tune's 0.80). So the demo's non-private figure is the best of:

* **class templates** and **head + tail**: the demo's own non-private run (``dpa.runs.demo``);
* **linear probe**: multinomial logistic regression (scikit-learn) on the frozen public fc7 embeddings;
* **fine-tune**: the whole network trained end to end from the public weights (``exporter.fine_tune``).

Every hyperparameter (the probe's regularisation C, the fine-tune's learning rate) is chosen on a PUBLIC
task of the device task's shape: the generator's identities of ``TUNING_SEED`` (neither the device's nor
any other public set's), split as the device splits, scored on its own held-out images. The private test
set is only ever scored, once per recipe, after the choice. Tuning the fine-tune costs minutes, so its
result is cached next to the weights, keyed by their SHA-256 and the grid (the shipped weights ship theirs:
``scripts/tune_reference.py`` writes it).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler

from dpa.base.atomic import atomic_write_bytes
from dpa.contract.architecture import ArchConfig
from dpa.contract.errors import UserError
from dpa.contract.manifest import sha256_file
from dpa.faces.lfw import FaceIndex, index_faces, load_batch, split_faces
from exporter.fine_tune import FineTuneConfig, fine_tune, predict
from exporter.pretrain import embed, public_faces
from exporter.vggface import build_parts, load_weights

__all__ = ["TUNING_SEED", "Preprocess", "ReferenceConfig", "reference_accuracies", "tune_reference", "tuning_path"]

#: The generator's seed for the public task the reference's hyperparameters are chosen on (devices: 0,
#: public pretraining 1, its validation 2, open-set strangers 3).
TUNING_SEED = 4


@dataclass(frozen=True)
class Preprocess:
    """How images become the network's input: the manifest's (or the export's) size, mean and std."""

    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]

    def load(self, index: FaceIndex) -> np.ndarray:
        return load_batch(list(index.paths), size=self.image_size, mean=self.mean, std=self.std)


@dataclass(frozen=True)
class ReferenceConfig:
    lrs: tuple[float, ...] = (1e-3, 3e-3, 1e-2)  # the fine-tune's learning rates tried on the public task
    epochs: int = 12  # the fine-tune's length (the transfer recipe's, not tuned: each try costs a minute)
    probe_cs: tuple[float, ...] = (0.001, 0.01, 0.1, 1.0)  # the linear probe's inverse regularisation
    tuning_identities: int = 10  # the public task's shape: the demo's device task
    tuning_per_identity: int = 100
    test_fraction: float = 0.25
    split_seed: int = 0
    seed: int = 0  # the fine-tune's fresh classifier, shuffling and augmentation

    def __post_init__(self) -> None:
        if not self.lrs or not self.probe_cs or min(self.lrs) <= 0 or min(self.probe_cs) <= 0:
            raise UserError("the reference needs at least one positive learning rate and probe C")
        if self.tuning_identities < 2 or self.tuning_per_identity < 2:
            raise UserError("the public tuning task needs >= 2 identities of >= 2 images")


def tuning_path(weights: Path) -> Path:
    """Where the tuning of these weights is cached: beside them (``<weights>.reference.json``)."""
    return Path(str(weights) + ".reference.json")


def _key(weights: Path, arch: ArchConfig, pre: Preprocess, cfg: ReferenceConfig) -> dict[str, Any]:
    return {"weights_sha256": sha256_file(weights), "image_size": arch.image_size, "width": arch.width,
            "mean": list(pre.mean), "std": list(pre.std), "config": asdict(cfg) | {"lrs": list(cfg.lrs),
            "probe_cs": list(cfg.probe_cs)}, "tuning_seed": TUNING_SEED}  # fmt: skip


def _probe(train: tuple[np.ndarray, np.ndarray], c: float) -> Callable[[np.ndarray], np.ndarray]:
    scaler = StandardScaler().fit(train[0])
    model = LogisticRegression(C=c, max_iter=3000).fit(scaler.transform(train[0]), train[1])
    return lambda e: model.predict(scaler.transform(e))


def _embedder(weights: Path, arch: ArchConfig) -> torch.nn.Module:
    head, tail = build_parts(arch, "fc7")
    load_weights((head, tail), weights)
    return head


def tune_reference(
    weights: Path, arch: ArchConfig, pre: Preprocess, cfg: ReferenceConfig, *, cache: Path, workdir: Path,
    say: Callable[[str], None] = print,
) -> dict[str, Any]:  # fmt: skip
    """The hyperparameters chosen on the public task (and every candidate's public score), from ``cache``
    when it was made for the same weights, preprocessing and grid, else computed and written there."""
    key = _key(weights, arch, pre, cfg)
    try:
        saved = json.loads(cache.read_text())
        if saved.get("key") == key:
            return saved
    except (OSError, ValueError):
        pass
    say(f"choosing the reference's hyperparameters on public faces (seed {TUNING_SEED}): {len(cfg.lrs)} fine-tunes")
    root = public_faces(workdir, cfg.tuning_identities, cfg.tuning_per_identity, arch.image_size, TUNING_SEED)
    train, test = split_faces(index_faces(root, min_faces_per_person=2), test_fraction=cfg.test_fraction,
                              seed=cfg.split_seed)  # fmt: skip
    xtr, xte = pre.load(train), pre.load(test)
    head = _embedder(weights, arch)
    etr, ete = embed(head, torch.from_numpy(xtr)), embed(head, torch.from_numpy(xte))
    probe = {str(c): float(np.mean(_probe((etr, train.labels), c)(ete) == test.labels)) for c in cfg.probe_cs}
    tuned = ArchConfig(image_size=arch.image_size, width=arch.width, num_classes=len(train.names), dropout=0.0)
    fine = {}
    for lr in cfg.lrs:
        model = fine_tune(weights, tuned, xtr, train.labels, FineTuneConfig(lr=lr, epochs=cfg.epochs, seed=cfg.seed))
        fine[str(lr)] = float(np.mean(predict(model, xte) == test.labels))
        say(f"  fine-tune lr {lr:g}: {fine[str(lr)]:.3f} on the public task's held-out images")
    result = {
        "what": "the non-private reference's hyperparameters, chosen on public faces only (dpa.runs.reference)",
        "command": "python scripts/tune_reference.py",
        "key": key,
        "public_task": {
            "seed": TUNING_SEED,
            "identities": cfg.tuning_identities,
            "per_identity": cfg.tuning_per_identity,
        },  # fmt: skip
        "probe_public_accuracy": probe,
        "fine_tune_public_accuracy": fine,
        # ties go to the smaller value: the more regularised probe, the gentler learning rate
        "probe_c": float(max(cfg.probe_cs, key=lambda c: (probe[str(c)], -c))),
        "fine_tune_lr": float(max(cfg.lrs, key=lambda lr: (fine[str(lr)], -lr))),
    }
    atomic_write_bytes(cache, (json.dumps(result, indent=1) + "\n").encode())
    return result


def reference_accuracies(
    weights: Path, arch: ArchConfig, pre: Preprocess, train: FaceIndex, test: FaceIndex, tuning: dict[str, Any],
    cfg: ReferenceConfig,
) -> dict[str, float]:  # fmt: skip
    """Held-out accuracy of the linear probe and the fine-tune on the device's data, with ``tuning``'s
    hyperparameters (chosen before, on public faces): the private test set is scored once per recipe."""
    xtr, xte = pre.load(train), pre.load(test)
    head = _embedder(weights, arch)
    etr, ete = embed(head, torch.from_numpy(xtr)), embed(head, torch.from_numpy(xte))
    probe = _probe((etr, train.labels), tuning["probe_c"])(ete)
    ft = FineTuneConfig(lr=tuning["fine_tune_lr"], epochs=cfg.epochs, seed=cfg.seed)
    model = fine_tune(weights, arch, xtr, train.labels, ft)
    return {"linear probe": float(np.mean(probe == test.labels)),
            "fine-tune": float(np.mean(predict(model, xte) == test.labels))}  # fmt: skip
