"""This process's peak memory: what the benchmarks report for a device run in its own process."""

from __future__ import annotations

import resource

__all__ = ["own_peak_rss_mb"]


def own_peak_rss_mb() -> float:
    """This process image's peak RSS in MB (VmHWM). Not ``ru_maxrss``: Linux carries that across fork and exec,
    so a spawned child of a big parent reports the parent's size (a child of a 2 GB parent said 2076 MB
    where its VmHWM was 28 MB; dpa bench's paper-size class-sum head said 4521 MB at conv1_1 and fc7 alike)."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # not Linux: the best there is
