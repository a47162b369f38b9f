"""The converted network against dlib's own: the check that runs before an export of it is published.

dlib's ``face_recognition_model_v1.compute_face_descriptor`` runs the .dat in dlib's C++ on a chip; the
torch twin must give the same 128-d descriptor. The check runs on real aligned chips where the export
has public faces (``--centre-from``: photos are aligned with :mod:`dpa.faces.align`, chips used as they
are) and on rendered faces otherwise (``dpa.faces.synth``: not photographs, but any image exercises every
tensor); the report says which. Tolerance (issue 35): every element within 1e-4 of the descriptors' scale
(their largest absolute element) and a cosine >= 0.99999 for every chip.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from dpa.contract import dlib_resnet as layout
from dpa.contract.errors import UserError
from dpa.faces.align import Aligner
from dpa.faces.chips import preprocess_chips, rendered_chips
from dpa.faces.lfw import index_faces

__all__ = [
    "TwinReport", "chips_for_check", "compare_with_dlib", "preprocess_chips", "rendered_chips", "MAX_ELEMENT_SHARE",
    "MIN_COSINE",
]  # fmt: skip

MAX_ELEMENT_SHARE = 1e-4
MIN_COSINE = 0.99999


@dataclass(frozen=True)
class TwinReport:
    chips: int
    source: str  # "public faces DIR" or "rendered faces"
    max_element_share: float  # max |ours - dlib| / max |dlib|
    min_cosine: float

    @property
    def passed(self) -> bool:
        return self.max_element_share <= MAX_ELEMENT_SHARE and self.min_cosine >= MIN_COSINE


def chips_for_check(faces: Path | None, count: int = 8) -> tuple[np.ndarray, str]:
    """(count, 150, 150, 3) uint8 chips: aligned from the first public faces that have one, or rendered."""
    size = layout.IMAGE_SIZE
    if faces is not None:
        from PIL import Image

        aligner = None
        chips = []
        for path in index_faces(Path(faces), min_faces_per_person=1).paths:
            with Image.open(path) as im:
                rgb = np.asarray(im.convert("RGB"))
            if rgb.shape[:2] != (size, size):
                aligner = aligner or Aligner()
                rgb = aligner.chip(rgb)[0]
            if rgb is not None:
                chips.append(rgb)
            if len(chips) == count:
                return np.stack(chips), f"public faces {faces}"
        raise UserError(f"fewer than {count} faces found in {faces} for the check against dlib")
    return rendered_chips(count), "rendered faces"


def _embedding(head: torch.nn.Module, tail: torch.nn.Module, chips: np.ndarray) -> np.ndarray:
    """The twin's descriptor: the head, then the tail's stages without its classifier."""
    with torch.no_grad():
        a = head.eval()(torch.from_numpy(preprocess_chips(chips)))
        for name in tail.names:  # type: ignore[attr-defined]
            a = a.mean(dim=(2, 3)) if name == "pool" else getattr(tail, name)(a)
    return a.double().numpy()


def compare_with_dlib(head: torch.nn.Module, tail: torch.nn.Module, dat: Path, faces: Path | None) -> TwinReport:
    try:
        import dlib
    except ImportError:
        raise UserError("the dlib-resnet export checks its network against dlib: pip install 'dpa[faces]'") from None
    chips, source = chips_for_check(faces)
    model = dlib.face_recognition_model_v1(str(dat))
    ref = np.array([np.array(model.compute_face_descriptor(np.ascontiguousarray(c))) for c in chips])
    ours = _embedding(head, tail, chips)
    cosines = (ours * ref).sum(1) / np.linalg.norm(ours, axis=1) / np.linalg.norm(ref, axis=1)
    share = float(np.abs(ours - ref).max() / np.abs(ref).max())
    return TwinReport(len(chips), source, share, float(cosines.min()))
