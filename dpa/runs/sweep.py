"""``dpa sweep``: the privacy-utility frontier, over whole-run epsilons, cuts and private data sizes.

For every cut and data size the sweep trains one non-private run and one private run per
whole-run epsilon (``--total-epsilon``: the accountant calibrates the noise for all of the run's
releases), each through the real server and client on loopback. Each point reports:

* clean held-out accuracy (the trained head + tail on clean inputs) and private split inference;
* the clean accuracy as a fraction of the non-private run of the same cut and data: the frontier;
* the strongest attack's SSIM on the run's own recorded view (the first training release, whose
  head the server knows: the export's) against the no-data baseline (the attacker's mean face);
* the device's cost of the cut: FLOPs and parameter share, head step time, peak memory, wire bytes.

The clip of each cut is the export's ``release_clip`` (``dpa.privacy.release_clip``'s policy: half the
median activation norm of the export's head on PUBLIC faces: the built-in generator's other identities,
seed 1, for the scratch recipe, the centre's faces for the public ones), so choosing it spends no privacy.
``clip_scales`` sweeps multiples of it and ``release_dims`` a public projection before the release
(``dpa export --release-dims``; 0: none), both levers of issue 23:
each (clip scale, release dims) is its own frontier against its own non-private run.

The public recipes (``public``, ``class-sums``) load the shipped public weights where they fit the
input size and width, as ``dpa demo`` does (``pretrain=True``: pretrain in the work folder instead),
and report the field's figures per point beside the closed-set accuracy: verification ROC AUC,
TAR at FAR 1e-3, accuracy at the public threshold, and open-set rejection of strangers
(``dpa.runs.recognition``, every threshold chosen on public faces).

Every point is saved as it finishes (``points/<key>.json``); a re-run with the same settings
skips the points already done. Writes ``frontier.csv``, ``frontier.json`` and ``frontier.png``.
"""

from __future__ import annotations

import asyncio
import json
import math
import shutil
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from dpa.audit.class_sum_audit import audit_class_sum_view, write_class_sum_grid
from dpa.audit.config import InversionConfig
from dpa.audit.figures import write_grid
from dpa.audit.view_audit import audit_view
from dpa.contract.architecture import ArchConfig, validate_cut
from dpa.contract.errors import UserError
from dpa.contract.manifest import OptimizerConfig, OptimizerName, load_manifest, sha256_file
from dpa.faces.synth import SynthConfig, cached_faces
from dpa.privacy import checks
from dpa.privacy.release_clip import release_clip
from dpa.runs.device_cost import device_cost
from dpa.runs.frontier import (
    FIELD_FIGURES,
    json_safe,
    relative,
    smallest_epsilon,
    write_csv,
    write_frontier_plot,
    write_json,
)
from dpa.runs.loopback import serve_and_train
from dpa.runs.public_data import PublicWeights, public_weights
from dpa.runs.recognition import RecognitionData, calibrate_gallery, recognition_data, recognition_metrics
from exporter.export import ExportConfig, export
from exporter.pretrain import PRETRAIN_PIXEL_STD
from runtime_client.config import ClientConfig
from runtime_client.dataset import prepare_data
from runtime_client.recipes import Budget, Recipe

__all__ = ["SweepConfig", "run_sweep", "write_frontier_plot", "PUBLIC_SEED"]

#: The built-in generator's seed for public faces: identities disjoint from the devices' (seed 0).
PUBLIC_SEED = 1


