"""The audit's picture: originals and their reconstructions at each epsilon, as one PNG grid."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from dpa.audit.report import InversionReport

__all__ = ["grid_pixel_size", "write_grid"]

_CELL_PX = 96  # one image
_LABEL_PX = 150  # the row labels' column
_TITLE_PX = 40
_DPI = 100


def grid_pixel_size(rows: int, columns: int) -> tuple[int, int]:
    """(width, height) in pixels of the PNG :func:`write_grid` writes for this many rows and columns."""
    return _LABEL_PX + columns * _CELL_PX, _TITLE_PX + rows * _CELL_PX


def write_grid(report: InversionReport, path: Path) -> Path:
    """PNG: originals on the first row, one row of reconstructions per epsilon, victims as columns."""

    rows = [("original", report.originals)]
    for r, recon in zip(report.results, report.reconstructions, strict=True):
        label = f"ε = {r.epsilon:g} ({r.strongest_attack})\nSSIM {r.ssim_mean:.2f}\nPSNR {r.psnr_mean:.1f} dB"
        rows.append((label, recon))
    cols = len(report.originals)
    width, height = grid_pixel_size(len(rows), cols)
    fig = Figure(figsize=(width / _DPI, height / _DPI), dpi=_DPI)
    fig.text(
        0.5,
        1 - 0.5 * _TITLE_PX / height,
        f"DP-A inversion at {report.cut}: clip {report.config.clip:g}, delta {report.config.delta:g}, "
        f"mean aux face SSIM {report.baseline_ssim_mean:.2f}",
        ha="center",
        va="center",
        fontsize=9,
    )
    pad = 2
    for r, (label, images) in enumerate(rows):
        top = _TITLE_PX + r * _CELL_PX
        fig.text((_LABEL_PX - 6) / width, 1 - (top + _CELL_PX / 2) / height, label, ha="right", va="center", fontsize=8)
        for c in range(cols):
            ax = fig.add_axes(
                (
                    (_LABEL_PX + c * _CELL_PX + pad) / width,
                    1 - (top + _CELL_PX - pad) / height,
                    (_CELL_PX - 2 * pad) / width,
                    (_CELL_PX - 2 * pad) / height,
                )
            )
            ax.imshow(np.clip(images[c], 0.0, 1.0), interpolation="nearest")
            ax.set_axis_off()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=_DPI, format="png")
    return path
