"""Attack a recorded class-sum view: rebuild faces from the noisy class sums a server received.

What the server holds is, per class, a noisy sum of clipped centred activations and a noisy count
(``dpa.privacy.class_sums``). The strongest attacks we have (``inversion.ATTACKS``: the white-box MAP
optimisation, and a decoder trained on the attacker's own faces) are run on each class's noisy mean,
with the attacker knowing the head (the view records it), the clip and the noise; the noise on a
mean is sigma / n per element, n the class's (public, noisy) count.

Scoring. A class mean is a property of an identity, not of one image, so each reconstruction is
scored against every image summed into it (members) and against images of the same identity that
were NOT summed (the device's held-out images). DP bounds what the release says about any one image:
if the attack's SSIM to members is no better than to non-members, what it recovers is the identity's
look (what any useful face model learns), not a training image. The no-data baseline is the
attacker's own mean face against the members, as in every audit here.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dpa.audit.class_sum_membership import class_sum_membership
from dpa.audit.config import InversionConfig
from dpa.audit.inversion import ATTACKS, ProgressFn, face_sets, load_images, ticks_per_setting
from dpa.audit.report import image_metrics
from dpa.audit.victim import head_from_weights
from dpa.contract import messages, wire
from dpa.contract.errors import UserError
from dpa.contract.server_view import ClassSumViewFiles
from dpa.privacy.class_sums import class_templates
from dpa.privacy.mechanism import DPConfig

__all__ = ["audit_class_sum_view", "is_class_sum_view", "write_class_sum_grid"]


def is_class_sum_view(view_dir: Path) -> bool:
    return (Path(view_dir) / ClassSumViewFiles.BODY).is_file()


def _membership_multiplier(h: dict[str, Any]) -> float:
    """The noise multiplier ``class_sum_membership`` reads its limit from, for either adjacency: it takes a
    member to move its class row by sqrt(2) C (the vector and the count), i.e. mu = 1 / (sqrt(2) z) with
    sigma = 2 z C. An add-remove release has no counts, so a member moves the row by C and mu = C / sigma:
    the same formula at z = sigma / (sqrt(2) C), a LARGER limit than the header's z would give."""
    sigma, clip = float(h["noise_scale"]), float(h["clip"])
    if h.get("adjacency", "replace-one") == "replace-one":
        return float(h["noise_multiplier"])
    return sigma / (math.sqrt(2.0) * clip)


def _load(view_dir: Path) -> tuple[dict[str, Any], np.ndarray, np.ndarray, dict[str, Any], dict[str, np.ndarray]]:
    try:
        f = ClassSumViewFiles
        header = json.loads((view_dir / f.HEADER).read_text())
        msg = wire.decode(bytearray((view_dir / f.BODY).read_bytes()))
        truth = json.loads((view_dir / f.TRUTH).read_text())
        with np.load(view_dir / f.HEAD, allow_pickle=False) as z:
            weights = {k: z[k] for k in z.files}
    except (OSError, ValueError, KeyError, wire.WireError) as exc:
        raise UserError(f"{view_dir} is not a readable class-sum view ({exc})") from None
    return header, msg.tensors[messages.CLASS_SUMS], msg.tensors[messages.CLASS_COUNTS], truth, weights


