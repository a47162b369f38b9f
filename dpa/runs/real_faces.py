"""``dpa demo --faces DIR``: the demo's recipes on real photographs (an LFW-layout folder).

Who is who. The device's identities are those with at least ``min_images`` photos (LFW: the 62 with >= 20,
75/25 split per identity, seeded). Everything public comes from other people, disjoint from every device
identity (those with fewer than ``few_min_images`` photos, split by a seeded hash of the name): the
release centre, clip and projection (``public-centre``), the thresholds (``public-val``: pairs and the
open-set threshold on public templates as noisy as the device's), the linear probe's C, and the strangers
the device must reject (``strangers``); LFW's people with one photo join the last two (open set needs no
pairs).

The runs, each through the product's own parts: alignment (``dpa.faces.align``), dlib's network exported
at its embedding (``exporter``), the device (``runtime_client``) and a real edge server on loopback:

* **local templates**: the device enrols alone; nothing is released (``local``);
* **non-private reference**: the best of the noiseless class templates and a linear probe on the same
  embeddings (the probe's C chosen on public identities);
* **private class sums** at each whole-run epsilon: the sums released once (labels inside), the recipe
  chosen on public identities (``RealFacesConfig``'s comments), the gallery's thresholds calibrated on
  public templates with the same noise;
* **few photos**: identities with >= ``few_min_images`` photos, ``few_enrol`` enrolled per person, the
  rest probes: local templates against private class sums.

Every private figure carries its whole-run epsilon and delta, the adjacency, the epsilon the same noise
has under replace-one, and its share of the best non-private recipe on the same split.
"""

from __future__ import annotations

import asyncio
import hashlib
import math
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
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
from dpa.faces.lfw import IMAGE_EXTENSIONS, FaceIndex, index_faces, split_faces
from dpa.faces.verification import unit_rows
from dpa.privacy.class_sums import Adjacency
from dpa.privacy.release_clip import release_clip
from dpa.runs.lfw_eval import images_root
from dpa.runs.loopback import serve_and_train
from dpa.runs.recognition import RecognitionData, calibrate_gallery, recognition_metrics
from exporter.export import ExportConfig, export
from runtime_client.config import ClientConfig
from runtime_client.head import HeadModel
from runtime_client.on_device import embed_files, template_scores
from runtime_client.recipes import Budget, Recipe

__all__ = ["RealFacesConfig", "device_embeddings", "run_real_faces", "seeded_rank"]


@dataclass(frozen=True)
class RealFacesConfig:
    faces: Path  # LFW layout (or the folder holding lfw-deepfunneled/)
    workdir: Path = Path("runs/real-faces")
    min_images: int = 20  # the device's identities (LFW: 62)
    few_min_images: int = 10  # the few-photo run's identities (LFW: 158); public people have fewer
    few_enrol: int = 5  # photos enrolled per person in the few-photo run
    public_centre_identities: int = 300  # public people for the release centre, clip and projection
    public_val_identities: int = 300  # public people the thresholds and the probe's C are chosen on
    strangers: int = 100  # people the device never enrolled, for open-set rejection
    epsilons: tuple[float, ...] = (8.0, 1.0)  # whole-run budgets of the private runs
    delta: float = 1e-5
    # The private recipe, chosen on public identities (first: LFW people with 10-19 photos, 75/25, 10 splits, the
    # release simulated with dpa.privacy.class_sums): add-remove without counts (sensitivity C) scored
    # 0.98 / 0.26 at epsilon 8 / 1 where replace-one scored 0.86 / 0.07. The projection then on public people
    # with 6-9 photos, 5 enrolled each, the rest probes (scripts/real_face_projection.py: 8 noise draws x 3
    # public splits, epsilon 8): 32 principal directions 0.881, 48 0.890, 48 whitened 0.4 of the way 0.904.
    # With the test-time flip inside the head (``flip_average``, the field's usual lever, below): 0.923.
    adjacency: Adjacency = Adjacency.ADD_REMOVE
    release_dims: int | None = 48
    release_whitening: float = 0.4
    # The embedding-cut exports average each photo's descriptor with its mirror image's (``dpa export
    # --flip-average``): chosen on the same public people (0.904 -> 0.923 at epsilon 8, the same 48 / 0.4 still
    # first), for every gallery here, private or not; twice the device's forward.
    flip_average: bool = True
    # LFW's people with one photo (4,069) serve open set, where one photo per person is enough: half join
    # public-val's faces the open-set threshold is chosen on, half the strangers (a bound on 1% false accepts
    # needs thousands of faces; ~1,000 certify 0.5%, ~3,000 0.7%)
    single_photo_people: bool = True
    probe_cs: tuple[float, ...] = (0.1, 1.0, 10.0, 100.0)  # the linear probe's C, chosen on public-val
    seed: int = 0
    workers: int = 2  # alignment processes
    # the experiments: the 62-way task, few photos, and (on request: its attack at 150 px takes longer than the
    # rest together) DP-A per example at an early cut
    runs: tuple[str, ...] = field(default=("main", "few"))
    # DP-A as the seed has it, on photographs: each example's activation at an early cut released once (frozen
    # public head), randomised labels inside the budget, the server training the rest of dlib's network and a
    # classifier from the releases; its recorded releases then face the strongest attack we have.
    per_example_cut: str = "res3"  # after the third residual unit: 34% of the FLOPs on the device
    per_example_epsilon: float = 8.0
    per_example_label_epsilon: float = 4.0  # of it, each label's (as the synthetic demo)
    per_example_epochs: int = 2  # the tail's passes over the one set of releases
    attack_epochs: int = 10  # the decoder attack's epochs (the MAP attack runs as configured)
    attack_aux_identities: int = 16  # public people whose photos the attacker trains its decoder on
    attack_victims: int = 16  # recorded releases attacked (each MAP inversion runs through the head at 150 px)
    attack: bool = True  # False: the per-example run's figures only, its view kept for `dpa attack view`

    def __post_init__(self) -> None:
        unknown = set(self.runs) - {"main", "few", "per-example"}
        if unknown or not self.runs:
            raise UserError(f"unknown experiments {sorted(unknown)}; valid: main, few, per-example")


