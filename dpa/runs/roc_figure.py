"""The demo's verification ROC (PNG): true-accept against false-accept rate on pairs of the device's
held-out images, one curve per cut, with FAR 1e-3 marked (the field's operating point)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from matplotlib.figure import Figure

__all__ = ["write_roc"]


def write_roc(reports: list[dict[str, Any]], path: Path) -> Path:
    """One curve per cut (runs at one cut with a frozen public head share their embedding, so their ROC)."""
    fig = Figure(figsize=(6, 4.5), dpi=120)
    ax = fig.subplots()
    seen = set()
    for r in reports:
        if r["cut"] in seen:
            continue
        seen.add(r["cut"])
        rec = r["recognition"]
        fpr = [max(f, 1e-5) for f in rec["roc"]["fpr"]]
        ax.plot(fpr, rec["roc"]["tpr"], label=f"{r['cut']}: AUC {rec['verification_auc']:.3f}, "
                f"TAR@1e-3 {rec['tar_at_far_1e-3']:.2f}")  # fmt: skip
    ax.axvline(1e-3, color="grey", linestyle=":", linewidth=1)
    ax.set_xscale("log")
    ax.set_xlim(1e-4, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("false-accept rate (impostor pairs)")
    ax.set_ylabel("true-accept rate (genuine pairs)")
    pairs = reports[0]["recognition"]["pairs"]
    ax.set_title(f"verification on the device's held-out identities ({pairs['genuine']} genuine, "
                 f"{pairs['impostor']} impostor pairs)", fontsize=9)  # fmt: skip
    ax.legend(loc="lower right", fontsize=8)
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path
