"""Named recipes: the device's config for each way of training privately, and what a run of it reports.

A recipe fixes what leaves the device and whether its head trains; everything else (data, budget, clip,
folders) is the run's. The demo, the sweep, the federation, the real-face runs and the scripts all build
their devices here, so "the class-sum recipe" is one set of settings wherever it is named, and a new
recipe is one member here rather than another branch in each of them.

- ``scratch``: DP-A as the seed has it. The head trains on the device, every example is released every
  epoch, the server trains its tail and returns the activation gradient. Reports the split model's
  (head + tail) accuracy.
- ``public``: a frozen public head (``dpa export --weights --centre-faces``); each example released once
  (later epochs re-send the same bytes), the device classifies with the server's class templates.
- ``class-sums``: the same head; each identity's clipped sum released once, labels inside the guarantee
  (``dpa.privacy.class_sums``); the device classifies with the templates the sums make.

A non-private run of any recipe (``Budget`` None) sends without noise and labels in clear: the reference
a private run's accuracy is stated against.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dpa.contract.choices import Choice
from dpa.contract.devices import DeviceProfile
from dpa.privacy import checks
from dpa.privacy.mechanism import DPConfig
from runtime_client.config import ClientConfig, ReleaseKind

__all__ = ["Budget", "Recipe"]


@dataclass(frozen=True)
class Budget:
    """A private run's whole-run budget: activations and labels together (labels at ``label_epsilon`` per
    release, inside ``total_epsilon``; class sums carry their labels inside the sums and ignore it)."""

    total_epsilon: float
    delta: float = 1e-5
    label_epsilon: float = math.inf

    def __post_init__(self) -> None:
        checks.epsilon(self.total_epsilon, allow_inf=False, name="total epsilon")
        checks.delta(self.delta, allow_zero=False, mechanism="gaussian")
        checks.epsilon(self.label_epsilon, allow_inf=True, name="label epsilon")


class Recipe(Choice):
    """How a device trains privately (module docstring)."""

    SCRATCH = "scratch"
    PUBLIC = "public"
    CLASS_SUMS = "class-sums"

    @property
    def release(self) -> ReleaseKind:
        return ReleaseKind.CLASS_SUMS if self is Recipe.CLASS_SUMS else ReleaseKind.EXAMPLES

    @property
    def frozen_head(self) -> bool:
        """The public recipes keep the exported head: nothing comes back to train it."""
        return self is not Recipe.SCRATCH

    @property
    def classifier(self) -> str:
        """What classifies the held-out images in the run's headline accuracy (``clean_accuracy``)."""
        return "class templates on the device" if self.frozen_head else "head + tail"

    def clean_accuracy(self, report: dict[str, Any]) -> float:
        """The run's headline accuracy: clean held-out images, classified by ``classifier``."""
        return float(report["on_device"]["test_accuracy"] if self.frozen_head else report["clean_test_accuracy"])

    def client_config(
        self, *, artifacts: Path, clip: float, budget: Budget | None, delta: float = 1e-5, epochs: int | None = None,
        **run: Any,
    ) -> ClientConfig:  # fmt: skip
        """The device's config: this recipe, at ``budget`` (None: no noise, labels in clear, ``delta`` kept for
        the record), with the run's own fields (``data``, ``seed``, ``state_dir``, ...) in ``run``.
        ``epochs`` defaults to one for the frozen recipes (each example released once) and to five for
        scratch."""
        private = budget is not None
        fields: dict[str, Any] = {
            "device": DeviceProfile.CPU,
            "frozen_head": self.frozen_head,
            "on_device_templates": self.frozen_head,
            "release": self.release,
        }
        fields.update(run)
        return ClientConfig(
            artifacts=artifacts,
            epochs=epochs if epochs is not None else (1 if self.frozen_head else 5),
            dp=DPConfig(clip=clip, epsilon=None if private else math.inf, delta=budget.delta if private else delta),
            total_epsilon=budget.total_epsilon if private else None,
            label_epsilon=budget.label_epsilon if private else math.inf,
            **fields,
        )
