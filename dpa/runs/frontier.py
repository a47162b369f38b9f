"""The frontier's maths and its files: each point against its non-private run, the smallest epsilon that
keeps 80% and 50% of it, and the table (CSV, JSON) and figure (PNG) ``dpa sweep`` writes.

Kept apart from the sweep's runs (``dpa.runs.sweep``) so that the figures can be recomputed from saved
points without training anything, and so that either changes without the other.
"""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib import colormaps
from matplotlib.figure import Figure

from dpa.base.atomic import atomic_write_bytes

__all__ = ["FIELD_FIGURES", "json_safe", "lever_name", "relative", "smallest_epsilon", "write_csv",
           "write_frontier_plot", "write_json"]  # fmt: skip

#: The field's figures a public point carries (``dpa.runs.recognition``), beside its closed-set accuracy.
FIELD_FIGURES = ("verification_auc", "tar_at_far_1e-3", "verification_accuracy", "open_set_rejection",
                  "open_set_identification_rate")  # fmt: skip


def lever_name(scale: float, dims: int) -> str:
    """How a point's levers read in names and legends ("" for the defaults)."""
    return ("" if scale == 1.0 else f", clip x{scale:g}") + (f", {dims} public dims" if dims else "")


def json_safe(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    return value


def write_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, (json.dumps(json_safe(data), indent=2) + "\n").encode())


def _group(p: dict[str, Any]) -> tuple[str, int, int, float, int]:
    """A frontier's points: one cut, data size, clip scale and release dims (1 and 0 for points saved
    before those levers)."""
    return p["cut"], p["identities"], p["per_identity"], p.get("clip_scale", 1.0), p.get("release_dims", 0)


def relative(points: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each point's clean accuracy as a fraction of the non-private run of the same cut, data and clip."""
    base = {_group(p): p["clean_test_accuracy"] for p in points if p["epsilon_budget"] is None}
    for p in points:
        ref = base.get(_group(p))
        p["nonprivate_clean_accuracy"] = ref
        p["relative_clean_accuracy"] = None if not ref else p["clean_test_accuracy"] / ref
        # The same with chance taken out of both: a run at chance against a reference at chance is 0, not 1.
        gain = None if ref is None else ref - p["chance"]
        p["relative_above_chance"] = None if not gain or gain <= 0 else (p["clean_test_accuracy"] - p["chance"]) / gain
    return points


def _private_points(points: list[dict[str, Any]], group: tuple[str, int, int, float, int]) -> list[dict[str, Any]]:
    """The private points of one (cut, identities, per identity, clip scale, release dims), by whole-run epsilon."""
    mine = [p for p in points if _group(p) == group and p["epsilon_budget"]]
    return sorted(mine, key=lambda p: p["epsilon_budget"])


def smallest_epsilon(points: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per cut and data size: the smallest whole-run epsilon reaching 80% and 50% of non-private accuracy."""
    out = []
    groups = sorted({_group(p) for p in points})
    for group in groups:
        cut, ids, per, scale, dims = group
        private = _private_points(points, group)
        row: dict[str, Any] = {"cut": cut, "identities": ids, "per_identity": per, "clip_scale": scale,
                               "release_dims": dims}  # fmt: skip
        for share in (0.8, 0.5):
            # Judged above chance: a reference barely above chance makes any run look like a large share.
            hit = next((p for p in private if (p["relative_above_chance"] or 0) >= share), None)
            row[f"epsilon_for_{int(share * 100)}pct"] = None if hit is None else hit["epsilon_budget"]
            row[f"attack_ssim_at_{int(share * 100)}pct"] = None if hit is None else hit.get("attack_ssim")
        out.append(row)
    return out


_CSV_COLUMNS = (
    "cut", "identities", "per_identity", "epsilon_budget", "epsilon_total", "delta", "epsilon_per_release",
    "releases_per_example", "clip", "clip_scale", "release_dims", "clean_test_accuracy", "private_test_accuracy",
    "nonprivate_clean_accuracy",
    "relative_clean_accuracy", "relative_above_chance", "clean_classifier", *FIELD_FIGURES,
    "chance", "attack", "attack_ssim", "baseline_ssim", "head_flops_share",
    "head_params_share", "head_step_ms", "peak_rss_mb", "wire_bytes_per_example", "train_seconds",
)  # fmt: skip


def write_csv(path: Path, points: list[dict[str, Any]]) -> None:
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(_CSV_COLUMNS)
    for p in points:
        row = []
        for c in _CSV_COLUMNS:
            v = p.get(c)
            row.append("" if v is None else (f"{v:.6g}" if isinstance(v, float) else v))
        writer.writerow(row)
    atomic_write_bytes(path, buf.getvalue().encode())


def write_frontier_plot(results: dict[str, Any], path: Path) -> Path:
    """x: whole-run epsilon (log); y: clean accuracy as a share of the non-private run's, both above chance
    (a run at chance scores 0, however close to chance the reference is); colour: attack SSIM over the baseline."""
    points = results["points"]
    fig = Figure(figsize=(8, 5), dpi=120)
    ax = fig.subplots()
    groups = sorted({_group(p) for p in points})
    cmap = colormaps["RdYlGn_r"]
    scatter = None
    for group in groups:
        cut, ids, per, scale, dims = group
        mine = _private_points(points, group)
        if not mine:
            continue
        name = f"{cut}, {ids}x{per}" + lever_name(scale, dims)
        xs = [p["epsilon_budget"] for p in mine]
        if all(p["relative_above_chance"] is None for p in mine):  # the non-private run itself is at chance
            ax.plot([], [], " ", label=f"{name}: non-private at chance (not drawn)")
            continue
        ys = [p["relative_above_chance"] if p["relative_above_chance"] is not None else np.nan for p in mine]
        (line,) = ax.plot(xs, ys, lw=1.2, alpha=0.7, label=name)
        if all("attack_over_baseline" in p for p in mine):
            over = [p["attack_over_baseline"] for p in mine]
            scatter = ax.scatter(
                xs, ys, c=over, cmap=cmap, vmin=-0.05, vmax=0.6, s=60, edgecolors=line.get_color(), zorder=3
            )
            for x, y, p in zip(xs, ys, mine, strict=True):
                ax.annotate(f"{p['attack_ssim']:.2f}", (x, y), textcoords="offset points", xytext=(4, 5), fontsize=6)
        else:
            ax.scatter(xs, ys, s=25, color=line.get_color(), zorder=3)
    ax.axhline(0.8, color="k", ls="--", lw=0.8)
    ax.axhline(0.5, color="k", ls=":", lw=0.8)
    ax.axhline(0.0, color="tab:gray", lw=0.8)
    ax.set_xscale("log")
    budgets = [p["epsilon_budget"] for p in points if p["epsilon_budget"]]
    if budgets:  # the axis spans the budgets even where no curve is drawn (every run at chance)
        ax.set_xlim(min(budgets) / 2, max(budgets) * 2)
    delta = next((p["delta"] for p in points if p["delta"]), None)
    ax.set_xlabel("whole-run ε" + (f" (δ = {delta:g}, dp-accounting PLD)" if delta else ""))
    ax.set_ylabel("clean accuracy above chance / non-private's")
    ax.set_title("DP-A frontier: utility vs whole-run ε (labels: strongest-attack SSIM)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7, loc="upper left")
    if scatter is not None:
        bar = fig.colorbar(scatter, ax=ax)
        bar.set_label("attack SSIM - no-data baseline", fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path
