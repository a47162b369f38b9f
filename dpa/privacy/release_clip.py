"""The clip C of a release: one policy, asked by the device, the sweep, the federation and the audit.

C bounds each example's contribution, so it sets the noise (sigma = 2 z C, or z C for add-remove class
sums). If two parties picked C by different rules they would disagree about the noise of the same release.
The policy is therefore stated once, here:

- an explicit override (``--clip C``) wins;
- otherwise the export's ``release_clip``, which the exporter measured on PUBLIC faces as
  ``SHARE_OF_PUBLIC_MEDIAN`` times the median L2 norm of the (centred) head activations
  (``public_clip_from_norms``), so choosing it spends no privacy;
- otherwise there is no honest default (a number that suits one cut's activations is off by orders of
  magnitude at another), and the request is refused, naming both ways out.

The browser page reads the same manifest field and refuses the same way (``runtime_web/static/device.js``).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from dpa.contract.errors import UserError
from dpa.contract.manifest import Manifest
from dpa.privacy import checks

__all__ = ["SHARE_OF_PUBLIC_MEDIAN", "public_clip_from_norms", "release_clip", "NO_CLIP"]

#: C as a share of the public activations' median norm. Half the median sits below every public activation's
#: norm at fc7 of the shipped weights (the smallest is 0.54 of the median), so each release is its
#: activation's direction times C: the normalised embedding that face recognition scores by cosine. Chosen on
#: PUBLIC data (the public task of seed 4, the class-sum release simulated, 20 splits): any share from 0.125
#: to 0.5 scored 0.815 at whole-run epsilon 8 and 0.734 at epsilon 1, the median itself 0.807 and 0.715,
#: twice it 0.790 and 0.605.
SHARE_OF_PUBLIC_MEDIAN = 0.5

#: Why a clip cannot be chosen (the sentence after the export's name).
NO_CLIP = "carries no public release clip: give the clip (--clip C), or export with --centre-faces so that it has one"


def public_clip_from_norms(norms: Sequence[float] | np.ndarray) -> float:
    """C from the L2 norms of (centred) head activations of PUBLIC faces: ``SHARE_OF_PUBLIC_MEDIAN`` times their
    median (numpy's: the mean of the two middle ones)."""
    values = np.asarray(norms)  # its own dtype: exports' clips stay bit for bit as they were
    if values.size == 0:
        raise UserError("no public activations to measure the release clip on")
    return checks.positive_finite("release clip", SHARE_OF_PUBLIC_MEDIAN * float(np.median(values)))


def release_clip(manifest: Manifest | None, override: float | None = None, *, source: object = "the export") -> float:
    """The clip a release uses: ``override`` if given, else the export's public ``release_clip``, else refused
    (``UserError`` naming ``source``)."""
    if override is not None:
        return checks.positive_finite("clip", override)
    if manifest is not None and manifest.release_clip is not None:
        return manifest.release_clip
    raise UserError(f"{source} {NO_CLIP}")
