"""Attack a recorded server view (``dpa.contract.server_view``): the audit on what a real server received.

The releases, the head that made them and the public mechanism all come from the view; the
attacker's own faces come from ``cfg`` (give identities disjoint from the device's: for a run on
the built-in faces, another ``data_seed``); the victims' originals come from the view's
device-only ``truth.json``, for scoring. The attacks and the scoring are the live audit's
(``inversion.score_setting``), so a view of the live audit's own releases gives its figures.

A view of a training run holds one head per step. The audit attacks the releases made by the
first recorded head (every release, for a frozen head), up to ``max_examples`` of them.
"""

from __future__ import annotations

import math
import time
from contextlib import ExitStack
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dpa.audit.config import InversionConfig
from dpa.audit.inversion import (
    ProgressFn,
    face_sets,
    load_images,
    make_report,
    release_all,
    score_setting,
    ticks_per_setting,
)
from dpa.audit.report import InversionReport, image_metrics
from dpa.audit.victim import head_from_weights
from dpa.contract.errors import UserError
from dpa.contract.server_view import load_view
from dpa.privacy.mechanism import DPConfig
from dpa.privacy.public_parameters import config_from_parameters

__all__ = ["audit_view"]


def audit_view(
    view_dir: Path,
    cfg: InversionConfig,
    *,
    max_examples: int = 64,
    progress: ProgressFn | None = None,
    noiseless: bool = True,
) -> InversionReport:
    """Every configured attack on the view's releases of its first head; the strongest is reported.

    ``noiseless``: also the same attacks on the same images' noiseless releases, as a second result at
    epsilon inf (the attack's power); the sweep leaves it out to keep its points cheap."""

    started = time.perf_counter()
    view = load_view(view_dir)
    train = [i for i, r in enumerate(view.releases) if r.get("kind", "train") == "train"]
    if not train:
        raise UserError(f"{view_dir} records no training release")
    first_head = view.releases[train[0]]["head"]
    chosen = _first_head_releases(view, view_dir, train, max_examples)
    h = view.header
    head = head_from_weights(
        image_size=int(h["image_size"]), width=float(h["width"]), num_classes=int(h["num_classes"]),
        cut=str(h["cut"]), weights=view.head(chosen[0]), pixel_mean=tuple(h["pixel_mean"]),
        pixel_std=tuple(h["pixel_std"]), source=f"{view_dir}/{first_head}", centre=view.centre(),
        network=str(h.get("arch", "vggface")), mirror=h.get("flip_average", False) is True,
    )  # fmt: skip
    elements = math.prod(head.activation_shape)
    params = {k: view.releases[chosen[0]][k] for k in view.releases[chosen[0]]}
    dp = config_from_parameters(params, elements)
    for i in chosen[1:]:
        if config_from_parameters(view.releases[i], elements).noise_std != dp.noise_std:
            raise UserError(f"{view_dir}: the chosen releases do not share one mechanism")
    releases = np.concatenate([view.arrays(i)[0].astype(np.float32) for i in chosen])[:max_examples]
    paths = [Path(p) for i in chosen for p in view.sources(i) or []][:max_examples]
    cfg = replace(cfg, clip=dp.clip)  # the attacker knows the device's public clip
    previous_threads = torch.get_num_threads()
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    try:
        with ExitStack() as stack:  # the synthetic faces may live in a temporary folder: load them inside
            aux_paths, _, names = face_sets(cfg, head.image_size, stack)
            aux = load_images(aux_paths, head)
        originals = load_images(paths, head)[1].transpose(0, 2, 3, 1)
        prior = aux[1].mean(axis=0).transpose(1, 2, 0)
        baseline = np.array([image_metrics(o, prior) for o in originals])
        done = 0
        ticks = ticks_per_setting(cfg)

        def tick(attack: str, loss: float) -> None:
            nonlocal done
            done += 1
            if progress is not None:
                progress(f"view: {'MAP attack' if attack == 'map' else f'decoder loss {loss:.4f}'}", done, ticks)

        result, grid = score_setting(cfg, head, dp, aux, releases, originals, baseline[:, 1], tick)
        # The attack's power without noise: the same attacks on the same images' noiseless releases (clipped
        # only). Where it too sits at the baseline (through fc7 it does), the first result says nothing
        # about the noise (issue 27); the report carries both, this one at epsilon inf.
        results, grids = [result], [grid]
        if noiseless:
            clean_dp = DPConfig(clip=dp.clip, epsilon=math.inf, delta=dp.delta)
            clean = release_all(head, clean_dp, load_images(paths, head)[0], (0,), 64)
            clean_result, clean_grid = score_setting(cfg, head, clean_dp, aux, clean, originals, baseline[:, 1], tick)
            results.append(clean_result)
            grids.append(clean_grid)
    finally:
        torch.set_num_threads(previous_threads)
    return make_report(
        cfg, head, started, aux_names=names[: cfg.aux_identities], victim_names=sorted({p.parent.name for p in paths}),
        aux_images=len(aux_paths), victim_images=len(paths), baseline=baseline, results=tuple(results),
        originals=originals, grids=tuple(grids),
    )  # fmt: skip


def _first_head_releases(view: Any, view_dir: Path, train: list[int], max_examples: int) -> list[int]:
    """The training releases made by the view's first head, up to ``max_examples`` examples: the head the
    attacker knows (the export's), each with the sources it is scored against."""
    first_head = view.releases[train[0]]["head"]
    chosen, total = [], 0
    for i in train:
        if view.releases[i]["head"] != first_head or total >= max_examples:
            continue
        if view.sources(i) is None:
            raise UserError(f"{view_dir} has no truth.json entry for {view.releases[i]['file']}: nothing to score")
        chosen.append(i)
        total += int(view.releases[i]["examples"])
    return chosen