def _counts(root: Path) -> dict[str, int]:
    out = {}
    for folder in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        n = sum(1 for f in folder.iterdir() if f.suffix.lower() in IMAGE_EXTENSIONS and not f.name.startswith("."))
        if n:
            out[folder.name] = n
    return out


def seeded_rank(name: str, seed: int) -> bytes:
    """The order public people are dealt into the runs' public sets by (and the projection script's)."""
    return hashlib.sha256(f"{seed}:{name}".encode()).digest()


def _people(cfg: RealFacesConfig, counts: dict[str, int]) -> dict[str, list[str]]:
    """Disjoint sets of identities: the device's, the few-photo run's, and three public ones."""
    device = sorted(n for n, c in counts.items() if c >= cfg.min_images)
    few = sorted(n for n, c in counts.items() if c >= cfg.few_min_images)
    public = sorted(
        (n for n, c in counts.items() if 2 <= c < cfg.few_min_images), key=lambda n: seeded_rank(n, cfg.seed)
    )
    need = cfg.public_centre_identities + cfg.public_val_identities + cfg.strangers
    if len(device) < 2 or len(public) < need:
        raise UserError(f"{cfg.faces}: {len(device)} identities with >= {cfg.min_images} photos and "
                        f"{len(public)} public ones (2 to {cfg.few_min_images - 1} photos); the runs need >= 2 "
                        f"and {need}")  # fmt: skip
    a, b = cfg.public_centre_identities, cfg.public_centre_identities + cfg.public_val_identities
    singles = sorted((n for n, c in counts.items() if c == 1), key=lambda n: seeded_rank(n, cfg.seed))
    singles = singles if cfg.single_photo_people else []
    half = len(singles) // 2
    return {"device": device, "few": few, "public-centre": sorted(public[:a]),
            "public-val": sorted(public[a:b] + singles[:half]),
            "strangers": sorted(public[b:need] + singles[half:])}  # fmt: skip


