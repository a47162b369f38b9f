"""The federation's one config, validated once: who the devices are, how many edge servers, the budget."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from dpa.contract.errors import UserError

__all__ = ["FederationConfig"]


@dataclass(frozen=True)
class FederationConfig:
    artifacts: Path  # a frozen-head export (the devices' head; its class count is each device's identities)
    state_dir: Path = Path("runs/federation")  # devices' kept releases, edge servers' stores, the report
    devices: int = 20
    identities_per_device: int = 10  # of them, ``shared_per_device`` are enrolled from other devices too
    shared_per_device: int = 2
    images_per_identity: int = 8  # per device holding the identity; a quarter held out for recognition
    edge_servers: int = 2  # devices are assigned round-robin; the gallery combines every edge server's sums
    total_epsilon: float = 8.0  # each device's whole-run budget: its one class-sum release, labels inside
    delta: float = 1e-5
    rounds: int = 1  # enrolment rounds; a device re-sends its kept release in later ones (kept once)
    drop_devices: tuple[int, ...] = ()  # devices that fail mid-round (fault drills and tests)
    round_timeout_s: float = 600.0  # a round goes on without the devices that have not answered by then
    seed: int | None = None  # None: noise from OS entropy (deployments); an int: reproducible (experiments)
    actors: int = 2  # Flower simulation's parallel ClientApps (the machine's cores)
    # SplitFed (per-example DP-A releases, one tail per edge server, FedAvg through Flower): each label's
    # epsilon inside the budget, the edge servers' local epochs over their devices' releases per round, batch.
    label_epsilon: float = 4.0
    local_epochs: int = 1
    batch_size: int = 8

    def __post_init__(self) -> None:
        for name in (
            "devices",
            "identities_per_device",
            "images_per_identity",
            "edge_servers",
            "rounds",
            "actors",
            "local_epochs",
            "batch_size",
        ):
            if getattr(self, name) < 1:
                raise UserError(f"federation {name.replace('_', ' ')} must be >= 1, got {getattr(self, name)}")
        if not 0 <= self.shared_per_device < self.identities_per_device:
            raise UserError("shared identities per device must be >= 0 and fewer than the device's identities")
        if self.shared_per_device and self.devices < 2:
            raise UserError("shared identities need at least 2 devices")
        if self.images_per_identity < 4:
            raise UserError("each device needs >= 4 images per identity (3 to enrol, 1 to recognise)")
        if self.edge_servers > self.devices:
            raise UserError(f"{self.edge_servers} edge servers for {self.devices} devices: some would have none")
        if not (math.isfinite(self.total_epsilon) and self.total_epsilon > 0 and 0 < self.delta < 1):
            raise UserError(f"the budget needs epsilon > 0 and delta in (0, 1), got {self.total_epsilon}, {self.delta}")
        if not (math.isfinite(self.round_timeout_s) and self.round_timeout_s > 0):
            raise UserError(f"round timeout must be > 0 seconds, got {self.round_timeout_s}")
        if not self.label_epsilon > 0:
            raise UserError(f"label epsilon must be > 0 (inf: labels in clear), got {self.label_epsilon}")
        bad = [d for d in self.drop_devices if not 0 <= d < self.devices]
        if bad:
            raise UserError(f"devices to drop must be in 0..{self.devices - 1}, got {bad}")

    @property
    def own_per_device(self) -> int:
        return self.identities_per_device - self.shared_per_device

    @property
    def shared_pool(self) -> int:
        """Identities enrolled from several devices: each device holds ``shared_per_device`` consecutive ones."""
        return 0 if not self.shared_per_device else max(2, self.shared_per_device, self.devices // 5)

    @property
    def identities(self) -> int:
        """The gallery's size: every device's own identities and the shared pool."""
        return self.devices * self.own_per_device + self.shared_pool

    def edge_of(self, device: int) -> int:
        return device % self.edge_servers