@dataclass(frozen=True)
class SweepConfig:
    workdir: Path = Path("runs/sweep")  # exports, per-point runs, results and the figure
    total_epsilons: tuple[float, ...] = (8.0, 64.0, 1e3, 1e5)  # whole run; a non-private run is added
    cuts: tuple[str, ...] = ("conv1_1", "pool1", "pool2", "pool3")
    sizes: tuple[tuple[int, int], ...] = ((10, 40),)  # (identities, images per identity) of the private set
    epochs: int = 8
    image_size: int = 64
    width: float = 0.25
    optimizer: OptimizerConfig = field(default_factory=lambda: OptimizerConfig(name=OptimizerName.ADAMW, lr=1e-3))
    batch_size: int = 8
    delta: float = 1e-5
    seed: int = 0
    attack: bool = True  # the strongest attack on each point's recorded view
    attack_epochs: int = 10  # decoder epochs
    attack_aux_identities: int = 8  # the attacker's public faces
    attack_images_per_identity: int = 8
    max_steps_per_epoch: int | None = None  # cap for quick runs
    # Private runs randomise labels at this epsilon per release, inside the same whole-run budget;
    # inf (the default): labels in clear, so the frontier measures the activations' mechanism alone.
    label_epsilon: float = math.inf
    # "scratch": every layer trained from initialisation, the head too, one release per epoch.
    # "public": the network pretrained on public faces, exported centred, the head frozen and each
    # example released once; the clean accuracy is the device's with the server's class templates.
    # "class-sums": the public recipe, with the class sums released once instead of each example
    # (``dpa client --release class-sums``); the attack rebuilds faces from each class's noisy mean.
    recipe: Recipe = Recipe.SCRATCH
    # The public recipes load the shipped public weights where they fit (dpa.runs.shipped_weights);
    # True, or a size or width they were not trained for: pretrain here (the pretrain_* fields).
    pretrain: bool = False
    pretrain_identities: int = 40  # the public recipe's pretraining (exporter.pretrain)
    pretrain_per_identity: int = 40
    pretrain_epochs: int = 10
    public_centre_identities: int = 40  # with the shipped weights: public faces for the centre and clip
    public_centre_per_identity: int = 10
    # Each point's clip as multiples of the public clip (the export's release_clip; 1.0: that clip).
    clip_scales: tuple[float, ...] = (1.0,)
    # Public recipes: each point's export projected on this many public principal directions (0: none).
    release_dims: tuple[int, ...] = (0,)
    # The public recipes' field figures (verification, open set), thresholds on these public faces.
    recognition: bool = True
    recognition_public_identities: int = 100
    recognition_strangers: int = 20

    def __post_init__(self) -> None:
        object.__setattr__(self, "recipe", Recipe.parse(self.recipe))
        for eps in self.total_epsilons:
            checks.epsilon(eps, allow_inf=False, name="total epsilon")
        for cut in self.cuts:
            validate_cut(cut)
        if not self.cuts or not self.sizes or not self.total_epsilons:
            raise UserError("the sweep needs at least one cut, one data size and one whole-run epsilon")
        for ids, per in self.sizes:
            if ids < 2 or per < 4:
                raise UserError(f"a data size needs >= 2 identities and >= 4 images each, got {ids}x{per}")
        if self.epochs < 1:
            raise UserError(f"epochs must be >= 1, got {self.epochs}")
        checks.delta(self.delta, allow_zero=False)
        checks.epsilon(self.label_epsilon, allow_inf=True, name="label epsilon")
        if not self.clip_scales:
            raise UserError("the sweep needs at least one clip scale (1 is the public clip)")
        for scale in self.clip_scales:
            checks.positive_finite("clip scale", scale)
        if not self.release_dims or any(k < 0 for k in self.release_dims):
            raise UserError(f"release dims must be >= 0 (0: no projection), got {self.release_dims}")
        if not self.recipe.frozen_head and any(self.release_dims):
            raise UserError("a release projection needs a public recipe (its directions come from public faces)")

    @property
    def classes(self) -> int:
        return max(ids for ids, _ in self.sizes)

    def point_settings(self) -> dict[str, Any]:
        """What a saved point must match to be reused."""
        return {
            "epochs": self.epochs,
            "image_size": self.image_size,
            "width": self.width,
            "optimizer": asdict(self.optimizer) | {"name": self.optimizer.name.value},
            "batch_size": self.batch_size,
            "delta": self.delta,
            "seed": self.seed,
            "attack": self.attack,
            "attack_epochs": self.attack_epochs,
            "max_steps_per_epoch": self.max_steps_per_epoch,
            "classes": self.classes,
            "label_epsilon": self.label_epsilon,
            "recipe": self.recipe.value,
            **({"pretrain": [self.pretrain, self.pretrain_identities, self.pretrain_per_identity,
                             self.pretrain_epochs],
                "recognition": [self.recognition, self.recognition_public_identities, self.recognition_strangers]}
               if self.recipe.frozen_head else {}),
        }  # fmt: skip


