"""Both accuracies of a finished run: clean held-out accuracy and private split inference.

``private``: what the client measured each epoch, held-out images released through the same
DP-A mechanism and classified by the server's tail (the pipeline as deployed for inference).
``clean``: the trained head + tail on the clean (clipped, rescaled, noise-free) activations of
the same held-out images: the model's utility when the device runs it itself or inference is
trusted. The trained weights are a function of the releases only, so using them costs no more
privacy. The two differ wherever the noise is on; the frontier is drawn with the clean one.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from dpa.audit.victim import TrainedSplitModel
from dpa.base.atomic import atomic_write_bytes
from dpa.contract.manifest import load_manifest
from runtime_client.config import ClientConfig
from runtime_client.dataset import prepare_data
from runtime_client.privacy_plan import privacy_plan

__all__ = ["add_clean_accuracy"]


def add_clean_accuracy(report: dict[str, Any], cfg: ClientConfig, server_state: Path) -> dict[str, Any]:
    """Measure the clean held-out accuracy of the run ``report`` describes; add both figures to it
    (``clean_test_accuracy``, ``private_test_accuracy``) and rewrite ``cfg.report`` if set."""
    manifest = load_manifest(cfg.artifacts)
    _, test = prepare_data(cfg, manifest)
    dp, _ = privacy_plan(cfg, {})  # the run's mechanism: its clip and public rescale
    model = TrainedSplitModel(cfg.artifacts, tail_checkpoint=server_state, head_checkpoint=cfg.state_dir)
    report["clean_test_accuracy"] = model.accuracy(test, dp, noisy=False)
    report["private_test_accuracy"] = report["final_test_accuracy"]
    if cfg.report is not None:
        atomic_write_bytes(cfg.report, (json.dumps(report, indent=2) + "\n").encode())
    return report
