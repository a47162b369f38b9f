"""The head's optimizer, in numpy: what onnxruntime-training's optimizer graphs did, without them.

The manifest names the optimizer (``OptimizerConfig``); both follow onnxruntime's training ops, so a head
trained here and one trained with the training API take the same steps (the tests compare them):

- ``sgd``: onnxruntime's SGDOptimizerV2, ``w -= lr * g`` (no momentum, no weight decay);
- ``adamw``: onnxruntime's AdamWOptimizer as onnxblock configures it: ``adam_mode`` 1 (Hugging Face's
  AdamW) with bias correction, betas 0.9 and 0.999, eps 1e-6: ``w -= lr sqrt(1 - b2^t) / (1 - b1^t) *
  m / (sqrt(v) + eps)``, then the decoupled weight decay ``w -= lr * wd * w``.

The state (step count and moments) is plain arrays, saved in the device's own checkpoint.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np

from dpa.contract.manifest import OptimizerConfig, OptimizerName

__all__ = ["HeadOptimizer", "ADAMW_BETAS", "ADAMW_EPS"]

ADAMW_BETAS = (0.9, 0.999)  # onnxblock.optim.AdamW's defaults
ADAMW_EPS = 1e-6


class HeadOptimizer:
    """Applies accumulated gradients to the parameters, in place; ``state`` is what a checkpoint keeps."""

    def __init__(self, config: OptimizerConfig, lr: float, state: Mapping[str, np.ndarray] | None = None) -> None:
        self.config, self.lr = config, lr
        self.state: dict[str, np.ndarray] = dict(state or {})

    @property
    def step_count(self) -> int:
        return int(self.state.get("step", np.zeros((), np.int64)))

    def step(self, params: dict[str, np.ndarray], grads: Mapping[str, np.ndarray]) -> None:
        if self.config.name is OptimizerName.SGD:
            for name, g in grads.items():
                params[name] -= np.float32(self.lr) * g
            return
        t = self.step_count + 1
        b1, b2 = ADAMW_BETAS
        lr, wd = np.float32(self.lr), np.float32(self.config.weight_decay)
        correction1, correction2 = 1.0 - b1**t, 1.0 - b2**t
        step_size = np.float32(self.lr * math.sqrt(correction2) / correction1)
        for name, g in grads.items():
            m = self.state.setdefault(f"{name}.m", np.zeros_like(g))
            v = self.state.setdefault(f"{name}.v", np.zeros_like(g))
            w = params[name]
            m *= np.float32(b1)
            m += np.float32(1.0 - b1) * g
            v *= np.float32(b2)
            v += np.float32(1.0 - b2) * g * g
            w -= step_size * m / (np.sqrt(v) + np.float32(ADAMW_EPS))
            if wd:
                w -= lr * wd * w  # decoupled, after the Adam step (adam_mode 1)
        self.state["step"] = np.asarray(t, dtype=np.int64)
