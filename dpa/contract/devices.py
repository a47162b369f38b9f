"""Execution-provider profiles: what ``--device`` means, and the fallback when hardware is missing.

onnxruntime's training API places a Module on one device ("cpu" or "cuda"); the
profile adds the thread settings that fit the hardware. docs/commands.md's ``--device`` table is
this table.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

from dpa.contract.choices import Choice

__all__ = ["DeviceProfile", "ResolvedDevice", "resolve_device", "PROFILE_TABLE", "PROVIDERS"]

log = logging.getLogger(__name__)


class DeviceProfile(Choice):
    AUTO = "auto"
    CPU = "cpu"
    ARM64 = "arm64"
    CUDA = "cuda"

    @classmethod
    def what(cls) -> str:
        return "device"


#: Threads for a phone-class ARM SoC: its big cores (e.g. Snapdragon 810: 4x A57 + 4x A53).
_PHONE_THREADS = 4

#: profile -> (onnxruntime device, provider it needs, intra-op threads or None for all cores, what it is for)
PROFILE_TABLE: dict[DeviceProfile, tuple[str, str, int | None, str]] = {
    DeviceProfile.CPU: ("cpu", "CPUExecutionProvider", None, "all cores of this machine"),
    DeviceProfile.ARM64: (
        "cpu",
        "CPUExecutionProvider",
        _PHONE_THREADS,
        f"CPU with {_PHONE_THREADS} threads, like a phone's big cores (capped at this machine's cores)",
    ),
    DeviceProfile.CUDA: ("cuda", "CUDAExecutionProvider", None, "NVIDIA GPU; needs onnxruntime-training (CUDA build)"),
}


#: profile -> the execution providers a plain onnxruntime session is given, in the order they are tried (the
#: device's head); those this build lacks are left out, CPU always stays. XNNPACK is in onnxruntime's mobile
#: and some aarch64 builds, not in the PyPI wheels: there the arm64 profile runs on the CPU provider.
PROVIDERS: dict[DeviceProfile, tuple[str, ...]] = {
    DeviceProfile.CPU: ("CPUExecutionProvider",),
    DeviceProfile.ARM64: ("XnnpackExecutionProvider", "CPUExecutionProvider"),
    DeviceProfile.CUDA: ("CUDAExecutionProvider", "CPUExecutionProvider"),
}


@dataclass(frozen=True)
class ResolvedDevice:
    requested: DeviceProfile
    profile: DeviceProfile  # what runs after fallback
    ort_device: str  # passed to onnxruntime.training.api.Module (the server's tail)
    threads: int
    fallback_reason: str | None  # why the requested profile could not be used
    providers: tuple[str, ...] = ("CPUExecutionProvider",)  # a plain session's, in order (the device's head)

    def describe(self) -> str:
        text = f"{self.profile.value} ({self.ort_device}, {self.threads} threads, {', '.join(self.providers)})"
        if self.fallback_reason:
            text += f"; fell back from {self.requested.value}: {self.fallback_reason}"
        return text


def resolve_device(requested: DeviceProfile | str, available: list[str] | None = None) -> ResolvedDevice:
    """Pick the profile to run; CUDA falls back to CPU with the reason when its provider is missing."""
    if available is None:
        import onnxruntime

        available = list(onnxruntime.get_available_providers())
    req = DeviceProfile.parse(requested) if isinstance(requested, str) else requested
    cores = os.cpu_count() or 1
    profile, reason = req, None
    if req is DeviceProfile.AUTO:
        profile = DeviceProfile.CUDA if "CUDAExecutionProvider" in available else DeviceProfile.CPU
    elif req is DeviceProfile.CUDA and "CUDAExecutionProvider" not in available:
        profile = DeviceProfile.CPU
        reason = (
            "CUDAExecutionProvider is not in this onnxruntime build "
            f"(available: {', '.join(available)}); install onnxruntime-training with CUDA for GPU training"
        )
    ort_device, _provider, threads, _doc = PROFILE_TABLE[profile]
    providers = tuple(p for p in PROVIDERS[profile] if p in available or p == "CPUExecutionProvider")
    resolved = ResolvedDevice(req, profile, ort_device, min(threads or cores, cores), reason, providers)
    if reason:
        log.warning("device %s unavailable, using %s: %s", req.value, profile.value, reason)
    return resolved