def _acc(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def _tag(eps: float | None, clip_scale: float = 1.0) -> str:
    return ("nonprivate" if eps is None else f"eps{eps:g}") + ("" if clip_scale == 1.0 else f"-clip{clip_scale:g}")


def _export(cfg: SweepConfig, cut: str, pretrained: tuple[Path, Path] | None, public: Path, dims: int = 0) -> Path:
    """The point's export, reused while its settings hold: from scratch with its clip measured on ``public``
    faces, or the pretrained network centred on its own public faces (``pretrained[1]``)."""
    out = cfg.workdir / "exports" / (cut if not dims else f"{cut}-dims{dims}")
    arch = ArchConfig(image_size=cfg.image_size, width=cfg.width, num_classes=cfg.classes, dropout=0.0)
    weights = None if pretrained is None else sha256_file(pretrained[0])
    try:
        m = load_manifest(out, verify=("head", "tail"))
        same = (m.cut, m.image_size, m.width, m.num_classes, m.optimizer, m.seed, m.weights_sha256,
                m.release_dims, m.release_clip is not None) == (
            cut, arch.image_size, arch.width, arch.num_classes, cfg.optimizer,
            cfg.seed if pretrained is None else None, weights, dims or None, True,
        )  # fmt: skip
    except ValueError:
        same = False
    if not same:
        shutil.rmtree(out, ignore_errors=True)
        out.parent.mkdir(parents=True, exist_ok=True)
        if pretrained is None:
            export(ExportConfig(arch=arch, cut=cut, optimizer=cfg.optimizer, out=out, seed=cfg.seed, clip_faces=public))
        else:
            export(ExportConfig(
                arch=arch, cut=cut, optimizer=cfg.optimizer, out=out, seed=cfg.seed, weights=pretrained[0],
                pixel_std=PRETRAIN_PIXEL_STD, centre_faces=pretrained[1], release_dims=dims or None,
            ))  # fmt: skip
    return out


def _public_weights(cfg: SweepConfig, say: Callable[[str], None]) -> tuple[Path, Path]:
    """(public weights, public faces for the export's centre and clip), as ``dpa demo`` takes them."""
    return public_weights(cfg.workdir, PublicWeights(
        image_size=cfg.image_size, width=cfg.width, pretrain=cfg.pretrain,
        centre_identities=cfg.public_centre_identities, centre_per_identity=cfg.public_centre_per_identity,
        pretrain_identities=cfg.pretrain_identities, pretrain_per_identity=cfg.pretrain_per_identity,
        pretrain_epochs=cfg.pretrain_epochs, seed=cfg.seed,
    ), say)  # fmt: skip


def _client(
    cfg: SweepConfig, artifacts: Path, data: Path, clip: float, eps: float | None, run_dir: Path
) -> ClientConfig:
    """The point's device: the sweep's recipe at whole-run ``eps`` (None: no noise, labels in clear)."""
    budget = None if eps is None else Budget(eps, delta=cfg.delta, label_epsilon=cfg.label_epsilon)
    return cfg.recipe.client_config(
        artifacts=artifacts, clip=clip, budget=budget, delta=cfg.delta,
        epochs=None if cfg.recipe.frozen_head else cfg.epochs, data=str(data), batch_size=cfg.batch_size,
        seed=cfg.seed, state_dir=run_dir / "client", report=run_dir / "report.json",
        max_steps_per_epoch=cfg.max_steps_per_epoch, record_view=run_dir / "view",
        record_view_limit=1,  # the first release: made by the export's head, which the server knows
        progress=False,
    )  # fmt: skip


def _run_point(
    cfg: SweepConfig, artifacts: Path, data: Path, clip: float, size: tuple[int, int], eps: float | None,
    clip_scale: float = 1.0, recognition: RecognitionData | None = None,
) -> dict[str, Any]:  # fmt: skip
    """Train one run (eps: whole-run budget; None: no noise) at ``clip_scale`` times the public ``clip``,
    measure both accuracies (and, for a public recipe, the field's figures), attack its view."""
    clip = clip * clip_scale
    run_dir = cfg.workdir / "runs" / f"{artifacts.name}-{size[0]}x{size[1]}-{_tag(eps, clip_scale)}"
    shutil.rmtree(run_dir, ignore_errors=True)
    client = _client(cfg, artifacts, data, clip, eps, run_dir)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the fixed seed and epsilon = inf are deliberate
        report = asyncio.run(serve_and_train(artifacts, run_dir / "server-state", client,
                                             templates=cfg.recipe.frozen_head,
                                             clean=cfg.recipe is not Recipe.CLASS_SUMS))  # fmt: skip
    point = _figures(cfg, report, artifacts, size, eps, clip, clip_scale) | {"run_dir": str(run_dir)}
    if cfg.recipe.frozen_head and recognition is not None:
        calibrate_gallery(artifacts, client.state_dir, recognition)
        _, test = prepare_data(client, load_manifest(artifacts))
        rec = recognition_metrics(artifacts, client.state_dir, test, recognition)
        point |= {k: rec[k] for k in FIELD_FIGURES}
    if cfg.attack:
        point |= (_attack_class_sums if cfg.recipe is Recipe.CLASS_SUMS else _attack_examples)(cfg, run_dir)
    return point


def _figures(
    cfg: SweepConfig, report: dict[str, Any], artifacts: Path, size: tuple[int, int], eps: float | None,
    clip: float, clip_scale: float,
) -> dict[str, Any]:  # fmt: skip
    """A point's row: its data, its whole privacy account, its accuracies."""
    p = report["privacy"]
    label_eps = p["label_epsilon_per_release"]
    return {
        "cut": report["cut"], "identities": size[0], "per_identity": size[1],
        "train_images": report["data"]["train_images"], "test_images": report["data"]["test_images"],
        "epsilon_total": None if eps is None else p["total"]["epsilon"], "epsilon_budget": eps,
        "delta": None if eps is None else p["total"]["delta"],
        "epsilon_per_release": None if eps is None else p["epsilon_per_release"],
        "releases_per_example": p["total"]["releases"],
        "label_epsilon_per_release": None if math.isinf(label_eps) else label_eps,
        "noise_multiplier": p["noise_multiplier"], "clip": clip, "clip_scale": clip_scale,
        "release_dims": load_manifest(artifacts).release_dims or 0, "snr_per_element": p["snr_per_element"],
        "clean_test_accuracy": cfg.recipe.clean_accuracy(report), "clean_classifier": cfg.recipe.classifier,
        "tail_clean_test_accuracy": report.get("clean_test_accuracy"),  # None: class sums train no tail
        "private_test_accuracy": report.get("private_test_accuracy"), "chance": 1 / size[0],
        "train_seconds": report["seconds"],
    }  # fmt: skip


def _attack_config(cfg: SweepConfig) -> InversionConfig:
    return InversionConfig(
        data_seed=PUBLIC_SEED, aux_identities=cfg.attack_aux_identities, victim_identities=1,
        images_per_identity=cfg.attack_images_per_identity, epochs=cfg.attack_epochs, seed=cfg.seed,
        cache_dir=cfg.workdir / "attack-faces",
    )  # fmt: skip


def _attack_class_sums(cfg: SweepConfig, run_dir: Path) -> dict[str, Any]:
    """The strongest attack on the recorded class sums: faces rebuilt from each class's noisy mean."""
    res = audit_class_sum_view(run_dir / "view", _attack_config(cfg))
    keep = {k: v for k, v in res.items() if k not in ("reconstructions", "members", "held_out", "prior")}
    write_json(run_dir / "inversion.json", keep)
    write_class_sum_grid(res, run_dir / "inversion.png")
    return {
        "attack_ssim": res["member_ssim_mean"], "attack_held_out_ssim": res["held_out_ssim_mean"],
        "attack": res["strongest_attack"], "baseline_ssim": res["baseline_ssim_mean"],
        "attack_over_baseline": res["member_ssim_mean"] - res["baseline_ssim_mean"],
    }  # fmt: skip


def _attack_examples(cfg: SweepConfig, run_dir: Path) -> dict[str, Any]:
    """The strongest attack on the first recorded per-example release."""
    inv = audit_view(run_dir / "view", _attack_config(cfg), max_examples=cfg.batch_size, noiseless=False)
    (r,) = inv.results
    write_json(run_dir / "inversion.json", inv.to_json())
    write_grid(inv, run_dir / "inversion.png")
    return {
        "attack_ssim": r.ssim_mean, "attack_psnr": r.psnr_mean, "attack": r.strongest_attack,
        "baseline_ssim": inv.baseline_ssim_mean, "attack_over_baseline": r.ssim_mean - inv.baseline_ssim_mean,
    }  # fmt: skip


def run_sweep(cfg: SweepConfig, *, say: Callable[[str], None] = print, progress: bool = True) -> dict[str, Any]:
    """Every (cut, size, epsilon) point, resuming saved ones; writes the table and the figure."""
    cfg.workdir.mkdir(parents=True, exist_ok=True)
    settings = cfg.point_settings()
    public = cached_faces(cfg.workdir / "data", SynthConfig(4, 8, cfg.image_size, PUBLIC_SEED))
    pretrained, recognition = None, None
    if cfg.recipe.frozen_head:
        pretrained = _public_weights(cfg, say)
        public = pretrained[1]
        if cfg.recognition:
            recognition = recognition_data(cfg.workdir / "recognition", cfg.image_size,
                                           public_identities=cfg.recognition_public_identities,
                                           strangers=cfg.recognition_strangers)  # fmt: skip
    plan = [(cut, size, eps, scale, dims) for cut in cfg.cuts for size in cfg.sizes for dims in cfg.release_dims
            for scale in cfg.clip_scales for eps in (None, *cfg.total_epsilons)]  # fmt: skip
    points: list[dict[str, Any]] = []
    costs: dict[str, dict[str, Any]] = {}
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, disable=not progress) as bar:
        task = bar.add_task("frontier", total=len(plan))
        for cut, size, eps, scale, dims in plan:
            key = f"{cut}{f'-dims{dims}' if dims else ''}-{size[0]}x{size[1]}-{_tag(eps, scale)}"
            saved = cfg.workdir / "points" / f"{key}.json"
            bar.update(task, description=f"frontier: {key}")
            point = _saved_point(saved, settings)
            if point is None:
                artifacts = _export(cfg, cut, pretrained, public, dims)
                if artifacts.name not in costs:
                    costs[artifacts.name] = device_cost(artifacts, batch=cfg.batch_size)
                data = cached_faces(cfg.workdir / "data", SynthConfig(size[0], size[1], cfg.image_size, 0))
                clip = release_clip(load_manifest(artifacts), source=artifacts)
                point = _run_point(cfg, artifacts, data, clip, size, eps, scale, recognition) | costs[artifacts.name]
                write_json(saved, {"settings": settings, "point": point})
                say(
                    f"{key}: clean {point['clean_test_accuracy']:.3f}, private {_acc(point['private_test_accuracy'])}"
                    + (f", attack SSIM {point['attack_ssim']:.3f}" if cfg.attack else "")
                )
            points.append(point)
            bar.advance(task)
    results = {"config": json_safe(settings | {"cuts": list(cfg.cuts), "sizes": [list(s) for s in cfg.sizes]})}
    results["points"] = relative(points)
    results["smallest_epsilon_at"] = smallest_epsilon(results["points"])
    write_json(cfg.workdir / "frontier.json", results)
    write_csv(cfg.workdir / "frontier.csv", results["points"])
    write_frontier_plot(results, cfg.workdir / "frontier.png")
    return results


def _saved_point(path: Path, settings: dict[str, Any]) -> dict[str, Any] | None:
    try:
        saved = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    if saved.get("settings") != json.loads(json.dumps(json_safe(settings))):
        return None
    point = saved["point"]
    for key in ("epsilon_total", "epsilon_per_release"):
        if isinstance(point.get(key), str):
            point[key] = float(point[key])
    return point
