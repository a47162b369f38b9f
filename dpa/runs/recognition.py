"""The field's figures for a device that enrolled: identification, verification and open-set rejection.

After a run the device keeps the server's templates (``runtime_client.on_device.GALLERY_FILE``) and
classifies its clean images with them. Face recognition is judged on more than that closed-set
accuracy (issue 23):

* **verification**: pairs of the device's held-out images (identities the public network never saw)
  scored by the cosine of their embeddings (``on_device.pair_embeddings``: the head's own output, not
  centred as releases are): ROC AUC, TAR at FAR 1e-3, and the accuracy at the
  threshold chosen on *public* pairs (held-out public identities, ``VALIDATION_SEED``);
* **open set**: strangers (identities the device never enrolled, ``STRANGER_SEED``) must be rejected.
  A probe's score is its best cosine to a template; the threshold is the lowest at which at most
  ``OPEN_SET_FAR`` of *public* faces get past the device's own gallery with ``OPEN_SET_CONFIDENCE``
  (``_public_thresholds``), chosen before any private image is scored. Open-set faces need one photo per
  person (LFW's 4,069 people with one photo serve), pairs two.

Every threshold comes from public faces; the private test images only ever get scored.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from dpa.contract.devices import DeviceProfile, resolve_device
from dpa.contract.errors import UserError
from dpa.contract.manifest import load_manifest
from dpa.faces.lfw import FaceIndex, index_faces
from dpa.faces.synth import SynthConfig, cached_faces
from dpa.faces.verification import (
    cosine_scores,
    far_threshold_bound,
    open_set,
    roc_points,
    sample_pairs,
    unit_rows,
    verification,
)
from exporter.pretrain import VALIDATION_SEED
from runtime_client.head import HeadModel
from runtime_client.on_device import (
    GALLERY_FILE,
    embed_files,
    load_gallery,
    pair_embeddings,
    save_gallery,
    template_scores,
)

__all__ = [
    "OPEN_SET_CONFIDENCE",
    "OPEN_SET_FAR",
    "STRANGER_SEED",
    "RecognitionData",
    "calibrate_gallery",
    "recognition_data",
    "recognition_metrics",
]

#: The built-in generator's seed for strangers: people a device meets but never enrolled.
STRANGER_SEED = 3
#: The share of public strangers the open-set threshold accepts at most ...
OPEN_SET_FAR = 0.01
#: ... with this confidence (``verification.far_threshold_bound``): a bound, not an estimate.
OPEN_SET_CONFIDENCE = 0.95


@dataclass(frozen=True)
class RecognitionData:
    public: Path  # held-out public identities: thresholds are chosen on them
    strangers: Path  # never-enrolled identities, device side
    # The public faces' embeddings, kept while this object lives, by what makes them (the export's head files,
    # the set, the clip, the scale): a real-face run scores six galleries with three exports, each on ~5,000
    # public faces, and the head is frozen, so they come out the same each time.
    embedded: dict[tuple[Any, ...], np.ndarray] = field(default_factory=dict, compare=False, repr=False)

    def kept(self, key: tuple[Any, ...], make: Callable[[], np.ndarray]) -> np.ndarray:
        """``make()``, or what it gave for the same ``key`` before."""
        if key not in self.embedded:
            self.embedded[key] = make()
        return self.embedded[key]


def recognition_data(root: Path, size: int, *, public_identities: int = 100, strangers: int = 20) -> RecognitionData:
    """The built-in public validation faces and strangers (drawn once under ``root``)."""
    return RecognitionData(
        cached_faces(root, SynthConfig(identities=public_identities, per_identity=8, size=size, seed=VALIDATION_SEED)),
        cached_faces(root, SynthConfig(identities=strangers, per_identity=5, size=size, seed=STRANGER_SEED)),
    )


def _head_files(manifest: Any) -> tuple[tuple[str, str], ...]:
    """The export's head files and their hashes: what a public face's embedding depends on besides clip and
    scale."""
    return tuple(sorted((k, v) for k, v in manifest.files.items() if k.startswith("head/")))


def _public_embeddings(
    data: RecognitionData, which: str, head: HeadModel, manifest: Any, clip: float, scale: float
) -> np.ndarray:  # fmt: skip
    """``data``'s public faces (``which``: "public" or "strangers"; one photo per person is enough) as the
    gallery's probes are embedded, kept by the export's head files (their hashes), the clip and the scale."""

    def embed() -> np.ndarray:
        return _embed(head, index_faces(getattr(data, which), min_faces_per_person=1), manifest, clip, scale)

    return data.kept((which, _head_files(manifest), clip, scale), embed)


def _embed(head: HeadModel, index: FaceIndex, manifest: Any, clip: float, scale: float) -> np.ndarray:
    return embed_files(head, manifest, list(index.paths), clip, scale)


def _public_thresholds(
    pair_e: np.ndarray, labels: np.ndarray, e: np.ndarray, templates: np.ndarray
) -> tuple[float, float]:
    """(pair threshold: best accuracy on public pairs of ``pair_e`` with ``labels``; open-set threshold: the
    lowest score that at most OPEN_SET_FAR of faces like the public ``e`` pass as their best cosine to the
    device's own ``templates``, with OPEN_SET_CONFIDENCE).

    The open-set threshold is chosen against the gallery the device holds, noise and all, not against public
    templates built to look like it: a private template is a noisy sum over many photos, and thresholds
    from noiseless public templates of a few photos accepted none of a private gallery's own people (issue
    35), from noisy ones still too many strangers (LFW: 0.98 rejected at epsilon 8, 0.93 at 1, simulated).
    The templates are the server's answer to a DP release and the faces public, so this is post-processing
    and costs no privacy; the faces are people the device never enrolled, so every best score is an
    impostor's."""
    pairs = sample_pairs(labels, np.random.default_rng(0), genuine=3000, impostor=10000)
    pair_threshold = verification(cosine_scores(pair_e, pairs), pairs.same)["threshold"]
    t = unit_rows(templates.reshape(len(templates), -1))
    public_best = (unit_rows(e) @ t.T).max(axis=1)
    return pair_threshold, far_threshold_bound(public_best, OPEN_SET_FAR, OPEN_SET_CONFIDENCE)


