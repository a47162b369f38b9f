"""``dpa evaluate lfw``: LFW's verification figure through the product's own pipeline.

The device's pipeline, end to end, on real photographs: the alignment the export's manifest names
(``dpa.faces.align``: dlib's detectors, 5 landmarks, the 150x150 chip), the manifest's preprocessing,
the device's head in onnxruntime (``runtime_client``), the device's verification embedding
(``on_device.pair_embeddings``: cosine, with the test-time flip chosen on View 1), then LFW's protocol
(``dpa.faces.lfw_protocol``): 10 folds, each fold's threshold chosen on the other nine.

LFW's protocol scores every pair, so an image where no detector finds a face is aligned on a fixed
central box (``align.CENTRE_BOX``, from View 1) and counted in the report; a device never does that.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from dpa.base.cpu import cpu_info
from dpa.contract.architecture import ArchConfig
from dpa.contract.choices import NetworkName
from dpa.contract.devices import DeviceProfile, resolve_device
from dpa.contract.errors import UserError
from dpa.contract.manifest import load_manifest
from dpa.faces.align import ALIGNMENT, align_images, chip_path
from dpa.faces.lfw_protocol import image_path, read_pairs, ten_fold_accuracy
from dpa.faces.verification import roc_points, verification
from runtime_client.head import HeadModel
from runtime_client.on_device import pair_embeddings

__all__ = ["LfwEvalConfig", "evaluate_lfw", "images_root", "default_export"]


@dataclass(frozen=True)
class LfwEvalConfig:
    faces: Path  # LFW: the folder of identity folders, or the folder holding lfw-deepfunneled/ (or lfw/)
    pairs: Path | None = None  # View 2's pairs.txt; None: pairs.txt beside the images
    artifacts: Path | None = None  # an export whose head ends in an embedding; None: dlib-resnet at "embedding"
    workdir: Path = Path("runs/lfw")  # chips (cached) and the default export
    flip: bool = True  # the test-time flip (chosen on View 1: see on_device.pair_embeddings)
    workers: int = 2  # alignment processes


def images_root(faces: Path) -> Path:
    """The folder of identity folders: ``faces`` itself, or its ``lfw-deepfunneled``/``lfw`` subfolder."""
    faces = Path(faces)
    for name in ("lfw-deepfunneled", "lfw", "lfw_funneled"):
        if (faces / name).is_dir():
            return faces / name
    if not faces.is_dir():
        raise UserError(f"{faces} is not a folder (expected LFW: <folder>/<identity>/<identity>_0001.jpg)")
    return faces


def default_export(workdir: Path, say: Callable[[str], None], *, flip_average: bool = False) -> Path:
    """dlib's network exported at its embedding (kept in ``workdir``; exported once); ``flip_average``: its head
    averaging each image with its mirror image (``dpa export --flip-average``)."""
    from exporter.export import ExportConfig, export

    out = Path(workdir) / ("artifacts-dlib-embedding-flip-average" if flip_average else "artifacts-dlib-embedding")
    if not (out / "manifest.json").is_file():
        say(f"exporting dlib's face network at its embedding to {out}")
        Path(workdir).mkdir(parents=True, exist_ok=True)
        export(ExportConfig(network=NetworkName.DLIB_RESNET, arch=ArchConfig(num_classes=2), cut="embedding",
                            out=out, flip_average=flip_average))  # fmt: skip
    return out


def _pairs_file(cfg: LfwEvalConfig, root: Path) -> Path:
    if cfg.pairs is not None:
        return cfg.pairs
    for candidate in (root.parent / "pairs.txt", Path(cfg.faces) / "pairs.txt"):
        if candidate.is_file():
            return candidate
    raise UserError(f"no pairs.txt beside {root}: give --pairs (LFW's View 2 pairs file)")


def evaluate_lfw(
    cfg: LfwEvalConfig, *, say: Callable[[str], None] = print, progress: Callable[[int, int], None] = lambda i, n: None
) -> dict[str, Any]:
    """The View 2 report: 10-fold accuracy (mean, std, standard error, each fold), ROC AUC, TAR at FAR 1e-3,
    the ROC curve, and what alignment had to do."""
    root = images_root(cfg.faces)
    pairs = read_pairs(_pairs_file(cfg, root))
    keys = pairs.images()
    images = [image_path(root, k) for k in keys]
    missing = [p for p in images if not p.is_file()]
    if missing:
        raise UserError(f"{len(missing)} images the pairs name are not under {root}, e.g. {missing[0]}")
    artifacts = cfg.artifacts if cfg.artifacts is not None else default_export(cfg.workdir, say)
    manifest = load_manifest(artifacts, verify=("head",))
    alignment: dict[str, Any] | None = None
    files = images
    if manifest.alignment is not None:
        chips = Path(cfg.workdir) / "chips" / manifest.alignment
        say(f"aligning {len(images)} photographs ({manifest.alignment}; chips kept in {chips})")
        report = align_images(images, root, chips, spec=ALIGNMENT[manifest.alignment], centre_fallback=True,
                              workers=cfg.workers, progress=progress)  # fmt: skip
        alignment = report.as_json()
        files = [chip_path(root, chips, p) for p in images]
    say(f"embedding {len(files)} images on the device's head ({manifest.arch} at {manifest.cut})")
    head = HeadModel(artifacts, manifest, resolve_device(DeviceProfile.CPU), frozen=True)
    # an export whose head already averages each image with its mirror (``--flip-average``) needs no second flip
    e = pair_embeddings(head, manifest, files, flip=cfg.flip and not manifest.flip_average)
    index = {k: i for i, k in enumerate(keys)}
    a = np.array([index[k] for k in pairs.first])
    b = np.array([index[k] for k in pairs.second])
    scores = np.einsum("ij,ij->i", e[a], e[b])
    folds = ten_fold_accuracy(scores, pairs)
    ver = verification(scores, pairs.same)
    return {
        "view2_accuracy": folds["accuracy"],
        "view2_std": folds["std"],
        "view2_standard_error": folds["standard_error"],
        "fold_accuracies": folds["fold_accuracies"],
        "fold_thresholds": folds["fold_thresholds"],
        "roc_auc": ver["auc"],
        "tar_at_far_1e-3": ver["tar_at_far_1e-3"],
        "pairs": {"genuine": ver["genuine_pairs"], "impostor": ver["impostor_pairs"]},
        "network": manifest.arch,
        "cut": manifest.cut,
        "artifacts": str(artifacts),
        "flip": cfg.flip or manifest.flip_average,  # in the head graph or on the device
        "score": "cosine",
        "alignment": manifest.alignment,
        "alignment_report": alignment,
        "roc": roc_points(scores, pairs.same, 300),
        "cpu": cpu_info().as_json(),
    }


def write_lfw_roc(report: dict[str, Any], path: Path) -> Path:
    """The View 2 ROC (PNG), false-accept rate on a log axis, with the 10-fold accuracy in the title."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 4.5), dpi=120)
    ax = fig.subplots()
    fpr = [max(f, 1e-4) for f in report["roc"]["fpr"]]
    ax.plot(fpr, report["roc"]["tpr"], label=f"{report['network']} at {report['cut']}: AUC {report['roc_auc']:.4f}")
    ax.set_xscale("log")
    ax.set_xlim(1e-3 / 3, 1)
    ax.set_ylim(0.8 if report["roc_auc"] > 0.95 else 0, 1.0)
    ax.set_xlabel("false-accept rate (View 2 impostor pairs)")
    ax.set_ylabel("true-accept rate (View 2 genuine pairs)")
    acc, std = report["view2_accuracy"], report["view2_std"]
    ax.set_title(f"LFW View 2: 10-fold accuracy {acc:.4f} +- {std:.4f}" + (" (test-time flip)" if report["flip"]
                 else ""), fontsize=9)  # fmt: skip
    ax.legend(loc="lower right", fontsize=8)
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path


def summary_lines(report: dict[str, Any]) -> list[str]:
    """The report in lines that fit 80 columns."""
    a = report.get("alignment_report") or {}
    lines = [
        f"LFW View 2, 10 folds: accuracy {report['view2_accuracy']:.4f} +- {report['view2_std']:.4f} "
        f"(std over folds; standard error {report['view2_standard_error']:.4f})",
        f"ROC AUC {report['roc_auc']:.4f}, TAR at FAR 1e-3 {report['tar_at_far_1e-3']:.3f} "
        f"({report['pairs']['genuine']} + {report['pairs']['impostor']} pairs)",
        f"network {report['network']} at {report['cut']}, cosine, flip {'on' if report['flip'] else 'off'}",
    ]
    if a:
        lines.append(f"alignment {report['alignment']}: {a['aligned']} chips ({a['reused']} from the cache); of "
                     f"those aligned now, the CNN detector found {a['cnn_detector']}, the centre box "
                     f"stood in for {len(a['centre_box'])}")  # fmt: skip
    return lines