def audit_class_sum_view(
    view_dir: Path, cfg: InversionConfig, *, images_per_class: int = 8, progress: ProgressFn | None = None
) -> dict[str, Any]:
    """Every configured attack on each class's noisy mean; the strongest (best member SSIM) is reported."""
    started = time.perf_counter()
    view_dir = Path(view_dir)
    h, sums, counts, truth, weights = _load(view_dir)
    head = _view_head(view_dir, h, weights)
    clip, sigma = float(h["clip"]), float(h["noise_scale"])
    templates, n = class_templates(sums, counts)
    classes = [k for k in range(len(n)) if n[k] > 0 and str(k) in truth["members"]]
    if not classes:
        raise UserError(f"{view_dir}: no class has a count above 0")
    typical = float(np.median(n[classes]))
    # One mechanism for every class mean: the noise of a sum over the median count (counts differ little).
    dp = DPConfig(clip=clip, epsilon=None, fixed_noise_multiplier=max(sigma / typical / (2 * clip), 1e-12))
    elements = math.prod(head.activation_shape)
    scale = dp.release_scale(elements)
    victim = (templates[classes] * np.float32(scale)).astype(np.float32).reshape(len(classes), *head.activation_shape)
    cfg = replace(cfg, clip=clip)
    previous = torch.get_num_threads()
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    try:
        with ExitStack() as stack:
            aux_paths, _, names = face_sets(cfg, head.image_size, stack)
            aux = load_images(aux_paths, head)
        prior = aux[1].mean(axis=0).transpose(1, 2, 0)
        members = {k: load_images([Path(p) for p in truth["members"][str(k)][:images_per_class]], head)[1]
                   for k in classes}  # fmt: skip
        held = {k: load_images([Path(p) for p in truth.get("held_out", {}).get(str(k), [])[:images_per_class]], head)[1]
                for k in classes}  # fmt: skip
        done, ticks = 0, ticks_per_setting(cfg)

        def tick(name: str, loss: float) -> None:
            nonlocal done
            done += 1
            if progress is not None:
                progress(f"class sums: {'MAP attack' if name == 'map' else f'decoder loss {loss:.4f}'}", done, ticks)

        scores = partial(_scores, classes=classes, members=members, held=held, prior=prior)
        recon_by = {name: ATTACKS[name](cfg, head, dp, aux, victim, partial(tick, name)).reconstructions
                    for name in cfg.attacks}  # fmt: skip
        by_attack = {name: scores(recon) for name, recon in recon_by.items()}
        strongest = max(by_attack, key=lambda a: by_attack[a]["member_ssim_mean"])
        acts = _clipped_activations(head, clip)
        noiseless = _noiseless(cfg, head, aux, acts, [truth["members"][str(k)] for k in classes], tick, scores)
        public_mean = acts_of_images(head, aux[0], clip).mean(axis=0)
        membership = class_sum_membership(
            sums=sums.reshape(len(sums), -1), counts=counts, noise_multiplier=_membership_multiplier(h), clip=clip,
            activations=acts, public_mean=public_mean,
            members={k: truth["members"][str(k)] for k in classes},
            held_out={k: truth.get("held_out", {}).get(str(k), []) for k in classes},
        )  # fmt: skip
    finally:
        torch.set_num_threads(previous)
    best = by_attack[strongest]
    return {
        "view": str(view_dir),
        "cut": h["cut"],
        "kind": "class-sums",
        "clip": clip,
        "noise_scale_on_sums": sigma,
        "median_count": typical,
        "noise_std_on_a_mean": sigma / typical,
        "attacks": list(cfg.attacks),
        "strongest_attack": strongest,
        **{k: v for k, v in best.items() if k != "per_class"},
        "per_class": best["per_class"],
        "by_attack": {a: {k: v for k, v in s.items() if k != "per_class"} for a, s in by_attack.items()},
        # The strongest attack without noise, on the exact class means of the same images: its power.
        "noiseless": noiseless,
        "membership": membership,
        "attacker": {"identities": names[: cfg.aux_identities], "images": len(aux_paths), "data_seed": cfg.data_seed},
        "reconstructions": recon_by[strongest],
        "members": {k: v.transpose(0, 2, 3, 1) for k, v in members.items()},
        "held_out": {k: v.transpose(0, 2, 3, 1) for k, v in held.items()},
        "prior": prior,
        "seconds": round(time.perf_counter() - started, 1),
    }


def _view_head(view_dir: Path, h: dict[str, Any], weights: Any) -> Any:
    """The head that made the view's sums, rebuilt from its header and weights (the server knows both)."""
    centre_path = view_dir / ClassSumViewFiles.CENTRE
    return head_from_weights(
        image_size=int(h["image_size"]), width=float(h["width"]), num_classes=int(h["num_classes"]),
        cut=str(h["cut"]), weights=weights, pixel_mean=tuple(h["pixel_mean"]), pixel_std=tuple(h["pixel_std"]),
        source=str(view_dir), centre=np.load(centre_path) if centre_path.is_file() else None,
        network=str(h.get("arch", "vggface")), mirror=h.get("flip_average", False) is True,
    )  # fmt: skip