def calibrate_gallery(artifacts: Path, state_dir: Path, data: RecognitionData) -> None:
    """Choose the gallery's two thresholds on public faces and keep them in it (``dpa recognize`` and
    ``dpa verify`` use them): the pair threshold of best accuracy on public pairs (people with two photos or
    more), and the open-set threshold that lets at most ``OPEN_SET_FAR`` of faces like the public ones past the
    gallery's own templates, with ``OPEN_SET_CONFIDENCE`` (every public face, one photo per person is enough)."""
    manifest = load_manifest(artifacts, verify=("head",))
    path = Path(state_dir) / GALLERY_FILE
    gallery = load_gallery(path)
    head = HeadModel(artifacts, manifest, resolve_device(DeviceProfile.CPU))
    pairs = index_faces(data.public, min_faces_per_person=2)
    e = _public_embeddings(data, "public", head, manifest, gallery.clip, gallery.scale)
    pair_e = data.kept(("pairs", _head_files(manifest)), lambda: pair_embeddings(head, manifest, list(pairs.paths)))
    templates = gallery.templates[np.asarray(gallery.counts) > 0]  # the classes the device can answer with
    pair_t, open_t = _public_thresholds(pair_e, pairs.labels, e, templates.astype(np.float64))
    save_gallery(path, replace(gallery, open_set_threshold=open_t, pair_threshold=pair_t))


def recognition_metrics(artifacts: Path, state_dir: Path, test: FaceIndex, data: RecognitionData) -> dict[str, Any]:
    """Identification, verification and open-set figures of a device that kept a gallery in ``state_dir``,
    at the thresholds ``calibrate_gallery`` chose on public faces."""
    manifest = load_manifest(artifacts, verify=("head",))
    gallery = load_gallery(Path(state_dir) / GALLERY_FILE)
    if not math.isfinite(gallery.open_set_threshold):
        raise UserError(f"the gallery in {state_dir} has no thresholds yet: calibrate it on public faces first")
    head = HeadModel(artifacts, manifest, resolve_device(DeviceProfile.CPU))
    pair_t, open_t = gallery.pair_threshold, gallery.open_set_threshold
    e = _embed(head, test, manifest, gallery.clip, gallery.scale)
    pairs = sample_pairs(test.labels, np.random.default_rng(0), genuine=3000, impostor=10000)
    pair_scores = cosine_scores(pair_embeddings(head, manifest, list(test.paths)), pairs)
    ver = verification(pair_scores, pairs.same, threshold=pair_t)
    t = gallery.templates.reshape(len(gallery.templates), -1).astype(np.float64)
    scores = template_scores(e, t, np.maximum(gallery.counts, 0))  # the device's classifier (on_device)
    ident = float(np.mean(scores.argmax(axis=1) == test.labels))
    unit_t = unit_rows(t)
    cos = unit_rows(e) @ unit_t.T
    strangers = _public_embeddings(data, "strangers", head, manifest, gallery.clip, gallery.scale)
    stranger_best = (unit_rows(strangers) @ unit_t.T).max(axis=1)
    opened = open_set(cos.max(axis=1), scores.argmax(axis=1) == test.labels, stranger_best, threshold=open_t)
    return {
        "identification_accuracy": ident,
        "verification_auc": ver["auc"],
        "tar_at_far_1e-3": ver["tar_at_far_1e-3"],
        "verification_accuracy": ver["accuracy"],
        "verification_threshold": pair_t,
        "open_set_rejection": opened["open_set_rejection"],
        "open_set_identification_rate": opened["identification_rate_at_threshold"],
        "open_set_threshold": open_t,
        "open_set_far_public": OPEN_SET_FAR,
        "open_set_confidence": OPEN_SET_CONFIDENCE,
        "pairs": {"genuine": ver["genuine_pairs"], "impostor": ver["impostor_pairs"]},
        "strangers": opened["strangers"],
        "roc": roc_points(pair_scores, pairs.same),
    }
