"""The device's label randomisation for one run: its generator, its priors, and their saved state.

Every training label is randomised (``dpa.privacy.label_randomizer``, RRWithPrior) before it leaves.
The prior for an example is the softmax of the logits the server returned for that example's
previous release (post-processing of a release: it costs no privacy, and a lying server can only
make the labels less useful); an example not released yet has a uniform prior.

Both the generator's state and the priors are saved with the head after every step, so a device
killed mid-step and restarted sends exactly the labels it sent the first time (the server's stored
reply answers those). Only each example's ``TOP`` most likely classes are kept: RRWithPrior picks
from the head of the prior, and this bounds what a checkpoint holds for data sets of many identities.
"""

from __future__ import annotations

import base64
import io
import math

import numpy as np

from dpa.contract.errors import UserError
from dpa.privacy.label_randomizer import randomize_labels
from dpa.privacy.noise_source import generator_state_json, restore_generator_state, secure_generator

__all__ = ["LabelPrivacy"]

TOP = 16  # classes of each example's prior kept
_RNG_KEY = "run.label_rng"
_PRIORS_KEY = "run.label_priors"


class LabelPrivacy:
    def __init__(self, *, epsilon: float, prior: str, examples: int, num_classes: int, seed: int | None) -> None:
        self.epsilon = epsilon
        self.use_logits = prior == "logits"
        self.num_classes = num_classes
        self.rng = secure_generator([seed, 2]) if seed is not None else secure_generator()
        self.top = min(TOP, num_classes)
        self.ids = np.full((examples, self.top), -1, dtype=np.int32)  # -1: no prior yet (uniform)
        self.probs = np.zeros((examples, self.top), dtype=np.float32)

    @property
    def in_clear(self) -> bool:
        return math.isinf(self.epsilon)

    def _priors(self, rows: np.ndarray) -> np.ndarray | None:
        if not self.use_logits or not (self.ids[rows] >= 0).any():
            return None
        out = np.full((len(rows), self.num_classes), 1.0 / self.num_classes)
        for i, r in enumerate(rows):
            if self.ids[r, 0] >= 0:
                out[i] = 0.0
                out[i, self.ids[r]] = self.probs[r]
        return out

    def randomize(self, rows: np.ndarray, labels: np.ndarray) -> np.ndarray:
        """The labels to send for training examples ``rows`` (their true ``labels``)."""
        return randomize_labels(
            labels, epsilon=self.epsilon, num_classes=self.num_classes, rng=self.rng, priors=self._priors(rows)
        )

    def observe(self, rows: np.ndarray, logits: np.ndarray | None) -> None:
        """Keep the softmax of the server's logits for these examples as their next prior."""
        if not self.use_logits or logits is None or logits.shape != (len(rows), self.num_classes):
            return
        z = np.asarray(logits, dtype=np.float64)
        if not np.all(np.isfinite(z)):
            return  # an untrusted server's garbage: keep the old prior
        p = np.exp(z - z.max(axis=1, keepdims=True))
        p /= p.sum(axis=1, keepdims=True)
        top = np.argsort(-p, axis=1, kind="stable")[:, : self.top]
        self.ids[rows] = top
        # float16, as saved: a resumed device randomises from exactly the priors it had
        self.probs[rows] = np.take_along_axis(p, top, axis=1).astype(np.float16)

    def store(self, props) -> None:  # type: ignore[no-untyped-def]
        props[_RNG_KEY] = generator_state_json(self.rng)
        if not self.use_logits or self.in_clear:
            return  # no priors in use: nothing to save with every step
        buf = io.BytesIO()
        np.savez_compressed(buf, ids=self.ids, probs=self.probs.astype(np.float16))
        props[_PRIORS_KEY] = base64.b64encode(buf.getvalue()).decode("ascii")

    def load(self, props) -> None:  # type: ignore[no-untyped-def]
        if _RNG_KEY in props:
            restore_generator_state(self.rng, str(props[_RNG_KEY]))
        if _PRIORS_KEY in props:
            try:
                with np.load(io.BytesIO(base64.b64decode(str(props[_PRIORS_KEY]))), allow_pickle=False) as z:
                    ids, probs = z["ids"], z["probs"].astype(np.float32)
            except (ValueError, OSError, KeyError) as exc:
                raise UserError(f"--resume: the saved label priors are unreadable ({exc})") from None
            if ids.shape != self.ids.shape:
                raise UserError(
                    f"--resume: the saved label priors are for {ids.shape[0]} examples, not {len(self.ids)}"
                )
            self.ids, self.probs = ids, probs
