"""The device's peak memory is the spawned child's own, not its parent's.

Linux carries ``ru_maxrss`` across fork and exec, so a child spawned by a big parent reported the
parent's size (dpa bench's paper-size class-sum head: 4521 MB at conv1_1 and at fc7 alike). The child
here starts from a parent holding 1.5 GB: its ``ru_maxrss`` says so (the power of this test: the old
measure fails it), and what ``dpa.runs.device_cost`` reports stays near an interpreter's size.
"""

from __future__ import annotations

import multiprocessing
import resource

import numpy as np

from dpa.base.memory import own_peak_rss_mb


def _both() -> tuple[float, float]:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, own_peak_rss_mb()


def test_a_spawned_child_reports_its_own_peak_not_its_parents():
    big = np.ones(1536 * 1024**2 // 8)  # 1.5 GB, touched
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        inherited, own = pool.apply(_both)
    assert big[-1] == 1.0
    assert inherited > 1500  # what ru_maxrss says in the child: the parent's size
    assert 5 < own < 400  # VmHWM: the child's own interpreter
