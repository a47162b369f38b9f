"""What an inversion audit reports: per-epsilon figures against the no-data baseline, and the verdict."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from dpa.audit.config import InversionConfig, jsonable
from dpa.contract.errors import UserError

__all__ = [
    "HE2019_NO_DEFENCE_PSNR_DB",
    "HE2019_NO_DEFENCE_SSIM",
    "HE2021_RECOGNISABLE_SSIM",
    "PRIOR_MARGIN_SSIM",
    "EpsilonResult",
    "InversionReport",
    "image_metrics",
    "verdict",
]

# --------------------------------------------------------------------------- literature thresholds

#: He, Zhang and Lee, "Model inversion attacks against collaborative inference", ACSAC 2019
#: (doi:10.1145/3359789.3359824): inverting the first convolutional layer with no defence
#: reconstructs inputs almost perfectly, at about 37 dB PSNR and SSIM about 0.99.
HE2019_NO_DEFENCE_PSNR_DB = 37.0
HE2019_NO_DEFENCE_SSIM = 0.99
#: He, Zhang and Lee, "Attacking and protecting data privacy in edge-cloud collaborative
#: inference systems", IEEE Internet of Things Journal, 2021: a reconstruction with
#: SSIM > 0.3 is treated as recognisable.
HE2021_RECOGNISABLE_SSIM = 0.3
#: How far above the prior-only baseline (the mean auxiliary face) the mean SSIM must be
#: before we call a reconstruction recognisable: the mean face alone scores ~0.3 SSIM on
#: the synthetic faces, so the 0.3 threshold alone would call "no information" recognisable.
PRIOR_MARGIN_SSIM = 0.05


#: What each attack is, for the report.
ATTACK_DESCRIPTIONS = {
    "decoder": "inverse network trained on the attacker's own releases (He et al. 2019)",
    "map": "white-box MAP optimisation with a TV prior weighted on the attacker's own faces (He et al. 2019)",
}


@dataclass(frozen=True)
class EpsilonResult:
    epsilon: float
    noise_std: float  # per element, before the public rescaling
    snr_per_element: float  # C / sqrt(d) / noise_std (inf without noise)
    psnr_mean: float  # dB
    psnr_median: float
    ssim_mean: float
    ssim_median: float
    recognisable_fraction: float  # victims with SSIM > HE2021_RECOGNISABLE_SSIM
    beats_prior_fraction: float  # victims whose reconstruction has a higher SSIM than the mean aux face
    train_loss: float  # decoder's last-epoch mean loss on the auxiliary pairs (NaN without the decoder)
    verdict: str
    # The figures above are this attack's: the strongest (best mean SSIM) of those run on the same releases.
    strongest_attack: str = "decoder"
    by_attack: dict[str, dict[str, Any]] = field(default_factory=dict)  # each attack's mean figures and choices
    psnr_per_image: tuple[float, ...] = ()
    ssim_per_image: tuple[float, ...] = ()


@dataclass(frozen=True, eq=False)
class InversionReport:
    config: InversionConfig
    cut: str
    image_size: int
    activation_shape: tuple[int, ...]
    pixel_mean: tuple[float, ...]
    pixel_std: tuple[float, ...]
    head_source: str
    aux_identities: tuple[str, ...]
    victim_identities: tuple[str, ...]
    aux_images: int
    victim_images: int
    baseline_psnr_mean: float  # prior only: the mean aux face against every victim
    baseline_ssim_mean: float
    baseline_recognisable_fraction: float
    results: tuple[EpsilonResult, ...]
    seconds: float
    originals: np.ndarray = field(repr=False)  # (grid columns, H, W, 3) in [0, 1]
    reconstructions: tuple[np.ndarray, ...] = field(repr=False)  # one (grid columns, H, W, 3) per epsilon

    def result(self, epsilon: float) -> EpsilonResult:
        for r in self.results:
            if r.epsilon == epsilon:
                return r
        raise KeyError(epsilon)

    def to_json(self) -> dict[str, Any]:
        return jsonable(
            {
                "attack": (
                    "strongest of: "
                    + ", ".join(ATTACK_DESCRIPTIONS[a] for a in self.config.attacks)
                    + " (known head and public mechanism; auxiliary identities disjoint from the victims')"
                ),
                "config": self.config.to_json(),
                "cut": self.cut,
                "image_size": self.image_size,
                "activation_shape": list(self.activation_shape),
                "elements_per_release": math.prod(self.activation_shape),
                "pixel_mean": list(self.pixel_mean),
                "pixel_std": list(self.pixel_std),
                "head_source": self.head_source,
                "aux_identities": list(self.aux_identities),
                "victim_identities": list(self.victim_identities),
                "aux_images": self.aux_images,
                "victim_images": self.victim_images,
                "thresholds": {
                    "he2019_no_defence_psnr_db": HE2019_NO_DEFENCE_PSNR_DB,
                    "he2019_no_defence_ssim": HE2019_NO_DEFENCE_SSIM,
                    "he2021_recognisable_ssim": HE2021_RECOGNISABLE_SSIM,
                    "prior_margin_ssim": PRIOR_MARGIN_SSIM,
                },
                "baseline_mean_aux_face": {
                    "psnr_mean": self.baseline_psnr_mean,
                    "ssim_mean": self.baseline_ssim_mean,
                    "recognisable_fraction": self.baseline_recognisable_fraction,
                },
                "results": [r.__dict__ for r in self.results],
                "seconds": self.seconds,
            }
        )


def image_metrics(original: np.ndarray, reconstruction: np.ndarray) -> tuple[float, float]:
    """(PSNR in dB, SSIM) of two (H, W, 3) images in [0, 1], with scikit-image (data_range 1)."""

    a = np.asarray(original, dtype=np.float64)
    b = np.asarray(reconstruction, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 3 or a.shape[-1] != 3:
        raise UserError(f"expected two (H, W, 3) images of one shape, got {a.shape} and {b.shape}")
    with np.errstate(divide="ignore"):  # identical images: PSNR = inf
        psnr = float(peak_signal_noise_ratio(a, b, data_range=1.0))
    ssim = float(structural_similarity(a, b, channel_axis=-1, data_range=1.0))
    return psnr, ssim


def verdict(psnr_mean: float, ssim_mean: float, baseline_ssim: float) -> str:
    """Compare one epsilon's mean figures with the literature's thresholds and the prior-only baseline."""
    if psnr_mean >= HE2019_NO_DEFENCE_PSNR_DB or ssim_mean >= HE2019_NO_DEFENCE_SSIM:
        return "at the no-defence level (He et al. 2019)"
    if ssim_mean > HE2021_RECOGNISABLE_SSIM and ssim_mean > baseline_ssim + PRIOR_MARGIN_SSIM:
        return "recognisable (SSIM > 0.3, He et al. 2021)"
    if ssim_mean > HE2021_RECOGNISABLE_SSIM:
        return "SSIM > 0.3 but no better than the mean aux face"
    return "not recognisable"


# --------------------------------------------------------------------------- data and head
