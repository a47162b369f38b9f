"""Edge-server configuration: one frozen dataclass, validated where it is built."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from dpa.devices import DeviceProfile

__all__ = ["ServerConfig"]


@dataclass(frozen=True)
class ServerConfig:
    artifacts: Path = Path("artifacts")  # export folder; only manifest.json and tail/ are read
    host: str = "127.0.0.1"  # loopback by default: exposing the server is a deliberate choice
    port: int = 8080
    device: DeviceProfile = DeviceProfile.AUTO
    max_batch: int = 32  # examples per request; with the manifest it sets the body-size limit
    checkpoint_every: int = 50  # train steps between tail checkpoints (also saved on shutdown)
    # Requests whose bodies are read and queued for the tail at once: one running, one ready. More
    # only piles up 100 MB bodies in memory and starves the event loop (health p99 5.8 s at 16 clients).
    max_inflight_steps: int = 2
    state_dir: Path | None = None  # where the running tail checkpoint lives; None: <artifacts>/server-state

    def __post_init__(self) -> None:
        if isinstance(self.device, str) and not isinstance(self.device, DeviceProfile):
            object.__setattr__(self, "device", DeviceProfile.parse(self.device))
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port must be in 0..65535, got {self.port}")
        if self.max_batch < 1:
            raise ValueError(f"max batch must be >= 1, got {self.max_batch}")
        if self.max_inflight_steps < 1:
            raise ValueError(f"max in-flight steps must be >= 1, got {self.max_inflight_steps}")
        if self.checkpoint_every < 1:
            raise ValueError(f"checkpoint interval must be >= 1 step, got {self.checkpoint_every}")

    @property
    def resolved_state_dir(self) -> Path:
        return self.state_dir if self.state_dir is not None else self.artifacts / "server-state"