def _chip_sets(cfg: RealFacesConfig, root: Path, people: dict[str, list[str]], say: Any, progress: Any) -> dict:
    """Align every photo of every set once (cached chips), then one folder of links per set: only photos with a
    face found are in it; the others are named in the report and never released."""
    spec = ALIGNMENT["dlib-5pt-150"]
    chips = cfg.workdir / "chips" / spec.name
    names = sorted({n for group in people.values() for n in group})
    images = sorted(p for n in names for p in (root / n).iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
    say(f"aligning {len(images)} photographs of {len(names)} people ({spec.name}; chips kept in {chips})")
    report = align_images(images, root, chips, spec=spec, workers=cfg.workers, progress=progress)
    for path in report.no_face:
        say(f"[yellow]no face found in {path}: it is left out (nothing is released for it)")
    folders = {}
    for name, group in people.items():
        folder = cfg.workdir / "sets" / name
        shutil.rmtree(folder, ignore_errors=True)
        for person in group:
            for p in sorted((root / person).iterdir()):
                chip = chip_path(root, chips, p)
                if p.suffix.lower() in IMAGE_EXTENSIONS and chip.is_file():
                    (folder / person).mkdir(parents=True, exist_ok=True)
                    os.symlink(chip.resolve(), folder / person / chip.name)
        folders[name] = folder
    return {"folders": folders, "alignment": report.as_json()}


def _export(
    cfg: RealFacesConfig, out: Path, classes: int, centre: Path, dims: int | None, cut: str = "embedding"
) -> Path:  # fmt: skip
    export(ExportConfig(network=NetworkName.DLIB_RESNET, arch=ArchConfig(num_classes=classes), cut=cut, out=out,
                        centre_faces=centre, release_dims=dims, seed=cfg.seed,
                        release_whitening=cfg.release_whitening if dims is not None else 0.0,
                        flip_average=cfg.flip_average and cut == "embedding"))  # fmt: skip
    return out


def device_embeddings(art: Path, index: FaceIndex) -> np.ndarray:
    """The device's clean, clipped embeddings of ``index`` (what its templates and probes are made of)."""
    manifest = load_manifest(art, verify=("head",))
    head = HeadModel(art, manifest, resolve_device(DeviceProfile.CPU), frozen=True)
    clip = manifest.release_clip if manifest.release_clip is not None else math.inf
    return embed_files(head, manifest, list(index.paths), clip, 1.0)


def _templates_accuracy(train_e: np.ndarray, train: FaceIndex, test_e: np.ndarray, test: FaceIndex) -> float:
    """Noiseless class templates (the class means), scored as the device scores: the cosine."""
    k = len(train.names)
    means = np.stack([train_e[train.labels == c].mean(axis=0) for c in range(k)])
    scores = template_scores(test_e, means, np.bincount(train.labels, minlength=k))
    return float(np.mean(scores.argmax(axis=1) == test.labels))


def _probe_accuracy(c: float, train_e: np.ndarray, train: FaceIndex, test_e: np.ndarray, test: FaceIndex) -> float:
    from sklearn.linear_model import LogisticRegression

    model = LogisticRegression(C=c, max_iter=2000).fit(unit_rows(train_e), train.labels)
    return float(np.mean(model.predict(unit_rows(test_e)) == test.labels))


def _probe_c(cfg: RealFacesConfig, art: Path, public_val: Path) -> float:
    """The probe's C with the best held-out accuracy on public people with >= 4 photos (half of each
    person's photos to train, half to test): never the device's."""
    index = index_faces(public_val, min_faces_per_person=4)
    train, test = split_faces(index, test_fraction=0.5, seed=cfg.seed)
    tr, te = device_embeddings(art, train), device_embeddings(art, test)
    scores = {c: _probe_accuracy(c, tr, train, te, test) for c in cfg.probe_cs}
    return max(cfg.probe_cs, key=lambda c: (scores[c], -c))


def _nonprivate(art: Path, train: FaceIndex, test: FaceIndex, probe_c: float) -> dict[str, float]:
    tr, te = device_embeddings(art, train), device_embeddings(art, test)
    return {"class templates": _templates_accuracy(tr, train, te, test),
            "linear probe": _probe_accuracy(probe_c, tr, train, te, test)}  # fmt: skip


def _private(
    cfg: RealFacesConfig, name: str, art: Path, data: Path, eps: float, min_faces: int, recognition: RecognitionData,
    train_per_identity: int | None, say: Any,
) -> dict[str, Any]:  # fmt: skip
    """One class-sum release through a real server on loopback; the gallery calibrated with the same noise."""
    run_dir = cfg.workdir / name
    shutil.rmtree(run_dir, ignore_errors=True)
    private = math.isfinite(eps)
    client = Recipe.CLASS_SUMS.client_config(
        artifacts=art, clip=release_clip(load_manifest(art), source=art),
        budget=Budget(eps, delta=cfg.delta) if private else None, delta=cfg.delta, data=str(data),
        min_faces_per_person=min_faces, train_per_identity=train_per_identity, split_seed=cfg.seed, seed=cfg.seed,
        # the clean run keeps counts, so that the export's classes without photos have no template
        adjacency=cfg.adjacency if private else Adjacency.REPLACE_ONE,
        state_dir=run_dir / "client", report=run_dir / "report.json", record_view=run_dir / "view", progress=False,
    )  # fmt: skip
    say(
        f"{name}: class sums released once at whole-run epsilon {eps:g} ({cfg.adjacency.value}), server on loopback"
        if private
        else f"{name}: the clean class sums (no noise: the local templates' gallery), server on loopback"
    )
    report = asyncio.run(serve_and_train(art, run_dir / "server-state", client, templates=True, clean=False))
    _, test = _split(client, art)
    calibrate_gallery(art, client.state_dir, recognition)
    report["recognition"] = recognition_metrics(art, client.state_dir, test, recognition)
    return report


def _split(client: ClientConfig, art: Path) -> tuple[FaceIndex, FaceIndex]:
    from runtime_client.dataset import prepare_data

    return prepare_data(client, load_manifest(art))


_RECOGNITION = ("open_set_identification_rate", "open_set_rejection", "open_set_threshold", "verification_auc",
                "tar_at_far_1e-3")  # fmt: skip


def _row(name: str, report: dict[str, Any], best: float) -> dict[str, Any]:
    p = report["privacy"]
    acc = report["on_device"]["test_accuracy"]
    rec = report["recognition"]
    return {
        "name": name, "identification_accuracy": acc, "share_of_nonprivate": acc / best,
        "epsilon_total": p["total"]["epsilon"], "delta": p["total"]["delta"], "adjacency": p["adjacency"],
        "epsilon_replace_one": p["total"]["replace_one"]["epsilon"], "noise_scale": p["noise_scale"],
        "clip": p["clip"], "labels": "inside the class sums", **{k: rec[k] for k in _RECOGNITION},
    }  # fmt: skip


def run_real_faces(
    cfg: RealFacesConfig,
    *,
    say: Callable[[str], None] = print,
    progress: Callable[[int, int], None] = lambda i, n: None,
) -> dict[str, Any]:
    """Every run's figures (``--json``): the data, the non-private recipes, the private rows, few photos."""
    root = images_root(cfg.faces)
    cfg.workdir.mkdir(parents=True, exist_ok=True)
    people = _people(cfg, _counts(root))
    sets = _chip_sets(cfg, root, people, say, progress)
    f = sets["folders"]
    recognition = RecognitionData(public=f["public-val"], strangers=f["strangers"])
    out: dict[str, Any] = {"data": {k: len(v) for k, v in people.items()}, "alignment": sets["alignment"],
                           "seed": cfg.seed, "cpu": cpu_info().as_json()}  # fmt: skip
    plain = _export(cfg, cfg.workdir / "artifacts", len(people["few"]), f["public-centre"], None)
    say("choosing the linear probe's C on public people")
    out["probe_c"] = probe_c = _probe_c(cfg, plain, f["public-val"])
    common = {"plain": plain, "centre": f["public-centre"], "probe_c": probe_c, "recognition": recognition}
    if "main" in cfg.runs:
        out["main"] = _experiment(cfg, "main", f["device"], cfg.min_images, None, say=say, **common)
    if "few" in cfg.runs:
        out["few_photos"] = _experiment(cfg, "few", f["few"], cfg.few_min_images, cfg.few_enrol, say=say, **common)
    if "per-example" in cfg.runs:
        out["per_example"] = _per_example(cfg, f["device"], f["public-centre"], out.get("main"), say)
    return out


def _per_example(
    cfg: RealFacesConfig, data: Path, public: Path, main: dict[str, Any] | None, say: Any
) -> dict[str, Any]:  # fmt: skip
    """DP-A per example at ``per_example_cut``: the run through a real server, then the attacks on its view."""
    from dpa.audit.config import InversionConfig
    from dpa.audit.view_audit import audit_view

    index = index_faces(data, min_faces_per_person=cfg.min_images)
    art = _export(cfg, cfg.workdir / f"artifacts-{cfg.per_example_cut}", len(index.names), public, None,
                  cfg.per_example_cut)  # fmt: skip
    run_dir = cfg.workdir / f"per-example-{cfg.per_example_cut}"
    shutil.rmtree(run_dir, ignore_errors=True)
    client = Recipe.PUBLIC.client_config(
        artifacts=art, clip=release_clip(load_manifest(art), source=art),
        budget=Budget(cfg.per_example_epsilon, delta=cfg.delta, label_epsilon=cfg.per_example_label_epsilon),
        data=str(data), min_faces_per_person=cfg.min_images, split_seed=cfg.seed, epochs=cfg.per_example_epochs,
        releases_per_example=1, on_device_templates=False, seed=cfg.seed, state_dir=run_dir / "client",
        report=run_dir / "report.json", record_view=run_dir / "view", record_view_limit=8, progress=False,
    )  # fmt: skip
    say(
        f"per-example DP-A at {cfg.per_example_cut}: every photo's activation released once, whole-run epsilon "
        f"{cfg.per_example_epsilon:g} (labels {cfg.per_example_label_epsilon:g} of it), the server training the rest"
    )
    report = asyncio.run(serve_and_train(art, run_dir / "server-state", client))
    best = None if main is None else main["best_nonprivate"]
    p = report["privacy"]
    out = {
        "cut": cfg.per_example_cut, "epsilon_total": p["total"]["epsilon"], "delta": p["total"]["delta"],
        "label_epsilon_per_release": p["label_epsilon_per_release"], "releases_per_example": p["total"]["releases"],
        "clean_test_accuracy": report.get("clean_test_accuracy"),
        "private_test_accuracy": report.get("private_test_accuracy"),
        "share_of_nonprivate": None if not best else (report.get("clean_test_accuracy") or 0.0) / best,
        "chance": 1 / len(index.names), "view": str(run_dir / "view"),
    }  # fmt: skip
    if not cfg.attack:
        return out
    say("attacking the recorded releases (decoder and MAP inversion, against the public mean face)")
    attack = audit_view(run_dir / "view", InversionConfig(data=str(public), epochs=cfg.attack_epochs, seed=cfg.seed,
                                                          aux_identities=cfg.attack_aux_identities),
                        max_examples=cfg.attack_victims)  # fmt: skip
    noisy, clean = attack.results[0], attack.results[-1]
    return out | {"attack": {"strongest": noisy.strongest_attack, "ssim": noisy.ssim_mean,
                             "ssim_without_noise": clean.ssim_mean, "baseline_ssim": attack.baseline_ssim_mean,
                             "victims": attack.victim_images}}  # fmt: skip


def _experiment(
    cfg: RealFacesConfig, name: str, data: Path, min_faces: int, enrol: int | None, *, plain: Path, centre: Path,
    probe_c: float, recognition: RecognitionData, say: Any,
) -> dict[str, Any]:  # fmt: skip
    """Local templates, the non-private reference and the private runs on one split of the device's data."""
    index = index_faces(data, min_faces_per_person=min_faces)
    classes = len(index.names)
    art = _export(cfg, cfg.workdir / f"artifacts-{name}", classes, centre, cfg.release_dims)
    same_split = ClientConfig(artifacts=plain, data=str(data), min_faces_per_person=min_faces,
                              train_per_identity=enrol, split_seed=cfg.seed)  # fmt: skip
    train, test = _split(same_split, plain)
    say(f"{name}: {classes} people, {len(train.paths)} photos enrolled, {len(test.paths)} probes")
    recipes = _nonprivate(plain, train, test, probe_c)
    best = max(recipes.values())
    # the local gallery's open-set figures: the same noiseless templates, kept by a server from clean sums
    clean = _private(cfg, f"{name}-clean-sums", plain, data, math.inf, min_faces, recognition, enrol, say)
    rows = [{"name": "local templates (nothing released)", "identification_accuracy": recipes["class templates"],
             "share_of_nonprivate": recipes["class templates"] / best, "epsilon_total": None,
             **{k: clean["recognition"][k] for k in _RECOGNITION}}]  # fmt: skip
    for eps in cfg.epsilons:
        report = _private(cfg, f"{name}-private-eps{eps:g}", art, data, eps, min_faces, recognition, enrol, say)
        rows.append(_row(f"private class sums, epsilon {eps:g}", report, best))
    return {"identities": classes, "enrolled": len(train.paths), "probes": len(test.paths),
            "nonprivate": recipes, "best_nonprivate": best, "release_dims": cfg.release_dims,
            "release_whitening": cfg.release_whitening, "flip_average": cfg.flip_average, "runs": rows}  # fmt: skip
