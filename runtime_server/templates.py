"""Class templates: a noise-robust learner the server trains from the releases it receives.

Beside the onnxruntime tail, the server can keep, per class, the sum and count of every release it
applied with that (randomised) label. The templates are their means: a nearest-template classifier
(Euclidean, with the noise's share of each template's norm taken out) that averages the noise away
across a class's examples where a network trained by gradient steps at a signal-to-noise ratio far
below one learns nothing. They are a function of the releases only, so sending them back to the
devices costs no privacy: ``GET /v1/templates`` (docs/protocol.md), and the device classifies its
clean inputs locally (``runtime_client.on_device``).

The sums are kept with the tail: saved with every tail checkpoint (``templates.npz``, tagged with the
global step), restored with it and brought forward by the journal's replay, since every step, live
or replayed, passes through ``add``.
"""

from __future__ import annotations

import io
import logging
import math
from pathlib import Path

import numpy as np

from dpa.base.atomic import atomic_write_bytes
from dpa.contract.errors import UserError

__all__ = ["ClassTemplates", "TEMPLATES_FILE", "MAX_TEMPLATE_BYTES"]

log = logging.getLogger(__name__)

TEMPLATES_FILE = "templates.npz"
#: Refuse to keep templates larger than this (classes x elements x 8 bytes): at VGG-Face's paper size
#: (2,622 classes, 3.2 M elements at conv1_1) they would take 67 GB.
MAX_TEMPLATE_BYTES = 2 << 30


class ClassTemplates:
    @staticmethod
    def fit(num_classes: int, activation_shape: tuple[int, ...]) -> bool:
        """Whether templates for this export stay within ``MAX_TEMPLATE_BYTES``."""
        return num_classes * math.prod(activation_shape) * 8 <= MAX_TEMPLATE_BYTES

    def __init__(self, num_classes: int, activation_shape: tuple[int, ...]) -> None:
        d = math.prod(activation_shape)
        if not self.fit(num_classes, activation_shape):
            raise UserError(
                f"class templates would take {num_classes * d * 8 / 2**30:.1f} GiB ({num_classes} classes x {d} "
                "elements); use a deeper cut or run without --templates"
            )
        self.shape = tuple(activation_shape)
        self.sums = np.zeros((num_classes, d), dtype=np.float64)
        self.counts = np.zeros(num_classes, dtype=np.int64)
        self.global_step = 0

    def add(self, activation: np.ndarray, labels: np.ndarray, global_step: int) -> None:
        """Add a step's releases to their labels' sums. One vectorised sum per label present: ``np.add.at``
        over every element took 30-50 ms a step at conv1_1 (64x64), on the tail's thread."""
        labels = np.asarray(labels, dtype=np.int64)
        flat = np.asarray(activation).reshape(len(labels), -1)
        for c in np.unique(labels):
            rows = flat[labels == c]
            self.sums[c] += rows.sum(axis=0, dtype=np.float64)
            self.counts[c] += len(rows)
        self.global_step = global_step

    def means(self) -> np.ndarray:
        """(classes, *activation_shape) float32: each class's mean release (0 for a class never seen)."""
        with np.errstate(invalid="ignore", divide="ignore"):
            m = np.where(self.counts[:, None] > 0, self.sums / np.maximum(self.counts, 1)[:, None], 0.0)
        return m.astype(np.float32).reshape(len(self.counts), *self.shape)

    def save(self, state_dir: Path) -> None:
        buf = io.BytesIO()
        np.savez(buf, sums=self.sums, counts=self.counts, global_step=np.int64(self.global_step))
        atomic_write_bytes(state_dir / TEMPLATES_FILE, buf.getvalue())

    @classmethod
    def restore(
        cls, state_dir: Path, num_classes: int, activation_shape: tuple[int, ...], global_step: int
    ) -> ClassTemplates:
        """The templates saved with the tail checkpoint at ``global_step``; empty ones (and a warning)
        if none were saved at that step, so they never disagree with the tail about what was applied."""
        out = cls(num_classes, activation_shape)
        path = state_dir / TEMPLATES_FILE
        if not path.is_file():
            if global_step:
                log.warning(
                    "no saved class templates: they start empty", extra={"fields": {"global_step": global_step}}
                )
            return out
        try:
            with np.load(path, allow_pickle=False) as z:
                sums, counts, step = z["sums"], z["counts"], int(z["global_step"])
        except (OSError, ValueError, KeyError) as exc:
            raise UserError(f"{path} is unreadable ({exc}); move it away to start the templates empty") from None
        if step != global_step or sums.shape != out.sums.shape:
            log.warning("saved class templates do not match the tail checkpoint: they start empty",
                        extra={"fields": {"templates_step": step, "tail_step": global_step}})  # fmt: skip
            return out
        out.sums, out.counts, out.global_step = sums, counts, step
        return out