def _noiseless(
    cfg: InversionConfig, head: Any, aux: Any, acts: Callable[[list[str]], np.ndarray], members: list[list[str]],
    tick: Callable[[str, float], None], scores: Callable[[np.ndarray], dict[str, Any]],
) -> dict[str, Any]:  # fmt: skip
    """The same attacks' power without noise, on the exact class means of the same images (a blind attack's
    "at the baseline" says nothing about the noise; issue 27): the strongest, and each attack's figures."""
    exact = np.stack([acts(paths).mean(axis=0) for paths in members])
    clean_dp = DPConfig(clip=cfg.clip, epsilon=None, fixed_noise_multiplier=1e-12)
    elements = math.prod(head.activation_shape)
    clean = (exact * np.float32(clean_dp.release_scale(elements))).astype(np.float32)
    clean = clean.reshape(len(members), *head.activation_shape)
    by_attack = {}
    for name in cfg.attacks:
        recon = ATTACKS[name](cfg, head, clean_dp, aux, clean, partial(tick, name))
        by_attack[name] = {k: v for k, v in scores(recon.reconstructions).items() if k != "per_class"}
    return {
        "strongest_attack": max(by_attack, key=lambda a: by_attack[a]["member_ssim_mean"]),
        **max(by_attack.values(), key=lambda s: s["member_ssim_mean"]),
        "by_attack": by_attack,
    }


def acts_of_images(head: Any, x: np.ndarray, clip: float) -> np.ndarray:
    """Clipped (L2, to ``clip``), centred head activations (N, d) of preprocessed images, as the device's."""
    out = []
    with torch.no_grad():
        for start in range(0, len(x), 64):
            a = head.module(torch.from_numpy(np.ascontiguousarray(x[start : start + 64]))).double().flatten(1)
            a = a * torch.clamp(clip / a.norm(dim=1, keepdim=True).clamp_min(1e-30), max=1.0)
            out.append(a.numpy())
    return np.concatenate(out) if out else np.zeros((0, math.prod(head.activation_shape)))


def _clipped_activations(head: Any, clip: float) -> Any:
    def acts(paths: list[str]) -> np.ndarray:
        return acts_of_images(head, load_images([Path(p) for p in paths], head)[0], clip)

    return acts


def _scores(
    recon: np.ndarray, classes: list[int], members: dict[int, np.ndarray], held: dict[int, np.ndarray],
    prior: np.ndarray,
) -> dict[str, Any]:  # fmt: skip
    per_class = []
    for r, k in zip(recon, classes, strict=True):
        mem = [image_metrics(o.transpose(1, 2, 0), r)[1] for o in members[k]]
        out = [image_metrics(o.transpose(1, 2, 0), r)[1] for o in held[k]]
        base = [image_metrics(o.transpose(1, 2, 0), prior)[1] for o in members[k]]
        per_class.append({"class": k, "member_ssim": float(np.mean(mem)), "member_ssim_max": float(np.max(mem)),
                          "held_out_ssim": float(np.mean(out)) if out else None,
                          "baseline_ssim": float(np.mean(base))})  # fmt: skip
    held_vals = [c["held_out_ssim"] for c in per_class if c["held_out_ssim"] is not None]
    return {
        "member_ssim_mean": float(np.mean([c["member_ssim"] for c in per_class])),
        "member_ssim_max": float(np.max([c["member_ssim_max"] for c in per_class])),
        "held_out_ssim_mean": float(np.mean(held_vals)) if held_vals else None,
        "baseline_ssim_mean": float(np.mean([c["baseline_ssim"] for c in per_class])),
        "per_class": per_class,
    }


def write_class_sum_grid(result: dict[str, Any], path: Path, columns: int = 3) -> Path:
    """PNG: one row per class: the reconstruction, then members (summed), then held-out images (not)."""
    from matplotlib.figure import Figure

    classes = [c["class"] for c in result["per_class"]]
    cells = 2 + 2 * columns
    fig = Figure(figsize=(cells * 0.9, len(classes) * 0.95 + 0.6), dpi=100)
    fig.suptitle(
        f"class sums at {result['cut']}: {result['strongest_attack']} reconstruction | members | held out | "
        f"mean face. SSIM to members {result['member_ssim_mean']:.2f}, held out "
        f"{result['held_out_ssim_mean'] or float('nan'):.2f}, baseline {result['baseline_ssim_mean']:.2f}",
        fontsize=7,
    )
    for row, (k, recon) in enumerate(zip(classes, result["reconstructions"], strict=True)):
        images = [recon, *result["members"][k][:columns], *result["held_out"][k][:columns], result["prior"]]
        for col, image in enumerate(images):
            ax = fig.add_subplot(len(classes), cells, row * cells + col + 1)
            ax.imshow(np.clip(image, 0, 1))
            ax.set_axis_off()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path
