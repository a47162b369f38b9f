"""The device's training run: the recipe's own run, chosen by what the device releases.

``run_training`` runs one class-sum release (``runtime_client.class_sum_run``) or epochs of per-example
DP-A steps (``runtime_client.example_run``); ``run_evaluation`` measures held-out accuracy through head +
server. The CLI, the loopback runner and the tests start a device here.
"""

from __future__ import annotations

from typing import Any

from runtime_client.class_sum_run import run_class_sums
from runtime_client.config import ClientConfig, ReleaseKind
from runtime_client.example_run import run_evaluation, run_examples

__all__ = ["run_training", "run_evaluation"]


async def run_training(cfg: ClientConfig) -> dict[str, Any]:
    """The run's report (also written to ``cfg.report``)."""
    if cfg.release is ReleaseKind.CLASS_SUMS:
        return await run_class_sums(cfg)
    return await run_examples(cfg)
