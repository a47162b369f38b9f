"""Which CPU a figure was measured on: model, vector extensions, native bfloat16, cores.

Machines of one kind differ in their CPUs (some have AVX-512 and bfloat16, AMD EPYC ones do not),
and both the speed of every kernel and the rounding of float32 reductions follow the CPU. So every
benchmark and every demo report names it, and ``.ci/run`` prints it first, so that a figure or a
failure can be tied to a machine (issue 22). Read from ``/proc/cpuinfo`` (Linux); elsewhere the
fields are what :mod:`platform` knows.
"""

from __future__ import annotations

import os
import platform
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

__all__ = ["CpuInfo", "cpu_info"]

_CPUINFO = Path("/proc/cpuinfo")


@dataclass(frozen=True)
class CpuInfo:
    model: str  # "AMD EPYC 7B13", "Intel(R) Xeon(R) Processor", ...
    machine: str  # "x86_64", "aarch64"
    cores: int  # what this process may use
    avx2: bool
    avx512: bool  # AVX-512 foundation (avx512f)
    bf16: bool  # native bfloat16 arithmetic: AVX512-BF16 or AMX-BF16

    @property
    def vector(self) -> str:
        """The widest vector extension, as kernels dispatch on it."""
        return "AVX-512" if self.avx512 else "AVX2" if self.avx2 else "neither AVX2 nor AVX-512"

    def describe(self) -> str:
        """One line: ``Intel(R) Xeon(R) Processor (x86_64, 2 cores, AVX-512, bf16)``."""
        return f"{self.model} ({self.machine}, {self.cores} cores, {self.vector}, {'bf16' if self.bf16 else 'no bf16'})"

    def as_json(self) -> dict[str, Any]:
        return asdict(self) | {"vector": self.vector, "summary": self.describe()}


def _flags_and_model(text: str) -> tuple[set[str], str]:
    flags: set[str] = set()
    model = ""
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key in ("flags", "Features") and not flags:  # x86 / arm
            flags = set(value.split())
        elif key == "model name" and not model:
            model = value.strip()
    return flags, model


def cpu_info(cpuinfo: str | None = None) -> CpuInfo:
    """This machine's CPU (``cpuinfo``: the text of ``/proc/cpuinfo``, for tests)."""
    if cpuinfo is None:
        try:
            cpuinfo = _CPUINFO.read_text(errors="replace")
        except OSError:
            cpuinfo = ""
    flags, model = _flags_and_model(cpuinfo)
    return CpuInfo(
        model=model or platform.processor() or "unknown",
        machine=platform.machine(),
        cores=len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1,
        avx2="avx2" in flags,
        avx512="avx512f" in flags,
        bf16=bool({"avx512_bf16", "amx_bf16"} & flags),
    )


if __name__ == "__main__":  # ``python -m dpa.base.cpu``: what .ci/run prints first
    print(cpu_info().describe())
