"""The membership experiment of ``dpa attack membership``: the loss-threshold attack (``dpa.audit.membership``)
on a trained split model, with the client's own train/test split as members and non-members.

Two rows: the tail on clean activations (what the model memorised, no noise at inference) and the deployed
pipeline (head + tail on fresh DP-A releases). Kept out of the CLI so that it runs, and is tested, as a
function; the CLI only prints its table.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from dpa.audit.membership import membership_scores
from dpa.audit.victim import TrainedSplitModel
from dpa.base.atomic import atomic_write_bytes
from dpa.contract.errors import UserError
from dpa.contract.manifest import load_manifest
from dpa.faces.synth import SynthConfig
from dpa.privacy import checks
from dpa.privacy.mechanism import DPConfig
from dpa.privacy.release_clip import release_clip
from runtime_client.config import ClientConfig
from runtime_client.dataset import prepare_data

__all__ = ["MembershipConfig", "ATTACK", "run_membership"]

ATTACK = "loss threshold (Yeom et al., CSF 2018): member iff loss <= t; best t in hindsight"


@dataclass(frozen=True)
class MembershipConfig:
    """The trained model (export, server state, client state) and the client's data and release settings."""

    artifacts: Path = Path("artifacts")
    server_state: Path | None = None  # default <artifacts>/server-state
    client_state: Path = Path("runs/client")
    data: str = "synthetic"
    identities: int = 10  # synthetic, as the client's
    per_identity: int = 40
    min_faces_per_person: int = 2
    epsilon: float = 8.0  # the client's --epsilon: one release's (sets the public scale and the noise)
    clip: float | None = None  # the client's --clip; None: the export's public clip (dpa.privacy.release_clip)
    delta: float = 1e-5
    seed: int | None = None  # the noise of the deployed-pipeline row
    batch_size: int = 32

    def __post_init__(self) -> None:
        checks.epsilon(self.epsilon, allow_inf=True)
        checks.delta(self.delta, allow_zero=False)
        if self.batch_size < 1:
            raise UserError(f"batch size must be >= 1, got {self.batch_size}")


def run_membership(cfg: MembershipConfig, out: Path) -> dict[str, Any]:
    """The report (also written to ``out / "membership.json"``), members and non-members counted in it."""
    manifest = load_manifest(cfg.artifacts)
    dp = DPConfig(clip=release_clip(manifest, cfg.clip, source=cfg.artifacts), epsilon=cfg.epsilon, delta=cfg.delta)
    client = ClientConfig(
        artifacts=cfg.artifacts, data=cfg.data, synth=SynthConfig(identities=cfg.identities,
        per_identity=cfg.per_identity), state_dir=cfg.client_state, min_faces_per_person=cfg.min_faces_per_person,
    )  # fmt: skip
    tail = cfg.server_state if cfg.server_state is not None else cfg.artifacts / "server-state"
    model = TrainedSplitModel(cfg.artifacts, tail_checkpoint=tail, head_checkpoint=cfg.client_state)
    train, test = prepare_data(client, manifest)  # the client's split (synthetic faces cached in its state)
    rows = {}
    for name, noisy in (("tail on clean activations", False), ("head+tail with DP-A release", True)):
        rng = np.random.default_rng(None if cfg.seed is None else [cfg.seed, 7])
        members = model.losses(train, dp, noisy=noisy, rng=rng, batch_size=cfg.batch_size)
        nonmembers = model.losses(test, dp, noisy=noisy, rng=rng, batch_size=cfg.batch_size)
        rows[name] = {
            **membership_scores(members, nonmembers).to_json(),
            "member_loss_mean": float(members.mean()),
            "nonmember_loss_mean": float(nonmembers.mean()),
        }
    report = {
        "attack": ATTACK, "artifacts": str(cfg.artifacts), "head_checkpoint": str(model.head_source),
        "tail_checkpoint": str(model.tail_source), "data": cfg.data,
        "privacy": {"clip": dp.clip, "epsilon": cfg.epsilon if math.isfinite(cfg.epsilon) else "inf",
                    "delta": cfg.delta},
        "members": len(train.paths), "nonmembers": len(test.paths), "results": rows,
    }  # fmt: skip
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out / "membership.json", (json.dumps(report, indent=2) + "\n").encode())
    return report
