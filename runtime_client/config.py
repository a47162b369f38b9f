"""``ClientConfig``: everything a device run is told, validated once on construction."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from dpa.contract import wire
from dpa.contract.choices import Choice
from dpa.contract.devices import DeviceProfile
from dpa.contract.errors import UserError
from dpa.faces.synth import SynthConfig
from dpa.privacy import checks
from dpa.privacy.class_sums import Adjacency
from dpa.privacy.mechanism import DPConfig, Mechanism
from dpa.privacy.release_plan import check_budget
from runtime_client.head import ModelFormat

__all__ = ["ClientConfig", "ReleaseKind", "RECOMMENDED_TOTAL_EPSILON"]

#: ``dpa client``'s defaults are the frontier's best recipe (docs/history.md, "Where the frontier is"): the
#: exported public head frozen, each example released once, activations and labels together within this
#: whole-run epsilon (delta 1e-5), and the device classifying with the server's class templates.
#: ``ClientConfig``'s own field defaults stay plain (no budget, a trained head) for programs and tests.
RECOMMENDED_TOTAL_EPSILON = 8.0


class ReleaseKind(Choice):
    """What the device releases to the server."""

    # DP-A: every example's activation with its own noise (and its randomised label), step by step;
    # the server trains its tail on them (and may keep templates).
    EXAMPLES = "examples"
    # Once: each class's sum of clipped activations and its count, with one draw of noise, labels
    # inside the same guarantee (dpa.privacy.class_sums); the server keeps them as class templates.
    # A frozen head only: nothing is sent back to train it.
    CLASS_SUMS = "class-sums"


@dataclass(frozen=True)
class ClientConfig:
    server: str = "http://127.0.0.1:8080"  # the edge server's base URL
    artifacts: Path = Path("artifacts")  # export folder; only manifest.json and head/ are read
    data: str = "synthetic"  # "synthetic" (built-in faces) or a folder in LFW layout
    device: DeviceProfile = DeviceProfile.CPU
    epochs: int = 5
    batch_size: int = 8  # the seed's batch size
    lr: float | None = None  # head learning rate; None: the manifest's
    dp: DPConfig = field(default_factory=DPConfig)
    # Each release also sends the example's label randomised on the device at this epsilon (RRWithPrior,
    # dpa.privacy.label_randomizer); the accountant composes it with the activation's. inf: labels in
    # clear (warned). The prior is the softmax of the server's logits for the example's last release
    # ("logits") or uniform ("uniform").
    label_epsilon: float = 4.0
    label_prior: str = "logits"
    seed: int | None = None  # None: unpredictable noise and shuffling (what deployments want)
    min_faces_per_person: int = 2  # identities with fewer images are skipped (as scikit-learn's LFW loader)
    test_fraction: float = 0.25  # held-out images per identity
    # Enrol exactly this many images per identity and hold out the rest (overrides test_fraction): a phone
    # that enrols a person from a few photos. None: test_fraction.
    train_per_identity: int | None = None
    split_seed: int = 0  # fixed so that `dpa eval` sees the same held-out images as training
    synth: SynthConfig = field(default_factory=SynthConfig)  # the built-in data set (size follows the manifest)
    state_dir: Path = Path("runs/client")  # head checkpoint and synthetic-data cache
    resume: bool = False  # continue from state_dir's head checkpoint
    report: Path | None = None  # JSON report path
    model_format: ModelFormat = ModelFormat.AUTO
    max_steps_per_epoch: int | None = None  # cap for quick runs; None: whole epoch
    # Whole-run budget: calibrate the noise so that `epochs` releases of each example stay within
    # this epsilon (dp-accounting's PLD accountant; dp.epsilon is then None); None: `dp.epsilon` is per
    # release, no budget (dpa.privacy.release_plan).
    total_epsilon: float | None = None
    # Examples per head call on the device; None: the whole batch. 1 keeps one example's
    # activations in memory instead of the batch's (a phone's setting; same update).
    micro_batch: int | None = None
    # How the release travels: float16 halves the upload (rounded after the noise: no privacy cost).
    release_dtype: wire.ReleaseDtype = wire.ReleaseDtype.FLOAT32
    progress: bool = True  # rich progress bar
    token: str | None = field(default=None, repr=False)  # bearer token for the server (never printed)
    ca: Path | None = None  # CA certificate (PEM) to trust for an https server, besides the system's
    retry_s: float = 600.0  # keep retrying a request through network errors and server restarts this long
    # Record the server's view here (docs/server_view.md): each training release as sent, its labels,
    # the head that made it and the public parameters. None: record nothing.
    record_view: Path | None = None
    record_view_limit: int | None = None  # record at most this many releases (steps); None: all
    # The head stays as exported (public weights): no head update, and each example is released
    # `releases_per_example` times (default 1); later epochs re-send those same bytes (runtime_client.release_cache).
    frozen_head: bool = False
    releases_per_example: int | None = None  # only with frozen_head
    # After training, fetch the server's class templates (GET /v1/templates) and measure the clean
    # held-out accuracy of classifying on the device with them (runtime_client.on_device).
    on_device_templates: bool = False
    release: ReleaseKind = ReleaseKind.EXAMPLES
    # Class sums only: which neighbouring data sets the guarantee is stated for (dpa.privacy.class_sums):
    # replace-one (counts released, sensitivity 2C) or add-remove (no counts, sensitivity C). The report gives
    # the epsilon under both either way.
    adjacency: Adjacency = Adjacency.REPLACE_ONE
    # Class sums only: the gallery row of each local class at the edge server (a federation's device names
    # which enrolment ids its identities are, docs/protocol.md's gallery_rows); None: row c for class c.
    gallery_rows: tuple[int, ...] | None = None

    @property
    def releases(self) -> int:
        """How many times each training example is released over the run: what the accountant counts."""
        if self.release is ReleaseKind.CLASS_SUMS:
            return 1
        if not self.frozen_head:
            return self.epochs
        return min(self.epochs, self.releases_per_example or 1)

    def __post_init__(self) -> None:
        if self.epochs < 1:
            raise UserError(f"epochs must be >= 1, got {self.epochs}")
        if self.batch_size < 1:
            raise UserError(f"batch size must be >= 1, got {self.batch_size}")
        if self.lr is not None and not (math.isfinite(self.lr) and self.lr > 0):
            raise UserError(f"learning rate must be a positive number, got {self.lr}")
        if not 0 < self.test_fraction < 1:
            raise UserError(f"test fraction must be in (0, 1), got {self.test_fraction}")
        if not (math.isfinite(self.retry_s) and self.retry_s >= 0):
            raise UserError(f"retry time must be >= 0 seconds, got {self.retry_s}")
        if self.record_view_limit is not None and self.record_view_limit < 1:
            raise UserError(f"the recorded view's release limit must be >= 1, got {self.record_view_limit}")
        checks.epsilon(self.label_epsilon, allow_inf=True, name="label epsilon")
        if self.gallery_rows is not None and (
            len(set(self.gallery_rows)) != len(self.gallery_rows) or min(self.gallery_rows, default=0) < 0
        ):
            raise UserError(f"gallery rows must be distinct rows >= 0, got {list(self.gallery_rows)}")
        if self.releases_per_example is not None:
            if not self.frozen_head:
                raise UserError("--releases-per-example needs --frozen-head (a trained head changes every release)")
            if self.releases_per_example < 1:
                raise UserError(f"releases per example must be >= 1, got {self.releases_per_example}")
        if self.label_prior not in ("logits", "uniform"):
            raise UserError(f"label prior must be 'logits' or 'uniform', got {self.label_prior!r}")
        if self.total_epsilon is not None:
            checks.epsilon(self.total_epsilon, allow_inf=False, name="total epsilon")
        check_budget(self.dp, self.total_epsilon)
        object.__setattr__(self, "release", ReleaseKind.parse(self.release))
        if self.release is ReleaseKind.CLASS_SUMS:
            if not self.frozen_head:
                raise UserError("--release class-sums needs --frozen-head: no gradient comes back to train the head")
            if self.dp.mechanism is not Mechanism.GAUSSIAN:
                raise UserError("--release class-sums uses the Gaussian mechanism (L2 clipping), not laplace")
            if self.releases_per_example not in (None, 1):
                raise UserError("--release class-sums releases each example once: drop --releases-per-example")
        object.__setattr__(self, "adjacency", Adjacency.parse(self.adjacency))
        if self.adjacency is not Adjacency.REPLACE_ONE and self.release is not ReleaseKind.CLASS_SUMS:
            raise UserError("--adjacency add-remove is for --release class-sums (per-example releases are replace-one)")
